"""The systemd user unit in systemd/, and the README commands that install it.

What runs here:
- The README's install commands, verbatim, in a throwaway HOME and a copy of the checkout (so no
  build/ or *.egg-info appears in the working tree). pip is told, through its environment, not to
  install dependencies (PIP_NO_DEPS): openvino-genai is tested elsewhere, and what the unit needs
  from this install is the console script that pip generates from pyproject.toml.
- `systemd-analyze verify --user` on the unit exactly as installed. verify checks that ExecStart=
  is an executable file; it is one because the README's own venv command made it, not because the
  test planted a stand-in or rewrote the path. A deliberately broken copy shows verify does flag
  problems, so "no complaints" means something.
- `systemd-analyze security --offline=yes`, whose exposure score must not regress.
- The unit's lifecycle settings against the worker's own constants and CONTRACT.md.

What cannot run here: anything that needs a live user manager (systemctl --user, journalctl
--user, loginctl). Those README commands are listed in NEEDS_USER_SESSION.

systemd-analyze tests are skipped where systemd-analyze is not installed; the rest run everywhere.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import worker
from conftest import REPO

UNIT_NAME = "openvino-genai-npu-worker.service"
UNIT = REPO / "systemd" / UNIT_NAME
ENV_EXAMPLE = REPO / "systemd" / "openvino-genai-npu-worker.env.example"
CONTRACT = REPO / "CONTRACT.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# `systemd-analyze security --offline=yes` on this unit scores 5.3 with systemd 252. It cannot
# reach the usual 3.0 honestly: about 2.5 of it is capabilities and "runs as root", which the tool
# assumes for every unit but a user service never has, and the settings it would want
# (CapabilityBoundingSet=, ProtectKernelModules=, ...) make a user unit fail with 218/CAPABILITIES
# wherever user namespaces are restricted (the unit's header has the details). This only stops
# regressions.
EXPOSURE_THRESHOLD = 5.3

# README.md, "Running as a service": run here, in this order, with HOME set to a temporary directory.
INSTALL_COMMANDS = [
    ("python3 -m venv ~/.local/share/openvino-genai-npu-worker/venv && "
     "~/.local/share/openvino-genai-npu-worker/venv/bin/pip install ."),
    "install -Dm644 -t ~/.local/share/openvino-genai-npu-worker README.md CONTRACT.md",
    "install -Dm644 -t ~/.config/systemd/user systemd/openvino-genai-npu-worker.service",
    ('install -Dm600 systemd/openvino-genai-npu-worker.env.example ~/.config/openvino-genai-npu-worker/env && '
     'echo "OV_GENAI_NPU_MODEL=$HOME/models/Qwen2.5-1.5B-Instruct-int4-ov" >> ~/.config/openvino-genai-npu-worker/env'),
]
# README.md, "Running as a service": the installed smoke test, run by test_installed_smoke_test_runs.
INSTALLED_SMOKE_COMMAND = "~/.local/share/openvino-genai-npu-worker/venv/bin/openvino-genai-npu-smoke"
# README.md, "Running as a service": the commands no test can run.
NEEDS_USER_SESSION = {
    "systemctl --user daemon-reload && systemctl --user enable --now openvino-genai-npu-worker.service":
        "needs a running systemd user manager",
    "systemctl --user status openvino-genai-npu-worker.service": "needs a running systemd user manager",
    "journalctl --user -u openvino-genai-npu-worker.service -f": "needs journald and a user manager",
    "loginctl enable-linger": "needs systemd-logind; changes the host",
    ("readlink /proc/self/ns/mnt "
     "/proc/$(systemctl --user show -p MainPID --value openvino-genai-npu-worker.service)/ns/mnt"):
        "needs the running service",
}
SERVICE_COMMANDS = INSTALL_COMMANDS + [INSTALLED_SMOKE_COMMAND] + list(NEEDS_USER_SESSION)
README_SECTION = "Running as a service"

# Settings that a user manager cannot apply: they drop capabilities (218/CAPABILITIES without a
# usable user namespace), hide /dev/accel (PrivateDevices=) or are silently ignored (BPF-based).
NOT_FOR_A_USER_UNIT = (
    "CapabilityBoundingSet", "DeviceAllow", "DevicePolicy", "IPAddressAllow", "IPAddressDeny",
    "MemoryDenyWriteExecute", "PrivateDevices", "ProtectClock", "ProtectKernelLogs",
    "ProtectKernelModules", "User", "DynamicUser",
)

TIME_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


# --------------------------------------------------------------------------------------------------
# Reading the unit
# --------------------------------------------------------------------------------------------------


def unit_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in file order; repeated keys are kept, as systemd keeps them."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None and "=" in line, f"not a unit line: {raw!r}"
        assert not line.endswith("\\"), "continuation lines are not used in this unit"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


SECTIONS = unit_sections(UNIT.read_text())
SERVICE = SECTIONS["Service"]


def values(key: str, section: list[tuple[str, str]] = SERVICE) -> list[str]:
    return [value for name, value in section if name == key]


def value(key: str, section: list[tuple[str, str]] = SERVICE) -> str:
    (found,) = values(key, section)
    return found


def timespan_s(text: str) -> float:
    """A systemd time span ("5min", "150s", "1min 30s"; a bare number is seconds)."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text)
    assert parts and re.fullmatch(r"(\s*\d+(\.\d+)?\s*[a-z]*)+\s*", text), f"not a time span: {text!r}"
    return sum(float(number) * TIME_UNITS_S[unit or "s"] for number, unit in parts)


def environment() -> dict[str, str]:
    """The unit's Environment= assignments (shell-style quoting, as systemd.exec(5) describes)."""
    found = {}
    for line in values("Environment"):
        for word in shlex.split(line):
            name, _, setting = word.partition("=")
            found[name] = setting
    return found


def env_example_names() -> dict[str, str]:
    """Every VAR=value in the example, commented out or not."""
    found = {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", raw.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def specifiers(home: Path, runtime_dir: Path) -> dict[str, str]:
    """The unit's specifiers as a user manager resolves them (systemd.unit(5), "Specifiers")."""
    return {"%h": str(home), "%C": str(home / ".cache"), "%E": str(home / ".config"), "%t": str(runtime_dir)}


def resolve(text: str, table: dict[str, str]) -> str:
    return re.sub(r"%[a-zA-Z%]", lambda m: "%" if m.group(0) == "%%" else table[m.group(0)], text)


def console_scripts() -> dict[str, str]:
    text = (REPO / "pyproject.toml").read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        return dict(tomllib.loads(text)["project"]["scripts"])
    block = re.search(r"^\[project\.scripts\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    assert block, "pyproject.toml has no [project.scripts]"
    return dict(re.findall(r'^([\w.-]+)\s*=\s*"([^"]+)"', block.group(1), re.MULTILINE))


def readme_service_commands() -> list[str] | None:
    """The sh lines of README.md's service section, or None while the section does not exist."""
    text = (REPO / "README.md").read_text()
    section = re.search(rf"^## {README_SECTION}\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    if section is None:
        return None
    blocks = re.findall(r"^```sh\n(.*?)^```", section.group(1), re.MULTILINE | re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------
# The unit itself
# --------------------------------------------------------------------------------------------------


def test_lifecycle_matches_the_worker() -> None:
    assert value("Type") == "notify"
    assert value("NotifyAccess") == "main"  # READY/STATUS/WATCHDOG come from the worker process itself
    assert timespan_s(value("WatchdogSec")) > 0
    # The worker extends the start timeout while it loads; this is the floor for a cold NPU compile.
    assert timespan_s(value("TimeoutStartSec")) >= 300
    # SIGTERM drains for at most --request-timeout-s + DRAIN_MARGIN_S; the stop timeout must not cut it.
    assert timespan_s(value("TimeoutStopSec")) > worker.DEFAULT_REQUEST_TIMEOUT_S + worker.DRAIN_MARGIN_S
    assert value("Restart") == "on-failure"
    prevented = value("RestartPreventExitStatus").split()
    assert str(worker.EXIT_CONFIG) in prevented and str(worker.EXIT_USAGE) in prevented
    assert str(worker.EXIT_BUSY) not in prevented  # a busy NPU is worth another try
    unit_section = SECTIONS["Unit"]
    assert int(value("StartLimitBurst", unit_section)) > 1
    assert timespan_s(value("StartLimitIntervalSec", unit_section)) > 0
    assert value("LimitCORE") == "0"


def test_directories_match_the_worker_defaults() -> None:
    assert value("RuntimeDirectory") == worker.LOCK_DIR_NAME
    assert value("RuntimeDirectoryPreserve") == "yes"  # the shared lock file's directory outlives us
    assert value("RuntimeDirectoryMode") == "0700"
    assert value("CacheDirectory").split()[0] == worker.LOCK_DIR_NAME
    assert value("CacheDirectoryMode") == "0700"
    assert value("UMask") == "0077"


def test_no_setting_a_user_unit_cannot_apply() -> None:
    present = {key for key, _ in SERVICE}
    assert not present & set(NOT_FOR_A_USER_UNIT)
    assert value("PrivateUsers") == "yes"  # what makes the namespacing settings work in a user unit


def test_directives_are_alphabetical_within_each_group() -> None:
    """House style: groups separated by blank lines, directives sorted inside a group."""
    text = UNIT.read_text()
    for block in re.split(r"\n\s*\n", text):
        keys = [line.split("=", 1)[0] for line in block.splitlines() if line and line[0] not in "#;[" and "=" in line]
        assert keys == sorted(keys), f"not alphabetical: {keys}"


def test_exec_start_is_the_console_script() -> None:
    scripts = console_scripts()
    (name,) = [script for script, target in scripts.items() if target == "worker:main"]
    assert value("ExecStart") == f"%h/.local/share/openvino-genai-npu-worker/venv/bin/{name}"
    assert "~/.local/share/openvino-genai-npu-worker/venv/bin/pip install ." in INSTALL_COMMANDS[0]


def test_every_variable_is_one_the_worker_documents() -> None:
    contract = CONTRACT.read_text()
    documented = set(re.findall(r"^\| `--(?:[^|\\]|\\.)*\| `(OV_GENAI_NPU_[A-Z_]+)` \|", contract, re.MULTILINE))
    assert documented, "CONTRACT.md has no options table with environment variables"
    names = set(environment()) | set(env_example_names())
    for name in names:
        if name.startswith("OV_GENAI_NPU_"):
            assert name in documented, f"{name} is not in CONTRACT.md's options table"
        else:
            assert f"${name}" in contract, f"{name} is not mentioned in CONTRACT.md"
    assert documented <= set(env_example_names()), "the env example should show every worker variable"


def test_environment_defaults_are_the_worker_defaults() -> None:
    env = environment()
    assert env["OV_GENAI_NPU_HOST"] == worker.DEFAULT_HOST
    assert env["OV_GENAI_NPU_PORT"] == str(worker.DEFAULT_PORT)
    assert env["XDG_CACHE_HOME"] == "%C"  # the worker's default cache root = CacheDirectory='s root
    assert "OV_GENAI_NPU_CACHE" not in env  # so the service shares its cache with the CLI
    example = env_example_names()
    assert example["OV_GENAI_NPU_HOST"] == worker.DEFAULT_HOST
    assert example["OV_GENAI_NPU_PORT"] == str(worker.DEFAULT_PORT)


def test_env_example_is_all_comments() -> None:
    """The README appends the one required line; everything in the example is a commented default."""
    for raw in ENV_EXAMPLE.read_text().splitlines():
        assert not raw.strip() or raw.startswith("#"), f"active line in the example: {raw!r}"


def test_env_file_is_optional_and_its_absence_is_not_restarted() -> None:
    (env_file,) = values("EnvironmentFile")
    assert env_file.startswith("-"), "a missing env file should reach the worker (exit 78), not fail the unit"


# --------------------------------------------------------------------------------------------------
# The README's install commands, in a throwaway HOME
# --------------------------------------------------------------------------------------------------


def test_readme_section_is_what_this_file_runs() -> None:
    commands = readme_service_commands()
    if commands is None:
        pytest.skip(f'README.md has no "{README_SECTION}" section yet')
    assert commands == SERVICE_COMMANDS


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """HOME after the README's install commands ran in it, from a copy of the checkout."""
    root = tmp_path_factory.mktemp("service")
    home, src, runtime_dir = root / "home", root / "src", root / "run"
    home.mkdir()
    runtime_dir.mkdir(mode=0o700)
    src.mkdir()
    for name in ("pyproject.toml", "worker.py", "smoke_llm_npu.py", "README.md", "CONTRACT.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "systemd", src / "systemd")
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"],
        "LANG": "C.UTF-8",
        "PIP_NO_DEPS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        # The build backend (setuptools) still comes from the index; keep the caller's pip cache.
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip"),
    }
    for command in INSTALL_COMMANDS:
        completed = subprocess.run(["bash", "-c", command], cwd=src, env=env, check=False, capture_output=True,
                                   text=True, timeout=600)
        assert completed.returncode == 0, f"{command}\n{completed.stdout}\n{completed.stderr}"
    yield {"home": home, "runtime_dir": runtime_dir, "unit": home / ".config" / "systemd" / "user" / UNIT_NAME}


def test_install_puts_every_file_where_the_unit_looks(installed: dict[str, Path]) -> None:
    table = specifiers(installed["home"], installed["runtime_dir"])
    unit = installed["unit"]
    assert unit.read_text() == UNIT.read_text()
    executable = Path(resolve(value("ExecStart"), table))
    assert executable.is_file() and os.access(executable, os.X_OK)
    for uri in value("Documentation", SECTIONS["Unit"]).split():
        assert uri.startswith("file:") and Path(resolve(uri[len("file:"):], table)).is_file(), uri
    env_file = Path(resolve(value("EnvironmentFile").lstrip("-"), table))
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    active = [line for line in env_file.read_text().splitlines() if line and not line.startswith("#")]
    assert active == [f"OV_GENAI_NPU_MODEL={installed['home']}/models/Qwen2.5-1.5B-Instruct-int4-ov"]


def test_installed_worker_writes_only_where_the_unit_allows(installed: dict[str, Path]) -> None:
    """With the unit's environment, the worker's default cache and lock paths fall inside
    CacheDirectory= and RuntimeDirectory=, the only writable places under ProtectHome=/ProtectSystem=."""
    table = specifiers(installed["home"], installed["runtime_dir"])
    environ = {name: resolve(setting, table) for name, setting in environment().items()}
    env_file = Path(resolve(value("EnvironmentFile").lstrip("-"), table))
    for line in env_file.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, setting = line.partition("=")
            environ[name] = setting
    environ["XDG_RUNTIME_DIR"] = str(installed["runtime_dir"])
    parser = worker.build_parser(environ)
    settings = worker.settings_from_args(parser.parse_args([]), environ)
    cache_dirs = [Path(table["%C"]) / name for name in value("CacheDirectory").split()]
    assert any(settings.cache_dir.is_relative_to(directory) for directory in cache_dirs)
    assert settings.lock_path.parent == installed["runtime_dir"] / value("RuntimeDirectory")


def test_installed_worker_without_env_file_exits_with_a_code_that_is_not_restarted(installed: dict[str, Path]) -> None:
    table = specifiers(installed["home"], installed["runtime_dir"])
    environ = {name: resolve(setting, table) for name, setting in environment().items()}
    environ |= {
        "HOME": str(installed["home"]),
        "PATH": os.environ["PATH"],
        "XDG_RUNTIME_DIR": str(installed["runtime_dir"]),
    }
    completed = subprocess.run([resolve(value("ExecStart"), table)], env=environ, check=False, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == worker.EXIT_CONFIG
    assert "no model" in completed.stderr
    assert str(completed.returncode) in value("RestartPreventExitStatus").split()


# --------------------------------------------------------------------------------------------------
# systemd-analyze
# --------------------------------------------------------------------------------------------------

needs_systemd_analyze = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as runtime_dir:  # verify --user wants an XDG_RUNTIME_DIR
        env = {
            "HOME": str(home),
            "PATH": os.environ["PATH"],
            "XDG_RUNTIME_DIR": runtime_dir,
            "SYSTEMD_PAGER": "",
            "LANG": "C.UTF-8",
        }
        return subprocess.run([SYSTEMD_ANALYZE, *args], env=env, check=False, capture_output=True, text=True,
                              timeout=120)


@needs_systemd_analyze
def test_verify_finds_nothing_to_complain_about(installed: dict[str, Path]) -> None:
    completed = analyze("verify", "--user", str(installed["unit"]), home=installed["home"])
    complaints = [line for line in completed.stderr.splitlines() if "openvino-genai-npu-worker" in line]
    assert completed.returncode == 0 and not complaints, completed.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("change,complaint", [
    (("venv/bin/openvino-genai-npu-worker", "venv/bin/no-such-script"), "is not executable"),
    (("PrivateUsers=yes", "PrivateUser=yes"), "Unknown key 'PrivateUser'"),
], ids=["missing ExecStart", "misspelt directive"])
def test_verify_does_complain_about_a_broken_copy(
    installed: dict[str, Path], change: tuple[str, str], complaint: str
) -> None:
    broken = installed["unit"].with_name("broken-worker.service")
    broken.write_text(UNIT.read_text().replace(*change))
    try:
        completed = analyze("verify", "--user", str(broken), home=installed["home"])
    finally:
        broken.unlink()
    assert complaint in completed.stderr


@needs_systemd_analyze
def test_exposure_score_does_not_regress(installed: dict[str, Path]) -> None:
    completed = analyze("security", "--offline=yes", "--no-pager", str(installed["unit"]), home=installed["home"])
    match = re.search(rf"Overall exposure level for {re.escape(UNIT_NAME)}: (\d+\.\d+)", completed.stdout)
    assert match, completed.stdout + completed.stderr
    assert float(match.group(1)) <= EXPOSURE_THRESHOLD


def test_installed_smoke_test_runs_without_the_source_tree(installed: dict[str, Path]) -> None:
    """README's check of an installed service: the console scripts pip installed, run from their
    venv (given this interpreter's OpenVINO: the install here has no dependencies), decide like
    the source tree's smoke test: no NPU on this host, so SKIP and exit 77."""
    import openvino

    # Only OpenVINO and numpy from this interpreter: its site-packages may hold a worker.py too.
    site_packages = Path(openvino.__file__).parent.parent
    borrowed = installed["home"] / "borrowed-site-packages"
    borrowed.mkdir(exist_ok=True)
    for entry in site_packages.iterdir():
        if entry.name.startswith(("openvino", "numpy")) and not (borrowed / entry.name).exists():
            (borrowed / entry.name).symlink_to(entry)
    venv_bin = installed["home"] / ".local" / "share" / "openvino-genai-npu-worker" / "venv" / "bin"
    env = {"HOME": str(installed["home"]), "PATH": os.environ["PATH"], "LANG": "C.UTF-8",
           "PYTHONPATH": str(borrowed),
           "OV_GENAI_NPU_MODEL": str(REPO / "tests" / "fixtures" / "tiny-chatml-ov")}
    for script in ("openvino-genai-npu-worker", "openvino-genai-npu-smoke"):
        completed = subprocess.run([str(venv_bin / script), "--version"], env=env, check=False,
                                   capture_output=True, text=True, timeout=60)
        assert completed.stdout == f"{script} {worker.__version__}\n", completed.stderr
    completed = subprocess.run(["bash", "-c", INSTALLED_SMOKE_COMMAND], cwd=installed["home"], env=env,
                               check=False, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 77, completed.stderr
    assert completed.stderr.splitlines()[-1].startswith("smoke_llm_npu.py: SKIP: OpenVINO sees no NPU")
