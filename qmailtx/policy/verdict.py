"""What a check answers: go on, accept, reply, or hang up."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from qmailtx.reply import SMTPReply


class VerdictKind(Enum):
    CONTINUE = "continue"  # no opinion: let the next check speak
    ACCEPT = "accept"  # accepted: skip the remaining checks of this stage
    REPLY = "reply"  # refused (4xx/5xx) with this reply
    DISCONNECT = "disconnect"  # refused, and the connection is closed after the reply


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reply: SMTPReply | None = None

    @property
    def ends(self) -> bool:
        return self.kind is not VerdictKind.CONTINUE


CONTINUE = Verdict(VerdictKind.CONTINUE)
ACCEPT = Verdict(VerdictKind.ACCEPT)


def reject(code: int, enhanced: str, text: str) -> Verdict:
    if code < 500:
        raise ValueError("reject() takes a 5xx code; use tempfail() for 4xx")
    return Verdict(VerdictKind.REPLY, SMTPReply(code, enhanced, text))


def tempfail(code: int, enhanced: str, text: str) -> Verdict:
    if not 400 <= code < 500:
        raise ValueError("tempfail() takes a 4xx code")
    return Verdict(VerdictKind.REPLY, SMTPReply(code, enhanced, text))


def disconnect(code: int, enhanced: str, text: str) -> Verdict:
    return Verdict(VerdictKind.DISCONNECT, SMTPReply(code, enhanced, text))
