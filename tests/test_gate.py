"""The gate under floods beyond its caps, its whole-head limit and the cost of a trickled head.

- A flood beyond MAX_PENDING_CONNECTIONS (the issue's numbers: 400 stalled requests and 20 real
  clients at once; 300 stalled requests): every connection that sent bytes gets an answer, 503
  at worst, the longest-stalled request is evicted first, and every refusal is counted.
- The 128 KiB limit on a whole head holds with its end present and without it.
- The head scan resumes where the last one stopped: counted in bytes looked at, not timed.

The attackers are tests/slow_clients.py; all traffic is on 127.0.0.1 and every loop is bounded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import worker
from conftest import FakeNpuPipeline
from conftest import assert_error
from conftest import cpu_settings
from conftest import wait_for
from slow_clients import SlowHeadAttack
from slow_clients import probe_once
from test_hostile import Conn
from test_hostile import exchange
from test_hostile import parse
from test_hostile import request

STALL_S = 60.0  # an attacker's next header line: never, within a test
REAL_CLIENTS = 20


def real_clients_at_once(port: int, count: int = REAL_CLIENTS) -> list[str]:
    """``count`` clients that connect at the same moment and each ask for /livez: their outcomes."""
    outcomes: list[str] = []
    barrier = threading.Barrier(count)

    def client() -> None:
        barrier.wait(10)
        outcomes.append(probe_once("127.0.0.1", port, "livez", 15).outcome)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def stalled(port: int, connections: int) -> SlowHeadAttack:
    """Connections that each start a request and stall; a refused one does not come back."""
    return SlowHeadAttack("127.0.0.1", port, connections=connections, interval_s=STALL_S,
                          reopen_delay_s=STALL_S)


def test_400_stalled_requests_and_20_real_clients_every_client_is_answered(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    port = server.server_port
    with stalled(port, 400) as attack:
        assert wait_for(lambda: attack.stats().opened == 400, 30), attack.stats()
        # 400 - 256 stalled requests were refused to make room; they were answered, not dropped.
        assert wait_for(lambda: attack.stats().responses[503] >= 400 - worker.MAX_PENDING_CONNECTIONS, 10)
        outcomes = real_clients_at_once(port)
        assert outcomes == ["200"] * REAL_CLIENTS, outcomes
        stats = attack.stats()
        assert stats.closed_by_server == 0, stats  # no connection closed without an answer
        # The real clients made room too: by evicting stalled requests, answered 503.
        refusals = server.worker.metrics.refusals
        assert wait_for(lambda: refusals["evicted"] == attack.stats().responses[503], 10)
    assert set(stats.responses) == {503}, stats


def test_300_stalled_requests_the_ones_beyond_the_cap_are_answered_503(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    beyond = 300 - worker.MAX_PENDING_CONNECTIONS
    with stalled(server.server_port, 300) as attack:
        assert wait_for(lambda: attack.stats().opened == 300, 30), attack.stats()
        assert wait_for(lambda: attack.stats().responses[503] == beyond, 10), attack.stats()
        stats = attack.stats()
        assert (stats.closed_by_server, stats.open_now) == (0, worker.MAX_PENDING_CONNECTIONS), stats
        assert server.worker.metrics.refusals["evicted"] == beyond
        assert server.worker.metrics.requests[("<other>", "", 503)] == beyond  # no head, so no path


@pytest.fixture
def unstarted_server(tmp_path: Path) -> Iterator[tuple[worker.WorkerHTTPServer, Callable[[], None]]]:
    """A server bound and listening whose gate starts only when asked: clients connect and send
    first, so their requests wait in the kernel's buffers, in order, before the gate reads any."""
    settings = cpu_settings(tmp_path, port=0)
    pipeline = FakeNpuPipeline(settings)
    built = worker.build_worker(settings, lambda _settings: pipeline)
    built.load()
    server = worker.WorkerHTTPServer(settings, built)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    yield server, thread.start
    if thread.is_alive():
        server.shutdown()
    server.server_close()


def test_eviction_takes_the_longest_stalled_request_not_a_connection_not_read_yet(
    unstarted_server: tuple[worker.WorkerHTTPServer, Callable[[], None]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four stalled heads, then three complete requests behind them, all sent before the gate
    reads anything; the gate holds four.  The real clients are answered, and the stalled heads
    make room oldest first, each with a 503."""
    monkeypatch.setattr(worker, "MAX_PENDING_CONNECTIONS", 4)
    server, start_gate = unstarted_server
    port = server.server_port
    stalled_conns = [Conn(port, timeout=10) for _ in range(4)]
    for conn in stalled_conns:
        conn.send(b"GET /livez HTTP/1.1\r\n")
    real = [Conn(port, timeout=10) for _ in range(3)]
    try:
        for conn in real:
            conn.send(request(port, "GET", "/livez"))
        start_gate()
        assert [conn.reply().status for conn in real] == [200, 200, 200]
        evicted = server.worker.metrics.refusals["evicted"]
        assert 1 <= evicted <= 3  # fewer when a real request was served before the next arrived
        for conn in stalled_conns[:evicted]:
            reply = parse(conn.read_all(5))
            assert "slowest was dropped" in assert_error(reply, 503, "busy")["error"]["message"]
            assert reply.header("Retry-After") == str(worker.RETRY_AFTER_BUSY_S)
        for conn in stalled_conns[evicted:]:
            assert not conn.answered_within(0.1)  # newer stalled ones: still held, not dropped
    finally:
        for conn in stalled_conns + real:
            conn.close()


def test_an_idle_kept_alive_connection_makes_room_silently_and_is_counted(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "MAX_PENDING_CONNECTIONS", 2)
    server = start_server()
    port = server.server_port
    with Conn(port) as idle, Conn(port) as stalled_conn:
        idle.send(request(port, "GET", "/livez"))
        assert idle.reply().status == 200  # kept alive, idle from now on
        stalled_conn.send(b"GET /livez HTTP/1.1\r\n")
        # Both held by the gate (the idle one handed back by its handler), none in service.
        in_service = server._in_service
        assert wait_for(lambda: server.open_connections == 2 and not any(in_service.values()), 5)
        reply, _ = exchange(port, request(port, "GET", "/livez"))
        assert reply.status == 200
        assert idle.closed_within(5)  # nothing sent since its answer: closed, no answer owed
        assert not stalled_conn.answered_within(0.2)  # a request started: not the one evicted
    assert server.worker.metrics.refusals["evicted_idle"] == 1
    assert "evicted" not in server.worker.metrics.refusals


# --- the whole-head limit ---------------------------------------------------------------------------


def big_head(port: int, total_bytes: int) -> bytes:
    """A head of about ``total_bytes`` in fields of 60 KB (each within the 64 KiB line limit)."""
    lines = [f"X-Big-{index}: " + "a" * 60_000 for index in range(total_bytes // 60_000 + 1)]
    return f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode() + "\r\n".join(lines).encode()


@pytest.mark.parametrize("with_end", [True, False], ids=["with-its-end", "without-its-end"])
def test_a_head_over_128_kib_is_431(
    start_server: Callable[..., worker.WorkerHTTPServer], with_end: bool
) -> None:
    server = start_server()
    port = server.server_port
    data = big_head(port, 167_000) + (b"\r\n\r\n" if with_end else b"")
    assert len(data) > 167_000
    with Conn(port, timeout=10) as conn:
        conn.send(data)
        assert_error(conn.reply(), 431, "headers_too_large")
    assert server.worker.metrics.refusals["head_too_large"] == 1


def test_a_head_just_within_128_kib_is_served(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    head = request(port, "GET", "/livez", headers=("X-Pad: " + "a" * 60_000, "X-Pad2: " + "b" * 60_000))
    head = head[:-2] + b"X-Pad3: " + b"c" * (worker.MAX_HEAD_BYTES - len(head) - 10) + b"\r\n\r\n"
    assert len(head) == worker.MAX_HEAD_BYTES
    reply, _ = exchange(port, head)
    assert reply.status == 200


# --- the head scan is linear ------------------------------------------------------------------------


def test_head_end_resumes_where_it_stopped() -> None:
    data = bytearray(b"GET / HTTP/1.1\r\nHost: x\r")
    end, resume_at = worker.head_end(data)
    assert (end, resume_at) == (None, len(data) - 2)
    data += b"\n\r\n"  # the end mark straddles the two reads
    assert worker.head_end(data, resume_at) == (len(data), resume_at)


def test_empty_lines_before_a_request_line_are_skipped_however_they_arrive(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    port = server.server_port
    with Conn(port) as conn:
        for piece in (b"\r\n", b"\n\r", b"\n" + request(port, "GET", "/livez")):  # RFC 9112, 2.2
            conn.send(piece)
        assert conn.reply().status == 200
        conn.send(b"\r\n" + request(port, "GET", "/livez"))  # after a kept-alive answer too
        assert conn.reply().status == 200


def test_a_trickled_head_is_scanned_about_once(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes looked at by head_end over a head sent in 400 pieces: about its size, not 400 times
    half of it (which is what rescanning the whole buffer after every read costs)."""
    scanned: list[int] = []
    looked = threading.Semaphore(0)
    original = worker.head_end

    def counting_head_end(data: Any, resume_at: int = 0) -> Any:
        scanned.append(len(data) - resume_at)
        looked.release()
        return original(data, resume_at)

    monkeypatch.setattr(worker, "head_end", counting_head_end)
    server = start_server()
    port = server.server_port
    fields = [f"X-Field-{index:02d}: {'v' * 200}" for index in range(90)]
    data = request(port, "GET", "/livez", headers=tuple(fields))
    pieces = [data[offset:offset + 200] for offset in range(0, len(data), 200)]
    with Conn(port, timeout=10) as conn:
        for piece in pieces:
            conn.send(piece)
            assert looked.acquire(timeout=5)  # each piece read and scanned on its own
        assert conn.reply().status == 200
    assert len(scanned) >= len(pieces)  # one more when the close was read already
    # Linear: each byte about once (plus the two a straddling end mark needs), where a rescan of
    # the whole buffer after every read would look at len(pieces) / 2 times the head.
    assert sum(scanned) <= len(data) + 2 * len(scanned), (sum(scanned), len(data), len(scanned))


def test_threading_is_not_needed_for_a_refusal(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    """The gate answers a malformed head itself: no handler thread is started for it."""
    server = start_server()
    port = server.server_port
    before = threading.active_count()
    for _ in range(20):
        exchange(port, b"GET /livez HTTP/1.1\r\nHost : x\r\n\r\n")
    assert threading.active_count() <= before + 1


def test_a_kept_alive_connection_idle_after_its_answer_is_closed_at_the_idle_timeout(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handler hands the connection back without waking the gate; the gate, which had nothing
    else to wait for, still closes it once it has been idle for IDLE_TIMEOUT_S."""
    monkeypatch.setattr(worker, "IDLE_TIMEOUT_S", 0.5)
    server = start_server()
    port = server.server_port
    with Conn(port) as conn:
        conn.send(request(port, "GET", "/livez"))
        assert conn.reply().status == 200
        answered = time.monotonic()
        assert conn.closed_within(5)
        assert 0.4 <= time.monotonic() - answered < 3
    assert server.open_connections == 0
