"""The instance's own component registry (never the global site manager).

Each policy (a classic qmail patch, or a third party's) is one name. Its
``register(registry, context)`` puts its components here under that name:
``ISenderCheck`` and ``IRecipientCheck`` utilities shared by all sessions,
``IDataCheck`` adapters from ``ISMTPSession`` made fresh for every message.
Each listener's ``policies`` list picks names and their order; a stage runs
the components of those names that act at that stage, in that order.

Built-in names are listed in ``BUILTIN``; any other name is looked up among
the ``IPolicyPlugin`` plugins (``twisted.plugin``). An unknown name stops
start-up with a message naming it. A second registration for one
(interface, name) is refused, so two policies cannot shadow each other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.plugin import getPlugins
from zope.interface.interface import InterfaceClass
from zope.interface.registry import Components

from qmailtx.config import Config
from qmailtx.policy.interfaces import (
    IDataCheck,
    IPolicyPlugin,
    IRecipientCheck,
    ISenderCheck,
    ISMTPSession,
)
from qmailtx.queue.store import Runner

# name -> module with register(registry, context)
BUILTIN: dict[str, str] = {
    "relay": "qmailtx.policy.relay",
    "badmailfrom": "qmailtx.policy.badmailfrom",
    "badrcptto": "qmailtx.policy.badrcptto",
    "nullsender": "qmailtx.policy.nullsender",
    "rcptcheck": "qmailtx.policy.rcptcheck",
    "mfcheck": "qmailtx.policy.mfcheck",
    "exeblock": "qmailtx.policy.exeblock",
}


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

    def registerAdapter(  # type: ignore[override]
        self,
        factory: Callable[..., Any],
        required: Sequence[InterfaceClass],
        provided: InterfaceClass,
        name: str = "",
        **kw: Any,
    ) -> None:
        if self.adapters.lookup(tuple(required), provided, name) is not None:  # type: ignore[attr-defined]
            raise RegistryError(f"{provided.__name__} adapter {name!r} is registered already")
        super().registerAdapter(factory, required, provided, name, **kw)


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may use when it registers (collaborators, not globals)."""

    config: Config
    reactor: Any = None  # IReactorTime (and IReactorProcess, IReactorTCP...)
    runner: Runner | None = None  # the worker pool, for blocking lookups
    users: Any = None  # IUserStore, or None
    hosted: Any = None  # HostedDomains, or None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyChain:
    """One listener's checks per stage, in configured order, with their names."""

    names: tuple[str, ...]
    sender: tuple[tuple[str, ISenderCheck], ...]
    recipient: tuple[tuple[str, IRecipientCheck], ...]
    data: tuple[tuple[str, Callable[[ISMTPSession], IDataCheck]], ...]

    @property
    def senderChecks(self) -> tuple[ISenderCheck, ...]:
        return tuple(check for _, check in self.sender)

    @property
    def recipientChecks(self) -> tuple[IRecipientCheck, ...]:
        return tuple(check for _, check in self.recipient)

    def describe(self) -> str:
        """``MAIL: a, b; RCPT: c; DATA: d`` for logs and qmailctl."""
        return "; ".join(
            f"{stage}: {', '.join(name for name, _ in checks) or '-'}"
            for stage, checks in (
                ("MAIL", self.sender),
                ("RCPT", self.recipient),
                ("DATA", self.data),
            )
        )


def _plugins() -> dict[str, Any]:
    import twisted.plugins

    found: dict[str, Any] = {}
    for plugin in getPlugins(IPolicyPlugin, twisted.plugins):
        found.setdefault(plugin.name, plugin)
    return found


def makeRegistry(
    config: Config, context: PolicyContext | None = None, names: Iterable[str] | None = None
) -> Registry:
    """A registry with every policy that ``names`` (default: all listeners'
    policy lists) mention, built-in or plugin."""
    context = context or PolicyContext(config)
    registry = Registry("qmailtx")
    if names is None:
        names = [n for listener in config.listeners for n in listener.policies]
    plugins: dict[str, Any] | None = None
    for name in dict.fromkeys(names):
        if name in BUILTIN:
            module = importlib.import_module(BUILTIN[name])
            module.register(registry, context)
            continue
        if plugins is None:
            plugins = _plugins()
        plugin = plugins.get(name)
        if plugin is None:
            known = ", ".join(sorted({*BUILTIN, *plugins}))
            raise RegistryError(f"unknown policy {name!r} (known: {known})")
        plugin.register(registry, context)
    return registry


def policyChain(registry: Components, names: Sequence[str]) -> PolicyChain:
    """The checks of ``names`` per stage; a name that registered nothing is an error."""
    sender: list[tuple[str, Any]] = []
    recipient: list[tuple[str, Any]] = []
    data: list[tuple[str, Callable[[ISMTPSession], IDataCheck]]] = []
    for name in names:
        found = False
        for interface, stage in ((ISenderCheck, sender), (IRecipientCheck, recipient)):
            component = registry.queryUtility(interface, name=name)
            if component is not None:
                stage.append((name, component))
                found = True
        factory = registry.adapters.lookup((ISMTPSession,), IDataCheck, name)  # type: ignore[attr-defined]
        if factory is not None:
            data.append((name, factory))
            found = True
        if not found:
            raise RegistryError(f"no policy named {name!r} is registered")
    return PolicyChain(tuple(names), tuple(sender), tuple(recipient), tuple(data))


def resolve(registry: Components, interface: InterfaceClass, names: Sequence[str]) -> list[Any]:
    """The named utilities, in order; an unknown name is an error naming it."""
    found: list[Any] = []
    for name in names:
        component = registry.queryUtility(interface, name=name)  # type: ignore[arg-type]
        if component is None:
            raise RegistryError(f"no {interface.__name__} policy named {name!r}")
        found.append(component)
    return found
