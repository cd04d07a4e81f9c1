"""Connecting a session to its server: the attempts, their timeouts and the retries.

Theory of operation. ``Connecting`` runs the attempts of one session, each on a server not yet
tried for it, each bounded by ``connect_timeout`` and all of them by ``retry_budget``. An
attempt is ``loop.create_connection`` (uvloop's, so the connect itself, its errors and the
transport are the loop's), driven by hand rather than by a Task: the coroutine is stepped at
once when the client is accepted, so the connect() system call leaves in the same loop turn,
and the session is handed its server transport in the upstream's ``connection_made``, not a
turn later when the coroutine would have resumed. Under a burst of new clients on a busy loop
every turn lasts tens of milliseconds, and a Task costs two of them per session (its first
step, and its wake-up after the connect); without it the first answer comes two turns sooner.
Driving it by hand is what a Task does: send into the coroutine, and when it waits on a
future, send again once that future is done; cancelling cancels the future it waits on, so the
coroutine sees ``CancelledError`` there and the loop closes the half-made transport.

Outcomes are reported to the pool (passive health) as before: success, refused, timeout or
other. A connect that fails for lbtcp's own lack of descriptors or memory (``OUT_OF_RESOURCES``)
is not the server's fault: no report, no retry, and the listener's acceptors pause a moment.
When every attempt failed the client is closed with ``CT`` (all timed out) or ``CR``.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from lbtcp.acceptor import OUT_OF_RESOURCES
from lbtcp.relay import CLOSED, Session, UpstreamProtocol

if TYPE_CHECKING:
    from lbtcp.pool import Pool, Server

TERM_CONNECT_TIMEOUT = "CT"
TERM_CONNECT_REFUSED = "CR"


class ConnectOwner(Protocol):
    """What the attempts report to: the listener that accepted the session."""

    def report_connect(self, pool: Pool, server: Server, ok: bool, kind: str = "") -> None: ...

    def out_of_resources(self, exc: OSError) -> None: ...

    def proxy_header(self, session: Session, version: str) -> bytes: ...


class Connecting:
    """The connect attempts of one session; ``session.connecting`` while they run."""

    __slots__ = (
        "all_timeouts",
        "cancelled",
        "coro",
        "deadline",
        "loop",
        "owner",
        "pool",
        "protocol",
        "server",
        "session",
        "timed_out",
        "timer",
        "tried",
        "upstream_class",
        "waiter",
    )

    def __init__(
        self,
        owner: ConnectOwner,
        session: Session,
        server: Server,
        loop: asyncio.AbstractEventLoop,
        upstream_class: type[UpstreamProtocol] = UpstreamProtocol,
    ) -> None:
        pool = session.pool
        assert pool is not None  # set before connecting (listener or SNI routing)
        self.owner = owner
        self.session = session
        self.loop = loop
        self.pool: Pool = pool
        self.upstream_class = upstream_class
        self.deadline = loop.time() + pool.config.retry_budget
        # The servers tried for this client: only here, an idle session keeps no list.
        self.tried: list[Server] = []
        self.all_timeouts = True
        self.cancelled = False
        self.timed_out = False
        self.server = server
        self.protocol: UpstreamProtocol | None = None
        self.coro: Coroutine[Any, Any, Any] | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """The first attempt, now."""
        self._attempt(self.server)

    def cancel(self) -> None:
        """The client left (or the session was closed): stop, report nothing more."""
        if self.cancelled:
            return
        self.cancelled = True
        self._stop_attempt()

    # --- one attempt ---------------------------------------------------------------------

    def _attempt(self, server: Server) -> None:
        loop = self.loop
        self.tried.append(server)
        timeout = min(self.pool.config.connect_timeout, self.deadline - loop.time())
        if timeout <= 0:
            self._give_up()
            return
        self.server = server
        protocol = self.upstream_class(self.session)
        protocol.connecting = self
        self.protocol = protocol
        self.timed_out = False
        self.timer = loop.call_later(timeout, self._expired)
        self.coro = loop.create_connection(lambda: protocol, server.host, server.port)
        self._step()

    def _step(self, _done: object = None) -> None:
        """Run the attempt's coroutine to its next wait (or its end), as a Task would."""
        coro = self.coro
        if coro is None:
            return
        self.waiter = None
        try:
            waiting = coro.send(None)
        except StopIteration:
            # Done: the session already has its transport (``connected``), or the attempt
            # was given up while the connect was completing and the protocol aborts it.
            self.coro = None
            return
        except asyncio.CancelledError:
            self.coro = None
            if not self.cancelled:  # the timer, not the client
                self._failed("timeout")
            return
        except OSError as exc:
            self.coro = None
            if self.cancelled:
                return
            if self.timed_out:
                self._failed("timeout")
            elif exc.errno in OUT_OF_RESOURCES:
                self._stop_attempt()
                self.owner.out_of_resources(exc)
                self.all_timeouts = False
                self._give_up()
            elif exc.errno == errno.ETIMEDOUT:
                self._failed("timeout")
            else:
                self.all_timeouts = False
                self._failed("refused" if exc.errno == errno.ECONNREFUSED else "other")
            return
        except Exception as exc:  # a bug must cost one session, not the loop
            self.coro = None
            self._stop_attempt()
            self.loop.call_exception_handler(
                {"message": "connect attempt failed", "exception": exc, "protocol": self.session}
            )
            self.all_timeouts = False
            self._give_up()
            return
        if not isinstance(waiting, asyncio.Future):  # a loop that waits on something else
            coro.close()
            self.coro = None
            self._stop_attempt()
            self.loop.call_exception_handler(
                {"message": f"create_connection waited on {waiting!r}", "protocol": self.session}
            )
            self.all_timeouts = False
            self._give_up()
            return
        self.waiter = waiting
        waiting.add_done_callback(self._step)

    def _expired(self) -> None:
        """Timer: this attempt took ``connect_timeout`` (or the rest of the budget)."""
        self.timer = None
        self.timed_out = True
        if self.protocol is not None:
            self.protocol.discard()
        waiter = self.waiter
        if waiter is not None:
            waiter.cancel()  # the coroutine resumes with CancelledError: see _step

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _stop_attempt(self) -> None:
        """End the attempt in flight: its timer, its half-made connection, its coroutine."""
        self._cancel_timer()
        if self.protocol is not None:
            self.protocol.discard()
            self.protocol = None
        waiter = self.waiter
        if waiter is not None:
            waiter.cancel()

    def connected(self, transport: asyncio.Transport) -> None:
        """Called by the attempt's protocol from ``connection_made``: the server is up."""
        self._cancel_timer()
        session = self.session
        pool = self.pool
        server = self.server
        self.owner.report_connect(pool, server, True)
        protocol = self.protocol
        self.protocol = None
        if session.finished or session.up_state == CLOSED:
            if protocol is not None:
                protocol.discard()  # the client left while we connected
            return
        session.connecting = None
        try:
            pool.session_started(server)
            version = pool.config.proxy_protocol
            if version != "off":
                # Before attach_upstream: the header must precede every client byte.
                transport.write(self.owner.proxy_header(session, version))
            session.attach_upstream(transport, server)
            pool.connect_seconds.observe(session.connect_ms / 1000.0)
        except Exception as exc:  # a bug must cost one session, not the loop
            self.loop.call_exception_handler(
                {"message": "attaching a server failed", "exception": exc, "protocol": session}
            )
            session.close(TERM_CONNECT_REFUSED)

    # --- after a failed attempt ----------------------------------------------------------

    def _failed(self, kind: str) -> None:
        """Report the failed attempt, then try another server while the budget allows."""
        self._stop_attempt()  # the coroutine has ended: only the timer and protocol are left
        pool = self.pool
        self.owner.report_connect(pool, self.server, False, kind)
        session = self.session
        if session.finished or self.cancelled:
            return
        config = pool.config
        if len(self.tried) > config.retries or self.loop.time() >= self.deadline:
            self._give_up()
            return
        client = pool.client(session.client_ip, session.client_port)
        next_server = pool.choose(client, self.tried)
        if next_server is None:
            self._give_up()
            return
        self._attempt(next_server)

    def _give_up(self) -> None:
        session = self.session
        session.connecting = None
        session.close(TERM_CONNECT_TIMEOUT if self.all_timeouts else TERM_CONNECT_REFUSED)
