"""SMTP replies: a value type and the exception that carries one."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SMTPReply:
    """One SMTP reply: basic code, RFC 3463 enhanced code (or "") and text.

    The text may hold several lines separated by "\\n"; each becomes one line
    of a multi-line reply, every line carrying the codes.
    """

    code: int
    enhanced: str
    text: str

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"bad SMTP reply code {self.code}")
        if any(c in self.text for c in "\r\0"):
            raise ValueError("reply text must not hold CR or NUL")

    def toBytes(self) -> bytes:
        lines = self.text.split("\n") or [""]
        prefix = f"{self.code}"
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            body = f"{self.enhanced} {line}" if self.enhanced else line
            out.append(f"{prefix}{sep}{body}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8", "replace")

    def __str__(self) -> str:
        return self.toBytes().decode("utf-8").rstrip("\r\n").replace("\r\n", " / ")


class SMTPRejection(Exception):
    """Raised by checks and parsers to answer a command with a reply."""

    def __init__(self, reply: SMTPReply) -> None:
        super().__init__(str(reply))
        self.reply = reply
