"""The instance's own component registry (never the global site manager).

Built-in policies are registered here as named utilities; the SMTP stages
ask for them by name in their configured order. A later registration for
the same (interface, name) is refused, so two policies cannot silently
shadow each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zope.interface.interface import InterfaceClass
from zope.interface.registry import Components

from qmailtx.config import Config
from qmailtx.domains import DomainTable
from qmailtx.policy.interfaces import IRecipientCheck
from qmailtx.policy.relay import RelayControl
from qmailtx.vdomain.hosted import HostedDomains


class RegistryError(ValueError):
    pass


class Registry(Components):
    def registerUtility(  # type: ignore[override]
        self, component: Any, provided: InterfaceClass, name: str = "", **kw: Any
    ) -> None:
        existing = self.queryUtility(provided, name=name)  # type: ignore[arg-type]
        if existing is not None:
            raise RegistryError(f"{provided.__name__} {name!r} is registered already")
        super().registerUtility(component, provided, name, **kw)


def makeRegistry(config: Config, hosted: HostedDomains | None = None) -> Registry:
    """The built-in policies; ``hosted`` adds the user database's domains."""
    registry = Registry("qmailtx")
    domains = DomainTable.fromControl(config.control)
    registry.registerUtility(RelayControl(domains, hosted), IRecipientCheck, name="relay")
    return registry


def resolve(registry: Components, interface: InterfaceClass, names: Sequence[str]) -> list[Any]:
    """The named utilities, in order; an unknown name is an error naming it."""
    found: list[Any] = []
    for name in names:
        component = registry.queryUtility(interface, name=name)  # type: ignore[arg-type]
        if component is None:
            raise RegistryError(f"no {interface.__name__} policy named {name!r}")
        found.append(component)
    return found
