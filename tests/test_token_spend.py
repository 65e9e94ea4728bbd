"""Limits that tell the truth and the generation settings: the token limit as the contract, what
prompt_too_long says, "truncate", invisible input, the body cap, the CLI's count before the model
load, and the model's own generation config as the base.  The stop rules are in test_stop_rules.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import worker
from conftest import TINY_MODEL
from conftest import FakeNpuPipeline
from conftest import call
from conftest import cpu_settings
from conftest import make_worker

# --- input that is there but shows nothing ---------------------------------------------------------


@pytest.mark.parametrize("text", [
    param(" \t\n", id="white-space"),
    param("\u200b\u200b\u200b", id="zero-width-spaces"),
    param("\ufeff\u200d\u2060\u00ad", id="bom-joiner-word-joiner-soft-hyphen"),
    param("\u3164\u115f\u2800", id="hangul-fillers-braille-blank"),
    param("\u0301\u0308", id="combining-marks-alone"),
    param("\u202e\u2066 \u2069", id="direction-controls"),
])
def test_an_input_with_nothing_visible_is_empty(text: str) -> None:
    with pytest.raises(worker.InvalidRequest, match="'input' is empty"):
        worker.validate_job_request({"job": "title", "input": text}, worker.Limits())


@pytest.mark.parametrize("text", ["a", "\u200bx\u200b", "\U0001f600", "\u6f22", "e\u0301"])
def test_anything_visible_is_an_input(text: str) -> None:
    assert worker.validate_job_request({"job": "title", "input": text}, worker.Limits()).input_text == text


def test_truncate_must_be_a_boolean() -> None:
    for value in (1, "true", None):
        with pytest.raises(worker.InvalidRequest, match="'truncate' must be true or false"):
            worker.validate_job_request({"job": "title", "input": "x", "truncate": value}, worker.Limits())
    assert worker.validate_job_request({"job": "title", "input": "x", "truncate": True}, worker.Limits()).truncate


def test_the_body_cap_holds_any_input_within_the_character_limit_escaped_as_surrogate_pairs() -> None:
    for chars in (1, 100, 6000, 20_000):
        limits = worker.Limits(max_input_chars=chars)
        body = json.dumps({"job": "memory_candidate", "input": "\U0001f600" * chars, "max_new_tokens": 256,
                           "timeout_s": 119.5, "truncate": False})
        assert len(body.encode()) <= limits.max_body_bytes


# --- prompt_too_long and truncate, over HTTP on the fake (a token is a word) -------------------------


def words(count: int) -> str:
    """``count`` fake tokens, three characters each (the fake's token is a word)."""
    return " ".join(f"w{index % 10}" for index in range(count))


def test_prompt_too_long_says_how_much_is_over_and_what_would_fit(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    server = start_server()
    _, _, models = call(server, "GET", "/models")
    fits = models["jobs"]["summary"]["max_input_tokens"]
    status, _, body = call(server, "POST", "/v1/worker/generate", {"job": "summary", "input": words(fits + 10)})
    assert status == 413
    error = body["error"]
    assert (error["type"], error["prompt_tokens"], error["max_prompt_tokens"], error["over_tokens"]) == (
        "prompt_too_long", 1024 + 10, 1024, 10)
    assert abs(error["fits_chars_estimate"] - len(words(fits))) < len(words(fits)) * 0.02
    assert "10 tokens over" in error["message"] and '"truncate": true' in error["message"]
    status, _, result = call(server, "POST", "/v1/worker/generate", {"job": "summary", "input": words(fits)})
    assert status == 200 and result["tokens"]["prompt"] == 1024 and result["input_truncated"] is None


def test_truncate_keeps_the_start_and_the_end_and_reports_what_it_dropped(
    start_server: Callable[..., worker.WorkerHTTPServer]
) -> None:
    pipeline = FakeNpuPipeline(cpu_settings(Path("/unused")))
    server = start_server(pipeline)
    text = words(1900)
    status, _, result = call(server, "POST", "/v1/worker/generate", {"job": "summary", "input": text, "truncate": True})
    assert status == 200
    assert result["tokens"]["prompt"] == 1024  # the longest that fits, counted exactly
    dropped = result["input_truncated"]
    assert dropped["dropped_tokens"] == (1900 + overhead(pipeline, "summary")) - 1024
    assert 0 < dropped["dropped_chars"] < len(text)
    prompt_words = pipeline.calls[-1]["prompt_tokens"]
    assert prompt_words == 1024


def overhead(pipeline: FakeNpuPipeline, job: str) -> int:
    return pipeline.encode(pipeline.render_prompt(worker.job_messages(worker.JOBS[job], ""))).token_count


def test_truncate_changes_nothing_for_an_input_that_fits(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    status, _, result = call(start_server(), "POST", "/v1/worker/generate",
                             {"job": "title", "input": "hello", "truncate": True})
    assert status == 200 and result["input_truncated"] is None


def test_truncate_cannot_fit_a_job_whose_fixed_prompt_is_over_the_limit(tmp_path: Path) -> None:
    settings = cpu_settings(tmp_path, limits=worker.Limits(max_prompt_tokens=10))
    built = make_worker(settings, FakeNpuPipeline(settings), warm_up=False)
    with pytest.raises(worker.PromptTooLong):
        built.run(worker.JobRequest("summary", words(50), truncate=True), "r1")


# --- the real tokenizer: truncation counted exactly, and the CLI's count before the model load -------


def test_truncate_with_the_models_tokenizer_fills_the_limit_and_no_more(tiny_worker: worker.Worker) -> None:
    pipeline = tiny_worker._pipeline
    assert pipeline is not None
    text = (Path(__file__).parent.parent / "README.md").read_text()[:5000]  # English and markdown: ~3000 tokens
    result = tiny_worker.run(worker.JobRequest("summary", text, max_new_tokens=4, truncate=True), "r1")
    limit = tiny_worker.settings.limits.max_prompt_tokens
    assert result["tokens"]["prompt"] <= limit
    kept = len(text) - result["input_truncated"]["dropped_chars"]
    one_more = worker.shorten_middle(text, kept + 1)
    prompt = pipeline.render_prompt(worker.job_messages(worker.JOBS["summary"], one_more))
    assert pipeline.encode(prompt).token_count > limit


def test_the_cli_refuses_an_over_long_input_before_it_loads_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loads: list[Any] = []

    def factory(settings: worker.Settings) -> worker.Pipeline:
        loads.append(settings)
        return worker.load_genai_pipeline(settings)

    text = (Path(__file__).parent.parent / "README.md").read_text()[:5000]
    args = ["--model", str(TINY_MODEL), "--device", "CPU", "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--job", "summary", "--input", text]
    assert worker.main(args, pipeline_factory=factory) == worker.EXIT_USAGE
    assert loads == []  # counted with the tokenizer alone
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["type"] == "prompt_too_long" and "tokens over" in out.err
    assert worker.main([*args, "--truncate", "--max-new-tokens", "4"], pipeline_factory=factory) == worker.EXIT_OK
    assert len(loads) == 1 and json.loads(capsys.readouterr().out)["input_truncated"]["dropped_chars"] > 0


def test_the_cli_does_not_load_a_tokenizer_for_an_input_that_surely_fits(tmp_path: Path) -> None:
    asked: list[Any] = []
    args = ["--model", str(TINY_MODEL), "--device", "CPU", "--lock-file", str(tmp_path / "l" / "npu.lock"),
            "--job", "title", "--input", "A short input.", "--max-new-tokens", "2"]
    assert worker.main(args, tokenizer_factory=lambda settings: asked.append(settings)) == worker.EXIT_OK
    assert asked == []


@pytest.mark.parametrize("text, may", [
    param("x" * 100, False, id="short"),
    param("x" * 2000, True, id="long-ascii"),
    param("\u6f22" * 250, False, id="250-kanji-750-bytes"),
    param("\u6f22" * 400, True, id="400-kanji-1200-bytes"),
])
def test_the_bound_that_decides_whether_the_cli_counts_first(text: str, may: bool) -> None:
    assert worker.may_exceed_prompt_limit(worker.JOBS["title"], text, worker.Limits()) is may


# --- the model's own generation config is the base ---------------------------------------------------


def tiny_model_with(tmp_path: Path, **generation_config: Any) -> Path:
    model = tmp_path / "tiny-with-config"
    shutil.copytree(TINY_MODEL, model)
    config = json.loads((model / "generation_config.json").read_text())
    config.update(generation_config)
    (model / "generation_config.json").write_text(json.dumps(config))
    return model


def test_the_models_extra_stop_token_ends_a_job(tmp_path: Path) -> None:
    """A model that lists a second end token (as Qwen2.5 does) stops there: here the first token
    the tiny model writes greedily is made one, so the job ends after it, with "stop"."""
    base = worker.build_worker(cpu_settings(tmp_path, stop_rules=False), worker.load_genai_pipeline)
    base.load(warm_up=False)
    pipeline = base._pipeline
    assert isinstance(pipeline, worker.GenAIPipeline)
    first = pipeline.generate(pipeline.encode(pipeline.render_prompt(worker.job_messages(worker.JOBS["summary"], "x"))),
                              8, None, lambda: False).token_ids[0]
    model = tiny_model_with(tmp_path, eos_token_id=[2, first])
    built = worker.build_worker(cpu_settings(tmp_path, model_path=model, stop_rules=False), worker.load_genai_pipeline)
    built.load(warm_up=False)
    result = built.run(worker.JobRequest("summary", "x", max_new_tokens=8), "r1")
    assert (result["tokens"]["generated"], result["finish_reason"], result["stop_rule"]) == (1, "stop", None)


def test_the_models_penalties_are_kept_and_the_jobs_settings_forced(tmp_path: Path) -> None:
    model = tiny_model_with(tmp_path, repetition_penalty=1.3, do_sample=True, temperature=0.7, num_beams=4,
                            max_length=20)
    built = worker.build_worker(cpu_settings(tmp_path, model_path=model), worker.load_genai_pipeline)
    built.load(warm_up=False)
    pipeline = built._pipeline
    assert isinstance(pipeline, worker.GenAIPipeline)
    config = pipeline.generation_config(33, worker.MEMORY_GRAMMAR)
    assert config.repetition_penalty == pytest.approx(1.3)  # the model's, kept
    assert (config.do_sample, config.num_beams, config.max_new_tokens, config.apply_chat_template) == (
        False, 1, 33, False)
    assert config.structured_output_config is not None
    first = built.run(worker.JobRequest("title", "Greedy is deterministic.", max_new_tokens=8), "r1")
    again = built.run(worker.JobRequest("title", "Greedy is deterministic.", max_new_tokens=8), "r2")
    assert first["text"] == again["text"]  # do_sample from the model's config did not win


def test_settings_stop_rules_false_lets_a_loop_run_to_the_budget(tmp_path: Path) -> None:
    looping = " again" * 40  # one token, repeated
    for stop_rules, generated in ((True, worker.LOOP_MIN_TOKENS), (False, 30)):
        settings = cpu_settings(tmp_path, stop_rules=stop_rules)
        result = make_worker(settings, FakeNpuPipeline(settings, reply=looping), warm_up=False).run(
            worker.JobRequest("summary", "x", max_new_tokens=30), "r1")
        assert result["tokens"]["generated"] == generated
        assert result["stop_rule"] == (worker.STOP_REPETITION if stop_rules else None)


def test_cli_no_stop_rules_flag(tmp_path: Path) -> None:
    args = ["--model", str(TINY_MODEL), "--device", "CPU", "--lock-file", str(tmp_path / "l" / "npu.lock")]
    parser = worker.build_parser({})
    assert worker.settings_from_args(parser.parse_args([*args, "--no-stop-rules"]), {}).stop_rules is False
    assert worker.settings_from_args(parser.parse_args(args), {}).stop_rules is True
