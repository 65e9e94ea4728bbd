"""bench/evidence.py runs end to end on a small tree (the BENCHMARKS.md figures come from a
100,000-fd one): every job is answered with verified proof and the numbers are all there.
Timing thresholds are deliberately absent: one run on a shared machine decides nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_evidence_bench_runs_on_a_small_tree(tmp_path: Path) -> None:
    out = tmp_path / "evidence.json"
    completed = subprocess.run(
        [sys.executable, "bench/evidence.py", "--fds", "400", "--processes", "4", "--jobs", "2",
         "--generate-s", "0.05", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    results = json.loads(out.read_text())
    run = results["runs"]["0.05"]
    for mode in ("no_tree", "tree"):
        assert run[mode]["latency_ms"]["n"] == 2 and run[mode]["lock_hold_ms"]["n"] == 2
        assert run[mode]["token_late_ms"]["n"] == 2  # one 50 ms token per 0.05 s job
    assert set(run["added_ms"]) == {"latency_median", "lock_hold_median", "old_design_median"}
    assert "PASS" in completed.stdout or "MISS" in completed.stdout
