"""Shared fixtures: the tiny real model, a hand-written fake NPU pipeline and a synthetic counter."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any
from typing import Callable
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import worker  # noqa: E402

TINY_MODEL = REPO / "tests" / "fixtures" / "tiny-chatml-ov"

class FakeNpuPipeline:
    """Fakes what GenAI's real NPU path (tests/test_npu_path.py) cannot show: the kernel's busy counter.

    A scripted, instant pipeline: a prompt token is a whitespace-separated word of the rendered
    prompt, the reply is fixed, every generate() adds ``busy_increment_us`` to a synthetic
    npu_busy_time_us file the way the NPU advances the real one (or does not, with 0), and
    ``fail_with`` makes the device refuse.  Prompt limits, the context stop, cancellation and
    structured output are GenAI's own on the emulated NPU path; they are not imitated here.
    """

    def __init__(
        self,
        settings: worker.Settings,
        *,
        reply: str = "Quarterly revenue up twelve percent",
        busy_file: Path | None = None,
        busy_increment_us: int = 1500,
        fail_with: BaseException | None = None,
        seconds_per_token: float = 0.0,
    ) -> None:
        self.settings = settings
        self.reply = reply
        self.busy_file = busy_file
        self.busy_increment_us = busy_increment_us
        self.fail_with = fail_with
        self.seconds_per_token = seconds_per_token
        self.calls: list[dict[str, Any]] = []

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in messages) + " <assistant>"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def encode(self, text: str) -> worker.Prompt:
        return worker.Prompt(text=text, token_count=self.count_tokens(text))

    def generate(
        self,
        prompt: worker.Prompt,
        max_new_tokens: int,
        grammar: str | None,
        should_stop: Callable[[], bool],
        stop_rules: str | None = None,
    ) -> worker.Generation:
        """A token is a word with the white space before it, run through the worker's own StopWatch
        (cancellation and stop rules) as the real streamer does."""
        prompt_tokens = prompt.token_count
        self.calls.append({"prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens, "grammar": grammar})
        if self.fail_with is not None:
            raise self.fail_with
        if self.busy_file is not None:
            busy = int(self.busy_file.read_text())
            self.busy_file.write_text(str(busy + self.busy_increment_us))
        tokens = re.findall(r"\s*\S+", self.reply)
        ids = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
        triggers = frozenset(index for token, index in ids.items() if stop_rules and set(token) & set(worker.STOP_TRIGGER_CHARS[stop_rules]))
        pieces = {index: token for token, index in ids.items()}
        watch = worker.StopWatch(should_stop, stop_rules, lambda token_ids: "".join(pieces[i] for i in token_ids), triggers)
        generated, finish = min(len(tokens), max_new_tokens), "stop"
        if generated < len(tokens):
            finish = "length"
        for index in range(generated):  # the streamer is asked after every token, as in GenAI
            time.sleep(self.seconds_per_token)
            verdict = watch.step([ids[tokens[index]]])
            if verdict is not None:
                generated, finish = index + 1, "cancelled" if verdict == worker.CANCEL else "stop"
                break
        return worker.Generation(
            text="".join(tokens[:generated]).strip(), prompt_tokens=prompt_tokens, generated_tokens=generated,
            finish_reason=finish, stop_rule=watch.stop_rule if finish == "stop" else None,
        )


def ir_header(mode: str = "int4_sym", group_size: str = "-1", ratio: str = "1.0") -> str:
    """A small openvino_model.xml whose rt_info has nncf's weight_compression record, laid out as
    optimum/nncf write it (the committed tiny model is the real thing)."""
    return (
        '<?xml version="1.0"?>\n<net name="Model0" version="11">\n\t<layers />\n\t<edges />\n\t<rt_info>\n'
        '\t\t<nncf>\n\t\t\t<version value="3.4.0" />\n\t\t\t<weight_compression>\n'
        f'\t\t\t\t<group_size value="{group_size}" />\n\t\t\t\t<mode value="{mode}" />\n'
        f'\t\t\t\t<ratio value="{ratio}" />\n\t\t\t</weight_compression>\n\t\t</nncf>\n'
        '\t</rt_info>\n</net>\n'
    )


@pytest.fixture
def busy_file(tmp_path: Path) -> Path:
    path = tmp_path / "npu_busy_time_us"
    path.write_text("1000000\n")
    return path


@pytest.fixture
def npu_settings(tmp_path: Path, busy_file: Path) -> worker.Settings:
    return worker.Settings(
        model_path=tmp_path / "fake-npu-model",
        device="NPU",
        cache_dir=None,
        lock_path=tmp_path / "lock" / "npu.lock",
        lock_timeout_s=5.0,
        busy_path=busy_file,
    )


def make_worker(settings: worker.Settings, pipeline: Any, *, warm_up: bool = True) -> worker.Worker:
    """A loaded worker around a given pipeline, with the real counter, lock and queue."""
    built = worker.build_worker(settings, lambda _settings: pipeline)
    built.load(warm_up=warm_up)
    if not warm_up:
        built._ready.set()
    return built


def serve_in_thread(settings: worker.Settings, factory: worker.PipelineFactory, *, load: bool = True) -> worker.WorkerHTTPServer:
    """Bind in the caller's thread (port 0 is fine), serve in a daemon thread; the caller shuts down."""
    built = worker.build_worker(settings, factory)
    if load:
        built.load()
    server = worker.WorkerHTTPServer(settings, built)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def cpu_settings(tmp_path: Path, **changes: Any) -> worker.Settings:
    settings = worker.Settings(
        model_path=TINY_MODEL,
        device="CPU",
        cache_dir=None,
        lock_path=tmp_path / "lock" / "npu.lock",
        lock_timeout_s=30.0,
    )
    return dataclasses.replace(settings, **changes)


def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment for a worker subprocess: tiny model on CPU, private lock and cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OV_GENAI_NPU_")}
    env.update(
        OV_GENAI_NPU_MODEL=str(TINY_MODEL),
        OV_GENAI_NPU_DEVICE="CPU",
        OV_GENAI_NPU_LOCK=str(tmp_path / "lock" / "npu.lock"),
        OV_GENAI_NPU_CACHE=str(tmp_path / "cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., worker.WorkerHTTPServer]]:
    """In-process servers on 127.0.0.1:0 with a fake pipeline unless given one; always shut down.

    ``changes`` go into the CPU settings; ``factory`` replaces the pipeline altogether.
    """
    servers: list[worker.WorkerHTTPServer] = []

    def start(
        pipeline: Any = None,
        *,
        load: bool = True,
        factory: worker.PipelineFactory | None = None,
        **changes: Any,
    ) -> worker.WorkerHTTPServer:
        settings = dataclasses.replace(cpu_settings(tmp_path, port=0, lock_timeout_s=5.0), **changes)
        if factory is None:
            chosen = pipeline or FakeNpuPipeline(settings)
            factory = lambda _settings: chosen  # noqa: E731
        server = serve_in_thread(settings, factory, load=load)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@dataclasses.dataclass(frozen=True)
class TinyDaemon:
    port: int
    env: dict[str, str]
    log_path: Path


@pytest.fixture(scope="session")
def tiny_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyDaemon]:
    """One real daemon (`python worker.py`) on the tiny model on CPU for the whole session, on a
    free port; its log goes to a file.  For tests that talk to the daemon as its clients do."""
    import signal
    import socket
    import subprocess
    import urllib.request

    tmp_path = tmp_path_factory.mktemp("tiny-daemon")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    env = worker_env(tmp_path, OV_GENAI_NPU_PORT=str(port))
    log_path = tmp_path / "daemon.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "worker.py")], cwd=REPO, env=env, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "the tiny daemon did not become ready"
            time.sleep(0.05)  # another process: no event to wait on
        yield TinyDaemon(port, env, log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
