"""Which domains are ours: rcpthosts (accept) and locals/virtualdomains (deliver here).

qmail's rules, fail-closed: without an rcpthosts list, the accepted domains
are exactly the local and virtual ones (base qmail would be an open relay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from qmailtx.control import Control


@dataclass(frozen=True)
class DomainTable:
    rcpthosts: frozenset[str]  # exact names and ".suffix" entries
    locals: frozenset[str]
    virtual: Mapping[str, str]  # domain or ".suffix" or "" -> prepend ("" = exception)

    @classmethod
    def fromControl(cls, control: Control) -> DomainTable:
        virtual: dict[str, str] = {}
        for entry in control.virtualdomains:
            domain, _, prepend = entry.partition(":")
            virtual.setdefault(domain.strip(), prepend.strip())
        rcpthosts = set(control.rcpthosts) | set(control.morercpthosts)
        if not rcpthosts:
            rcpthosts.update(control.locals)
            rcpthosts.update(d for d, p in virtual.items() if d and p)
        return cls(frozenset(rcpthosts), frozenset(control.locals), virtual)

    def acceptsMailFor(self, domain: str) -> bool:
        """qmail-smtpd's rcpthosts test: exact, or a ".suffix" entry for subdomains."""
        domain = domain.lower()
        if domain in self.rcpthosts:
            return True
        i = domain.find(".")
        while i >= 0:
            if domain[i:] in self.rcpthosts:
                return True
            i = domain.find(".", i + 1)
        return False

    def virtualPrepend(self, domain: str) -> str | None:
        """qmail-send's virtualdomains lookup: exact, then ".suffix", then ":" wildcard."""
        exact = self.virtual
        if domain in exact:
            return exact[domain] or None
        i = domain.find(".")
        while i >= 0:
            if domain[i:] in exact:
                return exact[domain[i:]] or None
            i = domain.find(".", i + 1)
        if "" in exact:
            return exact[""] or None
        return None

    def isLocal(self, domain: str) -> bool:
        domain = domain.lower()
        return domain in self.locals or self.virtualPrepend(domain) is not None
