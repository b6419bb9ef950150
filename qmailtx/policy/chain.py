"""Run the checks of one SMTP stage in their configured order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from twisted.internet.defer import Deferred

from qmailtx.policy.verdict import CONTINUE, Verdict

VerdictOrDeferred = Verdict | Deferred[Verdict]


def runChecks(checks: Sequence[Any], call: Callable[[Any], Any]) -> VerdictOrDeferred:
    """Ask each check in turn until one ends the stage.

    Answers synchronously while every check does, so the common case costs
    no Deferred. The first check that answers a Deferred makes the whole
    answer a Deferred; later checks run when it fires.
    """
    return _run(iter(checks), call)


def _run(it: Iterator[Any], call: Callable[[Any], Any]) -> VerdictOrDeferred:
    for check in it:
        verdict = call(check)
        if isinstance(verdict, Deferred):
            return verdict.addCallback(_afterDeferred, it, call)
        if verdict.ends:
            return verdict  # type: ignore[no-any-return]
    return CONTINUE


def _afterDeferred(verdict: Verdict, it: Iterator[Any], call: Callable[[Any], Any]) -> Any:
    if not isinstance(verdict, Verdict):
        raise TypeError(f"check answered {verdict!r}, not a Verdict")
    if verdict.ends:
        return verdict
    return _run(it, call)
