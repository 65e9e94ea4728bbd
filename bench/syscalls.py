#!/usr/bin/env python3
"""System calls per kept-alive request, by thread, for one or more worker.py versions.

    python bench/syscalls.py [--requests 300] [--tokens 16] WORKER_PY [WORKER_PY ...]

Each worker.py serves the tiny model on CPU (--no-stop-rules); after a warm-up, ``strace -f``
is attached to every thread of the daemon while one keep-alive client sends ``--requests`` jobs
(a summary of 16 new tokens by default), then detached.  Reported per request: the calls of the
gate thread, of the handler threads, and of all other threads (OpenVINO's pool, logging), by name.
Needs strace and ptrace rights (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run

LINE = re.compile(r"^(?:\[pid\s+)?(\d+)\]?\s+([a-z0-9_]+)\(")  # strace -f -o: "TID name(...", one a line


def measure(
    worker_py: Path, requests: int, tokens: int, workdir: Path
) -> dict[str, collections.Counter[str]]:
    config = run.tiny_cpu_config(workdir, lock_file=workdir / "npu.lock")
    body = run.encode_job(run.JOB, run.make_text(run.OVERHEAD_INPUT_CHARS), tokens)
    command = [sys.executable, str(worker_py.resolve())]
    daemon = run.Daemon(config, worker_py.parent.name or "worker", command=command)
    try:
        daemon.wait_ready()
        client = run.Client(daemon.port)
        client.connect()
        for _ in range(50):  # warm-up: every handler thread the pool will use exists now
            run.check_ok(client.post(body))
        tids = [int(task.name) for task in Path(f"/proc/{daemon.pid}/task").iterdir()]
        trace = workdir / "trace.txt"
        tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), *[f"-p{tid}" for tid in tids]],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # strace attaches to every thread
        for _ in range(requests):
            run.check_ok(client.post(body))
        tracer.send_signal(signal.SIGINT)
        tracer.wait(30)
        client.close()
    finally:
        daemon.stop()
    per_tid: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in trace.read_text().splitlines():
        match = LINE.match(line)
        if match is None or "resumed>" in line:
            continue
        per_tid[int(match.group(1))][match.group(2)] += 1
    # Threads have no names of their own below Python 3.14: told apart by what they do.  The gate
    # waits in epoll_wait; a handler sends the answers (sendto); the rest is OpenVINO and the like.
    by_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for counts in per_tid.values():
        kind = "gate" if counts["epoll_wait"] else "handler" if counts["sendto"] else "other"
        by_thread[kind].update(counts)
    return by_thread


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workers", type=Path, nargs="+")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)
    for worker_py in args.workers:
        counts = measure(worker_py, args.requests, args.tokens, Path(tempfile.mkdtemp(prefix="syscalls-")))
        print(f"## {worker_py}")
        for kind in ("gate", "handler", "other"):
            total = sum(counts[kind].values()) / args.requests
            common = counts[kind].most_common(12)
            detail = ", ".join(f"{name} {count / args.requests:.2f}" for name, count in common)
            print(f"{kind:8} {total:6.2f} per request: {detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
