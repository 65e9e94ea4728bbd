"""The attack tools themselves: they hold what they say, reopen what is closed, and clean up.

These check tests/slow_clients.py, not the worker's defences: they pass against any worker that
accepts a few connections (the fix's own tests assert what the worker does under attack).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import worker
from conftest import wait_for
from slow_clients import Prober
from slow_clients import SlowBodyAttack
from slow_clients import SlowHeadAttack
from slow_clients import probe_once


def test_slow_head_holds_its_connections_and_closes_them_all_on_exit(
    start_server: Callable[..., worker.WorkerHTTPServer],
) -> None:
    server = start_server()
    with SlowHeadAttack("127.0.0.1", server.server_port, connections=5, interval_s=0.2) as attack:
        assert wait_for(lambda: server.open_connections == 5, 5), server.open_connections
        assert wait_for(lambda: attack.stats().bytes_sent > 5 * 60, 5)  # preambles and drips
        stats = attack.stats()
        assert (stats.opened, stats.open_now, stats.refused, stats.errors) == (5, 5, 0, 0)
        assert not stats.responses  # the head never ends, so nothing is answered
    assert attack.stats().open_now == 0
    assert wait_for(lambda: server.open_connections == 0, 5), server.open_connections


def test_slow_body_reopens_what_the_server_closes(
    start_server: Callable[..., worker.WorkerHTTPServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "BODY_DEADLINE_S", 0.3)
    server = start_server()
    # Drips slower than the server's body deadline: every connection is dropped and reopened.
    with SlowBodyAttack("127.0.0.1", server.server_port, connections=3, interval_s=2.0) as attack:
        assert wait_for(lambda: attack.stats().opened >= 6, 10), attack.stats()
        assert wait_for(lambda: server.open_connections == 3, 5)
    stats = attack.stats()
    assert stats.closed_by_server + sum(stats.responses.values()) >= 3
    assert wait_for(lambda: server.open_connections == 0, 5)


def test_prober_records_every_target_with_its_status(start_server: Callable[..., worker.WorkerHTTPServer]) -> None:
    server = start_server()
    port = server.server_port
    assert probe_once("127.0.0.1", port, "livez", 5).detail == "alive"
    with Prober("127.0.0.1", port, interval_s=0.2, timeout_s=5) as prober:
        assert wait_for(lambda: len(prober.results) >= 6, 10)
    summary = prober.summary()
    for target in ("livez", "healthz", "job"):
        assert summary[target]["n"] >= 1 and summary[target]["ok"] == summary[target]["n"], summary
