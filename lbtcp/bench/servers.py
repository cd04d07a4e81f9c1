"""The built-in backends: an echo server and a sink, as asyncio protocols (uvloop or asyncio).

``start_echo(host, port)`` and ``start_sink(host, port)`` return a listening ``asyncio.Server``
on the running loop, so tests can start a backend in-process; ``serve_until_signal``
is what ``lbtcp echo`` and ``lbtcp sink`` run.

Echo writes back what it reads. Its flow control is the relay's in miniature: when the write
buffer passes ``ECHO_HIGH_WATER`` (a client that sends but does not read) it stops reading until
the buffer drains below ``ECHO_LOW_WATER``, so a slow reader costs at most about the high-water
mark of memory. On the client's EOF it closes its transport, which both loops do only after
flushing the write buffer: the client gets every echoed byte, then EOF (its half-close is
honoured). The sink reads into one shared reusable buffer and discards.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from typing import cast

from lbtcp.addresses import format_address

ECHO_HIGH_WATER = 256 * 1024
ECHO_LOW_WATER = 64 * 1024
SINK_BUFFER_SIZE = 256 * 1024
BACKLOG = 4096


class ConnectionSet:
    """The live transports of some servers, so that a stop can close them (``asyncio.Server``
    cannot close its clients before Python 3.13)."""

    __slots__ = ("_empty", "_transports")

    def __init__(self) -> None:
        self._transports: set[asyncio.BaseTransport] = set()
        self._empty: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._transports)

    def add(self, transport: asyncio.BaseTransport) -> None:
        """Called from connection_made()."""
        self._transports.add(transport)

    def discard(self, transport: asyncio.BaseTransport) -> None:
        """Called from connection_lost()."""
        self._transports.discard(transport)
        if not self._transports and self._empty is not None and not self._empty.done():
            self._empty.set_result(None)

    async def abort_all(self, timeout: float = 5.0) -> None:
        """Abort every live connection and wait (up to ``timeout``) for connection_lost()."""
        if not self._transports:
            return
        self._empty = asyncio.get_running_loop().create_future()
        for transport in list(self._transports):
            cast(asyncio.Transport, transport).abort()
        await asyncio.wait([self._empty], timeout=timeout)


class _TrackedProtocol(asyncio.BaseProtocol):
    """What the echo and the sink share: the transport, registered in an optional
    ``ConnectionSet`` for its lifetime, and a close of our side on the client's FIN."""

    __slots__ = ("_connections", "_transport")

    def __init__(self, connections: ConnectionSet | None = None) -> None:
        self._transport: asyncio.Transport | None = None
        self._connections = connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the connection is accepted."""
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        if self._connections is not None:
            self._connections.add(transport)

    def eof_received(self) -> bool:
        """Called on the client's FIN: returning False closes our side too, once the write
        buffer is flushed (the client still gets every byte it is owed)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the loop exactly once when the connection is gone."""
        if self._connections is not None and self._transport is not None:
            self._connections.discard(self._transport)
        self._transport = None


class EchoProtocol(_TrackedProtocol, asyncio.Protocol):
    """One echo connection; created by the server's accept loop."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the connection is accepted."""
        super().connection_made(transport)
        # Explicit limits: uvloop's default low-water mark differs from asyncio's.
        cast(asyncio.Transport, transport).set_write_buffer_limits(
            high=ECHO_HIGH_WATER, low=ECHO_LOW_WATER
        )

    def data_received(self, data: bytes) -> None:
        """Called by the loop with each chunk read; the chunk is ours, so write it back as is."""
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def pause_writing(self) -> None:
        """Called by the transport when its write buffer passes the high-water mark."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        """Called by the transport when its write buffer drains below the low-water mark."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()


# One buffer for every sink connection of the process: the bytes are discarded, and the loop
# calls get_buffer() and buffer_updated() back to back, so no two reads ever share it in time.
_SINK_BUFFER = bytearray(SINK_BUFFER_SIZE)


class SinkProtocol(_TrackedProtocol, asyncio.BufferedProtocol):
    """One sink connection: read and discard, counting bytes."""

    __slots__ = ("_buffer", "bytes_received")

    def __init__(self, connections: ConnectionSet | None = None) -> None:
        super().__init__(connections)
        self.bytes_received = 0
        self._buffer = memoryview(_SINK_BUFFER)

    def get_buffer(self, sizehint: int) -> memoryview:
        """Called by the loop before each read: the shared scratch buffer."""
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        """Called by the loop after reading ``nbytes`` into the buffer."""
        self.bytes_received += nbytes


async def _start(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(factory, host, port, backlog=BACKLOG, reuse_address=True)


async def start_echo(
    host: str = "127.0.0.1", port: int = 0, *, connections: ConnectionSet | None = None
) -> asyncio.Server:
    """Listen on ``host:port`` (0 = a free port) with the echo protocol.

    With ``connections``, live connections are tracked there (see ``ConnectionSet``).
    """
    return await _start(lambda: EchoProtocol(connections), host, port)


async def start_sink(
    host: str = "127.0.0.1", port: int = 0, *, connections: ConnectionSet | None = None
) -> asyncio.Server:
    """Listen on ``host:port`` (0 = a free port) with the sink protocol.

    With ``connections``, live connections are tracked there (see ``ConnectionSet``).
    """
    return await _start(lambda: SinkProtocol(connections), host, port)


def server_port(server: asyncio.AbstractServer) -> int:
    """The port a started server listens on (the real one when it was started on port 0)."""
    # uvloop's servers are not asyncio.Server subclasses but have the same `sockets`.
    return int(cast(asyncio.Server, server).sockets[0].getsockname()[1])


STARTERS = {"echo": start_echo, "sink": start_sink}


async def serve_until_signal(kind: str, host: str, ports: Sequence[int]) -> None:
    """Run ``kind`` ("echo" or "sink") on every port until SIGINT or SIGTERM.

    Prints ``"<kind> listening on HOST:PORT"`` to stderr once per port when it is listening.
    Raises OSError (e.g. the port is in use) before printing anything for a failed port.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    servers: list[asyncio.Server] = []
    connections = ConnectionSet()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for port in ports:
            servers.append(await STARTERS[kind](host, port, connections=connections))
        for server in servers:
            # A name such as "localhost" may bind several sockets (and, with port 0, ports).
            for sock in server.sockets:
                host_bound, port_bound = sock.getsockname()[:2]
                line = f"{kind} listening on {format_address(host_bound, port_bound)}"
                print(line, file=sys.stderr, flush=True)
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # No wait_closed(): since Python 3.12 it also waits for every client to hang up.
        for server in servers:
            server.close()
        await connections.abort_all()
