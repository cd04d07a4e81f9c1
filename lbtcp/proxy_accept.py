"""Reading a PROXY header from a trusted peer before the session starts (asyncio glue).

Theory of operation. A listener with ``proxy_protocol`` on accepts each client with a
``HeaderReader`` instead of a ``relay.Session``; with ``proxy_protocol = "off"`` it is never
built, so plain listeners pay nothing. In ``connection_made`` the reader checks the peer
against ``proxy_protocol_from``: an untrusted peer is handed to a ``Session`` at once, as a
plain client (whatever it sends, header-like or not, is relayed as data). A trusted peer must
send a complete header within ``proxy_protocol_timeout``; the reader buffers what arrives (at
most ``proxy_protocol.MAX_HEADER_LENGTH`` bytes plus one read) and asks the pure parser.
``Done``: a ``Session`` takes over the transport (``set_protocol``) with the header's addresses
as the client's, and the bytes that came after the header in the same read are fed to it, so
nothing is lost. ``Invalid``, the timeout, or an EOF or reset before the header is complete:
the client is closed, counted as ``proxy_protocol`` refusal and logged ``PP``.

The reader holds one socket, one timer and a buffer of at most ~2 KiB until its verdict:
that is all a stalled client costs.

SNI routing uses the same reader, as a second stage (``_INSPECTING``): a listener with
``routes`` accepts each client with a ``HeaderReader`` too, and once the PROXY header is read
(or at once, without PROXY or for an untrusted peer) the reader buffers the first TLS record
for at most ``inspect_timeout`` and ``tls_hello.MAX_INSPECT`` bytes, asks ``tls_hello.parse``,
and hands over to an ``InspectedSession`` bound to the route's pool, or to the listener's
``pool`` when the bytes are not TLS, carry no matching name, are malformed, or do not complete
in time. Everything read in this stage is fed to the session, unchanged, before anything
else. An EOF in this stage hands over too (the session passes it on after the bytes, as for
any client); a reset ends the client like a plain one that left before its server was chosen.

A listener with ``routes`` and without PROXY headers (the common case) needs no reader: its
clients are ``RoutingSession``s, sessions that inspect their own first bytes. Such a session
defers ``session_accepted`` (ACL, limits, the choice of a server, the connect) until its pool
is known, then relays the bytes it read as any session's first chunk, so there is no second
protocol object, no ``set_protocol`` and no per-client timer: the listener keeps one FIFO of
``(deadline, session)`` and one ``call_at`` timer for all of them (``Listener.inspect_*``).
Measured with ``benchmarks/sni_rate.py --instructions`` (callgrind): the reader path cost
about 94,000 instructions more per connection than a plain session, this one first about
76,000 (53,000 of them the ClientHello parse), now about 10,000 with a hello whose layout
the parser knows (``tls_hello``'s remembered layouts) and about 38,000 with one it does not
(extensions shuffled). Of the ~220 Python opcodes a routed connection runs beyond a plain
one, the parse is ~40; the rest is this class, the inspect queue and the route lookup.
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING, cast

from lbtcp import tls_hello
from lbtcp.proxy_protocol import MAX_HEADER_LENGTH, Done, Invalid, parse
from lbtcp.relay import HIGH_WATER, LOW_WATER, OPEN, Session
from lbtcp.tls_hello import MAX_INSPECT, NEED_MORE, Hello
from lbtcp.tls_hello import parse as parse_hello

if TYPE_CHECKING:
    from lbtcp.listener import Listener
    from lbtcp.pool import Pool

# Reader states.
_WAITING = 0  # for a PROXY header
_HANDED_OVER = 1
_ENDED = 2
_INSPECTING = 3  # for the first TLS record


class InspectedSession(Session):
    """A session of a listener with ``routes``: what its ClientHello said, for the log."""

    __slots__ = ("alpn", "sni")

    def __init__(self, listener: Listener, pool: Pool, sni: str, alpn: tuple[str, ...]) -> None:
        super().__init__(listener, listener.loop)
        self.pool = pool
        self.sni = sni
        # As the hello gave it; joined for the access log only (most listeners log nothing
        # per session, and the join cost ~1,300 instructions per connection).
        self.alpn = alpn


class RoutingSession(InspectedSession):
    """A client of a listener with ``routes`` and no PROXY headers: reads its ClientHello
    itself, then is an ordinary session of the route's pool (see the module doc).

    Its callbacks check ``inspecting`` and, after the verdict, pass on to Session's. (Not
    by switching ``__class__`` to InspectedSession after the verdict: uvloop keeps the bound
    ``data_received`` it took when the connection was made, so the switch would not reach
    it.)"""

    __slots__ = ("held", "inspecting")

    # Built by the listener's factory as a plain Session is, (owner, loop): no frame of its
    # own; its fields are set in connection_made.
    __init__ = Session.__init__

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop for each accepted client: wait for its first TLS record (the
        listener's FIFO bounds the wait by ``inspect_timeout``)."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        client: asyncio.Transport = transport  # type: ignore[assignment]
        self.client = client
        client.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = client.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], peer[1]
        self.sni = ""
        self.alpn = ()
        self.held = b""
        self.inspecting = True
        listener: Listener = self.owner  # type: ignore[assignment]
        try:
            listener.inspect_started(self)
        except Exception as exc:  # a bug must cost one session, not the process
            self.loop.call_exception_handler(
                {"message": "inspect_started failed", "exception": exc, "protocol": self}
            )
            self.inspecting = False
            self.close("--")

    def data_received(self, data: bytes) -> None:
        """The ClientHello's bytes until a verdict, then client bytes as for any session."""
        if not self.inspecting:
            Session.data_received(self, data)
            return
        held = self.held
        buffer = held + data if held else data
        verdict = parse_hello(buffer)
        if verdict is NEED_MORE and len(buffer) < MAX_INSPECT:
            self.held = buffer
            return
        if held:
            self.held = b""
        listener: Listener = self.owner  # type: ignore[assignment]
        pool = listener.pool
        if isinstance(verdict, Hello):
            self.alpn = verdict.alpn
            sni = verdict.server_name
            if sni is not None:
                self.sni = sni
                router = listener.router  # None once a reload removed the routes
                if router is not None:
                    routed = router.match(sni)
                    if routed is not None:
                        pool = routed
        self.route(pool, buffer)

    def eof_received(self) -> bool:
        """The client half-closed: route what came (if still inspecting), then pass it on."""
        if self.inspecting:
            held = self.held
            self.held = b""
            listener: Listener = self.owner  # type: ignore[assignment]
            self.route(listener.pool, held)
        return Session.eof_received(self)

    def connection_lost(self, exc: Exception | None) -> None:
        """The client transport is gone; before its verdict, it left (or was reset) before a
        server was chosen: counted and logged as such."""
        if not self.inspecting:
            Session.connection_lost(self, exc)
            return
        self.inspecting = False
        self.finished = True
        self.held = b""
        listener: Listener = self.owner  # type: ignore[assignment]
        try:
            listener.inspect_abandoned((self.client_ip, self.client_port), self.started_at)
        except Exception as error:
            self.loop.call_exception_handler(
                {"message": "inspect_abandoned failed", "exception": error, "protocol": self}
            )

    def inspect_expired(self) -> None:
        """Called by the listener's inspect timer: no complete ClientHello within
        ``inspect_timeout``: the default pool, with what was read."""
        held = self.held
        self.held = b""
        listener: Listener = self.owner  # type: ignore[assignment]
        self.route(listener.pool, held)

    def abandon(self) -> None:
        """lbtcp is stopping: close a client still inspecting without counting it."""
        self.inspecting = False
        self.finished = True
        self.held = b""
        if not self.client.is_closing():
            self.client.abort()

    def route(self, pool: Pool, data: bytes) -> None:
        """The verdict: become a session of ``pool`` and relay ``data`` first."""
        self.inspecting = False
        self.pool = pool
        if self.client.is_closing():
            return
        try:
            self.owner.session_accepted(self)
        except Exception as exc:  # a bug must cost one session, not the process
            self.loop.call_exception_handler(
                {"message": "session_accepted failed", "exception": exc, "protocol": self}
            )
            self.close("--")
            return
        if data and self.up_state == OPEN:
            Session.data_received(self, data)


class HeaderReader(asyncio.Protocol):
    """The protocol of a new client of a PROXY listener until its header is read."""

    __slots__ = (
        "buffer",
        "header",
        "listener",
        "peer",
        "started_at",
        "state",
        "timer",
        "transport",
    )

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.header: Done | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.peer: tuple[str, int] = ("", 0)
        self.timer: asyncio.TimerHandle | None = None
        self.state = _WAITING
        self.started_at = monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop for each accepted client: trusted peers must send a header."""
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
        listener = self.listener
        trusted = False
        if listener.config.proxy_protocol != "off":
            try:
                trusted = listener.trusts_proxy(self.peer[0])
            except Exception as exc:  # a bug must cost one connection, not the process
                listener.loop.call_exception_handler(
                    {"message": "proxy trust check failed", "exception": exc, "protocol": self}
                )
        listener.readers.add(self)
        if not trusted:
            self._header_done(b"")
            return
        self.timer = listener.loop.call_later(
            listener.config.proxy_protocol_timeout, self._timed_out
        )

    def data_received(self, data: bytes) -> None:
        """Header bytes from a trusted peer, then (with routes) the first TLS record, until
        the parsers have their verdicts."""
        if self.state != _WAITING:
            if self.state == _INSPECTING:
                self._inspect(data)
            return
        buffer = self.buffer + data if self.buffer else data
        verdict = parse(buffer, self.listener.config.proxy_protocol)
        if isinstance(verdict, Done):
            self.header = verdict
            self._header_done(buffer[verdict.header_length :])
        elif isinstance(verdict, Invalid):
            self._refuse(verdict.why, len(buffer))
        elif len(buffer) > MAX_HEADER_LENGTH:  # pragma: no cover - the parser decides first
            self._refuse("header too long", len(buffer))
        else:
            self.buffer = buffer

    def eof_received(self) -> bool:
        """The peer shut its write side before the header (or the ClientHello) was
        complete."""
        if self.state == _INSPECTING:
            # A client that sends its bytes and a FIN is still a client: route what came.
            session = self._route(self.listener.pool, "", ())
            return session is not None and session.eof_received()
        if self.state == _WAITING:
            self._refuse("closed before a complete header", len(self.buffer))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The client went away (or we closed it) before the hand-over."""
        if self.state == _WAITING:
            self._refuse("connection lost before a complete header", len(self.buffer))
        elif self.state == _INSPECTING:
            self.state = _ENDED
            self._release()
            try:
                self.listener.inspect_abandoned(self.peer, self.started_at)
            except Exception as error:
                self.listener.loop.call_exception_handler(
                    {"message": "inspect_abandoned failed", "exception": error, "protocol": self}
                )
        self._release()

    def _timed_out(self) -> None:
        """Timer callback: no complete header within ``proxy_protocol_timeout``, or no
        complete ClientHello within ``inspect_timeout`` (then: the default pool)."""
        self.timer = None
        if self.state == _WAITING:
            self._refuse("no complete header within the timeout", len(self.buffer))
        elif self.state == _INSPECTING:
            self._route(self.listener.pool, "", ())

    def _header_done(self, rest: bytes) -> None:
        """The PROXY stage is over (a header, or none expected): inspect, or hand over."""
        listener = self.listener
        if listener.router is None:
            self._hand_over(self.header, rest)
            return
        self.state = _INSPECTING
        self.buffer = b""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = listener.loop.call_later(listener.config.inspect_timeout, self._timed_out)
        if rest:
            self._inspect(rest)

    def _inspect(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        verdict = tls_hello.parse(buffer)
        if verdict is tls_hello.NEED_MORE and len(buffer) < tls_hello.MAX_INSPECT:
            self.buffer = buffer
            return
        self.buffer = buffer
        listener = self.listener
        pool = listener.pool
        sni = ""
        alpn: tuple[str, ...] = ()
        if isinstance(verdict, tls_hello.Hello):
            alpn = verdict.alpn
            if verdict.server_name is not None:
                sni = verdict.server_name
                router = listener.router
                assert router is not None
                routed = router.match(sni)
                if routed is not None:
                    pool = routed
        self._route(pool, sni, alpn)

    def _route(self, pool: Pool, sni: str, alpn: tuple[str, ...]) -> InspectedSession | None:
        """Hand the client, and every byte read in the inspect stage, to a session bound to
        ``pool``."""
        self.state = _HANDED_OVER
        buffer = self.buffer
        self._release()
        transport = self.transport
        if transport is None or transport.is_closing():
            return None
        session = InspectedSession(self.listener, pool, sni, alpn)
        self._start(session, self.header, buffer)
        return session

    def abandon(self) -> None:
        """lbtcp is stopping: close without counting a refusal."""
        if self.state in (_WAITING, _INSPECTING):
            self.state = _ENDED
            self._release()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.abort()

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.readers.discard(self)
        self.buffer = b""

    def _refuse(self, why: str, received: int) -> None:
        self.state = _ENDED
        self._release()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        try:
            self.listener.header_refused(self.peer, self.started_at, received, why)
        except Exception as exc:
            self.listener.loop.call_exception_handler(
                {"message": "header_refused failed", "exception": exc, "protocol": self}
            )

    def _hand_over(self, header: Done | None, rest: bytes = b"") -> None:
        """A Session takes the transport: with the header's addresses, or the peer's own."""
        self.state = _HANDED_OVER
        self._release()
        listener = self.listener
        self._start(Session(listener, listener.loop), header, rest)

    def _start(self, session: Session, header: Done | None, rest: bytes) -> None:
        transport = self.transport
        assert transport is not None
        session.started_at = self.started_at
        if header is not None and header.source is not None:
            session.client_ip, session.client_port = header.source
            session.destination = header.destination
        else:
            session.client_ip, session.client_port = self.peer
        transport.set_protocol(session)
        session.connection_made(transport)
        if rest:
            session.data_received(rest)
