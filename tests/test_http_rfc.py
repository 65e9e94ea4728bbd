"""HTTP that real clients expect, and errors in one place.

RFC 9112 head parsing both ways (pure, then over sockets), HEAD on every GET endpoint, HTTP/1.0
keep-alive, a half-closed client, /openapi.json naming the address bound, metrics that
promtool and prometheus_client accept, log lines that parse as logfmt, client errors that never
become last_error, a lost device failing liveness, the job deadline counted from receipt, and
the one function each that turns errors into answers and exit codes.
"""

from __future__ import annotations

import ast
import json
import logging
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import worker
from conftest import REPO
from conftest import FakeNpuPipeline
from conftest import assert_error
from conftest import cpu_settings
from test_hostile import Conn
from test_hostile import exchange
from test_hostile import request

# --- parse_head: strict where RFC 9112 says reject, lenient where it says accept ---------------------


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@pytest.mark.parametrize("data, message", [
    param(head("GET / HTTP/1.1", "Host : x"), "malformed header field", id="space-before-colon-5.1"),
    param(head("GET / HTTP/1.1", "Host\t: x"), "malformed header field", id="tab-before-colon"),
    param(head("GET / HTTP/1.1", "NoColonHere"), "malformed header field", id="no-colon"),
    param(head("GET / HTTP/1.1", "Bad Name: x"), "malformed header field", id="space-in-name"),
    param(head("GET / HTTP/1.1", "X-A: a", " folded"), "obsolete line folding", id="obs-fold-5.2"),
    param(head("GET / HTTP/1.1", " Host: x"), "obsolete line folding", id="first-field-indented"),
    param(head("GET / HTTP/1.1", "X-A: a\x00b"), "control character", id="nul-in-value"),
    param(head("GET / HTTP/1.1", "X-A: a\rb"), "control character", id="bare-cr-in-value"),
    param(head("GET / HTTP/1.1", "X-A: a\x7fb"), "control character", id="del-in-value"),
    param(head("GET /"), "malformed request line", id="http-0.9"),
    param(head("GET  / HTTP/1.1"), "malformed request line", id="double-space"),
    param(head("GET / HTTP/1"), "malformed HTTP version", id="bad-version"),
    param(head("GET example.com HTTP/1.1"), "must be a path", id="authority-form"),
])
def test_parse_head_rejects_what_rfc_9112_says_to_reject(data: bytes, message: str) -> None:
    with pytest.raises(worker.ProtocolError) as error:
        worker.parse_head(data)
    assert (error.value.status, error.value.type) == (400, "bad_request") and message in error.value.message


def test_parse_head_refuses_http_2_and_too_many_or_too_long_fields() -> None:
    with pytest.raises(worker.ProtocolError) as error:
        worker.parse_head(head("GET / HTTP/2.0"))
    assert error.value.status == 505
    with pytest.raises(worker.ProtocolError) as error:
        worker.parse_head(head("GET / HTTP/1.1", *[f"X-{i}: y" for i in range(worker.MAX_HEADER_FIELDS + 1)]))
    assert error.value.status == 431
    with pytest.raises(worker.ProtocolError) as error:
        worker.parse_head(head("GET / HTTP/1.1", "X-A: " + "y" * worker.MAX_HEADER_LINE_BYTES))
    assert error.value.status == 431
    with pytest.raises(worker.ProtocolError) as error:
        worker.parse_head(head("GET /" + "a" * worker.MAX_REQUEST_LINE_BYTES + " HTTP/1.1"))
    assert error.value.status == 414


def test_parse_head_accepts_what_rfc_9112_says_to_accept() -> None:
    parsed = worker.parse_head(b"\r\nGET /livez HTTP/1.1\nHost:   127.0.0.1:1  \t\nX-Empty:\n\n")
    assert (parsed.method, parsed.target, parsed.version) == ("GET", "/livez", "HTTP/1.1")
    assert parsed.get("host") == "127.0.0.1:1"  # OWS around the value is not part of it; LF alone ends a line
    assert parsed.get("X-Empty") == ""
    absolute = worker.parse_head(head("GET http://127.0.0.1:1/livez?x=1 HTTP/1.1", "Host: evil.example"))
    assert (absolute.target, absolute.path, absolute.get_all("Host")) == ("/livez?x=1", "/livez", ["127.0.0.1:1"])
    assert worker.parse_head(head("GET http://127.0.0.1:1 HTTP/1.1")).target == "/"
    assert worker.parse_head(head("OPTIONS * HTTP/1.1")).target == "*"


def test_the_parsed_head_is_the_one_every_later_step_reads() -> None:
    parsed = worker.parse_head(b"GET http://localhost/models HTTP/1.0\nX-A:  b \n\n")
    assert (parsed.method, parsed.target, parsed.version) == ("GET", "/models", "HTTP/1.0")
    assert parsed.fields == (("X-A", "b"), ("Host", "localhost"))


@pytest.mark.parametrize("version, connection, keep_alive", [
    param("HTTP/1.1", None, True, id="1.1-default"),
    param("HTTP/1.1", "close", False, id="1.1-close"),
    param("HTTP/1.1", "Keep-Alive", True, id="1.1-keep-alive"),
    param("HTTP/1.0", None, False, id="1.0-default"),
    param("HTTP/1.0", "keep-alive", True, id="1.0-keep-alive"),
    param("HTTP/1.0", "close", False, id="1.0-close"),
])
def test_keep_alive_follows_rfc_9112_section_9_3(
    version: str, connection: str | None, keep_alive: bool
) -> None:
    lines = [f"GET / {version}", "Host: x", *([f"Connection: {connection}"] if connection else [])]
    assert worker.parse_head(head(*lines)).keep_alive is keep_alive


@pytest.mark.parametrize("data, end", [
    param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest", 27, id="crlf"),
    param(b"GET / HTTP/1.1\nHost: x\n\nrest", 24, id="lf"),
    param(b"GET / HTTP/1.1\r\nHost: x\r\n", None, id="incomplete"),
])
def test_head_end(data: bytes, end: int | None) -> None:
    assert worker.head_end(data)[0] == end


# --- the same over sockets: the Origin behind a malformed line can no longer hide -------------------


@pytest.mark.parametrize("lines, status", [
    param(["Host: 127.0.0.1:{port}  "], 200, id="trailing-whitespace-in-host"),
    param(["Host: 127.0.0.1:{port}\t"], 200, id="trailing-tab-in-host"),
    param(["Host : 127.0.0.1:{port}"], 400, id="space-before-colon"),
    param(["Host: 127.0.0.1:{port}", "X-A : b", "Origin: http://evil.example"], 400,
          id="space-before-colon-hid-origin"),
    param(["Host: 127.0.0.1:{port}", "NoColon", "Origin: http://evil.example"], 400, id="no-colon-hid-origin"),
    param(["Host: 127.0.0.1:{port}", "X-A: a\x00b"], 400, id="nul"),
    param(["Host: 127.0.0.1:{port}", "X-A: a", " b"], 400, id="obs-fold"),
])
def test_header_fields_over_a_socket(
    start_server: Callable[..., worker.WorkerHTTPServer], lines: list[str], status: int
) -> None:
    server = start_server()
    port = server.server_port
    data = ("\r\n".join(["GET /healthz HTTP/1.1", *(line.format(port=port) for line in lines)])
            + "\r\n\r\n").encode("latin-1")
    reply, closed = exchange(port, data)
    assert reply.status == status, reply.raw[:300]
    if status == 400:
        assert_error(reply, 400, "bad_request") and closed
        assert server.worker.metrics.refusals["malformed_head"] == 1


def test_a_head_over_128_kib_in_all_is_431_before_its_end_arrives(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    port = server.server_port
    lines = [f"X-Big-{index}: " + "a" * 60_000 for index in range(3)]  # each line within 64 KiB
    with Conn(port, timeout=10) as conn:
        conn.send(f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode() + "\r\n".join(lines).encode())
        assert_error(conn.reply(), 431, "headers_too_large")  # no empty line sent: refused by size alone
    assert server.worker.metrics.refusals["head_too_large"] == 1


def test_an_absolute_form_target_is_served(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    reply, _ = exchange(port, f"GET http://127.0.0.1:{port}/livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert reply.status == 200 and reply.json()["status"] == "alive"
    # The target's authority is the host: a foreign one is refused even with a good Host field.
    reply, _ = exchange(port, f"GET http://evil.example/livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    assert_error(reply, 403, "forbidden")


# --- HEAD, HTTP/1.0 keep-alive, half-close -------------------------------------------------------------


@pytest.mark.parametrize("path", worker.GET_ENDPOINTS)
def test_head_answers_every_get_endpoint_with_its_headers_and_no_content(
    start_server: Callable[..., worker.WorkerHTTPServer], path: str
) -> None:
    server = start_server()
    port = server.server_port
    with Conn(port) as conn:
        conn.send(request(port, "GET", path))
        got = conn.reply()
        conn.send(request(port, "HEAD", path))
        conn.sock.settimeout(2)
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.sock.recv(65536)
        head_reply, _, rest = data.partition(b"\r\n\r\n")
        conn.send(request(port, "GET", "/livez"))  # no content was sent: the connection is in step
        assert rest + conn.reply().raw[:8] and conn.buffer == b""
    status_line, *fields = head_reply.decode().split("\r\n")
    headers = {name.lower(): value for name, _, value in (field.partition(": ") for field in fields)}
    assert status_line.split(" ")[1] == str(got.status) == "200"
    assert headers["content-type"] == got.header("Content-Type")
    if path not in ("/metrics", "/healthz", "/livez"):  # their content changes between two calls
        assert headers["content-length"] == got.header("Content-Length")
    assert rest == b""


def test_curl_head_gets_200(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server = start_server()
    completed = subprocess.run(["curl", "-sI", f"http://127.0.0.1:{server.server_port}/livez"],
                               check=False, capture_output=True, text=True, timeout=10)
    assert completed.stdout.startswith("HTTP/1.1 200 OK")


def test_an_http_1_0_client_that_asks_for_keep_alive_hears_it(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    port = server.server_port
    with Conn(port, timeout=3) as conn:
        for _ in range(3):
            conn.send(request(port, "GET", "/livez", version="HTTP/1.0", headers=("Connection: keep-alive",)))
            reply = conn.reply()
            assert reply.status == 200 and reply.header("Connection") == "keep-alive"
    with Conn(port, timeout=3) as conn:  # without asking: answered, then closed at once
        conn.send(request(port, "GET", "/livez", version="HTTP/1.0"))
        reply = conn.reply()
        assert reply.header("Connection") == "close" and conn.closed_within(1)


def test_ab_keep_alive_does_not_wait_for_a_timeout(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    """ApacheBench -k is an HTTP/1.0 keep-alive client: 200 requests took 10 s each before."""
    if shutil.which("ab") is None:
        pytest.skip("ab is not installed (Debian package apache2-utils)")
    server = start_server()
    started = time.monotonic()
    completed = subprocess.run(["ab", "-q", "-k", "-n", "200", "-c", "1", f"http://127.0.0.1:{server.server_port}/livez"],
                               check=False, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert re.search(r"Keep-Alive requests:\s+200", completed.stdout), completed.stdout
    assert "Failed requests:        0" in completed.stdout
    assert time.monotonic() - started < 30  # not 200 x 10 s


def test_pipelined_requests_are_answered_in_order(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    job = request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "pipelined"}')
    with Conn(port, timeout=10) as conn:
        conn.send(request(port, "GET", "/livez") + job + request(port, "GET", "/models"))  # one write
        replies = [conn.reply() for _ in range(3)]
    assert [reply.status for reply in replies] == [200, 200, 200]
    assert (replies[0].json()["status"] == "alive" and replies[1].json()["job"] == "title"
            and "jobs" in replies[2].json())


def test_a_client_that_half_closes_after_its_request_gets_the_answer(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    port = server.server_port
    with Conn(port, timeout=10) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "Half-closed."}'))
        conn.sock.shutdown(socket.SHUT_WR)  # as nc -N and some scripts do
        reply = conn.reply()
        assert reply.status == 200 and reply.json()["job"] == "title"
        assert reply.header("Connection") == "close" and conn.closed_within(3)
    assert server.worker.metrics.requests.get(("/v1/worker/generate", "title", 499)) is None


def test_a_head_cut_short_by_the_client_is_not_executed(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    with Conn(port, timeout=5) as conn:
        conn.send(f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())  # no empty line
        conn.sock.shutdown(socket.SHUT_WR)
        assert_error(conn.reply(), 400, "bad_request")
    assert server.worker.metrics.requests.get(("/livez", "", 200)) is None
    assert server.worker.metrics.refusals["incomplete"] == 1


def test_openapi_names_the_address_actually_bound(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    for host, expected in (("127.0.0.1", "http://127.0.0.1:{port}"), ("::1", "http://[::1]:{port}")):
        server = start_server(host=host)
        family = socket.AF_INET6 if host == "::1" else socket.AF_INET
        with socket.socket(family) as sock:
            sock.settimeout(5)
            sock.connect((host, server.server_port))
            bracketed = "[::1]" if host == "::1" else host
            sock.sendall(f"GET /openapi.json HTTP/1.1\r\nHost: {bracketed}:{server.server_port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        document = json.loads(data.partition(b"\r\n\r\n")[2])
        assert document["servers"] == [{"url": expected.format(port=server.server_port)}]


# --- metrics that Prometheus tools accept ----------------------------------------------------------------


def metrics_after_some_traffic(server: worker.WorkerHTTPServer) -> str:
    port = server.server_port
    exchange(port, request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}'))
    exchange(port, request(port, "GET", "/nope"))
    exchange(port, b"GET /livez HTTP/1.1\r\nHost : x\r\n\r\n")  # a refusal by the gate
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_pass_the_prometheus_client_parser(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    families = {family.name: family
                for family in parser.text_string_to_metric_families(metrics_after_some_traffic(start_server()))}
    assert families["npu_worker_npu_busy_seconds"].type == "counter"
    refusals = [sample for sample in families["npu_worker_refusals"].samples if sample.name.endswith("_total")]
    assert {sample.labels["reason"]: sample.value for sample in refusals} == {"malformed_head": 1.0}


def test_metrics_pass_promtool_check_metrics(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    completed = subprocess.run(["promtool", "check", "metrics"], input=metrics_after_some_traffic(start_server()),
                               check=False, capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0, completed.stdout + completed.stderr


# --- logfmt that parses ---------------------------------------------------------------------------------

LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)=("(?:[^"\\]|\\.)*"|[^\s"=\\]+)(?: |$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt parser: the whole line must be key=value pairs, values bare or quoted."""
    pairs, position = {}, 0
    while position < len(line):
        match = LOGFMT_PAIR.match(line, position)
        assert match, f"not logfmt at {position}: {line!r}"
        value = match.group(2)
        pairs[match.group(1)] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs


@pytest.mark.parametrize("fields, line", [
    param({"a": 1, "b": "x y", "c": None, "d": ""}, 'a=1 b="x y" c=null d=""', id="quoted-and-null"),
    param({"m": 'say "hi"', "e": "a=b"}, 'm="say \\"hi\\"" e="a=b"', id="quotes-and-equals"),
])
def test_logfmt_quotes_what_needs_quoting(fields: dict[str, Any], line: str) -> None:
    assert worker.logfmt(fields) == line
    assert parse_logfmt(line)["a" if "a" in fields else "m"] == str(fields.get("a", fields.get("m")))


def test_every_log_line_of_a_busy_session_is_logfmt(
    start_server: Callable[..., worker.WorkerHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="openvino_genai_npu_worker")
    server = start_server()
    metrics_after_some_traffic(server)
    settings = cpu_settings(Path("/unused"))
    breaking = FakeNpuPipeline(settings)
    failing = start_server(breaking)
    breaking.fail_with = RuntimeError("boom")
    exchange(failing.server_port,
             request(failing.server_port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}'))
    server._refusals.flush(time.monotonic())
    lines = [record.getMessage() for record in caplog.records if record.name == "openvino_genai_npu_worker"]
    assert len(lines) >= 8
    parsed = [parse_logfmt(line) for line in lines]
    assert any(fields.get("reason") == "malformed_head" and fields.get("refused") == "1" for fields in parsed)
    assert any(fields.get("error") == "generation_failed" for fields in parsed)


# --- last_error is the worker's own fault, never a client's -------------------------------------------


def test_client_caused_5xx_never_become_last_error(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = FakeNpuPipeline(settings, reply=" ".join(f"word{index}" for index in range(40)), seconds_per_token=0.02)
    server = start_server(pipeline)
    port = server.server_port
    exchange(port, request(port, "BREW", "/livez"))  # 501
    exchange(port, b"GET /livez HTTP/2.0\r\n\r\n")  # 505
    body = json.dumps({"job": "summary", "input": "x", "timeout_s": 0.1}).encode()
    # its own timeout_s
    assert_error(exchange(port, request(port, "POST", "/v1/worker/generate", body=body))[0], 504, "timeout")
    assert server.worker.metrics.last_error is None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        assert json.loads(response.read())["last_error"] is None
    pipeline.fail_with = RuntimeError("the model broke")
    exchange(port, request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}'))
    assert server.worker.metrics.last_error == "generation_failed"


# --- a lost device fails liveness ----------------------------------------------------------------------


@pytest.mark.parametrize("message, failures_to_fail", [
    param("Exception from src/plugins/intel_npu: ZE_RESULT_ERROR_DEVICE_LOST", 1, id="device-lost-reported"),
    param("Infer request failed", worker.DEVICE_LOST_FAILURES, id="repeated-failures"),
])
def test_a_device_that_stops_working_fails_liveness(
    start_server: Callable[..., worker.WorkerHTTPServer], message: str, failures_to_fail: int
) -> None:
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))
    server = start_server(pipeline)
    port = server.server_port

    def livez() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/livez", timeout=10) as response:
            return response.status

    job = request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}')
    assert livez() == 200
    pipeline.fail_with = RuntimeError(message)
    for attempt in range(1, failures_to_fail + 1):
        with Conn(port) as conn:
            conn.send(job)
            assert_error(conn.reply(), 500, "generation_failed")
        assert (server.worker.health_problem() is None) is (attempt < failures_to_fail)
    with pytest.raises(urllib.error.HTTPError) as failed:
        livez()
    assert failed.value.code == 503 and "device" in json.loads(failed.value.read())["problem"]
    assert worker.self_check(server, server.worker, None)[0] is not None  # no WATCHDOG=1: systemd restarts us


def test_one_failure_between_successes_is_not_a_lost_device(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))
    server = start_server(pipeline)
    port = server.server_port
    job = request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}')
    for _ in range(worker.DEVICE_LOST_FAILURES * 2):
        pipeline.fail_with = RuntimeError("one bad request")
        exchange(port, job)
        pipeline.fail_with = None
        assert exchange(port, job)[0].status == 200
    assert server.worker.health_problem() is None


# --- the job deadline counts from receipt ----------------------------------------------------------------


def test_the_deadline_counts_from_the_first_byte_not_from_the_body(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    port = server.server_port
    body = json.dumps({"job": "title", "input": "x", "timeout_s": 0.3}).encode()
    with Conn(port, timeout=10) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", body=body)[: -len(body)])
        time.sleep(0.5)  # the body comes after the job's whole deadline
        conn.send(body)
        assert_error(conn.reply(), 504, "timeout")
    fast = json.dumps({"job": "title", "input": "x"}).encode()
    with Conn(port, timeout=10) as conn:
        conn.send(request(port, "POST", "/v1/worker/generate", body=fast)[: -len(fast)])
        time.sleep(0.3)
        conn.send(fast)
        result = conn.reply().json()
    assert result["timing_ms"]["total"] >= 300  # from receipt: the wait for the body is in it


# --- errors become answers and exit codes in one place each ---------------------------------------------


@pytest.mark.parametrize("error, headers", [
    param(worker.Busy("x"), {"Retry-After": str(worker.RETRY_AFTER_BUSY_S)}, id="busy"),
    param(worker.Loading("x"), {"Retry-After": str(worker.RETRY_AFTER_LOADING_S)}, id="loading"),
    param(worker.MethodNotAllowed("x", allow=("GET", "HEAD")), {"Allow": "GET, HEAD"}, id="405"),
    param(worker.Unauthorized("x"), {"WWW-Authenticate": "Bearer"}, id="401"),
    param(worker.InvalidRequest("x"), {}, id="400"),
])
def test_each_error_carries_the_headers_its_answer_needs(error: worker.WorkerError, headers: dict[str, str]) -> None:
    assert error.response_headers() == headers


def test_only_http_response_writes_a_status_line_and_only_two_places_send() -> None:
    tree = ast.parse((REPO / "worker.py").read_text())
    functions = {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    writers = sorted(name for name, node in functions.items()
                     if any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("HTTP/1.1 ")
                            for n in ast.walk(node)))
    assert writers == ["http_response"]
    senders = sorted(name for name, node in functions.items()
                     if any(isinstance(n, ast.Attribute)
                            and n.attr in ("send", "sendall", "send_response", "send_header")
                            for n in ast.walk(node)))
    # send_all (handlers), _send_quietly (the gate's refusals and 100 Continue), _wake (the gate's
    # own socket pair): nothing else writes to a client (SystemdNotifier uses sendto).
    assert senders == ["_send_quietly", "_wake", "send_all"]
    # One function turns a WorkerError into an answer, for the gate and the handlers alike (the CLI
    # prints the same body in report_cli_error and run_batch).
    builders = sorted(name for name, node in functions.items()
                      if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "error_body"
                             for n in ast.walk(node)))
    assert builders == ["error_response", "report_cli_error", "run_batch"]


def test_http_servers_own_parsing_error_pages_and_logging_are_never_reached(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate parses every head once; http.server's parse_request, send_error, send_response and
    log_message (which would log the request line) are not called, for answers and errors alike."""
    reached: list[str] = []
    for name in ("parse_request", "send_error", "send_response", "log_message", "handle_one_request"):
        monkeypatch.setattr(BaseHTTPRequestHandler, name,
                            lambda *args, name=name, **kwargs: reached.append(name))
    server = start_server()
    port = server.server_port
    for data in (request(port, "GET", "/livez"), request(port, "GET", "/nowhere"),
                 request(port, "DELETE", "/models"),
                 request(port, "POST", "/v1/worker/generate", body=b'{"job": "title", "input": "x"}'),
                 request(port, "POST", "/v1/worker/generate", body=b"[")):
        assert exchange(port, data)[0].status in (200, 400, 404, 405)
    assert reached == []


def test_one_function_prints_every_cli_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.report_cli_error(worker.Busy("the NPU lock is held")) == worker.EXIT_BUSY
    assert capsys.readouterr().err == "worker.py: busy: the NPU lock is held\n"
    assert worker.report_cli_error(worker.InputTooLong("too long"), request_id="r1",
                                   prog="smoke_llm_npu.py") == worker.EXIT_USAGE
    out = capsys.readouterr()
    assert json.loads(out.out) == {"error": {"type": "input_too_long", "message": "too long"}, "request_id": "r1"}
    assert out.err == "smoke_llm_npu.py: input_too_long: too long\n"
    source = (REPO / "worker.py").read_text() + (REPO / "smoke_llm_npu.py").read_text()
    assert len(re.findall(r"\{exc\.type\}: \{exc\.message\}", source)) == 1  # only in report_cli_error
