"""`worker.py --mcp` on raw pipes: what no SDK would send, and how the process ends.

Every answer is read as one line from the bridge's stdout and must be one JSON-RPC message; after
each fault the bridge must still answer a ping, so a fault never ends the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import REPO
from conftest import FakeNpuPipeline
from conftest import cpu_settings

READ_TIMEOUT_S = 10.0
MODERN_META = {worker.MCP_META_VERSION: "2026-07-28", worker.MCP_META_CAPABILITIES: {}}
UNENDING_REPLY = " ".join(f"word{i}" for i in range(400))


class RawBridge:
    """worker.py --mcp as a subprocess with pipes; no MCP library involved."""

    def __init__(self, port: int, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "worker.py"), "--mcp", "--port", str(port), *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._pending = b""

    def send(self, message: Any) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        assert self.process.stdin is not None
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def receive(self, timeout_s: float = READ_TIMEOUT_S) -> dict[str, Any]:
        """The next line from stdout, read from the pipe itself: a buffered readline after select()
        would miss a second line that arrived in the same read."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "no answer"
            chunk = os.read(fd, 1 << 16)
            assert chunk, "stdout closed"
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        message = json.loads(line)
        assert message["jsonrpc"] == "2.0"
        return message

    def request(self, message: Any) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def still_serving(self) -> None:
        """A ping gets its own answer next: nothing else was written since the last answer."""
        assert self.request({"jsonrpc": "2.0", "id": "ping", "method": "ping"}) == {
            "jsonrpc": "2.0",
            "id": "ping",
            "result": {},
        }

    def close(self) -> tuple[int, bytes, bytes]:
        """Close stdin; the exit code and what is left on stdout and stderr."""
        stdout, stderr = self.process.communicate(timeout=READ_TIMEOUT_S)
        return self.process.returncode, self._pending + stdout, stderr


@pytest.fixture
def bridge() -> Iterator[Callable[..., RawBridge]]:
    started: list[RawBridge] = []

    def start(port: int | None = None, *args: str) -> RawBridge:
        with socket.socket() as sock:  # no daemon there unless a test gives one
            sock.bind(("127.0.0.1", 0))
            free = int(sock.getsockname()[1])
        started.append(RawBridge(port or free, *args))
        return started[-1]

    yield start
    for raw in started:
        if raw.process.poll() is None:
            raw.process.kill()
            raw.process.wait()


def error_code(answer: dict[str, Any], request_id: Any) -> int:
    assert answer["id"] == request_id and "result" not in answer, answer
    return answer["error"]["code"]


@pytest.mark.parametrize(
    "line",
    [
        b"{not json\n",
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping"\n',  # cut off
        b'\xff\xfe{"jsonrpc": "2.0"}\n',  # not UTF-8
        b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"x": NaN}}\n',
        b"[" * 50_000 + b"\n",  # nested too deeply for any parser, within the line bound
    ],
    ids=["garbage", "cut-off", "not-utf8", "nan", "deep"],
)
def test_unparsable_lines_get_a_parse_error_and_the_bridge_keeps_serving(
    bridge: Callable[..., RawBridge], line: bytes
) -> None:
    raw = bridge()
    assert error_code(raw.request(line), None) == worker.RPC_PARSE_ERROR
    raw.still_serving()


@pytest.mark.parametrize(
    "message,request_id",
    [
        (
            [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}],
            None,
        ),
        ("ping", None),
        ({"id": 3, "method": "ping"}, 3),  # no jsonrpc
        ({"jsonrpc": "1.0", "id": 4, "method": "ping"}, 4),
        ({"jsonrpc": "2.0", "id": None, "method": "ping"}, None),  # MCP: an id is never null
        ({"jsonrpc": "2.0", "id": True, "method": "ping"}, None),
        ({"jsonrpc": "2.0", "id": 1.5, "method": "ping"}, None),
        ({"jsonrpc": "2.0", "id": 5, "method": 7}, 5),
        ({"jsonrpc": "2.0", "id": 6}, 6),  # neither a request nor a response
    ],
    ids=[
        "batch",
        "string",
        "no-jsonrpc",
        "jsonrpc-1.0",
        "null-id",
        "bool-id",
        "float-id",
        "method-not-a-string",
        "no-method",
    ],
)
def test_invalid_requests_get_invalid_request(
    bridge: Callable[..., RawBridge], message: Any, request_id: Any
) -> None:
    raw = bridge()
    assert error_code(raw.request(message), request_id) == worker.RPC_INVALID_REQUEST
    raw.still_serving()


def test_notifications_and_responses_are_never_answered(bridge: Callable[..., RawBridge]) -> None:
    raw = bridge()
    raw.send({"jsonrpc": "2.0", "method": "tools/list"})  # a request without an id is a notification
    raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "never-sent"}})
    raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": "malformed"})
    raw.send({"jsonrpc": "2.0", "id": 9, "result": {}})  # a response to a request we never sent
    raw.still_serving()


def test_methods_and_params_the_server_does_not_take(bridge: Callable[..., RawBridge]) -> None:
    raw = bridge()
    unknown = raw.request(
        {"jsonrpc": "2.0", "id": 1, "method": "resources/list", "params": {"_meta": MODERN_META}}
    )
    assert error_code(unknown, 1) == worker.RPC_METHOD_NOT_FOUND
    not_object = raw.request({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": [1, 2]})
    assert error_code(not_object, 2) == worker.RPC_INVALID_PARAMS
    tool = raw.request(
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"_meta": MODERN_META, "name": "chat"}}
    )
    assert error_code(tool, 3) == worker.RPC_INVALID_PARAMS and "Unknown tool" in tool["error"]["message"]
    no_name = raw.request(
        {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"_meta": MODERN_META}}
    )
    assert error_code(no_name, 4) == worker.RPC_INVALID_PARAMS
    arguments = raw.request(
        {
            "jsonrpc": "2.0",
            "id": 5,
            "method": "tools/call",
            "params": {"_meta": MODERN_META, "name": "title", "arguments": ["x"]},
        }
    )
    assert error_code(arguments, 5) == worker.RPC_INVALID_PARAMS
    raw.still_serving()


def test_a_stateless_request_needs_its_envelope_and_a_version_we_serve(
    bridge: Callable[..., RawBridge],
) -> None:
    raw = bridge()
    bare = raw.request({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})  # neither _meta nor initialize
    assert error_code(bare, 1) == worker.RPC_INVALID_PARAMS
    half = raw.request(
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/list",
            "params": {"_meta": {worker.MCP_META_VERSION: "2026-07-28"}},
        }
    )
    assert (
        error_code(half, 2) == worker.RPC_INVALID_PARAMS
        and worker.MCP_META_CAPABILITIES in half["error"]["message"]
    )
    for request_id, version in ((3, "1900-01-01"), (4, "2025-11-25")):  # unknown; legacy in a modern envelope
        meta = {**MODERN_META, worker.MCP_META_VERSION: version}
        answer = raw.request(
            {"jsonrpc": "2.0", "id": request_id, "method": "server/discover", "params": {"_meta": meta}}
        )
        assert error_code(answer, request_id) == worker.RPC_UNSUPPORTED_PROTOCOL_VERSION
        assert answer["error"]["data"] == {
            "supported": ["2026-07-28", "2025-11-25", "2025-06-18"],
            "requested": version,
        }
    discover = raw.request(
        {"jsonrpc": "2.0", "id": 5, "method": "server/discover", "params": {"_meta": MODERN_META}}
    )
    result = discover["result"]
    assert (result["resultType"], result["supportedVersions"], result["cacheScope"]) == (
        "complete",
        ["2026-07-28"],
        "public",
    )
    assert result["_meta"][worker.MCP_META_SERVER_INFO]["version"] == worker.__version__
    tools = raw.request(
        {"jsonrpc": "2.0", "id": 6, "method": "tools/list", "params": {"_meta": MODERN_META}}
    )["result"]
    assert tools["resultType"] == "complete" and tools["ttlMs"] >= 0 and len(tools["tools"]) == 4


def test_initialize_negotiates_a_legacy_version_and_unlocks_bare_requests(
    bridge: Callable[..., RawBridge],
) -> None:
    raw = bridge()
    for request_id, asked, answered in (
        (1, "2025-06-18", "2025-06-18"),
        (2, "2024-11-05", "2025-11-25"),
        (3, "2026-07-28", "2025-11-25"),
    ):
        result = raw.request(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "initialize",
                "params": {
                    "protocolVersion": asked,
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "0"},
                },
            }
        )["result"]
        assert result["protocolVersion"] == answered  # ours when theirs is not (2025-11-25 lifecycle)
        assert "resultType" not in result and result["capabilities"] == {"tools": {}}
    no_version = raw.request({"jsonrpc": "2.0", "id": 4, "method": "initialize", "params": {}})
    assert error_code(no_version, 4) == worker.RPC_INVALID_PARAMS
    tools = raw.request({"jsonrpc": "2.0", "id": 5, "method": "tools/list"})["result"]
    assert [tool["name"] for tool in tools["tools"]] == list(worker.JOBS) and "ttlMs" not in tools


def test_a_line_longer_than_the_bound_is_refused_unread_and_the_next_one_served(
    bridge: Callable[..., RawBridge],
) -> None:
    raw = bridge()
    limit = worker.Limits().max_body_bytes + worker.MCP_ENVELOPE_BYTES
    raw.send(b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "' + b"x" * limit + b'"}}\n')
    answer = raw.receive()
    assert error_code(answer, None) == worker.RPC_INVALID_REQUEST and str(limit) in answer["error"]["message"]
    raw.still_serving()
    # The largest input the daemon takes (6000 characters, each escaped as \\ud83d\\ude00) fits.
    largest = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {
            "_meta": MODERN_META,
            "name": "title",
            "arguments": {"input": "\U0001f600" * worker.DEFAULT_MAX_INPUT_CHARS},
        },
    }
    assert len(json.dumps(largest)) > worker.Limits().max_body_bytes - worker.BODY_OVERHEAD_BYTES
    result = raw.request(largest)["result"]
    assert result["isError"] and result["content"][0]["text"].startswith("daemon_not_running: ")


def test_stdout_carries_only_protocol_messages_and_the_log_goes_to_stderr(
    bridge: Callable[..., RawBridge],
) -> None:
    raw = bridge()
    raw.send(b"garbage\n")
    raw.send(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"_meta": MODERN_META, "name": "title", "arguments": {"input": "x"}},
        }
    )
    returncode, stdout, stderr = raw.close()
    assert returncode == 0
    assert all(json.loads(line)["jsonrpc"] == "2.0" for line in stdout.splitlines())
    assert b"Traceback" not in stderr and b"event=mcp_stopped" in stderr


def test_a_bad_token_file_ends_the_bridge_with_a_configuration_error_and_nothing_on_stdout(
    bridge: Callable[..., RawBridge], tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("abc\n")
    token.chmod(0o644)
    raw = bridge(None, "--token-file", str(token))
    returncode, stdout, stderr = raw.close()
    assert (returncode, stdout) == (worker.EXIT_CONFIG, b"")
    assert b"readable by group or others" in stderr


@pytest.mark.parametrize("ending", ["end-of-stdin", "sigterm"])
def test_the_bridge_ends_within_a_second_and_cancels_the_call_in_flight(
    bridge: Callable[..., RawBridge], start_server: Callable[..., worker.WorkerHTTPServer], ending: str
) -> None:
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.02)
    server = start_server(pipeline)
    raw = bridge(server.server_port)
    raw.send(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "_meta": MODERN_META,
                "name": "summary",
                "arguments": {"input": "x", "max_new_tokens": 256},
            },
        }
    )
    deadline = time.monotonic() + READ_TIMEOUT_S
    while server.worker.in_flight == 0:  # the daemon has the job
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ended_at = time.monotonic()
    if ending == "sigterm":
        raw.process.send_signal(signal.SIGTERM)
    returncode, stdout, _ = raw.close()
    assert returncode == 0 and time.monotonic() - ended_at < 1.0
    assert stdout == b""  # a cancelled call gets no answer
    while server.worker.in_flight:  # the rest of the 256 tokens would take 5 s
        assert time.monotonic() - ended_at < 2.0, "the daemon's job was not cancelled"
        time.sleep(0.01)
    assert server.worker.metrics.requests.get(("/v1/worker/generate", "summary", 200)) is None


def test_ping_is_answered_in_either_era(bridge: Callable[..., RawBridge]) -> None:
    raw = bridge()
    modern = raw.request({"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"_meta": MODERN_META}})[
        "result"
    ]
    assert modern["resultType"] == "complete" and worker.MCP_META_SERVER_INFO in modern["_meta"]
    raw.still_serving()  # bare, before any initialize: a legacy client's keep-alive


def test_an_id_in_flight_is_refused_and_the_bridge_takes_at_most_its_bound_of_calls(
    bridge: Callable[..., RawBridge], start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    """Calls wait at the daemon while another process holds the NPU lock; the bridge answers the
    one over its bound itself, and an id reused while its call is in flight is a protocol fault."""
    calls = worker.MCP_MAX_CALLS
    server = start_server(queue_depth=calls + 2, max_connections=calls + 2, lock_timeout_s=30.0)
    held = worker.NpuLock(server.settings.lock_path).acquire(0)
    try:
        raw = bridge(server.server_port)
        for request_id in range(calls):
            raw.send(
                {
                    "jsonrpc": "2.0",
                    "id": request_id,
                    "method": "tools/call",
                    "params": {
                        "_meta": MODERN_META,
                        "name": "title",
                        "arguments": {"input": "x", "max_new_tokens": 1},
                    },
                }
            )
        deadline = time.monotonic() + READ_TIMEOUT_S
        while server.worker.queue.waiting < calls - 1:  # one holds the queue's head, waiting for the lock
            assert time.monotonic() < deadline, "the calls did not all reach the daemon"
            time.sleep(0.01)
        again = raw.request(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "tools/call",
                "params": {"_meta": MODERN_META, "name": "title", "arguments": {"input": "x"}},
            }
        )
        assert error_code(again, 0) == worker.RPC_INVALID_REQUEST
        over = raw.request(
            {
                "jsonrpc": "2.0",
                "id": "one-more",
                "method": "tools/call",
                "params": {"_meta": MODERN_META, "name": "title", "arguments": {"input": "x"}},
            }
        )
        assert over["id"] == "one-more" and over["result"]["isError"]
        assert over["result"]["content"][0]["text"].startswith(f"busy: {calls} calls are in flight")
        listed = raw.request(
            {"jsonrpc": "2.0", "id": "list", "method": "tools/list", "params": {"_meta": MODERN_META}}
        )
        assert len(listed["result"]["tools"]) == 4  # the bound is for jobs; listing still works
    finally:
        os.close(held)
    answered = {raw.receive()["id"] for _ in range(calls)}  # the lock is free: every call is answered
    assert answered == set(range(calls))


def test_a_host_that_is_not_loopback_ends_the_bridge_with_a_configuration_error(
    bridge: Callable[..., RawBridge],
) -> None:
    raw = bridge(None, "--host", "0.0.0.0")
    returncode, stdout, stderr = raw.close()
    assert (returncode, stdout) == (worker.EXIT_CONFIG, b"")
    assert b"refusing to bind '0.0.0.0'" in stderr


def test_a_call_cancelled_while_queued_is_dropped_before_its_prefill(
    bridge: Callable[..., RawBridge], start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    """A job cancelled while it waits for the NPU is dropped when its turn comes, before the
    prefill, which could not be interrupted (CONTRACT.md, "MCP")."""
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.02)
    server = start_server(pipeline, lock_timeout_s=30.0)
    generate_calls = []
    generate = pipeline.generate  # after the warm-ups: from here only jobs call it
    pipeline.generate = lambda *args, **kwargs: generate_calls.append(args) or generate(*args, **kwargs)
    held = worker.NpuLock(server.settings.lock_path).acquire(0)
    try:
        raw = bridge(server.server_port)
        raw.send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {
                    "_meta": MODERN_META,
                    "name": "summary",
                    "arguments": {"input": "x", "max_new_tokens": 256},
                },
            }
        )
        deadline = time.monotonic() + READ_TIMEOUT_S
        while server.worker.in_flight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        raw.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        raw.still_serving()  # the cancellation was read
    finally:
        os.close(held)
    released_at = time.monotonic()
    while server.worker.in_flight:  # 256 tokens would take 5 s
        assert time.monotonic() - released_at < 2.0, "the queued job was not cancelled"
        time.sleep(0.01)
    metrics = server.worker.metrics.requests
    assert (
        metrics.get(("/v1/worker/generate", "summary", 499)) == 1
        and metrics.get(("/v1/worker/generate", "summary", 200)) is None
    )
    assert raw.close()[1] == b""  # and the call got no answer
    assert generate_calls == []  # nothing ran on the NPU for it


def test_something_else_on_the_port_is_named_and_a_dropped_connection_is_unreachable(
    bridge: Callable[..., RawBridge],
) -> None:
    """Not the worker (an HTTP server answering HTML) and no answer at all (a listener that closes
    every connection at once) are tool errors that say what to check."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Quiet)  # POST: 501 with an HTML page
    threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    dropper = socket.create_server(("127.0.0.1", 0))

    def drop() -> None:
        with contextlib.suppress(OSError):  # the listener closed at the end of the test
            while True:
                dropper.accept()[0].close()

    threading.Thread(target=drop, daemon=True).start()
    call = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"_meta": MODERN_META, "name": "title", "arguments": {"input": "x"}},
    }
    try:
        for port, kind in (
            (other.server_port, "not_a_worker"),
            (dropper.getsockname()[1], "daemon_unreachable"),
        ):
            result = bridge(port).request(call)["result"]
            assert result["isError"] and result["content"][0]["text"].startswith(f"{kind}: "), result
    finally:
        other.shutdown()
        other.server_close()
        dropper.close()


def test_the_bridge_imports_nothing_outside_the_standard_library() -> None:
    """No OpenVINO, no GenAI: -X importtime lists every module the bridge imported to answer, beyond
    what the interpreter itself loads at start-up (site, .pth hooks)."""

    def imported(*args: str, stdin: bytes = b"") -> set[str]:
        process = subprocess.run(
            [sys.executable, "-X", "importtime", *args],
            input=stdin,
            capture_output=True,
            timeout=READ_TIMEOUT_S,
            check=False,
        )
        assert process.returncode == 0, process.stderr
        lines = process.stderr.decode().splitlines()
        return {
            line.split("|")[-1].strip().split(".")[0] for line in lines if line.startswith("import time:")
        }

    interpreter = imported("-c", "pass")
    bridge = (
        imported(
            str(REPO / "worker.py"),
            "--mcp",
            "--port",
            "1",
            stdin=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n',
        )
        - interpreter
    )
    assert {"json", "http", "argparse"} <= bridge  # the listing is real
    assert not bridge & {"openvino", "openvino_genai", "openvino_tokenizers", "numpy"}
    # "org": the standard library's copy.py probing for Jython (from org.python.core import ...).
    others = bridge - {"imported package", "org"} - set(sys.stdlib_module_names)
    assert not others, others
