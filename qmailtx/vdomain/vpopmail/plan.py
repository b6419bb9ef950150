"""The plan of an import: what ``scanTree`` found, for ``applyPlan`` to carry out."""

from __future__ import annotations

from dataclasses import dataclass, field

from qmailtx.vdomain.records import Alias, Domain, User


@dataclass(frozen=True)
class Rewrite:
    """A path in a delivery line changed to the new data folder."""

    path: str  # the file in the old tree
    line: int
    old: str
    new: str


@dataclass(frozen=True)
class FileImport:
    """A dot-qmail file to write into the new tree."""

    source: str
    destination: str
    text: str


@dataclass(frozen=True)
class MailStats:
    messages: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class UserImport:
    user: User
    source: str  # "<vpasswd>:<line>"
    maildir: str | None  # the Maildir to copy from, None if there is none
    mail: MailStats
    files: tuple[FileImport, ...]


@dataclass(frozen=True)
class AliasImport:
    alias: Alias
    source: str


@dataclass
class DomainImport:
    domain: Domain
    folder: str
    users: list[UserImport] = field(default_factory=list)
    aliases: list[AliasImport] = field(default_factory=list)
    files: list[FileImport] = field(default_factory=list)


@dataclass
class ImportPlan:
    root: str
    data: str
    domains: list[DomainImport] = field(default_factory=list)
    aliasDomains: list[tuple[str, str]] = field(default_factory=list)  # (alias, domain)
    rewrites: list[Rewrite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
