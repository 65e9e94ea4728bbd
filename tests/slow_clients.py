"""Slow-client attacks and a well-behaved prober, for tests and measurements of the HTTP daemon.

Standard library only; nothing here imports worker.py, so the same code measures any version of
the worker (before and after a fix) and any other HTTP server on loopback.

Attacks
-------
``SlowHeadAttack`` and ``SlowBodyAttack`` hold ``connections`` sockets open against one
``host:port``.  Each socket sends a valid start of a request and then one more piece every
``interval_s``: a header line (the head never ends) or one byte of a JSON body (the body never
completes).  Whenever the server closes a socket, answers on it, or the socket fails, it is
reopened at once - the attacker of the issue "a local process can take the worker down".

Threading model: one daemon thread runs a ``selectors`` loop over every socket (non-blocking
connects, sends and reads), so 200 connections cost one thread, not 200; on a 2-core machine
the attacker must not be what starves the server.  ``__enter__`` starts the thread,
``__exit__`` stops it and closes every socket.  ``stats()`` may be called at any time from any
thread.

Reopening "at once" means a refused or closed connection is reconnected in the same loop turn;
against a server that closes over-capacity connections immediately this is a tight
connect/close loop, which is the point (``reopen_delay_s`` softens it).

Prober
------
``Prober`` probes ``GET /livez``, ``GET /healthz`` and ``POST /v1/worker/generate`` the way a
monitor or a normal client would: ``http.client``, a new connection per probe, a timeout, the
exact ``Host: 127.0.0.1:PORT``.  Each target has its own thread and a fixed schedule
(``interval_s``); a probe that overruns its slot skips the slots it missed rather than bunching
up.  Results are kept per probe and summarised by ``summary()``.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import json
import random
import selectors
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs 3.11; annotations here are never evaluated

GENERATE_PATH = "/v1/worker/generate"
JOB_BODY = b'{"job": "title", "input": "Quarterly revenue is up twelve percent."}'
SLOW_BODY_LENGTH = 1000  # the announced Content-Length of SlowBodyAttack; under any body cap
CONNECT_TIMEOUT_S = 5.0  # a non-blocking connect still pending after this long counts as an error
RECV_BYTES = 65536
LOOP_TICK_S = 0.05  # longest the selector sleeps: how quickly stop() is noticed


# ==================================================================================================
# Attacks
# ==================================================================================================


@dataclasses.dataclass
class AttackStats:
    """Counters of one attack; a snapshot copy is returned by ``stats()``."""

    opened: int = 0  # connections that completed the TCP handshake
    closed_by_server: int = 0  # EOF or reset from the server
    refused: int = 0  # connect() failed (ECONNREFUSED, backlog full, timeout)
    errors: int = 0  # other socket errors while sending or reading
    responses: Counter[int] = dataclasses.field(default_factory=Counter)  # status code of any answer
    bytes_sent: int = 0
    bytes_received: int = 0
    open_now: int = 0  # sockets connected at the time of the snapshot
    max_open: int = 0

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["responses"] = {str(code): count for code, count in sorted(self.responses.items())}
        return data


@dataclasses.dataclass
class _Slot:
    """One attacking connection: its socket, where it is in its request and when it sends next."""

    index: int
    sock: socket.socket | None = None
    connected: bool = False
    connect_started: float = 0.0
    next_send_at: float = 0.0
    drips_sent: int = 0
    pending: bytes = b""  # bytes accepted for sending but not yet written (non-blocking)
    received: bytes = b""  # the start of whatever the server answered, for its status line


class _SlowAttack:
    """A selector loop holding ``connections`` slow requests open; subclasses say what they send."""

    def __init__(
        self,
        host: str,
        port: int,
        connections: int = 200,
        interval_s: float = 5.0,
        *,
        reopen_delay_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if connections < 1 or interval_s <= 0:
            raise ValueError("connections must be >= 1 and interval_s > 0")
        self.host = host
        self.port = port
        self.connections = connections
        self.interval_s = interval_s
        self.reopen_delay_s = reopen_delay_s
        self._random = random.Random(seed)
        self._stats = AttackStats()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._selector = selectors.DefaultSelector()
        self._slots = [_Slot(index) for index in range(connections)]
        self._reopen_at: dict[int, float] = {}  # slot index -> when to reconnect

    # --- what is sent: overridden by the two attacks -------------------------------------------

    @property
    def host_header(self) -> str:
        return f"{self.host}:{self.port}"

    def preamble(self) -> bytes:
        """Sent as soon as a connection is up."""
        raise NotImplementedError

    def drip(self, slot: _Slot) -> bytes:
        """Sent every ``interval_s`` after the preamble; must never complete the request."""
        raise NotImplementedError

    # --- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("already started")
        now = time.monotonic()
        for slot in self._slots:
            self._reopen_at[slot.index] = now
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and close every socket (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        for slot in self._slots:
            self._close(slot)
        self._selector.close()

    def stats(self) -> AttackStats:
        with self._stats_lock:
            snapshot = dataclasses.replace(self._stats, responses=Counter(self._stats.responses))
        return snapshot

    # --- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self._reconnect_due(now)
                self._send_due(now)
                timeout = self._next_wakeup(now)
                try:
                    events = self._selector.select(timeout) if self._selector.get_map() else []
                except OSError:
                    events = []
                if not self._selector.get_map():
                    time.sleep(timeout)
                for key, mask in events:
                    slot: _Slot = key.data
                    if not slot.connected:
                        self._finish_connect(slot)
                    else:
                        if mask & selectors.EVENT_READ:
                            self._readable(slot)
                        if slot.sock is not None and mask & selectors.EVENT_WRITE:
                            self._flush(slot)
                self._expire_connects(time.monotonic())
        finally:
            for slot in self._slots:
                self._close(slot)

    def _next_wakeup(self, now: float) -> float:
        due = [slot.next_send_at for slot in self._slots if slot.connected]
        due += list(self._reopen_at.values())
        if not due:
            return LOOP_TICK_S
        return max(0.0, min(LOOP_TICK_S, min(due) - now))

    def _reconnect_due(self, now: float) -> None:
        for index, when in list(self._reopen_at.items()):
            if when <= now:
                del self._reopen_at[index]
                self._connect(self._slots[index], now)

    def _connect(self, slot: _Slot, now: float) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        slot.sock, slot.connected, slot.connect_started = sock, False, now
        slot.drips_sent, slot.pending, slot.received = 0, b"", b""
        code = sock.connect_ex((self.host, self.port))
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK):
            self._count(refused=1)
            self._lost(slot)
            return
        self._selector.register(sock, selectors.EVENT_WRITE, slot)

    def _finish_connect(self, slot: _Slot) -> None:
        assert slot.sock is not None
        code = slot.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            self._count(refused=1)
            self._lost(slot)
            return
        slot.connected = True
        with self._stats_lock:
            self._stats.opened += 1
            self._stats.open_now += 1
            self._stats.max_open = max(self._stats.max_open, self._stats.open_now)
        # Spread the drips over one interval so that 200 sockets do not all send in the same tick.
        slot.next_send_at = time.monotonic() + self.interval_s * self._random.random()
        self._selector.modify(slot.sock, selectors.EVENT_READ, slot)
        self._queue(slot, self.preamble())

    def _expire_connects(self, now: float) -> None:
        for slot in self._slots:
            if slot.sock is not None and not slot.connected and now - slot.connect_started > CONNECT_TIMEOUT_S:
                self._count(refused=1)
                self._lost(slot)

    def _send_due(self, now: float) -> None:
        for slot in self._slots:
            if slot.connected and slot.sock is not None and slot.next_send_at <= now:
                slot.next_send_at = now + self.interval_s
                data = self.drip(slot)
                slot.drips_sent += 1
                self._queue(slot, data)

    def _queue(self, slot: _Slot, data: bytes) -> None:
        slot.pending += data
        self._flush(slot)

    def _flush(self, slot: _Slot) -> None:
        if slot.sock is None or not slot.pending:
            return
        try:
            sent = slot.sock.send(slot.pending)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._count(errors=1)
            self._lost(slot)
            return
        slot.pending = slot.pending[sent:]
        self._count(bytes_sent=sent)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if slot.pending else 0)
        self._selector.modify(slot.sock, events, slot)

    def _readable(self, slot: _Slot) -> None:
        assert slot.sock is not None
        try:
            data = slot.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except ConnectionResetError:
            self._count(closed_by_server=1)
            self._lost(slot)
            return
        except OSError:
            self._count(errors=1)
            self._lost(slot)
            return
        if not data:
            self._count(closed_by_server=1)
            self._lost(slot)
            return
        self._count(bytes_received=len(data))
        slot.received = (slot.received + data)[:64]
        status = _status_of(slot.received)
        if status is None and len(slot.received) >= 64:
            status = 0  # 64 bytes without a line end: not an HTTP status line
        if status is not None:
            with self._stats_lock:
                self._stats.responses[status] += 1
            # An answer ends this request (the server closes or waits for the next one): start over.
            self._lost(slot)

    def _lost(self, slot: _Slot) -> None:
        """Close a slot's socket and schedule its reconnection."""
        self._close(slot)
        if not self._stop.is_set():
            self._reopen_at[slot.index] = time.monotonic() + self.reopen_delay_s

    def _close(self, slot: _Slot) -> None:
        sock, slot.sock = slot.sock, None
        if sock is None:
            return
        if slot.connected:
            with self._stats_lock:
                self._stats.open_now -= 1
        slot.connected = False
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, RuntimeError):
            pass
        sock.close()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)


def _status_of(head: bytes) -> int | None:
    """The status code of ``HTTP/1.x NNN ...`` once the status line is complete, else None."""
    line, found, _ = head.partition(b"\r\n")
    if not found:
        return None
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[0].startswith(b"HTTP/") and parts[1].isdigit():
        return int(parts[1])
    return 0  # something that is not HTTP


class SlowHeadAttack(_SlowAttack):
    """A valid request line and Host, then one header line every ``interval_s``; no blank line ever.

    Every line is short and well-formed, so a per-read socket timeout longer than ``interval_s``
    never fires: only a deadline on the whole head stops it.
    """

    def __init__(self, host: str, port: int, connections: int = 200, interval_s: float = 5.0, **options: Any) -> None:
        super().__init__(host, port, connections, interval_s, **options)

    def preamble(self) -> bytes:
        return f"GET /livez HTTP/1.1\r\nHost: {self.host_header}\r\n".encode("ascii")

    def drip(self, slot: _Slot) -> bytes:
        return b"X-Slow-%d: %d\r\n" % (slot.drips_sent, slot.index)


class SlowBodyAttack(_SlowAttack):
    """A complete, valid head for a JSON job with ``Content-Length: body_length``, then one body
    byte every ``interval_s``.

    The body is the start of valid JSON padded with spaces, so the request would be a normal job
    if it ever completed; the default length takes 1000 intervals to arrive.
    """

    def __init__(
        self,
        host: str,
        port: int,
        connections: int = 200,
        interval_s: float = 5.0,
        *,
        body_length: int = SLOW_BODY_LENGTH,
        **options: Any,
    ) -> None:
        super().__init__(host, port, connections, interval_s, **options)
        self.body_length = body_length
        prefix = JOB_BODY[:-1] + b" " * (body_length - len(JOB_BODY)) + b"}"
        self._body = prefix if len(prefix) == body_length else b" " * body_length

    def preamble(self) -> bytes:
        return (
            f"POST {GENERATE_PATH} HTTP/1.1\r\nHost: {self.host_header}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {self.body_length}\r\n\r\n"
        ).encode("ascii")

    def drip(self, slot: _Slot) -> bytes:
        # Never the last byte: the request must stay incomplete however long the attack runs.
        position = min(slot.drips_sent, self.body_length - 2)
        return self._body[position : position + 1]


# ==================================================================================================
# Prober: a well-behaved client, measured
# ==================================================================================================

PROBE_TARGETS = ("livez", "healthz", "job")


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    target: str  # one of PROBE_TARGETS
    started_s: float  # time.monotonic() at the start of the probe
    latency_s: float
    status: int | None  # None: no HTTP answer
    error: str | None  # exception class name when status is None
    # What answered: the JSON body's error type or status field ("busy", "alive", ...), with
    # "+nodate" when the answer had no Date header (bytes written outside http.server's handler).
    detail: str | None = None

    @property
    def outcome(self) -> str:
        return str(self.status) if self.status is not None else f"error:{self.error}"


def probe_once(host: str, port: int, target: str, timeout_s: float, token: str | None = None) -> ProbeResult:
    """One request on a new connection, as curl or a monitor sends it; never raises."""
    started = time.monotonic()
    headers = {"Host": f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if target == "job":
        method, path, body = "POST", GENERATE_PATH, JOB_BODY
        headers["Content-Type"] = "application/json"
    else:
        method, path, body = "GET", f"/{target}", None
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        payload = response.read()
        status: int | None = response.status
        error = None
        detail = _detail(payload) + ("" if response.getheader("Date") else "+nodate")
    except (OSError, http.client.HTTPException) as exc:
        status, error, detail = None, type(exc).__name__, None
    finally:
        connection.close()
    return ProbeResult(target, started, time.monotonic() - started, status, error, detail)


def _detail(payload: bytes) -> str:
    """The error type, or the status field, of a JSON answer; "?" for anything else."""
    try:
        document = json.loads(payload)
    except ValueError:
        return "?"
    if not isinstance(document, dict):
        return "?"
    error = document.get("error")
    if isinstance(error, dict) and isinstance(error.get("type"), str):
        return error["type"]
    return str(document.get("status", "?"))


class Prober:
    """Probes ``targets`` every ``interval_s`` each, in their own threads, while used as a context.

    ``timeout_s`` is each probe's socket timeout (connect and every read); 5 s is what the
    worker's own watchdog self-check uses.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 5.0,
        targets: Sequence[str] = PROBE_TARGETS,
        token: str | None = None,
    ) -> None:
        unknown = set(targets) - set(PROBE_TARGETS)
        if unknown:
            raise ValueError(f"unknown probe targets: {sorted(unknown)}")
        self.host = host
        self.port = port
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.targets = tuple(targets)
        self.token = token
        self.results: list[ProbeResult] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        started = time.monotonic()
        for offset, target in enumerate(self.targets):
            # Staggered within the interval so the targets do not always arrive together.
            first = started + self.interval_s * offset / len(self.targets)
            thread = threading.Thread(target=self._loop, args=(target, first), name=f"probe-{target}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop scheduling; a probe in flight finishes (bounded by its timeout) and is kept."""
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s * 3 + 1)

    def _loop(self, target: str, first: float) -> None:
        slot = first
        while not self._stop.wait(max(0.0, slot - time.monotonic())):
            result = probe_once(self.host, self.port, target, self.timeout_s, self.token)
            with self._lock:
                self.results.append(result)
            now = time.monotonic()
            slot += self.interval_s
            if slot < now:  # overran: skip the missed slots, keep the phase
                slot += ((now - slot) // self.interval_s + 1) * self.interval_s

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per target: probe count, outcomes (status code or error:Class) and latency in ms."""
        with self._lock:
            results = list(self.results)
        return summarize_probes(results, self.targets)


def summarize_probes(
    results: Sequence[ProbeResult], targets: Sequence[str] = PROBE_TARGETS
) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for target in targets:
        mine = [result for result in results if result.target == target]
        latencies = sorted(result.latency_s * 1000 for result in mine)
        summary[target] = {
            "n": len(mine),
            "ok": sum(1 for result in mine if result.status == 200),
            "outcomes": dict(sorted(Counter(result.outcome for result in mine).items())),
            "details": dict(sorted(Counter(f"{result.outcome} {result.detail}" for result in mine).items())),
            "latency_ms": {
                "p50": round(statistics.median(latencies), 1) if latencies else None,
                "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
                "max": round(latencies[-1], 1) if latencies else None,
            },
        }
    return summary


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    """One line per target: ``livez  42 probes  200:40 503:2  p50 3.1 ms ...``."""
    lines = []
    for target, data in summary.items():
        outcomes = " ".join(f"{name}:{count}" for name, count in data["outcomes"].items()) or "-"
        latency = data["latency_ms"]
        lines.append(
            f"{target:8} {data['n']:4d} probes  {outcomes:40}  p50 {latency['p50']} ms  p95 {latency['p95']} ms  "
            f"max {latency['max']} ms"
        )
    return "\n".join(lines)
