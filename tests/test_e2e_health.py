"""End-to-end health: ``lbtcp serve`` as a subprocess, probes and real traffic over 127.0.0.1.

The pure state machine is tested in virtual time in ``test_health.py``; these tests check what
an operator sees when real servers die, hang, blackhole and come back: the log lines, the
access-log codes, and which server each client's bytes reached.

Which server carried a session is observed at the servers themselves (``Tally``): a session
counts when client bytes arrive, so probe connections (which send nothing, or a ``PING`` that
the server answers separately) never count as traffic.

Every test takes ``backends`` before ``start_lbtcp``: fixtures are torn down in reverse order,
so lbtcp and its probes stop before the servers' event loop is closed, not during a probe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import cast

import pytest

from tests.support import Backends, Echo, Lbtcp, blackhole, wait_until

StartLbtcp = Callable[..., Lbtcp]

# Probe timing for every test here: short, and without jitter so that bounds are exact.
INTERVAL = 0.2
FAST_INTERVAL = 0.1
DOWN_INTERVAL = 0.2
PROBE_TIMEOUT = 0.15
RISE = 2
FALL = 3
FAST_HEALTH = f"""\
interval = "{INTERVAL * 1000:.0f}ms"
fast_interval = "{FAST_INTERVAL * 1000:.0f}ms"
down_interval = "{DOWN_INTERVAL * 1000:.0f}ms"
timeout = "{PROBE_TIMEOUT * 1000:.0f}ms"
rise = {RISE}
fall = {FALL}
jitter = 0
"""
PING_PONG = 'send = "PING\\r\\n"\nexpect = "PONG"\n'
# Scheduling slack on a busy two-core machine, for bounds measured across two processes.
SLACK = 0.25


# --- servers ---------------------------------------------------------------------------------


class Tally:
    """Which server received each client session, and when (wall clock, as lbtcp's log)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions: list[tuple[float, int]] = []

    def record(self, port: int) -> None:
        with self._lock:
            self.sessions.append((time.time(), port))

    def counts(self, since: float = 0.0, until: float = float("inf")) -> collections.Counter[int]:
        with self._lock:
            return collections.Counter(p for t, p in self.sessions if since <= t < until)


class TallyEcho(Echo):
    """An echo server that tallies sessions carrying client bytes. A ``PING`` (the probe's
    ``send``) is not counted; with ``pong`` it is answered with ``PONG``, else echoed."""

    def __init__(self, owner: Backends, port_box: list[int], tally: Tally, pong: bool) -> None:
        super().__init__(owner, port_box)
        self.tally = tally
        self.pong = pong
        self.counted = False

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if data.startswith(b"PING"):  # a probe, not a client
            self.transport.write(b"PONG\r\n" if self.pong else data)
            return
        if not self.counted:
            self.counted = True
            self.tally.record(self.port_box[0])
        super().data_received(data)


class Silent(Echo):
    """Accepts and reads, never answers: a hung application behind a live TCP stack."""

    def data_received(self, data: bytes) -> None:
        pass


class Wrong(Echo):
    """Answers anything with an error and closes: a live server in a bad state."""

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"ERR not ready\r\n")
        self.transport.close()


def serve(backends: Backends, tally: Tally, kind: str = "echo", port: int = 0) -> int:
    """Start a server of ``kind`` (echo, pong, silent, wrong) on ``port`` (0 = any)."""
    factories: dict[str, Callable[[list[int]], asyncio.Protocol]] = {
        "echo": lambda box: TallyEcho(backends, box, tally, pong=False),
        "pong": lambda box: TallyEcho(backends, box, tally, pong=True),
        "silent": lambda box: Silent(backends, box),
        "wrong": lambda box: Wrong(backends, box),
    }
    return backends.start(factories[kind], port)


def stop_server(backends: Backends, port: int) -> None:
    """Close a server's listening socket; its established connections go on.

    ``Backends.stop`` closes the listener at once, which races CPython's asyncio (3.11): a
    connection (here, often a probe) accepted just before, whose transport is built on the
    next loop turn, then fails in ``Server._attach`` and leaves an unclosed socket behind (a
    ResourceWarning, an error under ``filterwarnings = error``). So stop accepting first, let
    the transports of connections already accepted be built, then close.
    """
    server = cast(asyncio.Server, backends.servers.pop(port))
    loop = backends.loop

    async def close() -> None:
        for sock in server.sockets:
            loop.remove_reader(sock.fileno())
        for _ in range(3):  # an accepted connection's transport is built one turn later
            await asyncio.sleep(0)
        server.close()

    backends.call(close())


# --- clients ---------------------------------------------------------------------------------


def echo_once(address: tuple[str, int], payload: bytes, timeout: float = 3.0) -> str:
    """One session: send ``payload``, read the echo, close. "" on success, else what failed."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.sendall(payload)
            received = b""
            while len(received) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    return f"EOF after {len(received)} of {len(payload)} bytes"
                received += chunk
            return "" if received == payload else f"wrong reply {received!r}"
    except OSError as exc:
        return repr(exc)


def run_clients(address: tuple[str, int], count: int) -> list[str]:
    """``count`` sequential echo sessions; the errors (empty when all succeeded)."""
    errors = [echo_once(address, b"client %d" % index) for index in range(count)]
    return [error for error in errors if error]


@dataclass(frozen=True)
class Attempt:
    started: float  # wall clock
    elapsed: float  # seconds
    error: str  # "" on success


class ClientLoop:
    """Sequential echo clients at about ``rate`` per second in a thread, bounded in count and
    time. Each client's whole session runs under ``gate``, so that the test can act between
    two clients (``between_clients``)."""

    def __init__(
        self, address: tuple[str, int], rate: float, limit: int = 1000, seconds: float = 20.0
    ) -> None:
        self.address = address
        self.period = 1.0 / rate
        self.limit = limit
        self.seconds = seconds
        self.attempts: list[Attempt] = []
        self.gate = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the client loop did not stop"

    @contextlib.contextmanager
    def between_clients(self) -> Iterator[None]:
        with self.gate:
            yield

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        next_at = time.monotonic()
        for index in range(self.limit):
            delay = next_at - time.monotonic()
            if (delay > 0 and self._stop.wait(delay)) or self._stop.is_set():
                return
            if time.monotonic() > deadline:
                return
            next_at += self.period
            with self.gate:
                started, clock = time.time(), time.monotonic()
                error = echo_once(self.address, b"loop client %d" % index)
                self.attempts.append(Attempt(started, time.monotonic() - clock, error))

    def count(self) -> int:
        return len(self.attempts)

    def failures(self) -> list[Attempt]:
        return [attempt for attempt in self.attempts if attempt.error]


# --- config and log helpers ------------------------------------------------------------------


@dataclass(frozen=True)
class Srv:
    name: str
    port: int
    extra: str = ""


def health_config(
    servers: list[Srv],
    *,
    health: str | None = FAST_HEALTH,
    ejection: str = "consecutive_failures = 0",
    pool_extra: str = "",
    listener_extra: str = "",
) -> str:
    """One listener and pool ``app`` with named servers, probes and ejection settings.

    Passive ejection is off by default so that a test of the probes sees probe verdicts only.
    """
    lines = [
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        listener_extra,
        "[pools.app]",
        pool_extra,
    ]
    if health is not None:
        lines += ["[pools.app.health]", health]
    lines += ["[pools.app.ejection]", ejection]
    for server in servers:
        lines += [
            "[[pools.app.servers]]",
            f'name = "{server.name}"',
            f'address = "127.0.0.1:{server.port}"',
            server.extra,
        ]
    return "\n".join(lines) + "\n"


def state_pattern(server: str, new: str, old: str = r"\S+") -> str:
    # The state word ends at a space (the reason= field follows) or the line's end.
    return rf"server_state .*server={server} old={old} new={new}(?: |$)"


def logged_at(line: str) -> float:
    """The wall-clock time of a log line (its first field, as 2026-01-02T03:04:05.678Z)."""
    stamp = datetime.strptime(line.split(" ", 1)[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return stamp.replace(tzinfo=timezone.utc).timestamp()


def mark(lb: Lbtcp) -> int:
    """The index of the next log line, for ``wait_line(..., start=mark(lb))``."""
    return len(lb.lines)


def wait_healthy(lb: Lbtcp, names: list[str], timeout: float = 5.0) -> None:
    for name in names:
        lb.wait_line(state_pattern(name, "healthy"), timeout)


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


# --- 1. a server dies under load, and comes back ---------------------------------------------


def test_killed_server_is_marked_down_fast_no_client_fails_and_it_returns(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    tally = Tally()
    names = ["s1", "s2", "s3"]
    ports = [serve(backends, tally) for _ in names]
    lb = start_lbtcp(
        health_config(
            [Srv(n, p) for n, p in zip(names, ports, strict=True)],
            pool_extra='retries = 2\nconnect_timeout = "1s"',
        )
    )
    address = lb.address()
    wait_healthy(lb, names)

    with ClientLoop(address, rate=20, limit=600, seconds=30) as clients:
        wait_until(lambda: clients.count() >= 10, 10, "10 clients before the kill")
        with clients.between_clients():
            # Between two clients, so that no client connection sits in the accept queue of
            # the listener being closed: the kernel would reset it, and that is not the
            # balancer's doing.
            start = mark(lb)
            killed_at = time.time()
            stop_server(backends, ports[1])
        down_line = lb.wait_line(state_pattern("s2", "unhealthy"), 5, start)
        marked_down_after = logged_at(down_line) - killed_at
        detected = tally.counts(since=killed_at)

        seen = clients.count()
        wait_until(lambda: clients.count() >= seen + 5, 10, "clients while s2 is down")
        start = mark(lb)
        restarted_at = time.time()
        serve(backends, tally, "echo", ports[1])
        lb.wait_line(state_pattern("s2", "rising", "unhealthy"), 5, start)
        up_line = lb.wait_line(state_pattern("s2", "healthy", "rising"), 5, start)
        back_at = logged_at(up_line)
        wait_until(
            lambda: tally.counts(since=back_at)[ports[1]] >= 3, 10, "s2 to carry sessions again"
        )

    # Detection bound: the next probe is at most one interval away, then `fall` failures at
    # fast_interval, each failing within `timeout` (here they are refused at once).
    bound = INTERVAL + FALL * FAST_INTERVAL + PROBE_TIMEOUT + SLACK
    assert 0 < marked_down_after <= bound, f"marked down {marked_down_after:.3f}s after the kill"
    assert f"{FALL} consecutive failures (connection refused)" in down_line
    assert f"{RISE} consecutive successes" in up_line
    # Back after `rise` probes at down_interval / fast_interval, not after some long timer.
    assert back_at - restarted_at <= DOWN_INTERVAL + RISE * FAST_INTERVAL + SLACK
    # The kill really happened under traffic, and retries hid it from every client.
    in_window = [a for a in clients.attempts if killed_at <= a.started <= logged_at(down_line)]
    assert len(in_window) >= 2, "no client ran while the dead server was still in rotation"
    assert clients.failures() == []
    assert detected[ports[1]] == 0  # nothing reached the dead server (it was not listening)
    assert clients.count() >= 30


# --- 2. send/expect probes --------------------------------------------------------------------


def test_expect_probe_marks_hung_and_wrong_servers_down_and_keeps_the_good_one(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    tally = Tally()
    good = serve(backends, tally, "pong")
    hung = serve(backends, tally, "silent")
    wrong = serve(backends, tally, "wrong")
    lb = start_lbtcp(
        health_config(
            [Srv("good", good), Srv("hung", hung), Srv("wrong", wrong)],
            health=FAST_HEALTH + PING_PONG,
        )
    )
    address = lb.address()
    hung_line = lb.wait_line(state_pattern("hung", "unhealthy", "unknown"), 5)
    wrong_line = lb.wait_line(state_pattern("wrong", "unhealthy", "unknown"), 5)
    lb.wait_line(state_pattern("good", "healthy"), 5)
    assert "reply timed out after 0.15s" in hung_line
    assert "closed before the expected reply" in wrong_line

    # The TCP connects to hung/wrong succeed; only the reply check keeps them out.
    assert backends.accepted[hung] >= FALL and backends.accepted[wrong] >= FALL
    assert run_clients(address, 12) == []
    assert tally.counts() == {good: 12}
    # Several more probe rounds have passed by now: the good server never wavered.
    probed = backends.accepted[good]
    wait_until(lambda: backends.accepted[good] >= probed + 4, 10, "more probes of good")
    assert lb.matching(r"server_state .*server=good .*new=(failing|unhealthy)") == []
    assert lb.matching(r"server_state .*server=(hung|wrong) .*new=(rising|healthy)") == []


# --- 3. passive ejection of a blackholed server -----------------------------------------------


def test_blackholed_server_is_ejected_passively_and_then_costs_nothing(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    tally = Tally()
    a, b = serve(backends, tally), serve(backends, tally)
    with blackhole() as hole:
        lb = start_lbtcp(
            health_config(
                [Srv("a", a), Srv("b", b), Srv("hole", hole)],
                health=None,
                ejection='consecutive_failures = 2\nbase_time = "30s"\nmax_percent = 50',
                pool_extra='retries = 1\nconnect_timeout = "150ms"',
            )
        )
        address = lb.address()
        timings: list[tuple[float, float]] = []  # (started, elapsed)
        for index in range(30):
            started, clock = time.time(), time.monotonic()
            assert echo_once(address, b"client %d" % index) == ""
            timings.append((started, time.monotonic() - clock))
        ejected = lb.wait_line(r"server_ejected .*server=hole ", 5)
        lb.wait_line(state_pattern("hole", "ejected", "healthy"), 5)

    ejected_at = logged_at(ejected)
    before = [elapsed for started, elapsed in timings if started < ejected_at]
    after = [elapsed for started, elapsed in timings if started > ejected_at]
    # Round robin sends every third client to the hole first: each of those waits out the
    # connect timeout and is retried elsewhere, until the second failure ejects it. (The
    # threshold sits below 150 ms: uvloop's timers tick in whole milliseconds and may fire a
    # fraction of one early; a client that did not meet the hole takes a few ms.)
    slow = 0.12
    assert sum(1 for elapsed in before if elapsed >= slow) == 2
    assert len(after) >= 20
    assert max(after) < slow, "a client still paid the connect timeout after the ejection"
    assert "ejection=1" in ejected
    assert sum(tally.counts().values()) == 30
    wait_until(lambda: len(lb.matching(r" access ")) == 30, 5, "30 access lines")
    connect_ms = sorted(
        float(line.split("connect_ms=")[1].split()[0]) for line in lb.matching(r" access ")
    )
    assert connect_ms[-3] < 100 <= 140 <= connect_ms[-2], connect_ms


# --- 4. nothing healthy: the refusal ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["close", "reset", "banner"])
def test_all_servers_down_refuses_at_once_logs_once_and_recovers(
    backends: Backends, start_lbtcp: StartLbtcp, mode: str
) -> None:
    tally = Tally()
    ports = [serve(backends, tally), serve(backends, tally)]
    banner = b"503 no healthy upstream\r\n"
    listener_extra = f'no_healthy = "{mode}"'
    if mode == "banner":
        listener_extra += '\nno_healthy_banner = "503 no healthy upstream\\r\\n"'
    lb = start_lbtcp(
        health_config(
            [Srv("a", ports[0]), Srv("b", ports[1])],
            health=FAST_HEALTH + 'initial = "healthy"',
            pool_extra='retries = 2\nconnect_timeout = "1s"',
            listener_extra=listener_extra,
        )
    )
    address = lb.address()
    assert run_clients(address, 2) == []  # initial = "healthy": in service from the start
    for port in ports:
        stop_server(backends, port)
    lb.wait_line(r"pool_empty .*pool=app servers=2", 5)

    for _ in range(10):
        started = time.monotonic()
        if mode == "reset":
            # The RST may even beat connect() back to a busy client: that is a reset too.
            with pytest.raises(ConnectionResetError), socket.create_connection(address, 3) as sock:
                sock.recv(100)
        else:
            with socket.create_connection(address, timeout=3) as sock:
                assert read_to_eof(sock) == (banner if mode == "banner" else b"")
        elapsed = time.monotonic() - started
        assert elapsed < 0.05, f"a refusal took {elapsed * 1000:.1f} ms"
    wait_until(lambda: len(lb.matching(r"access .*server=- .*term=NH")) == 10, 5, "10 NH lines")
    assert len(lb.matching(r"pool_empty ")) == 1  # once per episode, not once per client

    start = mark(lb)
    serve(backends, tally, "echo", ports[0])
    lb.wait_line(r"pool_recovered .*pool=app healthy=1", 5, start)
    assert run_clients(address, 3) == []
    assert tally.counts() == {ports[0]: 1 + 3, ports[1]: 1}
    assert len(lb.matching(r"pool_recovered ")) == 1


# --- 5. backups -------------------------------------------------------------------------------


def test_backup_carries_traffic_only_while_every_primary_is_down(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    tally = Tally()
    p1, p2, spare = serve(backends, tally), serve(backends, tally), serve(backends, tally)
    lb = start_lbtcp(
        health_config([Srv("p1", p1), Srv("p2", p2), Srv("spare", spare, "backup = true")])
    )
    address = lb.address()
    wait_healthy(lb, ["p1", "p2", "spare"])

    phase = time.time()
    assert run_clients(address, 12) == []
    assert tally.counts(since=phase) == {p1: 6, p2: 6}

    start = mark(lb)
    stop_server(backends, p1)
    stop_server(backends, p2)
    lb.wait_line(state_pattern("p1", "unhealthy"), 5, start)
    lb.wait_line(state_pattern("p2", "unhealthy"), 5, start)
    phase = time.time()
    assert run_clients(address, 12) == []
    assert tally.counts(since=phase) == {spare: 12}
    # The backup is healthy, so the pool is not empty: nothing is refused, nothing logged.
    assert not [line for line in lb.lines[start:] if "pool_empty" in line]

    start = mark(lb)
    serve(backends, tally, "echo", p1)
    lb.wait_line(state_pattern("p1", "healthy"), 5, start)
    phase = time.time()
    assert run_clients(address, 12) == []
    assert tally.counts(since=phase) == {p1: 12}


# --- 6. slow start ----------------------------------------------------------------------------


def test_slow_start_ramps_the_returning_server_share_up_over_the_window(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    tally = Tally()
    steady, returning = serve(backends, tally), serve(backends, tally)
    window = 3.0
    lb = start_lbtcp(
        health_config(
            [Srv("steady", steady), Srv("back", returning)],
            ejection=f'consecutive_failures = 0\nslow_start = "{window:g}s"',
        )
    )
    address = lb.address()
    wait_healthy(lb, ["steady", "back"])
    start = mark(lb)
    stop_server(backends, returning)
    lb.wait_line(state_pattern("back", "unhealthy"), 5, start)
    start = mark(lb)
    serve(backends, tally, "echo", returning)
    recovered_at = logged_at(lb.wait_line(state_pattern("back", "healthy"), 5, start))

    with ClientLoop(address, rate=100, limit=500, seconds=window + 0.6) as clients:
        wait_until(lambda: time.time() > recovered_at + window + 0.5, window + 5, "the ramp window")
    assert clients.failures() == []

    bucket = 0.5
    shares: list[float] = []
    for k in range(int(window / bucket) + 1):  # six buckets in the ramp, one after it
        counts = tally.counts(recovered_at + k * bucket, recovered_at + (k + 1) * bucket)
        total = counts[steady] + counts[returning]
        assert total >= 15, f"too few sessions in bucket {k} ({total}) to measure a share"
        shares.append(counts[returning] / total)
    ramp, after = shares[:-1], shares[-1]
    # Weight factor 0.1 -> 1.0 linearly: the share f/(1+f) goes about .15 .25 .32 .39 .44 .48
    # over the buckets, then .5 at full weight.
    assert ramp[0] < 0.3, shares
    assert ramp[-1] > 0.38, shares
    assert 0.4 <= after <= 0.6, shares
    assert all(later >= earlier - 0.1 for earlier, later in itertools.pairwise(ramp)), shares
    assert _correlation(list(range(len(ramp))), ramp) > 0.8, shares


def _correlation(xs: list[int], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    vx = sum((x - mx) ** 2 for x in xs)
    vy = sum((y - my) ** 2 for y in ys)
    return cov / (vx * vy) ** 0.5 if vx and vy else 0.0


# --- 7. on_server_down ------------------------------------------------------------------------


@pytest.mark.parametrize("on_down", ["close", "keep"])
def test_on_server_down_closes_or_keeps_live_sessions(
    backends: Backends, start_lbtcp: StartLbtcp, on_down: str
) -> None:
    tally = Tally()
    ports = {"a": serve(backends, tally), "b": serve(backends, tally)}
    lb = start_lbtcp(
        health_config(
            [Srv(name, port) for name, port in ports.items()],
            pool_extra=f'on_server_down = "{on_down}"',
        )
    )
    address = lb.address()
    wait_healthy(lb, list(ports))
    live: dict[str, socket.socket] = {}
    for _ in ports:
        sock = socket.create_connection(address, timeout=3)
        before = tally.counts()
        sock.sendall(b"hello")
        assert sock.recv(100) == b"hello"
        (port,) = (tally.counts() - before).keys()
        live[next(name for name, p in ports.items() if p == port)] = sock
    assert sorted(live) == ["a", "b"]  # round robin put one session on each server

    try:
        start = mark(lb)
        # Closing only the listening socket: probes are refused, but the established
        # session to b still works, so whatever ends it is lbtcp's decision.
        stop_server(backends, ports["b"])
        lb.wait_line(state_pattern("b", "unhealthy"), 5, start)
        doomed = live["b"]
        if on_down == "close":
            with contextlib.suppress(ConnectionResetError):
                assert doomed.recv(100) == b""
            lb.wait_line(r"access .*server=b .*bytes_in=5 bytes_out=5 term=SD$", 5)
        else:
            doomed.sendall(b"still here")
            assert doomed.recv(100) == b"still here"
        # The session on the healthy server is untouched either way.
        live["a"].sendall(b"and here")
        assert live["a"].recv(100) == b"and here"
    finally:
        for sock in live.values():
            sock.close()
    wait_until(lambda: len(lb.matching(r"access ")) == 2, 5, "both sessions logged")
    assert len(lb.matching(r"term=SD")) == (1 if on_down == "close" else 0)


# --- 8. panic threshold -----------------------------------------------------------------------


@pytest.mark.parametrize(("threshold", "spread"), [(50, True), (0, False)])
def test_panic_threshold_spreads_over_unhealthy_servers(
    backends: Backends, start_lbtcp: StartLbtcp, threshold: int, spread: bool
) -> None:
    tally = Tally()
    good = serve(backends, tally, "pong")
    # Plain echo servers answer "PING" with "PING", never "PONG": their probes fail while
    # they carry real traffic perfectly well.
    sick = [serve(backends, tally), serve(backends, tally)]
    lb = start_lbtcp(
        health_config(
            [Srv("good", good), Srv("sick1", sick[0]), Srv("sick2", sick[1])],
            health=FAST_HEALTH + PING_PONG,
            pool_extra=f"panic_threshold = {threshold}",
        )
    )
    address = lb.address()
    # Every server starts unknown, so the pool starts empty; the line says what that means.
    empty = lb.wait_line(r"pool_empty ", 5)
    assert ("panic, new clients go to any primary" in empty) == spread, empty
    lb.wait_line(state_pattern("sick1", "unhealthy"), 5)
    lb.wait_line(state_pattern("sick2", "unhealthy"), 5)
    lb.wait_line(state_pattern("good", "healthy"), 5)
    assert run_clients(address, 30) == []
    # 1 of 3 healthy is 33 %, below a threshold of 50 %: panic balances over all three.
    expected = {good: 10, sick[0]: 10, sick[1]: 10} if spread else {good: 30}
    assert tally.counts() == expected
