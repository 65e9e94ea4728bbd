"""smoke_llm_npu.py --tune (issue 16): one load per candidate prefill chunk, each with its own
compile cache, the first-token time and decode rate for prompts of the jobs' real lengths, and
the environment line for the best.  Run here on the tiny model through GenAI's NPU pipeline
compiled for the CPU: it shows the method works; which chunk is best on an NPU only an NPU host
can say.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pytest import param

import smoke_llm_npu
from conftest import TINY_MODEL


def test_tune_measures_each_chunk_with_its_own_cache_and_prints_the_env_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--tune", "--emulate-npu", "--model", str(TINY_MODEL), "--tune-chunks", "128", "256", "--tune-runs", "1",
            "--cache-dir", str(tmp_path / "cache"), "--lock-file", str(tmp_path / "lock" / "npu.lock")]
    assert smoke_llm_npu.main(args) == 0
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.split(" | ")[0] in ("128", "256")]
    assert [row[0] for row in rows] == ["128", "256"]
    for row in rows:
        assert all(float(cell) > 0 for cell in row[1:5])  # load and three first-token times
    header = out.splitlines()[0]
    assert "short" in header and "typical" in header and "near_limit (1024 tok)" in header  # filled to the limit
    assert "not an NPU measurement" in out
    env_line = next(line for line in out.splitlines() if line.startswith("OV_GENAI_NPU_PREFILL_CHUNK_TOKENS="))
    assert env_line.split("=")[1] in ("128", "256")
    for chunk in (128, 256):  # a compile cache per setting: one never reuses another's blob
        assert any((tmp_path / "cache" / f"prefill-{chunk}").iterdir())


def test_the_best_chunk_has_the_lowest_first_token_time_over_the_three_prompts() -> None:
    def row(chunk: int, *first_ms: float) -> dict[str, object]:
        names = ("short", "typical", "near_limit")
        prompts = {name: {"prompt_tokens": 100, "first_token_ms": ms, "decode_tokens_per_s": 20.0}
                   for name, ms in zip(names, first_ms)}
        return {"chunk": chunk, "load_s": 1.0, "prompts": prompts}

    table = smoke_llm_npu.tune_table([row(1024, 470, 480, 490), row(256, 105, 210, 420), row(128, 180, 200, 500)],
                                     emulated=False)
    assert table.splitlines()[-1] == "OV_GENAI_NPU_PREFILL_CHUNK_TOKENS=256"
    assert "this host's NPU" in table


@pytest.mark.parametrize("flags, message", [
    param(["--tune-chunks", "300"], "300 is not a power of two that divides 1024", id="not-a-power"),
    param(["--device", "CPU"], "not with --device CPU", id="cpu"),
    param(["--tune-runs", "0"], "--tune-runs must be at least 1", id="no-runs"),
])
def test_tune_refuses_what_cannot_be_measured(tmp_path: Path, flags: list[str], message: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--tune", "--emulate-npu", "--model", str(TINY_MODEL), *flags]
    if "--device" in flags:
        args.remove("--emulate-npu")
    assert smoke_llm_npu.main(args, has_npu=lambda: True) == 2
    assert message in capsys.readouterr().err
