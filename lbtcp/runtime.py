"""Wiring: build pools and listeners from a config, run them, stop on signals.

SIGTERM drains: with ``shutdown_grace``, lbtcp first reports that it is going away
(``draining``: /healthz 503, systemd ``STOPPING=1``) while it still accepts, for that long; then
the listening sockets close (new clients get ECONNREFUSED), live sessions may finish for up to
``drain_timeout``, then the rest are closed (``ST``) and the process exits 0. From the first
stop signal ``draining`` is true (``/healthz`` answers 503); the admin server, on the same
loop, keeps answering through the drain and is closed last. SIGINT closes everything at once.
SIGHUP reloads the config file in place (``reload``; DESIGN.md §3; what changes is planned by
``lbtcp.reload``, applied here).

Start-up order: sockets (listeners, systemd's, admin) are bound first, then privileges are
dropped, then health starts; systemd hears ``READY=1`` once the first health verdicts are in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from lbtcp import __version__
from lbtcp.admin.routes import Router
from lbtcp.admin.server import AdminServer
from lbtcp.balancing import Balancer, BalancerError
from lbtcp.config import AdminConfig, Config, ConfigError, load_config
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
from lbtcp.listener import Listener, bind_socket
from lbtcp.log import Log
from lbtcp.pool import Pool
from lbtcp.privileges import PrivilegeError, drop_privileges
from lbtcp.probes import Prober
from lbtcp.relay import TERM_SERVER_DOWN, TERM_SHUTDOWN
from lbtcp.reload import ReloadPlan, ReloadResult, plan_reload
from lbtcp.systemd import ListenFdsError, Notifier, check_listening, take_listen_fds

if TYPE_CHECKING:
    from lbtcp.fleet.watcher import Fleet

# While a server is in slow start its weight is refreshed this often.
SLOW_START_STEP = 0.25

DRAIN_POLL = 0.05

# After a reload moves the admin API, the old address keeps serving this long (the request
# that asked for the reload gets its answer there).
ADMIN_HANDOFF = 1.0

# How often STATUS= is refreshed for systemd (sent only when it changed).
STATUS_INTERVAL = 2.0


class BindError(Exception):
    """A listener's socket could not be opened (port in use, fd not passed, ...)."""


class Runtime:
    """One lbtcp process: its pools, listeners and the stop logic."""

    # With workers > 1 the parent's listeners only hold the sockets (lbtcp.workers.supervisor).
    listener_type: type[Listener] = Listener

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
        # True from the moment a stop starts (SIGTERM; before the shutdown grace): /healthz
        # answers 503 so that a fronting load balancer or Kubernetes takes this instance out
        # while it still accepts, then while live sessions drain.
        self.draining = False
        self.admin: AdminServer | None = None
        self._retired_admins: set[AdminServer] = set()  # moved by a reload, closing soon
        self._stop_now: asyncio.Event | None = None
        # systemd: notify socket, and the sockets passed by socket activation (by fd name).
        self.notifier = Notifier({})  # replaced by the environment's in run()
        self.fd_sockets: dict[str, list[socket.socket]] = {}
        self._ready = False
        self._serving = False  # from the start line on: reloads are taken
        self._status_text = ""
        self._status_timer: asyncio.TimerHandle | None = None
        self._ready_timer: asyncio.TimerHandle | None = None
        # Reload: removed listeners still draining, and the last result (the counters of
        # DESIGN.md §7 are ``reloads``, made in run()).
        self.retired: set[Listener] = set()
        self._reload_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.last_reload: ReloadResult | None = None
        # [fleet]: shared desired state in etcd (lbtcp.fleet, imported only when configured).
        self.fleet: Fleet | None = None

    def build(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for name, pool_config in self.config.pools.items():
            self.pools[name] = Pool.from_config(pool_config, now=loop.time())
        for name, listener_config in self.config.listeners.items():
            self.listeners[name] = self.listener_type(
                listener_config,
                self.pools[listener_config.pool],
                self.log,
                loop,
                self.on_events,
                pools=self.pools,
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
        if self.fleet is not None and events:
            self.fleet.on_pool_events(pool, events)
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
        if not self._ready and self._ready_timer is not None:
            self._check_ready()

    def _close_server_sessions(self, pool: Pool, server_name: str) -> None:
        server = pool.servers.get(server_name)
        if server is None:
            return
        for listener in self.listeners.values():
            if pool in listener.pools:  # the default pool, or one of its SNI routes'
                for session in listener.sessions_of(server):
                    session.close(TERM_SERVER_DOWN)

    def _arm_pool_timer(self, pool: Pool) -> None:
        """Keep one timer per pool at the health machine's next deadline (or the next
        slow-start step)."""
        loop = self._loop
        if loop is None or self._stop_requested is None or self._stop_requested.is_set():
            return
        if self.pools.get(pool.name) is not pool:
            return  # removed by a reload: late events (a retired listener's connects) only
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
        return sum(listener.active for listener in self.listeners.values()) + sum(
            listener.active for listener in self.retired
        )

    # --- runtime control (the admin API) ------------------------------------------------

    def server_admin(self, pool_name: str, server_name: str, action: AdminAction) -> None:
        """Drain, enable or disable a server; the state change is logged by ``on_events``.
        KeyError if there is no such pool or server."""
        assert self._loop is not None
        pool = self.pools[pool_name]
        if self.fleet is not None and server_name in pool.servers:
            # The stricter of this local decision and the fleet's override applies.
            action = self.fleet.local_action(pool_name, server_name, action)
        self.on_events(pool, pool.admin(server_name, action, self._loop.time()))

    def server_weight(self, pool_name: str, server_name: str, weight: int) -> None:
        """Set a server's weight at runtime (0..256). KeyError / ValueError on bad input."""
        assert self._loop is not None
        pool = self.pools[pool_name]
        old = pool.set_weight(server_name, weight, self._loop.time())
        if self.fleet is not None:
            self.fleet.local_weight[(pool_name, server_name)] = weight  # wins over the fleet's
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
        if not self.draining:
            self.draining = True
            self.notifier.stopping(f"stopping; {self.status_text()}")
        if self._stop_requested.is_set():
            if mode == "now":
                self._stop_mode = "now"  # a second signal may cut a drain short
                if self._stop_now is not None:
                    self._stop_now.set()
                self._close_all()
            return
        self._stop_mode = mode
        self._stop_requested.set()

    def _close_all(self) -> None:
        for listener in [*self.listeners.values(), *self.retired]:
            listener.close_sessions(TERM_SHUTDOWN)

    async def _abandon_start(self) -> int:
        """A start that failed after binding (a port in use, a privilege drop refused): undo
        what was started, so nothing outlives the exit, and give the exit code (1)."""
        for listener in self.listeners.values():
            listener.stop_accepting()
        if self.admin is not None:
            self.admin.close()
        if self.discovery is not None:  # always built by then; the type allows None
            await self.discovery.close()
        if self.fleet is not None:
            await self.fleet.close()
        return 1

    async def run(self) -> int:
        """Serve until a stop signal. Returns the exit code."""
        # Wall clock, for uptime and /status; the start is the first successful config load.
        self.started_at = time.time()
        self.reloads = ReloadStats(self.started_at)
        loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.log.use_timer(loop.call_later)
        self.notifier = Notifier()
        # Fed from the start: systemd's watchdog runs from the moment the process is started.
        self.notifier.start_watchdog(loop)
        try:
            self.fd_sockets = take_listen_fds()
        except ListenFdsError as exc:
            self.log.event("error", f"socket activation: {exc}")
            return 1
        self.build(loop)
        self.discovery = Discovery(self.config, self.pools, loop, self.log, self.on_events)
        await self.discovery.start()
        if self.config.fleet is not None:
            from lbtcp.fleet.watcher import Fleet  # late: httpx only with [fleet]

            self.fleet = Fleet(self.config.fleet, self)
            self.discovery.membership_hook = self.fleet.membership
            await self.fleet.start()
        try:
            bound = self.open_binds(
                (name, bind)
                for name, listener in self.listeners.items()
                for bind in listener.config.bind
            )
            for name, listener in self.listeners.items():
                await listener.start(bound.get(name, {}))
            # The admin server binds with the listeners, before the privileges go.
            await self._start_admin(loop)
        except (BindError, OSError) as exc:
            message = str(exc) if isinstance(exc, BindError) else exc.strerror or str(exc)
            self.log.event("error", f"cannot listen: {message}", error=str(exc))
            return await self._abandon_start()
        for listener in self.listeners.values():
            for address in listener.addresses:
                self.log.event(
                    "listening", listener=listener.name, address=address, pool=listener.pool.name
                )
        if not self._drop_privileges():
            return await self._abandon_start()
        self.start_health()
        await self._start_data_plane()
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
        self._serving = True
        self._arm_ready(loop)
        await self._stop_requested.wait()
        await self._stop(loop)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        self.notifier.close()
        return 0

    async def _prepare_admin(self, new: AdminConfig | None) -> AdminServer | None:
        """A reload's new admin server, started (bound) before anything changes, when
        ``[admin]`` appears or its ``listen`` changes; None otherwise. Raises OSError."""
        assert self._loop is not None
        current = self.config.admin
        if new is None or (current is not None and current.listen == new.listen):
            return None
        router = Router(self, new, self._on_admin_error)
        server = AdminServer(str(new.listen), router.handle, self.log, self._loop)
        await server.start()
        return server

    def _switch_admin(self, new: AdminConfig | None, started: AdminServer | None) -> None:
        """Apply a changed ``[admin]``: the new server (if one was started) takes over; the
        old one stops after ADMIN_HANDOFF, so that the request that asked for this reload
        still gets its answer; same address, other settings: new rules at once."""
        assert self._loop is not None
        old = self.admin
        if started is not None or new is None:
            if old is not None:
                self._retired_admins.add(old)
                self._loop.call_later(ADMIN_HANDOFF, self._close_admin, old)
            self.admin = started
            if started is not None and new is not None:
                self.log.event(
                    "admin_listening",
                    "admin API serving",
                    address=started.address,
                    auth="token" if new.token else "none",
                )
            else:
                self.log.event("admin_stopped", "[admin] removed: no admin API any more")
        elif old is not None:
            old.handler = Router(self, new, self._on_admin_error).handle

    def _close_admin(self, server: AdminServer) -> None:
        """Timer callback (ADMIN_HANDOFF after a reload moved the admin API), and on stop."""
        self._retired_admins.discard(server)
        server.close()

    def _drop_privileges(self) -> bool:
        """Become ``[global] user`` once every socket is bound. False (logged) on failure."""
        user, group = self.config.global_.user, self.config.global_.group
        if not user:
            return True
        try:
            message = drop_privileges(user, group)
        except PrivilegeError as exc:
            self.log.event("error", f"cannot drop privileges: {exc}", user=user, group=group)
            return False
        self.log.event("privileges", message, user=user, group=group or "-")
        return True

    # --- sockets -------------------------------------------------------------------------

    def open_binds(
        self,
        wanted: Iterable[tuple[str, str]],
        config: Config | None = None,
        handover: dict[str, list[socket.socket]] | None = None,
    ) -> dict[str, dict[str, list[socket.socket]]]:
        """Listening sockets for (listener, bind) pairs: bound here, taken from systemd's
        (``fd:NAME``, duplicated so that the passed one stays for a later reload), or from
        ``handover`` (a bind another listener gives up in the same reload). All or nothing:
        on the first failure every socket opened here is closed and ``BindError`` raised."""
        opened: list[socket.socket] = []
        result: dict[str, dict[str, list[socket.socket]]] = {}
        try:
            for listener, bind in wanted:
                where = f"listeners.{listener}.bind: {bind}"
                if bind.startswith("fd:"):
                    name = bind[3:]
                    passed = self.fd_sockets.get(name)
                    if not passed:
                        known = ", ".join(sorted(self.fd_sockets)) or "none"
                        raise BindError(
                            f"{where}: systemd passed no socket named {name!r} (passed: {known}; "
                            "see FileDescriptorName= in the .socket unit)"
                        )
                    group = []
                    for sock in passed:
                        try:
                            check_listening(sock, name)
                        except OSError as exc:
                            raise BindError(f"listeners.{listener}.bind: {exc}") from None
                        group.append(sock.dup())
                        opened.append(group[-1])
                elif handover is not None and bind in handover:
                    group = handover.pop(bind)
                    opened.extend(group)
                else:
                    backlog = (config or self.config).listeners[listener].backlog
                    try:
                        group = self._bind_group(bind, backlog)
                    except OSError as exc:
                        raise BindError(f"{where}: {exc.strerror or exc}") from None
                    opened.extend(group)
                result.setdefault(listener, {})[bind] = group
        except BaseException:
            for sock in opened:
                sock.close()
            raise
        return result

    def _bind_group(self, bind: str, backlog: int) -> list[socket.socket]:
        """The sockets of one bind string: one here; one per worker with workers > 1."""
        return [bind_socket(bind, backlog)]

    async def _start_data_plane(self) -> None:
        """With workers > 1: start the workers (once bound and privileges dropped)."""

    async def _stop_data_plane(self, loop: asyncio.AbstractEventLoop) -> None:
        """With workers > 1: stop the workers (they drain) and wait for the last one."""

    async def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        grace = self.config.global_.shutdown_grace
        if self._stop_mode == "drain" and grace > 0:
            # Still accepting, but /healthz says 503 and systemd heard STOPPING=1: a fronting
            # load balancer takes this node out of rotation before anyone is refused.
            self.log.event(
                "shutdown_grace",
                "going away: still accepting while the fronting balancers notice",
                grace_s=grace,
            )
            assert self._stop_now is not None
            with contextlib.suppress(asyncio.TimeoutError):  # SIGINT cuts the grace short
                await asyncio.wait_for(self._stop_now.wait(), grace)
        self._cancel_timers()
        for listener in self.listeners.values():
            listener.stop_accepting()
        await self._stop_data_plane(loop)
        self.stop_health()
        if self.discovery is not None:
            await self.discovery.close()
        if self.fleet is not None:
            # Revokes the lease: the registry entry goes now, not after lease_ttl.
            await self.fleet.close()
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
        for server in list(self._retired_admins):
            self._close_admin(server)
        self.log.event("stop", "lbtcp stopped", closed_sessions=left)
        self.log.flush()

    # --- systemd -------------------------------------------------------------------------

    def status_text(self) -> str:
        """The STATUS= line: live sessions and how many pools are ok, degraded or empty."""
        ok = degraded = empty = 0
        for pool in self.pools.values():
            eligible = sum(1 for server in pool.servers.values() if server.eligible)
            if not eligible:
                empty += 1
            elif eligible < len(pool.servers):
                degraded += 1
            else:
                ok += 1
        return (
            f"{self.active_sessions} sessions; pools: {ok} ok, {degraded} degraded, {empty} empty"
        )

    def _arm_ready(self, loop: asyncio.AbstractEventLoop) -> None:
        """READY=1 once the first health verdicts are in; bounded by the time the slowest
        pool's probes can take to reach one, so that a start never hangs on them."""
        bound = 0.0
        for pool in self.pools.values():
            health = pool.config.health
            if health is not None and health.initial == "unknown":
                steps = max(health.rise, health.fall)
                bound = max(
                    bound, health.interval + steps * (health.fast_interval + health.timeout)
                )
        self._ready_timer = loop.call_later(bound + 1.0, self._announce_ready, "timeout")
        self._check_ready()
        if self.notifier.enabled:
            self._status_timer = loop.call_later(STATUS_INTERVAL, self._status_tick)

    def _verdicts_in(self) -> bool:
        return all(record.known for pool in self.pools.values() for record in pool.health)

    def _check_ready(self) -> None:
        if not self._ready and self._verdicts_in():
            self._announce_ready("verdicts")

    def _announce_ready(self, why: str) -> None:
        """Timer callback (the bound of _arm_ready), or called when the last verdict came."""
        if self._ready:
            return
        self._ready = True
        if self._ready_timer is not None:
            self._ready_timer.cancel()
            self._ready_timer = None
        self._status_text = self.status_text()
        self.notifier.ready(self._status_text)
        message = (
            "every listener bound, first health verdicts in"
            if why == "verdicts"
            else "every listener bound; some health verdicts still pending"
        )
        self.log.event("ready", message, status=self._status_text)

    def _status_tick(self) -> None:
        """Timer callback, every STATUS_INTERVAL while a service manager listens."""
        assert self._loop is not None
        text = self.status_text()
        if text != self._status_text:
            self._status_text = text
            self.notifier.status(text)
        self._status_timer = self._loop.call_later(STATUS_INTERVAL, self._status_tick)

    def _cancel_timers(self) -> None:
        for timer in (self._status_timer, self._ready_timer):
            if timer is not None:
                timer.cancel()
        self._status_timer = self._ready_timer = None

    # --- reload --------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        """Signal handler (SIGHUP): reload the config file in the background."""
        self._spawn(self.reload())

    def _spawn(self, coro: Coroutine[Any, Any, object]) -> None:
        """Run ``coro`` as a task that is kept referenced until it is done."""
        assert self._loop is not None
        task: asyncio.Task[object] = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, path: str | None = None) -> ReloadResult:
        """Read the config file (``path``, default the one running) and apply it in place.
        Called on SIGHUP, and by ``POST /reload``. One at a time; never raises."""
        source = path or self.config.source
        if not self._serving or self._stop_requested is None or self._stop_requested.is_set():
            # Before the start line (the admin API answers a moment earlier) or while
            # stopping, a reload would race the start-up or the drain: refused, not counted.
            why = "lbtcp is stopping" if self._serving else "lbtcp is still starting"
            self.log.event("reload_ignored", f"{why}: reload not done", config=source)
            return ReloadResult(ok=False, source=source, errors=(why,))
        assert self._reload_lock is not None
        async with self._reload_lock:
            # Before the first READY=1 systemd still waits for the start: no RELOADING then.
            announce = self._ready
            if announce:
                self.notifier.reloading()
            started = time.monotonic()
            try:
                result = await self._reload(source)
            except Exception as exc:  # a bug must not take the running config down
                self._loop_exception("reload failed", exc)
                result = ReloadResult(ok=False, source=source, errors=(f"internal error: {exc!r}",))
            result = dataclasses.replace(result, duration_ms=(time.monotonic() - started) * 1000)
            self.last_reload = result
            if result.ok:
                self.reloads.succeeded(time.time())
                self.log.event(
                    "reload",
                    "configuration reloaded",
                    config=source,
                    summary=result.summary,
                    **result.counts,
                    duration_ms=round(result.duration_ms, 3),
                )
            else:
                self.reloads.failed()
                # Every error first, then the outcome line that closes the reload.
                for error in result.errors:
                    self.log.event("reload_error", error, config=source)
                self.log.event(
                    "reload_failed",
                    f"configuration not reloaded: {len(result.errors)} error(s); "
                    "the running configuration is unchanged",
                    config=source,
                    errors=len(result.errors),
                )
            self._status_text = self.status_text()
            if announce:
                self.notifier.ready(self._status_text)
            return result

    def _loop_exception(self, message: str, exc: BaseException) -> None:
        if self._loop is not None:
            self._loop.call_exception_handler({"message": message, "exception": exc})

    async def _reload(self, source: str) -> ReloadResult:
        """Validate everything and bind new sockets first (all or nothing), then apply."""
        assert self._loop is not None
        assert self.discovery is not None
        loop = self._loop
        try:
            new = load_config(source)
        except ConfigError as exc:
            return ReloadResult(ok=False, source=source, errors=tuple(exc.errors))
        old = self.config
        plan = plan_reload(old, new)
        config = plan.effective
        now = loop.time()
        # New pools and new balancers are made before anything changes: a plugin that
        # cannot be imported refuses the reload.
        errors: list[str] = []
        new_pools: dict[str, Pool] = {}
        for name in plan.pools_added:
            try:
                new_pools[name] = Pool.from_config(config.pools[name], now=now)
            except BalancerError as exc:
                errors.append(f"pools.{name}.balance: {exc}")
        balancers: dict[str, Balancer] = {}
        for change in plan.pools_changed:
            if change.balancer_changed:
                try:
                    balancers[change.name] = Pool.make_balancer(config.pools[change.name])
                except BalancerError as exc:
                    errors.append(f"pools.{change.name}.balance: {exc}")
        if errors:
            return ReloadResult(ok=False, source=source, errors=tuple(errors))
        # Sockets next: a bind a listener gives up in this reload may be taken over by
        # another one (a renamed listener); everything else is bound fresh.
        handover = self._handover(plan)
        try:
            bound = self.open_binds(plan.binds_to_open(), config, handover)
        except (BindError, OSError) as exc:
            return ReloadResult(ok=False, source=source, errors=(str(exc),))
        finally:
            for group in handover.values():  # duplicates nobody took (a refused reload)
                for sock in group:
                    sock.close()
        # The admin API's new address last: its server starts accepting when bound.
        try:
            new_admin = await self._prepare_admin(config.admin)
        except OSError as exc:
            for groups in bound.values():
                for group in groups.values():
                    for sock in group:
                        sock.close()
            assert config.admin is not None
            where = f"admin.listen: {config.admin.listen}"
            return ReloadResult(
                ok=False, source=source, errors=(f"{where}: {exc.strerror or exc}",)
            )
        # From here on nothing can be refused.
        await self._apply(plan, old, config, new_pools, balancers, bound, new_admin)
        return ReloadResult(
            ok=True,
            source=source,
            summary=plan.summary(),
            counts=plan.counts(),
            restart_needed=plan.restart_needed,
        )

    def _handover(self, plan: ReloadPlan) -> dict[str, list[socket.socket]]:
        """Duplicates of the sockets of binds given up by this reload, by bind string, for a
        listener that wants the same address (port 0 means "any port": never handed over)."""
        giving_up: list[tuple[Listener, str]] = [
            (self.listeners[name], bind)
            for name in plan.listeners_removed
            for bind in self.listeners[name].bound
        ]
        giving_up += [
            (self.listeners[change.name], bind)
            for change in plan.listeners_changed
            for bind in change.remove_binds
        ]
        wanted = {bind for _listener, bind in plan.binds_to_open()}
        handover: dict[str, list[socket.socket]] = {}
        for listener, bind in giving_up:
            if bind in wanted and not bind.startswith("fd:") and not bind.endswith(":0"):
                handover[bind] = [
                    socket.socket(fileno=os.dup(s.fileno()))
                    for server, _address in listener.bound.get(bind, [])
                    for s in server.sockets
                ]
        return handover

    async def _apply(
        self,
        plan: ReloadPlan,
        old: Config,
        config: Config,
        new_pools: dict[str, Pool],
        balancers: dict[str, Balancer],
        bound: dict[str, dict[str, list[socket.socket]]],
        new_admin: AdminServer | None,
    ) -> None:
        """Apply a validated plan whose sockets are bound; see lbtcp.reload for the order."""
        assert self._loop is not None
        assert self.discovery is not None
        loop = self._loop
        for message in plan.restart_needed:
            self.log.event("reload_restart_needed", message, config=config.source)
        if plan.resolver_changed:
            self.log.event(
                "reload_restart_needed",
                "resolver: changed settings need a restart to take effect; keeping the old ones",
                config=config.source,
            )
            config = dataclasses.replace(config, resolver=old.resolver)
        self.config = config
        self.log.json = config.global_.log_format == "json"
        self.log.access_enabled = config.global_.access_log
        # Pools: new ones join, changed ones are updated in place, then memberships follow
        # the file (and DNS) with runtime weights kept where the file's weight is unchanged.
        now = loop.time()
        for name, pool in new_pools.items():
            self.pools[name] = pool
            self.on_events(pool, pool.initial_events)
            pool.initial_events = []
        await self.discovery.reconfigure(config)
        for change in plan.pools_changed:
            pool = self.pools[change.name]
            pool_config = config.pools[change.name]
            pool.config = pool_config
            pool.hash_key = pool_config.hash_key
            pool.panic_threshold = pool_config.panic_threshold
            if change.name in balancers:
                pool.balancer = balancers[change.name]
            if change.health_changed:
                self.on_events(
                    pool, pool.health.reconfigure(pool_config.health, pool_config.ejection, now)
                )
        for name in plan.pools_added:
            self._sync_membership(self.pools[name], now, None)
        for change in plan.pools_changed:
            self._sync_membership(self.pools[change.name], now, set(change.weights))
        for name in [*plan.pools_added, *(c.name for c in plan.pools_changed)]:
            self._sync_prober(self.pools[name])
        # Listeners: changed ones take the new settings and pool at once, new ones start.
        for lchange in plan.listeners_changed:
            listener = self.listeners[lchange.name]
            listener_config = config.listeners[lchange.name]
            listener.reconfigure(listener_config, self.pools[listener_config.pool], self.pools)
            if lchange.name in bound:
                await listener.add_sockets(bound[lchange.name])
        for name in plan.listeners_added:
            listener_config = config.listeners[name]
            listener = self.listener_type(
                listener_config,
                self.pools[listener_config.pool],
                self.log,
                loop,
                self.on_events,
                pools=self.pools,
            )
            self.listeners[name] = listener
            await listener.start(bound.get(name, {}))
        for name in [*plan.listeners_added, *(c.name for c in plan.listeners_changed)]:
            listener = self.listeners[name]
            for address in listener.addresses:
                self.log.event("listening", listener=name, address=address, pool=listener.pool.name)
        # Only now does anything stop accepting: removed binds and removed listeners.
        for lchange in plan.listeners_changed:
            self.listeners[lchange.name].close_binds(lchange.remove_binds)
        for name in plan.listeners_removed:
            listener = self.listeners.pop(name)
            listener.stop_accepting()
            self.log.event(
                "listener_removed",
                "stopped accepting; live sessions drain",
                listener=name,
                sessions=listener.active,
                timeout_s=config.global_.drain_timeout,
            )
            if listener.active:
                self.retired.add(listener)
                self._spawn(self._drain_retired(listener, config.global_.drain_timeout))
        for name in plan.pools_removed:
            pool = self.pools.pop(name)
            self.on_events(pool, pool.set_servers([], now, reason="reload: pool removed"))
            prober = self.probers.pop(name, None)
            if prober is not None:
                prober.close()
            timer = self._pool_timers.pop(name, None)
            if timer is not None:
                timer.cancel()
        if plan.admin_changed:
            self._switch_admin(config.admin, new_admin)

    def _sync_membership(self, pool: Pool, now: float, weights_changed: set[str] | None) -> None:
        """The pool's servers as the file and DNS now say. A server that stays keeps its
        current (maybe runtime) weight unless the file's weight for its entry changed
        (``weights_changed``: entry display names; None for a new pool)."""
        assert self.discovery is not None
        servers = self.discovery.membership(pool.name)
        fresh: set[str] = set()
        for entry in weights_changed or ():
            key = f"{pool.name}/{entry}"
            if key in self.discovery.entries:  # a DNS entry: every server it yields
                fresh.update(server.name for server in self.discovery.entry_servers(key))
            else:
                fresh.add(entry)
        for server in servers:
            kept = pool.servers.get(server.name)
            if kept is not None and not kept.removed and server.name not in fresh:
                server.weight = kept.weight
        events = pool.set_servers(servers, now, reason="reload: not in the config any more")
        self.on_events(pool, events)

    def _sync_prober(self, pool: Pool) -> None:
        """Probes follow the pool's [health]: started, stopped, or new settings from each
        server's next probe."""
        assert self._loop is not None
        health = pool.config.health
        prober = self.probers.get(pool.name)
        if health is None:
            if prober is not None:
                prober.close()
                del self.probers[pool.name]
            return
        if prober is None:
            prober = Prober(pool, self._loop, self.on_events)
            self.probers[pool.name] = prober
            prober.start()
        else:
            prober.health = health
            for name in pool.servers:
                if name not in prober.timers and name not in prober.in_flight:
                    prober.reschedule(name)
        self._arm_pool_timer(pool)

    async def _drain_retired(self, listener: Listener, timeout: float) -> None:
        """A listener removed by a reload: its sessions may finish for ``drain_timeout``."""
        assert self._loop is not None
        deadline = self._loop.time() + timeout
        while listener.active and self._loop.time() < deadline:
            if self._stop_requested is not None and self._stop_requested.is_set():
                break  # the process is stopping: its own drain takes these sessions on
            await asyncio.sleep(DRAIN_POLL)
        if listener.active:
            listener.close_sessions(TERM_SHUTDOWN)
            for _ in range(100):
                if not listener.active:
                    break
                await asyncio.sleep(0.01)
        self.retired.discard(listener)


def serve(config: Config) -> int:
    """Run lbtcp on uvloop until stopped; returns the process exit code."""
    import uvloop

    runtime: Runtime
    if config.global_.workers > 1:
        from lbtcp.workers.supervisor import ControlRuntime

        runtime = ControlRuntime(config)
    else:
        runtime = Runtime(config)
    try:
        return uvloop.run(runtime.run())
    except KeyboardInterrupt:  # pragma: no cover - SIGINT before the handler was installed
        return 0
    finally:
        runtime.log.flush()
        sys.stderr.flush()
