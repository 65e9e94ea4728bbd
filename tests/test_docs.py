"""Every command in README.md and CONTRACT.md is run here, so the docs cannot drift from the code.

Each `sh` block line is one command, run as pasted in a shell session: an `export` line earlier in
the same file holds for every later command, and `$HOME` is a throwaway home whose
`~/models/Qwen2.5-1.5B-Instruct-int4-ov` is the tiny model. Commands that talk to the worker run
against a live daemon on the tiny model (the documented port is swapped for a free one), and every
JSON example must match the real answer: the same keys and types, and the same values where they
do not depend on the device, the model or the clock. Commands that need an NPU host or a model hub
are listed in NOT_RUN_HERE with the reason; an unlisted new command fails the suite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import REPO
from conftest import TINY_MODEL
from conftest import free_port
from conftest import running_daemon
from conftest import worker_env
from test_mcp_docs import AGENT_COMMANDS
from test_mcp_docs import BLOCKS as AGENT_CONFIGS
from test_systemd import NEEDS_USER_SESSION
from test_systemd import SERVICE_COMMANDS

pytest.importorskip("openvino_genai")

DOC_PORT = str(worker.DEFAULT_PORT)
NOT_RUN_HERE = {
    "sudo usermod -aG render": "changes the host's groups; only meaningful on an NPU host",
    "pip install huggingface_hub && hf download": "downloads a model from a model hub, which this machine "
    "cannot reach",
    "pip install 'optimum-intel[openvino]' && optimum-cli export openvino": "downloads PyTorch and a model "
    "from a model hub; the same export options built tests/fixtures/tiny-chatml-ov (tools/build_tiny_model.py)",
    **NEEDS_USER_SESSION,
}
DOC_MODEL = "~/models/Qwen2.5-1.5B-Instruct-int4-ov"


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
EXPORTS = [command for _, command, _ in README + CONTRACT if command.startswith("export ")]


def as_pasted(command: str) -> str:
    """The command after the `export` lines before it, in one shell that read README.md and then
    CONTRACT.md."""
    commands = [line for _, line, _ in README + CONTRACT]
    earlier = [line for line in commands[: commands.index(command)] if line.startswith("export ")]
    return " && ".join([*earlier, command])


def session_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A new user's shell: a fresh home, and the model only where the README's export points."""
    env = worker_env(tmp_path, HOME=str(session_home(tmp_path)), **extra)
    del env["OV_GENAI_NPU_MODEL"]
    return env


def session_home(tmp_path: Path) -> Path:
    """A fresh home, with the README's model directory holding the tiny model."""
    home = tmp_path / "home"
    model = home / DOC_MODEL.removeprefix("~/")
    model.parent.mkdir(parents=True, exist_ok=True)
    if not model.exists():
        model.symlink_to(TINY_MODEL, target_is_directory=True)
    return home


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """The documented daemon command, on the tiny model on CPU, on a free port."""
    tmp_path = tmp_path_factory.mktemp("docs")
    env = {"OV_GENAI_NPU_PORT": str(free_port()), "HOME": str(session_home(tmp_path))}
    command = [sys.executable, "worker.py"]
    with running_daemon(tmp_path, command=command, **env) as served:
        port = served.wait_ready()
        yield port, served.env
        assert served.stop() == 0


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a documented command as a user would, after the export lines before it, with this
    interpreter first on PATH: the suite may run as venv/bin/python -m pytest without the venv
    activated."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    documented = any(command == line for _, line, _ in README + CONTRACT)  # not a curl with its port swapped
    pasted = as_pasted(command) if documented else command
    return subprocess.run(["bash", "-c", pasted], cwd=REPO, env=env, check=False, capture_output=True,
                          text=True, timeout=120)


def test_the_docs_commands_find_this_interpreter_without_an_activated_venv() -> None:
    """run() puts sys.executable's directory first on PATH: `python` is this one."""
    completed = run("python -c 'import sys; print(sys.executable)'", {"PATH": "/usr/bin:/bin"})
    assert completed.stdout.strip() == sys.executable


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




# Values that do not depend on the device, the model or the clock: where an example shows one,
# the live answer has the same.
DETERMINISTIC = re.compile(
    r"\.(status|ready|version|queue_depth|queue_waiting|jobs_in_flight|last_error|problem|job|input_truncated"
    r"|tokens\.max_new_tokens|jobs\.\w+\.(default_max_new_tokens|max_new_tokens)|limits\.\w+)"
)


def same_values(example: Any, actual: Any, where: str = "") -> None:
    if isinstance(example, dict) and isinstance(actual, dict):  # null where the device decides: same_shape
        for key in example:
            same_values(example[key], actual[key], f"{where}.{key}")
    elif DETERMINISTIC.fullmatch(where):
        assert actual == example, f"{where}: the example says {example!r}, the worker {actual!r}"


def worker_commands() -> list[tuple[str, str, str | None]]:
    return [
        (f"{doc}: {heading}", command, example)
        for doc, blocks in (("README", README), ("CONTRACT", CONTRACT))
        for heading, command, example in blocks
        if command.startswith("curl ") or ("python worker.py --job" in command and command not in SETUP_COMMANDS)
    ]


@pytest.mark.parametrize("where,command,example", worker_commands(), ids=lambda value: str(value)[:60])
def test_documented_worker_command(
    daemon: tuple[int, dict[str, str]], where: str, command: str, example: str | None
) -> None:
    port, env = daemon
    assert DOC_PORT in command or not command.startswith("curl")
    if command.startswith("curl "):
        completed = run(command.replace(DOC_PORT, str(port)), env)
    else:  # a one-shot job, as pasted after the README's export
        completed = run(command, {k: v for k, v in env.items() if k != "OV_GENAI_NPU_MODEL"})
    assert completed.returncode == 0, completed.stderr
    if command.endswith("/metrics"):
        assert "npu_worker_requests_total{" in completed.stdout  # Prometheus text, not JSON
        return
    if "--output text" in command:  # the answer alone, one line
        answer = completed.stdout
        assert answer.strip() and answer.count("\n") == 1 and not answer.startswith("{")
        return
    actual = json.loads(completed.stdout)
    assert "error" not in actual
    if example is not None:
        same_shape(json.loads(example), actual)
        same_values(json.loads(example), actual)


def test_contract_error_example_is_what_the_worker_says(daemon: tuple[int, dict[str, str]]) -> None:
    (example,) = [json.loads(block)
                  for block in re.findall(r"```json\n(.*?)```", (REPO / "CONTRACT.md").read_text(), re.DOTALL)
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


def test_every_json_example_is_checked() -> None:
    """Each json block follows a command that test_documented_worker_command runs, or is the error
    example: none can drift unseen."""
    checked = {example for _, _, example in worker_commands() if example is not None}
    checked.add(AGENT_CONFIGS["json"])  # a configuration, run by tests/test_mcp_docs.py
    for path in (REPO / "README.md", REPO / "CONTRACT.md"):
        for block in re.findall(r"```json\n(.*?)```", path.read_text(), re.DOTALL):
            assert block in checked or '"error"' in block, f"{path.name}: a JSON example no test checks"


def test_memory_example_text_is_the_compact_json_of_its_candidates(daemon: tuple[int, dict[str, str]]) -> None:
    (example,) = [json.loads(block) for _, command, block in CONTRACT if "extract-memory-candidates" in command]
    assert example["text"] == json.dumps({"candidates": example["candidates"]}, separators=(",", ":"))
    port, _ = daemon
    body = b'{"input": "I moved to Lisbon last spring and I prefer tea over coffee."}'
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/worker/extract-memory-candidates", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        text = json.loads(response.read())["text"]
    assert text.startswith('{"candidates":[') and '"text": ' not in text  # what the grammar makes


def test_every_metric_is_in_the_contract_table(daemon: tuple[int, dict[str, str]]) -> None:
    contract = (REPO / "CONTRACT.md").read_text()
    table = contract[contract.index("### GET /metrics"):contract.index("### GET /openapi.json")]
    documented = set()
    for row in re.findall(r"^\| (`[^|]*) \|", table, re.MULTILINE):
        documented |= set(re.findall(r"`([a-z_]+)(?:\{[^}]*\})?`", row))
    port, _ = daemon
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        served = set(re.findall(r"^# TYPE npu_worker_(\w+) ", response.read().decode(), re.MULTILINE))
    assert served - documented == set(), "add a row for these to CONTRACT.md's /metrics table"
    assert documented - served == set(), "CONTRACT.md's /metrics table names metrics nobody serves"


def test_batch_command_reports_every_line(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in CONTRACT if "--batch" in command]
    completed = run(command, session_env(tmp_path))
    assert completed.returncode == 1, completed.stderr  # one of the two lines is bad
    first, second = [json.loads(line) for line in completed.stdout.splitlines()]
    assert (first["line"], first["id"], first["job"]) == (1, "a1", "title")
    assert (second["line"], second["error"]["type"]) == (2, "invalid_request")
    assert "batch: 1 done, 0 failed\nbatch: 1 done, 1 failed\n" in completed.stderr
    assert "batch: finished: 2 jobs: 1 done, 1 failed" in completed.stderr


NPU_DOCTOR_COMMAND = "python worker.py --doctor"  # README, on an NPU host
HOST_DOCTOR_COMMANDS = [command for _, command, _ in README + CONTRACT
                        if "--doctor" in command and command != NPU_DOCTOR_COMMAND]


@pytest.mark.parametrize("command", HOST_DOCTOR_COMMANDS)
def test_doctor_command_passes_on_this_host(tmp_path: Path, command: str) -> None:
    env = session_env(tmp_path, OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the command says which device it means
    completed = run(command, env)
    assert completed.returncode == 0, completed.stdout
    if "--json" in command:
        report = json.loads(completed.stdout)
        assert report["ok"] is True and report["verdict"] == "this host can serve"
        assert {check["name"] for check in report["checks"]} >= {"device", "model", "cache dir", "port"}
        return
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
    (command,) = [command for _, command, _ in README if command == "python smoke_llm_npu.py"]
    completed = run(command, session_env(tmp_path))
    assert completed.returncode == 77, completed.stderr
    assert completed.stdout == ""
    assert completed.stderr.splitlines()[-1].startswith("smoke_llm_npu.py: SKIP: OpenVINO sees no NPU")


def test_emulated_smoke_command_passes_here_and_ci_runs_it(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in README if "smoke_llm_npu.py --emulate-npu" in command]
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    completed = run(command, worker_env(tmp_path))
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    assert (report["npu_proof"], report["npu_busy_delta_us"], report["device"]) == ("emulated", None, "NPU")
    verdict = completed.stderr.splitlines()[-1]
    assert verdict.startswith("smoke_llm_npu.py: PASS (emulated): tiny-chatml-ov generated ")


def test_npu_daemon_command_names_the_missing_npu_and_the_ways_on(tmp_path: Path) -> None:
    """On a host without an NPU the NPU daemon command exits 78 with the cause (not the counter)."""
    (command,) = [command for _, command, _ in README if command == "python worker.py"]
    env = session_env(tmp_path, OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the documented default, NPU
    completed = run(command, env)
    assert completed.returncode == 78
    assert completed.stderr.startswith("worker.py: configuration: no NPU: OpenVINO sees only ['CPU']")
    assert all(way in completed.stderr for way in ("--demo", "--device CPU", "--emulate-npu"))


def test_npu_doctor_command_explains_what_this_host_lacks(tmp_path: Path) -> None:
    (command,) = [command for _, command, _ in README if command == NPU_DOCTOR_COMMAND]
    env = session_env(tmp_path, OV_GENAI_NPU_PORT=str(free_port()))
    del env["OV_GENAI_NPU_DEVICE"]  # the documented default, NPU
    completed = run(command, env)
    assert completed.returncode == 78
    for failure in ("FAIL  device: NPU not found", "FAIL  accel device", "FAIL  busy counter"):
        assert failure in completed.stdout
    assert "ok    model: " in completed.stdout  # found where the README's export points
    assert "ok    npu export: mode int4_sym" in completed.stdout
    assert completed.stdout.count("      fix: ") >= 3


def test_token_commands_work_on_a_fresh_home_and_are_enforced(tmp_path: Path) -> None:
    (create,) = [command for _, command, _ in README if "secrets.token_urlsafe" in command]
    (start,) = [command for _, command, _ in README if "--token-file" in command]
    env = session_env(tmp_path)
    assert not (tmp_path / "home" / ".config").exists()  # a fresh home
    assert run(create, env).returncode == 0
    token_file = tmp_path / "home" / ".config" / "npu-worker.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    port = free_port()
    env["OV_GENAI_NPU_PORT"] = str(port)
    process = subprocess.Popen(["bash", "-c", f"{as_pasted(start).rsplit(' && ', 1)[0]} && exec {start}"],
                               cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                             headers={"Authorization": f"Bearer {token}"})
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


def user_shell_env(tmp_path: Path) -> dict[str, str]:
    """session_env without the variables by which openvino-telemetry recognises a CI run and stays
    off (opt_in_checker.py: CI=true, TF_BUILD, JENKINS_URL): what a user's own shell has."""
    env = session_env(tmp_path)
    for name in ("CI", "TF_BUILD", "JENKINS_URL"):
        env.pop(name, None)
    return env


def test_telemetry_opt_out_leaves_only_the_consent_file(tmp_path: Path) -> None:
    """README, "OpenVINO's telemetry": importing OpenVINO writes ~/intel; after the opt-out only the
    consent file is left, and importing it again writes nothing more."""
    (command,) = [command for _, command, _ in README if command.startswith("opt_in_out ")]
    env = user_shell_env(tmp_path)
    intel = tmp_path / "home" / "intel"
    subprocess.run([sys.executable, "-c", "import openvino"], env=env, check=True, timeout=60)
    assert {"openvino_ga_cid", "stats"} <= {path.name for path in intel.iterdir()}
    assert run(command, env).returncode == 0
    assert (intel / "openvino_telemetry").read_text() == "0"
    subprocess.run([sys.executable, "-c", "import openvino_genai"], env=env, check=True, timeout=60)
    assert sorted(path.name for path in intel.iterdir()) == ["openvino_telemetry"]


def test_the_worker_and_the_smoke_test_keep_openvino_telemetry_out(tmp_path: Path) -> None:
    """README, "OpenVINO's telemetry": from the same fresh home where a plain `import openvino`
    writes ~/intel (the test above), a job through the worker and the smoke test write nothing there
    and start no sender thread."""
    env = user_shell_env(tmp_path)
    job = [sys.executable, "worker.py", "--device", "CPU", "--model", str(TINY_MODEL), "--job", "title",
           "--input", "Telemetry check.", "--output", "text"]
    smoke = [sys.executable, "smoke_llm_npu.py", "--emulate-npu", "--model", str(TINY_MODEL)]
    threads = [sys.executable, "-c", ("import threading, worker; worker.import_openvino(); "
                                      "print(sorted(t.name for t in threading.enumerate()))")]
    for command in (job, smoke):
        completed = subprocess.run(command, cwd=REPO, env=env, check=False, capture_output=True, timeout=120)
        assert completed.returncode == 0
    names = subprocess.run(threads, cwd=REPO, env=env, check=False, capture_output=True, text=True,
                           timeout=60).stdout
    assert names.strip() == "['MainThread']"
    assert not (tmp_path / "home" / "intel").exists()


def test_every_documented_command_is_exercised() -> None:
    exercised = {command for _, command, _ in worker_commands()} | set(SETUP_COMMANDS) | set(EXPORTS)
    exercised |= set(SERVICE_COMMANDS) - set(NEEDS_USER_SESSION)  # run by tests/test_systemd.py
    exercised |= {command for _, command, _ in README
                  if "smoke_llm_npu.py" in command or command == "python worker.py"}
    exercised |= {command for _, command, _ in CONTRACT if "--batch" in command}
    exercised |= {command for _, command, _ in README + CONTRACT if "--doctor" in command}
    exercised |= {command for _, command, _ in README
                  if "secrets.token_urlsafe" in command or "--token-file" in command
                  or command.startswith("opt_in_out ")}
    exercised |= set(AGENT_COMMANDS)  # the bridge each names is run by tests/test_mcp_docs.py
    exercised |= {command for heading, command, _ in README if heading == "Changing the code"}
    for _, command, _ in README + CONTRACT:
        if command not in exercised:
            assert any(command.startswith(prefix) for prefix in NOT_RUN_HERE), f"no test runs: {command}"


def test_lint_command_is_clean_and_ci_runs_it() -> None:
    (command,) = [command for heading, command, _ in README if heading == "Changing the code"]
    assert command in (REPO / ".ci" / "run").read_text().splitlines()
    # The test extra's ruff sits beside this interpreter, whether or not its virtualenv is active.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    if shutil.which("ruff", path=path) is None:
        if os.environ.get("CI"):
            raise RuntimeError("CI must install the test extra, which has ruff: pip install '.[test]'")
        pytest.skip("ruff is not installed: pip install '.[test]'")
    completed = subprocess.run(["bash", "-c", command], cwd=REPO, env={**os.environ, "PATH": path},
                               capture_output=True, text=True, timeout=60, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
