"""Peak memory of remote delivery: N big queued messages at once to smtp-sink.

Queues N messages of L bytes (N domains, so all go at once) straight into
the queue files, lets the RSS settle, resets the kernel's high-water mark
(``/proc/self/clear_refs``, Linux), then starts an embedded qmailtx whose
smtproutes send every domain to Postfix's smtp-sink and waits until the
queue is empty. Prints the RSS before the start, the peak (``VmHWM``) and
the growth: what the deliveries cost, apart from the interpreter.

    .venv/bin/python benchmarks/remote_memory.py -n 20 -l 8388608 -c 20

``--code DIR`` runs another checkout's qmailtx (to compare before/after).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def status(field: str) -> int:
    """A ``/proc/self/status`` field in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


async def measure(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.task import LoopingCall, deferLater

    from benchmarks.remote import freePort, startSink
    from qmailtx import makeMailService
    from qmailtx.address import Address
    from qmailtx.queue.disk import QueueDisk
    from qmailtx.queue.manager import QueueManager
    from qmailtx.service import prepareDataDirectory
    from qmailtx.testing import makeTestConfig

    port = freePort()
    sink = startSink(port)
    folder = tempfile.mkdtemp(prefix="qmailtx-remote-memory-")
    try:
        config = makeTestConfig(
            folder,
            "[smtp]\nlisten = []\n"
            '[remote]\nconcurrency_per_domain = 20\ntls = "none"\n'
            f"[queue]\nthreads = {args.threads}\n"
            f"[control]\nconcurrencyremote = {args.concurrency}\n"
            f'smtproutes = [":127.0.0.1:{port}"]\n',
        )
        prepareDataDirectory(config)
        disk = QueueDisk(os.path.join(config.paths.data, "queue"))
        line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, \xc3\xa9t\xc3\xa9 .x\n"
        body = b"Subject: big\n\n.leading dot\n" + line * (args.length // len(line))
        sender = Address("bench", "localhost")
        for i in range(args.messages):
            disk.inject(time.time(), sender, [Address("u", f"d{i}.example")], body, {})
        del body
        gc.collect()
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        mail = makeMailService(reactor, config)
        sampled = [base]
        sampler = LoopingCall(lambda: sampled.append(status("VmRSS")))
        sampler.start(0.005)
        started = time.monotonic()
        mail.startService()
        manager = mail.getServiceNamed("queue")
        assert isinstance(manager, QueueManager)
        await manager.recovered
        while manager.messages:
            await deferLater(reactor, 0.01, lambda: None)
        elapsed = time.monotonic() - started
        await mail.stopService()
        sampler.stop()
        peak = status("VmHWM")
        print(
            f"{args.messages} x {args.length} B, concurrencyremote {args.concurrency}:"
            f" {elapsed:.2f} s; RSS before {base / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB"
            f" (sampled {max(sampled) / 1024:.0f} MiB), growth {(peak - base) / 1024:.0f} MiB",
            flush=True,
        )
    finally:
        sink.kill()
        sink.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=20)
    parser.add_argument("-l", "--length", type=int, default=8 * 1024 * 1024)
    parser.add_argument("-c", "--concurrency", type=int, default=20)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--code", default=os.path.dirname(HERE), help="checkout to import")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))  # benchmarks.remote
    sys.path.insert(0, args.code)  # qmailtx, first

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(measure(reactor, args)))


if __name__ == "__main__":
    main()
