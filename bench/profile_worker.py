#!/usr/bin/env python3
"""Run worker.py unchanged with every thread profiled; write the report when it stops.

    python bench/profile_worker.py --profiler pyinstrument|cprofile --out DIR -- <worker.py flags>

Why a wrapper: the worker answers requests in one thread per connection, and both cProfile and
pyinstrument profile only the thread that starts them.  This wrapper patches
``threading.Thread.run`` before worker.py is executed, so every thread the worker starts (the
server loop and each connection) gets its own profiler; on SIGTERM the worker returns from
``main()`` and the per-thread profiles are merged into one report:

* pyinstrument (sampling, wall clock, low distortion): DIR/pyinstrument.txt (call tree) and
  DIR/pyinstrument-flat.txt (functions by own time, library frames included);
* cProfile (deterministic, call counts, inflates cheap Python calls): DIR/cprofile.txt (top
  entries by cumulative and by own time) and DIR/cprofile.pstats.

bench/run.py profile drives it with keep-alive load.  worker.py itself is not modified.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import runpy
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORKER_PY = REPO / "worker.py"
PYINSTRUMENT_INTERVAL_S = 0.0005  # a request's time outside generate() is a millisecond or two


class ThreadProfiles:
    """One profiler per thread, started in that thread (both profilers are per thread)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.finished: list[Any] = []  # cProfile.Profile objects or pyinstrument sessions
        self._lock = threading.Lock()

    def install(self) -> None:
        original_run = threading.Thread.run
        profiles = self

        def profiled_run(thread: threading.Thread) -> None:
            profiler = profiles.start()
            try:
                original_run(thread)
            finally:
                profiles.stop(profiler)

        threading.Thread.run = profiled_run  # type: ignore[method-assign, assignment]

    def start(self) -> Any:
        if self.kind == "cprofile":
            profiler = cProfile.Profile()
            profiler.enable()
            return profiler
        from pyinstrument import Profiler

        profiler = Profiler(interval=PYINSTRUMENT_INTERVAL_S, async_mode="disabled")
        profiler.start()
        return profiler

    def stop(self, profiler: Any) -> None:
        if self.kind == "cprofile":
            profiler.disable()
            finished = profiler
        else:
            finished = profiler.stop()
        with self._lock:
            self.finished.append(finished)

    def write(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            finished = list(self.finished)
        if self.kind == "cprofile":
            path = out_dir / "cprofile.txt"
            text = io.StringIO()
            if finished:
                stats = pstats.Stats(*finished, stream=text)
                stats.dump_stats(out_dir / "cprofile.pstats")
                for order in ("cumulative", "tottime"):
                    text.write(f"=== sorted by {order} ===\n")
                    stats.sort_stats(order).print_stats(45)
            path.write_text(text.getvalue())
            return path
        from pyinstrument.renderers import ConsoleRenderer
        from pyinstrument.session import Session

        session = finished[0]
        for other in finished[1:]:
            session = Session.combine(session, other)
        path = out_dir / "pyinstrument.txt"
        path.write_text(ConsoleRenderer(unicode=False, color=False, show_all=False).render(session))
        flat = ConsoleRenderer(unicode=False, color=False, flat=True, show_all=True).render(session)
        (out_dir / "pyinstrument-flat.txt").write_text(flat)
        return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/profile_worker.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiler", choices=("pyinstrument", "cprofile"), default="pyinstrument")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "profile")
    parser.add_argument("worker_args", nargs=argparse.REMAINDER, help="-- then worker.py flags")
    args = parser.parse_args(argv)
    worker_args = args.worker_args[1:] if args.worker_args[:1] == ["--"] else args.worker_args
    profiles = ThreadProfiles(args.profiler)
    profiles.install()
    sys.argv = [str(WORKER_PY), *worker_args]
    sys.path.insert(0, str(REPO))
    code: Any = 0
    try:
        runpy.run_path(str(WORKER_PY), run_name="__main__")
    except SystemExit as exc:  # worker.py ends with raise SystemExit(main())
        code = exc.code
    path = profiles.write(args.out)
    print(f"profile_worker: {len(profiles.finished)} thread profiles -> {path}", file=sys.stderr)
    return int(code or 0)


if __name__ == "__main__":
    raise SystemExit(main())
