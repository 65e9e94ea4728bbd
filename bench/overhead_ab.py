#!/usr/bin/env python3
"""HTTP overhead of two worker.py versions side by side, against a direct generate, in one run.

    python bench/overhead_ab.py --a /tmp/main/worker.py [--b worker.py] [--iterations 600]
                                [--tokens 16] [--json OUT]

Both daemons run at once (the tiny model on CPU, --no-stop-rules, each its own lock file); one
keep-alive client each.  Every round sends the same job to A and to B, runs the same prompt
through a direct ``LLMPipeline.generate`` in this process, and the same job through this
checkout's ``Worker.run`` in this process (no HTTP: what the worker adds besides the HTTP front),
in a fresh seeded order per round, so that whatever else loads the machine falls on all four
alike.  overhead = latency - direct, p50 (and the p50 of the per-round differences, which is
steadier on a loaded machine); http_front = latency - Worker.run.

bench/run.py's machinery is reused (the direct pipeline renders the worker's prompt byte for byte).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", type=Path, required=True, help="worker.py A (say, main's)")
    parser.add_argument("--b", type=Path, default=run.WORKER_PY,
                        help="worker.py B (default: this checkout's)")
    parser.add_argument("--iterations", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens (default 16)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="overhead-ab-"))
    config = run.tiny_cpu_config(workdir)
    direct = run.DirectPipeline(config)
    text = run.make_text(run.OVERHEAD_INPUT_CHARS)
    prompt = direct.prompt(run.JOB, text)
    body = run.encode_job(run.JOB, text, args.tokens)
    daemons = {}
    for name, path in (("a", args.a), ("b", args.b)):
        (workdir / name).mkdir()
        lock = run.RunConfig(**{**config.__dict__, "lock_file": workdir / name / "npu.lock"})
        daemons[name] = run.Daemon(lock, name, command=[sys.executable, str(path.resolve())])
    settings = run.worker.Settings(model_path=config.model, device="CPU", cache_dir=None, stop_rules=False,
                                   lock_path=workdir / "in-process.lock")
    in_process = run.worker.build_worker(settings, run.worker.load_genai_pipeline)
    in_process.load()
    job = run.worker.JobRequest(job=run.JOB, input_text=text, max_new_tokens=args.tokens)
    latency: dict[str, list[float]] = {"a": [], "b": [], "direct": [], "run": []}
    server: dict[str, list[float]] = {"a": [], "b": [], "run": []}
    try:
        clients = {}
        for name, daemon in daemons.items():
            daemon.wait_ready()
            clients[name] = run.Client(daemon.port)
            clients[name].connect()
        rng = random.Random(args.tokens)
        for index in range(args.warmup + args.iterations):
            for mode in run.shuffled(["a", "b", "direct", "run"], rng):
                if mode == "direct":
                    elapsed_ms, _ = direct.generate(prompt, args.tokens)
                elif mode == "run":
                    started = time.perf_counter()
                    result = in_process.run(job, "bench")
                    elapsed_ms = (time.perf_counter() - started) * 1000
                    if index >= args.warmup:
                        server["run"].append(result["timing_ms"]["total"] - result["timing_ms"]["generate"])
                else:
                    reply = clients[mode].post(body)
                    run.check_ok(reply)
                    elapsed_ms = reply.elapsed_ms
                    if index >= args.warmup:
                        server[mode].append(reply.server_overhead_ms)
                if index >= args.warmup:
                    latency[mode].append(elapsed_ms)
        for client in clients.values():
            client.close()
    finally:
        for daemon in daemons.values():
            daemon.stop()
    out: dict[str, Any] = {"tokens": args.tokens, "iterations": args.iterations,
                           "direct_ms": run.summarize(latency["direct"]),
                           "worker_run_ms": run.summarize(latency["run"]),
                           "worker_run_overhead_p50_ms": round(statistics.median(latency["run"])
                                                               - statistics.median(latency["direct"]), 3),
                           "worker_run_server_overhead_p50_ms": round(statistics.median(server["run"]), 3)}
    direct_p50 = statistics.median(latency["direct"])
    for name in ("a", "b"):
        paired = [worker - direct for worker, direct in zip(latency[name], latency["direct"])]
        out[name] = {
            "worker": str(getattr(args, name)),
            "latency_ms": run.summarize(latency[name]),
            "overhead_p50_ms": round(statistics.median(latency[name]) - direct_p50, 3),
            "paired_overhead_p50_ms": round(statistics.median(paired), 3),
            "server_overhead_p50_ms": round(statistics.median(server[name]), 3),
            "http_front_p50_ms": round(statistics.median(latency[name]) - statistics.median(latency["run"]),
                                       3),
        }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
