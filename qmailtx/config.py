"""The TOML configuration, read into frozen dataclasses.

``parseConfig(text, baseDirectory)`` is pure apart from reading the qmail
control directory the text may name; ``loadConfig(path)`` reads a file;
``defaultConfig()`` is the embedded default (the same settings as the
annotated ``etc/qmailtx.toml``). Unknown keys, wrong types and missing files
raise ``ConfigError`` with one message naming the key or file.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from qmailtx.control import Control, ControlError, buildControl, readControlDirectory
from qmailtx.delivery.identity import (
    DEFAULT_PROGRAM_USER,
    ProgramUser,
    ProgramUserError,
    resolveProgramUser,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration cannot be used; the message says which key or file."""


@dataclass(frozen=True)
class PathsConfig:
    data: str  # absolute
    control: str | None  # absolute, or None


@dataclass(frozen=True)
class SMTPConfig:
    listen: tuple[str, ...] = ("tcp:2525:interface=127.0.0.1",)
    relay_clients: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    max_recipients: int = 1000
    max_bad_commands: int = 20
    max_command_line: int = 512
    max_hops: int = 100
    # Policies run in this order at each SMTP stage (see qmailtx.registry).
    policies: tuple[str, ...] = (
        "badmailfrom",
        "nullsender",
        "badrcptto",
        "relay",
        "rcptcheck",
        "exeblock",
    )
    # AUTH PLAIN/LOGIN offered over unencrypted, non-loopback connections.
    auth_before_tls: bool = False
    # Offer CRAM-MD5 (it works only in domains with clear passwords, so it is
    # off unless asked for; clients that pick it and fail may not fall back).
    cram_md5: bool = False
    # Unknown recipients (rcptcheck) one connection may try before every
    # further RCPT is refused (chkuser's limit; 0: no limit).
    max_bad_recipients: int = 10
    # Open connections to one listener group (smtp, submission, smtps each
    # count their own); more get "421 4.3.2" (0: no cap).
    max_connections: int = 500
    # Open connections from one client address (IPv6: one /64) to one listener
    # group; more get "421 4.7.0". Relay clients and loopback are exempt (0: no cap).
    max_connections_per_ip: int = 20
    # Seconds one message's DATA may take in all, however slowly it trickles
    # in; then "451 4.4.2 timeout", nothing queued (0: no limit).
    data_timeout: int = 1800


@dataclass(frozen=True)
class DNSConfig:
    # Name servers as "host" or "host:port" ("": the ones in /etc/resolv.conf).
    servers: tuple[str, ...] = ()
    # Seconds one lookup may take before it is a temporary failure.
    timeout: int = 5


SUBMISSION_POLICIES = ("badrcptto", "relay", "exeblock")


@dataclass(frozen=True)
class ListenerConfig:
    """One listener kind: port 25 ("smtp"), 587 ("submission") or 465 ("smtps")."""

    name: str
    listen: tuple[str, ...]
    policies: tuple[str, ...]
    requireAuth: bool = False  # AUTH before MAIL (submission, smtps)
    implicitTLS: bool = False  # TLS from the first byte (smtps)


@dataclass(frozen=True)
class POP3Config:
    listen: tuple[str, ...] = ()
    # POP3S (RFC 8314, port 995): TLS from the first byte; from [pop3s] listen.
    tls_listen: tuple[str, ...] = ()
    # USER/PASS and AUTH PLAIN/LOGIN over unencrypted, non-loopback connections.
    auth_before_tls: bool = False
    # Offer APOP and SASL CRAM-MD5 (they work only in domains with clear passwords).
    apop: bool = False
    # Seconds of silence before autologout (RFC 1939: at least 10 minutes).
    timeout: int = 600
    max_bad_commands: int = 20
    # Open POP3 and POP3S connections, and those from one client address
    # (IPv6: one /64; loopback exempt); more get "-ERR [SYS/TEMP]" (0: no cap).
    max_connections: int = 500
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class TLSConfig:
    certificate: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class QueueConfig:
    threads: int = 16
    # Bytes of the original body a bounce carries after its header (0: header only).
    bounce_body_bytes: int = 0
    # QMAILQUEUE: the argv of a qmail-queue-compatible filter every message
    # passes through (empty: none; see qmailtx.queue.filter).
    qmailqueue: tuple[str, ...] = ()


@dataclass(frozen=True)
class UsersConfig:
    # The SQLite user database (absolute; default <data>/users.sqlite3).
    database: str = ""


@dataclass(frozen=True)
class DeliveryConfig:
    # "bounce" (vpopmail: the sender learns at once) or "defer" (retry until queuelifetime).
    over_quota: str = "bounce"
    # Put a warning into a mailbox when its usage crosses this percentage (0: never).
    quota_warning_percent: int = 90
    # Characters that start an extension: user-ext@domain -> .qmail-ext of user.
    recipient_delimiter: str = "-"
    # Seconds a |program delivery may run before it is killed (a temporary failure).
    program_timeout: int = 3600
    # qmail-verh (P4): rewrite ##L/##H for VERP-expanded senders.
    verh: bool = False
    # Who |program lines run as when the server runs as root: a user name or
    # "uid:gid" (never root). A server not running as root runs them as itself.
    program_user: str = DEFAULT_PROGRAM_USER
    # program_user looked up (parseConfig does it; None only in hand-built configs).
    programIdentity: ProgramUser | None = None


TLS_CHOICES = ("none", "opportunistic", "verify")


@dataclass(frozen=True)
class RemoteConfig:
    # Outbound STARTTLS: "opportunistic" (any certificate; plaintext only when
    # the server offers no STARTTLS), "verify" (certificate checked against
    # the MX or relay name, else defer) or "none".
    tls: str = "opportunistic"
    # Per destination domain ("example.com" covers its subdomains too).
    tls_policy: Mapping[str, str] = field(default_factory=dict)
    # Simultaneous deliveries to one domain (concurrencyremote bounds them all).
    concurrency_per_domain: int = 20
    # More addresses of this host (P11): an MX pointing at one is refused.
    ipme: tuple[str, ...] = ()
    # The port of MX destinations (25; tests use others). smtproutes name their own.
    port: int = 25


@dataclass(frozen=True)
class Config:
    paths: PathsConfig
    control: Control
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    tls: TLSConfig = field(default_factory=TLSConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    submission: ListenerConfig = field(
        default_factory=lambda: ListenerConfig("submission", (), SUBMISSION_POLICIES, True)
    )
    smtps: ListenerConfig = field(
        default_factory=lambda: ListenerConfig("smtps", (), SUBMISSION_POLICIES, True, True)
    )
    dns: DNSConfig = field(default_factory=DNSConfig)
    remote: RemoteConfig = field(default_factory=RemoteConfig)
    # The zone for dates in Received: lines and generated mail ("": the system's, or $TZ).
    timezone: str = ""
    source: str = "<built-in defaults>"
    # Files in the control directory that this version does not read.
    unusedControlFiles: tuple[str, ...] = ()

    @property
    def listeners(self) -> tuple[ListenerConfig, ...]:
        return (
            ListenerConfig("smtp", self.smtp.listen, self.smtp.policies),
            self.submission,
            self.smtps,
        )


class _Table:
    """Typed access to one TOML table that remembers which keys were read."""

    def __init__(self, name: str, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: [{name}] must be a table")
        self.name = name
        self.data: dict[str, Any] = data
        self.where = where
        self.used: set[str] = set()

    def _fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.where}: [{self.name}] {key} {what}")

    def get(self, key: str, check: Callable[[Any], T], what: str, default: T) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        try:
            return check(value)
        except (TypeError, ValueError) as e:
            detail = f" ({e})" if str(e) else ""
            raise self._fail(key, f"must be {what}{detail}") from e

    def string(self, key: str, default: str | None) -> str | None:
        return self.get(key, _str, "a string", default)

    def integer(self, key: str, default: int, minimum: int = 0) -> int:
        def check(v: Any) -> int:
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise TypeError()
            return v

        return self.get(key, check, f"an integer >= {minimum}", default)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        return self.get(key, _strings, "a list of strings", default)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key [{self.name}] {unknown[0]}")


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError()
    return v


def _strings(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError()
    return tuple(v)


def _networks(v: Any) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in _strings(v))


def _servers(v: Any) -> tuple[str, ...]:
    servers = _strings(v)
    for server in servers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        if not host or (port and not port.isdigit()):
            raise ValueError(server)
    return servers


def dnsServers(config: DNSConfig) -> list[tuple[str, int]]:
    """The configured name servers as (host, port) pairs."""
    found = []
    for server in config.servers:
        if server.count(":") == 1:
            host, port = server.split(":")
            found.append((host, int(port)))
        else:
            found.append((server.strip("[]"), 53))
    return found


def _tlsPolicy(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise TypeError()
    policy = {}
    for domain, choice in v.items():
        if choice not in TLS_CHOICES or not domain or any(c.isspace() for c in domain):
            raise ValueError(f"{domain} = {choice!r}")
        policy[domain.lower().rstrip(".")] = choice
    return policy


def _addresses(v: Any) -> tuple[str, ...]:
    return tuple(str(ipaddress.ip_address(a.strip("[]"))) for a in _strings(v))


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError(v)
    return v


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in allowed:
            raise TypeError(v)
        return str(v)

    return check


def _delimiters(v: Any) -> str:
    if not isinstance(v, str) or any(c.isalnum() or c in '@."' or c.isspace() for c in v):
        raise TypeError(v)
    return v


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _program(argv: tuple[str, ...], base: str, source: str) -> tuple[str, ...]:
    """An argv whose program is an executable file (relative: to ``base``; no $PATH search)."""
    if not argv:
        return argv
    program = _resolve(base, argv[0])
    if not (os.path.isfile(program) and os.access(program, os.X_OK)):
        raise ConfigError(f"{source}: [queue] qmailqueue: {program} is not an executable file")
    return (program, *argv[1:])


def parseConfig(text: str, baseDirectory: str, source: str = "config") -> Config:
    """Parse TOML text; relative paths are taken from ``baseDirectory``."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    known = {
        "paths",
        "smtp",
        "submission",
        "smtps",
        "pop3",
        "pop3s",
        "tls",
        "queue",
        "users",
        "delivery",
        "server",
        "dns",
        "remote",
        "control",
    }
    for key in document:
        if key not in known:
            raise ConfigError(f"{source}: unknown key [{key}]")

    def table(name: str) -> _Table:
        return _Table(name, document.get(name, {}), source)

    paths = table("paths")
    data = _resolve(baseDirectory, paths.string("data", "var") or "var")
    controlDir = paths.string("control", None)
    controlPath = _resolve(baseDirectory, controlDir) if controlDir else None
    paths.finish()

    smtp = table("smtp")
    smtpDefaults = SMTPConfig()
    smtpConfig = SMTPConfig(
        listen=smtp.strings("listen", smtpDefaults.listen),
        relay_clients=smtp.get(
            "relay_clients", _networks, "a list of networks", smtpDefaults.relay_clients
        ),
        max_recipients=smtp.integer("max_recipients", smtpDefaults.max_recipients, 100),
        max_bad_commands=smtp.integer("max_bad_commands", smtpDefaults.max_bad_commands, 1),
        max_command_line=smtp.integer("max_command_line", smtpDefaults.max_command_line, 512),
        max_hops=smtp.integer("max_hops", smtpDefaults.max_hops, 1),
        policies=smtp.strings("policies", smtpDefaults.policies),
        auth_before_tls=smtp.get(
            "auth_before_tls", _bool, "true or false", smtpDefaults.auth_before_tls
        ),
        max_bad_recipients=smtp.integer("max_bad_recipients", smtpDefaults.max_bad_recipients),
        cram_md5=smtp.get("cram_md5", _bool, "true or false", smtpDefaults.cram_md5),
        max_connections=smtp.integer("max_connections", smtpDefaults.max_connections),
        max_connections_per_ip=smtp.integer(
            "max_connections_per_ip", smtpDefaults.max_connections_per_ip
        ),
        data_timeout=smtp.integer("data_timeout", smtpDefaults.data_timeout),
    )
    smtp.finish()

    dns = table("dns")
    dnsConfig = DNSConfig(
        servers=dns.get("servers", _servers, 'a list of "host" or "host:port"', ()),
        timeout=dns.integer("timeout", DNSConfig.timeout, 1),
    )
    dns.finish()

    remote = table("remote")
    rDefaults = RemoteConfig()
    tlsWhat = '"none", "opportunistic" or "verify"'
    remoteConfig = RemoteConfig(
        tls=remote.get("tls", _choice(*TLS_CHOICES), tlsWhat, rDefaults.tls),
        tls_policy=remote.get(
            "tls_policy", _tlsPolicy, f"a table of domain = {tlsWhat}", rDefaults.tls_policy
        ),
        concurrency_per_domain=remote.integer(
            "concurrency_per_domain", rDefaults.concurrency_per_domain, 1
        ),
        ipme=remote.get("ipme", _addresses, "a list of IP addresses", ()),
        port=remote.integer("port", rDefaults.port, 1),
    )
    remote.finish()
    if remoteConfig.port > 65535:
        raise ConfigError(f"{source}: [remote] port must be 1..65535")

    def listener(name: str, implicitTLS: bool) -> ListenerConfig:
        t = table(name)
        made = ListenerConfig(
            name,
            t.strings("listen", ()),
            t.strings("policies", SUBMISSION_POLICIES),
            True,
            implicitTLS,
        )
        t.finish()
        return made

    submissionConfig = listener("submission", False)
    smtpsConfig = listener("smtps", True)

    server = table("server")
    timezone = server.string("timezone", "") or ""
    server.finish()
    if timezone:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(f"{source}: [server] timezone: unknown zone {timezone!r}") from e

    pop3 = table("pop3")
    pop3s = table("pop3s")
    pop3Defaults = POP3Config()
    pop3Config = POP3Config(
        listen=pop3.strings("listen", ()),
        tls_listen=pop3s.strings("listen", ()),
        auth_before_tls=pop3.get(
            "auth_before_tls", _bool, "true or false", pop3Defaults.auth_before_tls
        ),
        apop=pop3.get("apop", _bool, "true or false", pop3Defaults.apop),
        timeout=pop3.integer("timeout", pop3Defaults.timeout, 600),
        max_bad_commands=pop3.integer("max_bad_commands", pop3Defaults.max_bad_commands, 1),
        max_connections=pop3.integer("max_connections", pop3Defaults.max_connections),
        max_connections_per_ip=pop3.integer(
            "max_connections_per_ip", pop3Defaults.max_connections_per_ip
        ),
    )
    pop3.finish()
    pop3s.finish()

    tls = table("tls")
    cert = tls.string("certificate", None)
    keyFile = tls.string("key", None)
    tls.finish()
    tlsConfig = TLSConfig(
        certificate=_resolve(baseDirectory, cert) if cert else None,
        key=_resolve(baseDirectory, keyFile) if keyFile else None,
    )
    for name, path in (("certificate", tlsConfig.certificate), ("key", tlsConfig.key)):
        if path is not None and not os.path.isfile(path):
            raise ConfigError(f"{source}: [tls] {name}: file {path} does not exist")

    queue = table("queue")
    queueConfig = QueueConfig(
        threads=queue.integer("threads", QueueConfig.threads, 1),
        bounce_body_bytes=queue.integer("bounce_body_bytes", QueueConfig.bounce_body_bytes),
        qmailqueue=_program(queue.strings("qmailqueue", ()), baseDirectory, source),
    )
    queue.finish()

    users = table("users")
    database = users.string("database", None)
    usersConfig = UsersConfig(
        database=_resolve(data, database) if database else os.path.join(data, "users.sqlite3")
    )
    users.finish()

    delivery = table("delivery")
    dDefaults = DeliveryConfig()
    deliveryConfig = DeliveryConfig(
        over_quota=delivery.get(
            "over_quota", _choice("bounce", "defer"), '"bounce" or "defer"', dDefaults.over_quota
        ),
        quota_warning_percent=delivery.integer(
            "quota_warning_percent", dDefaults.quota_warning_percent
        ),
        recipient_delimiter=delivery.get(
            "recipient_delimiter",
            _delimiters,
            "a string of punctuation characters",
            dDefaults.recipient_delimiter,
        ),
        program_timeout=delivery.integer("program_timeout", dDefaults.program_timeout, 1),
        verh=delivery.get("verh", _bool, "true or false", dDefaults.verh),
        program_user=delivery.string("program_user", dDefaults.program_user) or "",
    )
    delivery.finish()
    try:
        identity = resolveProgramUser(deliveryConfig.program_user)
    except ProgramUserError as e:
        raise ConfigError(f"{source}: [delivery] program_user: {e}") from e
    deliveryConfig = replace(deliveryConfig, programIdentity=identity)
    if deliveryConfig.quota_warning_percent > 100:
        raise ConfigError(f"{source}: [delivery] quota_warning_percent must be 0..100")

    controlTable = document.get("control", {})
    if not isinstance(controlTable, Mapping):
        raise ConfigError(f"{source}: [control] must be a table")
    try:
        fromFiles: dict[str, Any] = {}
        others: tuple[str, ...] = ()
        if controlPath is not None:
            fromFiles, others = readControlDirectory(controlPath)
        control = buildControl(controlTable, fromFiles, source)
    except ControlError as e:
        raise ConfigError(str(e)) from e

    return Config(
        paths=PathsConfig(data=data, control=controlPath),
        control=control,
        smtp=smtpConfig,
        pop3=pop3Config,
        tls=tlsConfig,
        queue=queueConfig,
        users=usersConfig,
        delivery=deliveryConfig,
        submission=submissionConfig,
        smtps=smtpsConfig,
        timezone=timezone,
        dns=dnsConfig,
        remote=remoteConfig,
        source=source,
        unusedControlFiles=others,
    )


def loadConfig(path: str) -> Config:
    """Read and parse a config file; relative paths are relative to its folder."""
    path = os.path.abspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8") from e
    return parseConfig(text, os.path.dirname(path), source=path)


def defaultConfig(baseDirectory: str | None = None) -> Config:
    """The embedded default: SMTP on 127.0.0.1:2525, data in ``./var``."""
    return parseConfig("", baseDirectory or os.getcwd(), source="<built-in defaults>")
