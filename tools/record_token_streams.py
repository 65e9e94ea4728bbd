#!/usr/bin/env python3
"""Record real token streams for the stop-rule tests: tests/fixtures/token_streams.json.

    python tools/record_token_streams.py [--model DIR] [--out FILE]

Runs a few inputs of bench/token_inputs.jsonl through every job on SmolLM2-135M-Instruct (the IR in
../shared/models, on the CPU, greedy) with the stop rules off, and writes each generation's token ids
with the text of every token id that occurs (one batch decode).  tests/test_stop_rules.py replays
them through worker.StopWatch: where the rules stop, and that the cleaned answer of the stopped
stream is the cleaned answer of the whole one unless that one was looping or cut.  The streams are
committed so that the tests need no model; rerun this after changing a prompt or the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import worker

DEFAULT_MODEL = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-int8-sym-ov"
DEFAULT_OUT = REPO / "tests" / "fixtures" / "token_streams.json"
# One input of each kind that showed waste in the token bench (BENCHMARKS.md, "Token spend").
INPUT_IDS = ("task-01", "chat-01", "meeting-01", "error-01", "git-01", "email-01", "german-01", "facts-01", "short-01")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/record_token_streams.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    inputs = {item["id"]: item
              for item in map(json.loads, (REPO / "bench" / "token_inputs.jsonl").read_text().splitlines())}
    settings = worker.Settings(model_path=args.model, device="CPU", cache_dir=None,
                               lock_path=Path("/tmp/record-streams.lock"))
    pipeline = worker.load_genai_pipeline(settings)
    streams = []
    for input_id in INPUT_IDS:
        for name, job in worker.JOBS.items():
            prompt = pipeline.encode(pipeline.render_prompt(worker.job_messages(job, inputs[input_id]["input"])))
            budget = worker.plan_max_new_tokens(prompt.token_count, job.default_max_new_tokens, settings.limits)
            generation = pipeline.generate(prompt, budget, job.grammar, lambda: False, None)  # no stop rules
            streams.append({"input": input_id, "job": name, "max_new_tokens": budget,
                            "finish_reason": generation.finish_reason, "token_ids": list(generation.token_ids)})
            print(f"{input_id} {name}: {len(generation.token_ids)} tokens, {generation.finish_reason}", file=sys.stderr)
    used = sorted({token_id for stream in streams for token_id in stream["token_ids"]})
    pieces = pipeline.tokenizer.token_texts(used)
    document = {
        "model": args.model.name,
        "note": "written by tools/record_token_streams.py; pieces[id] is the text of one token",
        "pieces": {str(token_id): piece for token_id, piece in zip(used, pieces)},
        "streams": streams,
    }
    args.out.write_text(json.dumps(document, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(streams)} streams, {len(used)} distinct tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
