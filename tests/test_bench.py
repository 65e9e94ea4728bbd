"""The benchmark suite runs end to end: ``bench/run.py all --quick`` exits 0 and writes its JSON.

Timing thresholds are deliberately absent: the bench reports PASS/MISS for its targets, and one
run on a shared CI machine decides nothing.  What is checked is that every section ran, produced
its numbers, and that the worker answered every benchmark request correctly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 150  # the run takes ~12 s alone on 2 cores; the margin is for a loaded machine

SECTIONS = ("overhead", "concurrency", "scaling", "soak", "startup")


def test_quick_bench_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OV_GENAI_NPU_")}
    proc = subprocess.run(
        # Fewer soak requests and overhead rounds than --quick alone: every section still runs and is
        # checked, for 4-5 s less CPU in a suite that is CPU-bound on two cores.
        [sys.executable, "bench/run.py", "all", "--quick", "--soak-requests", "100", "--iterations", "5",
         "--json", str(out)],
        cwd=REPO, env=env, check=False, capture_output=True, text=True, timeout=QUICK_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())

    for section in SECTIONS:
        assert section in results, section
        assert "error" not in results[section], results[section]
    assert results["meta"]["quick"] is True
    assert results["meta"]["machine"]["nproc"] >= 1

    run16 = results["overhead"]["runs"]["16"]
    for mode in ("direct", "http_keepalive", "http_new_connection"):
        assert run16[mode]["latency_ms"]["n"] > 0
        assert run16[mode]["latency_ms"]["p50"] > 0
    assert run16["mismatches"] == {}  # worker and baseline ran the same prompt
    if "cli_batch" in run16:
        assert run16["cli_batch"]["exit_code"] == 0

    concurrency = results["concurrency"]
    assert [level["clients"] for level in concurrency["levels"]] == [1, 4, 16]
    assert all(level["errors"] == 0 for level in concurrency["levels"])
    fifo = concurrency["fifo"]
    assert fifo["statuses"] == {"200": fifo["rounds"] * (fifo["followers"] + 1)}
    burst = concurrency["burst"]
    assert burst["busy_503"] == burst["busy_with_retry_after"]  # every 503 carries Retry-After
    assert burst["ok"] + burst["busy_503"] == burst["requests"]

    sizes = results["scaling"]["sizes"]
    assert [row["chars"] for row in sizes] == [100, 500, 1000, 3000, 6000]
    assert all(row["prompt_tokens"] > 0 for row in sizes)

    soak = results["soak"]
    assert soak["statuses"] == {"200": soak["requests"]} and soak["requests"] == 100
    assert {"rss_kb", "threads", "fds"} <= set(soak["start"]) == set(soak["end"])

    startup = results["startup"]
    assert startup["help_ms"]["n"] > 0
    assert startup["healthz_empty_cache_s"]["n"] > 0 and startup["healthz_warm_cache_s"]["n"] > 0

    names = [target["name"] for target in results["targets"]]
    assert len(names) == len(set(names)) >= 8
    assert {target["status"] for target in results["targets"]} <= {"PASS", "MISS", "n/a"}
