"""Proof an agent can weigh: the busy ratio, its optional floor, per-process evidence from /proc,
and a counter that goes backwards - on synthetic /sys and /proc trees in the formats the kernel
documents (drivers/accel/ivpu/ivpu_sysfs.c, drivers/gpu/drm/drm_file.c, fs/proc/fd.c).

What these trees cannot show, and only an NPU host does: the real counter's values, and fdinfo's
memory keys as Linux >= 6.19 prints them for a real ivpu context.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import smoke_llm_npu
import worker
from conftest import FakeNpuPipeline
from conftest import make_worker

# fdinfo of an accel fd, as the kernel prints it (TAB after every colon).
GENERIC_FDINFO = "pos:\t0\nflags:\t02100002\nmnt_id:\t26\nino:\t1027\n"
IVPU_FDINFO = GENERIC_FDINFO + (
    "drm-driver:\tintel_vpu\ndrm-client-id:\t42\ndrm-pdev:\t0000:00:0b.0\n"
    "drm-total-memory:\t34820 KiB\ndrm-shared-memory:\t0\ndrm-resident-memory:\t34816 KiB\n"
)
IVPU_FDINFO_RUNNING = IVPU_FDINFO.replace("drm-resident-memory", "drm-active-memory:\t4 KiB\ndrm-resident-memory")
IVPU_FDINFO_FRESH = GENERIC_FDINFO + (
    "drm-driver:\tintel_vpu\ndrm-client-id:\t43\ndrm-pdev:\t0000:00:0b.0\ndrm-total-memory:\t0\ndrm-shared-memory:\t0\n"
)


@dataclasses.dataclass
class ProcTree:
    """A synthetic /proc: processes with fds (symlinks), fdinfo files and stat lines."""

    root: Path

    def process(self, pid: int, fds: dict[int, str], fdinfo: dict[int, str] | None = None, *,
                kernel_thread: bool = False, unreadable: bool = False) -> Path:
        process = self.root / str(pid)
        (process / "fd").mkdir(parents=True)
        (process / "fdinfo").mkdir()
        flags = 0x00200000 if kernel_thread else 0x00400000
        (process / "stat").write_text(f"{pid} (some name) S 1 {pid} {pid} 0 -1 {flags} 0 0 0 0\n")
        for fd, target in fds.items():
            os.symlink(target, process / "fd" / str(fd))
            (process / "fdinfo" / str(fd)).write_text((fdinfo or {}).get(fd, GENERIC_FDINFO))
        if unreadable:
            (process / "fd").chmod(0)  # as another user's /proc/PID/fd is to us (0500, not ours)
        return process


@pytest.fixture
def proc(tmp_path: Path) -> ProcTree:
    tree = ProcTree(tmp_path / "proc")
    tree.root.mkdir()
    return tree


def holders(proc: ProcTree, pid: int = 100) -> worker.AccelHolders:
    return worker.AccelHolders(proc.root, pid=pid)


# --- pure: ratio, floor, counter direction, fdinfo ----------------------------------------------------


@pytest.mark.parametrize("delta, generate_ms, ratio", [
    param(2_650_724, 3157.94, 0.839, id="the-prototypes-measurement"),
    param(3, 3000.0, 0.0, id="three-microseconds-in-three-seconds"),
    param(None, 100.0, None, id="no-delta"),
    param(500, 0.0, None, id="no-time"),
])
def test_the_busy_ratio_is_the_delta_over_the_generation_time(
    delta: int | None, generate_ms: float, ratio: float | None
) -> None:
    assert worker.busy_ratio(delta, generate_ms) == ratio


@pytest.mark.parametrize("before, after, ratio, floor, problem", [
    param(1000, 3000, 0.5, None, None, id="advanced"),
    param(1000, 1000, 0.0, None, "did not advance", id="frozen"),
    param(5000, 12, None, None, "went backwards (5000 -> 12 us): the intel_vpu driver was bound to the device afresh",
          id="backwards"),
    param(1000, 1003, 0.001, 0.2, "below --min-busy-ratio 0.2", id="under-the-floor"),
    param(1000, 3000, 0.5, 0.2, None, id="over-the-floor"),
    param(None, 3000, None, None, "was not read", id="unread"),
])
def test_proof_problem(
    before: int | None, after: int, ratio: float | None, floor: float | None, problem: str | None
) -> None:
    found = worker.proof_problem(before, after, ratio, floor)
    assert (found is None) if problem is None else (found is not None and problem in found)


@pytest.mark.parametrize("value, size", [
    param("0", 0, id="zero"), param("1536", 1536, id="bytes"), param("4 KiB", 4096, id="kib"),
    param("2048 MiB", 2 << 30, id="mib"), param("3 GiB", None, id="unknown-unit"), param(None, None, id="absent"),
    param("x KiB", None, id="not-a-number"),
])
def test_fdinfo_sizes_in_the_kernels_units(value: str | None, size: int | None) -> None:
    assert worker.fdinfo_bytes(value) == size


def test_fdinfo_fields() -> None:
    fields = worker.parse_fdinfo(IVPU_FDINFO_RUNNING)
    assert fields["drm-driver"] == "intel_vpu" and fields["drm-active-memory"] == "4 KiB"
    assert fields["flags"] == "02100002" and fields["drm-pdev"] == "0000:00:0b.0"


# --- AccelHolders on synthetic trees --------------------------------------------------------------------


def test_this_process_with_ivpu_fdinfo_and_no_one_else(proc: ProcTree) -> None:
    proc.process(100, {3: "/dev/accel/accel0", 4: "/dev/null", 5: "socket:[123]"}, {3: IVPU_FDINFO_RUNNING})
    proc.process(200, {0: "/dev/pts/0", 1: "/dev/pts/0"})
    assert holders(proc).evidence() == {
        "holds_device": True, "resident_bytes": 34816 * 1024, "other_holders": 0, "uninspectable_processes": 0,
        "scan_complete": True,
    }


def test_two_fds_add_up_and_a_fresh_one_has_nothing_resident(proc: ProcTree) -> None:
    proc.process(100, {3: "/dev/accel/accel0", 7: "/dev/accel/accel0"}, {3: IVPU_FDINFO, 7: IVPU_FDINFO_FRESH})
    assert holders(proc).evidence()["resident_bytes"] == 34816 * 1024


def test_a_kernel_before_6_19_prints_no_drm_keys_so_memory_is_not_known(proc: ProcTree) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: GENERIC_FDINFO})
    evidence = holders(proc).evidence()
    assert (evidence["holds_device"], evidence["resident_bytes"]) == (True, None)


def test_other_holders_are_counted_kernel_threads_skipped_other_users_uninspectable() -> None:
    """Another user's /proc/PID/fd cannot be listed (EACCES). Root lists anything, so as root the
    scan runs in a child that drops to nobody over a tree that nobody may read but not list."""
    root = Path(tempfile.mkdtemp(prefix="proc-"))
    try:
        root.chmod(0o755)
        tree = ProcTree(root)
        tree.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
        tree.process(200, {9: "/dev/accel/accel0"})  # another process of ours with the NPU open
        tree.process(201, {0: "/dev/null"})
        tree.process(2, {}, kernel_thread=True)
        tree.process(300, {}, unreadable=True)  # another user's
        for path in root.rglob("*"):
            if not path.is_symlink() and path.parent.name != "300":
                path.chmod(0o755 if path.is_dir() else 0o644)
        evidence = evidence_as_nobody(root) if os.geteuid() == 0 else worker.AccelHolders(root, pid=100).evidence()
    finally:
        for path in root.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(root)
    assert evidence == {
        "holds_device": True, "resident_bytes": 34816 * 1024, "other_holders": 1, "uninspectable_processes": 1,
        "scan_complete": True,
    }


def evidence_as_nobody(root: Path) -> dict[str, Any]:
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: drop to nobody, scan, report, exit without pytest's cleanup
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(worker.AccelHolders(root, pid=100).evidence()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        data = stream.read()
    os.waitpid(child, 0)
    return json.loads(data)


def test_other_holders_counted_and_kernel_threads_skipped_as_root_too(proc: ProcTree) -> None:
    """The same tree without the unreadable process, which root can read anyway."""
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    proc.process(200, {9: "/dev/accel/accel0"})
    proc.process(202, {4: "/dev/accel/accel1"})
    proc.process(201, {0: "/dev/null"})
    kthread = proc.process(2, {}, kernel_thread=True)
    (kthread / "fd").rmdir()  # a kernel thread's fd directory cannot be listed: it must not be tried
    assert holders(proc).evidence()["other_holders"] == 2


def test_a_process_that_ends_during_the_scan_is_not_counted(proc: ProcTree) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    (proc.root / "555").mkdir()  # the directory is there, its fd/ and stat are gone
    assert holders(proc).evidence()["other_holders"] == 0


def test_this_process_without_the_device_and_an_unreadable_proc(proc: ProcTree, tmp_path: Path) -> None:
    proc.process(100, {0: "/dev/null"})
    assert holders(proc).evidence()["holds_device"] is False
    missing = worker.AccelHolders(tmp_path / "no-proc", pid=100).evidence()
    assert missing == {"holds_device": None, "resident_bytes": None, "other_holders": None,
                       "uninspectable_processes": None, "scan_complete": True}


def test_the_real_proc_of_this_test_process() -> None:
    """No accel device here: this process holds none; the scan of the real /proc works."""
    evidence = worker.AccelHolders().evidence()
    assert evidence["holds_device"] is False and isinstance(evidence["other_holders"], int)


# --- end to end on the fake NPU: ratio, floor, evidence, backwards --------------------------------------


def npu_worker(npu_settings: worker.Settings, busy_file: Path, proc: ProcTree, *, increment_us: int = 1500,
               seconds_per_token: float = 0.0, **changes: Any) -> tuple[worker.Worker, FakeNpuPipeline]:
    settings = dataclasses.replace(npu_settings, **changes)
    pipeline = FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=increment_us,
                               seconds_per_token=seconds_per_token)
    built = worker.build_worker(settings, lambda _settings: pipeline, proc_root=proc.root)
    # This process, as the tree has it; a scan of a few files gets all the time it needs.
    built._holders = worker.AccelHolders(proc.root, pid=100, wait_s=10.0)
    built.load()
    return built, pipeline


def test_every_npu_result_carries_the_ratio_and_the_evidence(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree
) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    proc.process(200, {9: "/dev/accel/accel0"})
    built, _ = npu_worker(npu_settings, busy_file, proc, increment_us=40_000, seconds_per_token=0.01)
    result = built.run(worker.JobRequest("title", "Kanban task asks for a worker."), "r1")
    assert result["npu_busy_delta_us"] == 40_000
    # Over the wall time between the two counter reads, which bracket the generation.
    assert 40_000 / (result["timing_ms"]["generate"] * 1000) >= result["npu_busy_ratio"] > 0.5
    assert result["npu_evidence"] == {
        "holds_device": True, "resident_bytes": 34816 * 1024, "other_holders": 1, "uninspectable_processes": 0,
        "scan_complete": True,
    }
    assert built.last_evidence == result["npu_evidence"]
    assert built.metrics.busy_ratio.count == len(worker.WARMUP_REQUESTS) + 1


def test_the_floor_turns_a_tiny_delta_into_a_proof_failure(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree
) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    built, pipeline = npu_worker(npu_settings, busy_file, proc, increment_us=30_000, seconds_per_token=0.01,
                                 min_busy_ratio=0.2)
    pipeline.busy_increment_us = 3  # "advanced by 3 us during the generation"
    with pytest.raises(worker.NpuProofFailed) as failure:
        built.run(worker.JobRequest("title", "x"), "r1")
    assert "below --min-busy-ratio 0.2" in failure.value.message and failure.value.exit_code == 3
    assert failure.value.result is not None and failure.value.result["npu_proof"] == "failed"
    assert failure.value.result["npu_busy_delta_us"] == 3


def test_without_a_floor_a_tiny_delta_still_passes(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree
) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    built, pipeline = npu_worker(npu_settings, busy_file, proc, seconds_per_token=0.01)
    pipeline.busy_increment_us = 3
    result = built.run(worker.JobRequest("title", "x"), "r1")
    assert result["npu_proof"] == "verified" and result["npu_busy_ratio"] < 0.01  # there for the agent to weigh


def test_a_counter_that_goes_backwards_is_named(npu_settings: worker.Settings, busy_file: Path, proc: ProcTree) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    built, pipeline = npu_worker(npu_settings, busy_file, proc)
    pipeline.busy_increment_us = -999_000  # as after a driver reload mid-job
    with pytest.raises(worker.NpuProofFailed, match="went backwards .*: the intel_vpu driver was bound to the device"):
        built.run(worker.JobRequest("title", "x"), "r1")


def test_no_ratio_and_no_evidence_off_a_verified_npu(npu_settings: worker.Settings, tmp_path: Path) -> None:
    settings = dataclasses.replace(npu_settings, npu_proof=False)
    result = make_worker(settings, FakeNpuPipeline(settings)).run(worker.JobRequest("title", "x"), "r1")
    assert (result["npu_proof"], result["npu_busy_ratio"], result["npu_evidence"]) == ("unavailable", None, None)


def test_the_floor_over_http_is_a_502(
    start_server: Callable[..., worker.WorkerHTTPServer], npu_settings: worker.Settings, busy_file: Path
) -> None:
    import urllib.error
    import urllib.request

    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file, busy_increment_us=40_000, seconds_per_token=0.01)
    server = start_server(pipeline, device="NPU", busy_path=busy_file, min_busy_ratio=0.5)
    pipeline.busy_increment_us = 1
    request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/v1/worker/generate",
                                     data=b'{"job": "title", "input": "x"}',
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=10)
    body = json.loads(failure.value.read())
    assert failure.value.code == 502 and body["error"]["type"] == "npu_proof_failed"
    assert "min-busy-ratio" in body["error"]["message"] and body["result"]["npu_busy_ratio"] < 0.5
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/healthz", timeout=10) as response:
        health = json.loads(response.read())
    assert set(health["npu_evidence"]) == {"holds_device", "resident_bytes", "other_holders", "uninspectable_processes",
                                           "scan_complete"}
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
        assert "npu_worker_npu_busy_ratio_count" in response.read().decode()


def test_the_floor_on_the_cli_is_exit_3(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=1,
                                               seconds_per_token=0.01)
    args = ["--model", str(npu_settings.model_path), "--device", "NPU", "--busy-path", str(busy_file),
            "--lock-file", str(npu_settings.lock_path), "--min-busy-ratio", "0.3", "--job", "title", "--input", "x"]
    assert worker.main(args, pipeline_factory=factory) == worker.EXIT_PROOF_FAILED
    assert "below --min-busy-ratio 0.3" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    param(["--min-busy-ratio", "0"], "above 0 and at most 1", id="zero"),
    param(["--min-busy-ratio", "1.5"], "above 0 and at most 1", id="over-one"),
    param(["--min-busy-ratio", "nan"], "above 0 and at most 1", id="nan"),
    param(["--min-busy-ratio", "0.2", "--no-npu-proof"], "needs the NPU busy counter", id="without-a-counter"),
    param(["--min-busy-ratio", "0.2", "--device", "CPU"], "needs the NPU busy counter", id="on-the-cpu"),
    param(["--min-busy-ratio", "0.2", "--emulate-npu"], "no busy ratio", id="emulated"),
])
def test_a_floor_that_makes_no_sense_is_a_usage_error(tmp_path: Path, flags: list[str], message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--model", str(tmp_path), "--job", "title", "--input", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_smoke_test_prints_the_ratio_and_how_to_choose_a_floor(
    npu_settings: worker.Settings, busy_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = lambda settings: FakeNpuPipeline(settings, busy_file=busy_file, busy_increment_us=30_000,
                                               seconds_per_token=0.01)
    args = ["--model", str(npu_settings.model_path), "--busy-path", str(busy_file),
            "--lock-file", str(npu_settings.lock_path)]
    assert smoke_llm_npu.main(args, pipeline_factory=factory, has_npu=lambda: True) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["npu_busy_ratio"] > 0 and set(report["npu_evidence"]) >= {"holds_device", "other_holders"}
    assert "--min-busy-ratio" in out.err and "half the lowest ratio" in out.err


def test_the_doctor_names_other_holders(proc: ProcTree) -> None:
    proc.process(200, {9: "/dev/accel/accel0"})
    check = worker.npu_holders_check(worker.AccelHolders(proc.root, pid=100))
    assert check.warning
    assert "1 other process of this user" in check.detail and "adds to every job's busy delta" in check.detail
    (proc.root / "200" / "fd" / "9").unlink()
    check = worker.npu_holders_check(worker.AccelHolders(proc.root, pid=100))
    assert not check.warning and check.detail.startswith("0 other processes")
