"""The admin HTTP server: HTTP/1.1 with keep-alive, h11 over an asyncio Protocol.

Theory of operation. One ``AdminConnection`` per client feeds the bytes it receives to an
``h11.Connection`` (sans-IO: it parses and frames, we do the I/O) and answers each complete
request with ``Router.handle``, on the data plane's event loop. The server is built to take
hostile input without harm to the data plane:

- **Size.** Request line + headers at most ``MAX_HEAD`` (16 KiB; h11's
  ``max_incomplete_event_size``, and a check of the parsed head, since a head that arrives in
  one read is never "incomplete"): beyond it, 431. Body at most ``MAX_BODY`` (64 KiB): a larger
  ``Content-Length`` is answered 413 before any body is read; a chunked body is counted.
- **Time.** The whole of each request must arrive within ``REQUEST_TIMEOUT`` (10 s) of the
  moment the connection became ready for it (accepted, or the previous answer sent): else 408
  and close. A kept-alive connection on which nothing at all arrived is closed without a 408
  (an unasked-for answer could race the client's next request).
- **Connections.** At most ``MAX_CONNECTIONS`` (64) at once. A new connection beyond that is
  kept and the connection that has waited longest for its client (an idle one, typically) is
  answered 503 and closed to make room: a flood of idle connections then cannot lock
  ``/healthz`` out until their timeouts run, as a plain "refuse the newcomer" cap would.
- **CPU.** One request is handled per loop iteration: pipelined requests are answered one
  after another through ``call_soon``, so the data plane runs between them; while requests
  already received wait for their turn, the client is not read, so the input buffered per
  connection stays at about one read. A client that does not read its answers stops being
  read too (``pause_writing`` -> ``pause_reading``).
- **Errors** end the connection with a *lingering close*: the answer, then a FIN, then the
  client's remaining bytes are read and dropped for up to ``LINGER_TIME``. Closing at once with
  unread bytes would send an RST, which makes the client's kernel drop the answer unread.

Every callback catches everything: a bug is logged once and the one connection is aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from http import HTTPStatus
from typing import cast

import h11

from lbtcp import __version__
from lbtcp.addresses import format_address
from lbtcp.admin.routes import Answer, Request, Response, error
from lbtcp.listener import bind_socket
from lbtcp.log import Log

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
# Lingering close: how long and how much to read and drop after a final answer.
LINGER_TIME = 2.0
LINGER_BYTES = 256 * 1024
MAX_LINGERING = 64
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
BACKLOG = 512

SERVER_HEADER = f"lbtcp/{__version__}"

# Connection states.
OPEN = "open"
LINGERING = "lingering"  # final answer sent, FIN sent, draining the client's bytes
CLOSED = "closed"


def _head_size(event: h11.Request) -> int:
    """About how many bytes the request line and headers took on the wire."""
    size = len(event.method) + len(event.target) + 12
    for name, value in event.headers:
        size += len(name) + len(value) + 4
    return size


class AdminConnection(asyncio.Protocol):
    """One admin client. Created by the loop for each accepted connection."""

    __slots__ = (
        "_body",
        "_hconn",
        "_head",
        "_peer_eof",
        "_pending",
        "_reading",
        "_served",
        "_started",
        "_timer",
        "_write_paused",
        "server",
        "state",
        "transport",
    )

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.state = OPEN
        self._hconn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._pending = False  # a _process call is scheduled
        self._reading = True  # the transport is reading (not paused)
        self._served = 0  # requests answered on this connection
        self._started = False  # a byte of the current request has arrived
        self._peer_eof = False  # the client has half-closed: nothing more will arrive

    # --- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the client is accepted."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        try:
            self.transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
            self._arm_timer(self.server.request_timeout, self._on_timeout)
            self.server.admit(self)
        except Exception as exc:
            self._fail(exc)

    def data_received(self, data: bytes) -> None:
        """Called by the loop with each chunk the client sends."""
        try:
            if self.state is LINGERING:
                self.server.lingered(self, len(data))
                return
            if self.state is not OPEN:
                return
            self._started = True
            self._hconn.receive_data(data)
            self._process()
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        """Called by the loop when the client half-closes. Keeps our side open so that a
        request followed by a FIN still gets its answer."""
        self._peer_eof = True
        try:
            if self.state is LINGERING:
                self._close()
                return False
            if self.state is OPEN:
                self._hconn.receive_data(b"")
                self._process()
        except Exception as exc:
            self._fail(exc)
        return True

    def pause_writing(self) -> None:
        """Called by the loop when our write buffer passes WRITE_HIGH: the client does not
        read its answers, so stop reading its requests."""
        self._write_paused = True
        self._set_reading(False)

    def resume_writing(self) -> None:
        """Called by the loop when the write buffer is down to WRITE_LOW."""
        self._write_paused = False
        try:
            self._schedule()  # reading resumes once what is buffered has been answered
        except Exception as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the loop once the transport is closed, whoever closed it."""
        self.state = CLOSED
        self._cancel_timer()
        self.server.forget(self)

    # --- the request cycle ---------------------------------------------------------------

    def _set_reading(self, on: bool) -> None:
        if on != self._reading and self.transport is not None and self.state is OPEN:
            self._reading = on
            if on:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _schedule(self) -> None:
        """Process what is buffered in a later loop turn; read nothing more until then."""
        if not self._pending and self.state is OPEN:
            self._pending = True
            self._set_reading(False)
            self.server.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._pending = False
        try:
            if self.state is OPEN:
                self._process()
        except Exception as exc:
            self._fail(exc)

    def _process(self) -> None:
        """Run h11 until it needs more bytes, or until one request is answered."""
        hconn = self._hconn
        while self.state is OPEN and not self._write_paused:
            try:
                event = hconn.next_event()
            except h11.RemoteProtocolError as exc:
                # h11 hints 501 for a Transfer-Encoding other than chunked: to a client
                # that is a bad request like any other (DESIGN.md §5), so 400.
                status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                if status == 431:
                    message = f"the request line and headers exceed {MAX_HEAD} bytes"
                else:
                    message = f"malformed HTTP request: {exc}"
                self._final(error(status, message, close=True))
                return
            if event is h11.NEED_DATA:
                self._set_reading(not self._pending)  # all buffered input is consumed
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self._on_head(event):
                    return
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > MAX_BODY:
                    self._final(error(413, f"the body exceeds {MAX_BODY} bytes", close=True))
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._answer()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return

    def _on_head(self, event: h11.Request) -> bool:
        """A request line and headers arrived. False if it was answered already (an error)."""
        self._head = event
        self._body = bytearray()
        if _head_size(event) > MAX_HEAD:
            self._final(
                error(431, f"the request line and headers exceed {MAX_HEAD} bytes", close=True)
            )
            return False
        length = None
        for name, value in event.headers:
            if name == b"content-length":
                length = int(value)  # h11 has checked that it is a number
        if length is not None and length > MAX_BODY:
            self._final(error(413, f"the body exceeds {MAX_BODY} bytes", close=True))
            return False
        if self._hconn.they_are_waiting_for_100_continue:
            self._send(h11.InformationalResponse(status_code=100, headers=[]))
        return True

    def _answer(self) -> None:
        head = self._head
        assert head is not None
        self._cancel_timer()
        request = Request(
            method=head.method.decode("ascii", "replace"),
            target=head.target.decode("latin-1"),
            headers=tuple((bytes(n), bytes(v)) for n, v in head.headers),
            body=bytes(self._body),
        )
        self._head = None
        self._body = bytearray()
        answer = self.server.handler(request)
        if isinstance(answer, Response):
            self._complete(request, answer)
        else:
            # Answered later (POST /reload). h11 holds any pipelined request back (PAUSED)
            # until this one is answered.
            answer.add_done_callback(lambda done: self._deferred(request, done))

    def _deferred(self, request: Request, done: asyncio.Future[Response]) -> None:
        """Called by the loop when a deferred answer is ready (the client may be gone)."""
        if self.state is not OPEN:
            return
        try:
            response = done.result()
        except asyncio.CancelledError:  # lbtcp is stopping
            response = error(503, "lbtcp is stopping", close=True)
        except Exception as exc:  # the router catches its own; still an answer, never a hang
            response = error(500, f"internal error: {type(exc).__name__}")
        try:
            self._complete(request, response)
        except Exception as exc:
            self._fail(exc)

    def _complete(self, request: Request, response: Response) -> None:
        self._respond(response, head_only=request.method == "HEAD")
        self._served += 1
        if self.state is not OPEN:
            return
        if self._hconn.our_state is h11.MUST_CLOSE or response.close:
            self._linger()
            return
        self._hconn.start_next_cycle()
        self._started = bool(self._hconn.trailing_data[0])
        self._arm_timer(self.server.request_timeout, self._on_timeout)
        self.server.waiting(self)
        if self._started or self._hconn.trailing_data[1]:
            self._schedule()  # pipelined bytes (or an EOF) are already here
        else:
            self._set_reading(not self._write_paused)

    def _respond(self, response: Response, head_only: bool = False) -> None:
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            ("Cache-Control", "no-store"),
            ("Server", SERVER_HEADER),
            *response.headers,
        ]
        if response.close:
            headers.append(("Connection", "close"))
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        self._send(h11.Response(status_code=response.status, headers=headers, reason=reason))
        if response.body and not head_only:
            self._send(h11.Data(data=response.body))
        self._send(h11.EndOfMessage())

    def _send(self, event: h11.Event) -> None:
        data = self._hconn.send(event)
        if data and self.transport is not None and self.state is OPEN:
            self.transport.write(data)

    def _final(self, response: Response) -> None:
        """Answer with an error and end the connection (lingering close)."""
        self._cancel_timer()
        if self._hconn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            head_only = self._head is not None and self._head.method == b"HEAD"
            # If h11 cannot frame an answer in this state, just close.
            with contextlib.suppress(h11.LocalProtocolError):
                self._respond(response, head_only)
        self._linger()

    def _on_timeout(self) -> None:
        """Timer: the current request did not arrive in time."""
        self._timer = None
        try:
            if self.state is not OPEN:
                return
            if self._served and not self._started:
                self._close()  # an idle keep-alive connection: no answer was asked for
                return
            timeout = self.server.request_timeout
            self._final(error(408, f"the request did not arrive within {timeout:g} s", close=True))
        except Exception as exc:
            self._fail(exc)

    def evict(self) -> None:
        """The server needs this connection's place for a new one."""
        self._final(
            error(
                503,
                f"too many admin connections (at most {MAX_CONNECTIONS} at once); "
                "this one waited longest and was closed to make room",
                close=True,
            )
        )

    # --- ending --------------------------------------------------------------------------

    def _linger(self) -> None:
        transport = self.transport
        if transport is None or self.state is not OPEN:
            return
        self._cancel_timer()
        if not self._started or self._peer_eof:
            # Nothing of a request is on its way (a silent or idle connection, or the client
            # has sent its FIN): nothing can arrive unread, so a plain close (the answer,
            # then a FIN) is safe.
            self._close()
            return
        self.state = LINGERING
        self.server.start_lingering(self)
        if self._write_paused:
            # The client reads nothing: it would not read the rest of the answer either.
            self._abort()
            return
        try:
            transport.write_eof()
            self._reading = True
            transport.resume_reading()
        except (OSError, RuntimeError):
            self._abort()
            return
        self._arm_timer(LINGER_TIME, self._close)

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None and self.state is not CLOSED:
            self.state = CLOSED
            self.transport.close()

    def _abort(self) -> None:
        self._cancel_timer()
        if self.transport is not None and self.state is not CLOSED:
            self.state = CLOSED
            self.transport.abort()

    def _fail(self, exc: BaseException) -> None:
        """A bug in this module or h11: log it, drop this one connection, keep serving."""
        self.server.report(exc)
        with contextlib.suppress(Exception):
            self._abort()

    def _arm_timer(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.server.loop.call_later(delay, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class AdminServer:
    """The admin API's listening socket and its connections."""

    def __init__(
        self,
        address: str,
        handler: Callable[[Request], Answer],
        log: Log,
        loop: asyncio.AbstractEventLoop,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        """``max_connections`` and ``request_timeout`` are the module's limits unless a test
        sets smaller ones (lbtcp itself always uses the defaults)."""
        self.bind = address
        self.handler = handler
        self.log = log
        self.loop = loop
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.address = ""
        self._server: asyncio.AbstractServer | None = None
        # Open connections, the one that has waited longest for its client first.
        self._open: OrderedDict[AdminConnection, None] = OrderedDict()
        self._lingering: OrderedDict[AdminConnection, int] = OrderedDict()
        self._reported = False

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError (address in use, ...)."""
        sock = bind_socket(self.bind, BACKLOG)
        try:
            self._server = await self.loop.create_server(
                lambda: AdminConnection(self), sock=sock, backlog=BACKLOG
            )
        except BaseException:
            sock.close()
            raise
        host, port = sock.getsockname()[:2]
        self.address = format_address(host, port)

    @property
    def connections(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Stop accepting and close every connection (the runtime's last step on stop)."""
        if self._server is not None:
            self._server.close()
        for connection in [*self._open, *self._lingering]:
            connection._close()
        self._open.clear()
        self._lingering.clear()

    # --- called by the connections -------------------------------------------------------

    def admit(self, connection: AdminConnection) -> None:
        self._open[connection] = None
        if len(self._open) > self.max_connections:
            oldest = next(iter(self._open))
            oldest.evict()

    def waiting(self, connection: AdminConnection) -> None:
        """``connection`` starts waiting for its next request: it goes to the back."""
        if connection in self._open:
            self._open.move_to_end(connection)

    def start_lingering(self, connection: AdminConnection) -> None:
        self._open.pop(connection, None)
        self._lingering[connection] = 0
        if len(self._lingering) > MAX_LINGERING:
            oldest = next(iter(self._lingering))
            oldest._abort()
            self._lingering.pop(oldest, None)

    def lingered(self, connection: AdminConnection, size: int) -> None:
        total = self._lingering.get(connection, 0) + size
        if total > LINGER_BYTES:
            connection._close()
        elif connection in self._lingering:
            self._lingering[connection] = total

    def forget(self, connection: AdminConnection) -> None:
        self._open.pop(connection, None)
        self._lingering.pop(connection, None)

    def report(self, exc: BaseException) -> None:
        """An unexpected exception in a callback: logged once per process, never raised."""
        if not self._reported:
            self._reported = True
            self.log.event(
                "admin_error",
                "bug in the admin server; the connection was dropped",
                error=f"{type(exc).__name__}: {exc}",
            )
