#!/usr/bin/env python3
"""Where one kept-alive request's time goes, stage by stage, across the daemon and its client.

    python bench/stages.py [--iterations 400] [--tokens 16] [--json OUT] [TREE ...]

Each daemon is ``TREE/worker.py`` (default: this checkout's; several trees run side by side),
started through ``worker.main`` in a subprocess of its own, with stamps (``time.monotonic_ns``,
the one clock every process shares) wrapped around its stages: the gate's wake-up, read and
hand-off, the handler thread's wake-up, validation, the chat template, the token count, the NPU
lock, the pipeline's own generate, the decode, the result, the log line, the response and its
send.  This process is the client and stamps the same clock: every round runs, in a fresh seeded
order, the job through ``http.client`` (as bench/run.py and overhead_ab.py do) and the same bytes
through a raw socket (the client's own cost is the difference), to each daemon, and a direct
``LLMPipeline.generate`` of the same prompt.

The stages are consecutive intervals of one request, so their medians add up to about the
median latency; "overhead" is the p50 of latency minus the p50 of direct.  A stamp costs about a
microsecond (a Python wrapper); about 20 of them run per request.  The raw stamps stay in the
work directory (stamps.json per daemon, rounds.json), to align with ``perf record -k CLOCK_MONOTONIC``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import socket
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

# The daemon: worker.main with stamps; they are written to argv[2] when main returns (SIGTERM).
SERVER = r'''
import functools, json, selectors, socketserver, sys, time
sys.path.insert(0, sys.argv[1])
import worker
stamps = []
now = time.monotonic_ns

def at_entry(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        stamps.append((name, now()))
        return function(*args, **kwargs)
    return wrapper

def at_exit(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            stamps.append((name, now()))
    return wrapper

class StampedSelector(selectors.DefaultSelector):
    def select(self, timeout=None):
        events = super().select(timeout)
        if any(key.data not in ("listen", "wake") for key, _ in events):
            stamps.append(("gate_woke", now()))
        return events

worker.selectors.DefaultSelector = StampedSelector
server = worker.WorkerHTTPServer
server._advance = at_entry("gate_read", server._advance)
server.process_request = at_entry("gate_hand_off", server.process_request)
server.process_request = at_exit("gate_handed_off", server.process_request)
server.process_request_thread = at_entry("handler_woke", socketserver.ThreadingMixIn.process_request_thread)
server.shutdown_request = at_exit("handed_back", server.shutdown_request)
worker.parse_json_body = at_entry("json_parse", worker.parse_json_body)
worker.Worker.run = at_entry("run_start", worker.Worker.run)
worker.Worker.run = at_exit("run_done", worker.Worker.run)
worker.GenAIPipeline.generate = at_exit("decoded", worker.GenAIPipeline.generate)
worker.GenAITokenizer.render_prompt = at_exit("rendered", worker.GenAITokenizer.render_prompt)
worker.job_prompt = at_exit("prompt_done", worker.job_prompt)
worker.NpuLock.acquire = at_exit("lock_held", worker.NpuLock.acquire)
worker.job_result = at_entry("result_start", worker.job_result)
worker.job_result = at_exit("result_done", worker.job_result)
worker.WorkerRequestHandler._record = at_entry("record_start", worker.WorkerRequestHandler._record)
worker.WorkerRequestHandler._record = at_exit("recorded", worker.WorkerRequestHandler._record)
worker.send_all = at_entry("send_start", worker.send_all)
worker.send_all = at_exit("sent", worker.send_all)
init = worker.GenAIPipeline.__init__

class Stamped:
    def __init__(self, pipeline):
        self._pipeline = pipeline
    def __getattr__(self, name):
        return getattr(self._pipeline, name)
    def generate(self, *args, **kwargs):
        stamps.append(("generate_start", now()))
        try:
            return self._pipeline.generate(*args, **kwargs)
        finally:
            stamps.append(("generate_end", now()))

def stamped_init(self, llm_pipeline, genai):
    init(self, llm_pipeline, genai)
    self._pipeline = Stamped(self._pipeline)

worker.GenAIPipeline.__init__ = stamped_init
code = worker.main(sys.argv[3:])
with open(sys.argv[2], "w") as out:
    json.dump(stamps, out)
raise SystemExit(code)
'''

# The stamps on a request's way from the client's first byte to its answer, in causal order; the
# client's end is "first_bytes" (raw socket) or "head_parsed" (http.client), then "done".
SERVER_CHAIN = ("gate_woke", "gate_read", "gate_hand_off", "handler_woke", "json_parse", "run_start", "rendered",
                "prompt_done", "lock_held", "generate_start", "generate_end", "decoded", "result_start",
                "result_done", "run_done", "record_start", "recorded", "send_start")
# Off the client's way (the client may already be reading its answer meanwhile): each from the
# first stamp of its pair.
OFF_CHAIN = (("client_start", "client_sent"), ("gate_hand_off", "gate_handed_off"), ("send_start", "sent"),
             ("sent", "handed_back"))


# The overhead (latency - direct) in parts: stages grouped by who does the work.  The tokenizer's
# encode and decode are not the worker's extra: the direct generate does both inside.
GROUPS = (
    ("client: request written, loopback, gate woken", ("client_start -> gate_woke",)),
    ("gate: recv", ("gate_woke -> gate_read",)),
    ("gate: head parsed, checks, hand-off", ("gate_read -> gate_hand_off",)),
    ("handler thread woken", ("gate_hand_off -> handler_woke",)),
    ("handler: set-up, JSON parse, validation", ("handler_woke -> json_parse", "json_parse -> run_start")),
    ("chat template (the direct baseline is handed it rendered)", ("run_start -> rendered",)),
    ("queue, NPU lock, generation config, streamer", ("prompt_done -> lock_held", "lock_held -> generate_start")),
    ("encode + generate + decode - direct generate", ("rendered -> prompt_done", "generate_start -> generate_end",
                                                       "generate_end -> decoded")),
    ("result: counter, clean-up, metrics", ("decoded -> result_start", "result_start -> result_done",
                                            "result_done -> run_done")),
    ("log line and request metrics", ("run_done -> record_start", "record_start -> recorded")),
    ("response bytes", ("recorded -> send_start",)),
    ("answer: send, loopback, client woken, read and parsed", ("send_start -> client_first_bytes",
                                                               "send_start -> client_head_parsed",
                                                               "client_first_bytes -> client_done",
                                                               "client_head_parsed -> client_done")),
)


def attribution(out: dict[str, Any], modes: Sequence[str]) -> str:
    """The p50 overhead of each mode in GROUPS' parts (sums of stage medians), and what is left:
    the median of a sum is not the sum of the medians."""
    lines = ["| part (ms) | " + " | ".join(modes) + " |", "| --- |" + " ---: |" * len(modes)]
    rest = {mode: out[mode]["overhead_p50_ms"] for mode in modes}
    for label, stages in GROUPS:
        cells = []
        for mode in modes:
            value = sum(out[mode]["stages_p50_ms"].get(stage, 0.0) for stage in stages)
            if "- direct" in label:
                value -= out["direct_p50_ms"]
            rest[mode] -= value
            cells.append(f"{value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| median of the sum - sum of the medians | " + " | ".join(f"{rest[m]:.3f}" for m in modes) + " |")
    lines.append("| overhead p50 | " + " | ".join(f"{out[m]['overhead_p50_ms']:.3f}" for m in modes) + " |")
    return "\n".join(lines)


def raw_post(sock: socket.socket, request: bytes) -> tuple[int, int, int, bytes]:
    """Send one request, read one Content-Length answer: (sent, first bytes, done) in ns, body."""
    sock.sendall(request)
    sent = time.monotonic_ns()
    data = sock.recv(65536)
    first = time.monotonic_ns()
    head_end = data.find(b"\r\n\r\n")
    while head_end < 0:
        data += sock.recv(65536)
        head_end = data.find(b"\r\n\r\n")
    length = 0
    for line in data[:head_end].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(data) < head_end + 4 + length:
        data += sock.recv(65536)
    return sent, first, time.monotonic_ns(), data[head_end + 4:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", type=Path, nargs="*", default=[run.REPO],
                        help="checkouts (TREE/worker.py), each its own daemon; default: this one")
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="stages-"))
    config = run.tiny_cpu_config(workdir)
    names = [f"{index}" for index in range(len(args.trees))]
    daemons = {}
    for name, tree in zip(names, args.trees):
        (workdir / name).mkdir()
        own = run.RunConfig(**{**config.__dict__, "lock_file": workdir / name / "npu.lock"})
        command = [sys.executable, "-c", SERVER, str(tree.resolve()), str(workdir / name / "stamps.json")]
        daemons[name] = run.Daemon(own, name, command=command)
    direct = run.DirectPipeline(config)
    text = run.make_text(run.OVERHEAD_INPUT_CHARS)
    prompt = direct.prompt(run.JOB, text)
    body = run.encode_job(run.JOB, text, args.tokens)
    rounds: list[dict[str, Any]] = []
    try:
        clients, raws, raw_requests = {}, {}, {}
        for name, daemon in daemons.items():
            daemon.wait_ready()
            clients[name] = run.Client(daemon.port)
            clients[name].connect()
            raws[name] = socket.create_connection(("127.0.0.1", daemon.port), timeout=run.HTTP_TIMEOUT_S)
            raws[name].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as http.client does
            raw_requests[name] = (f"POST {run.GENERATE_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\n"
                                  f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                                  ).encode() + body
        modes = ["direct"] + [f"{kind} {name}" for name in names for kind in ("http_client", "raw_socket")]
        rng = random.Random(args.tokens)
        for index in range(args.warmup + args.iterations):
            for mode in run.shuffled(modes, rng):
                kind, _, name = mode.partition(" ")
                entry: dict[str, Any] = {"mode": mode, "tree": name, "warmup": index < args.warmup}
                if kind == "direct":
                    entry["start"] = time.monotonic_ns()
                    direct.generate(prompt, args.tokens)
                    entry["end"] = time.monotonic_ns()
                elif kind == "http_client":
                    connection = clients[name].conn
                    entry["start"] = time.monotonic_ns()
                    connection.request("POST", run.GENERATE_PATH, body, run.JSON_HEADERS)
                    entry["sent"] = time.monotonic_ns()
                    response = connection.getresponse()
                    entry["head_parsed"] = time.monotonic_ns()
                    data = response.read()
                    entry["end"] = time.monotonic_ns()
                    json.loads(data)
                else:
                    entry["start"] = time.monotonic_ns()
                    entry["sent"], entry["first_bytes"], entry["end"], data = raw_post(raws[name], raw_requests[name])
                    json.loads(data)
                rounds.append(entry)
        for name in names:
            clients[name].close()
            raws[name].close()
    finally:
        for daemon in daemons.values():
            daemon.stop()
    (workdir / "rounds.json").write_text(json.dumps(rounds))  # beside the stamps, for perf script
    stamps = {name: sorted(((stamp, t) for stamp, t in json.loads((workdir / name / "stamps.json").read_text())),
                           key=lambda stamp: stamp[1]) for name in names}

    # Each HTTP round's server stamps are those of its daemon inside its [start, end] window.
    position = dict.fromkeys(names, 0)
    intervals: dict[str, dict[str, list[float]]] = {}
    latency: dict[str, list[float]] = {mode: [] for mode in modes}
    for entry in rounds:
        name, mode = entry["tree"], entry["mode"]
        if mode != "direct":
            own, at = stamps[name], position[name]
            while at < len(own) and own[at][1] < entry["start"]:
                at += 1
            inside: dict[str, int] = {}
            while at < len(own) and own[at][1] <= entry["end"]:
                inside.setdefault(own[at][0], own[at][1])  # the first of each (the gate may wake twice)
                at += 1
            position[name] = at
        if entry["warmup"]:
            continue
        latency[mode].append((entry["end"] - entry["start"]) / 1e6)
        if mode == "direct":
            continue
        missing = [stamp for stamp in SERVER_CHAIN if stamp not in inside]
        if missing:
            raise RuntimeError(f"a round without the stamps {missing}")
        points = [("client_start", entry["start"])] + [(stamp, inside[stamp]) for stamp in SERVER_CHAIN]
        if mode.startswith("http_client"):
            points += [("client_head_parsed", entry["head_parsed"]), ("client_done", entry["end"])]
        else:
            points += [("client_first_bytes", entry["first_bytes"]), ("client_done", entry["end"])]
        mode_intervals = intervals.setdefault(mode, {})
        for (before, t0), (after, t1) in itertools.pairwise(points):
            mode_intervals.setdefault(f"{before} -> {after}", []).append((t1 - t0) / 1e6)
        known = {**inside, "client_start": entry["start"], "client_sent": entry["sent"]}
        for before, after in OFF_CHAIN:
            if before in known and after in known:
                mode_intervals.setdefault(f"({before} -> {after})", []).append((known[after] - known[before]) / 1e6)

    direct_p50 = statistics.median(latency["direct"])
    out: dict[str, Any] = {"trees": [str(tree) for tree in args.trees], "workdir": str(workdir),
                           "daemon_pids": {name: daemon.pid for name, daemon in daemons.items()},
                           "tokens": args.tokens, "iterations": args.iterations, "direct_p50_ms": round(direct_p50, 3)}
    for mode in modes[1:]:
        stages = {stage: round(statistics.median(values), 4) for stage, values in intervals[mode].items()
                  if not stage.startswith("(")}
        off_chain = {stage: round(statistics.median(values), 4) for stage, values in intervals[mode].items()
                     if stage.startswith("(")}
        out[mode] = {
            "latency_p50_ms": round(statistics.median(latency[mode]), 3),
            "overhead_p50_ms": round(statistics.median(latency[mode]) - direct_p50, 3),
            "sum_of_stage_p50s_ms": round(sum(stages.values()), 3),
            "stages_p50_ms": stages,
            "off_the_way_p50_ms": off_chain,
        }
    print(json.dumps(out, indent=2))
    print(table(out, modes[1:]))
    print()
    print(attribution(out, modes[1:]))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def table(out: dict[str, Any], modes: Sequence[str]) -> str:
    """The stages side by side, one column per mode, as a Markdown table."""
    stages = list(out[modes[0]]["stages_p50_ms"])
    for mode in modes[1:]:
        stages += [stage for stage in out[mode]["stages_p50_ms"] if stage not in stages]
    off = list(out[modes[0]]["off_the_way_p50_ms"])
    lines = ["| stage (p50 ms) | " + " | ".join(modes) + " |", "| --- |" + " ---: |" * len(modes)]
    for stage in stages + off:
        lines.append(f"| {stage} | " + " | ".join(str(out[mode]["stages_p50_ms"].get(stage, out[mode][
            "off_the_way_p50_ms"].get(stage, "-"))) for mode in modes) + " |")
    for key in ("sum_of_stage_p50s_ms", "latency_p50_ms", "overhead_p50_ms"):
        lines.append(f"| {key} | " + " | ".join(str(out[mode][key]) for mode in modes) + " |")
    lines.append(f"| direct p50 | {out['direct_p50_ms']} |" + " |" * (len(modes) - 1))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
