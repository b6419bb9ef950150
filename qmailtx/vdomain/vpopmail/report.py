"""The result of an import: one ``Outcome`` per thing of the tree, with the
text for people (``ImportReport.lines``) and the JSON value (``asDict``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qmailtx.vdomain.records import User, UserFlags
from qmailtx.vdomain.vpopmail.files import MailCopy
from qmailtx.vdomain.vpopmail.plan import Rewrite

CREATE = "create"
SKIP = "skip"
FAIL = "fail"

_DONE = {CREATE: "created", SKIP: "skipped", FAIL: "failed"}
_DRY = {CREATE: "would create", SKIP: "would skip", FAIL: "would fail"}


@dataclass(frozen=True)
class Outcome:
    """What happened (or would happen) to one thing of the tree."""

    kind: str  # "domain", "alias domain", "user", "alias", "file"
    name: str
    action: str  # CREATE, SKIP or FAIL
    detail: str = ""


@dataclass
class ImportReport:
    """The result of ``runImport``: ``lines()`` for people, ``asDict()`` for JSON.

    ``ok`` is False when something could not be imported (``errors``);
    skipped things (already in the database) and warnings leave it True.
    """

    root: str
    data: str
    dryRun: bool
    copyMail: bool
    outcomes: list[Outcome] = field(default_factory=list)
    mail: list[MailCopy] = field(default_factory=list)
    rewrites: list[Rewrite] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def counts(self) -> dict[str, dict[str, int]]:
        """{action: {kind: number}}."""
        counts: dict[str, dict[str, int]] = {CREATE: {}, SKIP: {}, FAIL: {}}
        for o in self.outcomes:
            counts[o.action][o.kind] = counts[o.action].get(o.kind, 0) + 1
        return counts

    def lines(self) -> list[str]:
        words = _DRY if self.dryRun else _DONE
        head = f"import-vpopmail {self.root} into {self.data}"
        if self.dryRun:
            head += " (dry run: nothing written)"
        elif not self.copyMail:
            head += " (without mail: empty Maildirs)"
        out = [head]
        for o in self.outcomes:
            indent = "" if o.kind in ("domain", "alias domain") else "  "
            detail = f" ({o.detail})" if o.detail else ""
            out.append(f"{indent}{o.kind} {o.name}: {words[o.action]}{detail}")
        for r in self.rewrites:
            out.append(f"rewrite {r.path}:{r.line}: {r.old} -> {r.new}")
        out.extend(f"warning: {w}" for w in self.warnings)
        out.extend(f"error: {e}" for e in self.errors)
        counts = self.counts()
        summary = []
        for action in (CREATE, SKIP, FAIL):
            if counts[action]:
                things = ", ".join(f"{n} {plural(kind, n)}" for kind, n in counts[action].items())
                summary.append(f"{words[action]} {things}")
        summary.append(f"{len(self.warnings)} {plural('warning', len(self.warnings))}")
        summary.append(f"{len(self.errors)} {plural('error', len(self.errors))}")
        out.append("; ".join(summary))
        return out

    def asDict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "dryRun": self.dryRun,
            "copyMail": self.copyMail,
            "root": self.root,
            "data": self.data,
            "items": [
                {"kind": o.kind, "name": o.name, "action": o.action, "detail": o.detail}
                for o in self.outcomes
            ],
            "mail": [m.asDict() for m in self.mail],
            "rewrites": [
                {"file": r.path, "line": r.line, "old": r.old, "new": r.new} for r in self.rewrites
            ],
            "counts": self.counts(),
            "warnings": list(self.warnings),
            "errors": list(self.errors),
        }


def plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + "es" if word.endswith("s") else word + "s"


def mailText(copy: MailCopy, done: bool) -> str:
    if not copy.messages and not (copy.copied or copy.present):
        return "mail: no messages"
    text = f"mail: {copy.messages} {plural('message', copy.messages)}, {copy.bytes} bytes"
    if done:
        how = [f"{copy.linked} linked", f"{copy.copied} {plural('file', copy.copied)} copied"]
        if copy.present:
            how.append(f"{copy.present} there already")
        text += f" ({', '.join(how)})"
    return text


def _flagNames(flags: UserFlags) -> str:
    names = [f.name for f in UserFlags if f in flags and f.name]
    unknown = int(flags) & ~sum(int(f) for f in UserFlags)
    if unknown:
        names.append(hex(unknown))
    return "|".join(names)


def userDetail(user: User) -> str:
    parts = [f"quota {user.quota}" if user.quota and not user.quota.unlimited else "no quota"]
    if user.flags:
        parts.append(f"flags {_flagNames(user.flags)}")
    if user.clearSecret is not None:
        parts.append("clear password")
    return ", ".join(parts)
