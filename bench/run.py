#!/usr/bin/env python3
"""Benchmarks for worker.py: what the worker costs on top of a bare ``LLMPipeline.generate``.

    python bench/run.py [overhead|concurrency|scaling|soak|startup|all|profile] [--quick] [--json OUT]

Sections
--------
overhead     One job through HTTP keep-alive, HTTP with a new connection per request, the CLI
             batch path (``python worker.py --batch -``) and a direct ``LLMPipeline.generate``
             in this process on the identical templated prompt.  overhead = worker - direct.
concurrency  1, 4 and 16 keep-alive clients against one daemon: throughput against direct
             sequential generation, queue wait, FIFO order, errors; then a burst past the queue
             bound, which must be answered 503 with ``Retry-After``.
scaling      Latency and overhead against input size (100 .. 6000 characters).
soak         Many keep-alive requests: RSS, thread and fd counts of the daemon before and after.
startup      ``worker.py --help`` wall time; process start to ``/healthz`` 200 with an empty and a
             warm ``--cache-dir``.
profile      (not part of ``all``) profiles of the daemon's threads under keep-alive load, taken by
             bench/profile_worker.py with cProfile and, if installed, pyinstrument; and A/B
             timings of the steps the worker adds around generate().

Method, and why
---------------
* The daemon is a subprocess started as a user starts it (``python worker.py ...``); the bench only
  uses the public interfaces (HTTP, CLI).  ``import worker`` is only for constants, ``JOBS`` and
  ``job_messages``, so that the direct baseline renders byte for byte the worker's prompt
  (checked: the prompt token counts must match).
* Modes are interleaved per iteration, in a seeded random order, after a warm-up, so that machine
  noise (other processes, CPU frequency, caches) hits every mode alike.  The CLI batch
  path is one ``worker.py --batch -`` process fed one JSON line per iteration.  Each section
  also records how much CPU other processes took meanwhile (``noise``).
* The direct baseline runs in this process while the daemon is idle: two pipelines generating at
  once on a small machine would measure contention, not overhead.
* Client timing is ``time.perf_counter`` around the request; request bodies are encoded and
  responses decoded outside the timed region (that is client work, not worker work).
* Targets are printed as PASS/MISS with the measured value.  They are absolute times and ratios of
  one run on one machine: reported here, never asserted by tests.

Standard library and openvino_genai only; openvino_genai is imported when the baseline is first
needed, so ``startup`` and ``--help`` do not pay for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.client
import importlib.util
import itertools
import json
import os
import platform
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKER_PY = REPO / "worker.py"
PROFILE_WORKER_PY = BENCH_DIR / "profile_worker.py"

sys.path.insert(0, str(REPO))
import worker  # constants, JOBS and job_messages: the identical prompt for the baseline

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; annotations here are never evaluated

# ==================================================================================================
# Settings
# ==================================================================================================

DEFAULT_MODEL = REPO / "tests" / "fixtures" / "tiny-chatml-ov"
DEFAULT_JSON = BENCH_DIR / "results.json"
SECTIONS = ("overhead", "concurrency", "scaling", "soak", "startup")
EXTRA_SECTIONS = ("profile",)  # slow or needing a profiler: only when asked for by name

JOB = "summary"  # the one job that accepts every max_new_tokens used here (up to 256)
GENERATE_PATH = "/v1/worker/generate"
JSON_HEADERS = {"Content-Type": "application/json"}
OVERHEAD_INPUT_CHARS = 400  # a typical ticket or notification: a few sentences
SOAK_JOBS = (("title", 16), ("summary", 16), ("notification", 16), ("memory_candidate", 16))

HTTP_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 900.0  # a first NPU compile of a 1.5B model takes minutes
READY_POLL_S = 0.002
STOP_TIMEOUT_S = 15.0
# Two reconstructed event times closer than this are "simultaneous": the client's estimate of a
# server-side instant is late by the response's transfer and thread wake-up, which under 16
# client threads on 2 cores reaches a few milliseconds.
ORDER_TOLERANCE_MS = 5.0
FIFO_FOLLOWERS = 15
# Arrival-order check (informational): followers sent this far apart without looking.  Entry into
# the queue comes after validation, rendering and the token count in the request's own thread,
# so on a busy CPU close arrivals can enter in another order.
FIFO_ARRIVAL_SPACING_S = 0.005
FIFO_HEAD_TOKENS = 256
FIFO_FOLLOWER_TOKENS = 32  # starts a whole generation apart: reconstruction noise cannot reorder them
BURST_CLIENTS = 16
BURST_QUEUE_DEPTH = 2
BURST_TOKENS = 128  # long enough that all 16 requests arrive while the first one generates


@dataclasses.dataclass(frozen=True)
class Plan:
    """How much of everything to run; --quick scales it down to a smoke run of the bench itself."""

    overhead_tokens: tuple[int, ...] = (16, 128)
    overhead_iterations: int = 400
    overhead_warmup: int = 20
    concurrency_clients: tuple[int, ...] = (1, 4, 16)
    concurrency_tokens: tuple[int, ...] = (16, 128)
    concurrency_requests: int = 640  # per level; a multiple of chunks x every client count
    concurrency_chunks: int = 5
    fifo_rounds: int = 5
    fifo_arrival: bool = True  # the informational arrival-order check as well
    burst_rounds: int = 20
    scaling_sizes: tuple[int, ...] = (100, 500, 1000, 3000, 6000)
    scaling_tokens: int = 16
    scaling_iterations: int = 200
    soak_requests: int = 10_000
    soak_warmup: int = 200
    help_runs: int = 10
    healthz_runs: int = 5
    profile_requests: int = 3000


QUICK_PLAN = Plan(
    overhead_tokens=(16,),
    overhead_iterations=20,
    overhead_warmup=5,
    concurrency_tokens=(16,),
    concurrency_requests=32,
    concurrency_chunks=1,
    fifo_rounds=1,
    fifo_arrival=False,
    burst_rounds=2,
    scaling_iterations=5,
    soak_requests=300,
    soak_warmup=20,
    help_runs=3,
    healthz_runs=1,
    profile_requests=300,
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where and how the worker runs: the tiny model on CPU here, a real model on an NPU host."""

    model: Path
    device: str
    cache_dir: Path | None  # None: a fresh directory per daemon under the work directory
    lock_file: Path | None  # None: a private lock file (nothing else on this host is blocked)
    max_prompt_tokens: int  # NPU MAX_PROMPT_LEN for daemons and the baseline
    no_npu_proof: bool  # NPU on a kernel without the busy counter (< 6.11)
    emulate_npu: bool  # GenAI's NPU pipeline compiled for the CPU (NPUW_DEVICES=CPU)
    workdir: Path
    plan: Plan


def tiny_cpu_config(workdir: Path, lock_file: Path | None = None) -> RunConfig:
    """The tiny model on the CPU with the worker's defaults: the A/B and profiling benches' setting."""
    return RunConfig(
        model=DEFAULT_MODEL, device="CPU", cache_dir=None, lock_file=lock_file,
        max_prompt_tokens=worker.DEFAULT_MAX_PROMPT_TOKENS, no_npu_proof=False, emulate_npu=False,
        workdir=workdir, plan=Plan(),
    )


# ==================================================================================================
# Statistics and inputs
# ==================================================================================================


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no samples."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(samples)

    def r(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return {
        "n": len(ordered),
        "p50": r(percentile(ordered, 50)),
        "p95": r(percentile(ordered, 95)),
        "p99": r(percentile(ordered, 99)),
        "mean": r(statistics.fmean(ordered)) if ordered else None,
        "min": r(ordered[0]) if ordered else None,
        "max": r(ordered[-1]) if ordered else None,
    }


def difference(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if a.get(key) is None or b.get(key) is None:
        return None
    return round(a[key] - b[key], 4)


_SENTENCES = (
    "The nightly backup of the photo library finished at 03:12 after copying 1,204 new files.",
    "Two files were skipped because another program still had them open.",
    "The Kanban task asks for a small OpenVINO GenAI worker that runs short jobs on the NPU.",
    "It must never change the primary routing of the agents that call it.",
    "Each answer carries the change of the busy-time counter as proof that the NPU ran.",
    "Prompts longer than the compiled limit are refused before they reach the device.",
    "The meeting on Thursday moved to 14:30 because the projector in room B is broken.",
    "Please bring the revised budget, the vendor quotes and the draft of the release notes.",
)


def make_text(chars: int) -> str:
    """Deterministic English prose of exactly ``chars`` characters (same input on every run)."""
    parts: list[str] = []
    length = 0
    index = 0
    while length < chars:
        sentence = _SENTENCES[index % len(_SENTENCES)]
        parts.append(sentence)
        length += len(sentence) + 1
        index += 1
    return " ".join(parts)[:chars]


def encode_job(job: str, text: str, max_new_tokens: int) -> bytes:
    return json.dumps({"job": job, "input": text, "max_new_tokens": max_new_tokens}).encode("utf-8")


# ==================================================================================================
# HTTP client
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]  # lower-case names
    elapsed_ms: float
    sent_at: float  # perf_counter just before the request was written
    received_at: float  # perf_counter once the whole response was read

    @property
    def ok(self) -> bool:
        return self.status == 200

    def timing(self, name: str) -> float:
        return float(self.body["timing_ms"][name])

    @property
    def server_overhead_ms(self) -> float:
        """The worker's own time for this job outside the pipeline call (validation to result)."""
        return self.timing("total") - self.timing("generate")


def _exchange(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None,
              headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes, float, float]:
    sent_at = time.perf_counter()
    conn.request(method, path, body, headers)
    response = conn.getresponse()
    data = response.read()
    return response, data, sent_at, time.perf_counter()


def _reply(response: http.client.HTTPResponse, data: bytes, sent_at: float, received_at: float) -> Reply:
    return Reply(
        status=response.status,
        body=json.loads(data),
        headers={name.lower(): value for name, value in response.getheaders()},
        elapsed_ms=(received_at - sent_at) * 1000.0,
        sent_at=sent_at,
        received_at=received_at,
    )


class Client:
    """One keep-alive connection, as a long-lived local agent would hold it."""

    def __init__(self, port: int, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)

    def connect(self) -> None:
        self.conn.connect()  # so that a timed run does not include the TCP handshake

    def post(self, body: bytes, path: str = GENERATE_PATH) -> Reply:
        response, data, sent_at, received_at = _exchange(self.conn, "POST", path, body, JSON_HEADERS)
        if response.will_close:
            self.conn.close()  # http.client reconnects on the next request
        return _reply(response, data, sent_at, received_at)

    def get(self, path: str) -> Reply:
        response, data, sent_at, received_at = _exchange(self.conn, "GET", path, None, {})
        if response.will_close:
            self.conn.close()
        return _reply(response, data, sent_at, received_at)

    def close(self) -> None:
        self.conn.close()


def post_new_connection(port: int, body: bytes) -> Reply:
    """Connect, send one request, close: what curl or a shell script does.

    ``Connection: close`` lets the server end its connection thread at once instead of waiting
    for the idle timeout; the timed span includes the TCP handshake.
    """
    sent_at = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
    try:
        conn.request("POST", GENERATE_PATH, body, {**JSON_HEADERS, "Connection": "close"})
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return _reply(response, data, sent_at, time.perf_counter())


def check_ok(reply: Reply) -> None:
    if not reply.ok:
        error = reply.body.get("error", {})
        raise RuntimeError(f"worker answered {reply.status} {error.get('type')}: {error.get('message')}")


# ==================================================================================================
# The worker as a subprocess
# ==================================================================================================


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_env() -> dict[str, str]:
    # Flags below must decide everything: a developer's OV_GENAI_NPU_* must not leak in.
    return {name: value for name, value in os.environ.items() if not name.startswith("OV_GENAI_NPU_")}


def worker_common_args(config: RunConfig, cache_dir: Path) -> list[str]:
    lock_file = config.lock_file or config.workdir / "npu.lock"
    return [
        "--model", str(config.model),
        "--device", config.device,
        "--lock-file", str(lock_file),
        "--cache-dir", str(cache_dir),
        "--max-prompt-tokens", str(config.max_prompt_tokens),
        *(["--no-npu-proof"] if config.no_npu_proof else []),
        *(["--emulate-npu"] if config.emulate_npu else []),
        # The baseline generates every token it is asked for; so must the worker, for the overhead
        # to be the worker's own (what the stop rules cost and save: bench/stopwatch.py, tokens.py).
        "--no-stop-rules",
    ]


class Daemon:
    """``python worker.py`` serving on a free loopback port; its log goes to a file.

    A file, not a pipe: nobody reads a pipe while the bench runs, and a full pipe would block the
    worker's logging and show up as latency.
    """

    def __init__(self, config: RunConfig, name: str, extra_args: Sequence[str] = (),
                 cache_dir: Path | None = None, command: Sequence[str] | None = None) -> None:
        self.name = name
        self.on_exit: Callable[[Daemon], None] | None = None
        self.port = free_port()
        self.log_path = config.workdir / f"{name}.log"
        cache = cache_dir or config.cache_dir or config.workdir / f"cache-{name}"
        argv = list(command or [sys.executable, str(WORKER_PY)])
        argv += worker_common_args(config, cache) + ["--port", str(self.port), *extra_args]
        self.argv = argv
        with open(self.log_path, "ab") as log:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                argv, cwd=REPO, env=worker_env(), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Poll /healthz until 200; returns seconds from process start.  Fails fast if it exits."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited with {self.process.returncode}: {self.log_tail()}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5.0)
                conn.request("GET", "/healthz")
                response = conn.getresponse()
                response.read()  # closing with the body unread would reset the connection
                status = response.status
                conn.close()
                if status == 200:
                    return time.perf_counter() - self.started_at
            except OSError:
                pass  # not listening yet
            time.sleep(READY_POLL_S)
        raise RuntimeError(f"worker {self.name} not ready within {timeout_s:g} s: {self.log_tail()}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_summary(self) -> dict[str, Any]:
        """What the worker's own log says: answers by status and error, and its ERROR lines.

        When a client sees an error (a reset, a 5xx), this is the worker's side of the story.
        The log holds ids, counts and timings only, never text, so it can go into results.
        """
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        answers: Counter[str] = Counter()
        errors: list[str] = []
        for line in lines:
            fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
            if "status" in fields:
                answers[f"{fields.get('path', '-')} {fields['status']} {fields.get('error', '')}".strip()] += 1
            if " ERROR " in f" {line} " or " WARNING " in f" {line} ":
                errors.append(line.split(" ", 2)[-1] if line[:2].isdigit() else line)
        return {"answers": dict(sorted(answers.items())), "error_lines": errors[:20], "error_line_count": len(errors)}

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self.on_exit is not None:
            self.on_exit(self)


@dataclasses.dataclass(frozen=True)
class ProcStats:
    rss_kb: int
    threads: int
    fds: int


def proc_stats(pid: int) -> ProcStats:
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return ProcStats(
        rss_kb=int(fields["VmRSS"].split()[0]),
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
    )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all threads (/proc/PID/stat, clock-tick resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": field 3 onwards
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def wait_for_threads(pid: int, at_most: int | None, timeout_s: float = 5.0) -> ProcStats:
    """Wait until connection threads have exited: at most ``at_most`` threads, or a stable count.

    A connection thread ends a moment after the client closes, so an immediate reading would
    count it.
    """
    deadline = time.perf_counter() + timeout_s
    previous = proc_stats(pid)
    while time.perf_counter() < deadline:
        time.sleep(0.05)
        current = proc_stats(pid)
        if at_most is not None and current.threads <= at_most:
            return current
        if at_most is None and current.threads == previous.threads:
            return current
        previous = current
    return proc_stats(pid)


def read_busy_us() -> int | None:
    """The NPU busy-time counter (Linux >= 6.11, intel_vpu), or None where there is none."""
    for path in sorted(Path("/sys/class/accel").glob("accel*/device/npu_busy_time_us")):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None
    return None


def cli_has_batch() -> bool:
    """Whether this worker.py has the --batch mode (rows that need it are skipped without it)."""
    result = subprocess.run([sys.executable, str(WORKER_PY), "--help"], cwd=REPO, env=worker_env(),
                            check=False, capture_output=True, text=True, timeout=60)
    return "--batch" in result.stdout


class BatchProcess:
    """``python worker.py --batch -``: one model load, then one JSON line in, one result line out.

    The worker reads stdin line by line and flushes each result, so jobs can be fed one at a time
    and this mode interleaves with the others per iteration like the HTTP modes.
    """

    def __init__(self, config: RunConfig, name: str) -> None:
        self.log_path = config.workdir / f"{name}.log"
        argv = [sys.executable, str(WORKER_PY), "--batch", "-"]
        argv += worker_common_args(config, config.cache_dir or config.workdir / f"cache-{name}")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(argv, cwd=REPO, env=worker_env(), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log)

    def run(self, line: bytes) -> tuple[dict[str, Any], float]:
        """(result, milliseconds from writing the job to reading its result line)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        started = time.perf_counter()
        self.process.stdin.write(line)
        self.process.stdin.flush()
        out = self.process.stdout.readline()
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if not out:
            tail = " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
            raise RuntimeError(f"worker.py --batch ended early (exit {self.process.poll()}): {tail}")
        return json.loads(out), elapsed_ms

    def close(self) -> int:
        if self.process.stdin is not None:
            self.process.stdin.close()  # end of input: the worker finishes and exits
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# ==================================================================================================
# The direct baseline: the same model and prompt, LLMPipeline.generate in this process
# ==================================================================================================


class DirectPipeline:
    """What a caller would get with no worker at all: ``generate([prompt], config)``, timed alone."""

    def __init__(self, config: RunConfig) -> None:
        import openvino_genai  # lazily: 0.2-0.5 s that --help and startup must not pay

        self._genai = openvino_genai
        # What worker.py passes, so that both compile the same model (on the CPU: the stateful
        # pipeline class the NPU uses; on the NPU or emulated NPU: MAX_PROMPT_LEN and friends).
        settings = worker.Settings(
            model_path=config.model, device=config.device, emulate_npu=config.emulate_npu,
            cache_dir=config.cache_dir if config.device == "NPU" else None,
            limits=worker.Limits(max_prompt_tokens=config.max_prompt_tokens),
        )
        properties = worker.pipeline_properties(settings)
        started = time.perf_counter()
        self.pipeline = openvino_genai.LLMPipeline(str(config.model), config.device, **properties)
        self.load_s = time.perf_counter() - started
        self.tokenizer = self.pipeline.get_tokenizer()
        self._configs: dict[int, Any] = {}

    def prompt(self, job: str, text: str) -> str:
        return self.tokenizer.apply_chat_template(
            worker.job_messages(worker.JOBS[job], text), add_generation_prompt=True
        )

    def count_tokens(self, prompt: str) -> int:
        return int(self.tokenizer.encode(prompt, add_special_tokens=False).input_ids.get_shape()[-1])

    def generate(self, prompt: str, max_new_tokens: int) -> tuple[float, int]:
        """(milliseconds, generated tokens) of one generate call on an already templated prompt."""
        config = self._configs.get(max_new_tokens)
        if config is None:
            config = self._genai.GenerationConfig(
                max_new_tokens=max_new_tokens, do_sample=False, apply_chat_template=False
            )
            self._configs[max_new_tokens] = config
        started = time.perf_counter()
        results = self.pipeline.generate([prompt], config)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return elapsed_ms, int(results.perf_metrics.get_num_generated_tokens())


class Bench:
    """Shared state of one run: settings, the work directory, the baseline (loaded once)."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.plan = config.plan
        self._direct: DirectPipeline | None = None
        self.daemon_logs: dict[str, Any] = {}  # per daemon of the current section

    @property
    def direct(self) -> DirectPipeline:
        if self._direct is None:
            self._direct = DirectPipeline(self.config)
        return self._direct

    def daemon(self, name: str, *extra_args: str) -> Daemon:
        daemon = Daemon(self.config, name, extra_args)
        daemon.on_exit = lambda d: self.daemon_logs.__setitem__(d.name, d.log_summary())
        return daemon


def rotated(items: Sequence[str], shift: int) -> list[str]:
    """Two modes in alternating order: each follows the other and itself equally often."""
    shift %= len(items)
    return list(items[shift:]) + list(items[:shift])


def shuffled(items: Sequence[str], rng: random.Random) -> list[str]:
    """Three or more modes in a fresh order per round.

    Rotating a fixed order would keep the cycle (A always right after D): whatever one mode
    leaves behind (warm caches, a process still spinning down) would always land on the same
    other mode.  A seeded shuffle balances that and keeps runs repeatable.
    """
    order = list(items)
    rng.shuffle(order)
    return order


# ==================================================================================================
# overhead
# ==================================================================================================

HTTP_MODES = ("http_keepalive", "http_new_connection")
WORKER_MODES = (*HTTP_MODES, "cli_batch")


def bench_overhead(bench: Bench) -> dict[str, Any]:
    text = make_text(OVERHEAD_INPUT_CHARS)
    batch = cli_has_batch()
    out: dict[str, Any] = {"job": JOB, "input_chars": len(text), "runs": {}}
    if not batch:
        out["cli_batch_note"] = "cli_batch skipped: this worker.py has no --batch mode (not in --help)"
    with bench.daemon("overhead") as daemon:
        for max_new_tokens in bench.plan.overhead_tokens:
            out["runs"][str(max_new_tokens)] = overhead_run(bench, daemon, text, max_new_tokens, batch)
    return out


def overhead_run(bench: Bench, daemon: Daemon, text: str, max_new_tokens: int, batch: bool) -> dict[str, Any]:
    """One job, every mode, round-robin; returns latency per mode and overhead against direct.

    For the worker modes, "server" is the worker's own account, timing_ms.total - generate: from
    the start of the job (after HTTP parsing) to the built result, minus the pipeline call.  The
    latency difference to direct also holds HTTP, JSON and transport on both ends.
    """
    plan = bench.plan
    direct = bench.direct
    prompt = direct.prompt(JOB, text)
    prompt_tokens = direct.count_tokens(prompt)
    body = encode_job(JOB, text, max_new_tokens)
    client = Client(daemon.port)
    client.connect()
    batch_process = BatchProcess(bench.config, f"batch-{max_new_tokens}") if batch else None
    modes = [*HTTP_MODES, *(["cli_batch"] if batch else []), "direct"]
    latency: dict[str, list[float]] = {mode: [] for mode in modes}
    server_overhead: dict[str, list[float]] = {mode: [] for mode in WORKER_MODES}
    server_generate: dict[str, list[float]] = {mode: [] for mode in WORKER_MODES}
    outside: dict[str, list[float]] = {mode: [] for mode in WORKER_MODES}
    mismatches: Counter[str] = Counter()
    # On the NPU, every generation - the worker's and the baseline's - must move the busy counter.
    busy_deltas: dict[str, list[int]] = {mode: [] for mode in modes}
    on_npu = bench.config.device == "NPU" and not bench.config.emulate_npu  # no counter when emulated

    def run(mode: str, record: bool) -> None:
        if mode == "direct":
            before_us = read_busy_us() if on_npu else None
            elapsed_ms, _generated = direct.generate(prompt, max_new_tokens)
            after_us = read_busy_us() if on_npu else None
            if record:
                latency[mode].append(elapsed_ms)
                if before_us is not None and after_us is not None:
                    busy_deltas[mode].append(after_us - before_us)
            return
        if mode == "cli_batch":
            assert batch_process is not None
            result, elapsed_ms = batch_process.run(body + b"\n")
            if "error" in result:
                raise RuntimeError(f"worker.py --batch answered {result['error']}")
        else:
            reply = client.post(body) if mode == "http_keepalive" else post_new_connection(daemon.port, body)
            check_ok(reply)
            result, elapsed_ms = reply.body, reply.elapsed_ms
        if record:
            if result["tokens"]["prompt"] != prompt_tokens:
                mismatches[f"{mode}_prompt_tokens"] += 1  # then the baseline would not be the same work
            if result.get("npu_busy_delta_us") is not None:
                busy_deltas[mode].append(int(result["npu_busy_delta_us"]))
            latency[mode].append(elapsed_ms)
            server_overhead[mode].append(float(result["timing_ms"]["total"]) - float(result["timing_ms"]["generate"]))
            server_generate[mode].append(float(result["timing_ms"]["generate"]))
            outside[mode].append(elapsed_ms - float(result["timing_ms"]["total"]))

    rng = random.Random(max_new_tokens)
    try:
        for _ in range(plan.overhead_warmup):
            for mode in shuffled(modes, rng):
                run(mode, record=False)
        for _ in range(plan.overhead_iterations):
            for mode in shuffled(modes, rng):
                run(mode, record=True)
    finally:
        client.close()
        batch_exit = batch_process.close() if batch_process is not None else None

    direct_stats = summarize(latency["direct"])
    result: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "prompt_tokens": prompt_tokens,
        "direct": {"latency_ms": direct_stats},
    }
    for mode in modes:
        if mode == "direct":
            continue
        stats = summarize(latency[mode])
        result[mode] = {
            "latency_ms": stats,
            "overhead_ms": {
                "p50": difference(stats, direct_stats, "p50"),
                "p95": difference(stats, direct_stats, "p95"),
            },
            "server_overhead_ms": summarize(server_overhead[mode]),
            "server_generate_ms": summarize(server_generate[mode]),
            # Per request: the client's latency minus the worker's timing_ms.total, i.e. request
            # parsing, response encoding and sending, logging, transport and the client itself.
            "outside_total_ms": summarize(outside[mode]),
            "generate_minus_direct_ms": {"p50": difference(summarize(server_generate[mode]), direct_stats, "p50")},
        }
    if batch_exit is not None:
        result["cli_batch"]["exit_code"] = batch_exit
    for mode, deltas in busy_deltas.items():
        if deltas:
            result[mode]["npu_busy_delta_us"] = {**summarize(deltas), "zero": sum(1 for d in deltas if d <= 0)}
    result["mismatches"] = dict(mismatches)
    return result


# ==================================================================================================
# concurrency
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Record:
    client: int
    reply: Reply

    # Server-side instants, reconstructed on the client's clock (perf_counter and the worker's
    # monotonic clock are not shared, only durations are).  ``received_at - total`` is when the
    # worker began the job (before rendering, token count and queue), late by the response's
    # transfer time; queue and generate follow.
    @property
    def began_at(self) -> float:
        return self.reply.received_at - self.reply.timing("total") / 1000.0

    @property
    def started_at(self) -> float:
        return self.began_at + self.reply.timing("queue") / 1000.0

    @property
    def ended_at(self) -> float:
        return self.started_at + self.reply.timing("generate") / 1000.0


def bench_concurrency(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    text = make_text(OVERHEAD_INPUT_CHARS)
    depth = max(max(plan.concurrency_clients), FIFO_FOLLOWERS + 1)
    out: dict[str, Any] = {"job": JOB, "queue_depth": depth, "levels": []}
    with bench.daemon("concurrency", "--queue-depth", str(depth)) as daemon:
        for max_new_tokens in plan.concurrency_tokens:
            body = encode_job(JOB, text, max_new_tokens)
            warm = Client(daemon.port)
            for _ in range(10):
                check_ok(warm.post(body))
                bench.direct.generate(bench.direct.prompt(JOB, text), max_new_tokens)
            warm.close()
            for clients in plan.concurrency_clients:
                level = concurrent_level(bench, daemon, clients, body, text, max_new_tokens)
                out["levels"].append(level)
        out["fifo"] = fifo_check(daemon.port, text, plan.fifo_rounds, gated=True)
        if plan.fifo_arrival:
            out["fifo_arrival"] = fifo_check(daemon.port, text, plan.fifo_rounds, gated=False,
                                             spacing_s=FIFO_ARRIVAL_SPACING_S)
    with bench.daemon("burst", "--queue-depth", str(BURST_QUEUE_DEPTH)) as daemon:
        out["burst"] = burst(daemon.port, text, plan.burst_rounds)
    return out


@dataclasses.dataclass
class Tally:
    """Wall and CPU time summed over the chunks of one level."""

    wall_s: float = 0.0
    own_cpu_s: float = 0.0
    daemon_cpu_s: float = 0.0


def concurrent_level(bench: Bench, daemon: Daemon, clients: int, body: bytes, text: str,
                     max_new_tokens: int) -> dict[str, Any]:
    """``clients`` keep-alive connections against direct sequential generation of as many jobs.

    The level runs in chunks that alternate worker and direct (in a rotating order), so that a
    slow minute of the machine hits both sides instead of one.  CPU time per request of the
    daemon and of this process (the clients) is recorded too: where inference uses every core,
    CPU spent anywhere else slows the generation.
    """
    plan = bench.plan
    direct = bench.direct
    prompt = direct.prompt(JOB, text)
    chunks = plan.concurrency_chunks
    per_chunk = plan.concurrency_requests // chunks
    worker_tally, direct_tally = Tally(), Tally()
    records: list[Record] = []
    exceptions: list[str] = []
    for chunk in range(chunks):
        for side in rotated(("worker", "direct"), chunk):
            own_before, daemon_before = own_cpu_s(), process_cpu_s(daemon.pid)
            if side == "direct":
                started = time.perf_counter()
                for _ in range(per_chunk):
                    direct.generate(prompt, max_new_tokens)
                tally = direct_tally
                tally.wall_s += time.perf_counter() - started
            else:
                chunk_records, chunk_exceptions, wall_s = run_clients(daemon.port, clients, per_chunk // clients, body)
                records += chunk_records
                exceptions += chunk_exceptions
                tally = worker_tally
                tally.wall_s += wall_s
            tally.own_cpu_s += own_cpu_s() - own_before
            tally.daemon_cpu_s += process_cpu_s(daemon.pid) - daemon_before

    ok = [record for record in records if record.reply.ok]
    statuses = Counter(record.reply.status for record in records)
    direct_requests = per_chunk * chunks
    rps = len(ok) / worker_tally.wall_s
    direct_rps = direct_requests / direct_tally.wall_s
    return {
        "clients": clients,
        "max_new_tokens": max_new_tokens,
        "requests": len(records) + len(exceptions),
        "chunks": chunks,
        "ok": len(ok),
        "errors": len(records) - len(ok) + len(exceptions),
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "exceptions": dict(Counter(exceptions)),
        "wall_s": round(worker_tally.wall_s, 3),
        "rps": round(rps, 2),
        "direct_rps": round(direct_rps, 2),
        "throughput_ratio": round(rps / direct_rps, 4),
        "latency_ms": summarize([r.reply.elapsed_ms for r in ok]),
        "queue_ms": summarize([r.reply.timing("queue") for r in ok]),
        "server_generate_ms": summarize([r.reply.timing("generate") for r in ok]),
        "server_overhead_ms": summarize([r.reply.server_overhead_ms for r in ok]),
        "daemon_cpu_ms_per_request": round(worker_tally.daemon_cpu_s * 1000 / max(1, len(ok)), 3),
        "client_cpu_ms_per_request": round(worker_tally.own_cpu_s * 1000 / max(1, len(ok)), 3),
        "direct_cpu_ms_per_request": round(direct_tally.own_cpu_s * 1000 / direct_requests, 3),
        "order": order_checks(ok),
    }


def run_clients(port: int, clients: int, per_client: int, body: bytes) -> tuple[list[Record], list[str], float]:
    """Threads with one keep-alive connection each, started together; (records, exceptions, wall)."""
    records: list[Record] = []
    exceptions: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        client = Client(port)
        client.connect()
        barrier.wait()
        mine: list[Record] = []
        for number in range(per_client):
            try:
                mine.append(Record(index, client.post(body)))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                # Which request of the connection failed tells accept-time trouble (the first)
                # from trouble on a connection in use (a later one).
                with lock:
                    exceptions.append(f"{type(exc).__name__} on request {number + 1} of its connection")
        client.close()
        with lock:
            records.extend(mine)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    return records, exceptions, time.perf_counter() - started


def order_checks(records: Sequence[Record]) -> dict[str, Any]:
    """What the replies show about serialisation and FIFO order under free-running load.

    overlaps: consecutive generations whose reconstructed windows overlap by more than the
    tolerance (the pipeline must run one job at a time).  inversions: pairs where one job began
    more than the tolerance before another but started generating after it - reordered by the
    queue or on the way to it (rendering and token count run first, in each request's thread).
    Both are estimates from client-side clocks; fifo_check below is the exact queue test.
    """
    tolerance_s = ORDER_TOLERANCE_MS / 1000.0
    windows = sorted((r.began_at, r.started_at, r.ended_at) for r in records)  # by began_at
    by_start = sorted(windows, key=lambda w: w[1])
    overlaps = sum(1 for before, after in itertools.pairwise(by_start) if after[1] < before[2] - tolerance_s)
    inversions = 0
    for i, (early_began, early_started, _) in enumerate(windows):
        for late_began, late_started, _ in windows[i + 1:]:
            if late_began - early_began > tolerance_s and late_started < early_started - tolerance_s:
                inversions += 1
    return {"overlaps": overlaps, "inversions": inversions, "tolerance_ms": ORDER_TOLERANCE_MS}


def fifo_check(port: int, text: str, rounds: int, gated: bool, spacing_s: float = 0.0) -> dict[str, Any]:
    """Ordered bursts: a long head job, then followers sent one by one; does start order match?

    The queue's entry order is internal to the worker, and a request reaches the queue only after
    validation, rendering and the token count, which run in its own thread.  gated=True makes
    the entry order known: each follower is sent only once /healthz shows the previous one
    waiting in the queue (``queue_waiting``), so entry order = send order, and any start-order
    inversion is the queue's.  gated=False sends followers ``spacing_s`` apart without looking:
    it shows whether arrival order survives the way to the queue (informational).

    Starts are reconstructed from each reply (arrival - total + queue); consecutive starts are a
    whole generation apart, so the reconstruction error cannot reorder them.
    """
    head_body = encode_job(JOB, text, FIFO_HEAD_TOKENS)
    body = encode_job(JOB, text, FIFO_FOLLOWER_TOKENS)
    kept = inversions = controlled = 0
    statuses: Counter[int] = Counter()
    queue_waits: list[list[float]] = []
    monitor = Client(port)
    for _ in range(rounds):
        head = Client(port)
        followers = [Client(port) for _ in range(FIFO_FOLLOWERS)]
        for client in (head, *followers):
            client.connect()
        replies: list[Reply | None] = [None] * FIFO_FOLLOWERS
        go = [threading.Event() for _ in followers]

        def follow(index: int, go: list[threading.Event] = go, followers: list[Client] = followers,
                   replies: list[Reply | None] = replies) -> None:
            go[index].wait()
            replies[index] = followers[index].post(body)

        threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(FIFO_FOLLOWERS)]
        head_thread = threading.Thread(target=lambda head=head: statuses.update([head.post(head_body).status]),
                                       daemon=True)
        for thread in threads:
            thread.start()
        head_thread.start()
        in_control = not gated or wait_for_health(
            monitor, lambda h: h["jobs_in_flight"] >= 1 and h["queue_waiting"] == 0)
        for index, event in enumerate(go):
            event.set()
            if gated:
                # Waiting in the queue: followers 0..index, while the head still runs.
                in_control = in_control and wait_for_health(
                    monitor, lambda h, index=index: h["queue_waiting"] >= index + 1)
            else:
                time.sleep(spacing_s)
        for thread in (*threads, head_thread):
            thread.join()
        for client in (head, *followers):
            client.close()
        done = [reply for reply in replies if reply is not None]
        statuses.update(reply.status for reply in done)
        if len(done) != FIFO_FOLLOWERS or not all(reply.ok for reply in done):
            continue
        if not in_control:
            continue  # the head ended before every follower was seen waiting: order not known
        controlled += 1
        records = [Record(i, reply) for i, reply in enumerate(done)]
        start_order = [record.client for record in sorted(records, key=lambda r: r.started_at)]
        round_inversions = sum(1 for a, b in itertools.pairwise(start_order) if b < a)
        inversions += round_inversions
        kept += round_inversions == 0
        queue_waits.append([round(reply.timing("queue"), 2) for reply in done])
    monitor.close()
    return {
        "gated": gated,
        "rounds": rounds,
        "rounds_entry_order_confirmed": controlled if gated else None,
        "followers": FIFO_FOLLOWERS,
        "spacing_ms": None if gated else round(spacing_s * 1000, 3),
        "head_tokens": FIFO_HEAD_TOKENS,
        "follower_tokens": FIFO_FOLLOWER_TOKENS,
        "rounds_in_order": kept,  # of the confirmed rounds when gated
        "inversions": inversions,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "queue_ms_first_round": queue_waits[0] if queue_waits else [],
    }


def wait_for_health(monitor: Client, condition: Callable[[dict[str, Any]], bool], timeout_s: float = 5.0) -> bool:
    """Poll /healthz until condition(body) holds; False after timeout_s."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        if condition(monitor.get("/healthz").body):
            return True
        time.sleep(0.0005)
    return False


def burst(port: int, text: str, rounds: int) -> dict[str, Any]:
    """BURST_CLIENTS requests at once against --queue-depth BURST_QUEUE_DEPTH: the excess is 503."""
    body = encode_job(JOB, text, BURST_TOKENS)
    clients = [Client(port) for _ in range(BURST_CLIENTS)]
    for client in clients:
        client.connect()
    replies: list[Reply] = []
    exceptions: list[str] = []
    lock = threading.Lock()
    for _ in range(rounds):
        barrier = threading.Barrier(BURST_CLIENTS)

        def shoot(client: Client, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                reply = client.post(body)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                with lock:
                    exceptions.append(type(exc).__name__)
                return
            with lock:
                replies.append(reply)

        threads = [threading.Thread(target=shoot, args=(client,), daemon=True) for client in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for client in clients:
        client.close()
    busy = [reply for reply in replies if reply.status == 503]
    with_retry_after = [reply for reply in busy if reply.headers.get("retry-after", "").isdigit()]
    return {
        "clients": BURST_CLIENTS,
        "queue_depth": BURST_QUEUE_DEPTH,
        "max_new_tokens": BURST_TOKENS,
        "rounds": rounds,
        "requests": rounds * BURST_CLIENTS,
        "ok": sum(reply.ok for reply in replies),
        "busy_503": len(busy),
        "busy_rate": round(len(busy) / max(1, rounds * BURST_CLIENTS), 4),
        "busy_with_retry_after": len(with_retry_after),
        "busy_error_types": dict(Counter(reply.body.get("error", {}).get("type") for reply in busy)),
        "retry_after_values": sorted({reply.headers.get("retry-after") for reply in busy} - {None}),
        "other_statuses": dict(Counter(str(r.status) for r in replies if r.status not in (200, 503))),
        "exceptions": dict(Counter(exceptions)),
    }


# ==================================================================================================
# scaling
# ==================================================================================================


def bench_scaling(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    direct = bench.direct
    max_new_tokens = plan.scaling_tokens
    cases: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for chars in plan.scaling_sizes:
        text = make_text(chars)
        prompt = direct.prompt(JOB, text)
        cases.append({"chars": chars, "text": text, "prompt": prompt, "prompt_tokens": direct.count_tokens(prompt),
                      "input_tokens": direct.count_tokens(text)})
    needed = max(case["prompt_tokens"] for case in cases)
    max_prompt_tokens = bench.config.max_prompt_tokens
    if bench.config.device == "CPU":
        # The CPU has no compiled prompt limit: raise the worker's to fit the largest input, so
        # that every size runs the same path.  On the NPU a larger limit means a recompile, so
        # sizes that do not fit are skipped there instead.
        max_prompt_tokens = max(max_prompt_tokens, needed)
    else:
        skipped = [{"chars": c["chars"], "prompt_tokens": c["prompt_tokens"]}
                   for c in cases if c["prompt_tokens"] > max_prompt_tokens]
        cases = [case for case in cases if case["prompt_tokens"] <= max_prompt_tokens]
    latency: dict[tuple[int, str], list[float]] = {}
    server_overhead: dict[int, list[float]] = {case["chars"]: [] for case in cases}
    server_generate: dict[int, list[float]] = {case["chars"]: [] for case in cases}
    bodies = {case["chars"]: encode_job(JOB, case["text"], max_new_tokens) for case in cases}
    with bench.daemon("scaling", "--max-prompt-tokens", str(max_prompt_tokens)) as daemon:
        client = Client(daemon.port)
        client.connect()

        def run(case: dict[str, Any], mode: str, record: bool) -> None:
            if mode == "direct":
                elapsed_ms, _ = direct.generate(case["prompt"], max_new_tokens)
            else:
                reply = client.post(bodies[case["chars"]])
                check_ok(reply)
                if reply.body["tokens"]["prompt"] != case["prompt_tokens"]:
                    raise RuntimeError("worker and baseline prompts differ in token count")
                elapsed_ms = reply.elapsed_ms
                if record:
                    server_overhead[case["chars"]].append(reply.server_overhead_ms)
                    server_generate[case["chars"]].append(reply.timing("generate"))
            if record:
                latency.setdefault((case["chars"], mode), []).append(elapsed_ms)

        for i in range(max(3, plan.scaling_iterations // 10)):  # warm-up
            for case in cases:
                for mode in rotated(("http_keepalive", "direct"), i):
                    run(case, mode, record=False)
        # Sizes and modes interleaved in every iteration: drift hits each cell alike.
        for i in range(plan.scaling_iterations):
            for case in cases:
                for mode in rotated(("http_keepalive", "direct"), i):
                    run(case, mode, record=True)
        client.close()
    rows = []
    for case in cases:
        http_stats = summarize(latency[(case["chars"], "http_keepalive")])
        direct_stats = summarize(latency[(case["chars"], "direct")])
        rows.append({
            "chars": case["chars"],
            "prompt_tokens": case["prompt_tokens"],
            "input_tokens": case["input_tokens"],
            "chars_per_input_token": round(case["chars"] / case["input_tokens"], 2),
            "direct_ms": direct_stats,
            "http_keepalive_ms": http_stats,
            "overhead_ms": {"p50": difference(http_stats, direct_stats, "p50"),
                            "p95": difference(http_stats, direct_stats, "p95")},
            "server_overhead_ms": summarize(server_overhead[case["chars"]]),
            "server_generate_ms": summarize(server_generate[case["chars"]]),
        })
    # Flatness is judged on the worker's own account (total - generate): the client-side
    # difference of two noisy latencies swings by more than the effect at large prompts.
    spread = server_spread = None
    if len(rows) >= 2:
        spread = difference(rows[-1]["overhead_ms"], rows[0]["overhead_ms"], "p50")
        server_spread = difference(rows[-1]["server_overhead_ms"], rows[0]["server_overhead_ms"], "p50")
    return {
        "job": JOB,
        "max_new_tokens": max_new_tokens,
        "daemon_max_prompt_tokens": max_prompt_tokens,
        "sizes": rows,
        "skipped": skipped,
        "overhead_p50_spread_ms": spread,
        "server_overhead_p50_spread_ms": server_spread,
    }


# ==================================================================================================
# soak
# ==================================================================================================


def bench_soak(bench: Bench) -> dict[str, Any]:
    """Keep-alive requests rotating over all four jobs (each has its own clean-up code path)."""
    plan = bench.plan
    text = make_text(OVERHEAD_INPUT_CHARS)
    bodies = [encode_job(job, text, tokens) for job, tokens in SOAK_JOBS]
    with bench.daemon("soak") as daemon:
        # Warm-up on its own connection: first-call allocations (XGrammar, caches, allocator
        # arenas) happen before the baseline reading, and that connection's thread is gone by then.
        warm = Client(daemon.port)
        for i in range(plan.soak_warmup):
            warm.post(bodies[i % len(bodies)])
        warm.close()
        before = wait_for_threads(daemon.pid, at_most=None)
        client = Client(daemon.port)
        statuses: Counter[str] = Counter()
        samples: list[dict[str, int]] = []
        every = max(1, plan.soak_requests // 10)
        started = time.perf_counter()
        for i in range(plan.soak_requests):
            reply = client.post(bodies[i % len(bodies)])
            key = str(reply.status) if reply.ok else f"{reply.status} {reply.body.get('error', {}).get('type')}"
            statuses[key] += 1
            if (i + 1) % every == 0:
                stats = proc_stats(daemon.pid)
                samples.append({"requests": i + 1, "rss_kb": stats.rss_kb, "threads": stats.threads, "fds": stats.fds})
        elapsed_s = time.perf_counter() - started
        client.close()
        after = wait_for_threads(daemon.pid, at_most=before.threads)
    return {
        "requests": plan.soak_requests,
        "jobs": [job for job, _ in SOAK_JOBS],
        "elapsed_s": round(elapsed_s, 2),
        "rps": round(plan.soak_requests / elapsed_s, 1),
        "statuses": dict(sorted(statuses.items())),
        "start": dataclasses.asdict(before),
        "end": dataclasses.asdict(after),
        "rss_growth_kb": after.rss_kb - before.rss_kb,
        "threads_delta": after.threads - before.threads,
        "fds_delta": after.fds - before.fds,
        "samples": samples,
    }


# ==================================================================================================
# startup
# ==================================================================================================


def timed_run(argv: Sequence[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=60, check=True)
    return time.perf_counter() - started


def bench_startup(bench: Bench) -> dict[str, Any]:
    plan = bench.plan
    config = bench.config
    help_argv = [sys.executable, str(WORKER_PY), "--help"]
    floor_argv = [sys.executable, "-c", "pass"]
    timed_run(help_argv)  # page cache and .pyc, as on any second call
    help_ms = [timed_run(help_argv) * 1000 for _ in range(plan.help_runs)]
    floor_ms = [timed_run(floor_argv) * 1000 for _ in range(plan.help_runs)]

    def time_to_ready(cache_dir: Path, name: str) -> float:
        daemon = Daemon(config, name, cache_dir=cache_dir)
        try:
            return daemon.wait_ready()
        finally:
            daemon.stop()

    cold_s = []
    for i in range(plan.healthz_runs):
        cold_s.append(time_to_ready(config.workdir / f"startup-empty-{i}", f"startup-empty-{i}"))
    warm_dir = config.workdir / "startup-empty-0"  # filled by the first empty-cache start
    warm_s = [time_to_ready(warm_dir, f"startup-warm-{i}") for i in range(plan.healthz_runs)]
    cache_bytes = sum(path.stat().st_size for path in warm_dir.rglob("*") if path.is_file())
    return {
        "help_ms": summarize(help_ms),
        "python_floor_ms": summarize(floor_ms),
        "healthz_empty_cache_s": summarize(cold_s),
        "healthz_warm_cache_s": summarize(warm_s),
        "cache_bytes": cache_bytes,
    }


# ==================================================================================================
# profile (not part of all)
# ==================================================================================================


def bench_profile(bench: Bench) -> dict[str, Any]:
    """Profile the daemon under keep-alive load, then time its per-request steps one by one.

    Part one runs worker.py unchanged under bench/profile_worker.py (every thread profiled) and
    writes the reports to bench/profile/.  Part two times, in this process and with the
    openvino_genai API alone, the steps the worker adds around generate(): rendering the chat
    template, the exact token count (an encode, which generate() would repeat if handed the
    string: hence the generate(tokenized) variant) and the per-token streamer that lets a
    generation be cancelled.
    """
    plan = bench.plan
    out_dir = BENCH_DIR / "profile"
    text = make_text(OVERHEAD_INPUT_CHARS)
    body = encode_job(JOB, text, 16)
    reports: dict[str, Any] = {}
    # One client shows the cost of a request; 16 show what queueing adds (thread wake-ups, locks).
    runs = [("pyinstrument", 1), ("cprofile", 1), ("cprofile", 16)]
    if importlib.util.find_spec("pyinstrument") is None:
        runs = runs[1:]  # pip install pyinstrument for the sampling profile
    for profiler, clients in runs:
        name = f"{profiler}-{clients}-client{'s' if clients > 1 else ''}"
        command = [sys.executable, str(PROFILE_WORKER_PY), "--profiler", profiler, "--out", str(out_dir / name), "--"]
        daemon = Daemon(bench.config, f"profile-{name}",
                        ["--queue-depth", str(max(clients, worker.DEFAULT_QUEUE_DEPTH))], command=command)
        with daemon:
            records, exceptions, wall_s = run_clients(daemon.port, clients, plan.profile_requests // clients, body)
            time.sleep(0.2)  # the connection threads end and file their profiles
        report = out_dir / name / f"{profiler}.txt"
        ok = [record for record in records if record.reply.ok]
        reports[name] = {
            "exit_code": daemon.process.returncode,
            "clients": clients,
            "requests": len(records),
            "errors": len(records) - len(ok) + len(exceptions),
            "rps_under_profiler": round(len(ok) / wall_s, 1),
            "latency_ms_under_profiler": summarize([record.reply.elapsed_ms for record in ok]),
            "report": str(report.relative_to(REPO)) if report.exists() else None,
        }
    return {"profilers": reports, "steps": step_costs(bench, text)}


def step_costs(bench: Bench, text: str) -> dict[str, Any]:
    """Interleaved A/B timings of what the worker does around generate(), via openvino_genai."""
    direct = bench.direct
    genai = direct._genai
    tokenizer = direct.tokenizer
    messages = worker.job_messages(worker.JOBS[JOB], text)
    prompt = direct.prompt(JOB, text)
    encoded = tokenizer.encode(prompt, add_special_tokens=False)

    class NoOpStreamer(genai.StreamerBase):  # type: ignore[misc, name-defined]  # the worker's streamer shape
        def write(self, token: Any) -> Any:
            return genai.StreamingStatus.RUNNING

        def end(self) -> None:
            pass

    rounds = max(20, bench.plan.profile_requests // 10)
    out: dict[str, Any] = {"rounds": rounds}
    steps: dict[str, Callable[[], Any]] = {
        "apply_chat_template": lambda: tokenizer.apply_chat_template(messages, add_generation_prompt=True),
        "encode (the token count)": lambda: tokenizer.encode(prompt, add_special_tokens=False),
    }
    for name, step in steps.items():
        samples = []
        for _ in range(rounds):
            started = time.perf_counter()
            step()
            samples.append((time.perf_counter() - started) * 1000)
        out[name] = summarize(samples)
    for max_new_tokens in (16, 128):
        config = genai.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, apply_chat_template=False)
        variants: dict[str, Callable[[], Any]] = {
            "generate([prompt])": lambda config=config: direct.pipeline.generate([prompt], config),
            "generate([prompt], streamer)": (
                lambda config=config: direct.pipeline.generate([prompt], config, NoOpStreamer())),
            "generate(tokenized)": lambda config=config: direct.pipeline.generate(encoded, config),
        }
        samples_by: dict[str, list[float]] = {name: [] for name in variants}
        rng = random.Random(max_new_tokens)
        for _ in range(rounds):
            for name in shuffled(list(variants), rng):
                started = time.perf_counter()
                variants[name]()
                samples_by[name].append((time.perf_counter() - started) * 1000)
        out[f"{max_new_tokens} new tokens"] = {name: summarize(samples) for name, samples in samples_by.items()}
    return out


# ==================================================================================================
# Targets and report
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    limit: float
    unit: str
    higher_is_better: bool = False

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        ok = self.value >= self.limit if self.higher_is_better else self.value <= self.limit
        return "PASS" if ok else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "unit": self.unit,
                "comparison": ">=" if self.higher_is_better else "<=", "status": self.status}


def dig(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def targets(results: dict[str, Any]) -> list[Target]:
    found: list[Target] = []
    run16 = dig(results, "overhead", "runs", "16") or {}
    if "overhead" in results:
        found.append(Target("HTTP keep-alive overhead over direct generate, p50, 16 new tokens",
                            dig(run16, "http_keepalive", "overhead_ms", "p50"), 0.5, "ms"))
        found.append(Target("CLI batch per-job overhead (timing_ms.total - generate), p50, 16 new tokens",
                            dig(run16, "cli_batch", "server_overhead_ms", "p50"), 0.2, "ms"))
    if "concurrency" in results:
        levels = dig(results, "concurrency", "levels") or []
        at16 = [lv for lv in levels if lv["clients"] == 16 and lv["max_new_tokens"] == 16]
        found.append(Target("throughput at 16 clients / direct sequential (16 new tokens)",
                            at16[0]["throughput_ratio"] if at16 else None, 0.95, "ratio", higher_is_better=True))
        errors = sum(lv["errors"] for lv in levels) if levels else None
        found.append(Target("errors under 1/4/16 clients", errors, 0, "count"))
        fifo = dig(results, "concurrency", "fifo") or {}
        found.append(Target("FIFO: start-order inversions, queue entry order confirmed", fifo.get("inversions"), 0,
                            "count"))
        burst_result = dig(results, "concurrency", "burst") or {}
        missing = None
        if "busy_503" in burst_result:
            missing = burst_result["busy_503"] - burst_result["busy_with_retry_after"]
        found.append(Target("burst past the queue: 503 without Retry-After", missing, 0, "count"))
    if "scaling" in results:
        found.append(Target("scaling: worker's own time (total - generate) p50, largest input - 100 chars",
                            dig(results, "scaling", "server_overhead_p50_spread_ms"), 0.5, "ms"))
    if "soak" in results:
        soak = results["soak"]
        n = soak.get("requests")
        growth = soak.get("rss_growth_kb")
        found.append(Target(f"soak RSS growth over {n} requests",
                            None if growth is None else round(growth / 1024, 2), 5.0, "MB"))
        found.append(Target("soak threads back to baseline (end - start)", soak.get("threads_delta"), 0, "count"))
        found.append(Target("soak fds back to baseline (end - start)", soak.get("fds_delta"), 0, "count"))
    if "startup" in results:
        found.append(Target("worker.py --help wall time, median", dig(results, "startup", "help_ms", "p50"), 150.0,
                            "ms"))
    return found


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], cell: Callable[[Any], str] | None = None) -> str:
    """A Markdown table: readable on a terminal, pasteable into BENCHMARKS.md; ``cell`` formats
    one value (default: fmt)."""
    cells = [[(cell or fmt)(value) for value in row] for row in rows]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def render_overhead(data: dict[str, Any]) -> str:
    rows = []
    for tokens, run in data["runs"].items():
        for mode in ("direct", *WORKER_MODES):
            if mode not in run:
                continue
            entry = run[mode]
            latency = entry["latency_ms"]
            overhead = entry.get("overhead_ms", {})
            server = entry.get("server_overhead_ms", {})
            rows.append([tokens, mode, latency["n"], latency["p50"], latency["p95"], latency["p99"],
                         overhead.get("p50"), overhead.get("p95"), server.get("p50"), server.get("p95")])
    parts = []
    for tokens, run in data["runs"].items():
        for mode in WORKER_MODES:
            if mode in run:
                entry = run[mode]
                parts.append([tokens, mode, entry["overhead_ms"]["p50"], entry["generate_minus_direct_ms"]["p50"],
                              entry["server_overhead_ms"]["p50"], entry["outside_total_ms"]["p50"]])
    note = f"\n{data['cli_batch_note']}" if "cli_batch_note" in data else ""
    return (f"overhead: job {data['job']}, {data['input_chars']}-char input, modes interleaved per iteration; "
            "overhead = mode - direct; server = timing_ms.total - timing_ms.generate\n"
            + table(["new tokens", "mode", "n", "p50 ms", "p95 ms", "p99 ms", "overhead p50", "overhead p95",
                     "server p50", "server p95"], rows) + note
            + "\nwhere the p50 overhead goes (medians, so the parts add up only roughly)\n"
            + table(["new tokens", "mode", "overhead p50", "generate - direct", "total - generate",
                     "latency - total"], parts))


def render_concurrency(data: dict[str, Any]) -> str:
    rows = [[lv["max_new_tokens"], lv["clients"], lv["requests"], lv["rps"], lv["direct_rps"], lv["throughput_ratio"],
             lv["queue_ms"]["p50"], lv["queue_ms"]["p95"], lv["latency_ms"]["p50"], lv["server_generate_ms"]["p50"],
             lv["daemon_cpu_ms_per_request"], lv["client_cpu_ms_per_request"], lv["direct_cpu_ms_per_request"],
             lv["errors"], lv["order"]["overlaps"], lv["order"]["inversions"]] for lv in data["levels"]]
    fifo_lines = "".join(
        (f"\nFIFO (queue entry confirmed by /healthz before each send, {f['rounds_entry_order_confirmed']}/"
         f"{f['rounds']} rounds confirmed)" if f["gated"] else
         f"\narrival order (informational; sent {f['spacing_ms']:g} ms apart unconfirmed)")
        + f": {f['followers']} {f['follower_tokens']}-token jobs behind a {f['head_tokens']}-token job: "
          f"{f['rounds_in_order']}/{f['rounds']} rounds in order, {f['inversions']} inversions"
        for f in (data[key] for key in ("fifo", "fifo_arrival") if key in data)
    )
    b = data["burst"]
    return ("concurrency: keep-alive clients vs direct sequential generate\n"
            + table(["new tokens", "clients", "requests", "req/s", "direct req/s", "ratio", "queue p50 ms",
                     "queue p95 ms", "latency p50 ms", "generate p50 ms", "daemon CPU ms/req", "client CPU ms/req",
                     "direct CPU ms/req", "errors", "overlaps", "inversions"], rows)
            + fifo_lines
            + f"\nburst: {b['clients']} clients x {b['rounds']} rounds at --queue-depth {b['queue_depth']}: "
              f"{b['busy_503']}/{b['requests']} answered 503 ({b['busy_rate']:.1%}), "
              f"{b['busy_with_retry_after']} with Retry-After {b['retry_after_values']}, "
              f"types {b['busy_error_types']}, {b['ok']} ok, other {b['other_statuses']}, exceptions {b['exceptions']}")


def render_scaling(data: dict[str, Any]) -> str:
    rows = [[r["chars"], r["input_tokens"], r["prompt_tokens"], r["chars_per_input_token"], r["direct_ms"]["p50"],
             r["http_keepalive_ms"]["p50"], r["overhead_ms"]["p50"], r["overhead_ms"]["p95"],
             r["server_generate_ms"]["p50"], r["server_overhead_ms"]["p50"], r["server_overhead_ms"]["p95"]]
            for r in data["sizes"]]
    skipped = f"\nskipped (over --max-prompt-tokens): {data['skipped']}" if data["skipped"] else ""
    return (f"scaling: job {data['job']}, {data['max_new_tokens']} new tokens, daemon "
            f"--max-prompt-tokens {data['daemon_max_prompt_tokens']}\n"
            + table(["chars", "input tokens", "prompt tokens", "chars/token", "direct p50 ms", "http p50 ms",
                     "overhead p50", "overhead p95", "server generate p50", "server p50", "server p95"], rows)
            + skipped)


def render_soak(data: dict[str, Any]) -> str:
    s, e = data["start"], data["end"]
    rows = [["RSS kB", s["rss_kb"], e["rss_kb"], e["rss_kb"] - s["rss_kb"]],
            ["threads", s["threads"], e["threads"], data["threads_delta"]],
            ["fds", s["fds"], e["fds"], data["fds_delta"]]]
    trend = ", ".join(f"{sample['requests']}: {sample['rss_kb']}" for sample in data["samples"])
    return (f"soak: {data['requests']} keep-alive requests over {', '.join(data['jobs'])} in {data['elapsed_s']} s "
            f"({data['rps']} req/s), statuses {data['statuses']}\n"
            + table(["daemon", "start", "end", "delta"], rows) + f"\nRSS kB by requests: {trend}")


def render_startup(data: dict[str, Any]) -> str:
    rows = [["worker.py --help (ms)", *(data["help_ms"][k] for k in ("n", "p50", "min", "max"))],
            ["python -c pass (ms), the floor", *(data["python_floor_ms"][k] for k in ("n", "p50", "min", "max"))],
            ["start to /healthz 200, empty cache (s)",
             *(data["healthz_empty_cache_s"][k] for k in ("n", "p50", "min", "max"))],
            ["start to /healthz 200, warm cache (s)",
             *(data["healthz_warm_cache_s"][k] for k in ("n", "p50", "min", "max"))]]
    return ("startup\n" + table(["what", "n", "median", "min", "max"], rows)
            + f"\ncache dir: {data['cache_bytes']} bytes")


def render_profile(data: dict[str, Any]) -> str:
    rows = [[name, entry["clients"], entry["requests"], entry["rps_under_profiler"],
             entry["latency_ms_under_profiler"]["p50"], entry["report"], entry["exit_code"]]
            for name, entry in data["profilers"].items()]
    steps = data["steps"]
    step_rows = [[name, "", steps[name]["p50"], steps[name]["p95"]]
                 for name in ("apply_chat_template", "encode (the token count)")]
    for key, variants in steps.items():
        if key.endswith("new tokens"):
            step_rows += [[variant, key, stats["p50"], stats["p95"]] for variant, stats in variants.items()]
    return ("profile: the daemon under keep-alive load (16 new tokens), one profiler per daemon thread\n"
            + table(["run", "clients", "requests", "req/s (profiled)", "p50 ms (profiled)", "report", "exit"], rows)
            + f"\nsteps around generate(), openvino_genai in this process, {steps['rounds']} interleaved rounds\n"
            + table(["step", "budget", "p50 ms", "p95 ms"], step_rows))


def render_targets(found: Sequence[Target]) -> str:
    rows = [[t.status, t.name, t.value, (">= " if t.higher_is_better else "<= ") + fmt(t.limit), t.unit]
            for t in found]
    return ("targets (one run, one machine; reported, never asserted)\n"
            + table(["status", "target", "value", "limit", "unit"], rows))


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "overhead": render_overhead,
    "concurrency": render_concurrency,
    "scaling": render_scaling,
    "soak": render_soak,
    "startup": render_startup,
    "profile": render_profile,
}
SECTION_FUNCTIONS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "overhead": bench_overhead,
    "concurrency": bench_concurrency,
    "scaling": bench_scaling,
    "soak": bench_soak,
    "startup": bench_startup,
    "profile": bench_profile,
}


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, steal seconds, CPU seconds of this process tree).

    Children count once they have been waited for, which every daemon is by the end of its
    section.  The machine's busy time minus ours is what other processes took: the noise.
    """
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    tick = os.sysconf("SC_CLK_TCK")
    times = os.times()
    ours = times.user + times.system + times.children_user + times.children_system
    return (user + nice + system + irq + softirq) / tick, steal / tick, ours


def noise(before: tuple[float, float, float], after: tuple[float, float, float], wall_s: float) -> dict[str, Any]:
    foreign_s = (after[0] - before[0]) - (after[2] - before[2])
    return {
        "other_processes_cpu_s": round(max(0.0, foreign_s), 2),
        "steal_s": round(after[1] - before[1], 2),
        "other_share_of_machine": round(max(0.0, foreign_s) / (wall_s * (os.cpu_count() or 1)), 4),
    }


def machine() -> dict[str, Any]:
    cpu_model = None
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_total_kb = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_total_kb = int(line.split()[1])
    versions: dict[str, str | None] = {}
    for package in ("openvino", "openvino-genai", "openvino-tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "mem_total_mb": mem_total_kb // 1024 if mem_total_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "worker_version": worker.__version__,
        # worker.py changes under active development: tie the numbers to the exact file.
        "worker_sha256": hashlib.sha256(WORKER_PY.read_bytes()).hexdigest()[:16],
        **versions,
    }


# ==================================================================================================
# CLI
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmarks of worker.py against a direct LLMPipeline.generate. See BENCHMARKS.md.",
    )
    parser.add_argument("section", nargs="?", default="all", choices=[*SECTIONS, "all", *EXTRA_SECTIONS],
                        help="what to run (default all; profile is never part of all)")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the bench itself (seconds)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help="where to write the results (default %(default)s)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="model directory (default: the tiny test model)")
    parser.add_argument("--device", choices=("CPU", "NPU"), default="CPU", help="device (default CPU)")
    parser.add_argument("--cache-dir", type=Path,
                        help="compiled-model cache for every daemon and the baseline (default: fresh per daemon; "
                             "on the NPU pass the worker's cache to skip minutes of compiling)")
    parser.add_argument("--lock-file", type=Path,
                        help="NPU lock file (default: a private one; on an NPU host pass the shared one)")
    parser.add_argument("--no-npu-proof", action="store_true",
                        help="start the workers with --no-npu-proof (NPU on Linux < 6.11, no busy counter)")
    parser.add_argument("--emulate-npu", action="store_true",
                        help="device NPU through GenAI's NPU pipeline compiled for the CPU (workers and baseline)")
    parser.add_argument("--max-prompt-tokens", type=int, default=worker.DEFAULT_MAX_PROMPT_TOKENS,
                        help="MAX_PROMPT_LEN for daemons and baseline (default %(default)s; raised on CPU for scaling)")
    parser.add_argument("--soak-requests", type=int, help="requests in the soak (default 10000, --quick 300)")
    parser.add_argument("--iterations", type=int,
                        help="rounds of overhead and scaling (default 400 and 200, --quick 20 and 5): "
                             "a few on a real NPU, where one job takes seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = QUICK_PLAN if args.quick else Plan()
    if args.soak_requests is not None:
        plan = dataclasses.replace(plan, soak_requests=args.soak_requests)
    if args.iterations is not None:
        plan = dataclasses.replace(plan, overhead_iterations=args.iterations, scaling_iterations=args.iterations,
                                   overhead_warmup=min(plan.overhead_warmup, args.iterations))
    sections = list(SECTIONS) if args.section == "all" else [args.section]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
            "command": "python " + " ".join(shlex.quote(a)
                                            for a in ["bench/run.py", *(sys.argv[1:] if argv is None else argv)]),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "quick": args.quick,
            "model": str(args.model),
            "device": args.device,
            "emulate_npu": args.emulate_npu,
            "machine": machine(),
            "plan": dataclasses.asdict(plan),
        }
    }
    failed = False
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as workdir:
        config = RunConfig(model=args.model.resolve(), device=args.device, cache_dir=args.cache_dir,
                           lock_file=args.lock_file, max_prompt_tokens=args.max_prompt_tokens,
                           no_npu_proof=args.no_npu_proof, emulate_npu=args.emulate_npu,
                           workdir=Path(workdir), plan=plan)
        bench = Bench(config)
        for section in sections:
            section_started = time.perf_counter()
            cpu_before = cpu_snapshot()
            print(f"== {section} ...", file=sys.stderr, flush=True)
            try:
                data = SECTION_FUNCTIONS[section](bench)
            except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' numbers
                failed = True
                results[section] = {"error": f"{type(exc).__name__}: {exc}", "daemon_logs": bench.daemon_logs}
                bench.daemon_logs = {}
                print(f"{section}: FAILED: {type(exc).__name__}: {exc}\n", flush=True)
                continue
            wall_s = time.perf_counter() - section_started
            data["elapsed_s"] = round(wall_s, 1)
            data["daemon_logs"] = bench.daemon_logs
            bench.daemon_logs = {}
            data["noise"] = noise(cpu_before, cpu_snapshot(), wall_s)
            results[section] = data
            print(RENDERERS[section](data), flush=True)
            print(f"({section}: {data['elapsed_s']} s; other processes took {data['noise']['other_processes_cpu_s']} "
                  f"CPU s, steal {data['noise']['steal_s']} s)\n", flush=True)
        if bench._direct is not None:
            results["meta"]["direct_load_s"] = round(bench._direct.load_s, 3)
    worker_sha_end = hashlib.sha256(WORKER_PY.read_bytes()).hexdigest()[:16]
    if worker_sha_end != results["meta"]["machine"]["worker_sha256"]:
        # Sections started after the change ran the new file: the run mixes two workers.
        results["meta"]["worker_sha256_at_end"] = worker_sha_end
        print("warning: worker.py changed during the run; its sections mix two versions", file=sys.stderr)
    found = targets(results)
    results["targets"] = [target.as_dict() for target in found]
    results["meta"]["elapsed_s"] = round(time.perf_counter() - started, 1)
    if found:
        print(render_targets(found), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json} ({results['meta']['elapsed_s']} s)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
