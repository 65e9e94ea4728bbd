"""The HTTP API on 127.0.0.1:0 with a fake pipeline: one test per status code and error type."""

from __future__ import annotations

import dataclasses
import http.client
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import FakeNpuPipeline
from conftest import assert_error
from conftest import call
from conftest import cpu_settings

CANARY = "CANARY-7f3a9c"


def raw(server: worker.WorkerHTTPServer, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def raw_json(reply: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"Content-Type: application/json" in head
    return status, json.loads(body)


# --- success paths ---------------------------------------------------------------------------------


def test_healthz_is_200_once_loaded(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, _, body = call(start_server(), "GET", "/healthz")
    assert status == 200
    assert body.pop("model_loaded") is True and body.pop("resident_memory_bytes") > 0  # tests/test_idle_unload.py
    assert body == {
        "status": "ok",
        "ready": True,
        "model": "tiny-chatml-ov",
        "device": "CPU",
        "npu_proof": "not_applicable",
        "busy_counter": None,
        "npu_evidence": None,
        "queue_waiting": 0,
        "queue_depth": 8,
        "jobs_in_flight": 0,
        "last_error": None,
        "version": worker.__version__,
    }


def test_healthz_is_503_with_retry_after_before_loading(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, headers, body = call(start_server(load=False), "GET", "/healthz")
    assert (status, body["status"], body["ready"]) == (503, "loading", False)
    assert headers["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)


def test_models_lists_model_jobs_and_limits(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, _, body = call(start_server(), "GET", "/models")
    assert status == 200
    assert body["models"] == [{"id": "tiny-chatml-ov", "device": "CPU", "ready": True}]
    assert list(body["jobs"]) == ["title", "summary", "notification", "memory_candidate"]
    fake = FakeNpuPipeline(cpu_settings(Path("/unused")))  # its tokens are words
    overhead = fake.encode(fake.render_prompt(worker.job_messages(worker.JOBS["title"], ""))).token_count
    assert body["jobs"]["title"] == {
        "default_max_new_tokens": worker.JOBS["title"].default_max_new_tokens, "max_new_tokens": 64,
        "prompt_overhead_tokens": overhead, "max_input_tokens": 1024 - overhead,
    }
    assert body["limits"] == {
        "max_input_chars": 6000, "max_body_bytes": 76096, "max_prompt_tokens": 1024, "context_tokens": 1280,
        "request_timeout_s": 120.0, "queue_depth": 8,
    }


def test_models_says_null_overheads_while_the_model_loads(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, _, body = call(start_server(load=False), "GET", "/models")
    assert status == 200
    assert {job["prompt_overhead_tokens"] for job in body["jobs"].values()} == {None}
    assert {job["max_input_tokens"] for job in body["jobs"].values()} == {None}


def test_an_input_at_the_limit_fits_the_body_cap_even_fully_escaped(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    """6000 emoji escaped by json.dumps are 72 KB of \\ud83d\\ude00: a body that must be accepted."""
    body = json.dumps({"job": "title", "input": "\U0001f600" * 6000, "max_new_tokens": 4})
    assert len(body) > 72_000
    status, _, answer = call(start_server(), "POST", "/v1/worker/generate", body.encode())
    assert status == 200, answer  # the fake counts words, so the prompt fits; never body_too_large


@pytest.mark.parametrize("job", list(worker.JOBS))
def test_generate_runs_every_job(start_server: Callable[..., worker.WorkerHTTPServer], job: str) -> None:
    reply = '{"candidates": [{"text": "Prefers tea"}]}' if job == "memory_candidate" else "Tea is better than coffee."
    settings = cpu_settings(Path("/unused"))
    server = start_server(FakeNpuPipeline(settings, reply=reply))
    status, headers, body = call(server, "POST", "/v1/worker/generate", {"job": job, "input": "I prefer tea."})
    assert status == 200
    assert body["job"] == job and body["request_id"] == headers["X-Request-Id"]
    assert body["device"] == "CPU" and body["npu_proof"] == "not_applicable" and body["npu_busy_delta_us"] is None
    assert body["finish_reason"] == "stop"
    assert set(body["timing_ms"]) == {"queue", "generate", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["generate"]
    if job == "memory_candidate":
        assert (body["candidates"], body["json_valid"]) == ([{"text": "Prefers tea"}], True)
    else:
        assert "candidates" not in body and body["text"]


def test_job_endpoints_fix_the_job(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    _, _, memory = call(server, "POST", "/v1/worker/extract-memory-candidates", {"input": "x"})
    _, _, notification = call(server, "POST", "/v1/worker/condense-notification", {"input": "x", "max_new_tokens": 3})
    assert memory["job"] == "memory_candidate" and memory["json_valid"] is False and memory["candidates"] == []
    assert notification["job"] == "notification" and notification["tokens"]["max_new_tokens"] == 3
    assert notification["finish_reason"] == "length"
    status, _, body = call(server, "POST", "/v1/worker/condense-notification", {"job": "title", "input": "x"})
    assert (status, body["error"]["type"]) == (400, "invalid_request")


def test_keep_alive_serves_several_requests_on_one_connection(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    try:
        for _ in range(3):
            connection.request("POST", "/v1/worker/generate", body=b'{"job":"title","input":"x"}',
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200 and json.loads(response.read())["job"] == "title"
    finally:
        connection.close()


# --- one test per error type -----------------------------------------------------------------------


def test_400_invalid_request(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    body = assert_error(call(start_server(), "POST", "/v1/worker/generate", {"job": "title"}), 400, "invalid_request")
    assert "'input'" in body["error"]["message"]


def test_400_invalid_json_never_echoes_input(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    body = assert_error(
        call(start_server(), "POST", "/v1/worker/generate", b'{"input": "' + CANARY.encode()), 400, "invalid_json"
    )
    assert CANARY not in json.dumps(body)


def test_400_bad_request_line(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, body = raw_json(raw(start_server(), f"GARBAGE {CANARY}\r\n\r\n".encode()))
    assert (status, body["error"]["type"]) == (400, "bad_request")
    assert CANARY not in json.dumps(body)


def test_404_not_found(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    assert_error(call(start_server(), "GET", "/v1/chat/completions"), 404, "not_found")


def test_405_method_not_allowed_with_allow(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    response = call(server, "GET", "/v1/worker/generate")
    assert_error(response, 405, "method_not_allowed")
    assert response[1]["Allow"] == "POST"
    assert call(server, "POST", "/healthz", {})[1]["Allow"] == "GET, HEAD"


def test_411_length_required_without_content_length_or_when_chunked(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    no_length = b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\r\n"
    status, body = raw_json(raw(server, no_length))
    assert (status, body["error"]["type"]) == (411, "length_required")
    chunked = (
        b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    status, body = raw_json(raw(server, chunked))
    assert (status, body["error"]["type"]) == (411, "length_required")


def test_413_body_too_large_is_refused_without_reading(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    # The server answers and closes at once although the promised gigabyte never arrives.
    request = (
        b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000000000\r\n\r\n{"
    )
    reply = raw(start_server(), request)
    status, body = raw_json(reply)
    assert (status, body["error"]["type"]) == (413, "body_too_large")
    assert b"Connection: close" in reply


def test_413_input_too_long(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    body = assert_error(
        call(start_server(), "POST", "/v1/worker/generate", {"job": "title", "input": "x" * 6001}),
        413,
        "input_too_long",
    )
    assert "6001" in body["error"]["message"] and "6000" in body["error"]["message"]


def test_413_prompt_too_long_never_reaches_the_pipeline(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = FakeNpuPipeline(settings)
    server = start_server(pipeline)
    calls_after_warm_up = len(pipeline.calls)
    long_input = " ".join(["word"] * 1100)  # the fake counts words: over MAX_PROMPT_LEN 1024
    body = assert_error(
        call(server, "POST", "/v1/worker/generate", {"job": "summary", "input": long_input}), 413, "prompt_too_long"
    )
    assert "1024" in body["error"]["message"]
    assert len(pipeline.calls) == calls_after_warm_up


def test_414_uri_too_long(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, body = raw_json(raw(start_server(), b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"))
    assert (status, body["error"]["type"]) == (414, "uri_too_long")


def test_415_unsupported_media_type(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    response = call(start_server(), "POST", "/v1/worker/generate", b"job=title&input=x",
                    {"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(response, 415, "unsupported_media_type")


def test_415_is_answered_before_100_continue(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    request = (
        b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    reply = raw(start_server(), request)
    assert reply.startswith(b"HTTP/1.1 415 ")
    assert b"100 Continue" not in reply


def test_431_headers_too_large(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(120))
    status, body = raw_json(raw(start_server(), b"GET /healthz HTTP/1.1\r\n" + headers + b"\r\n"))
    assert (status, body["error"]["type"]) == (431, "headers_too_large")


def test_500_generation_failed(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = FakeNpuPipeline(settings)
    server = start_server(pipeline)
    pipeline.fail_with = RuntimeError(f"Infer Request is busy {CANARY}")
    body = assert_error(
        call(server, "POST", "/v1/worker/generate", {"job": "title", "input": "x"}), 500, "generation_failed"
    )
    assert CANARY not in json.dumps(body)
    pipeline.fail_with = None
    assert call(server, "POST", "/v1/worker/generate", {"job": "title", "input": "x"})[0] == 200


def test_500_internal_error_logs_type_only(
    start_server: Callable[..., worker.WorkerHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenTokenizer(FakeNpuPipeline):
        def count_tokens(self, prompt: str) -> int:
            if CANARY in prompt:
                raise KeyError(prompt)
            return super().count_tokens(prompt)

    server = start_server(BrokenTokenizer(cpu_settings(Path("/unused"))))
    with caplog.at_level(logging.INFO, logger="openvino_genai_npu_worker"):
        body = assert_error(
            call(server, "POST", "/v1/worker/generate", {"job": "title", "input": CANARY}), 500, "internal_error"
        )
    assert CANARY not in json.dumps(body)
    assert "KeyError" in caplog.text and CANARY not in caplog.text


def test_501_not_implemented(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, body = raw_json(raw(start_server(), b"BREW /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"))
    assert (status, body["error"]["type"]) == (501, "not_implemented")


def test_502_empty_output(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    settings = cpu_settings(Path("/unused"))
    pipeline = FakeNpuPipeline(settings)
    server = start_server(pipeline)
    pipeline.reply = '"" **'  # nothing left after quotes and markdown are removed
    assert_error(call(server, "POST", "/v1/worker/generate", {"job": "title", "input": "x"}), 502, "empty_output")


def test_502_npu_proof_failed_keeps_the_measured_fields(
    start_server: Callable[..., worker.WorkerHTTPServer], busy_file: Path
) -> None:
    npu = {"device": "NPU", "busy_path": busy_file}
    pipeline = FakeNpuPipeline(dataclasses.replace(cpu_settings(Path("/unused")), **npu), busy_file=busy_file)
    server = start_server(pipeline, **npu)
    pipeline.busy_increment_us = 0  # generation "ran" but the NPU counter did not move
    body = assert_error(
        call(server, "POST", "/v1/worker/generate", {"job": "title", "input": "x"}), 502, "npu_proof_failed"
    )
    result = body["result"]
    assert (result["npu_busy_delta_us"], result["npu_proof"], result["device"]) == (0, "failed", "NPU")
    assert result["tokens"]["generated"] > 0


def test_503_busy_with_retry_after_while_another_process_holds_the_lock(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server(lock_timeout_s=0.2)
    with worker.NpuLock(server.settings.lock_path).held(1.0):  # a second open file description
        response = call(server, "POST", "/v1/worker/generate", {"job": "title", "input": "x"})
    assert_error(response, 503, "busy")
    assert response[1]["Retry-After"] == str(worker.RETRY_AFTER_BUSY_S)


def test_503_loading_before_warm_up(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    response = call(start_server(load=False), "POST", "/v1/worker/generate", {"job": "title", "input": "x"})
    assert_error(response, 503, "loading")
    assert response[1]["Retry-After"] == str(worker.RETRY_AFTER_LOADING_S)


def test_505_http_version_not_supported(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, body = raw_json(raw(start_server(), b"GET /healthz HTTP/2.0\r\n\r\n"))
    assert (status, body["error"]["type"]) == (505, "http_version_not_supported")


# --- connection handling and logs ------------------------------------------------------------------


def test_rejected_body_is_not_run_as_a_second_request(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    smuggled = b"GET /models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    request = (
        b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
        b"Content-Length: %d\r\n\r\n" % len(smuggled)
    ) + smuggled
    reply = raw(start_server(), request)
    assert reply.count(b"HTTP/1.1 ") == 1 and reply.startswith(b"HTTP/1.1 415 ")


def test_logs_carry_ids_and_counts_but_no_text(
    start_server: Callable[..., worker.WorkerHTTPServer], caplog: pytest.LogCaptureFixture
) -> None:
    settings = cpu_settings(Path("/unused"))
    server = start_server(FakeNpuPipeline(settings, reply=f"Output {CANARY}"))
    with caplog.at_level(logging.DEBUG, logger="openvino_genai_npu_worker"):
        status, headers, body = call(server, "POST", f"/v1/worker/generate?q={CANARY}",
                                     {"job": "summary", "input": f"In {CANARY}."}, {"X-Canary": CANARY})
        call(server, "POST", "/v1/worker/generate", b"{" + CANARY.encode())
        raw(server, f"GET /{CANARY} HTTP/9\r\n\r\n".encode())
    assert status == 200 and CANARY in body["text"]  # the caller gets the output...
    assert CANARY not in caplog.text  # ...the log never does
    assert f"request_id={headers['X-Request-Id']}" in caplog.text
    assert "job=summary" in caplog.text and "prompt_tokens=" in caplog.text


def test_server_banner_does_not_advertise_python(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    _, headers, _ = call(start_server(), "GET", "/healthz")
    assert headers["Server"].startswith("openvino-genai-npu-worker") and "Python" not in headers["Server"]


def test_only_loopback_binds_are_accepted(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "::", "example.com", ""):
        with pytest.raises(worker.ConfigError, match="refusing to bind"):
            worker.bind_server(cpu_settings(tmp_path, host=host, port=0), None)  # type: ignore[arg-type]


def test_a_port_in_use_is_a_configuration_error(
    start_server: Callable[..., worker.WorkerHTTPServer], tmp_path: Path
) -> None:
    taken = start_server().server_port
    with pytest.raises(worker.ConfigError, match=f"port {taken} .* already in use"):
        worker.bind_server(cpu_settings(tmp_path, port=taken), None)  # type: ignore[arg-type]
