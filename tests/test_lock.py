"""The process-wide NPU lock (NpuLock), the in-process FIFO (JobQueue) and how the CLI and the
daemon share them across real processes.

Other processes are real: a helper child takes the lock with ``NpuLock.acquire`` and prints
``locked <inode>`` once it holds it; the test reads that line (with a timeout) instead of sleeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import worker
from conftest import REPO
from conftest import TINY_MODEL
from conftest import call
from conftest import needs_tiny_model
from conftest import running_daemon
from conftest import wait_for
from conftest import worker_env

# A child that takes the lock, says so on stdout, and holds it until killed or until stdin closes.
HOLDER_CODE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    import worker
    fd = worker.NpuLock(Path(sys.argv[2])).acquire(float(sys.argv[3]))
    print("locked", os.fstat(fd).st_ino, flush=True)
    sys.stdin.read()
    """
)

CHILD_START_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 60.0


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def lock_path(tmp_path: Path) -> Path:
    return tmp_path / "lock" / "npu.lock"


@dataclass
class Holder:
    proc: subprocess.Popen[bytes]
    inode: int

    def kill(self) -> None:
        """SIGKILL the holder and reap it, so its lock is certainly gone."""
        self.proc.kill()
        self.proc.wait(timeout=10)


def read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """One line of the child's stdout, or fail after timeout_s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"no line from child {proc.pid} within {timeout_s} s")
    return proc.stdout.readline().decode()


@contextlib.contextmanager
def lock_holder(path: Path, timeout_s: float = 5.0) -> Iterator[Holder]:
    """A separate python process holding NpuLock(path); killed on exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_CODE, str(REPO), str(path), str(timeout_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = read_line(proc, CHILD_START_TIMEOUT_S)
        if not line.startswith("locked "):
            proc.kill()
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"holder did not lock: {line!r} {err.decode()[-2000:]}")
        yield Holder(proc, int(line.split()[1]))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def release(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


class FlockSpy:
    """Stands in for the fcntl module inside worker: records (thread, inode, outcome) of each flock."""

    LOCK_EX = fcntl.LOCK_EX
    LOCK_NB = fcntl.LOCK_NB
    LOCK_UN = fcntl.LOCK_UN
    LOCK_SH = fcntl.LOCK_SH

    def __init__(self) -> None:
        self._seen: set[tuple[int, int, str]] = set()
        self._condition = threading.Condition()

    def flock(self, fd: int, operation: int) -> None:
        inode = os.fstat(fd).st_ino
        try:
            fcntl.flock(fd, operation)
        except BlockingIOError:
            self._record(inode, "blocked")
            raise
        self._record(inode, "unlocked" if operation & fcntl.LOCK_UN else "locked")

    def _record(self, inode: int, outcome: str) -> None:
        with self._condition:
            self._seen.add((threading.get_ident(), inode, outcome))
            self._condition.notify_all()

    def wait_for(self, thread_id: int, inode: int, outcome: str, timeout_s: float = 5.0) -> bool:
        with self._condition:
            return self._condition.wait_for(lambda: (thread_id, inode, outcome) in self._seen, timeout_s)


def run_cli(tmp_path: Path, lock_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "worker.py", "--job", "title", "--input", "hi",
            "--lock-file", str(lock_path), "--device", "CPU", "--model", str(TINY_MODEL), *extra,
        ],
        cwd=REPO,
        env=worker_env(tmp_path),
        check=False,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def start_cli(tmp_path: Path, lock_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "worker.py", "--job", "title", "--input", "hi",
            "--lock-file", str(lock_path), "--device", "CPU", "--model", str(TINY_MODEL), *extra,
        ],
        cwd=REPO,
        env=worker_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def has_open(pid: int, path: Path) -> bool:
    """True when process pid has path open (it is inside NpuLock.acquire or holds the lock)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    target = os.path.realpath(path)
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(fd_dir / name) == target:
                return True
        except OSError:
            continue
    return False


# --------------------------------------------------------------------------------------------------
# 1. NpuLock within one process
# --------------------------------------------------------------------------------------------------


def test_lock_excludes_a_second_thread_until_released(lock_path: Path) -> None:
    """Two threads with their own open() exclude each other; the loser gets Busy after its timeout."""
    fd = worker.NpuLock(lock_path).acquire(0.2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            started = time.monotonic()
            with pytest.raises(worker.Busy) as info:
                pool.submit(worker.NpuLock(lock_path).acquire, 0.3).result(timeout=10)
            waited_s = time.monotonic() - started
            assert info.value.type == "busy"
            assert info.value.exit_code == worker.EXIT_BUSY == 75
            assert 0.3 <= waited_s < 3.0
        finally:
            release(fd)
        second = pool.submit(worker.NpuLock(lock_path).acquire, 0.3).result(timeout=10)
        release(second)


def test_lock_file_survives_release(lock_path: Path) -> None:
    """Release never unlinks the lock file: the same inode is there for the next holder."""
    lock = worker.NpuLock(lock_path)
    with lock.held(0.2):
        inode = os.stat(lock_path).st_ino
    assert lock_path.exists()
    assert os.stat(lock_path).st_ino == inode
    fd = lock.acquire(0.2)
    try:
        assert os.fstat(fd).st_ino == inode
    finally:
        release(fd)
    assert os.stat(lock_path).st_ino == inode


def test_lock_directory_and_file_are_private(tmp_path: Path) -> None:
    """Missing directories are created; the lock directory is 0700 and the file 0600."""
    path = tmp_path / "a" / "b" / "npu.lock"
    with worker.NpuLock(path).held(0.2):
        pass
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600


def test_lock_directory_symlink_is_refused(tmp_path: Path) -> None:
    """A lock directory that is a symlink (to a real directory) is refused before any file is made."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(worker.ConfigError) as info:
        worker.NpuLock(link / "npu.lock").acquire(0.2)
    assert info.value.exit_code == worker.EXIT_CONFIG
    assert not (real / "npu.lock").exists()


@pytest.mark.parametrize("kind", ["dangling-symlink", "regular-file"])
def test_lock_directory_that_is_not_a_directory_is_a_config_error(tmp_path: Path, kind: str) -> None:
    """A lock 'directory' that is a dangling symlink or a file is refused with ConfigError."""
    directory = tmp_path / "lockdir"
    if kind == "dangling-symlink":
        directory.symlink_to(tmp_path / "does-not-exist")
    else:
        directory.write_text("")
    with pytest.raises(worker.ConfigError):
        worker.NpuLock(directory / "npu.lock").acquire(0.2)
    assert not (tmp_path / "does-not-exist").exists()  # nothing created through the link


def test_cli_with_dangling_symlink_lock_directory_exits_78_with_one_line(tmp_path: Path) -> None:
    """The CLI reports a broken lock directory as a configuration error: exit 78, one line on
    stderr and nothing on stdout (CONTRACT.md, "CLI"), no traceback."""
    directory = tmp_path / "lockdir"
    directory.symlink_to(tmp_path / "does-not-exist")
    result = run_cli(tmp_path, directory / "npu.lock", "--lock-timeout-s", "0.2")
    assert "Traceback" not in result.stderr
    assert result.returncode == worker.EXIT_CONFIG
    assert result.stdout == "" and "worker.py: configuration: " in result.stderr


def test_lock_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """A pre-created lock directory owned by someone else (shared /tmp capture) is refused."""
    if os.getuid() != 0:
        pytest.skip("needs root to chown a directory to another user")
    directory = tmp_path / "lockdir"
    directory.mkdir(mode=0o777)
    os.chmod(directory, 0o777)
    os.chown(directory, 65534, 65534)
    with pytest.raises(worker.ConfigError) as info:
        worker.NpuLock(directory / "npu.lock").acquire(0.2)
    assert "owned by this user" in info.value.message
    assert not (directory / "npu.lock").exists()


# --------------------------------------------------------------------------------------------------
# 2. Across processes
# --------------------------------------------------------------------------------------------------


def test_lock_held_by_another_process_gives_busy_then_frees_on_sigkill(lock_path: Path) -> None:
    """A child's flock makes our acquire time out with Busy; SIGKILL of the child frees it at once."""
    lock = worker.NpuLock(lock_path)
    with lock_holder(lock_path) as holder:
        started = time.monotonic()
        with pytest.raises(worker.Busy):
            lock.acquire(0.3)
        assert time.monotonic() - started >= 0.3
        holder.kill()
        started = time.monotonic()
        fd = lock.acquire(1.0)
        took_s = time.monotonic() - started
        try:
            assert took_s < 0.5  # the first LOCK_NB try, not a timeout
            assert os.fstat(fd).st_ino == holder.inode  # the file stayed; the lock on it was dropped
        finally:
            release(fd)


# --------------------------------------------------------------------------------------------------
# 3. Lock file deleted or replaced: never two holders of the current file
# --------------------------------------------------------------------------------------------------


def test_lock_file_deleted_while_held_is_recreated(lock_path: Path) -> None:
    """With the held file unlinked, acquire creates a new file and locks exactly that one."""
    with lock_holder(lock_path) as holder:
        os.unlink(lock_path)
        fd = worker.NpuLock(lock_path).acquire(0.5)
        try:
            assert os.fstat(fd).st_ino == os.stat(lock_path).st_ino
            assert os.fstat(fd).st_ino != holder.inode
        finally:
            release(fd)


def _acquire_in_thread(pool: ThreadPoolExecutor, path: Path, timeout_s: float) -> tuple[Future[int], int]:
    """Start NpuLock(path).acquire in a pool thread; returns the future and that thread's id."""
    ident: Future[int] = Future()

    def job() -> int:
        ident.set_result(threading.get_ident())
        return worker.NpuLock(path).acquire(timeout_s)

    future = pool.submit(job)
    return future, ident.result(timeout=5)


def test_waiter_skips_a_lock_file_deleted_while_it_waited(lock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter blocked on file A, which is then unlinked, ends up holding the file now at the path."""
    spy = FlockSpy()
    monkeypatch.setattr(worker, "fcntl", spy)
    with lock_holder(lock_path) as holder, ThreadPoolExecutor(max_workers=1) as pool:
        future, waiter = _acquire_in_thread(pool, lock_path, 5.0)
        assert spy.wait_for(waiter, holder.inode, "blocked")
        os.unlink(lock_path)
        holder.kill()
        fd = future.result(timeout=10)
        try:
            # Once A is free the waiter locks it, sees it is gone from the path and takes the file
            # now there.  A's inode number may be reused once A is closed: the link count shows
            # the fd is not the deleted A.
            assert os.fstat(fd).st_nlink == 1
            assert os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        finally:
            release(fd)


def test_waiter_never_shares_a_replaced_lock_file(lock_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File A is replaced by B while a waiter is blocked on A and someone else holds B: when A is
    freed the waiter must not return (two holders); it waits for B and returns B's fd."""
    spy = FlockSpy()
    monkeypatch.setattr(worker, "fcntl", spy)
    with lock_holder(lock_path) as holder, ThreadPoolExecutor(max_workers=1) as pool:
        future, waiter = _acquire_in_thread(pool, lock_path, 5.0)
        assert spy.wait_for(waiter, holder.inode, "blocked")
        replacement = lock_path.with_name("npu.lock.new")
        replacement.write_text("")
        os.replace(replacement, lock_path)
        inode_b = os.stat(lock_path).st_ino
        assert inode_b != holder.inode
        fd_b = worker.NpuLock(lock_path).acquire(0.2)  # this thread holds B
        try:
            holder.kill()  # A is free now
            assert spy.wait_for(waiter, holder.inode, "locked")
            assert spy.wait_for(waiter, inode_b, "blocked"), "the waiter returned the stale lock on A"
            assert not future.done()
        finally:
            release(fd_b)
        fd = future.result(timeout=10)
        try:
            assert os.fstat(fd).st_ino == os.stat(lock_path).st_ino == inode_b
        finally:
            release(fd)


# --------------------------------------------------------------------------------------------------
# 4. JobQueue
# --------------------------------------------------------------------------------------------------


def _take_turn(queue: worker.JobQueue, timeout_s: float, record: list[int], index: int) -> None:
    with queue.turn(timeout_s):
        record.append(index)


def test_queue_is_first_in_first_out(lock_path: Path) -> None:
    """Jobs that queued behind the running one get their turns in arrival order."""
    queue = worker.JobQueue(worker.NpuLock(lock_path), depth=8)
    order: list[int] = []
    with ThreadPoolExecutor(max_workers=5) as pool:
        with queue.turn(1.0):
            futures = []
            for index in range(5):
                futures.append(pool.submit(_take_turn, queue, 10.0, order, index))
                assert wait_for(lambda index=index: queue.waiting == index + 1), f"job {index} did not queue"
            assert order == []
        for future in futures:
            future.result(timeout=10)
    assert order == [0, 1, 2, 3, 4]
    assert queue.waiting == 0


def test_full_queue_rejects_at_once(lock_path: Path) -> None:
    """Depth 2: with one running and two waiting, a third job gets Busy immediately."""
    queue = worker.JobQueue(worker.NpuLock(lock_path), depth=2)
    order: list[int] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        with queue.turn(1.0):
            futures = [pool.submit(_take_turn, queue, 10.0, order, 0)]
            assert wait_for(lambda: queue.waiting == 1)
            futures.append(pool.submit(_take_turn, queue, 10.0, order, 1))
            assert wait_for(lambda: queue.waiting == 2)
            started = time.monotonic()
            with pytest.raises(worker.Busy) as info, queue.turn(5.0):
                pytest.fail("a third job ran past a full queue")
            assert time.monotonic() - started < 2.0  # at once, not after its 5 s timeout
            assert "queue is full" in info.value.message
            assert info.value.retry_after_s is not None
            assert queue.waiting == 2
        for future in futures:
            future.result(timeout=10)
    assert order == [0, 1]


def test_queue_wait_times_out_with_busy(lock_path: Path) -> None:
    """A job that gets no turn within its timeout gets Busy and leaves the queue (also from behind
    another waiter); the jobs around it are unaffected."""
    queue = worker.JobQueue(worker.NpuLock(lock_path), depth=8)
    order: list[int] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        with queue.turn(1.0):
            head = pool.submit(_take_turn, queue, 10.0, order, 0)
            assert wait_for(lambda: queue.waiting == 1)
            started = time.monotonic()
            late = pool.submit(_take_turn, queue, 0.3, order, 1)
            with pytest.raises(worker.Busy) as info:
                late.result(timeout=10)
            assert 0.3 <= time.monotonic() - started < 3.0
            assert "no turn" in info.value.message
            assert queue.waiting == 1  # only the head job is still waiting
        head.result(timeout=10)
    assert order == [0]
    assert queue.waiting == 0
    with queue.turn(0.2):  # the queue is not left blocked
        pass


def test_queue_times_out_on_a_lock_held_by_another_process(lock_path: Path) -> None:
    """The head of the queue waits for the file lock within the same timeout; Busy does not wedge the queue."""
    queue = worker.JobQueue(worker.NpuLock(lock_path), depth=8)
    with lock_holder(lock_path) as holder:
        started = time.monotonic()
        with pytest.raises(worker.Busy) as info, queue.turn(0.3):
            pytest.fail("ran while another process held the lock")
        assert 0.3 <= time.monotonic() - started < 3.0
        assert "held by another process" in info.value.message
        holder.kill()
    with queue.turn(0.3):
        pass


def test_exception_in_turn_releases_queue_and_lock(lock_path: Path) -> None:
    """An exception inside `with queue.turn()` frees both the file lock and the queue."""
    queue = worker.JobQueue(worker.NpuLock(lock_path), depth=8)
    with pytest.raises(RuntimeError, match="boom"), queue.turn(0.5):
        assert has_open(os.getpid(), lock_path)
        raise RuntimeError("boom")
    assert not has_open(os.getpid(), lock_path)  # the fd is closed
    fd = worker.NpuLock(lock_path).acquire(0)  # another open file description gets it at once
    release(fd)
    with queue.turn(0.2):
        pass


# --------------------------------------------------------------------------------------------------
# 5. default_lock_path
# --------------------------------------------------------------------------------------------------


def test_settings_default_to_the_lock_every_other_process_uses(tmp_path: Path) -> None:
    assert worker.Settings(model_path=tmp_path).lock_path == worker.default_lock_path(os.environ)


def test_default_lock_path_uses_xdg_runtime_dir(tmp_path: Path) -> None:
    """An existing $XDG_RUNTIME_DIR holds the lock directory."""
    assert worker.default_lock_path({"XDG_RUNTIME_DIR": str(tmp_path)}) == (
        tmp_path / "openvino-genai-npu-worker" / "npu.lock"
    )


@pytest.mark.parametrize(
    "environ",
    [{}, {"XDG_RUNTIME_DIR": ""}, {"XDG_RUNTIME_DIR": "/nonexistent-runtime-dir"}],
    ids=["unset", "empty", "missing"],
)
def test_default_lock_path_uses_run_user_when_xdg_is_unusable(
    environ: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon (XDG set by systemd) and a cron job (XDG unset) meet in /run/user/$UID."""
    uid = 2_000_000_011
    run_user = Path(f"/run/user/{uid}")
    try:
        run_user.mkdir(parents=True)
    except OSError:
        pytest.skip("cannot create a /run/user directory here (needs root)")
    try:
        monkeypatch.setattr(worker.os, "getuid", lambda: uid)
        assert worker.default_lock_path(environ) == run_user / "openvino-genai-npu-worker" / "npu.lock"
    finally:
        run_user.rmdir()


@pytest.mark.parametrize("environ", [{}, {"XDG_RUNTIME_DIR": ""}], ids=["unset", "empty"])
def test_default_lock_path_without_xdg_runtime_dir(environ: dict[str, str]) -> None:
    """Without $XDG_RUNTIME_DIR (cron, ssh): /run/user/$UID if it exists, else a per-uid dir in /tmp."""
    uid = os.getuid()
    if Path(f"/run/user/{uid}").is_dir():
        expected = Path(f"/run/user/{uid}/openvino-genai-npu-worker/npu.lock")
    else:
        expected = Path(f"/tmp/openvino-genai-npu-worker-{uid}/npu.lock")
    assert worker.default_lock_path(environ) == expected


def test_default_lock_path_falls_back_to_tmp_per_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """A uid without /run/user/$UID gets /tmp/openvino-genai-npu-worker-$UID/npu.lock."""
    uid = 2_000_000_007
    assert not Path(f"/run/user/{uid}").exists()
    monkeypatch.setattr(worker.os, "getuid", lambda: uid)
    assert worker.default_lock_path({}) == Path(f"/tmp/openvino-genai-npu-worker-{uid}/npu.lock")


def test_cli_without_xdg_uses_the_daemons_lock_file() -> None:
    """A daemon under systemd (XDG_RUNTIME_DIR=/run/user/$UID) and a CLI from cron (unset) agree."""
    runtime_dir = Path(f"/run/user/{os.getuid()}")
    if not runtime_dir.is_dir():
        pytest.skip(f"{runtime_dir} does not exist on this host")
    assert worker.default_lock_path({}) == worker.default_lock_path({"XDG_RUNTIME_DIR": str(runtime_dir)})


# --------------------------------------------------------------------------------------------------
# 6. CLI against a lock holder
# --------------------------------------------------------------------------------------------------


def test_cli_exits_75_with_json_while_another_process_holds_the_lock(tmp_path: Path, lock_path: Path) -> None:
    """The one-shot CLI waits --lock-timeout-s for the lock, then exits 75 with a JSON busy body."""
    with lock_holder(lock_path):
        started = time.monotonic()
        result = run_cli(tmp_path, lock_path, "--lock-timeout-s", "0.5")
        took_s = time.monotonic() - started
    assert result.returncode == worker.EXIT_BUSY == 75, result.stderr
    body = json.loads(result.stdout)
    assert body["error"]["type"] == "busy"
    assert body["request_id"]
    assert "Traceback" not in result.stderr
    assert took_s >= 0.5


@needs_tiny_model
def test_cli_succeeds_once_the_holder_is_killed(tmp_path: Path, lock_path: Path) -> None:
    """Busy (75) while a process holds the lock; after SIGKILL of the holder the same CLI succeeds."""
    with lock_holder(lock_path) as holder:
        busy = run_cli(tmp_path, lock_path, "--lock-timeout-s", "0.5")
        assert busy.returncode == 75, busy.stderr
        assert json.loads(busy.stdout)["error"]["type"] == "busy"
        holder.kill()
        done = run_cli(tmp_path, lock_path, "--lock-timeout-s", "0.5")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["job"] == "title"
    assert body["device"] == "CPU"
    assert body["text"]


# --------------------------------------------------------------------------------------------------
# 7. Daemon against CLI and other lock holders
# --------------------------------------------------------------------------------------------------


@needs_tiny_model
def test_daemon_and_two_clis_all_wait_for_each_other_and_succeed(tmp_path: Path, lock_path: Path) -> None:
    """An HTTP job and two CLI jobs, all blocked on the same lock, run one after another once it frees."""
    with running_daemon(tmp_path, "--lock-file", str(lock_path), "--lock-timeout-s", "30") as served:
        port = served.wait_ready()
        clis: list[subprocess.Popen[str]] = []
        try:
            with lock_holder(lock_path) as holder, ThreadPoolExecutor(max_workers=1) as pool:
                request = pool.submit(call, port, "POST", "/v1/worker/generate", {"job": "title", "input": "hi"},
                                      timeout_s=60.0)
                clis = [start_cli(tmp_path, lock_path), start_cli(tmp_path, lock_path)]
                # All three are inside NpuLock.acquire (they have the lock file open) before it frees.
                for pid in (served.process.pid, *(cli.pid for cli in clis)):
                    assert wait_for(lambda pid=pid: has_open(pid, lock_path), 20.0), (
                        f"pid {pid} never reached the lock")
                assert not request.done()
                holder.kill()
                status, _, body = request.result(timeout=60)
            assert status == 200, body
            assert body["job"] == "title"
            for cli in clis:
                out, err = cli.communicate(timeout=CLI_TIMEOUT_S)
                assert cli.returncode == 0, err
                assert json.loads(out)["job"] == "title"
        finally:
            for cli in clis:
                if cli.poll() is None:
                    cli.kill()
                cli.communicate(timeout=10)
        assert served.stop() == 0, served.log_text()[-3000:]


@needs_tiny_model
def test_daemon_answers_503_busy_while_another_process_holds_the_lock(tmp_path: Path, lock_path: Path) -> None:
    """The daemon waits --lock-timeout-s for a lock held elsewhere, then 503 busy with Retry-After."""
    with running_daemon(tmp_path, "--lock-file", str(lock_path), "--lock-timeout-s", "0.5") as served:
        port = served.wait_ready()
        with lock_holder(lock_path) as holder:
            started = time.monotonic()
            status, headers, body = call(port, "POST", "/v1/worker/generate", {"job": "title", "input": "hi"},
                                         timeout_s=30)
            assert time.monotonic() - started >= 0.5
            assert status == 503
            assert body["error"]["type"] == "busy"
            assert int(headers["Retry-After"]) > 0
            holder.kill()
        status, _, body = call(port, "POST", "/v1/worker/generate", {"job": "title", "input": "hi"},
                               timeout_s=30)
        assert status == 200, body
        assert served.stop() == 0, served.log_text()[-3000:]
