"""`python worker.py --mcp` driven by the official MCP Python SDK (`mcp`), a stock client, over stdio.

The bridge is always the real subprocess; the daemon behind it is either the real one on the tiny
model (the `tiny_daemon` session fixture: real jobs, real limits) or an in-process server with the
fake NPU pipeline, where a test needs a job that takes long (cancellation), a held lock (busy,
timeout), a counter that does not move (proof failure), a model still loading, or a token.
Error prose is the daemon's and may change; the tests check each error's type and its advice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import REPO
from conftest import FakeNpuPipeline
from conftest import TinyDaemon
from conftest import cpu_settings
from conftest import free_port

mcp = pytest.importorskip("mcp")
anyio = pytest.importorskip("anyio")
from mcp import ClientSession
from mcp import StdioServerParameters
from mcp import types
from mcp.client.stdio import stdio_client

GENERATE = "/v1/worker/generate"
CALL_TIMEOUT_S = 60.0
# Inputs the tiny model answers without an empty_output (README and CONTRACT use the same ones).
JOB_INPUTS = {
    "title": "Kanban task asks for a small OpenVINO GenAI NPU worker prototype.",
    "summary": "Build a bounded local NPU worker for small generation tasks, no primary routing changes.",
    "notification": "The nightly backup of the photo library finished at 03:12 after copying 1,204 files.",
    "memory_candidate": "I moved to Lisbon last spring and I prefer tea over coffee.",
}
UNENDING_REPLY = " ".join(f"word{i}" for i in range(400))
VERSIONS = [*worker.MCP_MODERN_VERSIONS, *worker.MCP_LEGACY_VERSIONS]


def bridge_parameters(port: int, *args: str, env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable,
        args=[str(REPO / "worker.py"), "--mcp", "--port", str(port), *args],
        env={"PYTHONUNBUFFERED": "1", **(env or {})},
        cwd=str(REPO),
    )


async def open_version(session: ClientSession, version: str) -> None:
    """Start a session the way a client of that revision does."""
    if version in worker.MCP_MODERN_VERSIONS:
        await session.discover()
    elif version == "2025-11-25":
        await session.initialize()  # the SDK's handshake proposes 2025-11-25
    else:  # an older client: the same handshake, proposing its own revision
        result = await session.send_request(
            types.InitializeRequest(
                params=types.InitializeRequestParams(
                    protocol_version=version,
                    capabilities=types.ClientCapabilities(),
                    client_info=types.Implementation(name="test-2025-06-18", version="1"),
                )
            ),
            types.InitializeResult,
        )
        session.adopt(result)
        await session.send_notification(types.InitializedNotification())
    assert session.protocol_version == version


@contextlib.asynccontextmanager
async def bridge(
    port: int, tmp_path: Path, *args: str, version: str = VERSIONS[0], env: dict[str, str] | None = None
) -> AsyncIterator[ClientSession]:
    """A session with a fresh `worker.py --mcp`; its stderr (the log) goes to tmp_path/bridge.log."""
    with (tmp_path / "bridge.log").open("a") as log:  # opened once, before the session
        async with (
            stdio_client(bridge_parameters(port, *args, env=env), errlog=log) as (read, write),
            ClientSession(read, write, read_timeout_seconds=CALL_TIMEOUT_S) as session,
        ):
            await open_version(session, version)
            yield session


def run(test: Callable[[], Any]) -> Any:
    return anyio.run(test)


def error_of(result: types.CallToolResult) -> str:
    """The error type an isError result starts with ("busy: The NPU is busy ...")."""
    assert result.is_error, result
    assert result.structured_content is None
    (block,) = result.content
    kind, _, advice = block.text.partition(": ")
    assert advice.endswith("."), block.text  # one sentence saying what to do
    return kind


def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Ask again until check() gives something; for state in another process or thread pool."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.01)
    return value


async def eventually(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """until() inside a session: the client's own tasks (a cancellation to send) keep running."""
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await anyio.sleep(0.01)
    return value


def lock_is_free(lock_path: Path) -> bool:
    try:
        fd = worker.NpuLock(lock_path).acquire(0)
    except worker.Busy:
        return False
    os.close(fd)
    return True


# --------------------------------------------------------------------------------------------------
# Every revision we claim: discover or initialize, list the tools, call every job (real daemon)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_a_stock_client_lists_and_calls_every_job_at_each_version(
    tiny_daemon: TinyDaemon, tmp_path: Path, version: str
) -> None:
    async def session_work() -> tuple[Any, dict[str, types.CallToolResult]]:
        async with bridge(tiny_daemon.port, tmp_path, version=version) as session:
            listed = await session.list_tools()
            # call_tool validates structuredContent against the listed outputSchema itself.
            return listed, {
                job: await session.call_tool(job, {"input": text}) for job, text in JOB_INPUTS.items()
            }

    listed, results = run(session_work)
    assert [tool.name for tool in listed.tools] == list(worker.JOBS)
    for job, result in results.items():
        assert not result.is_error, result.content
        body = result.structured_content
        assert body["job"] == job and len(body["request_id"]) == 32
        assert (body["device"], body["npu_proof"], body["npu_busy_delta_us"]) == (
            "CPU",
            "not_applicable",
            None,
        )
        (block,) = result.content
        if job == "memory_candidate":
            assert json.loads(block.text) == {"candidates": body["candidates"]}
        else:
            assert block.text == body["text"]


def test_tools_carry_the_daemons_bounds_schemas_and_annotations(
    tiny_daemon: TinyDaemon, tmp_path: Path
) -> None:
    async def session_work() -> Any:
        async with bridge(tiny_daemon.port, tmp_path) as session:
            return await session.list_tools()

    models = json.loads(
        worker.DaemonCall(worker.DaemonAddress(port=tiny_daemon.port), 10).request("GET", "/models")[2]
    )
    for tool in run(session_work).tools:
        job = models["jobs"][tool.name]
        assert f"up to {job['max_input_tokens']} tokens" in tool.description
        assert f"never more than {models['limits']['max_input_chars']} characters" in tool.description
        assert "Runs on this machine's CPU" in tool.description  # the tiny daemon's device, never "NPU"
        assert "npu_proof: not_applicable" in tool.description and "truncate" in tool.description
        schema = tool.input_schema
        assert schema["required"] == ["input"] and schema["additionalProperties"] is False
        assert schema["properties"]["max_new_tokens"]["maximum"] == job["max_new_tokens"]
        assert schema["properties"]["max_new_tokens"]["default"] == job["default_max_new_tokens"]
        assert schema["properties"]["truncate"]["type"] == "boolean"
        assert tool.output_schema["properties"]["job"] == {"const": tool.name}
        assert "npu_busy_delta_us" in tool.output_schema["required"]
        annotations = tool.annotations
        assert (annotations.read_only_hint, annotations.destructive_hint, annotations.open_world_hint) == (
            True,
            False,
            False,
        )


def test_discover_names_the_server_and_its_stateless_version(tiny_daemon: TinyDaemon, tmp_path: Path) -> None:
    async def session_work() -> types.DiscoverResult:
        async with bridge(tiny_daemon.port, tmp_path) as session:
            return session.discover_result

    result = run(session_work)
    assert result.supported_versions == list(worker.MCP_MODERN_VERSIONS)
    assert result.capabilities.tools is not None
    assert result.meta[worker.MCP_META_SERVER_INFO]["name"] == "openvino-genai-npu-worker"


# --------------------------------------------------------------------------------------------------
# Errors an agent can act on
# --------------------------------------------------------------------------------------------------


def test_worker_errors_come_back_as_tool_results_with_advice(tiny_daemon: TinyDaemon, tmp_path: Path) -> None:
    async def session_work() -> dict[str, types.CallToolResult]:
        async with bridge(tiny_daemon.port, tmp_path) as session:
            return {
                "too_long": await session.call_tool("summary", {"input": "x" * 5000}),
                "truncated": await session.call_tool("summary", {"input": "x" * 5000, "truncate": True}),
                "over_chars": await session.call_tool("title", {"input": "x" * 7000}),
                "bad_tokens": await session.call_tool("title", {"input": "x", "max_new_tokens": 10_000}),
                "unknown_argument": await session.call_tool("title", {"input": "x", "job": "summary"}),
                "no_input": await session.call_tool("title", {}),
            }

    results = run(session_work)
    too_long = results["too_long"]
    assert error_of(too_long) == "prompt_too_long"
    assert (
        "truncate: true" in too_long.content[0].text
        and "characters of it would fit" in too_long.content[0].text
    )
    assert not results["truncated"].is_error
    assert results["truncated"].structured_content["input_truncated"]["dropped_chars"] > 0
    assert error_of(results["over_chars"]) == "input_too_long"
    for name in ("bad_tokens", "unknown_argument", "no_input"):
        assert error_of(results[name]) == "invalid_request", name


def test_a_daemon_that_is_not_running_is_named_with_the_command_that_starts_it(tmp_path: Path) -> None:
    async def session_work() -> types.CallToolResult:
        async with bridge(free_port(), tmp_path) as session:
            tools = (await session.list_tools()).tools  # from our own limits and the default device
            assert [tool.name for tool in tools] == list(worker.JOBS)
            assert all("Runs on this machine's NPU" in tool.description for tool in tools)
            return await session.call_tool("title", {"input": "x"})

    result = run(session_work)
    assert error_of(result) == "daemon_not_running"
    assert "'systemctl --user start openvino-genai-npu-worker'" in result.content[0].text
    unit = REPO / "systemd" / f"{worker.SERVICE_UNIT}.service"
    assert unit.is_file()


def test_busy_loading_timeout_proof_failure_and_token(
    start_server: Callable[..., worker.WorkerHTTPServer], tmp_path: Path, busy_file: Path
) -> None:
    """One bridge per daemon state; the daemon is in-process with the fake pipeline."""
    busy = start_server(lock_timeout_s=0.2)
    timeout = start_server(
        lock_timeout_s=5.0, limits=worker.Limits(request_timeout_s=0.3), lock_path=busy.settings.lock_path
    )
    loading = start_server(load=False)
    token_path = tmp_path / "token"
    token_path.write_text("s3cret-token\n")
    token_path.chmod(0o600)
    with_token = start_server(token="s3cret-token")
    npu = dataclasses.replace(cpu_settings(tmp_path, port=0), device="NPU", busy_path=busy_file)
    proofless = worker.build_worker(
        npu, lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=0)
    )
    proofless.load(warm_up=False)
    proofless._ready.set()
    proof_server = worker.WorkerHTTPServer(npu, proofless)
    import threading

    threading.Thread(target=proof_server.serve_forever, daemon=True).start()

    async def one_call(port: int, *args: str) -> types.CallToolResult:
        async with bridge(port, tmp_path, *args) as session:
            return await session.call_tool("title", {"input": "Quarterly revenue is up twelve percent."})

    async def session_work() -> dict[str, types.CallToolResult]:
        held = worker.NpuLock(busy.settings.lock_path).acquire(0)  # another process holds the NPU
        try:
            results = {
                "busy": await one_call(busy.server_port),
                "timeout": await one_call(timeout.server_port),
            }
        finally:
            os.close(held)
        results["loading"] = await one_call(loading.server_port)
        results["no_token"] = await one_call(with_token.server_port)
        results["token"] = await one_call(with_token.server_port, "--token-file", str(token_path))
        results["proof"] = await one_call(proof_server.server_port)
        return results

    try:
        results = run(session_work)
    finally:
        proof_server.shutdown()
        proof_server.server_close()
    assert error_of(results["busy"]) == "busy" and "retry after 2 s" in results["busy"].content[0].text
    assert error_of(results["timeout"]) == "timeout"
    assert (
        error_of(results["loading"]) == "loading" and "retry after 5 s" in results["loading"].content[0].text
    )
    assert (
        error_of(results["no_token"]) == "unauthorized"
        and "--token-file" in results["no_token"].content[0].text
    )
    assert not results["token"].is_error
    assert error_of(results["proof"]) == "npu_proof_failed" and "--doctor" in results["proof"].content[0].text


# --------------------------------------------------------------------------------------------------
# Overlapping calls and cancellation
# --------------------------------------------------------------------------------------------------


def slow_server(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> tuple[worker.WorkerHTTPServer, FakeNpuPipeline]:
    """A daemon whose summary of 256 tokens takes 5 s: 20 ms a token."""
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")), reply=UNENDING_REPLY, seconds_per_token=0.02)
    return start_server(pipeline), pipeline


@pytest.mark.parametrize("after_s", [0.3, 0.02], ids=["mid-generation", "within-the-half-close-window"])
def test_cancelling_a_call_cancels_the_daemons_job_and_frees_the_lock(
    start_server: Callable[..., worker.WorkerHTTPServer], tmp_path: Path, after_s: float
) -> None:
    """notifications/cancelled (the SDK sends it when a call is abandoned) resets the call's
    connection: the daemon cancels the generation, even right after the request, where an orderly
    close would count as a half-close and be answered."""
    server, _ = slow_server(start_server)
    metrics = server.worker.metrics

    async def session_work() -> types.CallToolResult:
        async with bridge(server.server_port, tmp_path) as session:
            with anyio.move_on_after(after_s):
                await session.call_tool("summary", {"input": "x", "max_new_tokens": 256})
                pytest.fail("the call was not cancelled")
            cancelled_at = time.monotonic()
            await eventually(
                lambda: server.worker.in_flight == 0 and lock_is_free(server.settings.lock_path),
                2.0,
                "the daemon to drop the cancelled job",
            )
            assert time.monotonic() - cancelled_at < 1.5  # the rest of the 256 tokens would take 4.7 s
            return await session.call_tool("title", {"input": "x", "max_new_tokens": 2})  # still serving

    after = run(session_work)
    assert not after.is_error and after.structured_content["tokens"]["generated"] == 2
    assert metrics.requests.get((GENERATE, "summary", 200)) is None  # never answered in full
    if after_s > worker.HALF_CLOSE_WINDOW_S:
        until(lambda: metrics.requests.get((GENERATE, "summary", 499)), 2.0, "the 499 to be counted")


def test_calls_overlap_each_on_its_own_connection(
    start_server: Callable[..., worker.WorkerHTTPServer], tmp_path: Path
) -> None:
    server, _ = slow_server(start_server)

    async def session_work() -> list[types.CallToolResult]:
        async with bridge(server.server_port, tmp_path) as session:
            results: list[types.CallToolResult] = []

            async def call(job: str) -> None:
                results.append(await session.call_tool(job, {"input": "x", "max_new_tokens": 10}))

            async with anyio.create_task_group() as group:
                for job in ("title", "summary", "notification"):
                    group.start_soon(call, job)
                await eventually(
                    lambda: server.worker.in_flight == 3, 5.0, "three jobs at the daemon at once"
                )
            return results

    results = run(session_work)
    assert sorted(result.structured_content["job"] for result in results) == [
        "notification",
        "summary",
        "title",
    ]


def test_the_bridge_logs_to_stderr_without_the_input(tiny_daemon: TinyDaemon, tmp_path: Path) -> None:
    secret = "Ultraviolet-Pangolin-7 quarterly numbers"

    async def session_work() -> None:
        async with bridge(tiny_daemon.port, tmp_path) as session:
            await session.call_tool("title", {"input": secret})

    run(session_work)
    log = (tmp_path / "bridge.log").read_text()
    assert "event=mcp_call tool=title status=200 outcome=ok" in log
    assert "Ultraviolet" not in log and "Pangolin" not in log


def test_the_doctor_says_whether_a_bridge_reaches_the_daemon(tiny_daemon: TinyDaemon, tmp_path: Path) -> None:
    reaching = worker.mcp_bridge_check(cpu_settings(tmp_path, port=tiny_daemon.port))
    assert (reaching.ok, reaching.warning) == (True, False)
    assert f"127.0.0.1:{tiny_daemon.port}" in reaching.detail and "ready" in reaching.detail
    absent = worker.mcp_bridge_check(cpu_settings(tmp_path, port=free_port()))
    assert (absent.ok, absent.warning) == (True, True)
    assert absent.fix == "systemctl --user start openvino-genai-npu-worker"


def test_the_doctor_says_when_the_bridge_would_need_the_daemons_token(
    start_server: Callable[..., worker.WorkerHTTPServer], tmp_path: Path
) -> None:
    server = start_server(token="s3cret-token")
    settings = cpu_settings(tmp_path, port=server.server_port)
    refused = worker.mcp_bridge_check(settings)
    assert (refused.ok, refused.warning) == (True, True) and "--token-file" in refused.fix
    admitted = worker.mcp_bridge_check(dataclasses.replace(settings, token="s3cret-token"))
    assert (admitted.ok, admitted.warning) == (True, False)


@pytest.mark.parametrize(
    "proof, says",
    [
        (worker.PROOF_VERIFIED, "the result carries proof that the NPU ran"),
        (worker.PROOF_UNAVAILABLE, "npu_proof: unavailable"),
        (worker.PROOF_EMULATED, "through the NPU pipeline (emulated)"),
        (worker.PROOF_NOT_APPLICABLE, "Runs on this machine's CPU"),
    ],
)
def test_each_tool_says_where_its_job_runs_and_what_its_result_proves(
    tiny_daemon: TinyDaemon, proof: str, says: str
) -> None:
    """The description follows the daemon's npu_proof (/models): a tool never claims an NPU it lacks."""
    models = json.loads(
        worker.DaemonCall(worker.DaemonAddress(port=tiny_daemon.port), 10).request("GET", "/models")[2]
    )
    for tool in worker.mcp_tools({**models, "npu_proof": proof}, worker.Limits()):
        assert says in tool["description"]
        assert ("NPU ran" in tool["description"]) == (proof == worker.PROOF_VERIFIED)


def test_the_sdks_default_client_negotiates_the_stateless_revision(tiny_daemon: TinyDaemon) -> None:
    """mcp.Client in its default mode ("auto") probes server/discover and stays modern with us."""

    async def session_work() -> tuple[str, types.CallToolResult]:
        async with mcp.Client(
            bridge_parameters(tiny_daemon.port), read_timeout_seconds=CALL_TIMEOUT_S
        ) as client:
            return client.protocol_version, await client.call_tool("title", {"input": JOB_INPUTS["title"]})

    version, result = run(session_work)
    assert version == "2026-07-28"
    assert not result.is_error and result.structured_content["job"] == "title"
