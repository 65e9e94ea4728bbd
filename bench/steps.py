#!/usr/bin/env python3
"""Where a kept-alive job's time goes inside the worker, step by step, for one or more checkouts.

    python bench/steps.py [--requests 300] TREE [TREE ...]   (a TREE is a checkout: TREE/worker.py)

For each tree, in a subprocess of its own: an in-process server on the tiny model (CPU, stop
rules off) and one keep-alive client sending a summary job of 16 new tokens ``--requests`` times
(the first 30 are warm-up).  worker.py's steps are wrapped with perf_counter (monkeypatched in
that process only) and reported at p50: from the request's first byte to its handler, the JSON
parse and validation, the prompt (chat template and token count), the NPU lock, generate, the
result, the log line and metrics, and the response bytes.  The client shares the process (and
its GIL) with the server, so the sum is a little above a daemon's own account.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

CLIENT = r'''
import collections, functools, http.client, json, statistics, sys, tempfile, threading, time
from pathlib import Path
tree, requests = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, tree); sys.path.insert(0, tree + "/tests"); sys.path.insert(0, sys.argv[3])
import worker
import run as bench
from conftest import cpu_settings
times = collections.defaultdict(list)

def timed(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            times[name].append((time.perf_counter() - started) * 1000)
    return wrapper

for name in ("job_prompt", "job_result", "validate_job_request", "parse_json_body", "http_response",
             "json_payload"):
    setattr(worker, name, timed(name, getattr(worker, name)))
worker.GenAIPipeline.generate = timed("generate", worker.GenAIPipeline.generate)
worker.NpuLock.acquire = timed("NpuLock.acquire", worker.NpuLock.acquire)
worker.Worker.run = timed("Worker.run", worker.Worker.run)
handler = worker.WorkerRequestHandler
handler.handle = timed("handler.handle", handler.handle)
handler._record = timed("handler._record", handler._record)
setup = handler.setup

def timed_setup(self):
    setup(self)
    request = self.request if hasattr(self.request, "received_at") else self.server.request_for(self.request)
    times["first byte to handler"].append((time.monotonic() - request.received_at) * 1000)

handler.setup = timed_setup
settings = cpu_settings(Path(tempfile.mkdtemp()), port=0, stop_rules=False)
built = worker.build_worker(settings, worker.load_genai_pipeline)
built.load()
server = worker.WorkerHTTPServer(settings, built)
threading.Thread(target=server.serve_forever, daemon=True).start()
body = bench.encode_job("summary", bench.make_text(bench.OVERHEAD_INPUT_CHARS), 16)
connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
latency = []
for index in range(30 + requests):
    started = time.perf_counter()
    connection.request("POST", "/v1/worker/generate", body=body, headers={"Content-Type": "application/json"})
    connection.getresponse().read()
    latency.append((time.perf_counter() - started) * 1000)
    if index == 29:
        times.clear()
times["client latency"] = latency[30:]
server.shutdown()
print(json.dumps({name: round(statistics.median(values), 3) for name, values in times.items()}))
'''


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path, nargs="+")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args(argv)
    results = {}
    for tree in args.trees:
        argv = [sys.executable, "-c", CLIENT, str(tree.resolve()), str(args.requests), str(BENCH_DIR)]
        run = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
        results[str(tree)] = json.loads(run.stdout.strip().splitlines()[-1])
    names = sorted({name for steps in results.values() for name in steps})
    print("| step (p50 ms) | " + " | ".join(results) + " |")
    print("| --- |" + " --- |" * len(results))
    for name in names:
        print(f"| {name} | " + " | ".join(str(steps.get(name, "-")) for steps in results.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
