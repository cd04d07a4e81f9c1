"""Active health probes: a TCP connect, optionally a send and an expected reply.

Theory of operation. One ``Prober`` per pool with a ``[health]`` table. It keeps at most one
timer and one probe in flight per server. When to probe is the pure core's decision
(``PoolHealth.next_probe_at``: ``interval`` while healthy, ``fast_interval`` while changing
state, ``down_interval`` while down, each with jitter; the first probes of a pool are spread
over one interval rather than fired in a burst). After each probe the result goes to the pool,
the events come back to the runtime, and the next probe is scheduled. A state change from
elsewhere (passive ejection, an operator) reschedules the server's next probe.

A probe succeeds when the connect succeeds within ``timeout`` and, if ``expect`` is set, the
bytes received (after sending ``send``) contain ``expect`` before the same deadline. Probe
connections are closed with an RST, as HAProxy does, so that frequent probes leave no
TIME_WAIT sockets behind.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from time import monotonic

from lbtcp.config import HealthConfig
from lbtcp.events import Event
from lbtcp.health import ProbeResult
from lbtcp.pool import Pool, ProbeRecord
from lbtcp.proxy_protocol import encode
from lbtcp.relay import reset_transport

MAX_EXPECT_BUFFER = 64 * 1024


class _ProbeProtocol(asyncio.Protocol):
    """Collects the reply of one probe and resolves ``done`` when the verdict is known."""

    def __init__(self, expect: bytes, done: asyncio.Future[tuple[ProbeResult, str]]) -> None:
        self.expect = expect
        self.done = done
        self.received = bytearray()

    def _settle(self, result: ProbeResult, detail: str) -> None:
        if not self.done.done():
            self.done.set_result((result, detail))

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.expect in self.received:
            self._settle(ProbeResult.OK, "expect matched")
        elif len(self.received) > MAX_EXPECT_BUFFER:
            self._settle(ProbeResult.FAIL, "reply too long without the expected bytes")
            del self.received[: -len(self.expect)]

    def eof_received(self) -> bool:
        self._settle(ProbeResult.FAIL, "closed before the expected reply")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "closed before the expected reply"
        self._settle(ProbeResult.FAIL, reason)


async def probe_once(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    health: HealthConfig,
    preface: bytes = b"",
) -> tuple[ProbeResult, str]:
    """Run one probe; return the result and a short detail for the log. ``preface`` (a PROXY
    header, with ``health.send_proxy``) is written first, before ``send``."""
    done: asyncio.Future[tuple[ProbeResult, str]] = loop.create_future()
    transport: asyncio.BaseTransport | None = None

    async def attempt() -> tuple[ProbeResult, str]:
        nonlocal transport
        try:
            transport, _ = await loop.create_connection(
                lambda: _ProbeProtocol(health.expect, done), host, port
            )
        except ConnectionRefusedError:
            return ProbeResult.FAIL, "connection refused"
        except OSError as exc:
            return ProbeResult.FAIL, f"connect failed: {exc.strerror or exc}"
        if preface:
            transport.write(preface)
        if health.send:
            transport.write(health.send)
        if not health.expect:
            return ProbeResult.OK, "connected"
        return await done

    try:
        return await asyncio.wait_for(attempt(), health.timeout)
    except asyncio.TimeoutError:
        what = "connect" if transport is None else "reply"
        return ProbeResult.TIMEOUT, f"{what} timed out after {health.timeout:g}s"
    finally:
        if transport is not None and not transport.is_closing():
            if (health.send or preface) and not health.expect:
                # Nothing to wait for, but the bytes must reach the server: a graceful
                # close flushes them first (an RST could discard them).
                transport.close()
            else:
                reset_transport(transport)


class Prober:
    """Schedules and runs the active probes of one pool."""

    def __init__(
        self,
        pool: Pool,
        loop: asyncio.AbstractEventLoop,
        on_events: Callable[[Pool, list[Event]], None],
        rng: random.Random | None = None,
    ) -> None:
        assert pool.config.health is not None
        self.pool = pool
        self.health = pool.config.health
        self.loop = loop
        self.on_events = on_events
        self.rng = rng or random.Random()
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.in_flight: dict[str, asyncio.Task[None]] = {}
        self.probes_total: dict[str, int] = {"ok": 0, "fail": 0, "timeout": 0}
        # HAProxy's check-send-proxy: a header that names no client (v2 LOCAL, v1 UNKNOWN).
        version = pool.config.proxy_protocol
        self.preface = (
            encode(version, None, None) if self.health.send_proxy and version != "off" else b""
        )
        self.closed = False

    def start(self) -> None:
        for name, at in self.pool.health.first_probe_times(self.loop.time()).items():
            self._schedule(name, at)

    def reschedule(self, name: str) -> None:
        """The server's state changed elsewhere: probe it when its new state says."""
        if self.closed or name in self.in_flight:
            return  # an in-flight probe reschedules itself when it ends
        at = self.pool.health.next_probe_at(name, self.loop.time(), self.rng)
        if at is None:
            self._cancel_timer(name)
        else:
            self._schedule(name, at)

    def forget(self, name: str) -> None:
        """The server left the pool."""
        self._cancel_timer(name)
        task = self.in_flight.pop(name, None)
        if task is not None:
            task.cancel()

    def close(self) -> None:
        self.closed = True
        for name in list(self.timers):
            self._cancel_timer(name)
        for task in self.in_flight.values():
            task.cancel()
        self.in_flight.clear()

    def _cancel_timer(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _schedule(self, name: str, at: float) -> None:
        self._cancel_timer(name)
        self.timers[name] = self.loop.call_at(at, self._launch, name)

    def _launch(self, name: str) -> None:
        """Timer callback: start the probe of ``name``."""
        self.timers.pop(name, None)
        server = self.pool.servers.get(name)
        if server is None or self.closed:
            return
        self.in_flight[name] = self.loop.create_task(self._run(name, server.host, server.port))

    async def _run(self, name: str, host: str, port: int) -> None:
        # monotonic(), not loop.time(): uvloop's clock ticks in whole milliseconds.
        started = monotonic()
        try:
            result, detail = await probe_once(self.loop, host, port, self.health, self.preface)
        finally:
            self.in_flight.pop(name, None)
        server = self.pool.servers.get(name)
        if self.closed or server is None:
            return
        self.probes_total[result.value] += 1
        now = self.loop.time()
        server.health_checks[result.value] += 1
        server.last_probe = ProbeRecord(result.value, detail, monotonic() - started, now)
        events = self.pool.probe_result(name, result, now, detail)
        try:
            self.on_events(self.pool, events)
        except Exception as exc:  # a logging bug must not stop the probes
            self.loop.call_exception_handler(
                {"message": "probe event handling failed", "exception": exc}
            )
        at = self.pool.health.next_probe_at(name, self.loop.time(), self.rng)
        if at is not None and not self.closed:
            self._schedule(name, at)
