"""qmail control settings: one table, two sources.

Every setting here has the name and meaning of a qmail control file
(qmail-control(5)). It can be written in the TOML config under ``[control]``
or as a file of that name in the ``[paths] control`` directory, so an
existing qmail box's control directory works unchanged. Giving one setting in
both places is an error: there is no silent precedence.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

# Control files a qmail toaster may hold that later parts of qmailtx read, or
# that belong to programs qmailtx replaces. Finding one is logged, not fatal.
NOT_YET_USED = frozenset(
    """morercpthosts.cdb percenthack
    localiphost
    defaultdomain defaulthost idhost plusdomain qmqpservers defaultdelivery
    servercert.pem clientcert.pem clientca.pem clientcrl.pem tlsclients tlsserverciphers
    tlsclientciphers tlshosts notlshosts dh512.pem dh1024.pem dh2048.pem rsa512.pem
    spfbehavior""".split()
)


class ControlError(ValueError):
    """A control setting that cannot be used; the message names it."""


@dataclass(frozen=True)
class Control:
    """Effective control settings, with qmail's defaults filled in."""

    me: str
    locals: tuple[str, ...]
    rcpthosts: tuple[str, ...]
    virtualdomains: tuple[str, ...]
    envnoathost: str
    smtpgreeting: str
    databytes: int
    timeoutsmtpd: int
    queuelifetime: int
    concurrencylocal: int
    concurrencyremote: int
    bouncefrom: str
    bouncehost: str
    doublebounceto: str
    doublebouncehost: str
    bouncesubject: str
    bouncemessage: str
    doublebouncesubject: str
    doublebouncemessage: str
    badmailfrom: tuple[str, ...] = ()
    badrcptto: tuple[str, ...] = ()
    morercpthosts: tuple[str, ...] = ()
    signatures: tuple[str, ...] = ()
    mfcheck: int = 0
    # remote delivery (qmail-remote)
    smtproutes: tuple[str, ...] = ()
    outgoingip: tuple[str, ...] = ()
    helohost: str = ""
    timeoutremote: int = 1200
    timeoutconnect: int = 60


# name -> kind. "line": first line of the file / a TOML string; "int": a
# number; "lines": one item per line, "#" comments / a TOML list of strings;
# "text": the whole file / a TOML string.
KINDS: dict[str, str] = {
    "me": "line",
    "locals": "lines",
    "rcpthosts": "lines",
    "virtualdomains": "lines",
    "envnoathost": "line",
    "smtpgreeting": "line",
    "databytes": "int",
    "timeoutsmtpd": "int",
    "queuelifetime": "int",
    "concurrencylocal": "int",
    "concurrencyremote": "int",
    "bouncefrom": "line",
    "bouncehost": "line",
    "doublebounceto": "line",
    "doublebouncehost": "line",
    "bouncesubject": "line",
    "bouncemessage": "text",
    "doublebouncesubject": "line",
    "doublebouncemessage": "text",
    "badmailfrom": "lines",
    "badrcptto": "lines",
    "morercpthosts": "lines",
    "signatures": "lines",
    "mfcheck": "int",
    "smtproutes": "lines",
    "outgoingip": "lines",
    "helohost": "line",
    "timeoutremote": "int",
    "timeoutconnect": "int",
}
assert set(KINDS) == {f.name for f in fields(Control)}

DEFAULT_DATABYTES = 10 * 1024 * 1024
DEFAULT_BOUNCE_MESSAGE = (
    "Hi. This is the qmail-send program at {host}.\n"
    "I'm afraid I wasn't able to deliver your message to the following addresses.\n"
    "This is a permanent error; I've given up. Sorry it didn't work out.\n"
)
DEFAULT_DOUBLEBOUNCE_MESSAGE = (
    "Hi. This is the qmail-send program at {host}.\n"
    "I tried to deliver a bounce message to this address, but the bounce bounced!\n"
)


def parseControlFile(name: str, raw: bytes) -> Any:
    """Turn a control file's bytes into the TOML-shaped value for ``name``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ControlError(f"control file {name}: not UTF-8 text") from e
    kind = KINDS[name]
    if kind == "text":
        return text
    lines = [line.rstrip(" \t\r") for line in text.split("\n")]
    if kind == "lines":
        return [line for line in lines if line and not line.startswith("#")]
    first = lines[0] if lines else ""
    if kind == "int":
        try:
            return int(first.strip())
        except ValueError as e:
            raise ControlError(f"control file {name}: {first!r} is not a number") from e
    return first


def readControlDirectory(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Read the settings in a qmail control directory.

    Returns the values of the files qmailtx knows, and the names of the other
    files found there (logged at start-up so nothing is ignored silently).
    """
    if not os.path.isdir(path):
        raise ControlError(f"control directory {path} does not exist")
    values: dict[str, Any] = {}
    others = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name not in KINDS:
            if not name.startswith("."):
                others.append(name)
            continue
        try:
            with open(full, "rb") as f:
                values[name] = parseControlFile(name, f.read())
        except OSError as e:
            raise ControlError(f"control file {full}: {e.strerror}") from e
    return values, tuple(others)


def _checkType(name: str, value: Any, where: str) -> Any:
    kind = KINDS[name]
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ControlError(f"{where}{name} must be an integer")
        if value < 0:
            raise ControlError(f"{where}{name} must not be negative")
    elif kind == "lines":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ControlError(f"{where}{name} must be a list of strings")
        return tuple(v.strip() for v in value if v.strip())
    elif not isinstance(value, str):
        raise ControlError(f"{where}{name} must be a string")
    return value


def _localHostName() -> str:
    # gethostname() only: getfqdn() may block on DNS, and these machines have none.
    return socket.gethostname().lower() or "localhost"


def buildControl(
    fromConfig: Mapping[str, Any],
    fromFiles: Mapping[str, Any],
    configName: str = "config",
) -> Control:
    """Merge the two sources (refusing overlaps) and fill in qmail's defaults."""
    for name in fromConfig:
        if name not in KINDS:
            raise ControlError(f"{configName}: unknown key [control] {name}")
    both = sorted(set(fromConfig) & set(fromFiles))
    if both:
        raise ControlError(
            f"{configName}: [control] {both[0]} is also set by control file {both[0]}; "
            "set it in one place only"
        )
    given: dict[str, Any] = {}
    for name, value in fromConfig.items():
        given[name] = _checkType(name, value, f"{configName}: [control] ")
    for name, value in fromFiles.items():
        given[name] = _checkType(name, value, "control file ")

    me = given.get("me") or _localHostName()

    def line(name: str, default: str) -> str:
        value = given.get(name)
        return value if value else default

    def number(name: str, default: int, minimum: int = 0) -> int:
        value = given.get(name)
        return default if value is None else max(int(value), minimum)

    localDomains = given.get("locals") or (me, "localhost")
    localDomains = tuple(dict.fromkeys(d.lower() for d in localDomains))
    virtualdomains = tuple(v.lower() for v in given.get("virtualdomains", ()))
    for entry in virtualdomains:
        if ":" not in entry:
            raise ControlError(f"virtualdomains entry {entry!r} has no ':'")
    bouncehost = line("bouncehost", me)
    return Control(
        me=me,
        locals=localDomains,
        rcpthosts=tuple(d.lower() for d in given.get("rcpthosts", ())),
        morercpthosts=tuple(d.lower() for d in given.get("morercpthosts", ())),
        virtualdomains=virtualdomains,
        envnoathost=line("envnoathost", me),
        smtpgreeting=line("smtpgreeting", me),
        databytes=number("databytes", DEFAULT_DATABYTES),
        timeoutsmtpd=number("timeoutsmtpd", 1200, minimum=1),
        queuelifetime=number("queuelifetime", 604800),
        concurrencylocal=number("concurrencylocal", 10),
        concurrencyremote=number("concurrencyremote", 20),
        bouncefrom=line("bouncefrom", "MAILER-DAEMON"),
        bouncehost=bouncehost,
        doublebounceto=line("doublebounceto", "postmaster"),
        doublebouncehost=line("doublebouncehost", me),
        bouncesubject=line("bouncesubject", "failure notice"),
        bouncemessage=line("bouncemessage", DEFAULT_BOUNCE_MESSAGE),
        doublebouncesubject=line("doublebouncesubject", "failure notice"),
        doublebouncemessage=line("doublebouncemessage", DEFAULT_DOUBLEBOUNCE_MESSAGE),
        badmailfrom=tuple(given.get("badmailfrom", ())),
        badrcptto=tuple(given.get("badrcptto", ())),
        signatures=tuple(given.get("signatures", ())),
        mfcheck=number("mfcheck", 0),
        smtproutes=tuple(given.get("smtproutes", ())),
        outgoingip=tuple(given.get("outgoingip", ())),
        helohost=line("helohost", me),
        timeoutremote=number("timeoutremote", 1200, minimum=1),
        timeoutconnect=number("timeoutconnect", 60, minimum=1),
    )
