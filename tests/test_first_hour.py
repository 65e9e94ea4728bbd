"""What a new user meets in the first hour: every message names its cause and its fix.

The doctor as a checklist, the device before the busy counter, messages that name what they are
about, one convention for where configuration errors go, logs a journal and a logfmt parser can
live with, and the script-friendly outputs (``--output text``, batch progress, the smoke verdict).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import smoke_llm_npu
import worker
from conftest import TINY_MODEL
from conftest import FakeNpuPipeline
from conftest import cpu_settings


def cpu_cli(tmp_path: Path, *args: str) -> list[str]:
    return [
        "--model",
        str(TINY_MODEL),
        "--device",
        "CPU",
        "--lock-file",
        str(tmp_path / "l" / "npu.lock"),
        *args,
    ]


def fake_factory(settings: worker.Settings) -> FakeNpuPipeline:
    return FakeNpuPipeline(settings)


# --- the doctor as a checklist ---------------------------------------------------------------------


def test_doctor_without_a_model_reports_it_as_one_failed_line_among_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OV_GENAI_NPU_MODEL", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-home"))
    code = worker.main(
        ["--doctor", "--device", "CPU", "--lock-file", str(tmp_path / "l" / "npu.lock"), "--port", "0"]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == worker.EXIT_CONFIG
    names = [
        line.split(":")[0].split(maxsplit=1)[1] for line in out if not line.startswith(("      ", "doctor:"))
    ]
    # checks another feature appends (an MCP check, say) come after these
    assert names[:6] == ["openvino", "device", "model", "cache dir", "lock", "port"]
    assert "FAIL  model: no model given" in out
    assert "export OV_GENAI_NPU_MODEL=" in out[out.index("FAIL  model: no model given") + 1]
    assert out[-1] == "doctor: cannot serve: model"
    assert not (tmp_path / "cache-home").exists()  # nothing created for a model that is not there


def test_doctor_creates_no_cache_directory_for_a_model_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "not-yet" / "cache"
    assert worker.main(cpu_cli(tmp_path, "--doctor", "--cache-dir", str(cache), "--port", "0")) == 0
    assert (
        f"ok    cache dir: {cache} will be created at the first load ({tmp_path} is writable)"
        in capsys.readouterr().out
    )
    assert not cache.parent.exists()


def test_cache_check_fails_when_a_file_is_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    check = worker.cache_dir_check(tmp_path / "file" / "cache")
    assert not check.ok and "is not a directory" in check.detail


def test_doctor_json_is_one_object_with_every_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert worker.main(cpu_cli(tmp_path, "--doctor", "--json", "--port", "0")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (
        report["ok"] is True
        and report["verdict"] == "this host can serve"
        and report["version"] == worker.__version__
    )
    assert [check["name"] for check in report["checks"]][:6] == [
        "openvino",
        "device",
        "model",
        "cache dir",
        "lock",
        "port",
    ]
    assert {check["status"] for check in report["checks"]} <= {"ok", "warn", "fail"}
    assert set(report["checks"][0]) == {"name", "status", "detail", "fix"}


def test_json_without_doctor_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--json"]) == worker.EXIT_USAGE
    assert "--json is for --doctor" in capsys.readouterr().err


def test_port_check_names_the_worker_that_serves_there(start_server, tmp_path: Path) -> None:
    server = start_server()
    settings = dataclasses.replace(cpu_settings(tmp_path), port=server.server_port)
    check = worker.port_check(settings)
    assert check.ok and not check.warning
    assert (
        f"is served by openvino-genai-npu-worker {worker.__version__} (ok, model tiny-chatml-ov)"
        in check.detail
    )


def test_port_check_names_the_worker_even_when_it_wants_a_token(start_server, tmp_path: Path) -> None:
    server = start_server(token="s3cret")
    settings = dataclasses.replace(cpu_settings(tmp_path), port=server.server_port)
    assert (
        "is served by openvino-genai-npu-worker (HTTP 401: its version needs the token)"
        in worker.port_check(settings).detail
    )
    with_token = dataclasses.replace(settings, token="s3cret")
    assert f"openvino-genai-npu-worker {worker.__version__}" in worker.port_check(with_token).detail


def test_port_check_fails_for_another_program_on_the_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()  # accepts, never answers: the probe times out and says nothing
        settings = dataclasses.replace(cpu_settings(tmp_path), port=other.getsockname()[1])
        check = worker.port_check(settings)
    assert not check.ok and "ss -ltnp" in check.fix


# --- the device before the busy counter --------------------------------------------------------------


def test_no_npu_is_named_before_the_busy_counter_with_the_three_ways_on(tmp_path: Path) -> None:
    settings = worker.Settings(model_path=TINY_MODEL, device="NPU", lock_path=tmp_path / "npu.lock")
    with pytest.raises(worker.ConfigError) as missing:
        worker.require_device(settings, lambda: ["CPU"])
    message = missing.value.message
    assert message.startswith("no NPU: OpenVINO sees only ['CPU']")
    for way in ("--demo", "--device CPU", "--emulate-npu", "--doctor"):
        assert way in message
    worker.require_device(settings, lambda: ["CPU", "NPU"])  # present: nothing to say
    worker.require_device(dataclasses.replace(settings, emulate_npu=True), lambda: ["CPU"])  # needs none


def test_the_daemon_without_an_npu_says_no_npu_not_busy_counter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("openvino_genai")
    code = worker.main(["--model", str(TINY_MODEL), "--lock-file", str(tmp_path / "npu.lock"), "--port", "0"])
    err = capsys.readouterr().err
    assert (
        code == worker.EXIT_CONFIG
        and err.startswith("worker.py: configuration: no NPU:")
        and "busy counter" not in err
    )


@pytest.mark.parametrize("release,blamed", [("6.18.44-fc-v1045", "device"), ("6.8.0-45-generic", "kernel")])
def test_the_doctor_blames_the_kernel_for_a_missing_counter_only_when_it_is_older_than_6_11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, release: str, blamed: str
) -> None:
    monkeypatch.setattr(worker, "kernel_release", lambda: release)
    settings = worker.Settings(model_path=TINY_MODEL, device="NPU", lock_path=tmp_path / "npu.lock")
    check = worker.busy_counter_check(settings, str(tmp_path / "no-accel" / "npu_busy_time_us"))
    assert not check.ok and release in check.detail
    if blamed == "kernel":
        assert check.fix == "boot Linux >= 6.11, or start with --no-npu-proof (OV_GENAI_NPU_NO_NPU_PROOF=1)"
    else:
        assert (
            "6.11 or later" in check.detail
            and check.fix == "get the NPU working first (see device and accel device)"
        )


# --- messages ------------------------------------------------------------------------------------------


def test_unknown_fields_are_named_when_they_look_like_field_names() -> None:
    with pytest.raises(worker.InvalidRequest) as refused:
        worker.validate_job_request({"job": "title", "input": "x", "max_tokens": 5}, worker.Limits())
    assert (
        refused.value.message
        == "unknown field: 'max_tokens'; allowed: input, job, max_new_tokens, timeout_s, truncate"
    )


def test_unknown_fields_that_could_be_input_are_counted_not_echoed() -> None:
    body = {"input": "x", "prompt": 1, "My secret text": 2, "x" * 40: 3}
    with pytest.raises(worker.InvalidRequest) as refused:
        worker.validate_job_request(body, worker.Limits(), job="title")
    message = refused.value.message
    assert message.startswith("unknown fields: 'prompt' and 2 others (not shown); allowed: ")
    assert "secret" not in message and "xxxx" not in message


def test_404_points_at_the_openapi_document(start_server) -> None:
    server = start_server()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/v1/chat/completions", timeout=10)
    body = json.loads(missing.value.read())
    assert (
        missing.value.code == 404
        and body["error"]["message"] == "no such endpoint; GET /openapi.json lists them"
    )


def test_input_file_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "notes.txt"
    assert (
        worker.main(
            cpu_cli(tmp_path, "--job", "title", "--input-file", str(missing)), pipeline_factory=fake_factory
        )
        == 2
    )
    assert f"cannot read --input-file {missing}: No such file or directory" in capsys.readouterr().err
    missing.write_bytes(b"\xff\xfe")
    assert (
        worker.main(
            cpu_cli(tmp_path, "--job", "title", "--input-file", str(missing)), pipeline_factory=fake_factory
        )
        == 2
    )
    assert f"--input-file {missing} is not valid UTF-8" in capsys.readouterr().err


# --- one convention: a configuration error is one line on stderr, nothing on stdout ----------------


def test_a_configuration_error_leaves_stdout_empty_in_the_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["--device", "CPU", "--job", "title", "--input", "x"],  # no model at all
        cpu_cli(tmp_path, "--job", "title", "--input", "x", "--token-file", str(tmp_path / "none")),
    ):
        assert worker.main(argv) == worker.EXIT_CONFIG
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("worker.py: configuration: ") and out.err.count("\n") == 1


def test_a_configuration_error_at_model_load_leaves_stdout_empty_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuses(settings: worker.Settings) -> worker.Pipeline:
        raise worker.ConfigError("could not load the model")

    assert (
        worker.main(cpu_cli(tmp_path, "--job", "title", "--input", "x"), pipeline_factory=refuses)
        == worker.EXIT_CONFIG
    )
    assert capsys.readouterr().out == ""


def test_a_configuration_error_leaves_stdout_empty_in_the_smoke_test(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert smoke_llm_npu.main(["--device", "CPU", "--model", str(tmp_path / "nowhere")]) == worker.EXIT_CONFIG
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert out.out == "" and lines[0].startswith("smoke_llm_npu.py: configuration: model not found")
    assert lines[-1] == "smoke_llm_npu.py: FAIL: configuration (exit 78)"


def test_a_job_error_still_puts_its_error_body_on_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = cpu_cli(tmp_path, "--job", "title", "--input", "x" * 7000)
    assert worker.main(argv, pipeline_factory=fake_factory) == worker.EXIT_USAGE
    out = capsys.readouterr()
    assert json.loads(out.out)["error"]["type"] == "input_too_long" and out.err.startswith(
        "worker.py: input_too_long: "
    )


# --- logs ----------------------------------------------------------------------------------------------


def test_log_lines_are_logfmt_with_the_level_as_a_field() -> None:
    record = logging.LogRecord(worker.logger.name, logging.INFO, __file__, 1, "event=ready", None, None)
    assert worker.LogfmtFormatter(stamp=False).format(record) == "level=info event=ready"
    stamped = worker.LogfmtFormatter(stamp=True).format(record)
    assert stamped.startswith("ts=") and " level=info event=ready" in stamped
    foreign = logging.LogRecord("root", logging.WARNING, __file__, 1, "Failed to create %s", ("x y",), None)
    assert (
        worker.LogfmtFormatter(stamp=False).format(foreign)
        == 'level=warning logger=root msg="Failed to create x y"'
    )


def test_health_probes_are_debug_and_jobs_info(start_server, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server()
    base = f"http://127.0.0.1:{server.server_port}"
    with caplog.at_level(logging.DEBUG, logger=worker.logger.name):
        for path in ("/livez", "/healthz", "/models"):
            urllib.request.urlopen(base + path, timeout=10).read()
        request = urllib.request.Request(
            base + "/v1/worker/generate",
            data=b'{"job": "title", "input": "x"}',
            headers={"Content-Type": "application/json"},
        )
        urllib.request.urlopen(request, timeout=10).read()
    levels = {
        record.getMessage().split(" path=")[1].split()[0]: record.levelname
        for record in caplog.records
        if " path=" in record.getMessage()
    }
    assert levels == {
        "/livez": "DEBUG",
        "/healthz": "DEBUG",
        "/models": "INFO",
        "/v1/worker/generate": "INFO",
    }


# --- scripts: --output text, batch ----------------------------------------------------------------------


def test_output_text_prints_only_the_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = cpu_cli(tmp_path, "--job", "title", "--input", "Quarterly revenue", "--output", "text")
    assert worker.main(argv, pipeline_factory=fake_factory) == 0
    assert capsys.readouterr().out == "Quarterly revenue up twelve percent\n"


def test_output_text_prints_memory_candidates_one_a_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reply = '{"candidates":[{"text":"Lives in Lisbon"},{"text":"Prefers tea"}]}'
    argv = cpu_cli(tmp_path, "--job", "memory_candidate", "--input", "I moved to Lisbon", "--output", "text")
    assert worker.main(argv, pipeline_factory=lambda settings: FakeNpuPipeline(settings, reply=reply)) == 0
    assert capsys.readouterr().out == "Lives in Lisbon\nPrefers tea\n"


def test_output_text_error_is_on_stderr_only_with_the_same_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = cpu_cli(tmp_path, "--job", "title", "--input", "x" * 7000, "--output", "text")
    assert worker.main(argv, pipeline_factory=fake_factory) == worker.EXIT_USAGE
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("worker.py: input_too_long: ")


def test_output_needs_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--output", "text", "--doctor"]) == worker.EXIT_USAGE
    assert "--output needs --job" in capsys.readouterr().err


def test_an_empty_batch_loads_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loads: list[worker.Settings] = []
    path = tmp_path / "empty.jsonl"
    path.write_text("\n   \n")
    assert worker.main(cpu_cli(tmp_path, "--batch", str(path)), pipeline_factory=loads.append) == 0
    assert loads == [] and "batch: finished: 0 jobs: 0 done, 0 failed" in capsys.readouterr().err


def test_a_batch_of_only_bad_lines_loads_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loads: list[worker.Settings] = []
    path = tmp_path / "bad.jsonl"
    path.write_text('{"job": "nope"}\nnot json\n')
    assert (
        worker.main(cpu_cli(tmp_path, "--batch", str(path)), pipeline_factory=loads.append)
        == worker.EXIT_FAILED
    )
    err = capsys.readouterr().err
    assert (
        loads == []
        and "batch: 0 done, 2 failed" in err
        and "batch: finished: 2 jobs: 0 done, 2 failed" in err
    )


# --- the smoke test: --version and the verdict ---------------------------------------------------------


def test_both_programs_print_their_installed_name_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--version"]) == 0
    assert capsys.readouterr().out == f"openvino-genai-npu-worker {worker.__version__}\n"
    assert smoke_llm_npu.main(["--version"]) == 0
    assert capsys.readouterr().out == f"openvino-genai-npu-smoke {worker.__version__}\n"


def test_both_console_scripts_are_declared() -> None:
    import tomllib

    project = tomllib.loads((Path(worker.__file__).parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {
        "openvino-genai-npu-worker": "worker:main",
        "openvino-genai-npu-smoke": "smoke_llm_npu:main",
    }
    assert project["tool"]["setuptools"]["py-modules"] == ["worker", "smoke_llm_npu"]


def smoke_args(npu_settings: worker.Settings, busy_file: Path) -> list[str]:
    """The smoke test on the fake NPU: its model, its busy counter, a private lock."""
    return ["--model", str(npu_settings.model_path), "--busy-path", str(busy_file),
            "--lock-file", str(npu_settings.lock_path)]


def test_smoke_verdict_on_a_verified_npu(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=4242)
    assert smoke_llm_npu.main(smoke_args(npu_settings, busy_file), pipeline_factory=factory, has_npu=lambda: True) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert (report["finish_reason"], report["stop_rule"]) == ("stop", None)
    last = out.err.splitlines()[-1]
    assert last.startswith("smoke_llm_npu.py: PASS: the NPU ran it: fake-npu-model generated 5 tokens")
    assert last.endswith("busy counter +4242 us (ratio " + str(report["npu_busy_ratio"]) + ")")


def test_smoke_verdict_on_a_failed_proof(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=0)
    assert smoke_llm_npu.main(smoke_args(npu_settings, busy_file), pipeline_factory=factory, has_npu=lambda: True) == 3
    assert capsys.readouterr().err.splitlines()[-1] == "smoke_llm_npu.py: FAIL: npu_proof_failed (exit 3)"


def test_smoke_verdict_on_the_cpu_claims_nothing_about_the_npu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--device", "CPU", "--model", str(TINY_MODEL), "--lock-file", str(tmp_path / "npu.lock")]
    assert smoke_llm_npu.main(args, pipeline_factory=fake_factory) == 0
    assert (
        capsys.readouterr()
        .err.splitlines()[-1]
        .endswith("on the CPU plugin; nothing about the NPU was checked")
    )


def test_doctor_reports_a_bad_token_file_as_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    assert worker.main(cpu_cli(tmp_path, "--doctor", "--token-file", str(token), "--port", "0")) == 78
    out = capsys.readouterr().out.splitlines()
    (line,) = [line for line in out if line.startswith(("FAIL  token file", "ok    token file"))]
    assert line.startswith("FAIL  token file: ") and "readable by group or others" in line
    assert out[out.index(line) + 1] == f"      fix: chmod 600 {token}"
    assert out[-1] == "doctor: cannot serve: token file"
    token.chmod(0o600)
    assert worker.main(cpu_cli(tmp_path, "--doctor", "--token-file", str(token), "--port", "0")) == 0
    assert "ok    token file: " in capsys.readouterr().out


def test_the_readme_export_recipe_is_the_doctors_fix_and_passes_its_check() -> None:
    """README.md's optimum-cli command is the doctor's re-export fix, and the options it passes
    make the weight_compression record the NPU export check accepts."""
    import re

    readme = (Path(worker.__file__).parent / "README.md").read_text()
    (recipe,) = re.findall(
        r"^pip install 'optimum-intel\[openvino\]' && (optimum-cli export openvino .*)$", readme, re.MULTILINE
    )
    model, directory = recipe.split()[4], recipe.split()[-1]
    assert recipe == worker.NPU_EXPORT_COMMAND.replace("<hf-model>", model).replace("<dir>", directory)
    options = dict(re.findall(r"--(weight-format|ratio|group-size) (\S+)", recipe))
    record = {  # what nncf writes for these options (the committed tiny model has int4_sym, 1.0, -1)
        "mode": f"{options['weight-format']}_{'sym' if ' --sym ' in recipe else 'asym'}",
        "ratio": options["ratio"],
        "group_size": options["group-size"],
    }
    assert worker.npu_export_problems(record) == []
    assert worker.npu_export_problems({**record, "mode": "int4_asym"}) != []  # without --sym
    assert worker.npu_export_problems({**record, "ratio": "0.8"}) != []  # optimum's default ratio
