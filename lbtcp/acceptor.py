"""Accepting clients in batches: up to ``ACCEPT_BATCH`` per loop turn and listening socket.

Why lbtcp accepts by itself rather than through ``loop.create_server``: libuv (1.45 and
later, under uvloop) accepts one connection per readiness event of a listening socket, that
is one per loop turn. A loop turn that also carries 2,000 busy sessions lasts tens of
milliseconds, so a burst of new clients (a reconnect storm, a load generator's start) drained
from the kernel's accept queue at one per turn waited seconds to be accepted: every one of
them had already sent its request, and timed out.

Why 1,024: HAProxy takes 64 per turn (``tune.maxaccept``), but its turns are short (at most
``tune.maxpollevents`` = 200 events); a libuv turn runs every ready event, so its length grows
with the sessions already served, and a small batch still admits a burst slowly. Measured with
2,000 kept-open wrk connections (p99 over 6 s, a fresh burst of 2,000 at the start): 64 per
turn 202-740 ms, 256 per turn 105-606 ms, 1,024 per turn 118-388 ms (HAProxy 52-87 ms). 1,024
is also the number of events libuv reads per epoll_wait; a turn spends at most about 40 ms
accepting, and only while that many clients are queued.

Each accepted socket becomes a uvloop transport through ``loop.connect_accepted_socket``,
the public call for sockets accepted outside the loop. It is a coroutine whose only wait is
for ``connection_made`` to have run; ``start_transport`` steps it by hand (as a Task would,
without a Task and the extra loop turn it costs per client) and finishes it when that wait
is over, so the transport exists before the loop turn ends, as it did with the loop's own
server.

What is handed over is the accepted descriptor itself, not a ``socket.socket``: uvloop only
reads ``family``, ``type`` and ``fileno()`` of it and gives the descriptor to libuv, and the
standard ``socket.socket`` object (made by ``socket.accept``, then read three times by uvloop)
costs about 5 us per client in enum conversions and its own set-up, for nothing
(``AcceptedSocket``). asyncio's own loop gets a real ``socket.socket``: its transports use it.

Running out of file descriptors (EMFILE, ENFILE) or kernel memory (ENOBUFS, ENOMEM) leaves
the connection in the accept queue and the socket readable: the acceptor then stops watching
the socket for ``ACCEPT_PAUSE`` seconds rather than spinning on it, and says so through
``on_error``. The waiting clients are accepted when descriptors are free again (libuv instead
accepted and closed them). The listener pauses its acceptors the same way when a server
connection cannot be opened for lack of descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Callable

import uvloop

ACCEPT_BATCH = 1024
ACCEPT_PAUSE = 0.1
# accept() failures that mean "this process (or the system) is out of a resource": try again
# later. Others (ECONNABORTED: the client left while queued; EPERM from a firewall hook)
# concern one connection only.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Acceptor:
    """Accepts on one listening socket and gives each client a transport whose protocol
    comes from ``factory()``. ``sockets`` and ``close()`` as ``asyncio.Server`` has them."""

    __slots__ = (
        "_factory",
        "_family",
        "_fd",
        "_loop",
        "_on_error",
        "_resume",
        "_sock",
        "_wrap",
        "closed",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        factory: Callable[[], asyncio.Protocol],
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._factory = factory
        self._on_error = on_error
        self._family = int(sock.family)
        # What the loop's connect_accepted_socket gets for an accepted descriptor.
        self._wrap: Callable[[int, int], AcceptedSocket | socket.socket] = (
            AcceptedSocket if isinstance(loop, uvloop.Loop) else _python_socket
        )
        self._resume: asyncio.TimerHandle | None = None
        self.closed = False
        loop.add_reader(self._fd, self._accept_batch)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self.closed else (self._sock,)

    def close(self) -> None:
        """Stop accepting and close the listening socket (clients still queued get a reset,
        as with ``asyncio.Server.close``). Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self._loop.remove_reader(self._fd)
        self._sock.close()

    def _accept_batch(self) -> None:
        """Reader callback: the socket has clients queued. Take up to ACCEPT_BATCH of them."""
        # socket.accept() without the socket.socket it would wrap the descriptor in (see the
        # module doc): _accept is the C call it makes, accept4() with SOCK_CLOEXEC.
        accept = self._sock._accept  # type: ignore[attr-defined]
        family = self._family
        wrap = self._wrap
        for _ in range(ACCEPT_BATCH):
            try:
                fd, _address = accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self.pause()
                    if self._on_error is not None:
                        self._on_error(exc)
                    return
                if self.closed:
                    return
                continue  # about that one connection only
            try:
                start_transport(self._loop, wrap(fd, family), self._factory)
            except Exception as exc:  # a bug must cost one client, not the listener
                with contextlib.suppress(OSError):
                    os.close(fd)
                self._loop.call_exception_handler(
                    {"message": "accepting a client failed", "exception": exc}
                )

    def pause(self) -> None:
        """Stop accepting for ACCEPT_PAUSE seconds (out of descriptors: here, or when the
        listener could not open a server connection for lack of them)."""
        if self.closed or self._resume is not None:
            return
        self._loop.remove_reader(self._fd)
        self._resume = self._loop.call_later(ACCEPT_PAUSE, self._unpause)

    def _unpause(self) -> None:
        self._resume = None
        if not self.closed:
            self._loop.add_reader(self._fd, self._accept_batch)
            self._accept_batch()


class AcceptedSocket:
    """An accepted descriptor as uvloop's ``connect_accepted_socket`` reads it. Once the
    transport is made, libuv owns the descriptor and closes it; uvloop then calls ``close()``
    here, which has nothing left to do."""

    __slots__ = ("_fd", "family", "type")

    def __init__(self, fd: int, family: int) -> None:
        self._fd = fd
        self.family = family
        self.type = socket.SOCK_STREAM

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        """Called by uvloop after libuv closed the descriptor: never close it again (its
        number may already belong to another connection)."""


def _python_socket(fd: int, family: int) -> socket.socket:
    return socket.socket(fileno=fd)  # family, type and protocol read from the descriptor


def start_transport(
    loop: asyncio.AbstractEventLoop,
    client: AcceptedSocket | socket.socket,
    factory: Callable[[], asyncio.Protocol],
) -> None:
    """Make the transport of an accepted ``client`` now (see the module doc); its protocol's
    ``connection_made`` runs in the loop's next callbacks, as for the loop's own server."""
    coro = loop.connect_accepted_socket(factory, client)  # type: ignore[arg-type]
    try:
        waiting = coro.send(None)
    except StopIteration:  # done without waiting (not uvloop's way, but allowed)
        return
    except BaseException:
        coro.close()
        raise
    if not isinstance(waiting, asyncio.Future):  # a loop that waits on something else
        coro.close()
        raise RuntimeError(f"connect_accepted_socket waited on {waiting!r}")

    def finish(_done: asyncio.Future[object]) -> None:
        try:
            coro.send(None)
        except StopIteration:
            pass
        except Exception as exc:  # connection_made failed: the loop's handler says so
            loop.call_exception_handler(
                {"message": "connection_made failed on an accepted client", "exception": exc}
            )

    waiting.add_done_callback(finish)
