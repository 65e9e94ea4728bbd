"""Smoke test: does OpenVINO GenAI really generate on this host's NPU?

Loads the model on the NPU under the shared NPU lock, generates one title and prints JSON with the
text, timings (load, generate, total), the NPU busy-time delta, the device and the versions.  It
uses worker.py's own code (model checks, pipeline properties, lock, busy counter, proof rule), so a
pass here means the worker's NPU path works on this host.

The last line on stderr is the verdict, the same on every host: ``PASS``, ``FAIL`` or ``SKIP``, with
what was shown and, emulated or on the CPU, what was not.

Exit codes: 0 the NPU ran (npu_busy_delta_us > 0), 1 generation failed, 3 the busy counter did not
advance, 75 the NPU lock stayed busy, 77 skipped because OpenVINO sees no NPU, 78 configuration
(model, driver or counter missing).  77 is the conventional "skipped" code of automake and meson,
so CI on NPU hosts is decisive and elsewhere visibly skipped.

``--emulate-npu`` (or ``OV_GENAI_NPU_EMULATE=1``) runs the same flow through GenAI's NPU pipeline
with every submodel compiled for the CPU (NPUW_DEVICES=CPU), on any host: it checks that a model
export and the worker's NPU settings go through the NPU pipeline, and exits 0 with
``"npu_proof": "emulated"``.  It cannot show what only an NPU host shows: that the NPU compiler and
driver accept the model, NPU timings, and the busy counter.  ``--device CPU`` runs the same flow on
the CPU plugin as a demonstration.  Neither claims proof.

``--tune`` measures the NPU prefill chunk (``--prefill-chunk-tokens``) instead: for each candidate
(``--tune-chunks``, default 128 256 512 1024; a compile cache of its own each, under --cache-dir or
a temporary directory) it loads the model and, for prompts of the jobs' real lengths (short,
typical, near --max-prompt-tokens), measures the time to the first token and the decode rate,
then prints a table and the lines for the service's environment file.  On an NPU host that
decides the setting; emulated (``--emulate-npu``) it shows the method with CPU numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import worker

EXIT_SKIPPED = 77
PROG = "smoke_llm_npu.py"
SCRIPT_NAME = "openvino-genai-npu-smoke"  # the console script pip installs (pyproject.toml)
SMOKE_INPUT = "Kanban task asks for a small OpenVINO GenAI NPU worker prototype."
TUNE_CHUNKS = (128, 256, 512, 1024)
TUNE_DECODE_TOKENS = 32
# What the jobs really send: a notification of one sentence, a summary of a page, and an input as
# long as --max-prompt-tokens lets through ("truncate": true fills it exactly).
TUNE_SENTENCE = ("The nightly backup of the photo library finished at 03:12 after copying 1,204 new files; "
                 "two files were skipped because they were open in another program. ")
TUNE_PROMPTS = (
    ("short", "notification", 1),
    ("typical", "summary", 8),
    ("near_limit", "summary", 38),  # 5,890 characters, then cut to the limit
)


def npu_present() -> bool:
    try:
        devices = worker.openvino_devices()
    except ImportError:
        raise worker.ConfigError("openvino-genai is not installed: pip install openvino-genai") from None
    return any(name.split(".")[0] == "NPU" for name in devices)


def build_parser() -> argparse.ArgumentParser:
    environ = os.environ
    parser = worker.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--model", type=Path, default=environ.get("OV_GENAI_NPU_MODEL"),
                        help="OpenVINO GenAI model directory (a .gguf file on CPU) [OV_GENAI_NPU_MODEL]")
    parser.add_argument("--device", choices=worker.DEVICES, default="NPU", help="default NPU")
    parser.add_argument("--cache-dir", type=Path, default=environ.get("OV_GENAI_NPU_CACHE"),
                        help="OpenVINO compiled-model cache [OV_GENAI_NPU_CACHE]")
    parser.add_argument("--lock-file", type=Path, default=environ.get("OV_GENAI_NPU_LOCK"),
                        help="the NPU lock shared with the worker [OV_GENAI_NPU_LOCK]")
    parser.add_argument("--lock-timeout-s", type=float, default=worker.DEFAULT_LOCK_TIMEOUT_S)
    parser.add_argument("--busy-path", type=Path, default=environ.get("OV_GENAI_NPU_BUSY_PATH"),
                        help="npu_busy_time_us file (default: found under /sys/class/accel) [OV_GENAI_NPU_BUSY_PATH]")
    parser.add_argument("--emulate-npu", action="store_true",
                        default=worker.env_flag(environ, "OV_GENAI_NPU_EMULATE"),
                        help="GenAI's NPU pipeline compiled for the CPU: no NPU needed, no proof "
                             "[OV_GENAI_NPU_EMULATE=1]")
    parser.add_argument("--input", default=SMOKE_INPUT, help="text to title")
    parser.add_argument("--version", action="version", version=f"{SCRIPT_NAME} {worker.__version__}")

    parser.add_argument("--tune", action="store_true",
                        help="measure each --tune-chunks prefill chunk (first-token time, decode rate) and print "
                             "the environment line for the best")
    parser.add_argument("--tune-chunks", type=int, nargs="+", default=list(TUNE_CHUNKS), metavar="N",
                        help="candidate --prefill-chunk-tokens values (default %(default)s)")
    parser.add_argument("--tune-runs", type=int, default=3,
                        help="measured runs per prompt, after one warm-up (default 3)")
    parser.set_defaults(demo=False, no_npu_proof=False)  # what worker.check_emulation also looks at
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    pipeline_factory: worker.PipelineFactory = worker.load_genai_pipeline,
    has_npu: Callable[[], bool] = npu_present,
) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    request_id = uuid.uuid4().hex
    started = time.monotonic()
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
            worker.check_emulation(parser, args, argv)
            if args.tune:
                check_tune(parser, args)
        except SystemExit as exc:
            return int(exc.code or 0)
        if args.device == "NPU" and not args.emulate_npu and not has_npu():
            skipped = ("OpenVINO sees no NPU on this host (exit 77); --emulate-npu checks the NPU pipeline "
                       "on the CPU, the worker's --doctor says what is missing")
            print(verdict("SKIP", skipped), file=sys.stderr)
            return EXIT_SKIPPED
        if args.model is None:
            raise worker.ConfigError("no model: pass --model PATH or set OV_GENAI_NPU_MODEL")
        if args.tune:
            return tune(args, pipeline_factory)
        settings = worker.Settings(
            model_path=args.model,
            device=args.device,
            cache_dir=args.cache_dir,
            lock_path=args.lock_file or worker.default_lock_path(os.environ),
            lock_timeout_s=args.lock_timeout_s,
            busy_path=args.busy_path,
            emulate_npu=args.emulate_npu,
        )
        request = worker.validate_job_request({"input": args.input}, settings.limits, job="title")
        npu_worker = worker.build_worker(settings, pipeline_factory)
        npu_worker.load(warm_up=False)
        load_ms = npu_worker.load_ms
        result = npu_worker.run(request, request_id)
    except worker.WorkerError as exc:
        code = worker.report_cli_error(exc, request_id=request_id, prog=PROG)
        print(verdict("FAIL", f"{exc.type} (exit {code})"), file=sys.stderr)
        return code
    report = {
        "text": result["text"],
        "timing_ms": {
            "load": round(load_ms or 0.0, 2),
            "generate": result["timing_ms"]["generate"],
            "total": round(worker.elapsed_ms(started), 2),
        },
        "npu_busy_delta_us": result["npu_busy_delta_us"],
        "npu_busy_ratio": result["npu_busy_ratio"],
        "npu_proof": result["npu_proof"],
        "npu_evidence": result["npu_evidence"],
        "device": settings.device,
        "model": settings.model_name,
        "tokens": result["tokens"],
        "finish_reason": result["finish_reason"],
        "stop_rule": result["stop_rule"],
        "versions": worker.genai_versions(),
    }
    print(json.dumps(report, ensure_ascii=False, indent=2))
    if result["npu_busy_ratio"] is not None:
        print(floor_hint(result["npu_busy_ratio"]), file=sys.stderr)
    print(pass_verdict(report), file=sys.stderr)
    return worker.EXIT_OK


def verdict(word: str, reason: str) -> str:
    """The last line on stderr: PASS, FAIL or SKIP and why - what CI and a person look for."""
    return f"{PROG}: {word}: {reason}"


def pass_verdict(report: dict) -> str:
    """What this pass showed, and what it did not: only a verified NPU run proves the NPU."""
    tokens, generate_ms = report["tokens"]["generated"], report["timing_ms"]["generate"]
    finish = report["finish_reason"]
    ran = f"{report['model']} generated {tokens} tokens in {generate_ms} ms (finish_reason {finish})"
    if report["npu_proof"] == worker.PROOF_VERIFIED:
        return verdict("PASS", f"the NPU ran it: {ran}, busy counter +{report['npu_busy_delta_us']} us "
                               f"(ratio {report['npu_busy_ratio']})")
    if report["npu_proof"] == worker.PROOF_EMULATED:
        return verdict("PASS (emulated)", f"{ran} through GenAI's NPU pipeline with the worker's NPU "
                                          "settings, compiled for the CPU (NPUW_DEVICES=CPU). Not shown: that "
                                          "the NPU compiler and driver accept this model, NPU timings, the "
                                          "busy counter: run it on an NPU host for those")
    return verdict("PASS (CPU)", f"{ran} on the CPU plugin; nothing about the NPU was checked")

def tune(args: argparse.Namespace, pipeline_factory: worker.PipelineFactory) -> int:
    """--tune: one load per candidate chunk, each with its own compile cache; per prompt class the
    median first-token time (a 1-token generation) and decode rate (tokens 2..32 over the time
    they added), through the worker's own Worker.run, stop rules off so every run decodes alike."""
    with tempfile.TemporaryDirectory(prefix="smoke-tune-") as scratch:
        cache_root = args.cache_dir or Path(scratch)
        rows = [tune_chunk(args, chunk, cache_root / f"prefill-{chunk}", pipeline_factory)
                for chunk in args.tune_chunks]
    print(tune_table(rows, emulated=args.emulate_npu))
    return worker.EXIT_OK


def check_tune(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device != "NPU":
        parser.error("--tune measures the NPU prefill chunk: not with --device CPU")
    limit = worker.DEFAULT_MAX_PROMPT_TOKENS
    for chunk in args.tune_chunks:
        if chunk < 1 or chunk & (chunk - 1) or limit % chunk:
            parser.error(f"--tune-chunks: {chunk} is not a power of two that divides {limit}")
    if args.tune_runs < 1:
        parser.error("--tune-runs must be at least 1")


def tune_chunk(
    args: argparse.Namespace, chunk: int, cache_dir: Path, pipeline_factory: worker.PipelineFactory
) -> dict[str, Any]:
    settings = worker.Settings(
        model_path=args.model, device="NPU", cache_dir=cache_dir,
        lock_path=args.lock_file or worker.default_lock_path(os.environ), lock_timeout_s=args.lock_timeout_s,
        busy_path=args.busy_path, emulate_npu=args.emulate_npu, stop_rules=False, prefill_chunk_tokens=chunk,
    )
    tuned = worker.build_worker(settings, pipeline_factory)
    tuned.load(warm_up=False)  # measured runs only: no warm-up job of the worker's own
    row: dict[str, Any] = {"chunk": chunk, "load_s": round((tuned.load_ms or 0.0) / 1000, 2), "prompts": {}}
    for name, job, sentences in TUNE_PROMPTS:
        fields = {"input": TUNE_SENTENCE * sentences, "truncate": True}
        request = worker.validate_job_request(fields, settings.limits, job=job)
        first_ms, decode_tps, prompt_tokens = [], [], 0
        for run in range(args.tune_runs + 1):  # the first of each is a warm-up
            first = tuned.run(dataclasses.replace(request, max_new_tokens=1), f"tune-{run}")
            longer = tuned.run(dataclasses.replace(request, max_new_tokens=TUNE_DECODE_TOKENS), f"tune-{run}")
            prompt_tokens = first["tokens"]["prompt"]
            if run == 0:
                continue
            first_ms.append(first["timing_ms"]["generate"])
            extra_s = (longer["timing_ms"]["generate"] - first["timing_ms"]["generate"]) / 1000
            if longer["tokens"]["generated"] > 1 and extra_s > 0:
                decode_tps.append((longer["tokens"]["generated"] - 1) / extra_s)
        row["prompts"][name] = {
            "prompt_tokens": prompt_tokens,
            "first_token_ms": round(statistics.median(first_ms), 1),
            "decode_tokens_per_s": round(statistics.median(decode_tps), 1) if decode_tps else None,
        }
    return row


def tune_table(rows: list[dict[str, Any]], *, emulated: bool) -> str:
    """The table, and the env-file lines for the chunk with the lowest first-token time over the
    three prompt classes together (each job's wait: what a user of the laptop notices)."""
    names = [name for name, _job, _sentences in TUNE_PROMPTS]
    tokens = {name: rows[0]["prompts"][name]["prompt_tokens"] for name in names}
    header = ["chunk", "load s", *(f"first token ms, {name} ({tokens[name]} tok)" for name in names),
              "decode tok/s, typical"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [str(row["chunk"]), f"{row['load_s']:.2f}"]
        cells += [f"{row['prompts'][name]['first_token_ms']:.1f}" for name in names]
        decode = row["prompts"]["typical"]["decode_tokens_per_s"]
        cells.append("-" if decode is None else f"{decode:.1f}")
        lines.append(" | ".join(cells))
    best = min(rows, key=lambda row: sum(row["prompts"][name]["first_token_ms"] for name in names))
    where = "this host's emulated NPU (the CPU): not an NPU measurement" if emulated else "this host's NPU"
    lines += [
        "",
        f"# lowest first-token time over the three prompts on {where}; for the service's environment file:",
        f"OV_GENAI_NPU_PREFILL_CHUNK_TOKENS={best['chunk']}",
    ]
    return "\n".join(lines)


def floor_hint(ratio: float) -> str:
    """How to choose --min-busy-ratio from a measured ratio: no hardware figure backs a default."""
    return (
        f"smoke_llm_npu.py: the NPU was busy for {ratio:g} of the generation's time. To make the worker fail "
        f"jobs the NPU did not really run, pass --min-busy-ratio below what your host shows: run this a few "
        f"times while the NPU is otherwise idle and take about half the lowest ratio (here {ratio / 2:.2f})."
    )


if __name__ == "__main__":
    raise SystemExit(main())
