#!/usr/bin/env python3
"""What reading every request in the gate first costs a kept-alive client, against another
checkout of the worker, in one run.

    git worktree add /tmp/worker-before 4393f01
    python bench/gate_cost.py /tmp/worker-before .

Each tree runs, in a subprocess of its own and in turns (A, B, A, B, ...), an in-process server
on its own fake pipeline (tests/conftest.py: FakeNpuPipeline, no model) and 600 keep-alive
requests, GET /livez and a title job; the first 100 of each are warm-up.  Reported: p50 and p90
latency per tree and path.  Loopback on a 2-core machine: the difference is what counts.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

CLIENT = r'''
import http.client, json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + "/tests")
import worker
from conftest import FakeNpuPipeline, cpu_settings, serve_in_thread
settings = cpu_settings(Path(tempfile.mkdtemp()), port=0)
server = serve_in_thread(settings, lambda _settings: FakeNpuPipeline(settings))
connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
headers = {"Host": f"127.0.0.1:{server.server_port}", "Content-Type": "application/json"}
body = json.dumps({"job": "title", "input": "hello world"})
out = {}
for path, method in (("/livez", "GET"), ("/v1/worker/generate", "POST")):
    latencies = []
    for _ in range(600):
        started = time.perf_counter()
        connection.request(method, path, body=body if method == "POST" else None, headers=headers)
        connection.getresponse().read()
        latencies.append((time.perf_counter() - started) * 1000)
    out[path] = latencies[100:]
server.shutdown()
print(json.dumps(out))
'''


def main() -> int:
    trees = [str(Path(tree).resolve()) for tree in sys.argv[1:3]]
    if len(trees) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    samples: dict[str, dict[str, list[float]]] = {tree: {} for tree in trees}
    for _ in range(3):
        for tree in trees:
            run = json.loads(subprocess.run([sys.executable, "-c", CLIENT, tree], capture_output=True, text=True,
                                            check=True, timeout=300).stdout)
            for path, latencies in run.items():
                samples[tree].setdefault(path, []).extend(latencies)
    print("| tree | path | p50 ms | p90 ms |")
    print("| --- | --- | --- | --- |")
    for tree in trees:
        for path, latencies in samples[tree].items():
            ordered = sorted(latencies)
            print(f"| {tree} | {path} | {statistics.median(ordered):.3f} | {ordered[int(len(ordered) * 0.9)]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
