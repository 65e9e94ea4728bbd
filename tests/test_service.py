"""The worker as a service: systemd notifications, shutdown, deadlines, metrics, health, doctor and batch.

The usual tiers: in-process servers on 127.0.0.1:0 with a fake pipeline; the real daemon
(``python worker.py --port 0``) as a subprocess with the tiny model on CPU, its port read from its
"listening on" log line and its sd_notify datagrams read from a socket the test binds; the CLI
through ``main([...])`` and as a subprocess.

Nothing here sleeps to wait for state: events in this process, bounded polling of another
process's /healthz.  The daemon's model load is held back by holding the NPU lock; a request is
kept "being handled" across a shutdown with ``Expect: 100-continue`` (the handler is provably
waiting for the body once it has said 100 Continue); a hung prefill is a fake that waits on an
event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import grp
import http.client
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from typing import TypeVar

import pytest

import worker
from conftest import DAEMON_START_TIMEOUT_S
from conftest import DAEMON_STOP_TIMEOUT_S
from conftest import HTTP_TIMEOUT_S
from conftest import REPO
from conftest import TINY_MODEL
from conftest import FakeNpuPipeline
from conftest import Response
from conftest import assert_error
from conftest import call
from conftest import cpu_settings
from conftest import fetch
from conftest import free_port
from conftest import ir_header
from conftest import needs_tiny_model
from conftest import running_daemon
from conftest import worker_env

WARM_UPS = len(worker.WARMUP_REQUESTS)  # generations before a worker turns ready

T = TypeVar("T")

SUBPROCESS_TIMEOUT_S = 120.0
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
GENERATE = "/v1/worker/generate"
# 500 words in sentences of four: a summary of any length keeps whole sentences.
LONG_REPLY = " ".join(f"Sentence number {index} here." for index in range(125))
# No sentence, no line, no loop: no stop rule ends it before max_new_tokens.
UNENDING_REPLY = " ".join(f"token{index}" for index in range(600))
# About 900 prompt tokens for the tiny model's tokenizer: a real 256-token summary then takes ~0.4 s.
LONG_INPUT = " ".join(f"word{index} is here." for index in range(90))
# Over 1024 prompt tokens for the tiny model, under 6000 characters.
PROMPT_TOO_LONG_INPUT = " ".join(f"word{index} is here." for index in range(400))[:5990]



# --------------------------------------------------------------------------------------------------
# Helpers: HTTP, polling, a recording fake, the Prometheus text format
# --------------------------------------------------------------------------------------------------


def settle(server: worker.WorkerHTTPServer) -> None:
    """Wait until every handler has finished: a request is counted and logged just after its answer."""
    assert server.drain(HTTP_TIMEOUT_S), "a request is still being handled"


def poll(check: Callable[[], T | None], timeout_s: float, what: str) -> T:
    """Ask again until check() gives something; only where no event can be had (another process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.01)


class RecordingPipeline(FakeNpuPipeline):
    """The conftest fake, plus what each generate() returned and a condition to wait on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = threading.Condition()
        self.started = 0
        self.generations: list[worker.Generation] = []

    def generate(self, prompt: str, max_new_tokens: int, grammar: str | None, should_stop: Callable[[], bool],
                 stop_rules: str | None = None) -> worker.Generation:
        with self.changed:
            self.started += 1
            self.changed.notify_all()
        generation = super().generate(prompt, max_new_tokens, grammar, should_stop, stop_rules)
        with self.changed:
            self.generations.append(generation)
            self.changed.notify_all()
        return generation

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout_s), "the pipeline never got there"


@dataclasses.dataclass
class Exposition:
    """A parsed Prometheus text exposition."""

    helps: dict[str, str]
    types: dict[str, str]
    samples: list[tuple[str, dict[str, str], float]]

    def series(self, name: str) -> list[tuple[dict[str, str], float]]:
        return [(labels, value) for sample, labels, value in self.samples if sample == name]

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        values = [value for got, value in self.series(name) if got == (labels or {})]
        assert len(values) == 1, f"{name}{labels or ''}: {len(values)} samples in {self.series(name)}"
        return values[0]

    def histogram(self, name: str) -> tuple[list[tuple[str, float]], float, float]:
        """([(le, cumulative count)...] in exposition order, _sum, _count)."""
        buckets = [(labels["le"], value) for labels, value in self.series(f"{name}_bucket")]
        return buckets, self.value(f"{name}_sum"), self.value(f"{name}_count")


_SAMPLE_LINE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
# Lenient on label names on purpose (the strict check is its own test); values may hold escapes.
_LABEL_PAIR = re.compile(r'([^=,{}"\s]+)="((?:[^"\\]|\\.)*)"(,|$)')
_PROMETHEUS_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PROMETHEUS_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _LABEL_PAIR.match(text, position)
        assert match, f"bad label set {text!r} at {position}"
        name, value = match.group(1), match.group(2)
        assert name not in labels, f"label {name} twice in {text!r}"
        labels[name] = value.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")
        position = match.end()
    return labels


def parse_exposition(text: str) -> Exposition:
    """`# HELP name text`, `# TYPE name kind` and `name{labels} value` lines; every sample after its TYPE."""
    assert text.endswith("\n")
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in types
            types[name] = kind
        else:
            match = _SAMPLE_LINE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in types or types.get(family) == "histogram", f"{name} has no TYPE line before it"
            assert (name if name in types else family) in helps, f"{name} has no HELP line"
            samples.append((name, parse_labels(labels or ""), float(value)))
    return Exposition(helps, types, samples)


def scrape(port: int) -> Exposition:
    status, headers, data = fetch(port, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"] == METRICS_CONTENT_TYPE
    return parse_exposition(data.decode("utf-8"))


def requests_total(exposition: Exposition, endpoint: str, job: str, status: int) -> float:
    return exposition.value("npu_worker_requests_total", {"endpoint": endpoint, "job": job, "status": str(status)})


def assert_histogram_consistent(exposition: Exposition, name: str) -> tuple[list[tuple[str, float]], float]:
    buckets, total, count = exposition.histogram(name)
    assert [le for le, _ in buckets] == [f"{bound:g}" for bound in worker.SECONDS_BUCKETS] + ["+Inf"]
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), f"{name} buckets are not cumulative: {buckets}"
    assert counts[-1] == count and total >= 0
    return buckets, count


# --------------------------------------------------------------------------------------------------
# Helpers: servers in this process, the daemon as a subprocess, the sd_notify socket
# --------------------------------------------------------------------------------------------------


class NotifySocket:
    """The systemd side of sd_notify: an AF_UNIX datagram socket; each datagram is a list of fields."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address if not address.startswith("@") else "\0" + address[1:])

    def receive(self, timeout_s: float) -> list[str]:
        self.sock.settimeout(max(timeout_s, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no sd_notify datagram within {timeout_s:.1f} s") from None
        return data.decode("utf-8").split("\n")

    def until(self, predicate: Callable[[list[str]], bool], timeout_s: float) -> list[list[str]]:
        """Every datagram up to and including the first that satisfies predicate."""
        deadline = time.monotonic() + timeout_s
        received: list[list[str]] = []
        while True:
            remaining_s = deadline - time.monotonic()
            assert remaining_s > 0, f"no matching sd_notify datagram within {timeout_s} s; got {received}"
            try:
                fields = self.receive(remaining_s)
            except AssertionError:
                raise AssertionError(f"no matching sd_notify datagram within {timeout_s} s; got {received}") from None
            received.append(fields)
            if predicate(fields):
                return received

    def pending(self) -> list[list[str]]:
        """Datagrams already queued, without waiting."""
        self.sock.setblocking(False)
        received = []
        try:
            while True:
                received.append(self.sock.recv(65536).decode("utf-8").split("\n"))
        except BlockingIOError:
            return received

    def close(self) -> None:
        self.sock.close()
        if not self.address.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address)


@contextlib.contextmanager
def notify_socket(address: str) -> Iterator[NotifySocket]:
    listener = NotifySocket(address)
    try:
        yield listener
    finally:
        listener.close()


def lock_is_free(lock_path: Path) -> bool:
    try:
        fd = worker.NpuLock(lock_path).acquire(0)
    except worker.Busy:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------------------
# 1. sd_notify: the real daemon reports loading, ready, watchdog and stopping
# --------------------------------------------------------------------------------------------------


def test_notifier_without_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: Any, **kwargs: Any) -> socket.socket:
        raise AssertionError("a notifier without NOTIFY_SOCKET opened a socket")

    monkeypatch.setattr(worker.socket, "socket", no_socket)
    notifier = worker.SystemdNotifier({})
    notifier.notify("READY=1")
    worker.SystemdNotifier({"NOTIFY_SOCKET": ""}).notify("READY=1")  # empty counts as unset
    assert notifier.watchdog_interval_s is None


def test_notifier_watchdog_interval_is_half_the_timeout_and_only_for_this_pid() -> None:
    assert worker.SystemdNotifier({"WATCHDOG_USEC": "400000"}).watchdog_interval_s == 0.2
    assert worker.SystemdNotifier(
        {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 0.2
    assert worker.SystemdNotifier({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert worker.SystemdNotifier({"WATCHDOG_USEC": "0"}).watchdog_interval_s is None


def test_notifier_reaches_an_abstract_socket() -> None:
    with notify_socket(f"@npu-worker-test-{uuid.uuid4().hex}") as listener:
        worker.SystemdNotifier({"NOTIFY_SOCKET": listener.address}).notify("READY=1", "STATUS=ready")
        assert listener.receive(5.0) == ["READY=1", "STATUS=ready"]


@needs_tiny_model
def test_daemon_reports_loading_then_ready_after_warm_up_then_watchdog_then_stopping(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    assert len(address) < 100, "AF_UNIX paths are limited to 108 bytes"
    lock = worker.NpuLock(tmp_path / "lock" / "npu.lock")
    held = lock.acquire(5.0)  # the daemon's model load waits for this: "loading" lasts as long as we want
    try:
        with notify_socket(address) as listener, \
                running_daemon(tmp_path, NOTIFY_SOCKET=address, WATCHDOG_USEC="400000") as daemon:
            first = listener.receive(DAEMON_START_TIMEOUT_S)
            assert first[0].startswith("STATUS=loading tiny-chatml-ov on CPU")
            assert f"EXTEND_TIMEOUT_USEC={worker.LOAD_EXTEND_S * 1_000_000}" in first
            port = daemon.wait_listening()
            status, headers, health = call(port, "GET", "/healthz")
            assert (status, health["status"], health["ready"]) == (503, "loading", False)
            assert headers["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)
            assert call(port, "GET", "/livez")[0] == 200
            assert all(fields[0].startswith("STATUS=loading") for fields in listener.pending())  # no READY=1 yet

            fcntl.flock(held, fcntl.LOCK_UN)
            os.close(held)
            held = -1
            before_ready = listener.until(lambda fields: "READY=1" in fields, DAEMON_START_TIMEOUT_S)
            assert all(fields[0].startswith("STATUS=loading") for fields in before_ready[:-1])
            assert before_ready[-1] == ["READY=1", "STATUS=ready: tiny-chatml-ov on CPU"]
            # Right after READY=1: ready, and the warm-up generation has already run (no job was sent).
            status, _, health = call(port, "GET", "/healthz")
            assert (status, health["status"], health["ready"]) == (200, "ok", True)
            metrics = scrape(port)
            assert metrics.value("npu_worker_generate_duration_seconds_count") == WARM_UPS
            assert metrics.value("npu_worker_ready") == 1
            assert not [labels for labels, _ in metrics.series("npu_worker_requests_total")
                        if labels["endpoint"] == GENERATE]

            pings = []
            for _ in range(4):  # WATCHDOG=1 every WATCHDOG_USEC/2, and nothing else in between
                assert listener.receive(5.0) == ["WATCHDOG=1"]
                pings.append(time.monotonic())
            mean_gap_s = (pings[-1] - pings[0]) / (len(pings) - 1)
            assert 0.1 < mean_gap_s < 0.4, f"pings every ~0.2 s, within WATCHDOG_USEC: {mean_gap_s:.3f} s"

            daemon.process.send_signal(signal.SIGTERM)
            before_stop = listener.until(lambda fields: "STOPPING=1" in fields, DAEMON_STOP_TIMEOUT_S)
            assert all(fields == ["WATCHDOG=1"] for fields in before_stop[:-1])
            assert daemon.process.wait(DAEMON_STOP_TIMEOUT_S) == 0
            assert "stopped" in daemon.log_text()
    finally:
        if held >= 0:
            os.close(held)


@needs_tiny_model
def test_sigterm_while_waiting_for_the_npu_at_start_up_exits_0_promptly(tmp_path: Path) -> None:
    address = str(tmp_path / "notify.sock")
    held = worker.NpuLock(tmp_path / "lock" / "npu.lock").acquire(5.0)  # another process is on the NPU
    try:
        with notify_socket(address) as listener, \
                running_daemon(tmp_path, "--lock-timeout-s", "30", "--request-timeout-s", "0.5",
                               NOTIFY_SOCKET=address) as daemon:
            assert listener.receive(DAEMON_START_TIMEOUT_S)[0].startswith("STATUS=loading")
            daemon.process.send_signal(signal.SIGTERM)
            try:
                code = daemon.process.wait(0.5 + worker.DRAIN_MARGIN_S)
            except subprocess.TimeoutExpired:
                code = None
            assert code == 0, "no exit 0 within --request-timeout-s + 5 s of SIGTERM"
            assert not [fields for fields in listener.pending() if "READY=1" in fields]
    finally:
        os.close(held)


# --------------------------------------------------------------------------------------------------
# 2. The watchdog is not blind: no WATCHDOG=1 while a generation is stuck
# --------------------------------------------------------------------------------------------------


class HungPrefillPipeline(FakeNpuPipeline):
    """Once told to hang, generate() ignores should_stop until released: a prefill that never returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hang = threading.Event()
        self.hanging = threading.Event()
        self.release = threading.Event()

    def generate(self, prompt: str, max_new_tokens: int, grammar: str | None, should_stop: Callable[[], bool],
                 stop_rules: str | None = None) -> worker.Generation:
        if self.hang.is_set():
            self.hanging.set()
            self.release.wait(30)
        return super().generate(prompt, max_new_tokens, grammar, should_stop, stop_rules)


def test_watchdog_stops_pinging_while_a_generation_is_stuck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "STUCK_GRACE_S", 0.0)  # stuck = past the (short) request deadline
    settings = cpu_settings(tmp_path, port=0, limits=worker.Limits(request_timeout_s=0.3))
    pipeline = HungPrefillPipeline(settings)
    built = worker.build_worker(settings, lambda _settings: pipeline)
    stop = threading.Event()
    outcome: list[BaseException | int] = []

    def serve() -> None:
        try:
            outcome.append(worker.serve(settings, built, stop, notifier))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            outcome.append(exc)

    def stuck_job() -> None:
        try:
            built.run(worker.JobRequest("title", "x"), "stuck")
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    with notify_socket(f"@npu-worker-test-{uuid.uuid4().hex}") as listener:
        notifier = worker.SystemdNotifier({"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "200000"})
        server_thread = threading.Thread(target=serve, daemon=True)
        job_thread = threading.Thread(target=stuck_job, daemon=True)
        server_thread.start()
        try:
            listener.until(lambda fields: "READY=1" in fields, 10.0)
            assert listener.receive(5.0) == ["WATCHDOG=1"]

            pipeline.hang.set()
            job_thread.start()
            assert pipeline.hanging.wait(5.0)
            listener.until(lambda fields: fields[0].startswith("STATUS=unhealthy"), 10.0)
            later = [listener.receive(5.0) for _ in range(3)]  # three more checks: none of them pings
            assert all(fields[0].startswith("STATUS=unhealthy: a generation has held the NPU")
                       for fields in later), later
            assert built.health_problem() is not None

            pipeline.release.set()
            job_thread.join(10.0)
            assert isinstance(outcome.pop(), worker.RequestTimeout)
            listener.until(lambda fields: fields == ["WATCHDOG=1"], 5.0)  # pings again once it is over
        finally:
            pipeline.release.set()
            stop.set()
            server_thread.join(10.0)
        assert listener.until(lambda fields: "STOPPING=1" in fields, 5.0)
    assert outcome == [worker.EXIT_OK]


def test_the_self_check_is_none_on_a_healthy_server_and_named_on_a_dead_gate(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    problem, ping = worker.self_check(server, server.worker, None)
    assert problem is None and ping.wait(5)  # the gate took the turn asked of it
    assert worker.self_check(server, server.worker, ping)[0] is None
    dead = worker.WorkerHTTPServer(server.settings, server.worker)  # bound, but its gate never runs
    try:
        problem, ping = worker.self_check(dead, server.worker, None)
        assert problem is None  # nothing asked of it yet
        assert not ping.wait(0.3)
        assert (worker.self_check(dead, server.worker, ping)[0]
                == "the HTTP gate did not take a turn since the last check")
    finally:
        dead.server_close()


# --------------------------------------------------------------------------------------------------
# 3. SIGTERM during running jobs loses no accepted request
# --------------------------------------------------------------------------------------------------


@needs_tiny_model
def test_sigterm_answers_every_accepted_job_refuses_new_ones_and_exits_0(tmp_path: Path) -> None:
    jobs = 6
    request = {"job": "summary", "input": LONG_INPUT, "max_new_tokens": 256}
    answers: list[tuple[float, int, dict[str, Any]]] = []

    def submit() -> None:
        status, _, body = call(port, "POST", GENERATE, request, timeout_s=SUBPROCESS_TIMEOUT_S)
        answers.append((time.monotonic(), status, body))

    with notify_socket(f"@npu-worker-test-{uuid.uuid4().hex}") as listener, \
            running_daemon(tmp_path, "--no-stop-rules", NOTIFY_SOCKET=listener.address) as daemon:  # 256 tokens each
        port = daemon.wait_listening()
        listener.until(lambda fields: "READY=1" in fields, DAEMON_START_TIMEOUT_S)
        pool = ThreadPoolExecutor(jobs)
        # A request the server is provably handling (it said 100 Continue and waits for the body):
        # it keeps the drain, and so the listener, open until the test sends the body.
        late_body = json.dumps({"job": "title", "input": "sent after SIGTERM"}).encode()
        late = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
        try:
            late.sendall(
                b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (GENERATE.encode(), port, len(late_body))
            )
            interim = b""
            while not interim.endswith(b"\r\n\r\n"):
                chunk = late.recv(1)
                assert chunk, "connection closed before 100 Continue"
                interim += chunk
            assert interim.startswith(b"HTTP/1.1 100 ")

            futures: list[Future[None]] = [pool.submit(submit) for _ in range(jobs)]

            def all_accepted() -> dict[str, Any] | None:
                health = call(port, "GET", "/healthz")[2]
                return health if health["jobs_in_flight"] + len(answers) == jobs else None

            health = poll(all_accepted, 30.0, f"{jobs} accepted jobs")
            answered_at_sigterm = len(answers)
            sigterm_at = time.monotonic()
            daemon.process.send_signal(signal.SIGTERM)
            assert health["jobs_in_flight"] > 0 and answered_at_sigterm < jobs, "no job was running at SIGTERM"

            listener.until(lambda fields: "STOPPING=1" in fields, DAEMON_STOP_TIMEOUT_S)

            def stopping() -> Response | None:
                response = call(port, "GET", "/healthz")
                return response if response[2]["status"] == "stopping" else None

            status, headers, health = poll(stopping, 5.0, "/healthz to say stopping")
            assert (status, health["ready"], headers["Retry-After"]) == (503, False, str(worker.RETRY_AFTER_LOADING_S))
            refused = call(port, "POST", GENERATE, {"job": "title", "input": "a new connection after SIGTERM"})
            assert_error(refused, 503, "shutting_down")
            assert refused[1]["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)

            late.sendall(late_body)
            response = http.client.HTTPResponse(late)
            response.begin()
            late_answer = json.loads(response.read())
            assert (response.status, late_answer["error"]["type"]) == (503, "shutting_down")

            for future in futures:
                future.result(timeout=SUBPROCESS_TIMEOUT_S)
            assert daemon.process.wait(DAEMON_STOP_TIMEOUT_S) == 0
        finally:
            late.close()
            pool.shutdown(wait=False, cancel_futures=True)

        assert [status for _, status, _ in answers] == [200] * jobs, [body for _, _, body in answers]
        assert all(body["tokens"]["generated"] == 256 for _, _, body in answers)
        assert any(answered > sigterm_at for answered, _, _ in answers), "every job ended before SIGTERM"
        log = daemon.log_text()
        assert "stopped" in log and "still unanswered" not in log
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S).close()
        assert lock_is_free(daemon.lock_path)


# --------------------------------------------------------------------------------------------------
# 4. Deadlines and cancellation
# --------------------------------------------------------------------------------------------------


def test_deadline_cancels_the_generation_and_frees_the_npu(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    pipeline = RecordingPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.01)
    server = start_server(pipeline)
    started = time.monotonic()
    response = call(server.server_port, "POST", GENERATE,
                    {"job": "summary", "input": "x", "max_new_tokens": 256, "timeout_s": 0.2})
    elapsed_s = time.monotonic() - started
    assert_error(response, 504, "timeout")
    assert elapsed_s < 1.0  # the full generation would take 2.56 s
    assert lock_is_free(server.settings.lock_path)
    cancelled = pipeline.generations[WARM_UPS]  # the warm-ups came first
    assert cancelled.finish_reason == "cancelled" and cancelled.generated_tokens < 100

    status, _, body = call(server.server_port, "POST", GENERATE, {"job": "title", "input": "x", "max_new_tokens": 3})
    assert status == 200 and body["tokens"]["generated"] == 3


def send_job(port: int, job: str, **fields: Any) -> socket.socket:
    """A job request on a raw socket, which the caller can close at any moment."""
    body = json.dumps({"job": job, "input": "x", **fields}).encode()
    client = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S)
    client.sendall(b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return client


def disconnect_mid_generation(server: worker.WorkerHTTPServer, pipeline: RecordingPipeline) -> worker.Generation:
    """Send a 256-token job on a raw socket, close it once the pipeline runs; return that generation."""
    client = send_job(server.server_port, "summary", max_new_tokens=256)
    try:
        pipeline.wait_for(lambda: pipeline.started == WARM_UPS + 1)  # after the warm-ups: generating now
        # A close right behind the request would be a half-close (answered); one later, a client
        # that gave up waiting (its generation is cancelled).
        time.sleep(worker.HALF_CLOSE_WINDOW_S * 3)
    finally:
        client.close()
    closed_at = time.monotonic()
    pipeline.wait_for(lambda: len(pipeline.generations) == WARM_UPS + 1)
    assert time.monotonic() - closed_at < 1.0  # the rest of the 256 tokens would take over 1.5 s
    return pipeline.generations[WARM_UPS]


def test_a_client_that_disconnects_cancels_its_generation(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    pipeline = RecordingPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.01)
    server = start_server(pipeline)
    gone = disconnect_mid_generation(server, pipeline)
    assert gone.finish_reason == "cancelled" and gone.generated_tokens < 100, gone
    settle(server)
    assert lock_is_free(server.settings.lock_path)
    status, _, answer = call(server.server_port, "POST", GENERATE, {"job": "title", "input": "x", "max_new_tokens": 2})
    assert status == 200 and answer["tokens"]["generated"] == 2


def test_a_client_that_disconnects_is_logged_as_499(
    start_server: Callable[..., worker.WorkerHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    pipeline = RecordingPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.01)
    server = start_server(pipeline)
    with caplog.at_level(logging.INFO, logger="openvino_genai_npu_worker"):
        disconnect_mid_generation(server, pipeline)
        settle(server)  # its handler has finished, whatever it did
    assert "status=499 job=summary error=client_closed_request" in caplog.text
    assert "connection error" not in caplog.text
    assert server.worker.metrics.requests.get((GENERATE, "summary", 499)) == 1


def test_a_client_that_gives_up_in_the_queue_costs_the_npu_nothing(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    """The prefill cannot be cancelled, so a job whose client closed while it waited is dropped
    when its turn comes, before generate(): on an NPU, a prompt's prefill not run for nobody."""
    pipeline = RecordingPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.01)
    server = start_server(pipeline)
    with send_job(server.server_port, "summary", max_new_tokens=256):  # it will hold the NPU (2.56 s if let run)
        pipeline.wait_for(lambda: pipeline.started == WARM_UPS + 1)
        with send_job(server.server_port, "title"):  # waits for its turn
            time.sleep(worker.HALF_CLOSE_WINDOW_S * 3)  # later than a half-close: a client that gave up
        time.sleep(worker.HALF_CLOSE_WINDOW_S)
    # The summary is cancelled at once; then the title's turn comes, with nobody left to read it.
    settle(server)
    assert pipeline.started == WARM_UPS + 1  # the title never reached the pipeline
    assert pipeline.generations[WARM_UPS].finish_reason == "cancelled"
    assert server.worker.metrics.requests.get((GENERATE, "summary", 499)) == 1
    assert server.worker.metrics.requests.get((GENERATE, "title", 499)) == 1


def test_queue_wait_counts_toward_the_deadline(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    pipeline = RecordingPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.01)
    server = start_server(pipeline)  # lock_timeout_s 5: a 503 busy would need 5 s of waiting
    port = server.server_port
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(call, port, "POST", GENERATE, {"job": "summary", "input": "x", "max_new_tokens": 150})
        pipeline.wait_for(lambda: pipeline.started == WARM_UPS + 1)  # the slow job holds the NPU for 1.5 s
        started = time.monotonic()
        response = call(port, "POST", GENERATE, {"job": "title", "input": "y", "timeout_s": 0.2})
        elapsed_s = time.monotonic() - started
        assert_error(response, 504, "timeout")
        assert "deadline" in response[2]["error"]["message"]
        assert 0.2 <= elapsed_s < 1.0
        assert len(pipeline.generations) == WARM_UPS  # answered while the slow job still ran...
        assert pipeline.started == WARM_UPS + 1  # ...and the timed-out job never reached the pipeline
        assert slow.result(timeout=HTTP_TIMEOUT_S)[0] == 200


# --------------------------------------------------------------------------------------------------
# 5. /metrics
# --------------------------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_durations(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = RecordingPipeline(settings, reply=LONG_REPLY, seconds_per_token=0.03)
    server = start_server(pipeline)
    port = server.server_port
    results = []
    for max_new_tokens, text in ((1, "short"), (2, "a longer input text"), (10, "the longest input of all three here")):
        # A summary: the reply's sentences keep it going past 10 tokens (a title would stop at one).
        status, _, body = call(port, "POST", GENERATE,
                               {"job": "summary", "input": text, "max_new_tokens": max_new_tokens})
        assert status == 200
        results.append(body)
    assert_error(call(port, "POST", GENERATE, {"job": "title"}), 400, "invalid_request")
    assert_error(call(port, "GET", "/no/such/path"), 404, "not_found")

    settle(server)
    metrics = scrape(port)
    assert requests_total(metrics, GENERATE, "summary", 200) == 3
    assert requests_total(metrics, GENERATE, "", 400) == 1
    assert requests_total(metrics, "<other>", "", 404) == 1
    assert sum(value for _, value in metrics.series("npu_worker_requests_total")) == 5

    # The warm-ups are jobs too: counted independently from what the fake is given.
    warm_up_prompt = sum(
        pipeline.count_tokens(pipeline.render_prompt(worker.job_messages(worker.JOBS[request.job], request.input_text)))
        for request in worker.WARMUP_REQUESTS
    )
    warm_up_generated = sum(min(len(LONG_REPLY.split()), request.max_new_tokens or 0)
                            for request in worker.WARMUP_REQUESTS)
    assert (metrics.value("npu_worker_prompt_tokens_total")
            == sum(r["tokens"]["prompt"] for r in results) + warm_up_prompt)
    assert (metrics.value("npu_worker_generated_tokens_total")
            == sum(r["tokens"]["generated"] for r in results) + warm_up_generated)
    assert [r["tokens"]["generated"] for r in results] == [1, 2, 10]
    warm_ups = len(worker.WARMUP_REQUESTS)
    assert len(pipeline.generations) == 3 + warm_ups

    _, generate_count = assert_histogram_consistent(metrics, "npu_worker_generate_duration_seconds")
    assert generate_count == 3 + warm_ups  # three jobs and the warm-ups
    buckets = dict(assert_histogram_consistent(metrics, "npu_worker_generate_duration_seconds")[0])
    assert buckets["0.025"] == 0 and buckets["2.5"] == 3 + warm_ups  # every call slept 0.03 s per token, 0.3 s at most
    assert metrics.value("npu_worker_generate_duration_seconds_sum") >= 0.03 * (1 + 2 + 10 + warm_up_generated)
    assert assert_histogram_consistent(metrics, "npu_worker_queue_wait_seconds")[1] == 3 + warm_ups
    # + 1: the model load
    assert assert_histogram_consistent(metrics, "npu_worker_lock_wait_seconds")[1] == 3 + warm_ups + 1
    assert assert_histogram_consistent(metrics, "npu_worker_request_duration_seconds")[1] == 5

    (build_labels, build_value), = metrics.series("npu_worker_build_info")
    assert build_value == 1
    assert (build_labels["device"], build_labels["model"], build_labels["worker"]) == (
        "CPU", "tiny-chatml-ov", worker.__version__)
    assert metrics.value("npu_worker_ready") == 1
    assert metrics.value("npu_worker_queue_waiting") == 0 and metrics.value("npu_worker_jobs_in_flight") == 0
    assert metrics.value("npu_worker_model_load_seconds") >= 0
    assert metrics.value("npu_worker_npu_busy_seconds_total") == 0  # CPU: nothing to prove
    assert {name: kind for name, kind in metrics.types.items() if name.endswith("_total")} == {
        "npu_worker_requests_total": "counter",
        "npu_worker_prompt_tokens_total": "counter",
        "npu_worker_generated_tokens_total": "counter",
        "npu_worker_refusals_total": "counter",
        "npu_worker_npu_busy_seconds_total": "counter",
        "npu_worker_npu_proof_failures_total": "counter",
        "npu_worker_model_loads_total": "counter",
        "npu_worker_model_unloads_total": "counter",
    }
    assert metrics.value("npu_worker_model_loads_total") == 1 and metrics.value("npu_worker_model_unloads_total") == 0


def test_metrics_add_up_npu_busy_time_and_count_proof_failures(
    start_server: Callable[..., worker.WorkerHTTPServer], npu_settings: worker.Settings, busy_file: Path
) -> None:
    initial_us = int(busy_file.read_text())
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file, busy_increment_us=1500)
    server = start_server(pipeline, device="NPU", busy_path=busy_file)
    port = server.server_port
    deltas = []
    for increment_us in (1000, 2000, 3000):
        pipeline.busy_increment_us = increment_us
        status, _, body = call(port, "POST", GENERATE, {"job": "title", "input": "x"})
        assert (status, body["npu_proof"]) == (200, "verified")
        deltas.append(body["npu_busy_delta_us"])
    assert deltas == [1000, 2000, 3000]
    pipeline.busy_increment_us = 0  # the job "ran" but the NPU did not
    assert_error(call(port, "POST", GENERATE, {"job": "title", "input": "x"}), 502, "npu_proof_failed")

    settle(server)
    metrics = scrape(port)
    busy_s = metrics.value("npu_worker_npu_busy_seconds_total")  # base units: seconds (promtool)
    assert busy_s == pytest.approx((sum(deltas) + 1500 * WARM_UPS) / 1e6)  # + the warm-ups
    assert busy_s == pytest.approx((int(busy_file.read_text()) - initial_us) / 1e6)
    assert metrics.value("npu_worker_npu_proof_failures_total") == 1
    assert requests_total(metrics, GENERATE, "title", 502) == 1
    (build_labels, _), = metrics.series("npu_worker_build_info")
    assert (build_labels["device"], build_labels["model"]) == ("NPU", "tiny-chatml-ov")


def test_metrics_names_are_valid_in_the_prometheus_text_format(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    metrics = scrape(start_server().server_port)
    for name, labels, _ in metrics.samples:
        assert _PROMETHEUS_NAME.fullmatch(name), name
        for label in labels:
            assert _PROMETHEUS_LABEL_NAME.fullmatch(label) and not label.startswith("__"), f"{name}: label {label!r}"


def test_metrics_count_malformed_requests_too(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=HTTP_TIMEOUT_S) as sock:
        sock.sendall(b"GARBAGE\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 "))
    settle(server)
    metrics = scrape(server.server_port)
    assert sum(value for labels, value in metrics.series("npu_worker_requests_total") if labels["status"] == "400") == 1


# --------------------------------------------------------------------------------------------------
# 6. /healthz and /livez
# --------------------------------------------------------------------------------------------------


def test_healthz_follows_loading_ready_stopping_while_livez_stays_200(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    loading = threading.Event()
    release = threading.Event()
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))

    def slow_factory(_settings: worker.Settings) -> FakeNpuPipeline:
        loading.set()
        assert release.wait(30)
        return pipeline

    server = start_server(factory=slow_factory, load=False)
    port = server.server_port
    loader = threading.Thread(target=server.worker.load, daemon=True)
    loader.start()
    try:
        assert loading.wait(5.0)  # the model load is under way (and holds the NPU lock)
        status, headers, health = call(port, "GET", "/healthz")
        assert (status, health["status"], health["ready"]) == (503, "loading", False)
        assert headers["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)
        assert call(port, "GET", "/livez")[:3:2] == (200, {"status": "alive", "problem": None})
        assert_error(call(port, "POST", GENERATE, {"job": "title", "input": "x"}), 503, "loading")
        assert scrape(port).value("npu_worker_ready") == 0
    finally:
        release.set()
        loader.join(10.0)

    status, _, health = call(port, "GET", "/healthz")
    assert (status, health["status"], health["ready"]) == (200, "ok", True)
    assert call(port, "GET", "/livez")[0] == 200

    server.worker.begin_shutdown()
    status, headers, health = call(port, "GET", "/healthz")
    assert (status, health["status"], health["ready"]) == (503, "stopping", False)
    assert headers["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)
    refused = call(port, "POST", GENERATE, {"job": "title", "input": "x"})
    assert_error(refused, 503, "shutting_down")
    assert refused[1]["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)
    assert call(port, "GET", "/livez")[0] == 200
    assert scrape(port).value("npu_worker_ready") == 0


def test_livez_stays_200_during_a_long_model_load(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "STUCK_GRACE_S", 0.0)
    loading = threading.Event()
    release = threading.Event()
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))

    def slow_factory(_settings: worker.Settings) -> FakeNpuPipeline:
        loading.set()
        assert release.wait(30)
        return pipeline

    server = start_server(factory=slow_factory, load=False, limits=worker.Limits(request_timeout_s=0.05))
    loader = threading.Thread(target=server.worker.load, daemon=True)
    loader.start()
    try:
        assert loading.wait(5.0)
        time.sleep(0.1)  # not waiting for state: the load has to outlast deadline + grace (0.05 s)
        status, _, body = call(server.server_port, "GET", "/livez")
        assert (status, body["problem"]) == (200, None)
    finally:
        release.set()
        loader.join(10.0)


def test_healthz_last_error_is_the_type_of_the_last_5xx(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))
    server = start_server(pipeline)
    port = server.server_port

    def last_error() -> str | None:
        settle(server)  # it is recorded just after the answer went out
        return call(port, "GET", "/healthz")[2]["last_error"]

    assert last_error() is None
    pipeline.fail_with = RuntimeError("Infer Request is busy")
    assert_error(call(port, "POST", GENERATE, {"job": "title", "input": "x"}), 500, "generation_failed")
    assert last_error() == "generation_failed"
    pipeline.fail_with = None
    assert_error(call(port, "POST", GENERATE, {"job": "nope", "input": "x"}), 400, "invalid_request")
    assert call(port, "POST", GENERATE, {"job": "title", "input": "x"})[0] == 200
    assert last_error() == "generation_failed"  # 4xx and 200 leave it

    pipeline.reply = '"" **'
    assert_error(call(port, "POST", GENERATE, {"job": "title", "input": "x"}), 502, "empty_output")
    assert last_error() == "empty_output"


def test_healthz_names_the_busy_counter_on_the_npu(
    start_server: Callable[..., worker.WorkerHTTPServer], npu_settings: worker.Settings, busy_file: Path
) -> None:
    server = start_server(FakeNpuPipeline(npu_settings, busy_file=busy_file), device="NPU", busy_path=busy_file)
    status, _, health = call(server.server_port, "GET", "/healthz")
    assert (status, health["device"], health["npu_proof"], health["busy_counter"]) == (
        200, "NPU", "verified", str(busy_file))


# --------------------------------------------------------------------------------------------------
# 7. Doctor
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FakeHost:
    settings: worker.Settings
    accel_glob: str
    busy_counter_glob: str


def fake_npu_host(root: Path) -> FakeHost:
    """A host that can serve: an accel node, a busy counter, a model with a chat template, free everything."""
    (root / "dev" / "accel").mkdir(parents=True)
    node = root / "dev" / "accel" / "accel0"
    node.write_bytes(b"")
    node.chmod(0o660)
    counter = root / "sys" / "class" / "accel" / "accel0" / "device" / "npu_busy_time_us"
    counter.parent.mkdir(parents=True)
    counter.write_text("4242\n")
    model = root / "model"
    model.mkdir()
    for name in worker.GENAI_MODEL_FILES:
        (model / name).write_text("<net/>")
    (model / "openvino_model.xml").write_text(ir_header())
    (model / "chat_template.jinja").write_text("{{ messages }}")
    settings = worker.Settings(
        model_path=model, device="NPU", cache_dir=root / "cache", port=free_port(), lock_path=root / "lock" / "npu.lock"
    )
    return FakeHost(settings, str(root / "dev" / "accel" / "accel*"),
                    str(root / "sys/class/accel/accel*/device/npu_busy_time_us"))


def test_doctor_passes_on_a_good_npu_host(tmp_path: Path) -> None:
    host = fake_npu_host(tmp_path)
    checks = worker.doctor_checks(
        host.settings, accel_glob=host.accel_glob, busy_counter_glob=host.busy_counter_glob,
        list_devices=lambda: ["CPU", "NPU"], describe_npu=lambda: {"FULL_DEVICE_NAME": "Intel(R) AI Boost"},
    )
    assert [check.name for check in checks] == [
        "openvino", "device", "accel device", "busy counter", "npu holders", "model", "npu export", "cache dir",
        "lock", "port", "mcp bridge",
    ]
    assert [check for check in checks if not check.ok] == []
    details = {check.name: check.detail for check in checks}
    assert "FULL_DEVICE_NAME=Intel(R) AI Boost" in details["device"]
    assert details["busy counter"].endswith("npu_busy_time_us = 4242 us")
    assert details["lock"].endswith("is free")


def test_doctor_explains_every_problem_of_a_broken_npu_host(tmp_path: Path) -> None:
    host = fake_npu_host(tmp_path)
    (tmp_path / "dev" / "accel" / "accel0").unlink()  # no accel nodes
    shutil.rmtree(tmp_path / "sys")  # no busy counter (kernel < 6.11)
    (tmp_path / "model" / "chat_template.jinja").unlink()
    (tmp_path / "cache-is-a-file").write_text("")
    (tmp_path / "lock-dir-is-a-file").write_text("")
    settings = dataclasses.replace(
        host.settings, cache_dir=tmp_path / "cache-is-a-file", lock_path=tmp_path / "lock-dir-is-a-file" / "npu.lock"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = dataclasses.replace(settings, port=taken.getsockname()[1])
        checks = worker.doctor_checks(
            settings, accel_glob=host.accel_glob, busy_counter_glob=host.busy_counter_glob,
            list_devices=lambda: ["CPU"], describe_npu=dict,
        )
    failed = {check.name: check for check in checks if not check.ok}
    assert set(failed) == {"device", "accel device", "busy counter", "model", "cache dir", "lock", "port"}
    assert all(check.fix for check in failed.values())
    assert "NPU not found" in failed["device"].detail and "intel_vpu" in failed["device"].fix
    assert "no device node matches" in failed["accel device"].detail and "intel_vpu" in failed["accel device"].fix
    assert "6.11" in failed["busy counter"].detail + failed["busy counter"].fix  # which: this kernel's
    assert "no chat template" in failed["model"].detail
    assert "--cache-dir" in failed["cache dir"].fix
    assert "--lock-file" in failed["lock"].fix
    assert "--port" in failed["port"].fix


def accel_checks_as_nobody(accel_glob: str, nobody: int) -> list[dict[str, Any]]:
    """accel_node_checks in a forked child that dropped root (for root, os.access ignores the mode)."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: become nobody, in its own group as initgroups would do; check; report
        try:
            os.close(read_fd)
            os.setgroups([nobody])
            os.setgid(nobody)
            os.setuid(nobody)
            checks = worker.accel_node_checks(accel_glob)
            os.write(write_fd, json.dumps([dataclasses.asdict(check) for check in checks]).encode())
        except BaseException:  # noqa: BLE001 - a forked child must never return into pytest
            os._exit(1)
        os._exit(0)
    os.close(write_fd)
    data = b""
    try:
        deadline = time.monotonic() + 10.0
        while True:
            readable, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, "the unprivileged child did not answer"
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # a no-op once it has exited
        _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0, "the unprivileged child failed"
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0,
                    reason="needs root: to give device nodes a group this user is not in, then drop to nobody")
def test_doctor_says_which_accel_nodes_this_user_cannot_open() -> None:
    nobody = 65534
    root = Path(tempfile.mkdtemp(prefix="accel-"))  # nobody must be able to list it (tmp_path is 0700)
    try:
        root.chmod(0o755)
        for name, gid, mode in (("accel0", 0, 0o000), ("accel1", nobody, 0o000), ("accel2", nobody, 0o660)):
            (root / name).write_bytes(b"")
            os.chown(root / name, 0, gid)
            (root / name).chmod(mode)
        checks = accel_checks_as_nobody(str(root / "accel*"), nobody)
    finally:
        shutil.rmtree(root)
    group_0 = grp.getgrgid(0).gr_name
    assert [(check["name"], check["ok"]) for check in checks] == [
        ("accel device", False), ("accel device", False), ("accel device", True),
    ]
    foreign, member, usable = checks
    assert "mode 0" in foreign["detail"] and f"group {group_0}" in foreign["detail"]
    assert foreign["fix"] == f'sudo usermod -aG {group_0} "$USER", then log in again'
    assert member["fix"] == f"check the permissions of {root / 'accel1'}"  # in the group already: no usermod
    assert usable["detail"].endswith("is readable and writable")


def test_doctor_takes_the_committed_tiny_model_as_an_npu_export() -> None:
    check = worker.npu_export_check(TINY_MODEL)  # a real optimum export: int4_sym, ratio 1.0, channel-wise
    assert (check.ok, check.warning) == (True, False)
    assert check.detail.startswith("mode int4_sym, group_size -1, ratio 1.0")


@pytest.mark.parametrize("header,problems", [
    (ir_header(mode="int4_asym"), ["mode int4_asym is not int4_sym or int8_sym"]),
    (ir_header(ratio="0.8"), ["ratio 0.8 leaves layers uncompressed"]),
    (ir_header(group_size="64"), ["group size 64 is not 128 or -1"]),
    (ir_header(mode="nf4", group_size="32", ratio="0.5"), ["mode nf4", "ratio 0.5", "group size 32"]),
])
def test_doctor_warns_about_an_export_the_npu_does_not_take(tmp_path: Path, header: str, problems: list[str]) -> None:
    (tmp_path / "openvino_model.xml").write_text(header)
    check = worker.npu_export_check(tmp_path)
    assert (check.ok, check.warning) == (True, True)  # a warning: only the NPU compiler decides for sure
    for problem in problems:
        assert problem in check.detail
    assert check.fix == f"re-export: {worker.NPU_EXPORT_COMMAND}" and "--sym" in check.fix


@pytest.mark.parametrize("mode,group_size", [("int8_sym", "-1"), ("int4_sym", "128")])
def test_doctor_accepts_each_npu_recipe(tmp_path: Path, mode: str, group_size: str) -> None:
    (tmp_path / "openvino_model.xml").write_text(ir_header(mode=mode, group_size=group_size))
    assert not worker.npu_export_check(tmp_path).warning


def test_doctor_reads_optimums_config_when_the_ir_has_no_record(tmp_path: Path) -> None:
    (tmp_path / "openvino_model.xml").write_text('<?xml version="1.0"?>\n<net name="m" version="11"><layers /></net>\n')
    assert "records no weight compression" in worker.npu_export_check(tmp_path).detail
    config = {"quantization_config": {"bits": 4, "sym": False, "group_size": 128, "ratio": 1.0}}
    (tmp_path / "openvino_config.json").write_text(json.dumps(config))
    check = worker.npu_export_check(tmp_path)
    assert check.warning and "mode int4_asym is not" in check.detail


def test_doctor_prints_an_export_warning_and_still_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    host = fake_npu_host(tmp_path)
    (host.settings.model_path / "openvino_model.xml").write_text(ir_header(mode="int4_asym"))
    checks = worker.doctor_checks(
        host.settings, accel_glob=host.accel_glob, busy_counter_glob=host.busy_counter_glob,
        list_devices=lambda: ["CPU", "NPU"], describe_npu=dict,
    )
    assert all(check.ok for check in checks)
    # the fake host's globs, as run_doctor prints them
    monkeypatch.setattr(worker, "doctor_checks", lambda settings, **_: checks)
    assert worker.run_doctor(host.settings) == worker.EXIT_OK
    out = capsys.readouterr().out
    assert "warn  npu export: mode int4_asym" in out and "      fix: re-export: optimum-cli export openvino" in out
    assert out.splitlines()[-1] == "doctor: this host can serve"


@needs_tiny_model
def test_doctor_main_exits_0_on_this_cpu_host_and_78_with_the_port_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [name for name in os.environ if name.startswith("OV_GENAI_NPU_")]:
        monkeypatch.delenv(name)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        base = ["--doctor", "--device", "CPU", "--model", str(TINY_MODEL),
                "--lock-file", str(tmp_path / "lock" / "npu.lock"), "--cache-dir", str(tmp_path / "cache")]
        assert worker.main([*base, "--port", str(taken.getsockname()[1])]) == worker.EXIT_CONFIG
        in_use = capsys.readouterr().out
    assert "FAIL  port" in in_use and "fix: stop the process listening there" in in_use
    assert in_use.splitlines()[-1] == "doctor: cannot serve: port"
    assert worker.main([*base, "--port", str(free_port())]) == worker.EXIT_OK
    assert capsys.readouterr().out.splitlines()[-1] == "doctor: this host can serve"


# --------------------------------------------------------------------------------------------------
# 8. Batch
# --------------------------------------------------------------------------------------------------

BATCH_JOBS = ("title", "summary", "notification", "memory_candidate")
BATCH_TOKENS = {"title": 6, "summary": 10, "notification": 10, "memory_candidate": 12}
BAD_BATCH_LINES = (
    ('{"job": "title", "input": "cut off', "invalid_json"),
    ("[1, 2, 3]", "invalid_json"),
    (json.dumps({"job": "poem", "input": "x"}), "invalid_request"),
    (json.dumps({"job": "title", "input": "x" * 6001}), "input_too_long"),
    (json.dumps({"job": "title", "input": "y" * 80_000}), "body_too_large"),
    (json.dumps({"job": "summary", "input": PROMPT_TOO_LONG_INPUT}), "prompt_too_long"),
    (json.dumps({"id": [1], "job": "title", "input": "x"}), "invalid_request"),
    (json.dumps({"id": True, "job": "title", "input": "x"}), "invalid_request"),
    (json.dumps({"id": "z" * 201, "job": "title", "input": "x"}), "invalid_request"),
)


def batch_entries(good: int) -> list[tuple[str, dict[str, Any] | None]]:
    """(line, what its output must be) - None for a blank line - good jobs with bad lines among them."""
    entries: list[tuple[str, dict[str, Any] | None]] = []
    bad = list(BAD_BATCH_LINES)
    for index in range(good):
        job = BATCH_JOBS[index % len(BATCH_JOBS)]
        item_id: Any = (index, f"item-{index}", None)[index % 3]
        record = {
            "job": job,
            "input": f"Item {index}: the quarterly report is due on Friday.",
            "max_new_tokens": BATCH_TOKENS[job],
        }
        entries.append((json.dumps({"id": item_id, **record} if item_id is not None else record),
                        {"id": item_id, "job": job}))
        if index % 10 == 5 and bad:
            line, error_type = bad.pop(0)
            entries.append((line, {"error": error_type}))
        if index in (20, 50):
            entries.append(("" if index == 20 else "  \t ", None))
    return entries


def check_batch_output(stdout: str, entries: list[tuple[str, dict[str, Any] | None]]) -> None:
    records = [json.loads(line) for line in stdout.splitlines()]
    expected = [(number, want) for number, (_, want) in enumerate(entries, start=1) if want is not None]
    assert [record["line"] for record in records] == [number for number, _ in expected]
    for record, (number, want) in zip(records, expected):
        assert re.fullmatch(r"[0-9a-f]{32}", record["request_id"]), record
        if "error" in want:
            assert set(record) == {"line", "error", "request_id"}, record
            assert record["error"]["type"] == want["error"], (number, record)
        else:
            assert "error" not in record, (number, record)
            assert record.get("id") == want["id"] and ("id" in record) == (want["id"] is not None)
            assert list(record)[:2] == (["line", "id"] if want["id"] is not None else ["line", "request_id"])
            assert (record["job"], record["device"]) == (want["job"], "CPU")
            assert record["tokens"]["max_new_tokens"] == BATCH_TOKENS[want["job"]]


@needs_tiny_model
def test_batch_of_100_jobs_reports_every_line_in_order_with_one_model_load(tmp_path: Path) -> None:
    entries = batch_entries(good=100 - len(BAD_BATCH_LINES))
    assert sum(want is not None for _, want in entries) == 100
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(line for line, _ in entries))  # the last line has no newline
    environ = {k: v for k, v in worker_env(tmp_path).items() if k != "NOTIFY_SOCKET"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "worker.py"), "--batch", str(path)],
        env=environ, stdin=subprocess.DEVNULL, check=False, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert completed.returncode == worker.EXIT_FAILED, completed.stderr[-2000:]
    check_batch_output(completed.stdout, entries)
    progress = re.findall(r"^batch: (\d+) done, (\d+) failed$", completed.stderr, re.MULTILINE)
    assert [int(done) + int(failed) for done, failed in progress] == list(range(1, 101))  # apart
    assert progress[-1] == (str(100 - len(BAD_BATCH_LINES)), str(len(BAD_BATCH_LINES)))
    bad = len(BAD_BATCH_LINES)
    assert f"batch: finished: 100 jobs: {100 - bad} done, {bad} failed" in completed.stderr
    assert completed.stderr.count("event=model_loaded") == 1


@needs_tiny_model
def test_batch_from_stdin_with_only_good_lines_exits_0(tmp_path: Path) -> None:
    entries = batch_entries(good=4)
    entries.insert(2, ("", None))
    environ = {k: v for k, v in worker_env(tmp_path).items() if k != "NOTIFY_SOCKET"}
    completed = subprocess.run(
        [sys.executable, str(REPO / "worker.py"), "--batch", "-"],
        env=environ, input="\n".join(line for line, _ in entries) + "\n", check=False, capture_output=True,
        text=True, timeout=SUBPROCESS_TIMEOUT_S,
    )
    assert completed.returncode == worker.EXIT_OK, completed.stderr[-2000:]
    check_batch_output(completed.stdout, entries)
    assert [json.loads(line)["line"] for line in completed.stdout.splitlines()] == [1, 2, 4, 5]
    assert "batch: finished: 4 jobs: 4 done, 0 failed" in completed.stderr


class ProofOnlyWithoutMarker(FakeNpuPipeline):
    """The busy counter does not move for a prompt that says NO-NPU."""

    def generate(self, prompt: worker.Prompt, max_new_tokens: int, grammar: str | None, should_stop: Callable[[], bool],
                 stop_rules: str | None = None) -> worker.Generation:
        increment_us = self.busy_increment_us
        if "NO-NPU" in prompt.text:
            self.busy_increment_us = 0
        try:
            return super().generate(prompt, max_new_tokens, grammar, should_stop, stop_rules)
        finally:
            self.busy_increment_us = increment_us


def test_batch_on_the_npu_exits_3_when_a_line_fails_its_proof(
    tmp_path: Path, busy_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [name for name in os.environ if name.startswith("OV_GENAI_NPU_")]:
        monkeypatch.delenv(name)
    base = ["--device", "NPU", "--model", str(tmp_path / "fake-npu-model"), "--busy-path", str(busy_file),
            "--lock-file", str(tmp_path / "lock" / "npu.lock"), "--cache-dir", str(tmp_path / "cache")]

    def run(*lines: dict[str, Any]) -> tuple[int, list[dict[str, Any]]]:
        path = tmp_path / f"batch-{uuid.uuid4().hex}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        code = worker.main(["--batch", str(path), *base],
                           pipeline_factory=lambda s: ProofOnlyWithoutMarker(s, busy_file=busy_file))
        return code, [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    good = {"id": 1, "job": "title", "input": "x"}
    no_npu = {"id": 2, "job": "title", "input": "NO-NPU"}
    code, records = run(good, no_npu, {"job": "poem", "input": "x"})
    assert code == worker.EXIT_PROOF_FAILED
    assert (records[0]["npu_proof"], records[0]["npu_busy_delta_us"]) == ("verified", 1500)
    assert records[1]["error"]["type"] == "npu_proof_failed" and records[1]["result"]["npu_busy_delta_us"] == 0
    assert records[2]["error"]["type"] == "invalid_request"
    assert run(good, {"job": "poem", "input": "x"})[0] == worker.EXIT_FAILED  # the 3 above came from the proof
    assert run(good, good)[0] == worker.EXIT_OK


def test_batch_echoes_the_id_of_a_line_that_fails_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [name for name in os.environ if name.startswith("OV_GENAI_NPU_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps({"id": "x7", "job": "poem", "input": "x"}) + "\n"
                    + json.dumps({"id": 8, "job": "title", "input": "x" * 6001}) + "\n")
    code = worker.main(
        ["--batch", str(path), "--device", "CPU", "--model", str(TINY_MODEL),
         "--lock-file", str(tmp_path / "lock" / "npu.lock"), "--cache-dir", str(tmp_path / "cache")],
        pipeline_factory=FakeNpuPipeline,
    )
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == worker.EXIT_FAILED
    assert [record["error"]["type"] for record in records] == ["invalid_request", "input_too_long"]
    assert [record.get("id") for record in records] == ["x7", 8]
