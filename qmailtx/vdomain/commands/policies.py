"""``qmailctl policies``: which policies each listener runs, stage by stage.

The same registry the server builds, from the same config, so what this
prints is what the server does (and an unknown policy name is reported here
as it would stop the server).
"""

from __future__ import annotations

import argparse
from typing import Any

from qmailtx.vdomain.commands.context import CommandError, Context, Result


def listPolicies(ctx: Context, args: argparse.Namespace) -> Result:
    from qmailtx.registry import PolicyContext, RegistryError, makeRegistry, policyChain

    config = ctx.config
    try:
        registry = makeRegistry(config, PolicyContext(config))
        chains = [
            (listener, policyChain(registry, listener.policies)) for listener in config.listeners
        ]
    except RegistryError as e:
        raise CommandError(str(e)) from e
    lines: list[str] = []
    data: list[dict[str, Any]] = []
    for listener, chain in chains:
        where = ", ".join(listener.listen) or "not listening"
        lines.append(f"{listener.name} ({where}): {chain.describe()}")
        data.append(
            {
                "listener": listener.name,
                "listen": list(listener.listen),
                "requireAuth": listener.requireAuth,
                "implicitTLS": listener.implicitTLS,
                "policies": list(listener.policies),
                "stages": {
                    "MAIL": [name for name, _ in chain.sender],
                    "RCPT": [name for name, _ in chain.recipient],
                    "DATA": [name for name, _ in chain.data],
                },
            }
        )
    return Result(lines, data)
