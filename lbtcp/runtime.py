"""Wiring: build pools and listeners from a config, run them, stop on signals.

SIGTERM drains: the listening sockets close (new clients get ECONNREFUSED), live sessions may
finish for up to ``drain_timeout``, then the rest are closed (``ST``) and the process exits 0.
From the first stop signal ``draining`` is true (``/healthz`` answers 503); the admin server,
on the same loop, keeps answering through the drain and is closed last. SIGINT closes
everything at once. SIGHUP is caught (so that it cannot kill the process by
default) and logged: configuration reload is not implemented yet.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

from lbtcp import __version__
from lbtcp.admin.routes import Router
from lbtcp.admin.server import AdminServer
from lbtcp.config import Config
from lbtcp.counters import ReloadStats
from lbtcp.discovery import Discovery
from lbtcp.events import (
    EjectionSkipped,
    Event,
    PoolEmpty,
    PoolRecovered,
    ServerAdded,
    ServerEjected,
    ServerStateChanged,
)
from lbtcp.health import AdminAction, State
from lbtcp.listener import Listener
from lbtcp.log import Log
from lbtcp.pool import Pool
from lbtcp.probes import Prober
from lbtcp.relay import TERM_SERVER_DOWN, TERM_SHUTDOWN

# While a server is in slow start its weight is refreshed this often.
SLOW_START_STEP = 0.25

DRAIN_POLL = 0.05


class Runtime:
    """One lbtcp process: its pools, listeners and the stop logic."""

    def __init__(self, config: Config, log: Log | None = None) -> None:
        self.config = config
        self.log = log or Log(config.global_.log_format, config.global_.access_log)
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, Listener] = {}
        self.probers: dict[str, Prober] = {}
        self._pool_timers: dict[str, asyncio.TimerHandle] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.discovery: Discovery | None = None
        self._stop_requested: asyncio.Event | None = None
        self._stop_mode = "drain"
        # True from the moment a stop starts: /healthz answers 503 so that a fronting load
        # balancer or Kubernetes takes this instance out while live sessions drain.
        self.draining = False
        self.admin: AdminServer | None = None

    def build(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for name, pool_config in self.config.pools.items():
            self.pools[name] = Pool.from_config(pool_config, now=loop.time())
        for name, listener_config in self.config.listeners.items():
            self.listeners[name] = Listener(
                listener_config, self.pools[listener_config.pool], self.log, loop, self.on_events
            )

    def start_health(self) -> None:
        """Probes for pools with a [health] table; the timer of every pool's health machine."""
        assert self._loop is not None
        for name, pool in self.pools.items():
            self.on_events(pool, pool.initial_events)
            pool.initial_events = []
            if pool.config.health is not None:
                prober = Prober(pool, self._loop, self.on_events)
                self.probers[name] = prober
                prober.start()
            self._arm_pool_timer(pool)

    def stop_health(self) -> None:
        for prober in self.probers.values():
            prober.close()
        for timer in self._pool_timers.values():
            timer.cancel()
        self._pool_timers.clear()

    # --- health events -------------------------------------------------------------------

    def on_events(self, pool: Pool, events: list[Event]) -> None:
        """Log the core's events and act on them (close sessions, reschedule probes)."""
        prober = self.probers.get(pool.name)
        for event in events:
            if isinstance(event, ServerAdded):
                if prober is not None:
                    prober.reschedule(event.server)
            elif isinstance(event, ServerStateChanged):
                self.log.event(
                    "server_state",
                    event.reason,
                    pool=event.pool,
                    server=event.server,
                    old=event.old.value,
                    new=event.new.value,
                    # The category, for filtering: probe, passive, dns, admin, removed, ...
                    reason=event.reason.partition(":")[0].strip(),
                )
                if event.marked_down and pool.config.on_server_down == "close":
                    self._close_server_sessions(pool, event.server)
                if prober is not None:
                    if event.new is State.REMOVED:
                        prober.forget(event.server)
                    else:
                        prober.reschedule(event.server)
            elif isinstance(event, ServerEjected):
                self.log.event(
                    "server_ejected",
                    "passive: consecutive connect failures",
                    pool=event.pool,
                    server=event.server,
                    ejection=event.count,
                    duration_s=round(event.duration, 3),
                )
            elif isinstance(event, EjectionSkipped):
                self.log.event(
                    "ejection_skipped",
                    "not ejected: the pool's max_percent is reached",
                    pool=event.pool,
                    server=event.server,
                    ejected=event.ejected,
                    servers=event.total,
                )
            elif isinstance(event, PoolEmpty):
                self.log.event(
                    "pool_empty",
                    # With a panic threshold the clients are not refused but spread over
                    # every primary (pool.py rule 4): say so rather than mislead.
                    "no healthy server: panic, new clients go to any primary"
                    if pool.panic_threshold
                    else "no healthy server: new clients are refused",
                    pool=event.pool,
                    servers=event.servers,
                )
            elif isinstance(event, PoolRecovered):
                self.log.event(
                    "pool_recovered",
                    "a server is healthy again: serving",
                    pool=event.pool,
                    healthy=event.eligible,
                )
        self._arm_pool_timer(pool)

    def _close_server_sessions(self, pool: Pool, server_name: str) -> None:
        server = pool.servers.get(server_name)
        if server is None:
            return
        for listener in self.listeners.values():
            if listener.pool is pool:
                for session in listener.sessions_of(server):
                    session.close(TERM_SERVER_DOWN)

    def _arm_pool_timer(self, pool: Pool) -> None:
        """Keep one timer per pool at the health machine's next deadline (or the next
        slow-start step)."""
        loop = self._loop
        if loop is None or self._stop_requested is None or self._stop_requested.is_set():
            return
        deadline = pool.next_deadline()
        if pool.ramping:
            step = loop.time() + SLOW_START_STEP
            deadline = step if deadline is None else min(deadline, step)
        current = self._pool_timers.get(pool.name)
        if current is not None and deadline is not None and current.when() <= deadline:
            # Keep the earlier timer (firing early is harmless: tick re-arms). Re-arming on
            # every call would push a slow-start step back forever, since probe results call
            # this more often than every SLOW_START_STEP and the ramp then never advances.
            return
        old = self._pool_timers.pop(pool.name, None)
        if old is not None:
            old.cancel()
        if deadline is not None:
            self._pool_timers[pool.name] = loop.call_at(deadline, self._pool_tick, pool)

    def _pool_tick(self, pool: Pool) -> None:
        """Timer callback: run the pool's due health timers."""
        self._pool_timers.pop(pool.name, None)
        assert self._loop is not None
        self.on_events(pool, pool.tick(self._loop.time()))

    @property
    def active_sessions(self) -> int:
        return sum(listener.active for listener in self.listeners.values())

    # --- runtime control (the admin API) ------------------------------------------------

    def server_admin(self, pool_name: str, server_name: str, action: AdminAction) -> None:
        """Drain, enable or disable a server; the state change is logged by ``on_events``.
        KeyError if there is no such pool or server."""
        assert self._loop is not None
        pool = self.pools[pool_name]
        self.on_events(pool, pool.admin(server_name, action, self._loop.time()))

    def server_weight(self, pool_name: str, server_name: str, weight: int) -> None:
        """Set a server's weight at runtime (0..256). KeyError / ValueError on bad input."""
        assert self._loop is not None
        pool = self.pools[pool_name]
        old = pool.set_weight(server_name, weight, self._loop.time())
        if old == weight:
            return  # nothing changed, nothing to log (as a repeated drain)
        self.log.event(
            "server_weight",
            "admin: weight",
            pool=pool_name,
            server=server_name,
            old=old,
            new=weight,
            reason="admin",
        )

    async def _start_admin(self, loop: asyncio.AbstractEventLoop) -> None:
        """The admin API, on the data plane's loop. Raises OSError if it cannot bind."""
        admin_config = self.config.admin
        if admin_config is None:
            return
        router = Router(self, admin_config, self._on_admin_error)
        self.admin = AdminServer(str(admin_config.listen), router.handle, self.log, loop)
        await self.admin.start()
        self.log.event(
            "admin_listening",
            "admin API serving",
            address=self.admin.address,
            auth="token" if admin_config.token else "none",
        )

    def _on_admin_error(self, what: str, exc: BaseException) -> None:
        self.log.event("admin_error", f"{what} failed", error=f"{type(exc).__name__}: {exc}")

    def request_stop(self, mode: str) -> None:
        """Signal handler: ``drain`` (SIGTERM) or ``now`` (SIGINT)."""
        if self._stop_requested is None:
            return
        self.draining = True
        if self._stop_requested.is_set():
            if mode == "now":
                self._stop_mode = "now"  # a second signal may cut a drain short
                self._close_all()
            return
        self._stop_mode = mode
        self._stop_requested.set()

    def _close_all(self) -> None:
        for listener in self.listeners.values():
            listener.close_sessions(TERM_SHUTDOWN)

    async def run(self) -> int:
        """Serve until a stop signal. Returns the exit code."""
        # Wall clock, for uptime and /status; the start is the first successful config load.
        self.started_at = time.time()
        self.reloads = ReloadStats(self.started_at)
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self.log.use_timer(loop.call_later)
        self.build(loop)
        self.discovery = Discovery(self.config, self.pools, loop, self.log, self.on_events)
        await self.discovery.start()
        try:
            for listener in self.listeners.values():
                await listener.start()
            await self._start_admin(loop)
        except OSError as exc:
            self.log.event("error", f"cannot listen: {exc.strerror or exc}", error=str(exc))
            for listener in self.listeners.values():
                listener.stop_accepting()
            if self.admin is not None:
                self.admin.close()
            await self.discovery.close()
            return 1
        for listener in self.listeners.values():
            for address in listener.addresses:
                self.log.event(
                    "listening", listener=listener.name, address=address, pool=listener.pool.name
                )
        self.start_health()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "drain")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "now")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        self.log.event(
            "start",
            f"lbtcp {__version__} serving",
            pid=os.getpid(),
            config=self.config.source,
            listeners=len(self.listeners),
            pools=len(self.pools),
        )
        await self._stop_requested.wait()
        await self._stop(loop)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        return 0

    def _on_sighup(self) -> None:
        self.log.event("reload", "SIGHUP ignored: configuration reload is not implemented yet")

    async def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        for listener in self.listeners.values():
            listener.stop_accepting()
        self.stop_health()
        if self.discovery is not None:
            await self.discovery.close()
        drain_timeout = self.config.global_.drain_timeout
        if self._stop_mode == "drain" and self.active_sessions:
            self.log.event(
                "drain",
                "stopped accepting; waiting for live sessions",
                sessions=self.active_sessions,
                timeout_s=drain_timeout,
            )
            deadline = loop.time() + drain_timeout
            # A count across listeners, polled: 50 ms is fine grain for a drain.
            while self.active_sessions and loop.time() < deadline:
                if self._stop_mode != "drain":
                    break
                await asyncio.sleep(DRAIN_POLL)
        left = self.active_sessions
        self._close_all()
        # Let the closes run their connection_lost callbacks so every session is logged.
        for _ in range(100):
            if not self.active_sessions:
                break
            await asyncio.sleep(0.01)
        # The admin API closes last: /healthz says 503 and /status stays readable throughout.
        if self.admin is not None:
            self.admin.close()
        self.log.event("stop", "lbtcp stopped", closed_sessions=left)
        self.log.flush()


def serve(config: Config) -> int:
    """Run lbtcp on uvloop until stopped; returns the process exit code."""
    import uvloop

    runtime = Runtime(config)
    try:
        return uvloop.run(runtime.run())
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the handler was installed
        return 0
    finally:
        runtime.log.flush()
        sys.stderr.flush()
