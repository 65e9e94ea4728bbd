"""Every option a service may need has an environment variable that works, and the unit's env example
lists it: a systemd user service is configured through its env file, not by editing the unit.

The parser is walked, not a list kept here, so an option added later fails this file until it has
its variable (or is named below as not a service option, with the reason).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import worker
from conftest import REPO

ENV_EXAMPLE = REPO / "systemd" / "openvino-genai-npu-worker.env.example"
CONTRACT = REPO / "CONTRACT.md"
VARIABLE_IN_HELP = re.compile(r"\[(OV_GENAI_NPU_[A-Z0-9_]+)(?:=1)?\]")

# Options that are not service options: they pick a one-shot mode or shape its output, and a
# daemon started by systemd never takes them.
NOT_SERVICE_OPTIONS = {
    "--help": "prints the help",
    "--version": "prints the version",
    "--demo": "the demo model from a pip package, for a first try; a service names its model",
    "--job": "one-shot mode",
    "--input": "one-shot mode's input",
    "--input-file": "one-shot mode's input",
    "--max-new-tokens": "one-shot mode's budget (a request field over HTTP)",
    "--truncate": "one-shot mode (a request field over HTTP)",
    "--output": "one-shot mode's output format",
    "--batch": "batch mode",
    "--doctor": "host check",
    "--json": "the doctor's output format",
    "--mcp": "an MCP server on stdio, started by an agent, not by systemd",
}


def parser_options() -> list[argparse.Action]:
    return [action for action in worker.build_parser({})._actions if action.option_strings]


def flag_of(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)  # --help, not -h


def service_options() -> list[argparse.Action]:
    return [action for action in parser_options() if flag_of(action) not in NOT_SERVICE_OPTIONS]


def variable_of(action: argparse.Action) -> str | None:
    match = VARIABLE_IN_HELP.search(action.help or "")
    return match.group(1) if match else None


def what_to_add(flag: str) -> str:
    variable = "OV_GENAI_NPU_" + flag.lstrip("-").upper().replace("-", "_")
    return (
        f"{flag} has no environment variable. Add one: read it in worker.build_parser with "
        f'default=env("{variable}") (env_int/env_float for numbers, env_flag(environ, "{variable}") for a '
        f"store_true flag), end the option's help with [{variable}], add a commented "
        f"'#{variable}=<default>' line to systemd/openvino-genai-npu-worker.env.example and a row to "
        f"CONTRACT.md's Options table. If {flag} is not a service option, add it to NOT_SERVICE_OPTIONS "
        "in tests/test_env_options.py with the reason."
    )


def sample_value(action: argparse.Action) -> str:
    """A value for the variable that parses to something other than the option's default."""
    if isinstance(action, argparse._StoreTrueAction):
        return "yes"
    if action.choices:
        return next(str(choice) for choice in action.choices if choice != action.default)
    if action.type is int:
        return "3" if action.default != 3 else "5"
    if action.type is float:
        return "0.5" if action.default != 0.5 else "0.25"
    if action.dest == "host":
        return "localhost"
    return "/tmp/env-option-check"


@pytest.mark.parametrize("action", service_options(), ids=flag_of)
def test_every_service_option_has_a_variable_that_works(action: argparse.Action) -> None:
    flag = flag_of(action)
    variable = variable_of(action)
    assert variable is not None, what_to_add(flag)
    value = sample_value(action)
    unset = getattr(worker.build_parser({}).parse_args([]), action.dest)
    parsed = getattr(worker.build_parser({variable: value}).parse_args([]), action.dest)
    assert parsed != unset, f"{variable}={value} did not change {flag}: read it in worker.build_parser"


@pytest.mark.parametrize("action", service_options(), ids=flag_of)
def test_every_service_variable_is_in_the_env_example_and_the_contract(action: argparse.Action) -> None:
    variable = variable_of(action)
    assert variable is not None, what_to_add(flag_of(action))
    example = ENV_EXAMPLE.read_text()
    assert re.search(rf"^#{variable}=", example, re.MULTILINE), (
        f"add a commented '#{variable}=<default>' line (with a comment if it needs one) to "
        "systemd/openvino-genai-npu-worker.env.example"
    )
    assert f"| `{variable}` |" in CONTRACT.read_text(), f"add {variable} to CONTRACT.md's Options table"


def test_the_allow_list_names_only_options_that_are_not_service_options() -> None:
    """A mode option that took a variable after all should leave the list (or lose the variable)."""
    for action in parser_options():
        if flag_of(action) in NOT_SERVICE_OPTIONS:
            assert variable_of(action) is None, (
                f"{flag_of(action)} has a variable: drop it from NOT_SERVICE_OPTIONS"
            )


BOOLEAN_VARIABLES = [
    variable_of(action) for action in service_options() if isinstance(action, argparse._StoreTrueAction)
]


@pytest.mark.parametrize("variable", BOOLEAN_VARIABLES)
def test_boolean_variables_take_the_usual_words_and_refuse_anything_else(variable: str) -> None:
    for word in (*worker.TRUE_WORDS, "TRUE", "Yes", " on "):
        assert worker.env_flag({variable: word}, variable) is True, word
    for word in (*worker.FALSE_WORDS, "False", "OFF", ""):
        assert worker.env_flag({variable: word}, variable) is False, word
    with pytest.raises(worker.ConfigError) as refused:
        worker.env_flag({variable: "enabled"}, variable)
    assert (
        refused.value.message.startswith(f"{variable}='enabled' is not a boolean")
        and "\n" not in refused.value.message
    )


def test_a_bad_variable_is_one_line_naming_it_and_exit_78(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for variable, value, expected in (
        ("OV_GENAI_NPU_EMULATE", "maybe", "OV_GENAI_NPU_EMULATE='maybe' is not a boolean"),
        ("OV_GENAI_NPU_QUEUE_DEPTH", "eight", "OV_GENAI_NPU_QUEUE_DEPTH='eight' is not an integer"),
        ("OV_GENAI_NPU_REQUEST_TIMEOUT_S", "2min", "OV_GENAI_NPU_REQUEST_TIMEOUT_S='2min' is not a number"),
    ):
        monkeypatch.setenv(variable, value)
        assert worker.main(["--doctor", "--json"]) == worker.EXIT_CONFIG
        out = capsys.readouterr()
        assert (
            out.out == ""
            and out.err == f"worker.py: configuration: {expected}" + out.err.split(expected, 1)[1]
        )
        assert out.err.count("\n") == 1
        monkeypatch.delenv(variable)


def test_emulate_true_is_no_longer_silently_ignored(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OV_GENAI_NPU_EMULATE", "true")
    assert worker.build_parser(dict(worker.os.environ)).parse_args([]).emulate_npu is True
    import smoke_llm_npu

    assert smoke_llm_npu.build_parser().parse_args([]).emulate_npu is True
