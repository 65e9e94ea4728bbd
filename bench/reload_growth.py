#!/usr/bin/env python3
"""Resident memory after each load and release of a CPU pipeline, without the worker around it.

    python bench/reload_growth.py [--model DIR|FILE.gguf] [--loads 40] [--cpu-runtime-cache-capacity N]

Each round: ``LLMPipeline(model, "CPU", ATTENTION_BACKEND="SDPA")``, a 4-token generate, the
last reference dropped, ``gc.collect()`` and ``malloc_trim(0)``, then RSS (``/proc/self/statm``).
A line that keeps rising is memory the process does not get back by unloading; with
``--cpu-runtime-cache-capacity 0`` it shows whether the CPU plugin's runtime cache (shape-keyed
executors, 5000 entries by default, kept across compiled models) is what holds it.  The same
bench prints the decode cost of that setting, best of 3 rounds of 64 tokens.

Default model: SmolLM2-135M-Instruct from ../shared/models where it exists, else the demo GGUF.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import worker

SMOLLM2_IR = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-int8-sym-ov"


def rss_mib() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * 4096 / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--loads", type=int, default=40)
    parser.add_argument("--cpu-runtime-cache-capacity", type=int)
    args = parser.parse_args(argv)
    model = args.model or (SMOLLM2_IR if SMOLLM2_IR.is_dir() else worker.demo_model_path())

    genai = worker.import_openvino()[1]
    properties: dict[str, Any] = {"ATTENTION_BACKEND": "SDPA"}
    if args.cpu_runtime_cache_capacity is not None:
        properties["CPU_RUNTIME_CACHE_CAPACITY"] = args.cpu_runtime_cache_capacity
    libc = ctypes.CDLL("libc.so.6")
    short, long = genai.GenerationConfig(), genai.GenerationConfig()
    short.max_new_tokens = 4
    long.max_new_tokens, long.ignore_eos = 64, True

    print(f"model {model.name}, properties {properties}")
    resident = []
    for load in range(args.loads):
        pipeline = genai.LLMPipeline(str(model), "CPU", **properties)
        pipeline.generate("hello", short)
        if load == args.loads - 1:
            best_s = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                pipeline.generate("Write a long story about a cat.", long)
                best_s = min(best_s, time.perf_counter() - started)
        del pipeline
        gc.collect()
        libc.malloc_trim(0)
        resident.append(rss_mib())
    print("RSS after each release (MiB):", " ".join(f"{mib:.0f}" for mib in resident))
    print(f"growth: {resident[-1] - resident[0]:+.1f} MiB over {args.loads - 1} reloads; "
          f"decode {1000 * best_s / 64:.1f} ms a token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
