"""qmailtx SMTP throughput, standalone: no Postfix, no smtp-source, stdlib only.

Starts the server (``twistd -n --pidfile= qmailtx --config benchmarks/bench.toml``)
in its own process group, sends N messages of L payload bytes from C parallel
raw-socket SMTP clients (threads; one connection per message, or one per
client with --reuse), and prints:

- accepted msg/s: N / time until the last 250 after DATA;
- in-Maildir msg/s: N / time until the N-th file is in the bench Maildir's
  new/ + cur/ (polled every 10 ms; duplicates are checked 0.3 s later);
- server CPU per message: utime + stime of the server process (all its
  threads) from /proc/PID/stat, after minus before the load, divided by N;
- peak RSS: VmHWM from /proc/PID/status.

Then the server is stopped with SIGTERM to its process group. The data
folder named in the config is scratch: it is emptied before the run.

    .venv/bin/python benchmarks/throughput.py -n 2000 -c 10 -l 1024
    .venv/bin/python benchmarks/throughput.py -n 1000 -c 10 -l 102400 --reuse
    .venv/bin/python benchmarks/throughput.py --user virtual-quota   # or BENCH_USER=...

The Python client costs CPU too (shown as "client CPU"); on a small machine it
competes with the server, so the harness in vs_postfix.sh (smtp-source, C)
gives the figures to quote.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HZ = os.sysconf("SC_CLK_TCK")
USER, DOMAIN = "bench", "bench.test"
ADDRESS = f"{USER}@{DOMAIN}"


@dataclass
class Target:
    host: str
    port: int
    data: str

    @property
    def maildir(self) -> str:
        return os.path.join(self.data, "domains", DOMAIN, USER, "Maildir")


def readTarget(configPath: str) -> Target:
    """Where the bench config listens and keeps its data."""
    with open(configPath, "rb") as f:
        config = tomllib.load(f)
    data = os.path.join(os.path.dirname(configPath), config["paths"]["data"])
    listen = config["smtp"]["listen"][0]
    m = re.fullmatch(r"tcp:(\d+)(?::interface=([\d.]+))?", listen)
    if m is None:
        raise SystemExit(f"{configPath}: cannot use listen endpoint {listen!r}")
    return Target(m.group(2) or "127.0.0.1", int(m.group(1)), os.path.normpath(data))


USER_KINDS = ("folder", "virtual", "virtual-quota")


def prepare(target: Target, kind: str, qmailctl: list[str]) -> None:
    """Empty the scratch data folder and create the bench user.

    ``folder``: the user's folder in the control-file local domain;
    ``virtual``, ``virtual-quota``: a user of the user database (with a 10GB
    quota), made by ``qmailctl`` as an administrator would. The Maildir is
    the same path in every case.
    """
    if not target.data.startswith("/tmp/"):
        raise SystemExit(f"refusing to empty {target.data}: not under /tmp")
    shutil.rmtree(target.data, ignore_errors=True)
    if kind == "folder":
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(target.maildir, sub))
        return
    quota = ["--quota", "10GB"] if kind == "virtual-quota" else []
    subprocess.run([*qmailctl, "domain", "add", DOMAIN], check=True, cwd=ROOT)
    add = [*qmailctl, "user", "add", ADDRESS, "--password-stdin", *quota]
    subprocess.run(add, input=b"bench\n", check=True, cwd=ROOT)


def countMaildir(maildir: str) -> int:
    return sum(len(os.listdir(os.path.join(maildir, sub))) for sub in ("new", "cur"))


# -- the server process ---------------------------------------------------------


def cpuSeconds(pid: int) -> float:
    """utime + stime of one process (every thread), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def peakRSS(pid: int) -> int:
    """VmHWM in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def startServer(argv: list[str], target: Target, log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with code {proc.returncode}; see {log}")
        try:
            with socket.create_connection((target.host, target.port), timeout=5) as s:
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    s.recv(512)
                    return proc
        except OSError:
            time.sleep(0.05)
    stopServer(proc)
    raise SystemExit(f"server did not answer on {target.host}:{target.port}; see {log}")


def stopServer(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# -- the clients ------------------------------------------------------------------


def makeMessage(size: int) -> bytes:
    """Headers + ``size`` payload bytes in 78-character lines, like smtp-source."""
    header = f"From: <{ADDRESS}>\r\nTo: <{ADDRESS}>\r\nSubject: qmailtx throughput\r\n\r\n"
    line = b"X" * 78 + b"\r\n"
    body = (line * (size // len(line) + 1))[:size]
    if not body.endswith(b"\r\n"):
        body = body.rstrip(b"\r") + b"\r\n"
    return header.encode() + body + b".\r\n"


class SMTPError(Exception):
    pass


class Client:
    """One blocking SMTP connection, lock-step (no pipelining), like smtp-source."""

    def __init__(self, target: Target) -> None:
        self.sock = socket.create_connection((target.host, target.port), timeout=60)
        self.file = self.sock.makefile("rb")
        self.reply(b"2")
        self.command(b"EHLO client.bench.test", b"2")

    def reply(self, expect: bytes) -> bytes:
        while True:
            line = self.file.readline()
            if not line.startswith(expect):
                raise SMTPError(line.decode(errors="replace").strip() or "connection closed")
            if line[3:4] != b"-":
                return line

    def command(self, line: bytes, expect: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply(expect)

    def send(self, message: bytes) -> None:
        self.command(f"MAIL FROM:<{ADDRESS}>".encode(), b"2")
        self.command(f"RCPT TO:<{ADDRESS}>".encode(), b"2")
        self.command(b"DATA", b"3")
        self.sock.sendall(message)
        self.reply(b"250")

    def close(self) -> None:
        try:
            self.command(b"QUIT", b"2")
        finally:
            self.file.close()
            self.sock.close()


@dataclass
class Load:
    target: Target
    messages: int
    message: bytes
    reuse: bool
    counter: itertools.count[int] = field(default_factory=itertools.count)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        return next(self.counter) < self.messages  # next() on a count is atomic

    def worker(self) -> None:
        client: Client | None = None
        try:
            while self.take():
                try:
                    if client is None:
                        client = Client(self.target)
                    client.send(self.message)
                    if not self.reuse:
                        client.close()
                        client = None
                except (OSError, SMTPError) as e:
                    with self.lock:
                        self.errors.append(f"{type(e).__name__}: {e}")
                    client = None
        finally:
            if client is not None:
                client.close()


# -- main -------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("-n", "--messages", type=int, default=2000)
    ap.add_argument("-c", "--concurrency", type=int, default=10)
    ap.add_argument("-l", "--size", type=int, default=1024, help="payload bytes per message")
    ap.add_argument(
        "--reuse", action="store_true", help="one connection per client, not per message"
    )
    ap.add_argument("--config", default=os.path.join(HERE, "bench.toml"))
    defaultTwistd = os.path.join(ROOT, ".venv", "bin", "twistd")
    ap.add_argument(
        "--twistd", default=defaultTwistd if os.path.exists(defaultTwistd) else "twistd"
    )
    ap.add_argument(
        "--user",
        choices=USER_KINDS,
        default=os.environ.get("BENCH_USER", "folder"),
        help="how bench@bench.test exists (default: $BENCH_USER, else folder)",
    )
    ap.add_argument("--log", default="/tmp/qmailtx-throughput.log", help="server output (appended)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for delivery")
    args = ap.parse_args()

    config = os.path.abspath(args.config)
    target = readTarget(config)
    qmailctl = os.path.join(os.path.dirname(args.twistd), "qmailctl")
    if not os.path.exists(qmailctl):
        qmailctl = "qmailctl"
    prepare(target, args.user, [qmailctl, "--config", config])
    proc = startServer(
        [args.twistd, "-n", "--pidfile=", "qmailtx", "--config", config], target, args.log
    )
    try:
        load = Load(target, args.messages, makeMessage(args.size), args.reuse)
        threads = [threading.Thread(target=load.worker) for _ in range(args.concurrency)]
        cpu0, clientCpu0 = cpuSeconds(proc.pid), time.process_time()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1 = time.monotonic()
        clientCpu = time.process_time() - clientCpu0
        sent = args.messages - len(load.errors)
        n = countMaildir(target.maildir)
        while n < sent and time.monotonic() < t1 + args.timeout:
            time.sleep(0.01)
            n = countMaildir(target.maildir)
        t2 = time.monotonic()
        cpu = cpuSeconds(proc.pid) - cpu0
        time.sleep(0.3)
        final = countMaildir(target.maildir)
        rss = peakRSS(proc.pid)
    finally:
        stopServer(proc)

    how = "reused connections" if args.reuse else "one connection per message"
    rows = [
        ("load", f"{args.messages} x {args.size} B, {args.concurrency} clients, {how}"),
        ("user", f"{ADDRESS}: {args.user}"),
        ("accepted", f"{sent / (t1 - t0):8.1f} msg/s  ({t1 - t0:.2f} s)"),
        ("in Maildir", f"{n / (t2 - t0):8.1f} msg/s  ({t2 - t0:.2f} s)"),
        ("server CPU", f"{1000 * cpu / args.messages:8.3f} ms/msg  ({cpu:.2f} s)"),
        ("client CPU", f"{1000 * clientCpu / args.messages:8.3f} ms/msg  ({clientCpu:.2f} s)"),
        ("peak RSS", f"{rss / 2**20:8.1f} MiB  (VmHWM, server)"),
        ("errors", f"{len(load.errors)}  (in Maildir: {final}, expected {sent})"),
    ]
    for name, value in rows:
        print(f"{name:>12}  {value}")
    for error in sorted(set(load.errors))[:5]:
        print(f"{'':>12}  {error}")
    return 0 if not load.errors and final == args.messages else 1


if __name__ == "__main__":
    sys.exit(main())
