"""Remote delivery throughput: qmailtx's queue to Postfix's smtp-sink.

Starts ``smtp-sink`` on a loopback port, then, for each concurrency given,
an embedded qmailtx (makeMailService, the real reactor, fsync'd queue) whose
smtproutes send every remote domain to the sink. N messages of L bytes are
queued at once (through the queue store, as SMTP would commit them), for D
domains in turn, and the clock runs until the queue is empty: every message
delivered by SMTP and its queue file removed.

    .venv/bin/python benchmarks/remote.py -n 2000 -l 1024 -c 1 10 100
    .venv/bin/python benchmarks/remote.py -n 2000 --domains 1     # one domain
      (concurrency_per_domain then limits: --per-domain 100)

Prints one line per concurrency: msg/s and the run time. Needs smtp-sink
(Debian's postfix package); as root it runs as ``nobody``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from twisted.internet import reactor as _reactor  # noqa: E402
from twisted.internet.defer import Deferred, gatherResults  # noqa: E402
from twisted.internet.task import deferLater, react  # noqa: E402

from qmailtx import makeMailService  # noqa: E402
from qmailtx.address import Address  # noqa: E402
from qmailtx.queue.manager import QueueManager  # noqa: E402
from qmailtx.testing import makeTestConfig  # noqa: E402

reactor: Any = _reactor


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def startSink(port: int) -> subprocess.Popen[bytes]:
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    argv = [sink, "-c", f"127.0.0.1:{port}", "1000"]
    if os.getuid() == 0:
        argv[1:1] = ["-u", "nobody"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.1).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("smtp-sink did not start")


async def run(args: argparse.Namespace, sinkPort: int, concurrency: int) -> float:
    folder = tempfile.mkdtemp(prefix="qmailtx-remote-bench-")
    try:
        config = makeTestConfig(
            folder,
            "[smtp]\nlisten = []\n"
            f"[remote]\nconcurrency_per_domain = {args.per_domain}\n"
            f"[queue]\nthreads = {args.threads}\n"
            f"[control]\nconcurrencyremote = {concurrency}\n"
            f'smtproutes = [":127.0.0.1:{sinkPort}"]\n',
        )
        mail = makeMailService(reactor, config)
        mail.startService()
        manager = mail.getServiceNamed("queue")
        assert isinstance(manager, QueueManager)
        await manager.recovered
        body = b"Subject: bench\n\n" + (b"x" * 76 + b"\n") * max(args.length // 77, 1)
        sender = Address("bench", "localhost")
        started = time.monotonic()
        await gatherResults(
            [
                manager.store.inject(
                    time.time(), sender, [Address("u", f"d{i % args.domains}.example")], body, {}
                )
                for i in range(args.messages)
            ]
        )
        while manager.messages:
            await deferLater(reactor, 0.005, lambda: None)
        elapsed = time.monotonic() - started
        await mail.stopService()
        return elapsed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(reactor: Any, args: argparse.Namespace) -> Deferred[None]:
    async def go() -> None:
        port = freePort()
        sink = startSink(port)
        try:
            for concurrency in args.concurrency:
                elapsed = await run(args, port, concurrency)
                print(
                    f"concurrencyremote {concurrency:4d}: {args.messages} msgs of"
                    f" {args.length} B to {args.domains} domain(s) in {elapsed:6.2f} s"
                    f" = {args.messages / elapsed:7.1f} msg/s",
                    flush=True,
                )
        finally:
            sink.kill()
            sink.wait()

    return Deferred.fromCoroutine(go())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=2000)
    parser.add_argument("-l", "--length", type=int, default=1024)
    parser.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--domains", type=int, default=100)
    parser.add_argument("--per-domain", type=int, default=20)
    parser.add_argument("--threads", type=int, default=16)
    react(main, [parser.parse_args()])
