#!/usr/bin/env python3
"""What the MCP bridge (worker.py --mcp) costs: its start-up to a first answer, and its overhead per
call over the HTTP call it makes, measured side by side in one run.

    python bench/mcp_bridge.py --starts 30 --calls 300

One daemon on the tiny model on CPU (tests/fixtures/tiny-chatml-ov, a private lock, a free port).

- Start-up: a fresh bridge is spawned, a `server/discover` line written at once, and the time until
  its answer line arrives taken; in turns: the console script's way (`import worker`, from cached
  bytecode), `python worker.py --mcp`, and the floor of any Python server, an interpreter that
  echoes one line of stdin.
- Per call: in turns, a `tools/call` through one running bridge (a line on its stdin until the
  answer line on its stdout) and the same job as a direct HTTP POST on a connection of its own, as
  the bridge makes it.  Each answer's `timing_ms.total` (the daemon's own time for the job) is taken
  off its round trip, which leaves what the client side and the transport cost; the bridge's
  overhead is the MCP path's share minus the HTTP path's.  A title of 1 token keeps jobs short.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import py_compile
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ECHO = "import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush()"
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
DISCOVER = (
    json.dumps({"jsonrpc": "2.0", "id": 0, "method": "server/discover", "params": {"_meta": META}}) + "\n"
)
JOB = {"input": "Quarterly revenue is up twelve percent.", "max_new_tokens": 1}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_daemon(model: Path, port: int, scratch: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OV_GENAI_NPU_")}
    env.update(
        OV_GENAI_NPU_MODEL=str(model),
        OV_GENAI_NPU_DEVICE="CPU",
        OV_GENAI_NPU_PORT=str(port),
        OV_GENAI_NPU_LOCK=str(scratch / "npu.lock"),
        OV_GENAI_NPU_CACHE=str(scratch / "cache"),
    )
    daemon = subprocess.Popen([sys.executable, str(REPO / "worker.py")], env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                if response.status == 200:
                    return daemon
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the daemon did not become ready")


def first_answer_ms(command: list[str], line: str) -> tuple[float, float]:
    """Spawn, write one line at once, wait for one line back: milliseconds from the spawn, and the
    CPU milliseconds (user + system) the whole process took, start to exit, which a loaded machine
    changes far less than the wall time."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(line.encode())
    process.stdin.flush()
    answer = process.stdout.readline()
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert answer.startswith(b"{"), answer
    process.stdin.close()
    process.wait(timeout=10)
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = (cpu_after.ru_utime - cpu_before.ru_utime + cpu_after.ru_stime - cpu_before.ru_stime) * 1000
    return elapsed_ms, cpu_ms


def mcp_call(bridge: subprocess.Popen[bytes], request_id: int) -> tuple[float, float]:
    """(round trip ms, the daemon's timing_ms.total) of one tools/call through the bridge."""
    assert bridge.stdin is not None and bridge.stdout is not None
    line = (
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {"_meta": META, "name": "title", "arguments": JOB},
            }
        ).encode()
        + b"\n"
    )
    started = time.perf_counter()
    bridge.stdin.write(line)
    bridge.stdin.flush()
    answer = json.loads(bridge.stdout.readline())
    elapsed_ms = (time.perf_counter() - started) * 1000
    result = answer["result"]
    assert not result["isError"], result
    return elapsed_ms, result["structuredContent"]["timing_ms"]["total"]


def http_call(port: int) -> tuple[float, float]:
    """The same job as a direct POST on a connection of its own, as the bridge sends it."""
    body = json.dumps({"job": "title", **JOB}).encode()
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST",
        "/v1/worker/generate",
        body=body,
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return (time.perf_counter() - started) * 1000, answer["timing_ms"]["total"]


def status_of(pid: int) -> str:
    """Resident memory and threads of a process, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return f"{fields['VmRSS'].strip()} resident, {fields['Threads'].strip()} thread(s)"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def row(name: str, values: list[float]) -> str:
    return f"| {name} | {len(values)} | {percentile(values, 0.5):.2f} | {percentile(values, 0.99):.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "tests" / "fixtures" / "tiny-chatml-ov")
    parser.add_argument("--starts", type=int, default=30)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-mcp-"))
    port = free_port()
    daemon = start_daemon(args.model, port, scratch)
    try:
        bridge_command = [sys.executable, str(REPO / "worker.py"), "--mcp", "--port", str(port)]
        # The console script imports worker from its cached bytecode, which pip writes at install
        # (written here too: PYTHONDONTWRITEBYTECODE would leave a stale one); `python worker.py`
        # compiles the 200 KB script at every start.
        py_compile.compile(
            str(REPO / "worker.py"), cfile=importlib.util.cache_from_source(str(REPO / "worker.py"))
        )
        console_script = [
            sys.executable,
            "-c",
            "import sys; from worker import main; sys.exit(main())",
            "--mcp",
            "--port",
            str(port),
        ]
        commands = {
            "python echo (floor)": [sys.executable, "-c", ECHO],
            "openvino-genai-npu-worker --mcp (console script)": console_script,
            "python worker.py --mcp": bridge_command,
        }
        starts: dict[str, list[float]] = {name: [] for name in commands}
        start_cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.starts):
            for name, command in commands.items():
                wall_ms, cpu_ms = first_answer_ms(command, DISCOVER)
                starts[name].append(wall_ms)
                start_cpu[name].append(cpu_ms)
        bridge = subprocess.Popen(
            bridge_command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert bridge.stdin is not None and bridge.stdout is not None
        bridge.stdin.write(DISCOVER.encode())
        bridge.stdin.flush()
        bridge.stdout.readline()
        idle = status_of(bridge.pid)
        round_trips: dict[str, list[float]] = {"HTTP": [], "MCP": []}
        client_side: dict[str, list[float]] = {"HTTP": [], "MCP": []}
        for index in range(args.calls + 20):  # the first 20 of each are warm-up
            for path, (total_ms, daemon_ms) in (("MCP", mcp_call(bridge, index)), ("HTTP", http_call(port))):
                if index >= 20:
                    round_trips[path].append(total_ms)
                    client_side[path].append(total_ms - daemon_ms)
        after_calls = status_of(bridge.pid)
        bridge.stdin.close()
        bridge.wait(timeout=10)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    print("| start-up to the first answer | runs | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for name, values in starts.items():
        print(row(name, values))
    print()
    print("| CPU of the whole process, start to exit | runs | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for name, values in start_cpu.items():
        print(row(name, values))
    print()
    print("| per call (title, 1 token) | calls | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- |")
    for path in ("HTTP", "MCP"):
        print(row(f"{path}: round trip", round_trips[path]))
        print(row(f"{path}: round trip minus the daemon's timing_ms.total", client_side[path]))
    overhead = [mcp - http for mcp, http in zip(client_side["MCP"], client_side["HTTP"])]
    print(row("bridge overhead (MCP minus HTTP, pairwise)", overhead))
    print(
        f"\nthe bridge, idle after its first answer: {idle}; after the calls: {after_calls}\n"
        f"median difference of the client-side shares: "
        f"{statistics.median(client_side['MCP']) - statistics.median(client_side['HTTP']):.3f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
