"""README.md, "Use from an agent": each agent's configuration parses and the command it names serves
the tools; Claude Code itself stores README's `claude mcp add` and connects to the bridge, Codex
reads the TOML as its own configuration; and the MCP Inspector's CLI, a client from another SDK,
lists and calls the tools. The Node programs come from npm through npx, pinned (about 10 s to
install on first use); without npx or the registry those tests skip and say why.

The snippets name the service's virtualenv (README.md, "Running as a service"); here that path is
made under a temporary home, holding the console script pip writes for `openvino-genai-npu-worker`,
and the bridge finds the session's tiny daemon through OV_GENAI_NPU_PORT.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import REPO
from conftest import TinyDaemon

SECTION = REPO.joinpath("README.md").read_text().split("## Use from an agent\n", 1)[1].split("\n## ", 1)[0]
BLOCKS = dict(re.findall(r"```(sh|toml|json)\n(.*?)```", SECTION, re.DOTALL))
AGENT_COMMANDS = [line.strip() for line in BLOCKS["sh"].splitlines() if line.strip()]
PLACEHOLDER_HOME = "/home/you"
INSPECTOR = "@modelcontextprotocol/inspector@2.12.0"


def server_from_claude_command(command: str) -> dict[str, Any]:
    words = shlex.split(command)
    separator = words.index("--")
    assert words[:3] == ["claude", "mcp", "add"] and words[3:separator] == ["--scope", "user", "npu-worker"]
    return {"command": words[separator + 1], "args": words[separator + 2 :]}


def server_from_codex_toml(text: str) -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    server = tomllib.loads(text)["mcp_servers"]["npu-worker"]
    assert server["tool_timeout_sec"] > worker.DEFAULT_REQUEST_TIMEOUT_S  # a job's whole deadline fits
    return server


def server_from_mcp_servers_json(text: str) -> dict[str, Any]:
    return json.loads(text)["mcpServers"]["npu-worker"]


SNIPPETS = {
    "claude-code": lambda: server_from_claude_command(AGENT_COMMANDS[0]),
    "codex-toml": lambda: server_from_codex_toml(BLOCKS["toml"]),
    "mcp-servers-json": lambda: server_from_mcp_servers_json(BLOCKS["json"]),
}


def agent_env(home: Path, **extra: str) -> dict[str, str]:
    """The agent's environment with a HOME of its own (its configuration files land there) and
    npm's cache still the user's: under a fresh HOME, npx would download the pinned program again
    on every run (Codex alone is 235 MB unpacked)."""
    npm_cache = os.environ.get("npm_config_cache") or str(Path.home() / ".npm")
    return {**os.environ, "HOME": str(home), "npm_config_cache": npm_cache, **extra}


def install_console_script(home: Path) -> Path:
    """What `pip install .` puts in the service's virtualenv for [project.scripts]."""
    script = home / ".local/share/openvino-genai-npu-worker/venv/bin/openvino-genai-npu-worker"
    script.parent.mkdir(parents=True)
    script.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
        "from worker import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    return script


def test_the_section_has_one_snippet_per_agent() -> None:
    assert len(AGENT_COMMANDS) == 1 and set(BLOCKS) == {"sh", "toml", "json"}


@pytest.mark.parametrize("agent", list(SNIPPETS))
def test_each_agent_configuration_starts_a_bridge_that_serves_the_jobs(
    agent: str, tiny_daemon: TinyDaemon, tmp_path: Path
) -> None:
    anyio = pytest.importorskip("anyio")
    mcp = pytest.importorskip("mcp")  # tests/test_docs.py imports this module: no module-level skip
    from mcp.client.stdio import stdio_client

    server = SNIPPETS[agent]()
    script = install_console_script(tmp_path)
    if server["command"].startswith("~/"):  # the shell expands it when `claude mcp add` runs
        command = os.path.expanduser(server["command"].replace("~", str(tmp_path), 1))
    else:  # configuration files are not expanded: the README says to write your home there
        command = server["command"].replace(PLACEHOLDER_HOME, str(tmp_path), 1)
    assert command == str(script)
    assert server["args"] == ["--mcp"]
    parameters = mcp.StdioServerParameters(
        command=command,
        args=server["args"],
        cwd=str(tmp_path),
        env={"HOME": str(tmp_path), "OV_GENAI_NPU_PORT": str(tiny_daemon.port)},
    )

    async def session_work() -> tuple[list[str], Any]:
        with (tmp_path / "bridge.log").open("w") as log:  # opened once, before the session
            async with (
                stdio_client(parameters, errlog=log) as (read, write),
                mcp.ClientSession(read, write, read_timeout_seconds=60) as session,
            ):
                await session.initialize()
                tools = [tool.name for tool in (await session.list_tools()).tools]
                return tools, await session.call_tool(
                    "title", {"input": "Quarterly revenue is up twelve percent."}
                )

    tools, result = anyio.run(session_work)
    assert tools == list(worker.JOBS)
    assert not result.is_error and result.structured_content["job"] == "title"


# --------------------------------------------------------------------------------------------------
# The MCP Inspector's CLI (Node): a client from another SDK, where Node and the npm registry are
def run_agent(command: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)


# --------------------------------------------------------------------------------------------------


def inspector(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["npx", "-y", INSPECTOR, "--cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        check=False,
    )


@pytest.fixture(scope="module")
def inspector_cli() -> None:
    """Installs the Inspector into npm's cache on first use (about 10 s here), or skips saying why."""
    if shutil.which("npx") is None:
        pytest.skip("no npx (Node.js) on this machine: the MCP Inspector cannot run")
    try:
        installed = inspector("--help")
    except subprocess.TimeoutExpired:
        pytest.skip(f"npx could not install {INSPECTOR} within 120 s")
    if installed.returncode != 0:
        pytest.skip(f"npx could not install {INSPECTOR}: {installed.stderr.strip().splitlines()[-1:]}")


def test_the_mcp_inspector_lists_and_calls_the_tools(inspector_cli: None, tiny_daemon: TinyDaemon) -> None:
    bridge = [sys.executable, str(REPO / "worker.py"), "--mcp", "--port", str(tiny_daemon.port)]
    listed = inspector(*bridge, "--method", "tools/list")
    assert listed.returncode == 0, listed.stderr
    tools = json.loads(listed.stdout)["tools"]
    assert [tool["name"] for tool in tools] == list(worker.JOBS)
    assert all(tool["annotations"]["readOnlyHint"] for tool in tools)
    called = inspector(
        *bridge,
        "--method",
        "tools/call",
        "--tool-name",
        "notification",
        "--tool-arg",
        "input=The nightly backup finished at 03:12; two files were skipped.",
    )
    assert called.returncode == 0, called.stderr
    result = json.loads(called.stdout)
    assert result["isError"] is False and result["structuredContent"]["job"] == "notification"
    refused = inspector(
        *bridge,
        "--method",
        "tools/call",
        "--tool-name",
        "title",
        "--tool-arg",
        "input=x",
        "--tool-arg",
        "max_new_tokens=9999",
    )
    assert refused.returncode == 5, refused.stderr  # the Inspector's exit code for an isError result
    refusal = json.loads(refused.stdout)
    assert refusal["isError"] is True and refusal["content"][0]["text"].startswith("invalid_request: ")


# --------------------------------------------------------------------------------------------------
# Claude Code itself (Node, from npm): README's `claude mcp add` stores the bridge, and
# `claude mcp get` starts it and reports it connected
# --------------------------------------------------------------------------------------------------

CLAUDE_CODE = "@anthropic-ai/claude-code@2.1.197"


def test_claude_code_adds_the_bridge_and_connects_to_it(tiny_daemon: TinyDaemon, tmp_path: Path) -> None:
    if shutil.which("npx") is None:
        pytest.skip("no npx (Node.js) on this machine: Claude Code cannot run")
    script = install_console_script(tmp_path)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "claude").write_text(f'#!/bin/sh\nexec npx -y {CLAUDE_CODE} "$@"\n')
    (shims / "claude").chmod(0o755)
    env = agent_env(tmp_path, PATH=f"{shims}{os.pathsep}{os.environ.get('PATH', '')}",
                    OV_GENAI_NPU_PORT=str(tiny_daemon.port))
    try:
        installed = run_agent(["claude", "--version"], env, tmp_path, 180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npx could not install {CLAUDE_CODE} within 180 s")
    if installed.returncode != 0:
        pytest.skip(f"npx could not install {CLAUDE_CODE}: {installed.stderr.strip().splitlines()[-1:]}")
    added = run_agent(["bash", "-c", AGENT_COMMANDS[0]], env, tmp_path, 120)
    assert added.returncode == 0, added.stderr
    stored = json.loads((tmp_path / ".claude.json").read_text())["mcpServers"]["npu-worker"]
    assert (stored["command"], stored["args"]) == (str(script), ["--mcp"])
    got = run_agent(["claude", "mcp", "get", "npu-worker"], env, tmp_path, 120)
    assert got.returncode == 0, got.stderr
    assert "Status: ✔ Connected" in got.stdout, got.stdout


# Codex CLI (npm, pinned) reads README's TOML as its own configuration.  It has no command that
# connects to a server without a model session, so what it shows is the configuration it took.
CODEX = "@openai/codex@0.171.0"


def test_codex_reads_the_toml_as_its_configuration(tmp_path: Path) -> None:
    if shutil.which("npx") is None:
        pytest.skip("no npx (Node.js) on this machine: Codex cannot run")
    script = install_console_script(tmp_path)
    config = tmp_path / ".codex" / "config.toml"
    config.parent.mkdir()
    config.write_text(BLOCKS["toml"].replace(PLACEHOLDER_HOME, str(tmp_path)))
    env = agent_env(tmp_path)
    try:
        listed = run_agent(["npx", "-y", CODEX, "mcp", "list", "--json"], env, tmp_path, 180)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npx could not install {CODEX} within 180 s")
    if listed.returncode != 0 and "npm" in listed.stderr and "ERR" in listed.stderr:
        pytest.skip(f"npx could not install {CODEX}: {listed.stderr.strip().splitlines()[-1:]}")
    assert listed.returncode == 0, listed.stderr
    (server,) = json.loads(listed.stdout[listed.stdout.index("[") :])
    assert (server["name"], server["enabled"]) == ("npu-worker", True)
    assert (server["transport"]["command"], server["transport"]["args"]) == (str(script), ["--mcp"])
    assert server["tool_timeout_sec"] == 180
