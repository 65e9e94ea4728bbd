#!/usr/bin/env python3
"""What the stop rules cost per generated token: the StopWatch over real token streams.

    python bench/stopwatch.py [--model DIR] [--rounds N]

Replays the committed SmolLM2 token streams (tests/fixtures/token_streams.json) through
worker.StopWatch, as the streamer feeds it during a generation, and reports per job: tokens seen
until the rules stopped, how many of those tokens made it decode the text, the time of one
step without a decode, and the time of one real decode with the model's tokenizer (the IR in
../shared/models if it is there, else the decode cost is not measured).  Per-token overhead =
step + decodes per token x decode; on an NPU a token takes about 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import worker

STREAMS = REPO / "tests" / "fixtures" / "token_streams.json"
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-int8-sym-ov"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/stopwatch.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="tokenizer for the decode cost")
    parser.add_argument("--rounds", type=int, default=50, help="replays per stream for the step time")
    args = parser.parse_args(argv)
    document = json.loads(STREAMS.read_text(encoding="utf-8"))
    pieces = {int(token_id): text for token_id, text in document["pieces"].items()}
    texts = [pieces.get(token_id, "") for token_id in range(max(pieces) + 1)]
    triggers = worker.stop_trigger_ids(texts)

    def decode(ids: list[int]) -> str:
        return "".join(pieces[token_id] for token_id in ids)

    rows: dict[str, dict[str, float]] = {}
    for job in worker.JOBS:
        seen = decodes = 0
        step_s: list[float] = []
        for stream in (s for s in document["streams"] if s["job"] == job):
            for _ in range(args.rounds):
                watch = worker.StopWatch(lambda: False, job, decode, triggers[job])
                started = time.perf_counter()
                count = 0
                for token_id in stream["token_ids"]:
                    count += 1
                    if watch.step([token_id]) is not None:
                        break
                step_s.append((time.perf_counter() - started) / count)
            seen += count
            decodes += watch.decodes
        rows[job] = {"tokens": seen, "decodes": decodes, "decodes_per_token": decodes / seen,
                     "step_us": statistics.median(step_s) * 1e6}
    decode_ms = None
    if (args.model / "openvino_tokenizer.xml").is_file():
        import openvino_genai

        tokenizer = worker.GenAITokenizer(openvino_genai.Tokenizer(str(args.model)))
        sample = document["streams"][0]["token_ids"][:100]
        timings = []
        for _ in range(200):
            started = time.perf_counter()
            tokenizer.decode(sample)
            timings.append(time.perf_counter() - started)
        decode_ms = statistics.median(timings) * 1000
    print("| job | tokens | decodes | decodes per token | step (no decode) us | overhead per token ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for job, row in rows.items():
        overhead = "-" if decode_ms is None else f"{row['step_us'] / 1000 + row['decodes_per_token'] * decode_ms:.3f}"
        print(f"| {job} | {row['tokens']} | {row['decodes']} | {row['decodes_per_token']:.3f} "
              f"| {row['step_us']:.1f} | {overhead} |")
    print(f"\none decode of 100 ids with the model's tokenizer: {decode_ms:.3f} ms" if decode_ms is not None
          else "\n(no tokenizer at --model: decode cost not measured)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
