"""A floor under uvloop's transports: the same relay on raw sockets and add_reader/add_writer.

    python benchmarks/raw_relay.py LISTEN_PORT BACKEND_PORT

``bare_relay.py`` is the least a relay built on uvloop's transports can do per connection. A
reviewer may ask what is left if the transports go too: this relay runs on the same uvloop
loop but drives non-blocking sockets itself. The listening socket has a reader that accepts
up to 1,024 clients per callback; each client gets a non-blocking server socket, connected
with ``connect_ex`` and a writer that waits for the handshake, then two directions of
``recv_into``/``send``. ``benchmarks/conncost.py`` measures it as proxy ``raw`` beside
``bare``, lbtcp, HAProxy and nginx.

Unlike ``bare``, it keeps flow control: a partial send keeps the rest (at most one read, 256
KiB, per direction) and stops reading the source until the rest has gone, so memory per
session is bounded. A source's EOF becomes ``shutdown(SHUT_WR)`` on the other socket once its
pending bytes are sent; both sockets close when both directions have passed their EOF, or at
once on any socket error. No pool, health, counters, timeouts or logs.

Prints ``raw relay listening on 127.0.0.1:PORT`` to stderr once listening.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
import sys

import uvloop

ACCEPTS_PER_CALLBACK = 1024
CHUNK = 256 * 1024  # as much as uvloop's transports read at a time
# Out of descriptors or kernel memory: stop accepting for a moment rather than spin on it.
ACCEPT_BACKOFF_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
ACCEPT_BACKOFF_S = 0.1

# One receive buffer for every session: the loop runs one callback at a time, and a read is
# sent on (or its unsent rest copied out) before the callback returns.
_buffer = bytearray(CHUNK)
_view = memoryview(_buffer)


class Direction:
    """One way of a session: read ``src``, send to ``dst``.

    Each socket is the source of one direction and the destination of the other, so this
    object alone owns the reader on ``src`` and the writer on ``dst``: the two directions
    never add or remove each other's callbacks. States: reading (reader on, nothing held),
    held (unsent bytes in ``pending``, writer on, reader off, back to reading once they have
    gone), done (the source's EOF was read, which only happens while nothing is held, and
    ``dst`` is shut down for writing: nothing is written to it again).
    """

    __slots__ = (
        "done",
        "dst",
        "dst_fd",
        "loop",
        "pending",
        "reading",
        "session",
        "src",
        "src_fd",
    )

    def __init__(
        self,
        session: Session,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
    ) -> None:
        self.session = session
        self.loop = loop
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.pending: bytes | None = None
        self.reading = False
        self.done = False

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src_fd, self.readable)

    def readable(self) -> None:
        """Called by the loop when ``src`` has bytes or its EOF (reader on, nothing held)."""
        try:
            count = self.src.recv_into(_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.session.close()
            return
        if count == 0:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
            self.finish()
            return
        try:
            sent = self.dst.send(_view[:count])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.session.close()
            return
        if sent < count:
            self.pending = bytes(_view[sent:count])
            self.reading = False
            self.loop.remove_reader(self.src_fd)
            self.loop.add_writer(self.dst_fd, self.writable)

    def writable(self) -> None:
        """Called by the loop when ``dst`` takes bytes again (writer on, bytes held)."""
        pending = self.pending
        assert pending is not None
        try:
            sent = self.dst.send(pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.session.close()
            return
        if sent < len(pending):
            self.pending = pending[sent:]
            return
        self.pending = None
        self.loop.remove_writer(self.dst_fd)
        self.start()

    def finish(self) -> None:
        """Pass the source's EOF on (read while nothing was held for ``dst``)."""
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.session.close()
            return
        self.done = True
        self.session.direction_done()

    def stop(self) -> None:
        """Remove this direction's callbacks (before the sockets close)."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        if self.pending is not None:
            self.pending = None
            self.loop.remove_writer(self.dst_fd)


class Session:
    """A client, its server socket and the two directions between them."""

    __slots__ = ("client", "closed", "connecting", "down", "loop", "server", "up")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        server: socket.socket,
        backend: tuple[str, int],
    ) -> None:
        """Start connecting ``server`` (non-blocking, not yet connected) to ``backend``."""
        self.loop = loop
        self.client = client
        self.server = server
        self.closed = False
        self.connecting = False
        self.up = Direction(self, loop, client, self.server)
        self.down = Direction(self, loop, self.server, client)
        # The client is not read before the server is connected: what it sends meanwhile
        # (its FIN too) waits in the kernel, so nothing needs holding here.
        code = self.server.connect_ex(backend)
        if code == 0:
            self.start()
        elif code == errno.EINPROGRESS:
            self.connecting = True
            loop.add_writer(self.server.fileno(), self.connected)
        else:
            self.close()

    def connected(self) -> None:
        """Called by the loop when the server socket's connect has finished, well or not."""
        self.connecting = False
        self.loop.remove_writer(self.server.fileno())
        if self.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.close()
            return
        self.start()

    def start(self) -> None:
        self.down.start()
        self.up.start()

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()

    def close(self) -> None:
        """Remove every callback, then close both sockets; once, on any path."""
        if self.closed:
            return
        self.closed = True
        if self.connecting:
            self.connecting = False
            self.loop.remove_writer(self.server.fileno())
        self.up.stop()
        self.down.stop()
        self.client.close()
        self.server.close()


class Acceptor:
    """The listening socket's reader: accepts a batch, starts a session per client."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket, backend: tuple[str, int]
    ) -> None:
        self.loop = loop
        self.listener = listener
        self.backend = backend

    def start(self) -> None:
        self.loop.add_reader(self.listener.fileno(), self.accept)

    def accept(self) -> None:
        """Called by the loop when clients wait in the accept queue."""
        for _ in range(ACCEPTS_PER_CALLBACK):
            try:
                client, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in ACCEPT_BACKOFF_ERRNOS:
                    self.loop.remove_reader(self.listener.fileno())
                    self.loop.call_later(ACCEPT_BACKOFF_S, self.start)
                    return
                continue  # ECONNABORTED and the like: that client is gone, take the next
            # Out of descriptors here too (a client takes one, its server socket another):
            # the client is closed, and the loop must not see an exception from a callback.
            try:
                server = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError:
                client.close()
                continue
            try:
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                client.close()
                server.close()
                continue
            Session(self.loop, client, server, self.backend)

    def stop(self) -> None:
        self.loop.remove_reader(self.listener.fileno())


async def main(port: int, backend: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    acceptor = Acceptor(loop, listener, ("127.0.0.1", backend))
    acceptor.start()
    print(f"raw relay listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    acceptor.stop()
    listener.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
