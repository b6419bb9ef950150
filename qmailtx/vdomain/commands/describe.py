"""How qmailctl shows domains, users and quotas: text for people, JSON values."""

from __future__ import annotations

from typing import Any

from qmailtx.vdomain.records import CatchAll, Domain, QuotaLimit, User, UserFlags


def _describeBytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n} bytes"


def describeQuota(quota: QuotaLimit | None) -> str:
    if quota is None or quota.unlimited:
        return "no quota"
    parts = []
    if quota.bytes is not None:
        parts.append(_describeBytes(quota.bytes))
    if quota.count is not None:
        parts.append(f"{quota.count} messages")
    return ", ".join(parts)


def quotaJson(quota: QuotaLimit | None) -> dict[str, Any] | None:
    if quota is None or quota.unlimited:
        return None
    return {"bytes": quota.bytes, "count": quota.count, "maildirsize": str(quota)}


def flagNames(flags: int) -> list[str]:
    return [f.name.lower() for f in UserFlags if f.name and flags & f]


def catchAllJson(catchall: CatchAll) -> dict[str, str]:
    return {"action": catchall.action.value, "target": catchall.target}


def domainJson(domain: Domain) -> dict[str, Any]:
    return {
        "name": domain.name,
        "aliases": list(domain.aliases),
        "catchall": catchAllJson(domain.catchall),
        "clearPasswords": domain.clearPasswords,
    }


def userJson(user: User) -> dict[str, Any]:
    return {
        "address": user.address,
        "name": user.name,
        "domain": user.domain,
        "gecos": user.gecos,
        "quota": quotaJson(user.quota),
        "flags": flagNames(user.flags),
        "hasPassword": bool(user.passwordHash),
        "hasClearSecret": user.clearSecret is not None,
    }
