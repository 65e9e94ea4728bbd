#!/usr/bin/env python3
"""Two worker.py versions' pure functions side by side, each called right after a generate.

    python bench/cuts_ab.py OLD/worker.py [NEW/worker.py] [--tokens 16] [--iterations 300]

Both files are imported as modules of their own.  Every round runs, per case and in a fresh
seeded order for the two versions, a direct generate (tiny model, CPU) and then the case once:
the state a daemon's handler finds its caches in (BENCHMARKS.md, issue #15: hot loops are 4-7
times faster and would flatter a cut).  Cases: ``clean_output`` of a summary on the model's own
text and on prose of about 5 characters a token, and ``parse_head`` of bench/run.py's request.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run

HEAD = (b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: identity\r\n"
        b"Content-Length: 900\r\nContent-Type: application/json\r\n\r\n")
PROSE = "The worker answered every request within its deadline. It logged one line per job. "


def load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=run.WORKER_PY)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args(argv)
    versions = {"old": load("worker_old", args.old), "new": load("worker_new", args.new)}

    genai = run.worker.import_openvino()[1]
    pipeline = genai.LLMPipeline(str(run.DEFAULT_MODEL), "CPU", ATTENTION_BACKEND="SDPA")
    messages = run.worker.job_messages(run.worker.JOBS[run.JOB], run.make_text(run.OVERHEAD_INPUT_CHARS))
    prompt = pipeline.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True)
    config = genai.GenerationConfig(max_new_tokens=args.tokens, do_sample=False, apply_chat_template=False)
    model_text = pipeline.generate([prompt], config).texts[0]
    prose = (PROSE * (args.tokens // 16 + 1))[: 5 * args.tokens]
    cases: dict[str, Callable[[Any], object]] = {
        f"clean_output(summary), the model's text ({len(model_text)} chars)":
            lambda w: w.clean_output("summary", model_text),
        f"clean_output(summary), prose ({len(prose)} chars)": lambda w: w.clean_output("summary", prose),
        "parse_head": lambda w: w.parse_head(HEAD),
    }
    samples: dict[tuple[str, str], list[float]] = {(case, v): [] for case in cases for v in versions}
    rng = random.Random(args.tokens)
    for _ in range(args.iterations):
        for case, function in cases.items():
            for version in run.shuffled(list(versions), rng):
                pipeline.generate([prompt], config)
                started = time.perf_counter_ns()
                function(versions[version])
                samples[(case, version)].append((time.perf_counter_ns() - started) / 1e3)
    print(f"{args.tokens} new tokens; p50 us right after a generate, {args.iterations} rounds")
    print("| case | old | new | new - old |")
    print("| --- | ---: | ---: | ---: |")
    for case in cases:
        old, new = statistics.median(samples[(case, "old")]), statistics.median(samples[(case, "new")])
        print(f"| {case} | {old:.1f} | {new:.1f} | {new - old:+.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
