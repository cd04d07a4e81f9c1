"""The control plane of ``workers > 1``: the parent process (DESIGN.md §3).

Theory of operation. ``ControlRuntime`` is the ``Runtime`` of ``workers = 1`` with its data
plane moved out: it loads the config, binds every listening socket, runs DNS, probes, the
passive-ejection and slow-start decisions, the admin API, metrics and systemd notifications,
exactly as one process does, but its listeners (``HeldListener``) only hold sockets. The
sessions run in ``workers`` child processes (``lbtcp.workers.worker``), started with
``python -m`` after the privileges are dropped and handed their sockets as inherited fds:

- **Sockets.** A bind ``IP:PORT`` is bound once per worker slot with SO_REUSEPORT (the kernel
  hashes each new connection to one slot's socket; measured in benchmarks/worker_spread.py:
  49-51 % per worker of 2,000 connections, where one shared socket gave 15-35 % to one of two
  workers). All are bound here, before the privilege drop, and kept open here: a slot whose
  worker died keeps its accept queue until the replacement takes it over, and a worker never
  binds. A ``fd:NAME`` socket of systemd cannot be duplicated onto a new port group, so every
  worker shares it (it works, less evenly).
- **Health.** Workers send every connect failure, and the successes of servers this
  parent counts failures for (``RESULTS``; any other success changes nothing, as
  ``Pool.connect_result`` skips it in one process); they go through the same
  ``Pool.connect_result`` as in one process. Whenever the core emits events (and every
  ``VERDICT_INTERVAL`` for slow-start ramps) the verdicts (membership, eligible, admin,
  weight, weight factor, "failures counted") are diffed per pool against what each worker
  has and sent. ``max_connections`` limits are split over the workers (``worker.share``).
- **Counters.** Each worker sends absolute counters every 100 ms when they changed
  (``STATS``); the parent's listener and server objects are set to the sum over live workers
  plus what exited workers had counted, so metrics.py and status.py read them unchanged.
- **Lifecycle.** A worker that exits unasked is logged (with the sessions it held) and
  replaced, at once the first time, then with a doubling backoff while it keeps dying young.
  A reload is applied here (validation, binds, pools, DNS, probes, admin), then a new
  generation of workers starts on the new config and the old one is told to ``RETIRE``: stop
  accepting and exit when its last session ends (nginx's model). SIGTERM: the workers drain
  (``drain_timeout``), the parent exits 0 after the last one; SIGINT stops them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lbtcp.addresses import format_address
from lbtcp.admin.server import AdminServer
from lbtcp.balancing import Balancer
from lbtcp.config import Config
from lbtcp.events import Event, ServerStateChanged
from lbtcp.health import AdminAction
from lbtcp.listener import REFUSAL_REASONS, Listener, bind_socket
from lbtcp.metrics import Family
from lbtcp.pool import Pool, Server
from lbtcp.reload import ReloadPlan
from lbtcp.runtime import Runtime
from lbtcp.workers.channel import Channel
from lbtcp.workers.ipc import (
    Frame,
    Kind,
    check_results,
    check_stats,
    decode_json,
    encode_raw,
    merge_stats,
)
from lbtcp.workers.worker import stats_key

VERDICT_INTERVAL = 0.1
READY_TIMEOUT = 15.0
# A worker that dies within this long of its start is "dying young": the next start waits.
YOUNG = 2.0
# A new spare starts this long after the last one took over, not in the replacement's way.
STANDBY_DELAY = 1.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
# Environment a worker must not see: systemd's (only the parent talks to the manager).
PARENT_ONLY_ENV = (
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


class HeldSockets:
    """Stands in for an ``asyncio.Server`` in ``Listener.bound``: sockets held, not served."""

    def __init__(self, sockets: Sequence[socket.socket]) -> None:
        self.sockets = list(sockets)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class HeldListener(Listener):
    """A listener of the parent: the sockets for the workers, and the workers' counters
    summed (``active`` is what the workers last reported)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups: dict[str, list[socket.socket]] = {}
        self.workers_active = 0

    @property
    def active(self) -> int:
        return self.workers_active

    async def add_sockets(self, sockets: Mapping[str, Sequence[socket.socket]]) -> None:
        for bind, group in sockets.items():
            held = HeldSockets(group)
            self.servers.append(held)  # type: ignore[arg-type]
            self.groups.setdefault(bind, []).extend(group)
            # One address per distinct socket name (a reuseport group shares one).
            for address in dict.fromkeys(format_address(*s.getsockname()[:2]) for s in group):
                self.addresses.append(address)
                self.bound.setdefault(bind, []).append((held, address))  # type: ignore[arg-type]

    def close_binds(self, binds: Iterable[str]) -> None:
        binds = list(binds)
        for bind in binds:
            self.groups.pop(bind, None)
        super().close_binds(binds)


class WorkerHandle:
    """One worker process as the parent sees it."""

    def __init__(self, slot: int, generation: int) -> None:
        self.slot = slot
        self.generation = generation
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: Channel | None = None
        self.state = "starting"  # serving, retiring, exited
        self.stats: dict[str, list[float]] = {}
        self.started = time.monotonic()
        self.ready = asyncio.Event()
        self.exited = asyncio.Event()
        self.asked_to_stop = False
        self.verdicts: dict[str, Any] = {}
        self.fds: set[int] = set()  # listening sockets passed to it
        self.draining: int | None = None  # sessions when it said it stopped accepting
        self.stopped_accepting = asyncio.Event()  # DRAINING received, or exited

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    @property
    def active(self) -> int:
        return int(sum(v[1] for k, v in self.stats.items() if k.startswith("L\x1f") and len(v) > 1))


class ControlRuntime(Runtime):
    """The parent: the control plane of ``workers`` data-plane processes."""

    listener_type = HeldListener

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.worker_count = config.global_.workers
        self.workers: list[WorkerHandle] = []
        self.generation = 0
        self.worker_restarts = 0
        self.worker_lost_sessions = 0
        self._exited_stats: dict[str, list[float]] = {}
        self._young_deaths: dict[int, int] = {}
        self._verdict_scheduled = False
        self._verdict_timer: asyncio.TimerHandle | None = None
        self._sent_verdicts: dict[str, Any] = {}
        self._data_plane_stopping = False
        self._standby: WorkerHandle | None = None

    # --- sockets -------------------------------------------------------------------------

    def _bind_group(self, bind: str, backlog: int) -> list[socket.socket]:
        first = bind_socket(bind, backlog, reuseport=True)
        group = [first]
        try:
            host, port = first.getsockname()[:2]
            address = format_address(host, port)  # port 0 became a real port
            for _ in range(self.worker_count - 1):
                group.append(bind_socket(address, backlog, reuseport=True))
        except BaseException:
            for sock in group:
                sock.close()
            raise
        return group

    # --- workers -------------------------------------------------------------------------

    async def _start_data_plane(self) -> None:
        self.generation = 1
        handles = [self._start_worker(slot, 1) for slot in range(self.worker_count)]
        await self._wait_ready(handles)
        self._start_standby()
        assert self._loop is not None
        self._verdict_timer = self._loop.call_later(VERDICT_INTERVAL, self._verdict_tick)

    async def _wait_ready(self, handles: list[WorkerHandle]) -> None:
        waits = [asyncio.ensure_future(h.ready.wait()) for h in handles]
        _done, pending = await asyncio.wait(waits, timeout=READY_TIMEOUT)
        for task in pending:
            task.cancel()
        late = [h.pid for h in handles if not h.ready.is_set()]
        if late:
            self.log.event("worker_slow", "workers not ready in time", pids=late)

    def _slot_binds(self, slot: int) -> dict[str, dict[str, list[int]]]:
        """The fds a worker of ``slot`` serves, by listener and bind (fd numbers are the
        same in the child: ``pass_fds`` keeps them)."""
        binds: dict[str, dict[str, list[int]]] = {}
        for listener in self.listeners.values():
            assert isinstance(listener, HeldListener)
            for bind, group in listener.groups.items():
                chosen = group if bind.startswith("fd:") else [group[slot % len(group)]]
                binds.setdefault(listener.name, {})[bind] = [s.fileno() for s in chosen]
        return binds

    def _hello(self, handle: WorkerHandle, close: Sequence[int] = ()) -> bytes:
        verdicts = self.verdicts()
        handle.verdicts = dict(verdicts)
        hello = {
            "config": self.config,
            "slot": handle.slot,
            "generation": handle.generation,
            "binds": self._slot_binds(handle.slot),
            "close": list(close),
            "verdicts": verdicts,
            "workers": self.worker_count,
        }
        return encode_raw(Kind.HELLO, pickle.dumps(hello))

    def _start_worker(self, slot: int, generation: int, standby: bool = False) -> WorkerHandle:
        """Start the worker of ``slot`` (a child process; ready when it says so). A
        ``standby`` gets every slot's sockets and waits, imported, for the HELLO that makes it
        the replacement of a worker that died (``_assign_standby``)."""
        assert self._loop is not None
        handle = WorkerHandle(slot, generation)
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if standby:
            handle.state = "standby"
            handle.fds = {
                s.fileno()
                for listener in self.listeners.values()
                if isinstance(listener, HeldListener)
                for group in listener.groups.values()
                for s in group
            }
        else:
            handle.fds = {
                fd for binds in self._slot_binds(slot).values() for g in binds.values() for fd in g
            }
        env = {k: v for k, v in os.environ.items() if k not in PARENT_ONLY_ENV}
        argv = [sys.executable, "-m", "lbtcp.workers.worker", str(child_end.fileno())]
        argv += [str(os.getpid()), *(["standby"] if standby else [])]
        try:
            handle.proc = subprocess.Popen(
                argv,
                pass_fds=[child_end.fileno(), *sorted(handle.fds)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except OSError as exc:
            child_end.close()
            parent_end.close()
            self.log.event("error", f"cannot start a worker: {exc}", slot=slot)
            handle.state = "exited"
            handle.exited.set()
            if not standby:
                self._loop.call_later(BACKOFF_MAX, self._respawn, slot)
            return handle
        child_end.close()
        if standby:
            self._standby = handle
            self._spawn(self._attach(handle, parent_end, None))
        else:
            self.workers.append(handle)
            self._spawn(self._attach(handle, parent_end, self._hello(handle)))
        return handle

    def _start_standby(self) -> None:
        """Keep one spare worker process started and imported: Python's start-up (0.2 s of
        CPU, more than a second on a busy 2-core machine) is then out of a replacement's way."""
        if self._standby is not None or self._data_plane_stopping:
            return
        if self._stop_requested is not None and self._stop_requested.is_set():
            return
        self._start_worker(-1, self.generation, standby=True)

    def _drop_standby(self) -> None:
        """A reload changed the sockets (fd numbers may be reused): the spare is useless."""
        handle, self._standby = self._standby, None
        if handle is not None:
            self._signal(handle, signal.SIGKILL)

    def _assign_standby(self, slot: int) -> bool:
        """Make the spare the worker of ``slot``; False if there is none ready."""
        handle = self._standby
        if (
            handle is None
            or handle.channel is None
            or handle.proc is None
            or handle.proc.poll() is not None
            or handle.generation != self.generation
        ):
            return False
        self._standby = None
        handle.slot = slot
        handle.state = "starting"
        handle.started = time.monotonic()
        used = {fd for b in self._slot_binds(slot).values() for g in b.values() for fd in g}
        handle.channel.send_frame(self._hello(handle, sorted(handle.fds - used)))
        handle.fds = used
        self.workers.append(handle)
        assert self._loop is not None
        self._loop.call_later(STANDBY_DELAY, self._start_standby)
        return True

    async def _attach(self, handle: WorkerHandle, sock: socket.socket, hello: bytes | None) -> None:
        """The parent's end of a new worker's socketpair on the loop; HELLO first (through
        the transport: a large config never blocks the control plane on a slow start)."""
        assert self._loop is not None
        peer = f"worker {handle.pid}"
        _, channel = await self._loop.create_unix_connection(
            lambda: Channel(
                lambda frame: self._on_frame(handle, frame),
                lambda: self._on_worker_lost(handle),
                self.log,
                peer,
            ),
            sock=sock,
        )
        if hello is not None:
            channel.send_frame(hello)
        handle.channel = channel
        if handle.verdicts != self._sent_verdicts:
            self._schedule_verdicts()

    def _on_frame(self, handle: WorkerHandle, frame: Frame) -> None:
        """Called by a worker's channel for each frame it sends."""
        if frame.kind is Kind.RESULTS:
            self._apply_results(check_results(decode_json(frame)))
        elif frame.kind is Kind.STATS:
            handle.stats = check_stats(decode_json(frame))
            self._aggregate()
        elif frame.kind is Kind.DRAINING:
            message = decode_json(frame)
            handle.draining = int(message["sessions"])
            handle.stopped_accepting.set()
        elif frame.kind is Kind.READY:
            if handle.state == "starting":
                handle.state = "serving"
            handle.ready.set()
            self.log.event(
                "worker_ready",
                "worker serving",
                pid=handle.pid,
                slot=handle.slot,
                generation=handle.generation,
            )
        else:
            raise ValueError(f"not a message for the parent: {frame.kind.name}")

    def _apply_results(self, results: list[tuple[str, str, bool, str, int]]) -> None:
        """Real connect results of a worker, through the health machine as in one process.
        The failure counters are the workers' own (STATS): kept as they are here."""
        assert self._loop is not None
        now = self._loop.time()
        flipped = False
        for pool_name, server_name, ok, kind, count in results:
            pool = self.pools.get(pool_name)
            server = pool.servers.get(server_name) if pool is not None else None
            if pool is None or server is None:
                continue  # gone since (a reload, DNS)
            saved = (
                server.connect_failures,
                server.connect_refused,
                server.connect_timeouts,
                server.connect_other,
            )
            failing = self._failing(pool, server)
            # A run of successes resets the failure count once as well as n times.
            for _ in range(count if not ok else 1):
                self.on_events(pool, pool.connect_result(server, ok, now, kind or "other"))
            (
                server.connect_failures,
                server.connect_refused,
                server.connect_timeouts,
                server.connect_other,
            ) = saved
            flipped = flipped or failing != self._failing(pool, server)
        if flipped:
            self._schedule_verdicts()

    def _on_worker_lost(self, handle: WorkerHandle) -> None:
        """Called when a worker's socketpair closed: it exited or died."""
        self._spawn(self._reap(handle))

    async def _reap(self, handle: WorkerHandle) -> None:
        assert self._loop is not None
        assert handle.proc is not None
        code = handle.proc.poll()
        deadline = self._loop.time() + 5.0
        while code is None and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
            code = handle.proc.poll()
        if code is None:  # closed its channel but lives on: not a worker we can use
            handle.proc.kill()
            code = handle.proc.wait()
        if handle.state == "standby":  # the spare died (or was dropped) before it served
            if self._standby is handle:
                self._standby = None
                self._loop.call_later(BACKOFF_MAX, self._start_standby)
            return
        lost = handle.active
        merge_stats(self._exited_stats, handle.stats, live=False)
        handle.stats = {}
        handle.state = "exited"
        self.workers.remove(handle)
        handle.exited.set()
        handle.stopped_accepting.set()
        self._aggregate()
        if handle.asked_to_stop or self._data_plane_stopping:
            self.log.event(
                "worker_exit", "worker stopped", pid=handle.pid, slot=handle.slot, code=code
            )
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        self.worker_restarts += 1
        self.worker_lost_sessions += lost
        young = time.monotonic() - handle.started < YOUNG
        deaths = self._young_deaths.get(handle.slot, 0) + 1 if young else 0
        self._young_deaths[handle.slot] = deaths
        delay = 0.0 if deaths == 0 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (deaths - 1))
        self.log.event(
            "worker_died",
            f"worker {how}: its sessions are lost; restarting",
            pid=handle.pid,
            slot=handle.slot,
            sessions_lost=lost,
            restart_in_s=round(delay, 3),
        )
        if delay:
            self._loop.call_later(delay, self._respawn, handle.slot)
        else:
            self._respawn(handle.slot)

    def _respawn(self, slot: int) -> None:
        if self._data_plane_stopping or (
            self._stop_requested is not None and self._stop_requested.is_set()
        ):
            return
        if any(h.slot == slot and h.generation == self.generation for h in self.workers):
            return
        if not self._assign_standby(slot):
            self._start_worker(slot, self.generation)

    # --- health verdicts to the workers --------------------------------------------------

    def verdicts(self) -> dict[str, list[list[Any]]]:
        """What every worker must know of each pool's servers to choose among them."""
        return {
            name: [
                [
                    s.name,
                    s.host,
                    s.port,
                    s.weight,
                    s.backup,
                    s.max_connections,
                    s.eligible,
                    s.admin_ok,
                    round(s.weight_factor, 4),
                    self._failing(pool, s),
                ]
                for s in pool.servers.values()
            ]
            for name, pool in self.pools.items()
        }

    @staticmethod
    def _failing(pool: Pool, server: Server) -> bool:
        """The health machine counts passive failures for ``server``: workers then report
        its successes too (they reset the count); otherwise a success changes nothing and
        stays in the worker, as ``Pool.connect_result`` skips it in one process."""
        health = pool.health
        return server.name in health and health.server(server.name).passive_failures > 0

    def on_events(self, pool: Pool, events: list[Event]) -> None:
        super().on_events(pool, events)
        if not events:
            return
        for event in events:
            if (
                isinstance(event, ServerStateChanged)
                and event.marked_down
                and pool.config.on_server_down == "close"
            ):
                for handle in self.workers:
                    if handle.channel is not None:
                        handle.channel.send(
                            Kind.CLOSE_SERVER, {"pool": pool.name, "server": event.server}
                        )
        self._schedule_verdicts()

    def _schedule_verdicts(self) -> None:
        if not self._verdict_scheduled and self._loop is not None:
            self._verdict_scheduled = True
            self._loop.call_soon(self._send_verdicts)

    def _send_verdicts(self) -> None:
        """Send each worker the pools whose verdicts changed since it last heard."""
        self._verdict_scheduled = False
        current = self.verdicts()
        self._sent_verdicts = current
        for handle in self.workers:
            if handle.channel is None:
                continue
            changed = {k: v for k, v in current.items() if handle.verdicts.get(k) != v}
            if changed and handle.channel.send(Kind.VERDICTS, changed):
                handle.verdicts.update(changed)

    def _verdict_tick(self) -> None:
        """Timer callback, every VERDICT_INTERVAL: slow-start factors move without events."""
        assert self._loop is not None
        self._send_verdicts()
        self._verdict_timer = self._loop.call_later(VERDICT_INTERVAL, self._verdict_tick)

    def server_weight(self, pool_name: str, server_name: str, weight: int) -> None:
        super().server_weight(pool_name, server_name, weight)
        self._schedule_verdicts()

    def server_admin(self, pool_name: str, server_name: str, action: AdminAction) -> None:
        super().server_admin(pool_name, server_name, action)
        self._schedule_verdicts()

    # --- counters ------------------------------------------------------------------------

    def _aggregate(self) -> None:
        """Set the parent's listener, pool and server counters to the workers' sums."""
        total: dict[str, list[float]] = {}
        merge_stats(total, self._exited_stats)
        for handle in self.workers:
            merge_stats(total, handle.stats)
        for name, listener in self.listeners.items():
            row = total.get(stats_key("L", name))
            hist = listener.session_seconds
            n = len(REFUSAL_REASONS)
            if row is None or len(row) != 3 + n + len(hist.counts):
                continue
            listener.connections_total = int(row[0])
            assert isinstance(listener, HeldListener)
            listener.workers_active = int(row[1])
            listener.refused = {r: int(row[2 + i]) for i, r in enumerate(REFUSAL_REASONS)}
            hist.sum = float(row[2 + n])
            hist.counts = [int(v) for v in row[3 + n :]]
        for name, pool in self.pools.items():
            row = total.get(stats_key("C", name))
            hist = pool.connect_seconds
            if row is not None and len(row) == 1 + len(hist.counts):
                hist.sum = float(row[0])
                hist.counts = [int(v) for v in row[1:]]
            for server in pool.servers.values():
                row = total.get(stats_key("S", name, server.name))
                if row is None or len(row) != 8:
                    continue
                self._set_server(server, row)
        self.results_dropped = int(total.get("W", [0])[0])

    @staticmethod
    def _set_server(server: Server, row: list[float]) -> None:
        (
            server.active,
            server.total,
            server.bytes_sent,
            server.bytes_received,
            server.connect_refused,
            server.connect_timeouts,
            server.connect_other,
            server.connect_failures,
        ) = (int(v) for v in row)

    def workers_info(self) -> list[dict[str, Any]]:
        """The "workers" list of /status."""
        return [
            {
                "pid": h.pid,
                "slot": h.slot,
                "generation": h.generation,
                "state": h.state,
                "active": h.active,
                "uptime_s": round(time.monotonic() - h.started, 3),
            }
            for h in sorted(self.workers, key=lambda h: (h.generation, h.slot))
        ]

    def worker_families(self) -> list[Family]:
        """Worker metrics for /metrics (read by lbtcp.metrics)."""
        live = Family("lbtcp_workers", "gauge", "Worker processes alive, by state", ("state",))
        states = ("starting", "serving", "retiring")
        live.samples += [
            ((state,), sum(1 for h in self.workers if h.state == state)) for state in states
        ]
        restarts = Family(
            "lbtcp_worker_restarts",
            "counter",
            "Workers that exited unasked (crash, kill -9) and were replaced",
        )
        restarts.samples.append(((), self.worker_restarts))
        lost = Family(
            "lbtcp_worker_lost_sessions",
            "counter",
            "Live sessions of workers that died (as each last reported)",
        )
        lost.samples.append(((), self.worker_lost_sessions))
        dropped = Family(
            "lbtcp_worker_results_dropped",
            "counter",
            "Connect results a worker could not send (its channel to the parent was full)",
        )
        dropped.samples.append(((), getattr(self, "results_dropped", 0)))
        return [live, restarts, lost, dropped]

    # --- reload --------------------------------------------------------------------------

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
        """Apply the plan here, then start a new generation on the new config and retire the
        old one once the new one serves."""
        await super()._apply(plan, old, config, new_pools, balancers, bound, new_admin)
        self._drop_standby()
        old_handles = list(self.workers)
        self.generation += 1
        handles = [self._start_worker(slot, self.generation) for slot in range(self.worker_count)]
        await self._wait_ready(handles)
        for handle in old_handles:
            handle.state = "retiring"
            handle.asked_to_stop = True
            if handle.channel is not None:
                handle.channel.send(Kind.RETIRE, {})
        self._schedule_verdicts()
        self._start_standby()

    # --- stopping ------------------------------------------------------------------------

    async def _stop_data_plane(self, loop: asyncio.AbstractEventLoop) -> None:
        self._data_plane_stopping = True
        spare = self._standby
        self._drop_standby()
        # The spare holds every listening socket: gone before the drain starts, so that new
        # clients are refused from then on (not queued on a socket nobody accepts on).
        for _ in range(100):
            if spare is None or spare.proc is None or spare.proc.poll() is not None:
                break
            await asyncio.sleep(0.01)
        mode = self._stop_mode
        for handle in list(self.workers):
            self._signal(handle, signal.SIGTERM if mode == "drain" else signal.SIGINT)
        # One "drain" line for the group, once no worker accepts any more (as one process).
        waits = [asyncio.ensure_future(h.stopped_accepting.wait()) for h in self.workers]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=2.0)
            for task in pending:
                task.cancel()
        sessions = sum(h.draining or 0 for h in self.workers)
        if mode == "drain" and sessions:
            self.log.event(
                "drain",
                "stopped accepting; waiting for live sessions",
                sessions=sessions,
                timeout_s=self.config.global_.drain_timeout,
                workers=len(self.workers),
            )
        bound = self.config.global_.drain_timeout + 5.0
        deadline = loop.time() + bound
        while self.workers and loop.time() < deadline:
            if self._stop_mode != mode:  # SIGINT during the drain
                mode = self._stop_mode
                for handle in list(self.workers):
                    self._signal(handle, signal.SIGINT)
            await asyncio.sleep(0.02)
        for handle in list(self.workers):
            self._signal(handle, signal.SIGKILL)
        for _ in range(250):
            if not self.workers:
                break
            await asyncio.sleep(0.02)
        if self._verdict_timer is not None:
            self._verdict_timer.cancel()

    @staticmethod
    def _signal(handle: WorkerHandle, signum: int) -> None:
        handle.asked_to_stop = True
        if handle.proc is not None and handle.proc.poll() is None:
            with contextlib.suppress(OSError):  # exited since the poll
                handle.proc.send_signal(signum)

    def _close_all(self) -> None:
        super()._close_all()
        if self._data_plane_stopping:
            for handle in list(self.workers):
                self._signal(handle, signal.SIGINT)
