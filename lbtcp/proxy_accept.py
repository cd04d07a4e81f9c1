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
"""

from __future__ import annotations

import asyncio
from time import monotonic
from typing import TYPE_CHECKING, cast

from lbtcp.proxy_protocol import MAX_HEADER_LENGTH, Done, Invalid, parse
from lbtcp.relay import Session

if TYPE_CHECKING:
    from lbtcp.listener import Listener

# Reader states.
_WAITING = 0
_HANDED_OVER = 1
_ENDED = 2


class HeaderReader(asyncio.Protocol):
    """The protocol of a new client of a PROXY listener until its header is read."""

    __slots__ = ("buffer", "listener", "peer", "started_at", "state", "timer", "transport")

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
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
        try:
            trusted = listener.trusts_proxy(self.peer[0])
        except Exception as exc:  # a bug must cost one connection, not the process
            listener.loop.call_exception_handler(
                {"message": "proxy trust check failed", "exception": exc, "protocol": self}
            )
            trusted = False
        if not trusted:
            self._hand_over(None)
            return
        listener.awaiting_header.add(self)
        self.timer = listener.loop.call_later(
            listener.config.proxy_protocol_timeout, self._timed_out
        )

    def data_received(self, data: bytes) -> None:
        """Header bytes from a trusted peer, until the parser has a verdict."""
        if self.state != _WAITING:
            return
        buffer = self.buffer + data if self.buffer else data
        verdict = parse(buffer, self.listener.config.proxy_protocol)
        if isinstance(verdict, Done):
            self._hand_over(verdict, buffer[verdict.header_length :])
        elif isinstance(verdict, Invalid):
            self._refuse(verdict.why, len(buffer))
        elif len(buffer) > MAX_HEADER_LENGTH:  # pragma: no cover - the parser decides first
            self._refuse("header too long", len(buffer))
        else:
            self.buffer = buffer

    def eof_received(self) -> bool:
        """The peer shut its write side before the header was complete."""
        if self.state == _WAITING:
            self._refuse("closed before a complete header", len(self.buffer))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The client went away (or we closed it) before the hand-over."""
        if self.state == _WAITING:
            self._refuse("connection lost before a complete header", len(self.buffer))
        self._release()

    def _timed_out(self) -> None:
        """Timer callback: no complete header within ``proxy_protocol_timeout``."""
        self.timer = None
        if self.state == _WAITING:
            self._refuse("no complete header within the timeout", len(self.buffer))

    def abandon(self) -> None:
        """lbtcp is stopping: close without counting a refusal."""
        if self.state == _WAITING:
            self.state = _ENDED
            self._release()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.abort()

    def _release(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.listener.awaiting_header.discard(self)
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
        transport = self.transport
        assert transport is not None
        listener = self.listener
        session = Session(listener, listener.loop)
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
