#!/usr/bin/env python3
"""A flood beyond the gate's connection cap: do real clients still get answers?

    python bench/flood.py TREE [TREE ...]      (a TREE is a checkout: TREE/worker.py, TREE/tests)

For each tree, in a subprocess of its own: an in-process server on the tree's fake pipeline
(tests/conftest.py), then the issue's two floods, each with stalled requests that do not come
back once refused (tests/slow_clients.py, a header line every 60 s):

* 400 stalled requests, then 20 real clients at the same moment, each asking for /livez;
* 300 stalled requests alone.

Reported: the real clients' outcomes (status, or the exception of a connection closed without an
answer), what the stalled ones got (answers by status, connections closed without one) and what
the worker counted (``refusals`` by reason).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CLIENT = r'''
import collections, json, sys, tempfile, threading, time
from pathlib import Path
tree = sys.argv[1]
sys.path.insert(0, tree); sys.path.insert(0, tree + "/tests")
import worker
from conftest import FakeNpuPipeline, cpu_settings, serve_in_thread
from slow_clients import SlowHeadAttack, probe_once
out = {}
for stalled, real in ((400, 20), (300, 0)):
    settings = cpu_settings(Path(tempfile.mkdtemp()), port=0)
    server = serve_in_thread(settings, lambda _settings: FakeNpuPipeline(settings))
    port = server.server_port
    with SlowHeadAttack("127.0.0.1", port, connections=stalled, interval_s=60, reopen_delay_s=60) as attack:
        deadline = time.monotonic() + 30
        while attack.stats().opened < stalled and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the gate has read (or dropped) every one of them
        outcomes = []
        barrier = threading.Barrier(real) if real else None
        def client():
            barrier.wait(10)
            outcomes.append(probe_once("127.0.0.1", port, "livez", 15).outcome)
        threads = [threading.Thread(target=client) for _ in range(real)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        time.sleep(1.0)
        stats = attack.stats()
    out[f"{stalled} stalled, {real} real"] = {
        "real_clients": dict(collections.Counter(outcomes)),
        "stalled_answered": {str(code): count for code, count in stats.responses.items()},
        "stalled_closed_unanswered": stats.closed_by_server,
        "refusals_counted": dict(server.worker.metrics.refusals),
    }
    server.shutdown()
    server.server_close()
print(json.dumps(out))
'''


def main() -> int:
    trees = [str(Path(tree).resolve()) for tree in sys.argv[1:]]
    if not trees:
        print(__doc__, file=sys.stderr)
        return 2
    for tree in trees:
        run = subprocess.run([sys.executable, "-c", CLIENT, tree], capture_output=True, text=True, check=True,
                             timeout=300)
        print(f"## {tree}")
        for flood, result in json.loads(run.stdout).items():
            print(f"{flood}: {json.dumps(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
