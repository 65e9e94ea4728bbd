#!/usr/bin/env python3
"""Measure what slow clients do to a real worker daemon: probes, log volume, watchdog verdicts.

    python bench/attacks.py [--seconds 40] [--connections 200] [--interval 5]
                            [--scenarios control,slow-head,slow-body] [--json OUT] [--logs DIR]

Each scenario gets a fresh daemon (``python worker.py`` on the tiny model on CPU, a private lock
file and cache, a free port, stderr to a file), waits until ``/healthz`` says 200, then:

1. starts the attack (none for ``control``) from ``slow_clients``;
2. after ``--ramp`` seconds starts a ``Prober`` (``/livez``, ``/healthz`` and a title job, each
   once per ``--probe-interval``) and runs both for ``--seconds``;
3. stops the attack and times how long ``/livez`` takes to answer 200 again;
4. reads what the daemon logged while the attack ran: bytes, lines, watchdog ``unhealthy``
   lines, refusal lines, ERROR lines; and its CPU time and thread count.

The table goes to stdout, the numbers as JSON to ``--json`` if given.  Standard library only;
worker.py is run, never imported, so the same script measures the worker before and after a
change.  Exit status: 0 when every scenario ran (whatever it measured), 1 when one could not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO / "tests"
sys.path.insert(0, str(TESTS_DIR))  # the attack tools live beside the tests that use them

from slow_clients import Prober
from slow_clients import SlowBodyAttack
from slow_clients import SlowHeadAttack
from slow_clients import probe_once

WORKER_PY = REPO / "worker.py"
TINY_MODEL = TESTS_DIR / "fixtures" / "tiny-chatml-ov"
HOST = "127.0.0.1"
SCENARIOS = {"control": None, "slow-head": SlowHeadAttack, "slow-body": SlowBodyAttack}
READY_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def worker_env(workdir: Path, port: int) -> dict[str, str]:
    """tests/conftest.py's worker_env: the tiny model on CPU, private lock and cache."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OV_GENAI_NPU_")}
    env.update(
        OV_GENAI_NPU_MODEL=str(TINY_MODEL),
        OV_GENAI_NPU_DEVICE="CPU",
        OV_GENAI_NPU_LOCK=str(workdir / "lock" / "npu.lock"),
        OV_GENAI_NPU_CACHE=str(workdir / "cache"),
        OV_GENAI_NPU_PORT=str(port),
        PYTHONUNBUFFERED="1",
    )
    return env


class Daemon:
    """``python worker.py`` as a subprocess, its stderr in ``log_path``; stopped with SIGTERM."""

    def __init__(self, workdir: Path, name: str, worker_py: Path = WORKER_PY) -> None:
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(worker_py)], cwd=REPO, env=worker_env(workdir / name, self.port),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}: {self.log_tail()}")
            if probe_once(HOST, self.port, "healthz", 2.0).status == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready within {timeout_s:g} s: {self.log_tail()}")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime

    def threads(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
        return -1

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclasses.dataclass(frozen=True)
class Options:
    seconds: float
    connections: int
    interval_s: float
    ramp_s: float
    probe_interval_s: float
    probe_timeout_s: float


def log_window(log_path: Path, start: int, end: int) -> dict[str, Any]:
    """What the daemon wrote between two file offsets."""
    with open(log_path, "rb") as log:
        log.seek(start)
        data = log.read(max(0, end - start))
    lines = data.decode("utf-8", "replace").splitlines()
    return {
        "bytes": len(data),
        "lines": len(lines),
        "unhealthy_lines": sum(1 for line in lines if "unhealthy" in line),
        "unhealthy_messages": sorted({line.split("unhealthy", 1)[1] for line in lines if "unhealthy" in line}),
        # Refusal lines: one per refused connection before the gate, one per reason and second since.
        "connection_cap_lines": sum(1 for line in lines if "too many open connections" in line or " refused=" in line),
        "error_lines": sum(1 for line in lines if " ERROR " in f" {line} "),
        "first_unhealthy": next((line for line in lines if "unhealthy" in line), None),
        "answers": dict(sorted(Counter(_answer(line) for line in lines if " status=" in line).items())),
    }


def _answer(line: str) -> str:
    """``path status error`` of one logfmt request line."""
    fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
    return " ".join(fields[name] for name in ("method", "path", "status", "error") if name in fields)


def wait_recovered(port: int, timeout_s: float = RECOVERY_TIMEOUT_S) -> float | None:
    """Seconds until /livez answers 200 (None: not within timeout_s)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if probe_once(HOST, port, "livez", 2.0).status == 200:
            return round(time.monotonic() - started, 2)
        time.sleep(0.1)
    return None


def run_scenario(name: str, options: Options, workdir: Path, worker_py: Path = WORKER_PY) -> dict[str, Any]:
    attack_class = SCENARIOS[name]
    daemon = Daemon(workdir, name, worker_py)
    try:
        daemon.wait_ready()
        log_start = daemon.log_size()
        cpu_start = daemon.cpu_s()
        started = time.monotonic()
        client_cpu_start = time.process_time()
        attack = None
        if attack_class is not None:
            attack = attack_class(HOST, daemon.port, connections=options.connections, interval_s=options.interval_s)
            attack.start()
        try:
            time.sleep(options.ramp_s)
            prober = Prober(HOST, daemon.port, interval_s=options.probe_interval_s, timeout_s=options.probe_timeout_s)
            with prober:
                time.sleep(options.seconds)
            threads = daemon.threads()
        finally:
            if attack is not None:
                attack.stop()
        attack_s = time.monotonic() - started
        cpu_s = daemon.cpu_s() - cpu_start
        client_cpu_s = time.process_time() - client_cpu_start
        log_end = daemon.log_size()
        recovery_s = wait_recovered(daemon.port)
        time.sleep(1.0)  # let threads of the closed attack connections finish and log
        after_stop = log_window(daemon.log_path, log_end, daemon.log_size())
        return {
            "scenario": name,
            "port": daemon.port,
            "attack_s": round(attack_s, 1),
            "probes": prober.summary(),
            "attack": attack.stats().as_dict() if attack is not None else None,
            "log": log_window(daemon.log_path, log_start, log_end),
            # Requests the daemon answered after the attacker closed its sockets: a half-sent
            # head that EOF ends is parsed as complete by http.client.parse_headers.
            "log_after_stop": after_stop,
            "daemon_cpu_s": round(cpu_s, 1),
            "client_cpu_s": round(client_cpu_s, 1),  # this process: the attack and the prober
            "daemon_threads_at_end": threads,
            "livez_recovery_s": recovery_s,
            "still_running": daemon.process.poll() is None,
        }
    finally:
        code = daemon.stop()
        print(f"[{name}] daemon exit code {code}; log {daemon.log_path}", file=sys.stderr, flush=True)


def _cell(probes: dict[str, Any]) -> str:
    other = {k: v for k, v in probes["outcomes"].items() if k not in ("200", "503")}
    outcomes = probes["outcomes"]
    return f"{outcomes.get('200', 0)}/{outcomes.get('503', 0)}/{sum(other.values())} of {probes['n']}"


def render(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per scenario; probe cells are 200/503/other of n."""
    header = (
        "| scenario | livez 200/503/other | healthz 200/503/other | jobs 200/503/other | livez p50/max ms "
        "| log bytes | log lines | unhealthy | cap-refusal lines | attack opened/closed/refused | daemon/client CPU s "
        "| threads | livez recovery s |"
    )
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    for result in results:
        probes = result["probes"]
        attack = result["attack"]
        attack_text = "-" if attack is None else f"{attack['opened']}/{attack['closed_by_server']}/{attack['refused']}"
        livez_latency = probes["livez"]["latency_ms"]
        rows.append(
            f"| {result['scenario']} | {_cell(probes['livez'])} | {_cell(probes['healthz'])} | {_cell(probes['job'])} "
            f"| {livez_latency['p50']}/{livez_latency['max']} | {result['log']['bytes']} | {result['log']['lines']} "
            f"| {result['log']['unhealthy_lines']} | {result['log']['connection_cap_lines']} | {attack_text} "
            f"| {result['daemon_cpu_s']}/{result['client_cpu_s']} | {result['daemon_threads_at_end']} "
            f"| {result['livez_recovery_s']} |"
        )
    details = []
    for result in results:
        for target, probes in result["probes"].items():
            details.append(f"{result['scenario']:9} {target:8} {json.dumps(probes['details'])}")
        if result["attack"] is not None:
            details.append(f"{result['scenario']:9} attack   {json.dumps(result['attack'])}")
        details.append(f"{result['scenario']:9} logged   {json.dumps(result['log']['answers'])}")
        if result["log"]["first_unhealthy"]:
            details.append(f"{result['scenario']:9} log      {result['log']['first_unhealthy']}")
        details.append(f"{result['scenario']:9} after    {json.dumps(result['log_after_stop']['answers'])}")
    return "\n".join(rows) + "\n\n" + "\n".join(details)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40.0, help="probing time per scenario (default 40)")
    parser.add_argument("--connections", type=int, default=200, help="attacking connections (default 200)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between an attacker's sends (default 5)")
    parser.add_argument("--ramp", type=float, default=2.0, help="seconds of attack before probing starts (default 2)")
    parser.add_argument("--probe-interval", type=float, default=1.0, help="seconds between probes per target")
    parser.add_argument("--probe-timeout", type=float, default=5.0,
                        help="timeout of each probe (default 5, as the watchdog's self-check)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    parser.add_argument("--worker", type=Path, default=WORKER_PY, help="worker.py to run (default: this checkout's)")
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    parser.add_argument("--logs", type=Path, help="keep the daemons' logs in this directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        print(f"unknown scenarios: {', '.join(unknown)}", file=sys.stderr)
        return 2
    options = Options(args.seconds, args.connections, args.interval, args.ramp, args.probe_interval, args.probe_timeout)
    results: list[dict[str, Any]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="worker-attacks-") as tmp:
        workdir = args.logs.resolve() if args.logs else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for name in names:
            print(f"== {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_scenario(name, options, workdir, args.worker.resolve()))
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not lose the others' numbers
                failed = True
                print(f"{name}: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    print(render(results))
    if args.json is not None:
        document = {"options": dataclasses.asdict(options), "worker": str(args.worker), "results": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
