#!/usr/bin/env python3
"""The per-job GenAI calls and the "cold" effect, in one process, without HTTP.

    python bench/genai_calls.py [--iterations 300] [--tokens 16]

Two tables, each from rounds in a fresh seeded order (tiny model, CPU, the stateful pipeline):

* generate paths: the bench's direct ``generate([prompt])`` (the string in, the tokenizer's
  encode and decode inside) against the same work split as the worker splits it (encode, then
  ``generate(ids)``, then decode), the same with a do-nothing ``StreamerBase`` and with the
  worker's own streamer (what cancellation between tokens costs), and the worker's
  ``GenAIPipeline.generate`` with its render and encode beside it.
* cold: one request's pure-Python work (``parse_head`` and ``clean_output`` of a summary)
  timed right after each of: the same work (hot), a generate, a generate and a 2 or 20 ms sleep,
  a generate and 2 ms of busy Python, a 20 ms sleep alone.  If the CPU plugin's threads spinning
  after a generate were what slows the work after it, the sleeps after a generate would make it
  faster; if it is what ran on the core meanwhile (cache state), a sleep alone slows it as well.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run

worker = run.worker
HEAD = (b"POST /v1/worker/generate HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept-Encoding: identity\r\n"
        b"Content-Length: 900\r\nContent-Type: application/json\r\n\r\n")
SUMMARY = "The worker answered every request within its deadline. It logged one line per job."


def median_table(title: str, samples: dict[str, list[float]], unit: str) -> str:
    lines = [f"| {title} | p50 {unit} |", "| --- | ---: |"]
    lines += [f"| {name} | {statistics.median(values):.3f} |" for name, values in samples.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args(argv)

    genai = worker.import_openvino()[1]
    settings = worker.Settings(model_path=run.DEFAULT_MODEL, device="CPU", cache_dir=None, stop_rules=False)
    adapter = worker.load_genai_pipeline(settings)
    assert isinstance(adapter, worker.GenAIPipeline)
    pipeline = adapter._pipeline
    tokenizer = pipeline.get_tokenizer()
    messages = worker.job_messages(worker.JOBS[run.JOB], run.make_text(run.OVERHEAD_INPUT_CHARS))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    config = genai.GenerationConfig(max_new_tokens=args.tokens, do_sample=False, apply_chat_template=False)
    running = genai.StreamingStatus.RUNNING

    class NothingStreamer(genai.StreamerBase):  # type: ignore[misc, name-defined]
        def write(self, token: object) -> object:
            return running

        def end(self) -> None:
            pass

    def never() -> bool:
        return False

    def worker_streamer() -> object:
        return adapter._streamer_class(worker.StopWatch(never, None, adapter.tokenizer.decode))

    paths: dict[str, list[float]] = {name: [] for name in (
        "direct generate([prompt])", "encode + generate(ids) + decode", "  encode", "  generate(ids)", "  decode",
        "generate(ids), a do-nothing StreamerBase", "generate(ids), the worker's streamer",
        "worker: render", "worker: encode", "worker: GenAIPipeline.generate (streamer, decode)")}

    def timed(function: Callable[[], object]) -> tuple[object, float]:
        started = time.perf_counter_ns()
        value = function()
        return value, (time.perf_counter_ns() - started) / 1e6

    def one_path(name: str, keep: bool) -> None:
        def note(key: str, ms: float) -> None:
            if keep:
                paths[key].append(ms)

        if name == "direct":
            note("direct generate([prompt])", timed(lambda: pipeline.generate([prompt], config))[1])
        elif name == "split":
            encoded, encode_ms = timed(lambda: tokenizer.encode(prompt, add_special_tokens=False))
            results, generate_ms = timed(lambda: pipeline.generate(encoded, config))
            decode_ms = timed(lambda: tokenizer.decode(results.tokens))[1]
            note("encode + generate(ids) + decode", encode_ms + generate_ms + decode_ms)
            note("  encode", encode_ms)
            note("  generate(ids)", generate_ms)
            note("  decode", decode_ms)
        elif name in ("nothing", "streamer"):
            encoded = tokenizer.encode(prompt, add_special_tokens=False)
            streamer = NothingStreamer() if name == "nothing" else worker_streamer()
            key = "generate(ids), a do-nothing StreamerBase" if name == "nothing" else \
                "generate(ids), the worker's streamer"
            note(key, timed(lambda: pipeline.generate(encoded, config, streamer))[1])
        else:
            rendered, render_ms = timed(lambda: adapter.render_prompt(messages))
            encoded_prompt, encode_ms = timed(lambda: adapter.encode(str(rendered)))
            generate_ms = timed(lambda: adapter.generate(encoded_prompt, args.tokens, None, never))[1]
            note("worker: render", render_ms)
            note("worker: encode", encode_ms)
            note("worker: GenAIPipeline.generate (streamer, decode)", generate_ms)

    rng = random.Random(args.tokens)
    for index in range(args.warmup + args.iterations):
        for name in run.shuffled(["direct", "split", "nothing", "streamer", "worker"], rng):
            one_path(name, keep=index >= args.warmup)
    print(median_table(f"generate paths, {args.tokens} new tokens", paths, "ms"))

    def work() -> None:
        worker.parse_head(HEAD)
        worker.clean_output("summary", SUMMARY)

    def busy(ms: float) -> None:
        until = time.perf_counter() + ms / 1000
        while time.perf_counter() < until:
            pass

    before: dict[str, Callable[[], object]] = {
        "hot: right after the same work": work,
        "right after a generate": lambda: pipeline.generate([prompt], config),
        "a generate, then a 2 ms sleep": lambda: (pipeline.generate([prompt], config), time.sleep(0.002)),
        "a generate, then a 20 ms sleep": lambda: (pipeline.generate([prompt], config), time.sleep(0.02)),
        "a generate, then 2 ms of busy Python": lambda: (pipeline.generate([prompt], config), busy(2)),
        "a 20 ms sleep, no generate": lambda: time.sleep(0.02),
    }
    cold: dict[str, list[float]] = {name: [] for name in before}
    for index in range(args.warmup + args.iterations):
        for name in run.shuffled(list(before), rng):
            before[name]()
            started = time.perf_counter_ns()
            work()
            if index >= args.warmup:
                cold[name].append((time.perf_counter_ns() - started) / 1e3)
    print()
    print(median_table("parse_head + clean_output(summary), after", cold, "us"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
