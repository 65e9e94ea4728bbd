"""Every command in README.md and CONTRACT.md is run here, so the docs cannot drift from the code.

Each `sh` block line is one command. Commands that talk to the worker run against a live daemon on
the tiny model (the documented port is swapped for a free one), and the JSON example that follows a
command in the docs must have the same shape as the real answer. Commands that need an NPU host or a
model hub are listed in NOT_RUN_HERE with the reason; an unlisted new command fails the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from typing import Iterator

import pytest

import worker
from conftest import REPO
from conftest import worker_env
from test_mcp_docs import AGENT_COMMANDS
from test_systemd import INSTALL_COMMANDS
from test_systemd import NEEDS_USER_SESSION

pytest.importorskip("openvino_genai")

DOC_PORT = str(worker.DEFAULT_PORT)
NOT_RUN_HERE = {
    "sudo usermod -aG render": "changes the host's groups; only meaningful on an NPU host",
    "huggingface-cli download": "downloads from a model hub, which this machine cannot reach",
    **NEEDS_USER_SESSION,
}


def doc_blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(section heading, command, JSON example right after its block or None) for each sh line."""
    text = path.read_text()
    found = []
    heading = ""
    pattern = re.compile(r"^(#+ [^\n]*)$|^```sh\n(.*?)^```\n(?:\n```json\n(.*?)^```)?", re.MULTILINE | re.DOTALL)
    for match in pattern.finditer(text):
        if match.group(1):
            heading = match.group(1).lstrip("# ").strip()
            continue
        for line in match.group(2).splitlines():
            if line.strip():
                found.append((heading, line.strip(), match.group(3)))
    return found


README = doc_blocks(REPO / "README.md")
CONTRACT = doc_blocks(REPO / "CONTRACT.md")
SETUP_COMMANDS = [command for heading, command, _ in README if heading == "Set-up"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """The documented daemon command, on the tiny model on CPU, on a free port."""
    tmp_path = tmp_path_factory.mktemp("docs")
    port = free_port()
    env = worker_env(tmp_path, OV_GENAI_NPU_PORT=str(port))
    process = subprocess.Popen([sys.executable, "worker.py"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("the daemon did not become ready")
        yield port, env
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a documented command as a user would, with this interpreter first on PATH: the suite may
    run as venv/bin/python -m pytest without the venv activated."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def same_shape(example: Any, actual: Any, where: str = "") -> None:
    """Same keys all the way down and the same JSON types (null allowed where the device decides)."""
    if where.endswith((".npu_busy_delta_us", ".npu_busy_ratio", ".npu_evidence", ".busy_counter")) and actual is None:
        return  # set on the NPU (the examples), null on the CPU (this test)
    if isinstance(example, dict):
        assert isinstance(actual, dict) and list(actual) == list(example), f"keys differ at {where or 'top'}"
        for key in example:
            same_shape(example[key], actual[key], f"{where}.{key}")
    elif isinstance(example, list):
        assert isinstance(actual, list), where
        if example and actual:
            same_shape(example[0], actual[0], f"{where}[0]")
    elif where.endswith(".stop_rule") and None in (example, actual):
        pass  # which rule ended the answer, if any, depends on what the model wrote
    else:
        assert type(actual) is type(example), f"type differs at {where}"


def worker_commands() -> list[tuple[str, str, str | None]]:
    return [
        (f"{doc}: {heading}", command, example)
        for doc, blocks in (("README", README), ("CONTRACT", CONTRACT))
        for heading, command, example in blocks
        if command.startswith("curl ") or ("python worker.py --job" in command and command not in SETUP_COMMANDS)
    ]


@pytest.mark.parametrize("where,command,example", worker_commands(), ids=lambda value: str(value)[:60])
def test_documented_worker_command(daemon: tuple[int, dict[str, str]], where: str, command: str, example: str | None) -> None:
    port, env = daemon
    assert DOC_PORT in command or not command.startswith("curl")
    completed = run(command.replace(DOC_PORT, str(port)), env)
    assert completed.returncode == 0, completed.stderr
    if command.endswith("/metrics"):
        assert "npu_worker_requests_total{" in completed.stdout  # Prometheus text, not JSON
        return
    actual = json.loads(completed.stdout)
    assert "error" not in actual
    if example is not None:
        same_shape(json.loads(example), actual)


def test_contract_error_example_is_what_the_worker_says(daemon: tuple[int, dict[str, str]]) -> None:
    (example,) = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", (REPO / "CONTRACT.md").read_text(), re.DOTALL)
                  if '"error"' in block]
    port, _ = daemon
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/worker/generate",
        data=json.dumps({"job": "title", "input": "x" * 7000}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    actual = json.loads(failure.value.read())
    assert failure.value.code == 413
    assert actual["error"] == example["error"]
    same_shape(example, actual)


def test_batch_command_reports_every_line(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in CONTRACT if "--batch" in command]
    completed = run(command, worker_env(tmp_path))
    assert completed.returncode == 1, completed.stderr  # one of the two lines is bad
    first, second = [json.loads(line) for line in completed.stdout.splitlines()]
    assert (first["line"], first["id"], first["job"]) == (1, "a1", "title")
    assert (second["line"], second["error"]["type"]) == (2, "invalid_request")
    assert "batch: finished: 2 jobs, 1 failed" in completed.stderr


HOST_DOCTOR_COMMANDS = [command for _, command, _ in README + CONTRACT if "--doctor" in command and "~/models" not in command]


@pytest.mark.parametrize("command", HOST_DOCTOR_COMMANDS)
def test_doctor_command_passes_on_this_host(tmp_path: Path, command: str) -> None:
    env = worker_env(tmp_path, OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the command says which device it means
    completed = run(command, env)
    assert completed.returncode == 0, completed.stdout
    assert completed.stdout.splitlines()[-1] == "doctor: this host can serve"
    if "--emulate-npu" in command:
        assert "ok    npu export: mode int4_sym" in completed.stdout
        assert "ok    npu pipeline: loaded and warmed up" in completed.stdout


def test_setup_commands_are_what_ci_runs() -> None:
    """README's two set-up commands appear verbatim in .ci/run; the second is the test command."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert len(SETUP_COMMANDS) == 2
    for command in SETUP_COMMANDS:
        assert command in ci
    assert "pytest" in SETUP_COMMANDS[1]


def test_smoke_command_skips_decisively_without_an_npu(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in README if "smoke_llm_npu.py" in command and "--emulate-npu" not in command]
    completed = run(command, worker_env(tmp_path))
    assert (completed.returncode, completed.stdout.strip()) == (77, "skipped: no NPU")


def test_emulated_smoke_command_passes_here_and_ci_runs_it(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in README if "smoke_llm_npu.py --emulate-npu" in command]
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    completed = run(command, worker_env(tmp_path))
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert (report["npu_proof"], report["npu_busy_delta_us"], report["device"]) == ("emulated", None, "NPU")


def test_npu_daemon_command_stops_with_a_configuration_error_here(tmp_path: Path) -> None:
    """On a host without an NPU (and its counter) the NPU daemon command exits 78, clearly."""
    (command,) = [command for _, command, _ in README if command.endswith("python worker.py")]
    env = worker_env(tmp_path, HOME=str(tmp_path), OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the documented default, NPU
    completed = run(command, env)
    assert completed.returncode == 78
    assert "worker.py: configuration: NPU busy counter not found" in completed.stderr


def test_npu_doctor_command_explains_what_this_host_lacks(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in README if command.endswith("--doctor")]
    env = worker_env(tmp_path, HOME=str(tmp_path), OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the documented default, NPU
    completed = run(command, env)
    assert completed.returncode == 78
    for failure in ("FAIL  device: NPU not found", "FAIL  accel device", "FAIL  busy counter", "FAIL  model"):
        assert failure in completed.stdout
    assert completed.stdout.count("      fix: ") >= 4


def test_token_commands_create_a_private_token_and_enforce_it(tmp_path: Path) -> None:
    (create,) = [command for _, command, _ in README if "secrets.token_urlsafe" in command]
    (start,) = [command for _, command, _ in README if "--token-file" in command]
    (tmp_path / ".config").mkdir()
    env = worker_env(tmp_path, HOME=str(tmp_path))
    assert run(create, env).returncode == 0
    token_file = tmp_path / ".config" / "npu-worker.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    port = free_port()
    env["OV_GENAI_NPU_PORT"] = str(port)
    process = subprocess.Popen(["bash", "-c", f"exec {start}"], cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 200
                    break
            except urllib.error.HTTPError as error:
                assert error.code == 503  # loading; never 401 with the right token
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the daemon with a token did not become ready")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert refused.value.code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def test_every_documented_command_is_exercised() -> None:
    exercised = {command for _, command, _ in worker_commands()} | set(SETUP_COMMANDS)
    exercised |= set(INSTALL_COMMANDS)  # run by tests/test_systemd.py
    exercised |= set(AGENT_COMMANDS)  # the bridge each names is run by tests/test_mcp_docs.py
    exercised |= {command for _, command, _ in README if "smoke_llm_npu.py" in command or command.endswith("python worker.py")}
    exercised |= {command for _, command, _ in CONTRACT if "--batch" in command or "--doctor" in command}
    exercised |= {command for _, command, _ in README if command.endswith("--doctor")
                  or "secrets.token_urlsafe" in command or "--token-file" in command}
    for _, command, _ in README + CONTRACT:
        if command not in exercised:
            assert any(command.startswith(prefix) for prefix in NOT_RUN_HERE), f"no test runs: {command}"
