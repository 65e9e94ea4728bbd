#!/usr/bin/env python3
"""Who was on the CPU during each stage of bench/stages.py's requests, from a perf recording.

    python bench/stages.py --iterations 300 &            # its first daemon's pid: pgrep -f stamps.json
    perf record -e sched:sched_switch -k CLOCK_MONOTONIC -a -o sched.data -- sleep 5
    perf record -F 10000 -e cpu-clock -g -k CLOCK_MONOTONIC -p PID -o cpu.data -- sleep 5
    python bench/perf_windows.py WORKDIR sched.data --pid PID [--client-pid PID] [--tree 0]
    python bench/perf_windows.py WORKDIR cpu.data --pid PID --samples

WORKDIR is the "workdir" stages.py prints (its stamps are CLOCK_MONOTONIC, as ``-k`` makes
perf's).  With sched_switch events: per stage window (median over the requests recorded), the
time the daemon's busiest thread in it was on a CPU (the gate in the gate's window, a CPU-plugin
thread in generate's, else the handler), and the time its other threads (OpenVINO's), the client
process, other processes and the idle task were.  With ``--samples`` (cpu-clock
with call graphs): per window, where the handler's and the other daemon threads' samples fall
(``sched_yield`` or libtbb: the CPU plugin's threads spinning; the plugin; Python; the kernel).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import re
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path

WINDOWS = (
    ("gate (recv to hand-off)", "gate_woke", "gate_hand_off"),
    ("handler to the job", "gate_hand_off", "run_start"),
    ("chat template", "run_start", "rendered"),
    ("encode", "rendered", "prompt_done"),
    ("queue, lock, config", "prompt_done", "generate_start"),
    ("generate", "generate_start", "generate_end"),
    ("decode", "generate_end", "decoded"),
    ("result, log line, response", "decoded", "send_start"),
)
SWITCH = re.compile(r"^\s*(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):.* next_pid=(\d+)")
SAMPLE = re.compile(r"^\s*(\d+)/(\d+)\s+([\d.]+):")


def request_stamps(workdir: Path, tree: str) -> list[dict[str, float]]:
    stamps = sorted(json.loads((workdir / tree / "stamps.json").read_text()), key=lambda stamp: stamp[1])
    times = [t for _, t in stamps]
    requests = []
    for entry in json.loads((workdir / "rounds.json").read_text()):
        if entry["tree"] != tree or entry["mode"] == "direct" or entry["warmup"]:
            continue
        inside: dict[str, float] = {}
        for name, t in stamps[bisect.bisect_left(times, entry["start"]):bisect.bisect_right(times, entry["end"])]:
            inside.setdefault(name, t / 1e9)
        requests.append(inside)
    return requests


def on_cpu(data: Path) -> tuple[list[tuple[float, float, int]], dict[int, int]]:
    """(start, end, tid) of every time slice, and tid -> pid, from sched_switch events."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,cpu,time,trace"],
                            capture_output=True, text=True, check=True).stdout
    running: dict[int, tuple[float, int]] = {}
    slices, pids = [], {}
    for line in script.splitlines():
        match = SWITCH.match(line)
        if match is None:
            continue
        pid, tid, cpu, t, next_tid = int(match[1]), int(match[2]), int(match[3]), float(match[4]), int(match[5])
        pids[tid] = pid
        if cpu in running:
            slices.append((running[cpu][0], t, running[cpu][1]))
        running[cpu] = (t, next_tid)
    return sorted(slices), pids


def samples(data: Path) -> list[tuple[float, int, str]]:
    """(time, tid, what) per cpu-clock sample; what classifies its call chain."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,time,ip,sym,dso"],
                            capture_output=True, text=True, check=True).stdout
    result, current, frames = [], None, []

    def flush() -> None:
        if current is not None:
            chain = " ".join(frames[:16])
            top = frames[0] if frames else ""
            if "sched_yield" in chain or "libtbb" in top:
                what = "spinning (sched_yield, libtbb)"
            elif "intel_cpu_plugin" in top:
                what = "CPU plugin"
            elif "libpython" in top or "[JIT]" in top or "perf-" in top:
                what = "Python"
            elif "kernel" in top:
                what = "kernel"
            else:
                what = "other libraries"
            result.append((current[0], current[1], what))

    for line in script.splitlines():
        match = SAMPLE.match(line)
        if match is not None and not line.startswith("\t"):
            flush()
            current, frames = (float(match[3]), int(match[2])), []
        elif line.strip():
            frames.append(line.strip())
    flush()
    return sorted(result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--pid", type=int, required=True, help="the daemon's pid")
    parser.add_argument("--client-pid", type=int, help="stages.py's pid (default: not told apart)")
    parser.add_argument("--tree", default="0", help="which of stages.py's daemons (default 0)")
    parser.add_argument("--samples", action="store_true", help="DATA is a cpu-clock recording")
    parser.add_argument("--period-ms", type=float, default=0.1, help="the sampling period (-F 10000)")
    args = parser.parse_args(argv)
    requests = request_stamps(args.workdir, args.tree)

    if args.samples:
        recorded = samples(args.data)
        times = [t for t, _, _ in recorded]
        covered = [r for r in requests if r and times and times[0] <= r["gate_woke"] and r["send_start"] <= times[-1]]
        # The handler is the daemon thread with the most samples between the job's start and its prompt.
        handlers: collections.Counter[int] = collections.Counter()
        for r in covered:
            first, last = bisect.bisect_left(times, r["run_start"]), bisect.bisect_right(times, r["rendered"])
            for _, tid, _ in recorded[first:last]:
                handlers[tid] += 1
        handler = handlers.most_common(1)[0][0]
        print(f"{len(covered)} requests; ms per request (samples x {args.period_ms} ms / requests)")
        print("| window | handler thread | other daemon threads |")
        print("| --- | --- | --- |")
        for label, start, end in WINDOWS:
            mine: collections.Counter[str] = collections.Counter()
            others: collections.Counter[str] = collections.Counter()
            for r in covered:
                for _, tid, what in recorded[bisect.bisect_left(times, r[start]):bisect.bisect_right(times, r[end])]:
                    (mine if tid == handler else others)[what] += 1

            def cell(counts: collections.Counter[str]) -> str:
                return ", ".join(f"{what} {n * args.period_ms / len(covered):.3f}" for what, n in counts.most_common(4))

            print(f"| {label} | {cell(mine)} | {cell(others)} |")
        return 0

    slices, pids = on_cpu(args.data)
    starts = [start for start, _, _ in slices]
    longest = max((end - start for start, end, _ in slices), default=0.0)
    covered = [r for r in requests
               if r and slices and slices[0][0] <= r["gate_woke"] and r["send_start"] <= slices[-1][1]]
    print(f"{len(covered)} requests; median ms per window")
    kinds = ("window", "busiest daemon thread", "other daemon threads", "client", "other processes", "idle")
    print("| window | " + " | ".join(kinds) + " |")
    print("| --- |" + " ---: |" * len(kinds))
    for label, start, end in WINDOWS:
        columns: dict[str, list[float]] = {kind: [] for kind in kinds}
        for r in covered:
            a, b = r[start], r[end]
            per_tid: collections.Counter[int] = collections.Counter()
            first, last = bisect.bisect_left(starts, a - longest), bisect.bisect_right(starts, b)
            for slice_start, slice_end, tid in slices[first:last]:
                if slice_end > a and slice_start < b:
                    per_tid[tid] += min(slice_end, b) - max(slice_start, a)
            daemon = [(seconds, tid) for tid, seconds in per_tid.items() if pids.get(tid) == args.pid]
            handler = max(daemon)[1] if daemon else None
            totals = dict.fromkeys(kinds, 0.0)
            totals["window"] = b - a
            for tid, seconds in per_tid.items():
                if tid == 0:
                    totals["idle"] += seconds
                elif tid == handler:
                    totals["busiest daemon thread"] += seconds
                elif pids.get(tid) == args.pid:
                    totals["other daemon threads"] += seconds
                elif args.client_pid is not None and pids.get(tid) == args.client_pid:
                    totals["client"] += seconds
                else:
                    totals["other processes"] += seconds
            for kind in kinds:
                columns[kind].append(totals[kind] * 1000)
        print(f"| {label} | " + " | ".join(f"{statistics.median(columns[kind]):.3f}" for kind in kinds) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
