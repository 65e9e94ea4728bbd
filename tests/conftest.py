"""Shared fixtures: the tiny real model, a hand-written fake NPU pipeline and a synthetic counter."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import worker

TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-chatml-ov"

class FakeNpuPipeline:
    """Fakes what GenAI's real NPU path (tests/test_npu_path.py) cannot show: the kernel's busy counter.

    A scripted, instant pipeline: a prompt token is a whitespace-separated word of the rendered
    prompt, the reply is fixed, every generate() adds ``busy_increment_us`` to a synthetic
    npu_busy_time_us file the way the NPU advances the real one (or does not, with 0), and
    ``fail_with`` makes the device refuse.  Prompt limits, the context stop, cancellation and
    structured output are GenAI's own on the emulated NPU path; they are not imitated here.
    """

    def __init__(
        self,
        settings: worker.Settings,
        *,
        reply: str = "Quarterly revenue up twelve percent",
        busy_file: Path | None = None,
        busy_increment_us: int = 1500,
        fail_with: BaseException | None = None,
        seconds_per_token: float = 0.0,
    ) -> None:
        self.settings = settings
        self.reply = reply
        self.busy_file = busy_file
        self.busy_increment_us = busy_increment_us
        self.fail_with = fail_with
        self.seconds_per_token = seconds_per_token
        self.calls: list[dict[str, Any]] = []

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, text: str) -> worker.Prompt:
        return worker.Prompt(text=text, token_count=self.count_tokens(text))

    def generate(
        self,
        prompt: worker.Prompt,
        max_new_tokens: int,
        grammar: str | None,
        should_stop: Callable[[], bool],
        stop_rules: str | None = None,
    ) -> worker.Generation:
        """A token is a word with the white space before it, run through the worker's own StopWatch
        (cancellation and stop rules) as the real streamer does."""
        prompt_tokens = prompt.token_count
        self.calls.append({"prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "grammar": grammar})
        if self.fail_with is not None:
            raise self.fail_with
        busy_until = time.monotonic()
        if self.busy_file is not None:
            busy = int(self.busy_file.read_text())
            self.busy_file.write_text(str(busy + self.busy_increment_us))
            # A device busy for that long takes that long: the worker refuses a delta over the wall time.
            busy_until += max(0, self.busy_increment_us) / 1e6
        tokens = re.findall(r"\s*\S+", self.reply)
        ids = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
        triggers = frozenset(index for token, index in ids.items()
                             if stop_rules and set(token) & set(worker.STOP_TRIGGER_CHARS[stop_rules]))
        pieces = {index: token for token, index in ids.items()}
        watch = worker.StopWatch(should_stop, stop_rules, lambda token_ids: "".join(pieces[i] for i in token_ids),
                                 triggers)
        generated, finish = min(len(tokens), max_new_tokens), "stop"
        if generated < len(tokens):
            finish = "length"
        for index in range(generated):  # the streamer is asked after every token, as in GenAI
            time.sleep(self.seconds_per_token)
            verdict = watch.step([ids[tokens[index]]])
            if verdict is not None:
                generated, finish = index + 1, "cancelled" if verdict == worker.CANCEL else "stop"
                break
        time.sleep(max(0.0, busy_until - time.monotonic()))
        return worker.Generation(
            text="".join(tokens[:generated]).strip(), prompt_tokens=prompt_tokens, generated_tokens=generated,
            finish_reason=finish, stop_rule=watch.stop_rule if finish == "stop" else None,
        )


def ir_header(mode: str = "int4_sym", group_size: str = "-1", ratio: str = "1.0") -> str:
    """A small openvino_model.xml whose rt_info has nncf's weight_compression record, laid out as
    optimum/nncf write it (the committed tiny model is the real thing)."""
    return (
        '<?xml version="1.0"?>\n<net name="Model0" version="11">\n\t<layers />\n\t<edges />\n\t<rt_info>\n'
        '\t\t<nncf>\n\t\t\t<version value="3.4.0" />\n\t\t\t<weight_compression>\n'
        f'\t\t\t\t<group_size value="{group_size}" />\n\t\t\t\t<mode value="{mode}" />\n'
        f'\t\t\t\t<ratio value="{ratio}" />\n\t\t\t</weight_compression>\n\t\t</nncf>\n'
        '\t</rt_info>\n</net>\n'
    )


@pytest.fixture
def busy_file(tmp_path: Path) -> Path:
    path = tmp_path / "npu_busy_time_us"
    path.write_text("1000000\n")
    return path


@pytest.fixture
def npu_settings(tmp_path: Path, busy_file: Path) -> worker.Settings:
    return worker.Settings(
        model_path=tmp_path / "fake-npu-model",
        device="NPU",
        cache_dir=None,
        lock_path=tmp_path / "lock" / "npu.lock",
        lock_timeout_s=5.0,
        busy_path=busy_file,
    )


def make_worker(settings: worker.Settings, pipeline: Any, *, warm_up: bool = True) -> worker.Worker:
    """A loaded worker around a given pipeline, with the real counter, lock and queue."""
    built = worker.build_worker(settings, lambda _settings: pipeline)
    built.load(warm_up=warm_up)
    if not warm_up:
        built._ready.set()
    return built


def serve_in_thread(
    settings: worker.Settings, factory: worker.PipelineFactory, *, load: bool = True
) -> worker.WorkerHTTPServer:
    """Bind in the caller's thread (port 0 is fine), serve in a daemon thread; the caller shuts down."""
    built = worker.build_worker(settings, factory)
    if load:
        built.load()
    server = worker.WorkerHTTPServer(settings, built)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cpu_settings(tmp_path: Path, **changes: Any) -> worker.Settings:
    settings = worker.Settings(
        model_path=TINY_MODEL,
        device="CPU",
        cache_dir=None,
        lock_path=tmp_path / "lock" / "npu.lock",
        lock_timeout_s=30.0,
    )
    return dataclasses.replace(settings, **changes)


def compile_cache(tmp_path: Path) -> Path:
    """One OpenVINO compile cache per pytest process (tmp_path's parent is its base directory),
    as a service has one: through the emulated NPU a load from it takes 0.4 s against a 1.5 s
    compile, on the CPU 0.15 s against 0.3 s.  Tests about the cache itself pass their own."""
    return tmp_path.parent / "compile-cache"


def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: tiny model on CPU, private lock, the shared cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OV_GENAI_NPU_")}
    env.update(
        OV_GENAI_NPU_MODEL=str(TINY_MODEL),
        OV_GENAI_NPU_DEVICE="CPU",
        OV_GENAI_NPU_LOCK=str(tmp_path / "lock" / "npu.lock"),
        OV_GENAI_NPU_CACHE=str(compile_cache(tmp_path)),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., worker.WorkerHTTPServer]]:
    """In-process servers on 127.0.0.1:0 with a fake pipeline unless given one; always shut down.

    ``changes`` go into the CPU settings; ``factory`` replaces the pipeline altogether.
    """
    servers: list[worker.WorkerHTTPServer] = []

    def start(
        pipeline: Any = None,
        *,
        load: bool = True,
        factory: worker.PipelineFactory | None = None,
        **changes: Any,
    ) -> worker.WorkerHTTPServer:
        settings = dataclasses.replace(cpu_settings(tmp_path, port=0, lock_timeout_s=5.0), **changes)
        if factory is None:
            chosen = pipeline or FakeNpuPipeline(settings)
            factory = lambda _settings: chosen
        server = serve_in_thread(settings, factory, load=load)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------------------------
# One helper per purpose for every test file: HTTP calls, the error shape, waiting, a free port and
# the daemon as a subprocess.  (Each had been copied into three or four files and drifted apart.)
# --------------------------------------------------------------------------------------------------

HTTP_TIMEOUT_S = 10.0
DAEMON_START_TIMEOUT_S = 60.0
DAEMON_STOP_TIMEOUT_S = 30.0
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
Response = tuple[int, http.client.HTTPMessage, Any]

needs_tiny_model = pytest.mark.skipif(not TINY_MODEL.is_dir(), reason=f"tiny model missing: {TINY_MODEL}")


def free_port() -> int:
    """A port free right now on 127.0.0.1 (for a process that must be told its port up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll a state that has no event of its own (another thread's counter, another process's
    /proc) for at most ``timeout_s``; whether it came true."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def fetch(
    target: int | worker.WorkerHTTPServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request on a new connection (a port, or an in-process server); a body that is not
    bytes is sent as JSON, any body with ``Content-Type: application/json``."""
    port = target if isinstance(target, int) else target.server_port
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        payload = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if payload is not None else {}
        all_headers.update(headers or {})
        connection.request(method, path, body=payload, headers=all_headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def call(
    target: int | worker.WorkerHTTPServer,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> Response:
    """fetch() of a JSON answer: (status, headers, decoded body)."""
    status, response_headers, data = fetch(target, method, path, body, headers, timeout_s)
    assert response_headers["Content-Type"] == "application/json", (status, data[:200])
    return status, response_headers, json.loads(data)


def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    """An answer in the one error shape (CONTRACT.md, Errors): a Response from call(), or a raw
    reply with ``status``, ``headers`` (lower-case names), ``header()``, ``body`` and ``json()``
    (test_hostile's Reply).  Its body is returned."""
    if isinstance(response, tuple):
        got_status, headers, body = response
        header, names, raw = headers.get, [name.lower() for name in headers], json.dumps(body).encode()
    else:
        got_status, header, names, raw, body = response.status, response.header, list(response.headers), \
            response.body, response.json()
    assert (got_status, body["error"]["type"]) == (status, error_type), body
    assert header("Content-Type") == "application/json"
    assert {"error", "request_id"} <= set(body) <= {"error", "request_id", "result"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert REQUEST_ID.match(body["request_id"]) and header("X-Request-Id") == body["request_id"], body
    assert b"<html" not in raw.lower() and b"Traceback" not in raw
    assert not [name for name in names if name.startswith("access-control-")]  # no CORS, ever
    return body


class Daemon:
    """``python worker.py --port 0 ARGS`` (or ``command``) with the tiny model on CPU, a private
    lock and cache; its port comes from its "listening" log line, its log is kept in memory."""

    def __init__(self, tmp_path: Path, *args: str, command: list[str] | None = None, **env: str) -> None:
        environ = worker_env(tmp_path)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):  # in case pytest runs under systemd
            environ.pop(name, None)
        environ.update(env)
        self.env = environ
        self.lock_path = Path(environ["OV_GENAI_NPU_LOCK"])
        self.process = subprocess.Popen(
            command or [sys.executable, str(REPO / "worker.py"), "--port", "0", *args], cwd=REPO,
            env=environ, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self.port: int | None = None
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(r"event=listening url=http://127\.0\.0\.1:(\d+)/", line)
            if match:
                self.port = int(match.group(1))
                self._listening.set()
        self._listening.set()  # end of output: wake a waiter, who then finds no port

    def wait_listening(self) -> int:
        assert self._listening.wait(DAEMON_START_TIMEOUT_S) and self.port is not None, "".join(self.log)
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.wait_listening()}"

    def wait_ready(self) -> int:
        """Until /healthz says 200 (the model loaded and warmed up); the port."""
        port = self.wait_listening()
        deadline = time.monotonic() + DAEMON_START_TIMEOUT_S
        while True:
            log = "".join(self.log)[-3000:]
            assert self.process.poll() is None, f"daemon exited {self.process.returncode}: {log}"
            with contextlib.suppress(OSError, http.client.HTTPException):
                if fetch(port, "GET", "/healthz", timeout_s=2.0)[0] == 200:
                    return port
            assert time.monotonic() < deadline, f"daemon not ready: {''.join(self.log)[-3000:]}"
            time.sleep(0.02)  # another process: no event to wait on

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(DAEMON_STOP_TIMEOUT_S)

    def log_text(self) -> str:
        """The whole log; call once the process has exited."""
        self._reader.join(HTTP_TIMEOUT_S)
        return "".join(self.log)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(DAEMON_STOP_TIMEOUT_S)
        self._reader.join(HTTP_TIMEOUT_S)
        if self.process.stderr is not None:
            self.process.stderr.close()


@contextlib.contextmanager
def running_daemon(tmp_path: Path, *args: str, **env: Any) -> Iterator[Daemon]:
    """A Daemon, killed on the way out if it is still running."""
    daemon = Daemon(tmp_path, *args, **env)
    try:
        yield daemon
    finally:
        daemon.kill()


@pytest.fixture(scope="session")
def tiny_worker(tmp_path_factory: pytest.TempPathFactory) -> worker.Worker:
    """One loaded, warmed-up worker on the tiny model (CPU, default settings) for every test that
    runs jobs on it without changing its settings: the model is loaded once per session."""
    built = worker.build_worker(cpu_settings(tmp_path_factory.mktemp("tiny")), worker.load_genai_pipeline)
    built.load()
    return built


@dataclasses.dataclass(frozen=True)
class TinyDaemon:
    port: int
    env: dict[str, str]
    log_path: Path


@pytest.fixture(scope="session")
def tiny_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyDaemon]:
    """One real daemon (`python worker.py`) on the tiny model on CPU for the whole session, on a
    free port; its log goes to a file.  For tests that talk to the daemon as its clients do."""
    import signal
    import socket
    import subprocess
    import urllib.request

    tmp_path = tmp_path_factory.mktemp("tiny-daemon")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = worker_env(tmp_path, OV_GENAI_NPU_PORT=str(port))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "worker.py")], cwd=REPO, env=env, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the tiny daemon did not become ready"
            time.sleep(0.05)  # another process: no event to wait on
        yield TinyDaemon(port, env, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


# --- the order in which pytest-xdist hands out the modules -------------------------------------------

# The slowest modules first, measured (seconds alone on two cores: python -m pytest tests/test_x.py),
# so that no long one starts last and keeps one process busy while the others have finished.
# README's command passes --no-loadscope-reorder, or xdist would sort modules by their number of
# tests instead, which puts the one-test bench and the 5-test SmolLM2 module at the very end.
# The ones that mostly wait (slowloris, service, hostile) are early too: others run meanwhile.
SLOWEST_MODULES_FIRST = (
    "test_slowloris.py",  # 35 s, 6 of them CPU
    "test_npu_path_smollm2.py",  # 22 s, 37 CPU (skipped without the SmolLM2 IR)
    "test_service.py",  # 17 s, 7 of them CPU
    "test_real_model.py",  # 16 s, 26 CPU
    "test_npu_path.py",  # 13 s
    "test_bench.py",  # 13 s, 19 CPU
    "test_docs.py",  # 11 s
    "test_hostile.py",  # 10 s, 3 of them CPU
    "test_mcp_docs.py",  # 10 s (more when npx has to fetch the agents' packages)
    "test_lock.py",  # 8 s
    "test_systemd.py",  # 8 s
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(SLOWEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
