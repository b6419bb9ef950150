"""Tests for the built-in policies and their registry."""
