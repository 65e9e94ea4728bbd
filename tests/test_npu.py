"""The NPU proof rule, on a fake pipeline and a synthetic busy counter.

These are the NPU behaviours GenAI's emulated NPU path (tests/test_npu_path.py) cannot show: the
kernel's counter advancing, not advancing, going backwards or vanishing, and a host without an NPU.
That a real NPU accepts the model and the settings and advances the real counter is decided by
smoke_llm_npu.py on an NPU host.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import smoke_llm_npu
import worker
from conftest import FakeNpuPipeline
from conftest import make_worker


def test_positive_delta_is_reported_as_verified(npu_settings: worker.Settings, busy_file: Path) -> None:
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file, busy_increment_us=2650)
    npu_worker = make_worker(npu_settings, pipeline)
    result = npu_worker.run(worker.JobRequest("title", "Kanban task asks for a worker."), "r1")
    assert (result["device"], result["npu_busy_delta_us"], result["npu_proof"]) == ("NPU", 2650, "verified")
    # Both warm-ups (title, memory_candidate) and the job advanced the counter.
    assert int(busy_file.read_text()) == 1_000_000 + (len(worker.WARMUP_REQUESTS) + 1) * 2650


def test_zero_delta_fails_loudly_with_the_measurements(npu_settings: worker.Settings, busy_file: Path) -> None:
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file)
    npu_worker = make_worker(npu_settings, pipeline)
    pipeline.busy_increment_us = 0
    with pytest.raises(worker.NpuProofFailed) as failure:
        npu_worker.run(worker.JobRequest("title", "x"), "r1")
    assert failure.value.exit_code == 3 and failure.value.status == 502
    assert failure.value.result is not None
    assert failure.value.result["npu_busy_delta_us"] == 0 and failure.value.result["npu_proof"] == "failed"


def test_a_counter_that_goes_backwards_also_fails(npu_settings: worker.Settings, busy_file: Path) -> None:
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file, busy_increment_us=-5)
    with pytest.raises(worker.NpuProofFailed):
        make_worker(npu_settings, pipeline)  # the warm-up already fails: the daemon never turns ready


def test_counter_unreadable_mid_run_is_a_proof_failure(npu_settings: worker.Settings, busy_file: Path) -> None:
    npu_worker = make_worker(npu_settings, FakeNpuPipeline(npu_settings, busy_file=busy_file))
    busy_file.write_text("not a number")
    with pytest.raises(worker.NpuProofFailed, match="cannot read"):
        npu_worker.run(worker.JobRequest("title", "x"), "r1")


def test_no_npu_proof_says_unavailable_and_reads_no_counter(npu_settings: worker.Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(npu_settings, npu_proof=False, busy_path=tmp_path / "missing")
    result = make_worker(settings, FakeNpuPipeline(settings)).run(worker.JobRequest("title", "x"), "r1")
    assert (result["npu_busy_delta_us"], result["npu_proof"]) == (None, "unavailable")


def test_npu_memory_candidates_ask_for_the_schema_and_validate_the_json(
    npu_settings: worker.Settings, busy_file: Path
) -> None:
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file, reply='{"candidates": [{"text": "Lives in Lisbon"}]}')
    result = make_worker(npu_settings, pipeline).run(worker.JobRequest("memory_candidate", "I live in Lisbon."), "r1")
    assert result["candidates"] == [{"text": "Lives in Lisbon"}] and result["json_valid"] is True
    assert pipeline.calls[-1]["grammar"] == worker.MEMORY_GRAMMAR  # on the NPU as on the CPU


# --- through the CLI entry points ----------------------------------------------------------------


def cli_args(settings: worker.Settings, *extra: str) -> list[str]:
    return [
        "--model", str(settings.model_path), "--device", "NPU",
        "--busy-path", str(settings.busy_path), "--lock-file", str(settings.lock_path), *extra,
    ]


def test_cli_job_on_fake_npu_prints_the_delta(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=777)
    code = worker.main(cli_args(npu_settings, "--job", "title", "--input", "hello"), pipeline_factory=factory)
    body = json.loads(capsys.readouterr().out)
    assert (code, body["npu_busy_delta_us"], body["npu_proof"]) == (0, 777, "verified")


def test_cli_zero_delta_exits_3(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=0)
    code = worker.main(cli_args(npu_settings, "--job", "title", "--input", "hello"), pipeline_factory=factory)
    out = capsys.readouterr()
    body = json.loads(out.out)
    assert code == 3 and body["error"]["type"] == "npu_proof_failed" and body["result"]["npu_busy_delta_us"] == 0
    assert "npu_proof_failed" in out.err


def test_missing_counter_is_a_startup_error(
    npu_settings: worker.Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = dataclasses.replace(npu_settings, busy_path=tmp_path / "no-such-counter")
    loaded: list[Any] = []
    factory = lambda settings: loaded.append(settings) or FakeNpuPipeline(settings)
    for mode in (["--job", "title", "--input", "x"], ["--port", "0"]):
        assert worker.main(cli_args(settings, *mode), pipeline_factory=factory) == 78
        assert "Linux >= 6.11" in capsys.readouterr().err
    assert loaded == []  # refused before any model load


def test_daemon_that_fails_its_warm_up_proof_exits_3(npu_settings: worker.Settings, busy_file: Path) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=0)
    assert worker.main(cli_args(npu_settings, "--port", "0"), pipeline_factory=factory) == 3


def test_smoke_skips_without_an_npu(capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke_llm_npu.main([], has_npu=lambda: False) == 77
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines()[-1].startswith("smoke_llm_npu.py: SKIP: OpenVINO sees no NPU")


def test_smoke_passes_on_a_fake_npu_with_a_positive_delta(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=4242)
    args = ["--model", str(npu_settings.model_path), "--busy-path", str(busy_file),
            "--lock-file", str(npu_settings.lock_path)]
    assert smoke_llm_npu.main(args, pipeline_factory=factory, has_npu=lambda: True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["npu_busy_delta_us"] == 4242 and report["device"] == "NPU"
    assert set(report["timing_ms"]) == {"load", "generate", "total"}
    assert set(report["versions"]) == {"worker", "openvino", "openvino-genai"}


def test_smoke_fails_on_a_fake_npu_with_zero_delta(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=0)
    args = ["--model", str(npu_settings.model_path), "--busy-path", str(busy_file),
            "--lock-file", str(npu_settings.lock_path)]
    assert smoke_llm_npu.main(args, pipeline_factory=factory, has_npu=lambda: True) == 3
    assert json.loads(capsys.readouterr().out)["error"]["type"] == "npu_proof_failed"


def test_npu_requested_on_a_host_without_one_is_a_configuration_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real factory checks OpenVINO's device list before building anything (this host: CPU only)."""
    pytest.importorskip("openvino_genai")
    model = tmp_path / "model"
    model.mkdir()
    for name in worker.GENAI_MODEL_FILES:
        (model / name).write_text("")
    code = worker.main(["--model", str(model), "--device", "NPU", "--no-npu-proof",
                        "--lock-file", str(tmp_path / "l" / "npu.lock"), "--job", "title", "--input", "x"])
    err = capsys.readouterr().err
    assert code == 78 and "no NPU: OpenVINO sees only ['CPU']" in err and "--emulate-npu" in err
