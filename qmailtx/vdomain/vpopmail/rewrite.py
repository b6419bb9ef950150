"""Delivery lines naming folders of the old tree, rewritten for the new data folder.

``scanTree`` maps each user folder the tree had or has (``moves``) to its new
place; a ``Rewriter`` applies that to the dot-qmail files it reads, records
each change as a ``Rewrite`` and warns about lines it leaves pointing at the
old tree.
"""

from __future__ import annotations

from qmailtx.vdomain.vpopmail.parse import dotQmailLines, rewriteTarget
from qmailtx.vdomain.vpopmail.plan import ImportPlan, Rewrite


def lastIndex(parts: list[str], name: str) -> int | None:
    """Index of the last ``name`` in ``parts``, the final part excluded."""
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == name:
            return i
    return None


def oldHomes(prefixes: set[str]) -> list[str]:
    """Old domain folder paths and the vpopmail homes holding them (longest first)."""
    homes = set(prefixes)
    for prefix in prefixes:
        parts = prefix.split("/")
        i = lastIndex(parts, "domains")
        if i is not None and i > 0:
            homes.add("/".join(parts[:i]))
    return sorted(homes, key=len, reverse=True)


class Rewriter:
    """Rewrites delivery lines of the old tree and reports what it did."""

    def __init__(self, moves: dict[str, str], oldHomes: list[str], plan: ImportPlan) -> None:
        self.moves = moves
        self.oldHomes = oldHomes
        self.plan = plan

    def line(self, path: str, number: int, line: str, what: str) -> str:
        new = rewriteTarget(line, self.moves)
        if new != line:
            self.plan.rewrites.append(Rewrite(path, number, line, new))
        elif line.startswith(("|", "/")):
            old = next((h for h in self.oldHomes if h in line), None)
            if old is not None:
                self.plan.warnings.append(
                    f"{path}:{number}: {what} refers to the old vpopmail tree ({old})"
                    " and is left as it is: keep that path"
                )
        return new

    def targets(self, path: str, text: str, what: str) -> tuple[str, ...]:
        return tuple(self.line(path, n, line, what) for n, line in dotQmailLines(text))

    def text(self, path: str, text: str, what: str) -> str:
        """The whole file, delivery lines rewritten, everything else as it was."""
        out = text.split("\n")
        for number, line in dotQmailLines(text):
            new = self.line(path, number, line, what)
            if new != line:
                out[number - 1] = new
        return "\n".join(out)
