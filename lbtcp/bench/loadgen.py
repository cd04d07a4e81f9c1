"""The load generator's engine: client protocols, the per-loop run, and the process fan-out.

Theory of operation. ``run_bench(spec)`` runs ``spec.processes`` event loops: in this process
when there is one, else in forked children that each take a share of the connections (and of
the ``--rate``) and stream cumulative ``Tally`` snapshots back over a pipe once per progress
interval, then a final one; the parent merges them (histograms merge exactly).

Within one loop (``_Run``) there is one worker task per connection slot:

* ``rr``: the slot keeps one connection open; its ``_EchoClient`` protocol sends a message,
  waits for the whole echo and sends the next from its callbacks (no ``await`` per request).
  After an error the worker reconnects, after ``RECONNECT_DELAY``.
* ``connect``: the worker opens a connection, the protocol exchanges one message and closes,
  and the worker starts the next session.
* ``stream``: the slot keeps one connection open and ``_StreamClient`` writes as fast as the
  transport's flow control allows; a sink never answers.

Every message is a slice of a random block at an offset that rotates per request and differs
per connection, and every echoed byte is compared with what was sent, so a corrupted, stale,
cross-wired or extra byte counts as a ``mismatch``.

Open loop (``--rate``): each slot owns a schedule of intended send times (``1 / per-slot
rate`` apart, phases spread across slots). A request is sent at its intended time, or at once
if the slot is behind, and its latency is counted from the intended time, so a stalled server
shows up as latency instead of silently lowering the offered load (no coordinated omission).

One sweeper timer per loop (not one timer per request) enforces ``--timeout`` on replies and on
stalled stream writes; connects are bounded by ``wait_for``. Counting (``_Run.counting``) is on
only between the end of the warmup and the end of the run. Times come from ``time.monotonic``.

Known limits: connect mode closes from the client side, so every session leaves a TIME_WAIT
socket on the generator. Linux reuses those on loopback (``net.ipv4.tcp_tw_reuse = 2``, the
default); towards another host, sustained rates above roughly 28,000 sessions per minute per
source address run out of ephemeral ports (``other`` errors, EADDRNOTAVAIL). Under ``--rate``
with uvloop, whose timers have millisecond resolution, a send can start up to about a
millisecond after its intended time, and that lateness is part of the measured latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import multiprocessing
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from typing import Any, cast

from lbtcp.addresses import format_address, parse_endpoint
from lbtcp.bench.report import Tally

MODES = ("rr", "connect", "stream")
LOOPS = ("uvloop", "asyncio")
# Distinct starting offsets (and a prime period) so no two connections send the same bytes.
PATTERN_PERIOD = 4093
_SLOT_STRIDE = 613
SCRATCH_SIZE = 256 * 1024
RECONNECT_DELAY = 0.01
STREAM_PUMP_BATCH = 64
MAX_SWEEP_INTERVAL = 0.1
MAX_PROBLEMS = 5

# Measurements use time.monotonic(): uvloop's loop.time() is milliseconds, cached per iteration.
_now = time.monotonic

ProgressCallback = Callable[[float, bool, Tally], None]
"""Called once per progress interval with (elapsed seconds, warming up, cumulative tally)."""


@dataclass(frozen=True)
class BenchSpec:
    """What to run. ``host`` is an IP address (see ``resolve_target``)."""

    mode: str
    target: str
    host: str
    port: int
    connections: int
    duration: float
    size: int
    rate: float | None = None
    warmup: float = 0.0
    timeout: float = 5.0
    processes: int = 1
    loop: str = "uvloop"
    progress_interval: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.loop not in LOOPS:
            raise ValueError(f"loop must be one of {', '.join(LOOPS)}")
        if self.connections < 1 or self.processes < 1 or self.size < 1:
            raise ValueError("connections, processes and size must be at least 1")
        if self.duration <= 0 or self.timeout <= 0 or self.warmup < 0:
            raise ValueError("duration and timeout must be positive, warmup not negative")
        if self.rate is not None and (self.rate <= 0 or self.mode == "stream"):
            raise ValueError("rate must be positive and applies to rr and connect only")

    @property
    def address(self) -> str:
        """The resolved address, bracketed if IPv6."""
        return format_address(self.host, self.port)

    def split(self) -> list[BenchSpec]:
        """One single-process spec per worker process, sharing connections and rate."""
        parts = min(self.processes, self.connections)
        base, extra = divmod(self.connections, parts)
        specs = []
        for i in range(parts):
            conns = base + (1 if i < extra else 0)
            rate = None if self.rate is None else self.rate * conns / self.connections
            specs.append(replace(self, connections=conns, rate=rate, processes=1))
        return specs


def resolve_target(target: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` -> (IP, port); a name is resolved once, here.

    Raises ValueError with an operator-facing message.
    """
    endpoint = parse_endpoint(target)  # AddressError is a ValueError
    if endpoint.port == 0:
        raise ValueError(f"{target!r}: port 0 cannot be connected to")
    if endpoint.is_ip:
        return endpoint.host, endpoint.port
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ValueError(f"cannot resolve {endpoint.host!r}: {exc}") from None
    return str(infos[0][4][0]), endpoint.port


def classify(exc: BaseException) -> str:
    """The error kind of the report for a connect or transport exception."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        return "reset"
    if isinstance(exc, OSError):
        code = exc.errno
        if code == errno.ECONNREFUSED:
            return "refused"
        if code in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
            return "reset"
        if code == errno.ETIMEDOUT:
            return "timeout"
    return "other"


@dataclass
class BenchResult:
    """The merged tally and anything that went wrong with the tool itself (not the target)."""

    tally: Tally
    problems: list[str] = field(default_factory=list)


class _Slot:
    """One connection slot: its payload rotation and open-loop schedule survive reconnects."""

    __slots__ = ("index", "interval", "next_at", "offset")

    def __init__(self, index: int, interval: float | None, first_at: float) -> None:
        self.index = index
        self.offset = (index * _SLOT_STRIDE) % PATTERN_PERIOD
        self.interval = interval
        self.next_at = first_at

    def take_send_time(self) -> float:
        """The next intended send time of this slot's schedule (open loop only)."""
        at = self.next_at
        assert self.interval is not None
        self.next_at = at + self.interval
        return at

    def take_offset(self) -> int:
        """The payload offset of the next message; the shift makes consecutive messages differ."""
        offset = self.offset
        self.offset = (offset + 1) % PATTERN_PERIOD
        return offset


class _Client(asyncio.BaseProtocol):
    """What the run needs of every client protocol (stop, timeouts, a closed future), and the
    teardown they share: failing, stopping and losing the connection.

    ``_pending`` is the one callback a client may have scheduled (the next send of an echo
    client, the next pump batch of a stream client); every way out cancels it.
    """

    __slots__ = ("_done", "_pending", "_run", "closed", "failed", "transport")

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._pending: asyncio.Handle | None = None
        self._done = False  # no more errors or requests: failed, finished or stopped
        self.failed = False
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = run.loop.create_future()

    def eof_received(self) -> bool:
        """The server closed its side early: before the full echo, on a kept-open echo
        connection, or a sink (a stream never ends on its own)."""
        self._fail("short_read")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called once when the connection is gone; wakes the worker."""
        if not self._done:
            self._fail("short_read" if exc is None else classify(exc))
        self._cancel_pending()
        self.transport = None
        self._run.active.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail(self, kind: str) -> None:
        if self._done:
            return
        self._done = True
        self.failed = True
        self._run.error(kind)
        self._cancel_pending()
        if self.transport is not None:
            self.transport.abort()  # nothing worth flushing to a broken or lying peer

    def _cancel_pending(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def stop(self) -> None:
        """The run is over: drop the connection without counting anything."""
        self._done = True
        self._cancel_pending()
        if self.transport is not None:
            self.transport.abort()

    def check_timeout(self, now: float, timeout: float) -> None:
        """Called by the sweeper: fail the client if it has waited for longer than ``timeout``."""
        raise NotImplementedError

    def buffered(self) -> int:
        """Bytes written to the transport but not yet handed to the kernel, at the window's
        edges (they were written before it, or will leave after it)."""
        raise NotImplementedError


class _EchoClient(_Client, asyncio.BufferedProtocol):
    """rr (kept open, many exchanges) or connect (``one_shot``: one exchange, then close)."""

    __slots__ = (
        "_end",
        "_got",
        "_offset",
        "_one_shot",
        "_slot",
        "_started_at",
        "_wrote_at",
    )

    def __init__(self, run: _Run, slot: _Slot, *, one_shot: bool, started_at: float) -> None:
        super().__init__(run)
        self._slot = slot
        self._one_shot = one_shot
        self._started_at = started_at
        self._wrote_at = 0.0
        self._offset = -1  # -1: no request outstanding
        self._end = 0
        self._got = 0

    # --- callbacks (called by the loop) ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The connect succeeded: start the first exchange (or its schedule)."""
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        run = self._run
        self.transport = transport
        run.active.add(self)
        if run.counting:
            run.tally.sessions += 1
        if not run.running:
            self.stop()
        elif self._one_shot:
            self._send(self._started_at)
        else:
            self._schedule_next()

    def get_buffer(self, sizehint: int) -> memoryview:
        """Before each read: the loop-wide scratch buffer (checked at once in buffer_updated)."""
        return self._run.scratch_view

    def buffer_updated(self, nbytes: int) -> None:
        """After each read: compare the bytes with what was sent; complete the exchange."""
        if self._done:
            return
        run = self._run
        if self._offset < 0:
            self._fail("mismatch")  # bytes nobody asked for
            return
        start = self._offset + self._got
        stop = start + nbytes
        # bytes slices compare with memcmp; memoryview == compares item by item (40x slower).
        if stop > self._end or run.scratch[:nbytes] != run.payload[start:stop]:
            self._fail("mismatch")
            return
        self._got += nbytes
        if run.counting:
            run.tally.bytes_received += nbytes
        if stop == self._end:
            self._complete()

    # --- the exchange ------------------------------------------------------------------------

    def _schedule_next(self) -> None:
        slot = self._slot
        if slot.interval is None:
            self._send(_now())
            return
        at = slot.take_send_time()
        delay = at - _now()
        if delay <= 0:
            self._send(at)  # behind schedule: send now, latency still counts from `at`
        else:
            self._pending = self._run.loop.call_later(delay, self._send, at)

    def _send(self, intended: float) -> None:
        self._pending = None
        transport = self.transport
        if self._done or transport is None or transport.is_closing():
            return
        run = self._run
        size = run.size
        offset = self._slot.take_offset()
        self._offset = offset
        self._end = offset + size
        self._got = 0
        now = _now()
        # uvloop's timers have millisecond resolution and may fire a little before `intended`:
        # then the request really starts now.
        self._started_at = min(intended, now)
        self._wrote_at = now
        if run.counting:
            run.tally.bytes_sent += size
        transport.write(run.payload_view[offset : offset + size])

    def _complete(self) -> None:
        run = self._run
        if run.counting:
            run.tally.requests += 1
            run.tally.latency_ns.record(int((_now() - self._started_at) * 1e9))
        self._offset = -1
        if self._one_shot:
            self._done = True
            if self.transport is not None:
                self.transport.close()
        else:
            self._schedule_next()

    # --- _Client -----------------------------------------------------------------------------

    def check_timeout(self, now: float, timeout: float) -> None:
        """Called by the sweeper: a reply outstanding for longer than ``timeout`` is a timeout."""
        if self._offset >= 0 and not self._done and now - self._wrote_at > timeout:
            self._fail("timeout")

    def buffered(self) -> int:
        """Nothing to correct for: rr and connect count bytes by exchange."""
        return 0


class _StreamClient(_Client, asyncio.Protocol):
    """Writes as fast as flow control allows; the peer (a sink) never answers."""

    __slots__ = ("_paused", "_paused_at")

    def __init__(self, run: _Run) -> None:
        super().__init__(run)
        self._paused = False
        self._paused_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The connect succeeded: start pumping."""
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        run = self._run
        self.transport = transport
        run.active.add(self)
        high = max(4 * run.size, 1024 * 1024)
        transport.set_write_buffer_limits(high=high, low=high // 4)
        if run.counting:
            run.tally.sessions += 1
        if not run.running:
            self.stop()
        else:
            self._pump()

    def _pump(self) -> None:
        self._pending = None
        transport = self.transport
        if self._done or self._paused or transport is None:
            return
        run = self._run
        chunk = run.chunk
        written = 0
        # A bounded batch per callback: a fast sink never blocks, and one connection must not
        # starve the others and the timers.
        for _ in range(STREAM_PUMP_BATCH):
            if transport.is_closing():
                break
            transport.write(chunk)  # may call pause_writing() before returning
            written += len(chunk)
            if self._paused:
                break
        else:
            self._pending = run.loop.call_soon(self._pump)
        if run.counting:
            run.tally.bytes_sent += written

    def pause_writing(self) -> None:
        """Called by the transport when its buffer passes the high-water mark."""
        self._paused = True
        self._paused_at = _now()

    def resume_writing(self) -> None:
        """Called by the transport when its buffer drains below the low-water mark."""
        self._paused = False
        if self._pending is None:
            self._pump()

    def data_received(self, data: bytes) -> None:
        """A sink sends nothing; count whatever comes so it shows in the report."""
        if self._run.counting:
            self._run.tally.bytes_received += len(data)

    # --- _Client -----------------------------------------------------------------------------

    def check_timeout(self, now: float, timeout: float) -> None:
        """Called by the sweeper: writes stalled for longer than ``timeout`` are a timeout."""
        if self._paused and not self._done and now - self._paused_at > timeout:
            self._fail("timeout")

    def buffered(self) -> int:
        """Bytes written to the transport but not yet handed to the kernel."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0


class _Run:
    """One event loop's share of a bench run."""

    def __init__(self, spec: BenchSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec = spec
        self.loop = loop
        self.size = spec.size
        self.tally = Tally()
        self.counting = False
        self.running = True
        self.active: set[_Client] = set()
        self.problems: list[str] = []
        self._problems_dropped = 0
        self.payload = os.urandom(spec.size + PATTERN_PERIOD)
        self.payload_view = memoryview(self.payload)
        self.chunk = self.payload[: spec.size]
        self.scratch = bytearray(SCRATCH_SIZE)
        self.scratch_view = memoryview(self.scratch)
        self._stop = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self._ticker: asyncio.TimerHandle | None = None

    def error(self, kind: str) -> None:
        """Count one error of ``kind``, if inside the counted window."""
        if self.counting:
            self.tally.errors[kind] = self.tally.errors.get(kind, 0) + 1

    def request_stop(self) -> None:
        """End the run early (SIGINT/SIGTERM); the report covers what was counted."""
        self._stop.set()

    def _exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError):
            return  # a transport error; connection_lost() counts it
        message = context.get("message", "unexpected error")
        if exc is not None:
            message += ": " + "".join(traceback.format_exception(exc)).rstrip()
        self._problem(message)

    def _problem(self, message: str) -> None:
        # A bug in a callback repeats on every connection: keep the report readable.
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self._problems_dropped += 1

    # --- workers -----------------------------------------------------------------------------

    async def _connect(self, protocol: _Client) -> bool:
        spec = self.spec
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: protocol, spec.host, spec.port), spec.timeout
            )
        except asyncio.TimeoutError:
            protocol.stop()  # in case the connect finished just as the timeout fired
            self.error("timeout")
            return False
        except OSError as exc:
            self.error(classify(exc))
            return False
        return True

    async def _kept_open_worker(self, slot: _Slot) -> None:
        while self.running:
            client: _Client
            if self.spec.mode == "stream":
                client = _StreamClient(self)
            else:
                client = _EchoClient(self, slot, one_shot=False, started_at=0.0)
            if await self._connect(client):
                await client.closed
                failed = client.failed
            else:
                failed = True
            if failed and self.running:
                # Reconnect storms are not what rr and stream measure; do not spin on errors.
                await asyncio.sleep(RECONNECT_DELAY)

    async def _session_worker(self, slot: _Slot) -> None:
        while self.running:
            if slot.interval is None:
                at = _now()
            else:
                at = slot.take_send_time()
                delay = at - _now()
                if delay > 0:
                    await asyncio.sleep(delay)
                    at = min(at, _now())  # the sleep may end early (see _EchoClient._send)
            client = _EchoClient(self, slot, one_shot=True, started_at=at)
            if await self._connect(client):
                await client.closed

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            self._problem("worker failed: " + "".join(traceback.format_exception(exc)).rstrip())
            self._stop.set()

    # --- the run -----------------------------------------------------------------------------

    async def _wait_until(self, deadline: float) -> bool:
        """Sleep until ``deadline``; False if a stop was requested first."""
        if self._stop.is_set():
            return False
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, deadline - _now()))
            return False
        return True

    def _sweep(self, interval: float) -> None:
        now = _now()
        timeout = self.spec.timeout
        for client in list(self.active):
            client.check_timeout(now, timeout)
        self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _tick(self, on_tick: ProgressCallback, started: float, count_at: float) -> None:
        now = _now()
        self._ticker = self.loop.call_later(
            self.spec.progress_interval, self._tick, on_tick, started, count_at
        )
        self.tally.window_s = max(0.0, now - count_at) if self.counting else 0.0
        on_tick(now - started, now < count_at, self.tally)

    async def run(self, on_tick: ProgressCallback | None) -> Tally:
        """Run to the end (or an early stop) and return the tally of the counted window."""
        spec, loop = self.spec, self.loop
        loop.set_exception_handler(self._exception_handler)
        started = _now()
        count_at = started + spec.warmup
        interval = None if spec.rate is None else spec.connections / spec.rate
        slots = [
            _Slot(
                i,
                interval,
                started + (0.0 if interval is None else interval * i / spec.connections),
            )
            for i in range(spec.connections)
        ]
        worker = self._session_worker if spec.mode == "connect" else self._kept_open_worker
        tasks = [loop.create_task(worker(slot)) for slot in slots]
        for task in tasks:
            task.add_done_callback(self._worker_done)
        sweep_every = min(MAX_SWEEP_INTERVAL, spec.timeout / 4)
        self._sweeper = loop.call_later(sweep_every, self._sweep, sweep_every)
        if on_tick is not None:
            self._ticker = loop.call_later(
                spec.progress_interval, self._tick, on_tick, started, count_at
            )
        counted_from = 0.0
        try:
            if await self._wait_until(count_at):
                # Bytes still buffered were written before the window but leave during it.
                self.tally.bytes_sent += sum(client.buffered() for client in self.active)
                self.counting = True
                counted_from = _now()
                await self._wait_until(counted_from + spec.duration)
                self.counting = False
                self.tally.window_s = _now() - counted_from
                self.tally.bytes_sent -= sum(client.buffered() for client in self.active)
        finally:
            self.counting = False
            self.running = False
            if self._sweeper is not None:
                self._sweeper.cancel()
            if self._ticker is not None:
                self._ticker.cancel()
            for task in tasks:
                task.cancel()
            clients = list(self.active)
            for client in clients:
                client.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Let connection_lost() run, so no transport outlives the loop.
            pending = [client.closed for client in clients if not client.closed.done()]
            if pending:
                await asyncio.wait(pending, timeout=1.0)
            if self._problems_dropped:
                self.problems.append(f"... and {self._problems_dropped} more like these")
        return self.tally


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _run_coroutine(
    kind: str, make: Callable[[asyncio.AbstractEventLoop], Coroutine[Any, Any, Any]]
) -> Any:
    loop = _new_loop(kind)
    try:
        return loop.run_until_complete(make(loop))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def run_local(
    spec: BenchSpec, on_tick: ProgressCallback | None = None, *, handle_signals: bool = True
) -> BenchResult:
    """Run ``spec`` (all of its connections) on one new event loop in this process.

    With ``handle_signals`` (and on the main thread), SIGINT/SIGTERM end the run early with a
    report instead of killing it.
    """

    async def main(loop: asyncio.AbstractEventLoop) -> BenchResult:
        run = _Run(spec, loop)
        signals = (signal.SIGINT, signal.SIGTERM)
        use_signals = handle_signals and threading.current_thread() is threading.main_thread()
        if use_signals:
            for sig in signals:
                loop.add_signal_handler(sig, run.request_stop)
        try:
            tally = await run.run(on_tick)
        finally:
            if use_signals:
                for sig in signals:
                    loop.remove_signal_handler(sig)
        return BenchResult(tally, run.problems)

    result: BenchResult = _run_coroutine(spec.loop, main)
    return result


def _child_main(spec: BenchSpec, conn: Connection) -> None:
    """A worker process: run, streaming snapshots to the parent, then the final tally."""
    try:

        def send_tick(elapsed: float, warming_up: bool, tally: Tally) -> None:
            conn.send(("tick", tally.to_dict()))

        result = run_local(spec, send_tick)
        conn.send(("final", result.tally.to_dict(), result.problems))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _merge(tallies: list[Tally]) -> Tally:
    merged = Tally()
    for tally in tallies:
        merged.merge(tally)
    return merged


def run_processes(spec: BenchSpec, on_tick: ProgressCallback | None = None) -> BenchResult:
    """Fork one process per share of ``spec.split()`` and merge their tallies."""
    specs = spec.split()
    ctx = multiprocessing.get_context("fork")
    parent_pid = os.getpid()
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: dict[Connection, int] = {}
    for index, sub in enumerate(specs):
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_main, args=(sub, writer), daemon=True)
        child.start()
        writer.close()
        procs.append(child)
        conns[reader] = index

    def forward(signum: int, frame: object) -> None:
        # Children inherit this handler until they install their own: act only in the parent.
        if os.getpid() != parent_pid:
            return
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    on_main = threading.current_thread() is threading.main_thread()
    previous = {}
    if on_main:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, forward)

    latest = [Tally() for _ in specs]
    finals: dict[int, Tally] = {}
    problems: list[str] = []
    started = time.monotonic()
    hard_deadline = started + spec.warmup + spec.duration + spec.timeout + 10.0
    next_tick = started + spec.progress_interval
    try:
        while conns:
            now = time.monotonic()
            if now >= hard_deadline:
                problems.append(f"{len(conns)} worker process(es) did not finish in time")
                break
            timeout = max(0.0, min(next_tick, hard_deadline) - now)
            for ready in wait(list(conns), timeout=timeout):
                assert isinstance(ready, Connection)
                reader = ready
                index = conns[reader]
                try:
                    message = reader.recv()
                except EOFError:
                    del conns[reader]
                    reader.close()
                    if index not in finals:
                        problems.append(f"worker process {index} exited without a result")
                    continue
                if message[0] == "tick":
                    latest[index] = Tally.from_dict(message[1])
                elif message[0] == "final":
                    finals[index] = Tally.from_dict(message[1])
                    problems.extend(message[2])
                else:
                    problems.append(f"worker process {index} failed:\n{message[1]}")
            now = time.monotonic()
            if now >= next_tick:
                next_tick += spec.progress_interval
                if on_tick is not None:
                    elapsed = now - started
                    merged = _merge([finals.get(i, latest[i]) for i in range(len(specs))])
                    on_tick(elapsed, elapsed < spec.warmup, merged)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            proc.join(timeout=2.0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        for reader in conns:
            reader.close()
    # A worker that died still contributes what it last reported.
    return BenchResult(_merge([finals.get(i, latest[i]) for i in range(len(specs))]), problems)


def run_bench(spec: BenchSpec, on_tick: ProgressCallback | None = None) -> BenchResult:
    """Run ``spec`` in this process, or fanned out over ``spec.processes`` processes."""
    if min(spec.processes, spec.connections) <= 1:
        return run_local(replace(spec, processes=1), on_tick)
    return run_processes(spec, on_tick)
