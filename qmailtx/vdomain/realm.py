"""The one realm behind SMTP AUTH and POP3: avatar ids to mail accounts.

The checkers (``qmailtx.vdomain.checkers``) have found the user already, so
the avatar id is ``b"user@canonical-domain"`` and nothing here blocks: the
account's paths follow from vpopmail's layout (``qmailtx.vdomain.layout``).
Protocols add their own avatar interfaces here as they need them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.cred.portal import IRealm
from zope.interface import Attribute, Interface, implementer

from qmailtx.vdomain.interfaces import IUserStore
from qmailtx.vdomain.layout import maildirOf


class IMailAccount(Interface):
    """An authenticated user of a hosted domain."""

    address: str = Attribute("``user@domain``, lower case, the domain canonical.")
    maildir: str = Attribute("The user's Maildir: ``<data>/domains/<domain>/<user>/Maildir``.")


@implementer(IMailAccount)
@dataclass(frozen=True)
class MailAccount:
    address: str
    maildir: str


def _noLogout() -> None:
    pass


@implementer(IRealm)
class MailRealm:
    """Hands out ``IMailAccount`` avatars for the checkers' avatar ids."""

    def __init__(self, store: IUserStore, dataDir: str) -> None:
        self.store = store
        self.dataDir = dataDir

    def account(self, avatarId: bytes) -> MailAccount:
        name, _, domain = avatarId.decode("utf-8").rpartition("@")
        if not name or not domain:
            raise ValueError(f"not a user@domain avatar id: {avatarId!r}")
        return MailAccount(f"{name}@{domain}", maildirOf(self.dataDir, name, domain).path)

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Callable[[], None]]:
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("no avatars for anonymous logins")
        for interface in interfaces:
            if interface is IMailAccount:
                return IMailAccount, self.account(avatarId), _noLogout
        raise NotImplementedError(f"no avatar for any of {interfaces!r}")
