#!/usr/bin/env python3
"""What a token costs through --emulate-npu, with NPUW's NPU-style generate model and without.

    python bench/emulation_decode.py [--model DIR] [--tokens 64] [--rounds 3]

Three pipelines on the same model, loaded one after the other in this process, each generating
the same prompt ``--tokens`` tokens long (EOS ignored), best of ``--rounds``:

* npuw default: the worker's emulated properties before this bench, ``GENERATE_HINT=FAST_COMPILE``
  and NPUW's default generate model (repeated blocks as function calls, the LM head apart);
* npuw whole: the worker's ``EMULATED_NPU_PROPERTIES`` now, the generate model as one CPU model;
* cpu plugin: the stateful CPU pipeline (``ATTENTION_BACKEND=SDPA``), the floor.

Default model: SmolLM2-135M-Instruct from ../shared/models where it exists, else the tiny test
model (whose few layers show a smaller gap).  On an NPU host none of this applies: the NPU runs
NPUW's blocks natively; this is only about how fast the tests and ``--emulate-npu`` run here.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import worker

SMOLLM2_IR = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-int8-sym-ov"
TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-chatml-ov"
PROMPT = "Write a long story about a cat who learns to read."


def ms_per_token(genai: Any, model: Path, device: str, properties: dict[str, Any], tokens: int, rounds: int) -> float:
    pipeline = genai.LLMPipeline(str(model), device, **properties)
    config = genai.GenerationConfig()
    config.max_new_tokens = tokens
    config.ignore_eos = True
    best_s = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        pipeline.generate(PROMPT, config)
        best_s = min(best_s, time.perf_counter() - started)
    return 1000 * best_s / tokens


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=SMOLLM2_IR if SMOLLM2_IR.is_dir() else TINY_MODEL)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    genai = worker.import_openvino()[1]
    emulated = worker.pipeline_properties(worker.Settings(model_path=args.model, device="NPU", emulate_npu=True))
    npuw_default = {key: value for key, value in emulated.items()
                    if key not in ("NPUW_LLM_GENERATE_CONFIG", "NPUW_LLM_SHARED_HEAD")}
    npuw_default["GENERATE_HINT"] = "FAST_COMPILE"
    rows = {
        "npuw default (GENERATE_HINT=FAST_COMPILE)": ("NPU", npuw_default),
        "npuw whole (EMULATED_NPU_PROPERTIES)": ("NPU", emulated),
        "cpu plugin (ATTENTION_BACKEND=SDPA)": ("CPU", {"ATTENTION_BACKEND": "SDPA"}),
    }
    print(f"model {args.model.name}, {args.tokens} tokens, best of {args.rounds}\n")
    print("| pipeline | ms per token |\n| --- | ---: |")
    for name, (device, properties) in rows.items():
        print(f"| {name} | {ms_per_token(genai, args.model, device, properties, args.tokens, args.rounds):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
