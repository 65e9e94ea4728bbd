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
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Callable
from typing import Sequence

import worker

EXIT_SKIPPED = 77
PROG = "smoke_llm_npu.py"
SCRIPT_NAME = "openvino-genai-npu-smoke"  # the console script pip installs (pyproject.toml)
SMOKE_INPUT = "Kanban task asks for a small OpenVINO GenAI NPU worker prototype."


def npu_present() -> bool:
    try:
        import openvino
    except ImportError:
        raise worker.ConfigError("openvino-genai is not installed: pip install openvino-genai") from None
    return any(name.split(".")[0] == "NPU" for name in openvino.Core().available_devices)


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
                        help="GenAI's NPU pipeline compiled for the CPU: no NPU needed, no proof [OV_GENAI_NPU_EMULATE=1]")
    parser.add_argument("--input", default=SMOKE_INPUT, help="text to title")
    parser.add_argument("--version", action="version", version=f"{SCRIPT_NAME} {worker.__version__}")
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
        except SystemExit as exc:
            return int(exc.code or 0)
        if args.device == "NPU" and not args.emulate_npu and not has_npu():
            skipped = ("OpenVINO sees no NPU on this host (exit 77); --emulate-npu checks the NPU pipeline "
                       "on the CPU, the worker's --doctor says what is missing")
            print(verdict("SKIP", skipped), file=sys.stderr)
            return EXIT_SKIPPED
        if args.model is None:
            raise worker.ConfigError("no model: pass --model PATH or set OV_GENAI_NPU_MODEL")
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


def floor_hint(ratio: float) -> str:
    """How to choose --min-busy-ratio from a measured ratio: no hardware figure backs a default."""
    return (
        f"smoke_llm_npu.py: the NPU was busy for {ratio:g} of the generation's time. To make the worker fail "
        f"jobs the NPU did not really run, pass --min-busy-ratio below what your host shows: run this a few "
        f"times while the NPU is otherwise idle and take about half the lowest ratio (here {ratio / 2:.2f})."
    )


if __name__ == "__main__":
    raise SystemExit(main())
