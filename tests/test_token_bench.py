"""bench/tokens.py: its arithmetic on hand-made records, and one real run on the tiny model.

The aggregation is what the before/after tables are built from, so its numbers are checked exactly
on records whose expected values were worked out by hand.  The real runs check the structure of
what the bench writes (fields, counts, consistency), never timings or the tiny model's text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import tokens
import worker

TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-chatml-ov"


def generation(generated: int, finish: str, raw: str = "raw") -> worker.Generation:
    return worker.Generation(text=raw, prompt_tokens=50, generated_tokens=generated, finish_reason=finish)


def result(text: str, candidates: list[dict[str, str]] | None = None, json_valid: bool | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"text": text, "timing_ms": {"generate": 1.0}}
    if candidates is not None:
        body["candidates"] = candidates
        body["json_valid"] = json_valid
    return body


def record(job: str, generated: int, max_new: int, finish: str, kept: int, *, error: str | None = None,
           answer: dict[str, Any] | None = None, raw: str = "raw", stop: int | None = None) -> dict[str, Any]:
    item = {"id": f"{job}-{generated}", "kind": "synthetic", "input": "some input"}
    return tokens.make_record(item, job, result=None if error else answer, error_type=error,
                              generation=generation(generated, finish, raw), max_new_tokens=max_new,
                              kept_tokens=kept, oracle_stop_tokens=stop)


@pytest.fixture
def synthetic() -> list[dict[str, Any]]:
    six = [{"text": f"fact {i}"} for i in range(6)]
    return [
        record("title", 24, 24, "length", 10, answer=result("Invoice export moves to Kubernetes"), stop=12),
        record("title", 8, 24, "stop", 6, answer=result("Short title"), stop=8),
        record("title", 24, 24, "length", 99, error="empty_output"),  # kept is ignored: nothing delivered
        record("memory_candidate", 192, 192, "length", 5, answer=result("{", [], False)),
        record("memory_candidate", 40, 192, "stop", 20, answer=result("{...}", [{"text": "Lives in Porto"}], True)),
        record("memory_candidate", 100, 192, "stop", 80, answer=result("{...}", six, True)),
    ]


def test_make_record_counts_discarded_and_floors_at_zero() -> None:
    ok = record("title", 24, 24, "length", 10, answer=result("A title"))
    assert (ok["kept_tokens"], ok["discarded_tokens"]) == (10, 14)
    longer = record("title", 4, 24, "stop", 6, answer=result("A title"))  # re-tokenized text can be longer
    assert longer["discarded_tokens"] == 0
    failed = record("title", 24, 24, "length", 10, error="empty_output")
    assert (failed["kept_tokens"], failed["discarded_tokens"], failed["error"]) == (0, 24, "empty_output")
    assert failed["text"] is None and failed["shape_violations"] == []


def test_aggregate_per_job(synthetic: list[dict[str, Any]]) -> None:
    aggregates = tokens.aggregate(synthetic)
    assert list(aggregates["jobs"]) == ["title", "memory_candidate"]  # worker.JOBS order, only jobs present

    title = aggregates["jobs"]["title"]
    assert (title["n"], title["n_generated"], title["n_answered"]) == (3, 3, 2)
    assert title["errors"] == {"empty_output": 1}
    assert title["mean_generated_tokens"] == pytest.approx(18.67)  # (24 + 8 + 24) / 3
    assert title["mean_max_new_tokens"] == 24.0
    assert (title["generated_tokens"], title["discarded_tokens"]) == (56, 14 + 2 + 24)
    assert title["discarded_pct"] == 71.4  # 40 / 56
    assert title["finish_length"] == 2 and title["stop_eos_tokens"] == 1
    assert title["finish_reasons"] == {"length": 2, "stop": 1}
    assert title["oracle_savable_tokens"] == (24 - 12) + (8 - 8)
    assert title["oracle_savable_pct"] == 37.5  # 12 / 32, answered jobs only
    assert title["json_valid_pct"] is None and title["with_candidate_pct"] is None

    memory = aggregates["jobs"]["memory_candidate"]
    assert memory["discarded_tokens"] == 187 + 20 + 20
    assert memory["discarded_pct"] == 68.4  # 227 / 332
    assert memory["json_valid_pct"] == 66.7  # 2 of 3
    assert memory["with_candidate_pct"] == 66.7  # 2 of 3
    assert memory["shape_violations"] == 1
    assert memory["shape_violations_by_type"] == {"too_many_candidates": 1}
    assert memory["oracle_savable_pct"] is None  # no oracle values given

    overall = aggregates["overall"]
    assert (overall["n"], overall["generated_tokens"], overall["discarded_tokens"]) == (6, 388, 267)
    assert overall["discarded_pct"] == 68.8
    assert overall["npu_decode_s_discarded"] == 13.3  # 267 * 50 ms
    assert overall["errors"] == 1

    table = tokens.render(aggregates)
    assert "title" in table and "71.4" in table and "2/3" in table


def test_shape_violations() -> None:
    assert tokens.shape_violations("title", "Invoice export moves", None) == []
    assert tokens.shape_violations("title", "Ends with a period.", None) == ["trailing_period"]
    assert tokens.shape_violations("title", '"Quoted"', None) == ["quoted"]
    assert tokens.shape_violations("title", "x" * 81, None) == ["too_long"]
    assert tokens.shape_violations("title", "two\nlines", None) == ["newline"]
    assert tokens.shape_violations("notification", "y" * 141, None) == ["too_long"]
    assert tokens.shape_violations("notification", "y" * 140, None) == []
    five = "One. Two! Three? Four. Five."
    assert tokens.count_sentences(five) == 5 and tokens.count_sentences(five + " Six") == 6
    assert tokens.shape_violations("summary", five, None) == []
    assert tokens.shape_violations("summary", five + " Six.", None) == ["too_many_sentences"]
    assert tokens.shape_violations("memory_candidate", "", [{"text": "x" * 121}]) == ["candidate_length"]
    assert tokens.shape_violations("memory_candidate", "", [{"text": ""}]) == ["candidate_length"]
    assert tokens.shape_violations("memory_candidate", "", [{"text": "ok"}] * 5) == []


def test_waste_patterns() -> None:
    raw = "\n\nHere is a title: Invoice export\n1. one\n2. two"
    assert tokens.waste_patterns("title", raw, None) == ["blank_first_line", "preamble", "extra_lines", "list"]
    assert tokens.waste_patterns("title", "ab cd ef gh ab cd ef gh ab cd ef gh", None) == ["repetition"]
    assert tokens.waste_patterns("title", "Invoice export", None) == []
    cut = '{\n  "candidates": [\n    {"text": "Lives in'
    assert tokens.waste_patterns("memory_candidate", cut, False) == ["cut_off_or_invalid_json", "json_whitespace"]
    assert tokens.waste_patterns("memory_candidate", '{"candidates":[]}', True) == []


def test_oracle_stop_finds_the_first_prefix_with_the_same_answer() -> None:
    # One "token" per character: the cleaned title is complete once "Foo Bar" is there.
    raw = "Foo Bar\nand more text"
    final = {"text": worker.clean_output("title", raw).text}
    stop = tokens.oracle_stop_tokens("title", raw, final, lambda text: [ord(c) for c in text],
                                     lambda ids: "".join(chr(i) for i in ids))
    assert stop == len("Foo Bar") + 1  # + the token that ends generation


def test_compact_candidates() -> None:
    assert tokens.compact_candidates([]) == '{"candidates":[]}'
    assert tokens.compact_candidates([{"text": "Grüße"}]) == '{"candidates":[{"text":"Grüße"}]}'


def write_inputs(path: Path) -> Path:
    items = [
        {"id": "a", "kind": "task", "input": "Migrate the nightly invoice export to Kubernetes."},
        {"id": "b", "kind": "short", "input": "server down"},
    ]
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")
    return path


def check_run(data: dict[str, Any], jobs: list[str]) -> None:
    records = data["records"]
    assert [(r["id"], r["job"]) for r in records] == [(i, j) for i in ("a", "b") for j in jobs]
    for r in records:
        default, _ = worker.job_token_limits(worker.JOBS[r["job"]], worker.Limits())
        assert r["max_new_tokens"] == default
        assert 0 < r["generated_tokens"] <= r["max_new_tokens"]
        assert r["finish_reason"] in ("stop", "length")
        assert isinstance(r["raw_text"], str) and r["prompt_tokens"] > 0
        if r["error"] is None:
            assert r["discarded_tokens"] == max(0, r["generated_tokens"] - r["kept_tokens"])
            assert r["kept_tokens"] > 0  # every delivered answer costs tokens, even {"candidates":[]}
        else:
            assert r["discarded_tokens"] == r["generated_tokens"]
        if r["job"] == "memory_candidate":
            assert isinstance(r["json_valid"], bool) and r["n_candidates"] == len(r["candidates"])
    assert data["aggregates"] == tokens.aggregate(records)  # the written aggregates match the records
    assert list(data["aggregates"]["jobs"]) == jobs
    assert data["meta"]["inputs"] == 2 and data["meta"]["jobs"] == jobs


def test_real_run_on_tiny_model_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tokens.json"
    jobs = ["title", "memory_candidate"]
    code = tokens.main(["--model", str(TINY_MODEL), "--inputs", str(write_inputs(tmp_path / "in.jsonl")),
                        "--jobs", *jobs, "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    check_run(data, jobs)
    assert data["meta"]["device"] == "CPU" and data["meta"]["stop_rules"] is True
    printed = capsys.readouterr().out
    assert "memory_candidate" in printed and "discarded %" in printed


def test_real_run_on_tiny_model_emulated_npu(tmp_path: Path) -> None:
    out = tmp_path / "tokens.json"
    code = tokens.main(["--model", str(TINY_MODEL), "--emulate-npu", "--inputs",
                        str(write_inputs(tmp_path / "in.jsonl")), "--jobs", "title", "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    check_run(data, ["title"])
    assert data["meta"]["device"] == "NPU" and data["meta"]["emulate_npu"] is True
    assert data["meta"]["budgets"] == {"title": worker.JOBS["title"].default_max_new_tokens}


def test_without_stop_rules_every_generation_ends_at_eos_or_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "tokens.json"
    code = tokens.main(["--model", str(TINY_MODEL), "--no-stop-rules",
                        "--inputs", str(write_inputs(tmp_path / "in.jsonl")),
                        "--jobs", "summary", "--json", str(out), "--quiet", "--no-oracle"])
    assert code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["meta"]["stop_rules"] is False
    assert all(record["stop_rule"] is None for record in data["records"])
