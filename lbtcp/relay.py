"""The splicer: a pair of protocols that move bytes between a client and a server.

Theory of operation. ``Session`` is the client-side ``asyncio.Protocol``; ``UpstreamProtocol``
is the server side. Each chunk the loop hands over is written to the peer transport as it is:
no copy, no ``await``, no per-chunk timer. Flow control is coupled: when one transport's write
buffer passes its high-water mark the loop calls ``pause_writing`` on that side's protocol, and
we stop reading from the *other* transport until ``resume_writing``. So a slow reader on either
side bounds lbtcp's memory at about one write buffer per direction.

Each direction has an explicit state (``OPEN`` -> ``SHUT`` after EOF was passed on, or
``CLOSED`` when a transport is gone). EOF from one side becomes ``write_eof()`` on the other (TCP
half-close), and the session ends when both directions are shut, when either transport is lost,
on idle timeout, or when lbtcp stops. A transport is never written after ``write_eof()`` or
``close()``: every write path checks the direction's state (see STYLE.md habit 7).

Client bytes that arrive before the server connection is up are held, in order, up to
``PENDING_LIMIT`` bytes; past that the client is paused until the connection is made. A client
EOF in that window is held too and passed on after the held bytes.

The protocols' callbacks never raise; ``connection_lost`` releases the session exactly once
through ``_finish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from time import monotonic
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from lbtcp.connector import Connecting
    from lbtcp.pool import Pool, Server

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
PENDING_LIMIT = HIGH_WATER

# Direction states. Plain ints: they are read on every chunk.
OPEN = 0
SHUT = 1  # EOF passed on with write_eof(); nothing more goes this way
CLOSED = 2

# Termination codes of DESIGN.md §6.
TERM_NORMAL = "--"
TERM_IDLE = "CI"
TERM_SHUTDOWN = "ST"
TERM_SERVER_DOWN = "SD"

_LINGER_RESET = struct.pack("ii", 1, 0)


class SessionOwner(Protocol):
    """What a session reports to: the listener that accepted it."""

    def session_accepted(self, session: Session) -> None: ...

    def session_finished(self, session: Session) -> None: ...

    def watch_idle(self, session: Session) -> None: ...


def idle_step(timeout: float) -> float:
    """How often idle sessions with ``timeout`` are checked: eight times per period keeps
    the timeout within 1/8 of its value without reading the clock on every chunk."""
    return max(timeout / 8.0, 0.01)


def reset_transport(transport: asyncio.BaseTransport) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    cast(asyncio.WriteTransport, transport).abort()


class UpstreamProtocol(asyncio.Protocol):
    """The server side of a session. The loop calls it; it forwards to the session, unless
    the connector discarded the connection (it gave up on it before handing it over)."""

    __slots__ = ("connecting", "discarded", "session", "transport")

    def __init__(self, session: Session) -> None:
        self.session = session
        self.transport: asyncio.BaseTransport | None = None
        self.discarded = False
        # The attempts that made this connection (connector.Connecting): told in
        # connection_made, then dropped.
        self.connecting: Connecting | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop when the connect succeeds: hand the transport to the session
        now, not when create_connection returns a loop turn later."""
        self.transport = transport
        if self.discarded:
            cast(asyncio.WriteTransport, transport).abort()
            return
        connecting = self.connecting
        if connecting is not None:
            self.connecting = None
            connecting.connected(cast(asyncio.Transport, transport))

    def discard(self) -> None:
        """The connector gave up on this connection (timed out in the same loop turn as it
        was made, or the client left): abort it without touching the session."""
        self.discarded = True
        self.connecting = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            cast(asyncio.WriteTransport, transport).abort()

    def data_received(self, data: bytes) -> None:
        """Server bytes: straight to the client, unless that direction is done."""
        session = self.session
        if session.down_state == OPEN and not self.discarded:
            session.client.write(data)
            session.bytes_to_client += len(data)

    def eof_received(self) -> bool:
        """The server shut down its write side: pass the FIN on to the client."""
        if not self.discarded:
            self.session.shut_down_direction()
        return True

    def pause_writing(self) -> None:
        """The server's write buffer is full: stop reading from the client."""
        if not self.discarded:
            self.session.set_client_reading(False)

    def resume_writing(self) -> None:
        if not self.discarded:
            self.session.set_client_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.discarded:
            self.session.upstream_lost(exc)


class Session(asyncio.Protocol):
    """The client side of a session, and the session's state."""

    __slots__ = (
        "bytes_from_client",
        "bytes_to_client",
        "client",
        "client_ip",
        "client_paused",
        "client_port",
        "connect_ms",
        "connecting",
        "destination",
        "down_state",
        "finished",
        "idle_mark",
        "idle_seen_at",
        "idle_timeout",
        "loop",
        "owner",
        "pending",
        "pending_eof",
        "pending_size",
        "pool",
        "server",
        "started_at",
        "term",
        "up_state",
        "upstream",
        "upstream_paused",
    )

    def __init__(self, owner: SessionOwner, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.client: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.upstream: asyncio.Transport | None = None
        self.server: Server | None = None
        # The pool this session uses: set by the listener (or by SNI routing before that).
        self.pool: Pool | None = None
        self.client_ip = ""
        self.client_port = 0
        # The original destination from an accepted PROXY header (None: lbtcp's own address).
        self.destination: tuple[str, int] | None = None
        # up = client -> server, down = server -> client
        self.up_state = OPEN
        self.down_state = OPEN
        # Made on the first early chunk: most clients send nothing before the server is up.
        self.pending: list[bytes] | None = None
        self.pending_size = 0
        self.pending_eof = False
        self.client_paused = False
        self.upstream_paused = False
        self.bytes_from_client = 0
        self.bytes_to_client = 0
        # uvloop's loop.time() ticks in whole milliseconds: too coarse for the access log.
        self.started_at = monotonic()
        self.connect_ms = -1.0
        # The connect attempts while they run (connector.Connecting), then None.
        self.connecting: Connecting | None = None
        self.idle_timeout = 0.0
        self.idle_mark = -1
        self.idle_seen_at = 0.0
        self.term = TERM_NORMAL
        self.finished = False

    # --- client-side callbacks (called by the loop) -------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A client was accepted. The owner decides: refuse it, or start connecting."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        client = cast(asyncio.Transport, transport)
        self.client = client
        client.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if not self.client_ip:  # else set from a PROXY header (proxy_accept.HeaderReader)
            peer = transport.get_extra_info("peername")
            if peer:
                self.client_ip, self.client_port = peer[0], peer[1]
        try:
            self.owner.session_accepted(self)
        except Exception as exc:  # a bug must cost one session, not the process
            self.loop.call_exception_handler(
                {"message": "session_accepted failed", "exception": exc, "protocol": self}
            )
            self.close(TERM_NORMAL)

    def data_received(self, data: bytes) -> None:
        """Client bytes: straight to the server, or held until it is connected."""
        if self.up_state != OPEN:
            return
        self.bytes_from_client += len(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            return
        pending = self.pending
        if pending is None:
            self.pending = [data]
        else:
            pending.append(data)
        self.pending_size += len(data)
        if self.pending_size >= PENDING_LIMIT:
            self.set_client_reading(False)

    def eof_received(self) -> bool:
        """The client shut down its write side."""
        if self.upstream is None:
            self.pending_eof = True
        else:
            self.shut_up_direction()
        return True  # keep our write side open: the server may still answer

    def pause_writing(self) -> None:
        """The client's write buffer is full: stop reading from the server."""
        self.set_upstream_reading(False)

    def resume_writing(self) -> None:
        self.set_upstream_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client transport is gone (closed by either side, or reset)."""
        self.up_state = CLOSED
        self.down_state = CLOSED
        self.pending = None
        connecting = self.connecting
        if connecting is not None:
            self.connecting = None
            connecting.cancel()
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.close()
        self._finish()

    # --- flow control --------------------------------------------------------------------

    def set_client_reading(self, reading: bool) -> None:
        if reading == (not self.client_paused):
            return
        if reading and self.upstream is None and self.pending_size >= PENDING_LIMIT:
            return  # still waiting for the server with a full hold buffer
        self.client_paused = not reading
        if self.client.is_closing():
            return
        if reading:
            self.client.resume_reading()
        else:
            self.client.pause_reading()

    def set_upstream_reading(self, reading: bool) -> None:
        upstream = self.upstream
        if upstream is None:
            # Not connected yet: remember, and apply once it is.
            self.upstream_paused = not reading
            return
        if reading == (not self.upstream_paused):
            return
        self.upstream_paused = not reading
        if upstream.is_closing():
            return
        if reading:
            upstream.resume_reading()
        else:
            upstream.pause_reading()

    # --- half-close ----------------------------------------------------------------------

    def shut_up_direction(self) -> None:
        """Client EOF: pass it to the server once (client -> server is done)."""
        if self.up_state != OPEN:
            return
        self.up_state = SHUT
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            if upstream.can_write_eof():
                upstream.write_eof()
            else:  # pragma: no cover - TCP transports can always write EOF
                upstream.close()
        self._check_both_shut()

    def shut_down_direction(self) -> None:
        """Server EOF: pass it to the client once (server -> client is done)."""
        if self.down_state != OPEN:
            return
        self.down_state = SHUT
        client = self.client
        if not client.is_closing():
            if client.can_write_eof():
                client.write_eof()
            else:  # pragma: no cover
                client.close()
        self._check_both_shut()

    def _check_both_shut(self) -> None:
        if self.up_state != OPEN and self.down_state != OPEN:
            # Both FINs passed on; close() lets the write buffers drain first.
            self.close(self.term)

    # --- the server connection -----------------------------------------------------------

    def attach_upstream(self, transport: asyncio.Transport, server: Server) -> None:
        """Called by the connector once the server connection is up."""
        self.upstream = transport
        self.server = server
        self.connect_ms = (monotonic() - self.started_at) * 1000.0
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self.upstream_paused:
            transport.pause_reading()
        # Unpause first: writing the held bytes may fill the server's buffer and pause the
        # client again for the right reason. New bytes only arrive on a later loop turn.
        if self.client_paused:
            self.client_paused = False
            if not self.client.is_closing():
                self.client.resume_reading()
        pending = self.pending
        self.pending = None
        self.pending_size = 0
        if pending:
            for chunk in pending:
                transport.write(chunk)
        if self.pending_eof:
            self.shut_up_direction()
        if self.idle_timeout > 0:
            self.idle_seen_at = self.loop.time()
            # One timer per listener sweeps its sessions, rather than a timer per session:
            # a TimerHandle and its loop-side timer cost about 600 bytes per idle session.
            self.owner.watch_idle(self)

    def upstream_lost(self, exc: Exception | None) -> None:
        """The server transport is gone: end the session (the client gets what was sent)."""
        # Nothing can reach the server any more, so the client side ends too; close()
        # still flushes what the server sent (then FIN, unless the FIN already went).
        self.up_state = CLOSED
        self.down_state = CLOSED
        client = self.client
        if not client.is_closing():
            client.close()
        self._finish()

    # --- idle timeout --------------------------------------------------------------------

    def check_idle(self, now: float) -> bool:
        """Called by the owner's idle sweep (every ``idle_step`` of the timeout): close the
        session after idle_timeout with no bytes either way. False once it is closed."""
        if self.finished or (self.up_state == CLOSED and self.down_state == CLOSED):
            return False
        mark = self.bytes_from_client + self.bytes_to_client
        if mark != self.idle_mark:
            self.idle_mark = mark
            self.idle_seen_at = now
        elif now - self.idle_seen_at >= self.idle_timeout:
            self.close(TERM_IDLE, abort=True)
            return False
        return True

    # --- ending --------------------------------------------------------------------------

    def close(self, term: str, *, abort: bool = False) -> None:
        """End the session from our side (shutdown, idle, server down, refusal)."""
        if self.term == TERM_NORMAL:
            self.term = term
        self.up_state = CLOSED
        self.down_state = CLOSED
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                if abort:
                    transport.abort()
                else:
                    transport.close()
        connecting = self.connecting
        if connecting is not None:
            self.connecting = None
            connecting.cancel()

    def _finish(self) -> None:
        """Runs once, when the client transport or the server transport is lost."""
        if self.finished:
            return
        if self.upstream is not None and not self.upstream.is_closing():
            return  # wait for the other side's connection_lost
        if self.client is not None and not self.client.is_closing():
            return
        self.finished = True
        try:
            self.owner.session_finished(self)
        except Exception as exc:
            self.loop.call_exception_handler(
                {"message": "session_finished failed", "exception": exc, "protocol": self}
            )

    def duration_ms(self) -> float:
        return (monotonic() - self.started_at) * 1000.0
