"""A floor under uvloop's transports: the same relay on raw sockets and add_reader/add_writer.

    python benchmarks/raw_relay.py LISTEN_PORT BACKEND_PORT

``bare_relay.py`` is the least a relay built on uvloop's transports can do per connection. A
reviewer may ask what is left if the transports go too: this relay runs on the same uvloop
loop but drives non-blocking sockets itself. The listening socket has a reader that accepts
up to 1,024 clients per callback; each client gets a non-blocking server socket, connected
with ``connect_ex``, and two directions of ``recv_into``/``send`` that start at once (bytes
sent before the handshake has finished are held, as below, until a writer says it has).
``benchmarks/conncost.py`` measures it as proxy ``raw`` beside ``bare``, lbtcp, HAProxy and
nginx.

Unlike ``bare``, it keeps flow control: a partial send keeps the rest (at most one read, 256
KiB, per direction) and stops reading the source until the rest has gone, so memory per
session is bounded. A source's EOF becomes ``shutdown(SHUT_WR)`` on the other socket once its
pending bytes are sent; both sockets close when both directions have passed their EOF (the
second EOF is passed on by the close itself), or at once on any socket error. No pool,
health, counters, timeouts or logs.

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
    held (``pending`` set, writer on, reader off: the unsent rest of a read, back to reading
    once it has gone), and after the source's EOF, which is only read while nothing is held:
    done (the FIN passed on; nothing is written to ``dst`` again). If ``dst`` may still be
    connecting when the EOF comes, the FIN is held (``pending`` empty) until the writer says
    the connect has finished: a shutdown during the handshake would abort it.
    """

    __slots__ = (
        "done",
        "dst",
        "dst_fd",
        "eof",
        "loop",
        "pending",
        "reading",
        "ready",
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
        *,
        ready: bool,
    ) -> None:
        """``ready``: ``dst`` is known to be connected (else it may still be connecting)."""
        self.session = session
        self.loop = loop
        self.src = src
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.pending: bytes | None = None
        self.ready = ready
        self.reading = False
        self.eof = False
        self.done = False

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src_fd, self.readable)

    def hold(self, rest: bytes) -> None:
        """Keep ``rest`` (maybe empty: the FIN alone) until ``dst`` takes it."""
        self.pending = rest
        self.loop.add_writer(self.dst_fd, self.writable)

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
            self.eof = True
            if self.ready:
                self.finish()
            else:
                self.hold(b"")
            return
        try:
            sent = self.dst.send(_view[:count])
        except (BlockingIOError, InterruptedError):  # full, or still connecting
            sent = 0
        except OSError:
            self.session.close()
            return
        if sent < count:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
            self.hold(bytes(_view[sent:count]))
        else:
            self.ready = True

    def writable(self) -> None:
        """Called by the loop when ``dst`` takes bytes again, or its connect has finished
        (writer on, ``pending`` set)."""
        self.ready = True  # if the connect failed, the send or the shutdown below says so
        pending = self.pending
        assert pending is not None
        if pending:
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
        if self.eof:
            self.finish()
        else:
            self.start()

    def finish(self) -> None:
        """Pass the source's EOF on (nothing is held for ``dst`` any more)."""
        session = self.session
        other = session.down if self is session.up else session.up
        if other.done:
            # Both ways are over: closing passes this FIN on too (nothing is left unread
            # on either socket), one system call fewer than a shutdown first.
            session.close()
            return
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            session.close()
            return
        self.done = True

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

    __slots__ = ("client", "closed", "down", "server", "up")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        server: socket.socket,
        backend: tuple[str, int],
    ) -> None:
        """Connect ``server`` (non-blocking, not yet connected) to ``backend`` and relay.

        Both directions start at once, without a writer waiting for the connect: on
        loopback the handshake is all but done by the time the client's first bytes are
        read, and if it is not, their send fails with EAGAIN and they are held like the
        rest of any partial send until the writer sees the connect finish. A failed connect
        shows as an error on the server socket's next recv, send or shutdown.
        """
        self.client = client
        self.server = server
        self.closed = False
        code = server.connect_ex(backend)
        self.up = Direction(self, loop, client, server, ready=code == 0)
        self.down = Direction(self, loop, server, client, ready=True)
        if code not in (0, errno.EINPROGRESS):
            self.close()
            return
        self.down.start()
        self.up.start()

    def close(self) -> None:
        """Remove every callback, then close both sockets; once, on any path."""
        if self.closed:
            return
        self.closed = True
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
