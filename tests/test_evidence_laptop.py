"""Evidence that is right, and off the lock (issue 16): each defect found by attacking the proof
on synthetic /sys and /proc trees in the kernel's formats (drivers/accel/ivpu/ivpu_sysfs.c,
drivers/gpu/drm/drm_file.c, fs/proc/fd.c), and the /proc scan beside the generation.

What these trees cannot show, and only an NPU host does: a real driver rebind, and the device
numbers and fdinfo of a real ivpu fd.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pytest import param

import worker
from conftest import REPO
from conftest import FakeNpuPipeline
from test_proof_evidence import GENERIC_FDINFO
from test_proof_evidence import IVPU_FDINFO
from test_proof_evidence import ProcTree
from test_proof_evidence import npu_worker
from test_proof_evidence import proc  # noqa: F401 - the fixture

AMDXDNA_FDINFO = GENERIC_FDINFO + "drm-driver:\tamdxdna\ndrm-client-id:\t7\ndrm-resident-memory:\t9000 KiB\n"


def request() -> worker.JobRequest:
    return worker.JobRequest("title", "Kanban task asks for a worker.")


# --- a counter that cannot be read after the generation -------------------------------------------


class CounterBreaksDuringGeneration(FakeNpuPipeline):
    """The counter file is replaced by ``damage`` while the job generates (the device went away,
    sysfs returned nothing, or something else now sits at that path)."""

    damage: str | None = None

    def generate(self, *args: Any, **kwargs: Any) -> worker.Generation:
        generation = super().generate(*args, **kwargs)
        if self.damage is not None and self.busy_file is not None:
            if self.damage == "gone":
                self.busy_file.unlink()
            else:
                self.busy_file.write_text(self.damage)
        return generation


@pytest.mark.parametrize("damage", [param("gone", id="file-gone"), param("", id="empty"),
                                    param("garbage\n", id="garbage")])
def test_an_unreadable_counter_after_the_generation_keeps_the_answer(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree, damage: str  # noqa: F811
) -> None:
    pipeline = CounterBreaksDuringGeneration(npu_settings, busy_file=busy_file)
    built = worker.build_worker(npu_settings, lambda _settings: pipeline)
    built.load()
    failures_before = built.metrics.proof_failures
    pipeline.damage = damage
    with pytest.raises(worker.NpuProofFailed) as failure:
        built.run(request(), "r1")
    assert "could not be read after the generation" in failure.value.message
    result = failure.value.result
    assert result is not None and result["npu_proof"] == "failed" and result["text"]  # the answer is not lost
    assert result["npu_busy_delta_us"] is None and result["npu_busy_ratio"] is None
    assert built.metrics.proof_failures == failures_before + 1


# --- a counter that goes backwards, or advances more than the time that passed ------------------------


class CounterJumps(FakeNpuPipeline):
    """The counter advances ``jump_us`` in an instant: no one device can be that busy."""

    jump_us = 0

    def generate(self, *args: Any, **kwargs: Any) -> worker.Generation:
        generation = super().generate(*args, **kwargs)
        if self.busy_file is not None:
            self.busy_file.write_text(str(int(self.busy_file.read_text()) + self.jump_us))
        return generation


def test_a_delta_over_the_wall_time_is_a_counter_anomaly_never_a_ratio_over_one(
    npu_settings: worker.Settings, busy_file: Path
) -> None:
    pipeline = CounterJumps(npu_settings, busy_file=busy_file)
    built = worker.build_worker(npu_settings, lambda _settings: pipeline)
    built.load()
    metrics = built.metrics
    observed, busy_us, failures = metrics.busy_ratio.count, metrics.npu_busy_us, metrics.proof_failures
    pipeline.jump_us = 5_000_000  # five seconds of busy time in a generation of a few milliseconds
    with pytest.raises(worker.NpuProofFailed) as failure:
        built.run(request(), "r1")
    assert "counter anomaly" in failure.value.message and "more than one device can be busy" in failure.value.message
    result = failure.value.result
    assert result is not None and result["npu_proof"] == "failed" and result["npu_busy_ratio"] is None
    assert result["npu_busy_delta_us"] > 5_000_000  # reported as read, for diagnosis
    # Neither the histogram nor the busy total takes an impossible delta; the failure is counted.
    assert (built.metrics.busy_ratio.count, built.metrics.npu_busy_us) == (observed, busy_us)
    assert built.metrics.proof_failures == failures + 1
    assert 'npu_worker_npu_busy_ratio_bucket{le="1.5"}' not in built.metrics.render(build_info={}, gauges={
        "queue_waiting": 0, "jobs_in_flight": 0, "ready": 1})


@pytest.mark.parametrize("delta, wall_ms, ratio", [
    param(11_800, 1.0, None, id="the-ratio-of-11.8-the-issue-found"),
    param(-5, 1.0, None, id="negative"),
    param(1_001, 1.0, 1.0, id="within-the-reads-truncation"),
    param(1_003, 1.0, None, id="past-the-truncation"),
    param(500, 1.0, 0.5, id="half"),
])
def test_the_ratio_is_never_outside_zero_to_one(delta: int, wall_ms: float, ratio: float | None) -> None:
    assert worker.busy_ratio(delta, wall_ms) == ratio


@pytest.mark.parametrize("before, after, interval_us, problem", [
    param(1000, 12_800, 1000.0, "counter anomaly", id="delta-over-wall-time"),
    param(1000, 2000, 1000.0, None, id="busy-the-whole-time"),
    param(5000, 12, 1000.0, "bound to the device afresh", id="backwards"),
])
def test_proof_problem_with_the_read_interval(before: int, after: int, interval_us: float, problem: str | None) -> None:
    found = worker.proof_problem(before, after, None, None, read_interval_us=interval_us)
    assert (found is None) if problem is None else (found is not None and problem in found)
    if problem == "bound to the device afresh":
        assert "reset" not in found and "reloaded" not in found  # recovery and suspend never lower it


# --- whose memory, on which device ----------------------------------------------------------------------


def test_a_duplicated_fd_counts_its_memory_once(proc: ProcTree) -> None:  # noqa: F811
    """dup(), fork() and SCM_RIGHTS give one DRM client two fds with the same drm-client-id."""
    proc.process(100, {3: "/dev/accel/accel0", 9: "/dev/accel/accel0"}, {3: IVPU_FDINFO, 9: IVPU_FDINFO})
    assert worker.AccelHolders(proc.root, pid=100).evidence()["resident_bytes"] == 34816 * 1024


def test_an_fd_of_another_accel_driver_is_not_the_npu(proc: ProcTree) -> None:  # noqa: F811
    proc.process(100, {3: "/dev/accel/accel1"}, {3: AMDXDNA_FDINFO})
    proc.process(200, {4: "/dev/accel/accel1"}, {4: AMDXDNA_FDINFO})
    evidence = worker.AccelHolders(proc.root, pid=100).evidence()
    assert (evidence["holds_device"], evidence["resident_bytes"], evidence["other_holders"]) == (False, None, 0)


@pytest.fixture
def devices(tmp_path: Path) -> tuple[str, int]:
    """Two accel nodes as two character devices this host has (/dev/null and /dev/zero): the
    counter's device is the first; only stat tells them apart, not the path."""
    directory = tmp_path / "dev-accel"
    directory.mkdir()
    os.symlink("/dev/null", directory / "accel0")
    os.symlink("/dev/zero", directory / "accel1")
    return str(directory) + "/", os.stat("/dev/null").st_rdev


def test_only_fds_on_the_counters_device_count(proc: ProcTree, devices: tuple[str, int]) -> None:  # noqa: F811
    device_dir, counter_rdev = devices
    proc.process(100, {3: device_dir + "accel1", 4: device_dir + "accel0"},
                 {3: IVPU_FDINFO.replace("\t42", "\t50"), 4: IVPU_FDINFO})
    proc.process(200, {5: device_dir + "accel1"}, {5: IVPU_FDINFO})  # an intel_vpu fd, another device
    proc.process(201, {6: device_dir + "accel0"}, {6: IVPU_FDINFO})
    holders = worker.AccelHolders(proc.root, pid=100, device_number=counter_rdev, device_dir=device_dir)
    evidence = holders.evidence()
    assert (evidence["holds_device"], evidence["resident_bytes"], evidence["other_holders"]) == (True, 34816 * 1024, 1)
    (proc.root / "100" / "fd" / "4").unlink()
    assert holders.evidence()["holds_device"] is False


def test_the_counters_device_number_comes_from_sysfs(npu_settings: worker.Settings, tmp_path: Path) -> None:
    """/sys/class/accel/accel0/device is the PCI device; its accel/accel0/dev says major:minor."""
    pci = tmp_path / "sys" / "devices" / "pci0000:00" / "0000:00:0b.0"
    (pci / "accel" / "accel0").mkdir(parents=True)
    (pci / "accel" / "accel0" / "dev").write_text("261:0\n")
    (pci / "npu_busy_time_us").write_text("1000\n")
    assert worker.accel_device_number(pci / "npu_busy_time_us") == os.makedev(261, 0)
    assert worker.accel_device_number(tmp_path / "npu_busy_time_us") is None  # sysfs does not say
    settings = dataclasses.replace(npu_settings, busy_path=pci / "npu_busy_time_us")
    built = worker.build_worker(settings, lambda _settings: FakeNpuPipeline(settings))
    assert built._holders is not None and built._holders.device_number == os.makedev(261, 0)


# --- what "uninspectable" counts ------------------------------------------------------------------------


def scan_with_a_non_dumpable_process(root: Path) -> dict[str, Any]:
    """Fork a process that makes itself non-dumpable (as setuid programs and some sandboxes are),
    then scan a /proc that lists only it (a link to its real /proc entry)."""
    ready_read, ready_write = os.pipe()
    done_read, done_write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_read)
            os.close(done_write)
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
            os.write(ready_write, b"x")
            os.read(done_read, 1)  # until the parent has scanned (it closes its end)
        finally:
            os._exit(0)
    os.close(ready_write)
    os.close(done_read)
    try:
        if os.read(ready_read, 1) != b"x":
            raise RuntimeError("the non-dumpable process did not start")
        os.symlink(f"/proc/{child}", root / str(child))
        return worker.AccelHolders(root, pid=os.getpid()).evidence()
    finally:
        os.close(done_write)
        os.close(ready_read)
        os.waitpid(child, 0)


def test_this_users_own_non_dumpable_process_is_uninspectable() -> None:
    """Only CAP_SYS_PTRACE lists a non-dumpable process's fds: as root the scan runs in a child
    that drops to nobody first (and makes a non-dumpable process of nobody's)."""
    root = Path(tempfile.mkdtemp(prefix="proc-"))  # nobody must reach it: not under pytest's 0700 tmp
    try:
        evidence = scan_as_nobody(root) if os.geteuid() == 0 else scan_with_a_non_dumpable_process(root)
    finally:
        shutil.rmtree(root)
    assert (evidence["other_holders"], evidence["uninspectable_processes"]) == (0, 1)


def scan_as_nobody(root: Path) -> dict[str, Any]:
    root.chmod(0o777)
    read, write = os.pipe()
    scanner = os.fork()
    if scanner == 0:  # drop to nobody, scan, report, exit without pytest's cleanup
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            os.write(write, json.dumps(scan_with_a_non_dumpable_process(root)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as stream:
        data = stream.read()
    os.waitpid(scanner, 0)
    return json.loads(data)


def test_the_contract_says_what_uninspectable_counts() -> None:
    lines = (REPO / "CONTRACT.md").read_text().splitlines()
    row = next(line for line in lines if line.lstrip().startswith("| `uninspectable_processes`"))
    assert "non-dumpable" in row and "hidepid" in row and "other users" in row


# --- the scan beside the generation, off the lock -------------------------------------------------------


class WatchedHolders(worker.AccelHolders):
    """A scan that records when it ran: it starts, then runs until it is stopped, and checks
    whether the NPU lock is free at that moment."""

    def __init__(self, lock_path: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lock_path = lock_path
        self.started = threading.Event()
        self.checked = threading.Event()
        self.lock_free_when_stopped: bool | None = None

    def evidence(self, deadline: float | None = None, stop: threading.Event | None = None,
                 tally: worker.ScanTally | None = None) -> dict[str, Any]:
        self.started.set()
        if stop is not None and stop.wait(10):
            try:
                fd = worker.NpuLock(self.lock_path).acquire(0)
                os.close(fd)
                self.lock_free_when_stopped = True
            except worker.Busy:
                self.lock_free_when_stopped = False
        self.checked.set()
        return worker.npu_evidence([], 0, 0, complete=False)


class WaitsForTheScan(FakeNpuPipeline):
    holders: WatchedHolders | None = None
    scan_ran_during_generation: bool | None = None

    def generate(self, *args: Any, **kwargs: Any) -> worker.Generation:
        if self.holders is not None:
            self.scan_ran_during_generation = self.holders.started.wait(5)
        return super().generate(*args, **kwargs)


def test_the_scan_runs_while_the_npu_generates_and_is_stopped_after_the_lock_is_released(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree  # noqa: F811
) -> None:
    pipeline = WaitsForTheScan(npu_settings, busy_file=busy_file)
    built = worker.build_worker(npu_settings, lambda _settings: pipeline)
    built.load()
    holders = WatchedHolders(npu_settings.lock_path, proc_root=proc.root, pid=100)
    built._holders = pipeline.holders = holders
    started = time.monotonic()
    result = built.run(request(), "r1")
    assert time.monotonic() - started < 5  # a scan that never ends does not hold the job
    assert pipeline.scan_ran_during_generation is True
    assert holders.checked.wait(10) and holders.lock_free_when_stopped is True  # stopped after the lock was released
    assert result["npu_evidence"]["scan_complete"] is False and result["npu_proof"] == "verified"


def test_a_scan_out_of_time_says_it_is_partial(proc: ProcTree) -> None:  # noqa: F811
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    for pid in range(200, 210):
        proc.process(pid, {9: "/dev/accel/accel0"})
    holders = worker.AccelHolders(proc.root, pid=100)
    partial = holders.evidence(deadline=time.monotonic())
    assert partial["scan_complete"] is False and partial["other_holders"] == 0
    assert partial["holds_device"] is True  # this process's own fds come first
    stop = threading.Event()
    stop.set()
    assert holders.evidence(stop=stop)["scan_complete"] is False
    assert holders.evidence() == {**partial, "other_holders": 10, "scan_complete": True}


def test_a_scan_with_time_finishes_beside_a_generation(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree  # noqa: F811
) -> None:
    proc.process(100, {3: "/dev/accel/accel0"}, {3: IVPU_FDINFO})
    proc.process(200, {9: "/dev/accel/accel0"})
    built, _ = npu_worker(npu_settings, busy_file, proc, increment_us=20_000)
    evidence = built.run(request(), "r1")["npu_evidence"]
    assert evidence == {"holds_device": True, "resident_bytes": 34816 * 1024, "other_holders": 1,
                        "uninspectable_processes": 0, "scan_complete": True}


def test_a_failed_generation_stops_its_scan(
    npu_settings: worker.Settings, busy_file: Path, proc: ProcTree  # noqa: F811
) -> None:
    pipeline = FakeNpuPipeline(npu_settings, busy_file=busy_file)
    built = worker.build_worker(npu_settings, lambda _settings: pipeline)
    built.load()
    holders = WatchedHolders(npu_settings.lock_path, proc_root=proc.root, pid=100)
    built._holders = holders
    pipeline.fail_with = RuntimeError("device refused")
    with pytest.raises(worker.GenerationFailed):
        built.run(request(), "r1")
    assert holders.checked.wait(10) and holders.lock_free_when_stopped is True
