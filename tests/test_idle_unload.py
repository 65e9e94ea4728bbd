"""Memory back when idle (issue 16): --idle-unload-s releases the pipeline, the next job loads it
again inside its own deadline, and loading never races a job, the NPU lock, SIGTERM or the
watchdog.  Plus resident memory in /healthz and /metrics, and --prefill-chunk-tokens.

The fake pipeline shows the worker's side; the tiny real model shows that GenAI loads again from
the compile cache (on the CPU and through the NPU pipeline compiled for the CPU).  What only a
laptop with an NPU shows: how much NPU memory an unload gives back, and the reload time there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import worker
from conftest import REPO
from conftest import TINY_MODEL
from conftest import FakeNpuPipeline
from conftest import cpu_settings

IDLE_S = 60.0


def request(**changes: Any) -> worker.JobRequest:
    return dataclasses.replace(worker.JobRequest("title", "Kanban task asks for a worker."), **changes)


class CountingFactory:
    """Builds fake pipelines and counts them; ``gate`` (if set) holds each load until it is set."""

    def __init__(self, settings: worker.Settings) -> None:
        self.settings = settings
        self.loads = 0
        self.gate: threading.Event | None = None
        self.loading = threading.Event()

    def __call__(self, settings: worker.Settings) -> worker.Pipeline:
        self.loads += 1
        self.loading.set()
        if self.gate is not None and not self.gate.wait(10):
            raise RuntimeError("the test never let the load finish")
        return FakeNpuPipeline(settings)


@pytest.fixture
def settings(tmp_path: Path) -> worker.Settings:
    return cpu_settings(tmp_path, idle_unload_s=IDLE_S, lock_timeout_s=5.0)


def loaded(settings: worker.Settings) -> tuple[worker.Worker, CountingFactory]:
    factory = CountingFactory(settings)
    built = worker.build_worker(settings, factory)
    built.load()
    return built, factory


def later() -> float:
    """A moment at which the worker has been idle for longer than IDLE_S."""
    return time.monotonic() + IDLE_S + 1


def test_an_idle_worker_unloads_and_stays_ready_and_the_next_job_loads_it_again(settings: worker.Settings) -> None:
    built, factory = loaded(settings)
    assert built.run(request(), "r0")["timing_ms"].get("load") is None
    assert built.unload_if_idle() is False  # a job just ended
    assert built.unload_if_idle(now=later()) is True
    assert (built.model_loaded, built.ready, built.metrics.model_unloads) == (False, True, 1)
    health = worker.health_body(settings, built)
    assert (health["status"], health["ready"], health["model_loaded"]) == ("ok", True, False)
    assert built.unload_if_idle(now=later()) is False  # nothing left to unload

    result = built.run(request(), "r1")
    assert result["text"] and result["timing_ms"]["load"] >= 0
    assert result["timing_ms"]["queue"] >= result["timing_ms"]["load"]  # the load is part of the wait
    assert (factory.loads, built.metrics.model_loads, built.model_loaded) == (2, 2, True)
    assert "load" not in built.run(request(), "r2")["timing_ms"]
    text = worker.metrics_text(settings, built)
    assert "npu_worker_model_loads_total 2" in text and "npu_worker_model_unloads_total 1" in text
    assert "npu_worker_model_loaded 1" in text


def test_without_the_option_nothing_unloads(tmp_path: Path) -> None:
    built, _ = loaded(cpu_settings(tmp_path))
    assert built.unload_if_idle(now=later()) is False and built.start_idle_unloader() is None


def test_a_running_job_is_never_unloaded_under(settings: worker.Settings) -> None:
    built, _ = loaded(settings)
    pipeline = built._pipeline
    assert isinstance(pipeline, FakeNpuPipeline)
    inside, release = threading.Event(), threading.Event()

    def should_stop() -> bool:
        inside.set()
        release.wait(10)
        return False

    original = pipeline.generate
    pipeline.generate = lambda prompt, tokens, grammar, _stop, rules=None: original(  # type: ignore[method-assign]
        prompt, tokens, grammar, should_stop, rules)
    job = threading.Thread(target=built.run, args=(request(), "r1"))
    job.start()
    try:
        assert inside.wait(10)
        assert built.unload_if_idle(now=later()) is False and built.model_loaded
    finally:
        release.set()
        job.join(10)
    assert built.unload_if_idle(now=later()) is True


def test_two_jobs_after_an_unload_load_the_model_once(settings: worker.Settings) -> None:
    built, factory = loaded(settings)
    built.unload_if_idle(now=later())
    factory.gate, factory.loading = threading.Event(), threading.Event()
    results: list[dict[str, Any]] = []
    jobs = [threading.Thread(target=lambda: results.append(built.run(request(), "r"))) for _ in range(2)]
    for job in jobs:
        job.start()
    assert factory.loading.wait(10)
    assert built.unload_if_idle(now=later()) is False  # jobs are in flight
    factory.gate.set()
    for job in jobs:
        job.join(10)
    assert len(results) == 2 and factory.loads == 2  # the start-up load and one reload


def test_a_reload_waits_for_the_npu_lock_inside_the_jobs_deadline(settings: worker.Settings) -> None:
    built, factory = loaded(settings)
    built.unload_if_idle(now=later())
    other_process = worker.NpuLock(settings.lock_path).acquire(0)  # its own open file: another holder
    try:
        with pytest.raises(worker.RequestTimeout):
            built.run(request(timeout_s=0.2), "r1")
        assert not built.model_loaded and factory.loads == 1
    finally:
        os.close(other_process)
    assert built.run(request(), "r2")["timing_ms"]["load"] >= 0 and factory.loads == 2


class SignallingLock(worker.NpuLock):
    """Sets ``waiting`` once an acquisition has found the lock held and polls."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.waiting = threading.Event()

    def acquire(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> int:
        def polled() -> bool:
            self.waiting.set()
            return give_up()

        return super().acquire(timeout_s, polled)


def test_sigterm_during_a_reloads_lock_wait_stops_it(settings: worker.Settings) -> None:
    built, factory = loaded(settings)
    built.unload_if_idle(now=later())
    lock = SignallingLock(settings.lock_path)
    built.queue._npu_lock = lock
    other_process = worker.NpuLock(settings.lock_path).acquire(0)
    errors: list[BaseException] = []

    def job() -> None:
        try:
            built.run(request(), "r1")
        except worker.WorkerError as exc:
            errors.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    try:
        assert lock.waiting.wait(10)
        built.begin_shutdown()  # what SIGTERM does
        thread.join(10)
    finally:
        os.close(other_process)
    assert not thread.is_alive() and len(errors) == 1 and isinstance(errors[0], worker.ShuttingDown)
    assert factory.loads == 1 and not built.model_loaded


def test_the_watchdog_leaves_a_reload_alone_until_it_is_past_every_deadline(settings: worker.Settings) -> None:
    built, factory = loaded(settings)
    built.unload_if_idle(now=later())
    factory.gate, factory.loading = threading.Event(), threading.Event()
    job = threading.Thread(target=built.run, args=(request(), "r1"))
    job.start()
    try:
        assert factory.loading.wait(10)
        assert built.health_problem() is None  # a reload in progress is not a fault
        built._reloading_since = time.monotonic() - settings.limits.request_timeout_s - worker.STUCK_GRACE_S - 1
        assert "a model reload has held the NPU" in (built.health_problem() or "")
    finally:
        factory.gate.set()
        job.join(10)
    assert built.health_problem() is None


class ReleasedPipeline(FakeNpuPipeline):
    """Tells when the worker has let go of it (CPython frees it at its last reference)."""

    released = threading.Event()

    def __del__(self) -> None:
        self.released.set()


def test_the_idle_thread_unloads_after_the_idle_time_and_ends_at_shutdown(tmp_path: Path) -> None:
    settings = cpu_settings(tmp_path, idle_unload_s=0.05)
    released = threading.Event()
    pipelines = []

    def factory(settings: worker.Settings) -> worker.Pipeline:
        pipeline = ReleasedPipeline(settings)
        pipeline.released = released
        pipelines.append(id(pipeline))
        return pipeline

    built = worker.build_worker(settings, factory)
    built.load()
    thread = built.start_idle_unloader()
    assert thread is not None
    try:
        assert released.wait(10) and built.metrics.model_unloads == 1 and not built.model_loaded
        assert built.run(request(), "r1")["timing_ms"]["load"] >= 0
    finally:
        built.begin_shutdown()
        thread.join(10)
    assert not thread.is_alive()


def test_a_reload_that_fails_is_a_generation_failure(settings: worker.Settings) -> None:
    built, _ = loaded(settings)
    built.unload_if_idle(now=later())

    def gone(_settings: worker.Settings) -> worker.Pipeline:
        raise worker.ConfigError("model not found: /gone")

    built._pipeline_factory = gone
    with pytest.raises(worker.GenerationFailed, match="could not load the model again: model not found"):
        built.run(request(), "r1")


# --- over HTTP: /healthz and /metrics ------------------------------------------------------------------


def test_healthz_and_metrics_show_resident_memory_and_whether_the_model_is_loaded(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server(idle_unload_s=IDLE_S)
    base = f"http://127.0.0.1:{server.server_port}"
    with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
        health = json.loads(response.read())
    assert health["model_loaded"] is True and health["resident_memory_bytes"] > 10 * 1024 * 1024
    server.worker.unload_if_idle(now=later())
    with urllib.request.urlopen(base + "/healthz", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read())["model_loaded"] is False
    with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert "# TYPE process_resident_memory_bytes gauge" in metrics
    value = next(line for line in metrics.splitlines() if line.startswith("process_resident_memory_bytes "))
    assert float(value.split()[1]) > 10 * 1024 * 1024
    assert "npu_worker_model_loaded 0" in metrics and "npu_worker_model_unloads_total 1" in metrics


def test_resident_memory_is_read_from_proc() -> None:
    statm_pages = int(Path("/proc/self/statm").read_text().split()[1])
    resident = worker.process_resident_bytes()
    assert resident is not None and abs(resident - statm_pages * os.sysconf("SC_PAGE_SIZE")) < 64 << 20


# --- the real model: loaded again from the compile cache -----------------------------------------------


@pytest.mark.parametrize("emulate", [param(False, id="cpu"), param(True, id="emulated-npu")])
def test_the_real_pipeline_unloads_and_loads_again_from_the_cache(tmp_path: Path, emulate: bool) -> None:
    settings = cpu_settings(tmp_path, idle_unload_s=IDLE_S, cache_dir=tmp_path / "cache", model_path=TINY_MODEL)
    if emulate:
        settings = dataclasses.replace(settings, device="NPU", emulate_npu=True)
    built = worker.build_worker(settings, worker.load_genai_pipeline)
    built.load(warm_up=False)  # the warm-up would add a grammar compile to each load
    first = built.run(request(max_new_tokens=8), "r0")
    assert built.unload_if_idle(now=later()) is True and not built.model_loaded
    again = built.run(request(max_new_tokens=8), "r1")
    assert again["timing_ms"]["load"] > 0 and again["text"] == first["text"]  # greedy: the same answer
    assert built.metrics.model_loads == 2


# --- the options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    param(["--prefill-chunk-tokens", "300"], "must be a power of two that divides --max-prompt-tokens (1024)",
          id="not-a-power"),
    param(["--prefill-chunk-tokens", "2048"], "must be a power of two that divides", id="larger-than-the-limit"),
    param(["--prefill-chunk-tokens", "0"], "must be a power of two", id="zero"),
    param(["--prefill-chunk-tokens", "256", "--max-prompt-tokens", "640"], "(640)", id="not-dividing"),
    param(["--idle-unload-s", "0"], "--idle-unload-s must be above 0", id="idle-zero"),
    param(["--idle-unload-s", "nan"], "--idle-unload-s must be above 0", id="idle-nan"),
])
def test_option_values_that_cannot_work_are_refused_in_one_line(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert worker.main(["--model", str(tmp_path), "--job", "title", "--input", "x", *flags]) == worker.EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_options_come_from_the_environment_too(tmp_path: Path) -> None:
    environ = {"OV_GENAI_NPU_PREFILL_CHUNK_TOKENS": "128", "OV_GENAI_NPU_IDLE_UNLOAD_S": "900"}
    args = worker.build_parser(environ).parse_args(["--model", str(tmp_path)])
    settings = worker.settings_from_args(args, environ)
    assert (settings.prefill_chunk_tokens, settings.idle_unload_s) == (128, 900.0)
    args = worker.build_parser({}).parse_args(["--model", str(tmp_path)])
    assert (args.prefill_chunk_tokens, args.idle_unload_s) == (None, None)


@pytest.mark.parametrize("device, emulate, chunk, expected", [
    param("NPU", False, None, None, id="npu-unset-genai-decides"),
    param("NPU", False, 256, 256, id="npu-set"),
    param("NPU", True, None, 256, id="emulated-keeps-256"),
    param("NPU", True, 128, 128, id="emulated-set"),
    param("CPU", False, 256, None, id="cpu-never"),
])
def test_the_prefill_chunk_goes_to_the_npu_only_when_set(
    tmp_path: Path, device: str, emulate: bool, chunk: int | None, expected: int | None
) -> None:
    settings = worker.Settings(model_path=tmp_path, device=device, emulate_npu=emulate, prefill_chunk_tokens=chunk)
    assert worker.pipeline_properties(settings).get("NPUW_LLM_PREFILL_CHUNK_SIZE") == expected


def test_the_service_env_example_shows_both() -> None:
    text = (REPO / "systemd" / "openvino-genai-npu-worker.env.example").read_text()
    assert "#OV_GENAI_NPU_PREFILL_CHUNK_TOKENS=" in text and "#OV_GENAI_NPU_IDLE_UNLOAD_S=" in text


def test_the_daemon_starts_the_idle_unloader_once_ready_and_stops_it_at_sigterm(tmp_path: Path) -> None:
    settings = cpu_settings(tmp_path, port=0, idle_unload_s=0.05)
    released = threading.Event()

    def factory(settings: worker.Settings) -> worker.Pipeline:
        pipeline = ReleasedPipeline(settings)
        pipeline.released = released
        return pipeline

    built = worker.build_worker(settings, factory)
    stop = threading.Event()
    outcome: list[int] = []
    notifier = worker.SystemdNotifier({})
    daemon = threading.Thread(target=lambda: outcome.append(worker.serve(settings, built, stop, notifier)))
    daemon.start()
    try:
        assert released.wait(10)  # loaded, warmed up, ready, then idle for 0.05 s
        assert built.ready and not built.model_loaded
        assert built.run(request(), "r1")["timing_ms"]["load"] >= 0
    finally:
        stop.set()  # what SIGTERM does
        daemon.join(10)
    assert outcome == [worker.EXIT_OK]
    assert built.idle_unloader is not None
    built.idle_unloader.join(10)
    assert not built.idle_unloader.is_alive()
