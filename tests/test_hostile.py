"""Hostile inputs against a live in-process worker, over raw sockets.

A walk of the catalogue in shared/notes/hostile-inputs.md (cases 1-22 and 27; 23-26 are the lock
suite's, 28 (SIGTERM) is covered elsewhere). Every case asserts the status, the JSON error body
({"error": {"type", "message"}, "request_id"}), whether the connection was closed, and that the
daemon still serves a normal job afterwards.

Pipelines:
- ``fake_server`` (one per module): the FakeNpuPipeline from conftest, for every case where the
  model does not matter (cases 1-4, 7-14, 18-20: all are refused before or instead of a job). A
  pass-through wrapper counts generate() calls so that "no job ran" is checked.
- ``start_server``: FakeNpuPipeline servers with their own settings or pipeline behaviour: a token
  (5), a connection cap (16), a slow pipeline for the queue (17), a failing pipeline for the
  canary sweep (21-22), and the tests that monkeypatch the handler's read timeout (12, 15).
  ``WorkerRequestHandler.timeout`` is 10 s in production; those tests set it to 0.5-1.5 s.
- ``real_server``: the real tiny model (tests/fixtures/tiny-chatml-ov) loaded with
  ``worker.load_genai_pipeline`` on the CPU, for ``test_the_real_model_still_serves_after_each_hostile_request``:
  one representative of each case family, each followed by a real generation.

Every socket has a timeout and every loop is bounded; all traffic goes to 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import pytest

import worker
from conftest import TINY_MODEL
from conftest import FakeNpuPipeline
from conftest import assert_error
from conftest import cpu_settings
from conftest import serve_in_thread
from conftest import wait_for

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; annotations here are never evaluated

SOCKET_TIMEOUT_S = 5.0
JOB_BODY = b'{"job": "title", "input": "Quarterly revenue is up twelve percent."}'
TOKEN = "hostile-test-token-0123456789"
CANARY = "CANARY-h0st1le-5e1f"
# What the stock BaseHTTPRequestHandler gives away and this worker must not.
CORS_PREFIX = "access-control-"


# --- raw HTTP over a socket ------------------------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, list[str]]  # lower-case names
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One client connection that reads exactly one response at a time."""

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT_S) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""
        self.eof = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def answered_within(self, seconds: float) -> bool:
        """True once the server has sent something (or closed) within ``seconds``."""
        readable, _, _ = select.select([self.sock], [], [], seconds)
        return bool(readable)

    def reply(self) -> Reply:
        for _ in range(10_000):  # bounded: each recv has the socket timeout
            if b"\r\n\r\n" in self.buffer:
                break
            if not self._fill():
                raise AssertionError(f"connection closed before a complete response: {self.buffer[:200]!r}")
        else:
            raise AssertionError("no end of headers")
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (status_line.split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1", status_line
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(headers.get("content-length", ["0"])[-1]) if int(status) >= 200 else 0
        for _ in range(10_000):
            if len(self.buffer) >= length:
                break
            if not self._fill():
                raise AssertionError("connection closed inside a response body")
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return Reply(int(status), reason, headers, body, head + b"\r\n\r\n" + body)

    def closed_within(self, seconds: float) -> bool:
        """True if the server closes the connection (EOF or reset) within ``seconds`` and sends nothing more."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(SOCKET_TIMEOUT_S)
        assert not data and not self.buffer, f"unexpected extra bytes: {(self.buffer + data)[:300]!r}"
        return True

    def read_all(self, seconds: float = SOCKET_TIMEOUT_S) -> bytes:
        """Everything until the server closes, or until ``seconds`` pass without data; sets ``eof``."""
        self.sock.settimeout(seconds)
        chunks = [self.buffer]
        self.buffer = b""
        try:
            for _ in range(10_000):
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.eof = True
                    break
                chunks.append(chunk)
        except ConnectionResetError:
            self.eof = True
        except TimeoutError:
            pass
        return b"".join(chunks)


def request(
    port: int,
    method: str = "GET",
    path: str = "/healthz",
    *,
    body: bytes | None = None,
    host: str | None = "default",
    content_type: str | None = "application/json",
    length: bool = True,
    headers: tuple[str, ...] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    """A raw request; ``host=None`` sends no Host header, a body gets Content-Type and -Length."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {f'127.0.0.1:{port}' if host == 'default' else host}")
    lines.extend(headers)
    if body is not None:
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if length:
            lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def exchange(port: int, data: bytes, timeout: float = SOCKET_TIMEOUT_S) -> tuple[Reply, bool]:
    """Send one request; (its response, whether the server then closed the connection).

    "Not closed" is proven, not assumed: a second request on the same connection gets its answer.
    """
    with Conn(port, timeout) as conn:
        conn.send(data)
        reply = conn.reply()
        if reply.header("Connection") == "close":
            return reply, conn.closed_within(timeout)
        conn.send(request(port, "GET", "/livez"))
        assert conn.reply().status == 200, "the connection kept open is out of step"
        return reply, False


def parse(data: bytes) -> Reply:
    """The first response in a byte stream that the server has closed."""
    conn = Conn.__new__(Conn)  # a Conn over bytes already read: reply() never needs the socket
    conn.buffer, conn.eof = data, True
    conn._fill = lambda: False  # type: ignore[method-assign]
    return conn.reply()


def parse_replies(data: bytes) -> list[int]:
    """Status codes of every response in a byte stream (bodies skipped by Content-Length)."""
    statuses = []
    for _ in range(100):
        if not data:
            break
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"truncated response: {data[:200]!r}"
        match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
        assert match, f"not a status line: {head[:80]!r}"
        statuses.append(int(match.group(1)))
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        data = rest[int(length.group(1)) if length and statuses[-1] >= 200 else 0:]
    return statuses


def assert_serves(server: worker.WorkerHTTPServer, *headers: str) -> dict[str, Any]:
    """A normal job on a fresh connection succeeds: the daemon survived the previous case."""
    port = server.server_port
    reply, _ = exchange(port, request(port, "POST", "/v1/worker/generate", body=JOB_BODY, headers=headers), timeout=30)
    assert reply.status == 200, reply.raw[:400]
    result = reply.json()
    assert result["job"] == "title" and isinstance(result["text"], str) and result["text"]
    assert result["request_id"] == reply.header("X-Request-Id")
    return result


# --- servers ---------------------------------------------------------------------------------------


class CountingPipeline:
    """The real GenAI pipeline, counting generate() calls so that "no job ran" is observable."""

    def __init__(self, inner: worker.Pipeline) -> None:
        self.inner = inner
        self.generate_calls = 0
        self._lock = threading.Lock()

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.inner.render_prompt(messages)

    def encode(self, text: str) -> worker.Prompt:
        return self.inner.encode(text)

    def generate(self, *args: Any, **kwargs: Any) -> worker.Generation:
        with self._lock:
            self.generate_calls += 1
        return self.inner.generate(*args, **kwargs)


def serve(settings: worker.Settings, pipeline: Any) -> worker.WorkerHTTPServer:
    return serve_in_thread(settings, lambda _settings: pipeline)


@pytest.fixture(scope="module")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[worker.WorkerHTTPServer]:
    """One FakeNpuPipeline server for the cases where the model does not matter."""
    settings = cpu_settings(tmp_path_factory.mktemp("hostile-fake"), port=0)
    pipeline = CountingPipeline(FakeNpuPipeline(settings))
    server = serve(settings, pipeline)
    server.pipeline = pipeline  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[worker.WorkerHTTPServer]:
    """The real tiny model on the CPU, for the walk that must end with real generations."""
    settings = cpu_settings(tmp_path_factory.mktemp("hostile-real"), port=0)
    pipelines: list[CountingPipeline] = []

    def factory(settings: worker.Settings) -> CountingPipeline:
        pipelines.append(CountingPipeline(worker.load_genai_pipeline(settings)))
        return pipelines[0]

    built = worker.build_worker(settings, factory)
    built.load()
    server = worker.WorkerHTTPServer(settings, built)
    server.pipeline = pipelines[0]  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def generate_calls(server: worker.WorkerHTTPServer) -> int:
    return server.pipeline.generate_calls  # type: ignore[attr-defined]


def server_errors(server: worker.WorkerHTTPServer) -> int:
    """5xx answers so far, from the worker's own request counters."""
    return sum(count for (_, _, status), count in server.worker.metrics.requests.items() if status >= 500)


@pytest.fixture
def start_server(start_server: Callable[..., worker.WorkerHTTPServer]) -> Callable[..., worker.WorkerHTTPServer]:
    """conftest's servers, with the pipeline at hand as ``server.pipeline``."""

    def start(pipeline: Any = None, **changes: Any) -> worker.WorkerHTTPServer:
        server = start_server(pipeline, **changes)
        server.pipeline = server.worker._pipeline  # type: ignore[attr-defined]
        return server

    return start


@pytest.fixture
def short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """The gate's deadlines (head 5 s, body 10 s, idle 10 s in production) are 0.5 s here, so that
    timeout tests stay fast."""
    for name in ("HEAD_DEADLINE_S", "BODY_DEADLINE_S", "IDLE_TIMEOUT_S"):
        monkeypatch.setattr(worker, name, 0.5)
    return 0.5


# --- 1-2: Host -------------------------------------------------------------------------------------

BAD_HOSTS = {
    "foreign": "evil.example:{port}",
    "foreign-no-port": "evil.example",
    "empty-name": ":{port}",
    "empty": "",
    "any-address": "0.0.0.0:{port}",
    "dot-local": "x.local",
    "dot-local-port": "x.local:{port}",
    "localhost-suffix": "localhost.evil.example:{port}",
    "trailing-dot": "127.0.0.1.:{port}",
    "other-loopback-ip": "127.0.0.2:{port}",
    "decimal-ip": "2130706433:{port}",
    "mapped-v6": "[::ffff:127.0.0.1]:{port}",
    "wrong-port-ipv4": "127.0.0.1:{other}",
    "wrong-port-localhost": "localhost:{other}",
    "wrong-port-ipv6": "[::1]:{other}",
    "userinfo": "127.0.0.1:{port}@evil.example",
}


@pytest.mark.parametrize("host", list(BAD_HOSTS.values()), ids=list(BAD_HOSTS))
def test_1_2_a_host_not_naming_this_worker_is_403_before_the_body_is_read(
    fake_server: worker.WorkerHTTPServer, host: str
) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    host = host.format(port=port, other=port + 1 if port < 65535 else port - 1)
    # Content-Length promises 100 bytes that never come: reading the body would hang until timeout.
    data = request(port, "POST", "/v1/worker/generate", host=host,
                   headers=("Content-Type: application/json", "Content-Length: 100"))
    started = time.monotonic()
    reply, closed = exchange(port, data, timeout=3)
    assert time.monotonic() - started < 2.5
    assert_error(reply, 403, "forbidden")
    assert reply.header("Connection") == "close" and closed
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


def test_2_missing_or_duplicated_host_is_403(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    cases = {
        "HTTP/1.0 without Host": request(port, host=None, version="HTTP/1.0"),
        "HTTP/1.1 without Host": request(port, host=None),
        "duplicated, both valid": request(port, headers=(f"Host: 127.0.0.1:{port}",)),
        "duplicated, one foreign": request(port, headers=("Host: evil.example",)),
    }
    for name, data in cases.items():
        reply, closed = exchange(port, data)
        assert_error(reply, 403, "forbidden")
        assert closed, name
    assert_serves(fake_server)


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:{port}", "localhost", "localhost:{port}", "LOCALHOST:{port}", "[::1]", "[::1]:{port}"],
)
def test_1_2_loopback_host_names_with_the_right_port_or_none_pass(
    fake_server: worker.WorkerHTTPServer, host: str
) -> None:
    port = fake_server.server_port
    reply, closed = exchange(port, request(port, host=host.format(port=port)))
    assert reply.status == 200 and reply.json()["status"] == "ok"
    assert not closed  # keep-alive
    reply, _ = exchange(port, request(port, "POST", "/v1/worker/generate", body=JOB_BODY, host=host.format(port=port)),
                        timeout=30)
    assert reply.status == 200 and reply.json()["job"] == "title"


def test_2_http_1_0_with_a_good_host_is_served_and_closed(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    reply, closed = exchange(port, request(port, "GET", "/livez", version="HTTP/1.0"))
    assert reply.status == 200 and reply.header("Connection") == "close" and closed


# --- 3: Origin, Sec-Fetch-Site, CORS ---------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        "Origin: null",
        "Origin: http://evil.example",
        "Origin: http://127.0.0.1:{port}",  # even this worker's own origin: no browser page is a client
        "Origin: ",
        "Sec-Fetch-Site: cross-site",
        "Sec-Fetch-Site: same-site",
        "Sec-Fetch-Site: CROSS-SITE",
    ],
)
def test_3_origin_or_cross_site_fetch_is_403(fake_server: worker.WorkerHTTPServer, header: str) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    data = request(port, "POST", "/v1/worker/generate", body=JOB_BODY, headers=(header.format(port=port),))
    reply, closed = exchange(port, data)
    assert_error(reply, 403, "forbidden")
    assert closed and generate_calls(fake_server) == calls
    assert_serves(fake_server)


@pytest.mark.parametrize("value", ["same-origin", "none"])
def test_3_same_origin_and_user_initiated_fetch_metadata_pass(fake_server: worker.WorkerHTTPServer, value: str) -> None:
    port = fake_server.server_port
    reply, _ = exchange(port, request(port, headers=(f"Sec-Fetch-Site: {value}",)))
    assert reply.status == 200


@pytest.mark.parametrize("path", ["/v1/worker/generate", "/healthz", "*"])
@pytest.mark.parametrize("origin", [True, False], ids=["preflight", "plain"])
def test_3_options_never_gets_cors_headers(fake_server: worker.WorkerHTTPServer, path: str, origin: bool) -> None:
    port = fake_server.server_port
    headers = ("Access-Control-Request-Method: POST", "Access-Control-Request-Headers: content-type")
    if origin:
        headers += ("Origin: http://evil.example",)
    reply, closed = exchange(port, request(port, "OPTIONS", path, headers=headers))
    assert reply.status in (403, 404, 405) and reply.status != 200
    expected = (403, "forbidden") if origin else ((404, "not_found") if path == "*" else (405, "method_not_allowed"))
    assert_error(reply, *expected)  # also asserts: no Access-Control-* header
    if expected[0] == 405:
        assert reply.header("Allow") == ("POST" if path.startswith("/v1") else "GET, HEAD")
    assert closed
    # ...and a successful answer has none either.
    reply, _ = exchange(port, request(port))
    assert reply.status == 200 and not [name for name in reply.headers if name.startswith(CORS_PREFIX)]


# --- 4: media types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x", "application/jsonx", None,
    ],
)
def test_4_a_body_that_is_not_application_json_is_415_and_no_job_runs(
    fake_server: worker.WorkerHTTPServer, content_type: str | None
) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    # The body is valid JSON.
    data = request(port, "POST", "/v1/worker/generate", body=JOB_BODY, content_type=content_type)
    reply, closed = exchange(port, data)
    assert_error(reply, 415, "unsupported_media_type")
    assert closed  # the body was not read
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


def test_4_application_json_with_parameters_passes(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    reply, _ = exchange(port, request(port, "POST", "/v1/worker/generate", body=JOB_BODY,
                                      content_type="Application/JSON; charset=utf-8"), timeout=30)
    assert reply.status == 200


# --- 5: bearer token -------------------------------------------------------------------------------


def test_5_token_missing_or_wrong_is_401_right_is_200_and_livez_needs_none(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server(token=TOKEN)
    port = server.server_port
    calls = len(server.pipeline.calls)  # type: ignore[attr-defined]
    wrong = {
        "missing": (),
        "empty": ("Authorization: ",),
        "no scheme": (f"Authorization: {TOKEN}",),
        "basic": ("Authorization: Basic dXNlcjpwYXNz",),
        "wrong token": (f"Authorization: Bearer {CANARY}",),
        "prefix of the token": (f"Authorization: Bearer {TOKEN[:-1]}",),
        "token plus more": (f"Authorization: Bearer {TOKEN}x",),
        "two headers": ("Authorization: Bearer nope", f"Authorization: Bearer {TOKEN}"),
        "non-ascii": ("Authorization: Bearer \xe9\xe9",),
    }
    for name, headers in wrong.items():
        for path, method, body in (
            ("/v1/worker/generate", "POST", JOB_BODY), ("/healthz", "GET", None), ("/metrics", "GET", None)
        ):
            reply, closed = exchange(port, request(port, method, path, body=body, headers=headers))
            assert_error(reply, 401, "unauthorized")
            assert reply.header("WWW-Authenticate") == "Bearer", name
            assert CANARY.encode() not in reply.raw and TOKEN.encode() not in reply.raw
            assert closed, name
    assert len(server.pipeline.calls) == calls  # type: ignore[attr-defined]
    auth = (f"Authorization: Bearer {TOKEN}",)
    reply, _ = exchange(port, request(port, "POST", "/v1/worker/generate", body=JOB_BODY, headers=auth))
    assert reply.status == 200 and reply.json()["job"] == "title"
    assert exchange(port, request(port, "GET", "/healthz", headers=auth))[0].status == 200
    reply, _ = exchange(port, request(port, "GET", "/livez"))
    assert reply.status == 200 and reply.json() == {"status": "alive", "problem": None}
    # Host and Origin are checked before the token: a right token does not open the door to a web page.
    assert_error(exchange(port, request(port, host="evil.example", headers=auth))[0], 403, "forbidden")
    assert_error(exchange(port, request(port, headers=auth + ("Origin: null",)))[0], 403, "forbidden")


# --- 6 and 27: start-up refusals -------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.10", "127.0.0.2", "::ffff:127.0.0.1", "localhost.localdomain", ""]
)
def test_6_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(worker.ConfigError, match="refusing to bind") as caught:
        worker.check_loopback(host)
    assert caught.value.exit_code == worker.EXIT_CONFIG == 78


def _main_without_touching_signals(argv: list[str], **kwargs: Any) -> int:
    """worker.main installs SIGTERM/SIGINT handlers when it gets as far as serving: put them back."""
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        return worker.main(argv, **kwargs)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _no_pipeline(_settings: worker.Settings) -> worker.Pipeline:
    raise AssertionError("start-up must fail before any model is loaded")


def test_6_main_refuses_a_non_loopback_bind_with_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = ["--model", str(TINY_MODEL), "--device", "CPU", "--port", "0", "--lock-file", str(tmp_path / "npu.lock"),
            "--cache-dir", str(tmp_path / "c")]
    assert _main_without_touching_signals(["--host", "0.0.0.0", *base], pipeline_factory=_no_pipeline) == 78
    err = capsys.readouterr().err
    assert "configuration" in err and "refusing to bind '0.0.0.0'" in err
    monkeypatch.setenv("OV_GENAI_NPU_HOST", "192.168.1.10")  # the environment is checked the same way
    assert _main_without_touching_signals(base, pipeline_factory=_no_pipeline) == 78
    assert "refusing to bind '192.168.1.10'" in capsys.readouterr().err


def test_27_a_port_in_use_is_exit_78_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(worker.ConfigError, match=f"port {port} on 127.0.0.1 is already in use"):
            worker.bind_server(cpu_settings(tmp_path, port=port), None)  # type: ignore[arg-type]
        argv = ["--model", str(TINY_MODEL), "--device", "CPU", "--port", str(port),
                "--lock-file", str(tmp_path / "npu.lock"), "--cache-dir", str(tmp_path / "c")]
        assert _main_without_touching_signals(argv, pipeline_factory=_no_pipeline) == 78
    assert f"port {port} on 127.0.0.1 is already in use" in capsys.readouterr().err


def test_27_the_listener_never_shares_its_port(fake_server: worker.WorkerHTTPServer) -> None:
    assert fake_server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0


# --- 7-8: Content-Length ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ["-1"], ["abc"], ["+5"], ["5, 5"], ["0x10"], ["1e3"], ["5.0"], [" "], ["\xb2"],
        ["\u0665".encode().decode("latin-1")], ["5", "6"], ["64", "1000000000"],
    ],
    ids=[
        "negative", "letters", "plus", "list", "hex", "exponent", "decimal", "blank", "superscript-two",
        "arabic-digit-bytes", "two-values", "small-and-huge",
    ],
)
def test_7_8_a_bad_content_length_is_400_and_the_connection_closes(
    fake_server: worker.WorkerHTTPServer, values: list[str]
) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    headers = ("Content-Type: application/json", *(f"Content-Length: {value}" for value in values))
    # Five megabytes follow: stock http.server read -1 as "until EOF".
    with Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", headers=headers) + JOB_BODY[:5])
        reply = conn.reply()
        body = assert_error(reply, 400, "invalid_request")
        assert "Content-Length" in body["error"]["message"]
        assert reply.header("Connection") == "close" and conn.closed_within(3)
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


def test_8_a_duplicated_identical_content_length_is_400_as_documented(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    length = f"Content-Length: {len(JOB_BODY)}"
    data = (request(port, "POST", "/v1/worker/generate", headers=("Content-Type: application/json", length, length))
            + JOB_BODY)
    reply, _ = exchange(port, data, timeout=30)
    assert_error(reply, 400, "invalid_request")


# --- 9: body over the cap --------------------------------------------------------------------------


@pytest.mark.parametrize("length", [worker.Limits().max_body_bytes + 1, 1_000_000_000, 10**30])
def test_9_content_length_over_the_cap_is_413_at_once_nothing_read_and_closed(
    fake_server: worker.WorkerHTTPServer, length: int
) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    with Conn(port, timeout=3) as conn:
        started = time.monotonic()
        conn.send(request(port, "POST", "/v1/worker/generate",
                          headers=("Content-Type: application/json", f"Content-Length: {length}")) + b"{")
        reply = conn.reply()  # the promised body never comes: an answer at all proves nothing was waited for
        assert time.monotonic() - started < 2
        body = assert_error(reply, 413, "body_too_large")
        assert str(worker.Limits().max_body_bytes) in body["error"]["message"]
        assert reply.header("Connection") == "close" and conn.closed_within(3)
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


def test_9_a_body_of_exactly_the_cap_is_read(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    body = b'{"job": "title", "input": "x"}'.ljust(worker.Limits().max_body_bytes, b" ")
    reply, closed = exchange(port, request(port, "POST", "/v1/worker/generate", body=body), timeout=30)
    assert reply.status == 200 and not closed


# --- 10: Transfer-Encoding -------------------------------------------------------------------------


def test_10_chunked_is_411_and_content_length_with_transfer_encoding_is_400(
    fake_server: worker.WorkerHTTPServer
) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    smuggled = request(port, "POST", "/v1/worker/generate", body=JOB_BODY)
    chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    for te in ("chunked", "Chunked", "gzip, chunked", "identity"):
        with Conn(port) as conn:
            conn.send(request(port, "POST", "/v1/worker/generate",
                              headers=("Content-Type: application/json", f"Transfer-Encoding: {te}")) + chunk)
            assert_error(conn.reply(), 411, "length_required")
            assert conn.closed_within(3)  # exactly one response: the chunk's request was not run
    with Conn(port) as conn:
        conn.send(
            request(port, "POST", "/v1/worker/generate",
                    headers=("Content-Type: application/json", "Content-Length: 4", "Transfer-Encoding: chunked"))
            + b"0\r\n\r\n" + smuggled
        )
        body = assert_error(conn.reply(), 400, "invalid_request")
        assert "Transfer-Encoding" in body["error"]["message"]
        assert conn.closed_within(3)
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


# --- 11: Expect: 100-continue ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["bad-host", "origin", "oversize", "text-plain", "chunked", "bad-length", "wrong-method", "unknown-path"],
)
def test_11_expect_100_continue_gets_the_final_4xx_and_no_100(fake_server: worker.WorkerHTTPServer, case: str) -> None:
    port = fake_server.server_port
    expected = {
        "bad-host": (403, "forbidden"), "origin": (403, "forbidden"), "oversize": (413, "body_too_large"),
        "text-plain": (415, "unsupported_media_type"), "chunked": (411, "length_required"),
        "bad-length": (400, "invalid_request"), "wrong-method": (405, "method_not_allowed"),
        "unknown-path": (404, "not_found"),
    }[case]
    host = "evil.example" if case == "bad-host" else "default"
    method, path = {
        "wrong-method": ("PUT", "/v1/worker/generate"),
        "unknown-path": ("POST", "/v1/nothing"),
    }.get(case, ("POST", "/v1/worker/generate"))
    headers = ["Expect: 100-continue", f"Content-Type: {'text/plain' if case == 'text-plain' else 'application/json'}"]
    headers.append({
        "oversize": "Content-Length: 1000000000",
        "chunked": "Transfer-Encoding: chunked",
        "bad-length": "Content-Length: -1",
    }.get(case, "Content-Length: 30"))
    if case == "origin":
        headers.append("Origin: null")
    with Conn(port, timeout=3) as conn:
        conn.send(request(port, method, path, host=host, headers=tuple(headers)))  # headers only: the client waits
        reply = conn.reply()
        assert reply.status != 100 and b"100 Continue" not in reply.raw
        assert_error(reply, *expected)
        assert conn.closed_within(3)
        assert b"100 Continue" not in conn.buffer
    assert_serves(fake_server)


def test_11_expect_100_continue_on_a_good_request_gets_100_then_the_result(
    fake_server: worker.WorkerHTTPServer
) -> None:
    port = fake_server.server_port
    headers = ("Expect: 100-continue", "Content-Type: application/json", f"Content-Length: {len(JOB_BODY)}")
    with Conn(port, timeout=30) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", headers=headers))
        interim = conn.reply()
        assert interim.status == 100 and not interim.body
        conn.send(JOB_BODY)
        final = conn.reply()
        assert final.status == 200 and final.json()["job"] == "title"


def test_11_expect_100_continue_is_ignored_for_http_1_0(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    headers = ("Expect: 100-continue", "Content-Type: application/json", f"Content-Length: {len(JOB_BODY)}")
    with Conn(port, timeout=30) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", headers=headers, version="HTTP/1.0") + JOB_BODY)
        data = conn.read_all(30)
    assert parse_replies(data) == [200]


# --- 12: body shorter than Content-Length ----------------------------------------------------------


def test_12_a_half_closed_short_body_is_400_and_no_job(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    calls = len(server.pipeline.calls)  # type: ignore[attr-defined]
    with Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate",
                          headers=("Content-Type: application/json", "Content-Length: 100")) + JOB_BODY[:20])
        conn.sock.shutdown(socket.SHUT_WR)  # EOF: the rest never comes
        body = assert_error(conn.reply(), 400, "invalid_request")
        assert "shorter than Content-Length" in body["error"]["message"]
        assert conn.closed_within(3)
    assert len(server.pipeline.calls) == calls  # type: ignore[attr-defined]
    assert_serves(server)


def test_12_a_stalled_short_body_is_dropped_after_the_read_timeout_and_no_job(
    start_server: Callable[..., worker.WorkerHTTPServer], short_read_timeout: float
) -> None:
    server = start_server()
    port = server.server_port
    calls = len(server.pipeline.calls)  # type: ignore[attr-defined]
    with Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate",
                          headers=("Content-Type: application/json", "Content-Length: 100")) + JOB_BODY[:20])
        started = time.monotonic()
        data = conn.read_all(short_read_timeout + 4)  # the client keeps the connection open and waits
        waited = time.monotonic() - started
    assert short_read_timeout * 0.8 <= waited < short_read_timeout + 3, waited  # closed by the timeout, not before
    assert len(parse_replies(data)) <= 1
    assert len(server.pipeline.calls) == calls  # type: ignore[attr-defined]
    assert_serves(server)


def test_12_a_stalled_short_body_is_not_a_500(
    start_server: Callable[..., worker.WorkerHTTPServer], short_read_timeout: float, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_server()
    port = server.server_port
    with caplog.at_level(logging.INFO, logger="openvino_genai_npu_worker"), Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate",
                          headers=("Content-Type: application/json", "Content-Length: 100")) + JOB_BODY[:20])
        data = conn.read_all(short_read_timeout + 4)
    assert all(status < 500 for status in parse_replies(data)), data[:300]
    assert b"internal_error" not in data
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    reply, _ = exchange(port, request(port))
    assert reply.json()["last_error"] is None


# --- 13: keep-alive smuggling ----------------------------------------------------------------------

REJECTIONS = {
    "415-text-plain": ("POST", "/v1/worker/generate", ("Content-Type: text/plain",), 415),
    "405-post-to-healthz": ("POST", "/healthz", ("Content-Type: application/json",), 405),
    "404-unknown-path": ("POST", "/v1/nowhere", ("Content-Type: application/json",), 404),
    "403-origin": ("POST", "/v1/worker/generate", ("Content-Type: application/json", "Origin: null"), 403),
    "403-sec-fetch": ("POST", "/v1/worker/generate", ("Content-Type: application/json", "Sec-Fetch-Site: cross-site"),
                      403),
}


@pytest.mark.parametrize("case", list(REJECTIONS))
def test_13_a_rejected_post_with_a_smuggled_request_in_its_body_gets_one_response_then_close(
    fake_server: worker.WorkerHTTPServer, case: str
) -> None:
    port = fake_server.server_port
    method, path, headers, status = REJECTIONS[case]
    calls = generate_calls(fake_server)
    smuggled = request(port, "POST", "/v1/worker/generate", body=JOB_BODY) + request(port, "GET", "/models")
    with Conn(port) as conn:
        conn.send(request(port, method, path, headers=(*headers, f"Content-Length: {len(smuggled)}")) + smuggled)
        data = conn.read_all(5)
        assert conn.eof
    assert parse_replies(data) == [status]
    assert b"Connection: close" in data
    assert generate_calls(fake_server) == calls
    assert_serves(fake_server)


def test_13_an_error_after_the_body_was_read_keeps_the_connection(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    with Conn(port, timeout=30) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", body=b'{"job": "nope", "input": "x"}'))
        assert_error(conn.reply(), 400, "invalid_request")
        conn.send(request(port, "POST", "/v1/worker/generate", body=JOB_BODY))
        assert conn.reply().status == 200


def test_13_a_get_with_a_smuggled_request_in_its_body_gets_one_response(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    smuggled = request(port, "POST", "/v1/worker/generate", body=JOB_BODY)
    with Conn(port, timeout=30) as conn:
        conn.send(request(port, "GET", "/healthz", headers=(f"Content-Length: {len(smuggled)}",)) + smuggled)
        assert conn.reply().status == 200
        rest = conn.read_all(1.0)  # closed, or kept open with the body drained: either way nothing more
    assert parse_replies(rest) == [] and generate_calls(fake_server) == calls


# --- 14: request line and headers ------------------------------------------------------------------


def test_14_request_line_over_64_kib_is_414_json(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    path = "/" + CANARY + "a" * 70_000
    with Conn(port) as conn:
        conn.send(request(port, "GET", path))
        reply = conn.reply()
        assert_error(reply, 414, "uri_too_long")
        assert CANARY.encode() not in reply.raw and reply.header("Connection") == "close"
    assert_serves(fake_server)


def test_14_header_line_over_64_kib_is_431_json(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    with Conn(port) as conn:
        conn.send(request(port, headers=(f"X-Big: {CANARY}{'a' * 70_000}",)))
        reply = conn.reply()
        assert_error(reply, 431, "headers_too_large")
        assert CANARY.encode() not in reply.raw and reply.header("Connection") == "close"
    assert_serves(fake_server)


def test_14_more_than_100_headers_is_431_json(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    ninety_eight = tuple(f"X-H{i}: {CANARY}" for i in range(98))  # + Host = 99 headers
    reply, _ = exchange(port, request(port, headers=ninety_eight))
    assert reply.status == 200
    for extra in (2, 50, 1000):  # 101, 149 and 1099 headers
        with Conn(port) as conn:
            conn.send(request(port, headers=(*ninety_eight, *(f"X-More{i}: 1" for i in range(extra)))))
            reply = conn.reply()
            assert_error(reply, 431, "headers_too_large")
            assert CANARY.encode() not in reply.raw
    assert_serves(fake_server)


def test_14_99_headers_pass_and_100_are_431(fake_server: worker.WorkerHTTPServer) -> None:
    """CONTRACT.md: at most 99 header lines (http.client counts the blank line that ends them)."""
    port = fake_server.server_port
    reply, _ = exchange(port, request(port, headers=tuple(f"X-H{i}: 1" for i in range(98))))  # + Host = 99
    assert reply.status == 200
    reply, _ = exchange(port, request(port, headers=tuple(f"X-H{i}: 1" for i in range(99))))  # + Host = 100
    assert_error(reply, 431, "headers_too_large")


@pytest.mark.parametrize(
    "line",
    [
        b"GARBAGE", b"GET", b"GET /healthz HTTP/1.1 extra", b"GET /healthz HTTP/x.y", b"GET /healthz FTP/1.0",
        b"\x00\xff\xfe",
    ],
)
def test_14_a_malformed_request_line_is_400_json(fake_server: worker.WorkerHTTPServer, line: bytes) -> None:
    port = fake_server.server_port
    with Conn(port) as conn:
        conn.send(line + b"\r\nHost: 127.0.0.1\r\n\r\n")
        reply = conn.reply()
        assert_error(reply, 400, "bad_request")
        assert conn.closed_within(3)
    assert_serves(fake_server)


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b"BREW /healthz HTTP/1.1\r\n\r\n",
        b"GET /healthz HTTP/2.0\r\n\r\n",
    ],
    ids=["400", "414", "501", "505"],
)
def test_14_protocol_errors_carry_one_request_id_in_header_and_body(
    fake_server: worker.WorkerHTTPServer, data: bytes
) -> None:
    with Conn(fake_server.server_port) as conn:
        conn.send(data)
        reply = conn.reply()
    assert reply.status >= 400
    assert reply.header("X-Request-Id") == reply.json()["request_id"]


# --- 15: slowloris ---------------------------------------------------------------------------------
# The whole-request deadlines and the gate are proven against 200-connection attacks in
# tests/test_slowloris.py; these are the single cases.


def test_15_half_sent_requests_get_408_at_the_head_deadline_while_the_server_answers(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    deadline_s = 1.5  # production: worker.HEAD_DEADLINE_S (5 s) and IDLE_TIMEOUT_S (10 s)
    monkeypatch.setattr(worker, "HEAD_DEADLINE_S", deadline_s)
    monkeypatch.setattr(worker, "IDLE_TIMEOUT_S", deadline_s)
    server = start_server()
    port = server.server_port
    partials = [
        b"GET /heal",
        b"GET /healthz HTTP/1.1\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode(),
        f"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n".encode(),
        b"",  # connected, nothing sent: an idle connection, closed without an answer
    ]
    conns: list[tuple[Conn, float, bytes]] = []
    try:
        for index in range(30):
            conn = Conn(port)
            partial = partials[index % len(partials)]
            if partial:
                conn.send(partial)
            conns.append((conn, time.monotonic(), partial))
        assert wait_for(lambda: server.open_connections >= 30, 3), server.open_connections
        # The server answers while all 30 are held: they have no thread and no slot.
        assert exchange(port, request(port))[0].status == 200
        assert_serves(server)
        for conn, opened, partial in conns:
            data = conn.read_all(deadline_s + 4)
            assert time.monotonic() - opened >= deadline_s * 0.8  # by the deadline, not at once
            if partial:
                (reply,) = [parse(data)]
                assert_error(reply, 408, "request_timeout")
            else:
                assert data == b""
    finally:
        for conn, _, _ in conns:
            conn.close()
    assert wait_for(lambda: server.open_connections == 0, 5)
    assert_serves(server)


def test_15_a_trickled_head_does_not_outlive_its_deadline(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline is for the head as a whole: a byte every 0.2 s (well within any per-read
    timeout) is still cut at 1 s."""
    monkeypatch.setattr(worker, "HEAD_DEADLINE_S", 1.0)
    server = start_server()
    port = server.server_port
    head = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: " + "a" * 40
    with Conn(port, timeout=5) as conn:
        started = time.monotonic()
        for char in head:
            conn.send(char.encode())
            if conn.answered_within(0.2):
                break
        assert 0.8 <= time.monotonic() - started < 2.5
        assert_error(parse(conn.read_all(3)), 408, "request_timeout")
    assert server.worker.metrics.refusals["head_deadline"] == 1


def test_15_a_trickled_body_gets_408_at_the_body_deadline(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "BODY_DEADLINE_S", 1.0)
    server = start_server()
    port = server.server_port
    calls = len(server.pipeline.calls)  # type: ignore[attr-defined]
    with Conn(port, timeout=5) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate",
                          headers=("Content-Type: application/json", "Content-Length: 100")))
        started = time.monotonic()
        for _ in range(40):
            conn.send(b" ")
            if conn.answered_within(0.2):
                break
        assert 0.8 <= time.monotonic() - started < 2.5
        assert_error(parse(conn.read_all(3)), 408, "request_timeout")
    assert len(server.pipeline.calls) == calls  # type: ignore[attr-defined]
    assert server.worker.metrics.refusals["body_deadline"] == 1


# --- 16: capacity ------------------------------------------------------------------------------------


def _hold(server: worker.WorkerHTTPServer, count: int, data: bytes = b"") -> list[Conn]:
    """Open ``count`` connections, one at a time, each held by the server before the next."""
    conns = []
    for _ in range(count):
        expected = server.open_connections + 1
        conn = Conn(server.server_port)
        conns.append(conn)
        if data:
            conn.send(data)
        assert wait_for(lambda expected=expected: server.open_connections >= expected, 3), (
            server.open_connections, expected)
    return conns


def test_16_idle_and_half_sent_connections_take_no_slot(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server(max_connections=1)
    port = server.server_port
    held = _hold(server, 40, b"GET /healthz HTTP/1.1\r\n") + _hold(server, 10)
    try:
        for path in ("/healthz", "/livez", "/models"):
            assert exchange(port, request(port, "GET", path))[0].status == 200
        assert_serves(server)  # a job, in the one job slot
    finally:
        for conn in held:
            conn.close()


def test_16_a_request_beyond_the_job_slots_gets_503_while_health_still_answers(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = FakeNpuPipeline(settings, seconds_per_token=0.2)  # 5 words: a second per job
    server = start_server(pipeline, max_connections=1, lock_timeout_s=10.0)
    port = server.server_port
    with Conn(port, timeout=10) as running:
        running.send(request(port, "POST", "/v1/worker/generate", body=JOB_BODY))
        assert wait_for(lambda: server.worker.in_flight == 1, 3)
        reply, closed = exchange(port, request(port, "GET", "/models"))
        body = assert_error(reply, 503, "busy")
        assert "in service" in body["error"]["message"] and closed
        assert reply.header("Retry-After") == str(worker.RETRY_AFTER_BUSY_S)
        assert reply.header("Server") == worker.SERVER_NAME and reply.header("X-Request-Id") == body["request_id"]
        for path in ("/healthz", "/livez"):  # their own slots
            assert exchange(port, request(port, "GET", path))[0].status == 200
        assert running.reply().status == 200
    assert server.worker.metrics.refusals["no_jobs_slot"] == 1
    assert server.worker.metrics.requests[("/models", "", 503)] == 1


def test_16_health_checks_have_slots_of_their_own_and_a_bound(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server()
    port = server.server_port
    release = threading.Event()
    entered = threading.Semaphore(0)
    original = server.worker.health_problem

    def slow_health_problem() -> str | None:
        entered.release()
        release.wait(10)
        return original()

    monkeypatch.setattr(server.worker, "health_problem", slow_health_problem)
    held = [Conn(port, timeout=10) for _ in range(worker.HEALTH_SLOTS)]
    try:
        for conn in held:
            conn.send(request(port, "GET", "/livez"))
        for _ in held:
            assert entered.acquire(timeout=5)  # every health slot is in service
        with Conn(port) as beyond:
            beyond.send(request(port, "GET", "/livez"))
            assert_error(beyond.reply(), 503, "busy")
        with Conn(port) as job_slot:
            job_slot.send(request(port, "GET", "/models"))
            assert job_slot.reply().status == 200  # job slots are apart
        release.set()
        assert [conn.reply().status for conn in held] == [200] * worker.HEALTH_SLOTS
    finally:
        release.set()
        for conn in held:
            conn.close()
    assert server.worker.metrics.refusals["no_health_slot"] == 1


def test_16_past_the_gates_bound_the_longest_waiting_connection_is_dropped(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "MAX_PENDING_CONNECTIONS", 4)
    server = start_server()
    port = server.server_port
    held = _hold(server, 4, b"GET /healthz HTTP/1.1\r\n")  # four half-sent heads fill the gate
    try:
        reply, _ = exchange(port, request(port))  # a fifth, complete at once: served
        assert reply.status == 200
        dropped = parse(held[0].read_all(3))  # the oldest made room
        body = assert_error(dropped, 503, "busy")
        assert "slowest was dropped" in body["error"]["message"]
        assert server.worker.metrics.refusals["evicted"] == 1
    finally:
        for conn in held:
            conn.close()


def test_16_a_burst_of_connections_is_served_at_once(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server(max_connections=4)
    port = server.server_port
    conns: list[Conn] = []
    try:
        for _ in range(100):  # as fast as a client pool opens them
            conns.append(Conn(port, timeout=5))
        for conn in conns:
            conn.send(request(port))
        statuses = [conn.reply().status for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    # Every one answered at once, none dropped: 200, or 503 busy once the 8 health slots are
    # all in service (a loaded machine answers fewer of a burst in time).
    assert statuses.count(200) + statuses.count(503) == 100 and statuses.count(200) >= worker.HEALTH_SLOTS, statuses


# --- 17: a burst of jobs while the NPU is busy -----------------------------------------------------


class HeldPipeline(FakeNpuPipeline):
    """The fake, but once ``held`` each generate() waits until ``release`` is set: the job
    holding the NPU stays there for as long as the test needs (the warm-up runs before)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def generate(self, *args: Any, **kwargs: Any) -> worker.Generation:
        if self.held:
            self.entered.set()
            assert self.release.wait(15), "the test never released the pipeline"
        return super().generate(*args, **kwargs)


def test_17_a_burst_of_jobs_is_bounded_by_the_queue_then_503_with_retry_after(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    """Eight jobs at once while the first holds the NPU: one runs, ``depth`` wait (as /healthz
    says), the rest get 503 busy with Retry-After at once; the waiting ones run once it is free."""
    depth, clients = 2, 8
    pipeline = HeldPipeline(cpu_settings(Path("/unused"), queue_depth=depth))
    server = start_server(pipeline, queue_depth=depth, lock_timeout_s=10.0)
    pipeline.held = True
    port = server.server_port
    conns = _hold(server, clients)
    statuses: list[tuple[int, str | None, str | None]] = []
    answered = threading.Condition()
    barrier = threading.Barrier(clients)

    def client(conn: Conn) -> None:
        conn.sock.settimeout(15)
        barrier.wait(5)
        conn.send(request(port, "POST", "/v1/worker/generate", body=JOB_BODY))
        reply = conn.reply()
        error = reply.json()["error"]["type"] if reply.status != 200 else None
        with answered:
            statuses.append((reply.status, error, reply.header("Retry-After")))
            answered.notify_all()

    threads = [threading.Thread(target=client, args=(conn,), daemon=True) for conn in conns]
    try:
        for thread in threads:
            thread.start()
        with answered:  # the ones beyond the queue are refused while the first still runs
            assert answered.wait_for(lambda: len(statuses) == clients - depth - 1, 10), statuses
        assert pipeline.entered.is_set() and exchange(port, request(port))[0].json()["queue_waiting"] == depth
        assert all(s == (503, "busy", str(worker.RETRY_AFTER_BUSY_S)) for s in statuses), statuses
        pipeline.release.set()
        for thread in threads:
            thread.join(15)
    finally:
        pipeline.release.set()
        for conn in conns:
            conn.close()
    assert sorted(status for status, _, _ in statuses) == [200] * (depth + 1) + [503] * (clients - depth - 1)
    assert exchange(port, request(port))[0].json()["queue_waiting"] == 0
    assert_serves(server)


def test_17_a_job_whose_deadline_passed_before_its_turn_never_reaches_the_pipeline(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    port = server.server_port
    calls = len(server.pipeline.calls)  # type: ignore[attr-defined]
    reply, _ = exchange(port, request(port, "POST", "/v1/worker/generate",
                                      body=b'{"job": "title", "input": "x", "timeout_s": 1e-9}'))
    assert_error(reply, 504, "timeout")
    assert len(server.pipeline.calls) == calls  # type: ignore[attr-defined]


# --- 18-19: hostile JSON ---------------------------------------------------------------------------

HOSTILE_BODIES: dict[str, tuple[bytes, int, str]] = {
    "deep-array": (b"[" * worker.Limits().max_body_bytes, 400, "invalid_json"),
    "deep-object": (b'{"a":' * (worker.Limits().max_body_bytes // 5), 400, "invalid_json"),
    "deep-inside-input": (b'{"job": "title", "input": ' + b"[" * 60_000 + b"]" * 60 + b"}", 400, "invalid_json"),
    "100k-brackets": (b"[" * 100_000, 413, "body_too_large"),  # over the body cap before it is parsed
    "nan": (b'{"job": "title", "input": "x", "timeout_s": NaN}', 400, "invalid_json"),
    "infinity": (b'{"job": "title", "input": "x", "timeout_s": Infinity}', 400, "invalid_json"),
    "minus-infinity": (b'{"job": "title", "input": "x", "max_new_tokens": -Infinity}', 400, "invalid_json"),
    "array": (b'["title", "x"]', 400, "invalid_json"),
    "string": (b'"title"', 400, "invalid_json"),
    "number": (b"1", 400, "invalid_json"),
    "null": (b"null", 400, "invalid_json"),
    "true": (b"true", 400, "invalid_json"),
    "empty": (b"", 400, "invalid_json"),
    "whitespace": (b" \r\n\t ", 400, "invalid_json"),
    "truncated": (b'{"job": "title", "input": "x"', 400, "invalid_json"),
    "trailing-garbage": (b'{"job": "title", "input": "x"} {}', 400, "invalid_json"),
    "single-quotes": (b"{'job': 'title', 'input': 'x'}", 400, "invalid_json"),
    "invalid-utf8": (b'{"job": "title", "input": "\xff\xfe"}', 400, "invalid_json"),
    "overlong-utf8": (b'{"job": "title", "input": "\xc0\xaf"}', 400, "invalid_json"),
    "encoded-surrogate": (b'{"job": "title", "input": "\xed\xa0\x80"}', 400, "invalid_json"),
    "utf8-bom": (b'\xef\xbb\xbf{"job": "title", "input": "x"}', 400, "invalid_json"),
    "utf16": ('{"job": "title", "input": "x"}'.encode("utf-16"), 400, "invalid_json"),
    "huge-integer": (b'{"job": "title", "input": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", 400, "invalid_json"),
    "job-number": (b'{"job": 1, "input": "x"}', 400, "invalid_request"),
    "job-list": (b'{"job": ["title"], "input": "x"}', 400, "invalid_request"),
    "job-object": (b'{"job": {"title": 1}, "input": "x"}', 400, "invalid_request"),
    "job-null": (b'{"job": null, "input": "x"}', 400, "invalid_request"),
    "job-unknown": (b'{"job": "TITLE", "input": "x"}', 400, "invalid_request"),
    "job-missing": (b'{"input": "x"}', 400, "invalid_request"),
    "input-missing": (b'{"job": "title"}', 400, "invalid_request"),
    "input-null": (b'{"job": "title", "input": null}', 400, "invalid_request"),
    "input-number": (b'{"job": "title", "input": 5}', 400, "invalid_request"),
    "input-list": (b'{"job": "title", "input": ["x"]}', 400, "invalid_request"),
    "input-blank": (b'{"job": "title", "input": " \\t\\n\\u3000"}', 400, "invalid_request"),
    "input-empty": (b'{"job": "title", "input": ""}', 400, "invalid_request"),
    "input-nul": (b'{"job": "title", "input": "a\\u0000b"}', 400, "invalid_request"),
    "input-lone-surrogate": (b'{"job": "title", "input": "a\\ud800b"}', 400, "invalid_request"),
    "input-too-long": (b'{"job": "title", "input": "' + b"x" * 6001 + b'"}', 413, "input_too_long"),
    "tokens-string": (b'{"job": "title", "input": "x", "max_new_tokens": "5"}', 400, "invalid_request"),
    "tokens-float": (b'{"job": "title", "input": "x", "max_new_tokens": 5.0}', 400, "invalid_request"),
    "tokens-bool": (b'{"job": "title", "input": "x", "max_new_tokens": true}', 400, "invalid_request"),
    "tokens-zero": (b'{"job": "title", "input": "x", "max_new_tokens": 0}', 400, "invalid_request"),
    "tokens-negative": (b'{"job": "title", "input": "x", "max_new_tokens": -1}', 400, "invalid_request"),
    "tokens-over-job-max": (b'{"job": "title", "input": "x", "max_new_tokens": 65}', 400, "invalid_request"),
    "tokens-over-limit": (b'{"job": "summary", "input": "x", "max_new_tokens": 257}', 400, "invalid_request"),
    "tokens-huge": (b'{"job": "title", "input": "x", "max_new_tokens": 100000000000000000000000000000}', 400,
                    "invalid_request"),
    "tokens-1e400": (b'{"job": "title", "input": "x", "max_new_tokens": 1e400}', 400, "invalid_request"),
    "timeout-string": (b'{"job": "title", "input": "x", "timeout_s": "1"}', 400, "invalid_request"),
    "timeout-bool": (b'{"job": "title", "input": "x", "timeout_s": true}', 400, "invalid_request"),
    "timeout-zero": (b'{"job": "title", "input": "x", "timeout_s": 0}', 400, "invalid_request"),
    "timeout-negative": (b'{"job": "title", "input": "x", "timeout_s": -0.5}', 400, "invalid_request"),
    "timeout-over-limit": (b'{"job": "title", "input": "x", "timeout_s": 120.001}', 400, "invalid_request"),
    "timeout-1e400": (b'{"job": "title", "input": "x", "timeout_s": 1e400}', 400, "invalid_request"),
    "timeout-list": (b'{"job": "title", "input": "x", "timeout_s": [1]}', 400, "invalid_request"),
    "unknown-field": (b'{"job": "title", "input": "x", "temperature": 0.7}', 400, "invalid_request"),
    "many-unknown-fields": (
        b"{" + b",".join(b'"f%d": %d' % (i, i) for i in range(3000)) + b', "job": "title", "input": "x"}',
        400,
        "invalid_request",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_18_19_hostile_json_is_4xx_never_500(fake_server: worker.WorkerHTTPServer, name: str) -> None:
    body, status, error_type = HOSTILE_BODIES[name]
    port = fake_server.server_port
    calls = generate_calls(fake_server)
    errors_before = server_errors(fake_server)
    with Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", body=body))
        reply = conn.reply()
        assert_error(reply, status, error_type)
        if status == 413 and error_type == "body_too_large":
            assert conn.closed_within(3)
        else:  # the body was read: the connection stays usable
            conn.send(request(port, "GET", "/livez"))
            assert conn.reply().status == 200
    assert generate_calls(fake_server) == calls
    assert server_errors(fake_server) == errors_before  # no 5xx was answered


def test_18_100k_brackets_straight_into_the_parser_is_invalid_json() -> None:
    for body in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(worker.InvalidJson, match="nested too deeply|not valid JSON"):
            worker.parse_json_body(body)


def test_19_fixed_job_endpoints_refuse_a_job_field(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    for path in ("/v1/worker/extract-memory-candidates", "/v1/worker/condense-notification"):
        reply, _ = exchange(port, request(port, "POST", path, body=b'{"job": "title", "input": "x"}'))
        assert_error(reply, 400, "invalid_request")
        reply, _ = exchange(port, request(port, "POST", path, body=b'{"input": "x", "max_new_tokens": 257}'))
        assert_error(reply, 400, "invalid_request")
    assert_serves(fake_server)


# --- 20-22: no echo, and the canary sweep ----------------------------------------------------------


def _echo_cases(port: int) -> dict[str, bytes]:
    job = "POST /v1/worker/generate HTTP/1.1\r\n" + f"Host: 127.0.0.1:{port}\r\n"
    return {
        "path": request(port, "GET", f"/{CANARY}"),
        "query": request(port, "POST", f"/healthz?{CANARY}=1"),
        "query-on-job": request(port, "POST", f"/v1/worker/generate?q={CANARY}", body=b'{"job": "nope"}'),
        "method": request(port, CANARY.upper().replace("-", ""), "/healthz"),
        "version": request(port, "GET", "/healthz", version=f"HTTP/9.{CANARY}"),
        "request-line": f"GET /{CANARY} HTTP/1.1 trailing\r\n\r\n".encode(),
        "host": request(port, host=f"{CANARY}.example"),
        "origin": request(port, headers=(f"Origin: http://{CANARY}.example",)),
        "content-type": request(port, "POST", "/v1/worker/generate", body=JOB_BODY, content_type=f"text/{CANARY}"),
        "content-length": (job + f"Content-Type: application/json\r\nContent-Length: {CANARY}\r\n\r\n").encode(),
        "transfer-encoding": (job + f"Content-Type: application/json\r\nTransfer-Encoding: {CANARY}\r\n\r\n").encode(),
        "invalid-json": request(port, "POST", "/v1/worker/generate",
                                body=f'{{"job": "title", "input": "{CANARY}'.encode()),
        "unknown-field-name": request(port, "POST", "/v1/worker/generate",
                                      body=f'{{"job": "title", "input": "x", "{CANARY}": 1}}'.encode()),
        "job-value": request(port, "POST", "/v1/worker/generate", body=f'{{"job": "{CANARY}", "input": "x"}}'.encode()),
        "input-too-long": request(port, "POST", "/v1/worker/generate",
                                  body=f'{{"job": "title", "input": "{CANARY * 400}"}}'.encode()),
        "input-with-bad-tokens": request(port, "POST", "/v1/worker/generate",
                                         body=f'{{"job": "title", "input": "{CANARY}", "max_new_tokens": 0}}'.encode()),
        "input-with-nul": request(port, "POST", "/v1/worker/generate",
                                  body=f'{{"job": "title", "input": "{CANARY}\\u0000"}}'.encode()),
        "long-request-line": request(port, "GET", f"/{CANARY}" + "a" * 70_000),
        "long-header": request(port, headers=(f"X-Canary: {CANARY}" + "a" * 70_000,)),
    }


def test_20_error_bodies_never_echo_the_request_line_headers_or_input(fake_server: worker.WorkerHTTPServer) -> None:
    port = fake_server.server_port
    for name, data in _echo_cases(port).items():
        with Conn(port) as conn:
            conn.send(data)
            reply = conn.reply()
            assert reply.status >= 400, (name, reply.raw[:300])
            assert reply.header("Content-Type") == "application/json", name
            assert CANARY.encode() not in reply.raw, name
            assert CANARY.lower().encode() not in reply.raw.lower(), name
    assert_serves(fake_server)


def test_21_22_canary_sweep_the_marker_reaches_no_log_no_stream_and_no_error_body(
    start_server: Callable[..., worker.WorkerHTTPServer],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    marker = f"MARKER-{CANARY}-sweep"

    class Pipeline(FakeNpuPipeline):
        """Fails generation with the marker in the exception, and the tokenizer with a KeyError holding the prompt."""

        def count_tokens(self, prompt: str) -> int:
            if "explode-the-tokenizer" in prompt:
                raise KeyError(prompt)
            return super().count_tokens(prompt)

    settings = cpu_settings(Path("/unused"))
    pipeline = Pipeline(settings, reply="Quarterly revenue up twelve percent")
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="openvino_genai_npu_worker")
    server = start_server(pipeline, token=TOKEN)
    port = server.server_port
    auth = f"Authorization: Bearer {TOKEN}"
    job = f"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}\r\n"
    channels = {
        "body (a job that succeeds)": request(port, "POST", "/v1/worker/generate",
                                              body=json.dumps({"job": "summary", "input": f"In {marker}."}).encode(),
                                              headers=(auth,)),
        "query string": request(port, "GET", f"/healthz?{marker}=1", headers=(auth,)),
        "query string of a job": request(port, "POST", f"/v1/worker/generate?q={marker}", body=JOB_BODY,
                                         headers=(auth,)),
        "path": request(port, "GET", f"/{marker}", headers=(auth,)),
        "malformed request line": f"GET /{marker} HTTP/9\r\n\r\n".encode(),
        "garbage request line": f"{marker}\r\n\r\n".encode(),
        "unknown method": request(port, marker.replace("-", ""), "/healthz"),
        "header value": request(port, "GET", "/healthz",
                                headers=(auth, f"X-Canary: {marker}", f"User-Agent: {marker}")),
        "host header": request(port, host=marker, headers=(auth,)),
        "origin header": request(port, headers=(auth, f"Origin: http://{marker}")),
        "wrong token": request(port, headers=(f"Authorization: Bearer {marker}",)),
        "content type": request(port, "POST", "/v1/worker/generate", body=JOB_BODY, content_type=f"text/{marker}",
                                headers=(auth,)),
        "content length": (job + f"Content-Type: application/json\r\nContent-Length: {marker}\r\n\r\n").encode(),
        "invalid json": request(port, "POST", "/v1/worker/generate", body=b"{" + marker.encode(), headers=(auth,)),
        "unknown field": request(port, "POST", "/v1/worker/generate",
                                 body=json.dumps({"job": "title", "input": "x", marker: 1}).encode(), headers=(auth,)),
        "input too long": request(port, "POST", "/v1/worker/generate",
                                  body=json.dumps({"job": "title", "input": marker * 300}).encode(), headers=(auth,)),
        "tokenizer bug (internal_error)": request(
            port, "POST", "/v1/worker/generate",
            body=json.dumps({"job": "title", "input": f"explode-the-tokenizer {marker}"}).encode(), headers=(auth,)),
        "long header": request(port, headers=(auth, f"X-Canary: {marker}" + "a" * 70_000)),
    }
    replies: dict[str, bytes] = {}
    for name, data in channels.items():
        with Conn(port) as conn:
            conn.send(data)
            replies[name] = conn.reply().raw
    # A generation that fails with the marker in the exception message.
    pipeline.fail_with = RuntimeError(f"Infer Request is busy {marker}")
    with Conn(port) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate",
                          body=json.dumps({"job": "title", "input": marker}).encode(), headers=(auth,)))
        replies["generation fails"] = conn.reply().raw
    pipeline.fail_with = None
    # Every request is counted (and logged: by its handler, or by the gate's once-a-second
    # refusal line) before its answer leaves.
    assert sum(server.worker.metrics.requests.values()) == len(replies)
    server._refusals.flush(time.monotonic())  # the gate's pending refusal counts, now

    statuses = {name: int(raw.split(b" ", 2)[1]) for name, raw in replies.items()}
    assert statuses == {
        "body (a job that succeeds)": 200, "query string": 200, "query string of a job": 200, "path": 404,
        "malformed request line": 400, "garbage request line": 400, "unknown method": 501, "header value": 200,
        "host header": 403, "origin header": 403, "wrong token": 401, "content type": 415, "content length": 400,
        "invalid json": 400, "unknown field": 400, "input too long": 413, "tokenizer bug (internal_error)": 500,
        "long header": 431, "generation fails": 500,
    }
    for name, raw in replies.items():
        assert marker.encode() not in raw, name
    # The logs have the exception types and request ids...
    assert "RuntimeError" in caplog.text and "KeyError" in caplog.text
    assert "status=500 job=title error=generation_failed" in caplog.text
    # ...and the marker nowhere: not in a message, its arguments, an exception or a stack.
    for record in caplog.records:
        rendered = " ".join(
            str(part)
            for part in (record.getMessage(), record.args, record.exc_text, record.exc_info, record.stack_info)
            if part
        )
        assert marker not in rendered, rendered[:300]
        assert record.exc_info is None, "a log record carries an exception (and its message)"
    captured = capsys.readouterr()
    assert marker not in captured.out and marker not in captured.err
    assert "Traceback" not in captured.err
    assert_serves(server, auth)


# --- the real model after the walk -----------------------------------------------------------------


def test_the_real_model_still_serves_after_each_hostile_request(real_server: worker.WorkerHTTPServer) -> None:
    """One representative per case family, each followed by a real generation on the tiny model."""
    port = real_server.server_port
    job = "POST /v1/worker/generate HTTP/1.1\r\n" + f"Host: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    smuggled = request(port, "POST", "/v1/worker/generate", body=JOB_BODY)
    hostile: dict[str, tuple[bytes, list[int]]] = {
        "1 foreign host": (request(port, "POST", "/v1/worker/generate", body=JOB_BODY, host="evil.example"), [403]),
        "3 origin null": (request(port, "POST", "/v1/worker/generate", body=JOB_BODY, headers=("Origin: null",)),
                          [403]),
        "4 text/plain": (request(port, "POST", "/v1/worker/generate", body=JOB_BODY, content_type="text/plain"), [415]),
        "7 negative length": ((job + "Content-Length: -1\r\n\r\n").encode() + JOB_BODY, [400]),
        "8 two lengths": ((job + "Content-Length: 5\r\nContent-Length: 6\r\n\r\n").encode() + JOB_BODY, [400]),
        "9 one gigabyte": ((job + "Content-Length: 1000000000\r\n\r\n{").encode(), [413]),
        "10 chunked": (
            (job + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled),
            [411],
        ),
        "10 length and chunked": (
            (job + "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").encode() + smuggled,
            [400],
        ),
        "11 expect with a foreign host": (
            request(port, "POST", "/v1/worker/generate", host="evil.example",
                    headers=("Expect: 100-continue", "Content-Type: application/json", "Content-Length: 30")),
            [403],
        ),
        "13 smuggled in a rejected body": (
            (job.replace("application/json", "text/plain") + f"Content-Length: {len(smuggled)}\r\n\r\n").encode()
            + smuggled,
            [415],
        ),
        "14 long request line": (request(port, "GET", "/" + "a" * 70_000), [414]),
        "14 too many headers": (request(port, headers=tuple(f"X-H{i}: 1" for i in range(120))), [431]),
        "14 TLS hello on the HTTP port": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", [400]),
        "18 deep nesting": (request(port, "POST", "/v1/worker/generate", body=b"[" * 60_000), [400]),
        "18 NaN": (request(port, "POST", "/v1/worker/generate",
                           body=b'{"job": "title", "input": "x", "timeout_s": NaN}'), [400]),
        "18 not an object": (request(port, "POST", "/v1/worker/generate", body=b"[]"), [400]),
        "19 invalid UTF-8": (request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "\xff"}'),
                             [400]),
        "19 wrong type": (request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": 5}'), [400]),
        "19 unknown field": (request(port, "POST", "/v1/worker/generate",
                                     body=b'{"job": "title", "input": "x", "seed": 1}'), [400]),
        "19 input too long": (request(port, "POST", "/v1/worker/generate",
                                      body=b'{"job": "title", "input": "' + b"x" * 6001 + b'"}'), [413]),
    }
    real_job = request(
        port, "POST", "/v1/worker/generate",
        body=b'{"job": "title", "input": "Quarterly revenue is up twelve percent.", "max_new_tokens": 4}',
    )
    for name, (data, statuses) in hostile.items():
        calls = generate_calls(real_server)
        reply, closed = exchange(port, data, timeout=10)  # one response; a closed connection had nothing more
        assert [reply.status] == statuses, name
        assert reply.header("Content-Type") == "application/json" and "error" in reply.json(), name
        assert closed == (name not in {
            "18 deep nesting", "18 NaN", "18 not an object", "19 invalid UTF-8", "19 wrong type", "19 unknown field",
            "19 input too long",
        }), name
        assert generate_calls(real_server) == calls, name
        reply, _ = exchange(port, real_job, timeout=60)
        assert reply.status == 200, (name, reply.raw[:300])
        result = reply.json()
        assert result["tokens"]["generated"] >= 1 and result["device"] == "CPU" and result["text"], name
        assert generate_calls(real_server) == calls + 1, name
