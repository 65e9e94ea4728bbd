#!/usr/bin/env python3
"""Idle wake-ups of the worker daemon: context switches per thread while nobody sends anything.

    python bench/idle.py [--seconds 60] [--settle 1] [--model DIR] [--device CPU|NPU] [--json OUT]

An idle daemon should sleep.  Every wake-up of an idle thread costs a laptop power (the CPU
leaves its deep C-state) and shows a poll loop somewhere.  The kernel counts, per thread, the
times it gave up the CPU by itself (``voluntary_ctxt_switches``: it blocked, or a timed wait
ended and it ran again) and was preempted (``nonvoluntary_ctxt_switches``) in
``/proc/PID/task/TID/status``; their sum over an interval is the number of times the thread ran.

``main()`` starts a daemon the way bench/run.py does (``python worker.py`` on a free port, the
tiny model on CPU unless told otherwise, a private lock file and cache), waits until
``/healthz`` says 200, lets it settle, then samples every thread at t and t + ``--seconds``.

Thread names are ``/proc/PID/task/TID/comm``.  CPython before 3.14 does not give its threads
kernel names, so Python threads all show the interpreter's name; the main thread is the one
whose TID is the PID and is labelled ``(main)``.  To tell the others apart, each row also shows
the kernel function the thread sleeps in at the end (``/proc/PID/task/TID/wchan``): a selector or
``poll`` loop sleeps in ``poll_schedule_timeout`` or ``do_select``, a thread blocked on a Python
lock or ``Event`` in ``futex_do_wait``.  Threads that start or end in the interval are listed as
such; their counts cover only the part of the interval they lived, and a thread that starts and
ends inside it (a connection thread) is not seen at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run as bench  # the Daemon and RunConfig of the main bench


@dataclasses.dataclass(frozen=True)
class ThreadSample:
    tid: int
    name: str
    switches: int  # voluntary + nonvoluntary context switches so far
    sleeps_in: str  # /proc/.../wchan: the kernel function it waits in ("poll_schedule_timeout", "futex_do_wait")


@dataclasses.dataclass(frozen=True)
class ThreadWakeups:
    tid: int
    name: str
    wakeups: int
    per_s: float
    sleeps_in: str
    lifetime: str  # "whole", "started" (appeared during the interval) or "ended"


def sample_threads(pid: int) -> dict[int, ThreadSample]:
    """Every thread of ``pid`` now; threads that exit while being read are skipped."""
    samples: dict[int, ThreadSample] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            sleeps_in = (task / "wchan").read_text().strip() or "-"
            fields = dict(
                line.split(":", 1) for line in (task / "status").read_text().splitlines() if ":" in line
            )
        except (FileNotFoundError, ProcessLookupError):
            continue
        switches = int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])
        tid = int(task.name)
        samples[tid] = ThreadSample(tid, f"{name} (main)" if tid == pid else name, switches, sleeps_in)
    return samples


def wakeups_between(
    before: dict[int, ThreadSample], after: dict[int, ThreadSample], seconds: float
) -> list[ThreadWakeups]:
    """Per thread: how often it ran between two samples, most frequent first."""
    rows = []
    for tid in sorted(set(before) | set(after)):
        if tid in before and tid in after:
            sample, wakeups, lifetime = after[tid], after[tid].switches - before[tid].switches, "whole"
        elif tid in after:
            sample, wakeups, lifetime = after[tid], after[tid].switches, "started"
        else:
            sample, wakeups, lifetime = before[tid], 0, "ended"  # its last count is unknown
        rows.append(ThreadWakeups(tid, sample.name, wakeups, round(wakeups / seconds, 2), sample.sleeps_in, lifetime))
    return sorted(rows, key=lambda row: (-row.wakeups, row.tid))


def idle_wakeups(pid: int, seconds: float) -> list[ThreadWakeups]:
    """Sample every thread of ``pid``, sleep ``seconds``, sample again; wake-ups per thread."""
    before = sample_threads(pid)
    started = time.monotonic()
    time.sleep(seconds)
    after = sample_threads(pid)
    return wakeups_between(before, after, time.monotonic() - started)


def by_name(rows: Sequence[ThreadWakeups]) -> dict[str, dict[str, Any]]:
    """Threads grouped by name: how many, and their wake-ups per second together."""
    groups: dict[str, dict[str, Any]] = defaultdict(lambda: {"threads": 0, "wakeups": 0, "per_s": 0.0})
    for row in rows:
        group = groups[row.name]
        group["threads"] += 1
        group["wakeups"] += row.wakeups
        group["per_s"] = round(group["per_s"] + row.per_s, 2)
    return dict(sorted(groups.items(), key=lambda item: -item[1]["per_s"]))


def render(rows: Sequence[ThreadWakeups], seconds: float) -> str:
    total = sum(row.wakeups for row in rows)
    lines = [f"idle wake-ups over {seconds:g} s: {total} in {len(rows)} threads ({total / seconds:.2f}/s)", ""]
    lines.append(f"{'tid':>8}  {'name':24} {'wake-ups':>9} {'per s':>8}  {'sleeps in':36} lifetime")
    for row in rows:
        lines.append(
            f"{row.tid:>8}  {row.name:24} {row.wakeups:>9} {row.per_s:>8.2f}  {row.sleeps_in:36} {row.lifetime}"
        )
    lines += ["", f"{'name':24} {'threads':>7} {'wake-ups':>9} {'per s':>8}"]
    for name, group in by_name(rows).items():
        lines.append(f"{name:24} {group['threads']:>7} {group['wakeups']:>9} {group['per_s']:>8.2f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="sampling interval (default 60)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds to wait after ready (default 1)")
    parser.add_argument("--model", type=Path, default=bench.DEFAULT_MODEL, help="model (default: the tiny test model)")
    parser.add_argument("--device", choices=("CPU", "NPU"), default="CPU", help="device (default CPU)")
    parser.add_argument("--no-npu-proof", action="store_true", help="NPU on a kernel without the busy counter")
    parser.add_argument("--watchdog-s", type=float,
                        help="run as under systemd with WatchdogSec= this (the self-check every half of it)")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="worker-idle-") as workdir:
        config = bench.RunConfig(
            model=args.model.resolve(), device=args.device, cache_dir=None, lock_file=None,
            max_prompt_tokens=bench.worker.DEFAULT_MAX_PROMPT_TOKENS, no_npu_proof=args.no_npu_proof,
            emulate_npu=False, workdir=Path(workdir), plan=bench.Plan(),
        )
        if args.watchdog_s is not None:  # as systemd sets it: the self-check runs every half of it
            os.environ["WATCHDOG_USEC"] = str(int(args.watchdog_s * 1_000_000))
        with bench.Daemon(config, "idle") as daemon:
            time.sleep(args.settle)
            rows = idle_wakeups(daemon.pid, args.seconds)
    print(render(rows, args.seconds))
    if args.json is not None:
        document = {
            "seconds": args.seconds,
            "threads": [dataclasses.asdict(row) for row in rows],
            "by_name": by_name(rows),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
