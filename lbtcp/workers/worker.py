"""A data-plane worker (``workers > 1``): accepts and splices; health comes from the parent.

Theory of operation. The parent starts ``python -m lbtcp.workers.worker IPC_FD PARENT_PID``
with its slot's listening sockets passed as file descriptors. The first frame on the IPC
socketpair is ``HELLO``: the validated config, the slot, the sockets by listener and bind, and
the parent's current health verdicts. The worker builds the same pools and listeners as
``workers = 1`` (same ``Listener``, same relay), applies the verdicts, starts accepting and
answers ``READY``. From then on:

- connect failures, and successes while the parent counts failures for that server (see
  ``WorkerPool``), go to the parent (``RESULTS``), batched for ``RESULTS_DELAY``
  and dropped-and-counted if the socketpair is full: the parent's health machine decides;
- ``VERDICTS`` from the parent replace each pool's membership, eligibility, admin state and
  slow-start factor (the worker's own health machine is never fed);
- a counters snapshot (``STATS``, absolute values) goes up every ``STATS_INTERVAL`` when it
  changed, and once more on the way out;
- SIGTERM drains (stop accepting, ``drain_timeout``, then ``ST``), SIGINT closes at once,
  ``RETIRE`` (a reload started a new generation) stops accepting and exits when the last
  session ends, and EOF on the socketpair (the parent is gone) closes everything and exits.
  ``PR_SET_PDEATHSIG`` makes the kernel kill a worker whose parent died without that EOF
  being read (a stopped loop), so no orphan holds the ports.

A worker opens no probe, no DNS query and no admin port.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import math
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from lbtcp.config import Config
from lbtcp.counters import live_bytes
from lbtcp.events import Event
from lbtcp.listener import REFUSAL_REASONS, Listener
from lbtcp.log import Log
from lbtcp.pool import Pool, Server
from lbtcp.relay import TERM_SHUTDOWN
from lbtcp.runtime import Runtime
from lbtcp.workers.channel import Channel
from lbtcp.workers.ipc import HEADER, Frame, IpcError, Kind, decode_json, merge_result

RESULTS_DELAY = 0.002
SUSPECT_HOLD = 1.0
STATS_INTERVAL = 0.1
HELLO_TIMEOUT = 10.0
PIPE_BUF = 4096
PR_SET_PDEATHSIG = 1


def stats_key(*parts: str) -> str:
    return "\x1f".join(parts)


def share(limit: int, workers: int) -> int:
    """A worker's part of a server's or listener's ``max_connections`` (0: unlimited): the
    limit split evenly, rounded up so that each worker may take at least one. The group's
    total then stays within ``workers * ceil(limit / workers)``, the limit rounded up to a
    multiple of ``workers``, with no lock or message on the hot path."""
    return -(-limit // workers) if limit > 0 else 0


def worker_config(config: Config, workers: int) -> Config:
    """``config`` with each listener's ``max_connections`` replaced by this worker's share
    (servers' are shared as their verdicts arrive, see ``apply_verdicts``)."""
    listeners = {
        name: dataclasses.replace(
            listener, max_connections=share(listener.max_connections, workers)
        )
        for name, listener in config.listeners.items()
    }
    return dataclasses.replace(config, listeners=listeners)


class WorkerLog(Log):
    """Access lines carry ``worker=PID``; writes stay under PIPE_BUF so that lines of several
    processes sharing one stderr pipe never interleave inside a line."""

    def access(self, **fields: object) -> None:
        fields["worker"] = os.getpid()
        super().access(**fields)

    def _write(self, text: str) -> None:
        if len(text) <= PIPE_BUF:
            super()._write(text)
            return
        chunk: list[str] = []
        size = 0
        for line in text.splitlines(keepends=True):
            if chunk and size + len(line) > PIPE_BUF:
                super()._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            super()._write("".join(chunk))


class WorkerPool(Pool):
    """A pool whose connect results go to the parent instead of a local health machine.

    A success matters to the parent only while it counts failures for that server (the
    success resets the count): ``suspect`` holds those servers (from the verdicts) and those
    this worker saw fail in the last ``SUSPECT_HOLD`` seconds (its report may still be on
    the way); other successes are not sent, as one process skips them too."""

    __slots__ = ("report", "suspect")
    report: Callable[[str, str, bool, str], None]
    suspect: dict[str, float]  # server name -> until (loop time; inf: the parent says so)

    def connect_result(
        self, server: Server, ok: bool, now: float, kind: str = "other"
    ) -> list[Event]:
        """Called by ``Listener._report`` after every real connect attempt (hot path: a
        dict lookup for a success, one append to the batch for a reported result)."""
        if ok:
            until = self.suspect.get(server.name)
            if until is None:
                return []
            if until < now:
                del self.suspect[server.name]
                return []
            self.report(self.name, server.name, True, "")
            return []
        if self.suspect.get(server.name, 0.0) < now + SUSPECT_HOLD:
            self.suspect[server.name] = now + SUSPECT_HOLD
        server.connect_failures += 1
        if kind == "refused":
            server.connect_refused += 1
        elif kind == "timeout":
            server.connect_timeouts += 1
        else:
            kind = "other"
            server.connect_other += 1
        self.report(self.name, server.name, False, kind)
        return []


class WorkerRuntime(Runtime):
    """The data plane of one worker process."""

    def __init__(self, config: Config, hello: dict[str, Any], channel_sock: socket.socket):
        self.worker_count: int = hello["workers"]
        config = worker_config(config, self.worker_count)
        super().__init__(config, WorkerLog(config.global_.log_format, config.global_.access_log))
        self.slot: int = hello["slot"]
        self.generation: int = hello["generation"]
        self.hello = hello
        self.channel_sock = channel_sock
        self.channel: Channel | None = None
        self._results: list[list[Any]] = []
        self._results_timer: asyncio.TimerHandle | None = None
        self._last_stats: dict[str, list[float]] | None = None
        self.dropped_results = 0
        self._retiring = False
        self._parent_gone = False

    def build(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for name, pool_config in self.config.pools.items():
            pool = WorkerPool.from_config(pool_config, now=loop.time())
            assert isinstance(pool, WorkerPool)  # from_config makes its own class
            pool.report = self._report_result
            pool.suspect = {}
            self.pools[name] = pool
        for name, listener_config in self.config.listeners.items():
            self.listeners[name] = Listener(
                listener_config,
                self.pools[listener_config.pool],
                self.log,
                loop,
                self.on_events,
                pools=self.pools,  # SNI routes pick among them
            )

    def on_events(self, pool: Pool, events: list[Event]) -> None:
        """The worker's pools make no health decisions: nothing to log or act on here."""

    # --- to the parent -------------------------------------------------------------------

    def _report_result(self, pool: str, server: str, ok: bool, kind: str) -> None:
        merge_result(self._results, pool, server, ok, kind)
        if self._results_timer is None and self._loop is not None:
            self._results_timer = self._loop.call_later(RESULTS_DELAY, self._flush_results)

    def _flush_results(self) -> None:
        """Timer callback (RESULTS_DELAY after the first result of a batch)."""
        self._results_timer = None
        batch, self._results = self._results, []
        if batch and (self.channel is None or not self.channel.send(Kind.RESULTS, batch)):
            self.dropped_results += sum(entry[4] for entry in batch)

    def stats(self) -> dict[str, list[float]]:
        """Absolute counters of this worker; see ``ipc.merge_stats`` for the layout."""
        out: dict[str, list[float]] = {}
        sessions = [s for listener in self.listeners.values() for s in listener.sessions]
        live = live_bytes(sessions)
        for name, listener in self.listeners.items():
            hist = listener.session_seconds
            out[stats_key("L", name)] = [
                listener.connections_total,
                listener.active,
                *(listener.refused.get(r, 0) for r in REFUSAL_REASONS),
                hist.sum,
                *hist.counts,
            ]
        for name, pool in self.pools.items():
            hist = pool.connect_seconds
            out[stats_key("C", name)] = [hist.sum, *hist.counts]
            for server in pool.servers.values():
                sent, received = live.get(server, (0, 0))
                out[stats_key("S", name, server.name)] = [
                    server.active,
                    server.total,
                    server.bytes_sent + sent,
                    server.bytes_received + received,
                    server.connect_refused,
                    server.connect_timeouts,
                    server.connect_other,
                    server.connect_failures,
                ]
        out["W"] = [self.dropped_results]
        return out

    def _send_stats(self, force: bool = False) -> None:
        stats = self.stats()
        changed = force or stats != self._last_stats
        if changed and self.channel is not None and self.channel.send(Kind.STATS, stats):
            self._last_stats = stats

    def _stats_tick(self) -> None:
        """Timer callback, every STATS_INTERVAL."""
        assert self._loop is not None
        self._send_stats()
        self._stats_timer = self._loop.call_later(STATS_INTERVAL, self._stats_tick)

    # --- from the parent -----------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        """Called by the channel for each frame from the parent."""
        if frame.kind is Kind.VERDICTS:
            self.apply_verdicts(decode_json(frame))
        elif frame.kind is Kind.CLOSE_SERVER:
            message = decode_json(frame)
            pool = self.pools.get(str(message["pool"]))
            if pool is not None:  # the same sessions as in one process (SNI routes too)
                self._close_server_sessions(pool, str(message["server"]))
        elif frame.kind is Kind.RETIRE:
            self._retiring = True
            for listener in self.listeners.values():
                listener.stop_accepting()
            if self._stop_requested is not None:
                self._stop_requested.set()
        elif frame.kind is Kind.STATS_REQUEST:
            self._send_stats(force=True)
        else:
            raise IpcError(f"not a message for a worker: {frame.kind.name}")

    def apply_verdicts(self, message: Any) -> None:
        """The parent's view of each pool: membership, eligibility, admin, slow start."""
        if not isinstance(message, dict):
            raise IpcError("VERDICTS: not an object")
        assert self._loop is not None
        now = self._loop.time()
        for pool_name, rows in message.items():
            pool = self.pools.get(pool_name)
            if pool is None or not isinstance(rows, list):
                continue
            servers: list[Server] = []
            flags: list[tuple[str, bool, bool, float]] = []
            assert isinstance(pool, WorkerPool)
            for row in rows:
                (name, host, port, weight, backup, max_connections) = row[:6]
                eligible, admin_ok, factor, failing = row[6:]
                if failing:
                    pool.suspect[str(name)] = math.inf
                elif pool.suspect.get(str(name)) == math.inf:
                    del pool.suspect[str(name)]
                servers.append(
                    Server(
                        str(name),
                        str(host),
                        int(port),
                        weight=int(weight),
                        backup=bool(backup),
                        max_connections=share(int(max_connections), self.worker_count),
                    )
                )
                flags.append((str(name), bool(eligible), bool(admin_ok), float(factor)))
            pool.set_servers(servers, now, reason="control plane")
            for name, eligible, admin_ok, factor in flags:
                server = pool.servers[name]
                server.eligible = eligible
                server.admin_ok = admin_ok
                server.weight_factor = factor
            pool.balancer.update(list(pool.servers.values()))

    def _parent_lost(self) -> None:
        """The socketpair closed: the parent is gone. Nothing may outlive it."""
        self._parent_gone = True
        self._stop_mode = "now"
        if self._stop_requested is not None:
            self._stop_requested.set()
        self._close_all()

    # --- running -------------------------------------------------------------------------

    async def run_worker(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._stop_requested = asyncio.Event()
        self.log.use_timer(loop.call_later)
        self.build(loop)
        _, channel = await loop.create_unix_connection(
            lambda: Channel(self.on_frame, self._parent_lost, self.log, "the parent"),
            sock=self.channel_sock,
        )
        self.channel = channel
        self.apply_verdicts(self.hello["verdicts"])
        for name, binds in self.hello["binds"].items():
            listener = self.listeners.get(name)
            sockets = {b: [socket.socket(fileno=fd) for fd in fds] for b, fds in binds.items()}
            if listener is None:
                for group in sockets.values():
                    for sock in group:
                        sock.close()
                continue
            await listener.start(sockets)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop, "drain")
        loop.add_signal_handler(signal.SIGINT, self.request_stop, "now")
        # The parent reloads; a SIGHUP sent to the whole process group means nothing here.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        self._stats_timer = loop.call_later(STATS_INTERVAL, self._stats_tick)
        channel.send(Kind.READY, {"pid": os.getpid(), "slot": self.slot})
        await self._stop_requested.wait()
        for listener in self.listeners.values():
            listener.stop_accepting()
        if not self._parent_gone:
            channel.send(Kind.DRAINING, {"sessions": self.active_sessions})
        if self.active_sessions and not self._parent_gone and self._stop_mode == "drain":
            self.log.event(
                "worker_drain",
                "worker retiring (a reload replaced it): waiting for its live sessions"
                if self._retiring
                else "stopped accepting; waiting for live sessions",
                worker=os.getpid(),
                sessions=self.active_sessions,
                timeout_s="none" if self._retiring else self.config.global_.drain_timeout,
            )
        if not self._parent_gone:
            await self._drain(loop)
        self._close_all()
        for _ in range(100):
            if not self.active_sessions:
                break
            await asyncio.sleep(0.01)
        self._stats_timer.cancel()
        if self._results_timer is not None:
            self._results_timer.cancel()
            self._flush_results()
        self._send_stats(force=True)
        self.log.flush()
        channel.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(channel.closed), 1.0)
        return 0

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        """Retiring: until the last session ends (a reload never cuts sessions), unless a
        stop comes; stopping: up to ``drain_timeout``."""
        deadline = loop.time() + self.config.global_.drain_timeout
        while self.active_sessions and self._stop_mode == "drain" and not self._parent_gone:
            if not self._retiring and loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)

    def request_stop(self, mode: str) -> None:
        """Signal handler: SIGTERM drains, SIGINT closes at once. A retiring worker told to
        stop now drains with the stop's deadline from here on."""
        if self._retiring and mode == "drain":
            self._retiring = False
        if mode == "now":
            self._stop_mode = "now"
            self._close_all()
        if self._stop_requested is not None:
            self._stop_requested.set()

    def _close_all(self) -> None:
        for listener in self.listeners.values():
            listener.close_sessions(TERM_SHUTDOWN)


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: the kernel sends SIGKILL to this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _read_hello(sock: socket.socket, standby: bool) -> dict[str, Any]:
    """The start message (a spare waits for it as long as its parent lives)."""
    sock.settimeout(None if standby else HELLO_TIMEOUT)
    header = _read_exact(sock, HEADER.size)
    length, _version, kind = HEADER.unpack(header)
    if kind != Kind.HELLO or length > 64 * 1024 * 1024:
        raise IpcError(f"expected HELLO, got type {kind} of {length} bytes")
    hello = pickle.loads(_read_exact(sock, length))  # from our own parent only: see ipc
    sock.settimeout(None)
    sock.setblocking(False)
    if not isinstance(hello, dict) or not isinstance(hello.get("config"), Config):
        raise IpcError("HELLO: not a worker start message")
    return hello


def _read_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise IpcError("the parent closed the channel before HELLO was complete")
        chunks += chunk
    return bytes(chunks)


def main(argv: list[str]) -> int:
    _die_with_parent()
    if len(argv) not in (3, 4) or argv[3:] not in ([], ["standby"]):
        print("usage: python -m lbtcp.workers.worker IPC_FD PARENT_PID [standby]", file=sys.stderr)
        return 2
    if os.getppid() != int(argv[2]):
        return 1  # the parent died before the death signal was armed
    sock = socket.socket(fileno=int(argv[1]))
    try:
        hello = _read_hello(sock, argv[3:] == ["standby"])
    except (OSError, IpcError, pickle.UnpicklingError, EOFError) as exc:
        print(f"lbtcp worker: cannot start: {exc}", file=sys.stderr)
        return 1
    for fd in hello.get("close", []):  # a spare's sockets of the other slots
        with contextlib.suppress(OSError):
            os.close(fd)
    import uvloop

    runtime = WorkerRuntime(hello["config"], hello, sock)
    try:
        return uvloop.run(runtime.run_worker())
    finally:
        runtime.log.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
