"""A tiny HTTP/1.1 responder on uvloop: the backend of run.py's wrk cross-check.

    python benchmarks/httpd.py PORT [--size 64]

Every request (anything up to an empty line) gets one fixed response of exactly ``--size``
bytes, status line and headers included, so that wrk through a proxy moves the same bytes per
exchange as ``lbtcp bench --mode rr --size 64`` does against ``lbtcp echo``. A request that
carries ``Connection: close`` gets a response of the same size that says ``Connection: close``,
and the connection is closed after it (wrk then reconnects: its form of the ``connect``
scenario). Request bodies are not supported: wrk sends none.

Prints ``httpd listening on 127.0.0.1:PORT`` to stderr once listening, like ``lbtcp echo``.
Runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import cast

import uvloop

END_OF_HEADERS = b"\r\n\r\n"
CLOSE_HEADER = b"\r\nconnection: close\r\n"


def build_response(size: int, *, close: bool) -> bytes:
    """A 200 response of exactly ``size`` bytes; the body is padding.

    Raises ValueError when ``size`` is too small to hold the headers.
    """
    extra = "Connection: close\r\n" if close else ""
    for body_len in range(size):
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {body_len}\r\n{extra}\r\n".encode()
        if len(head) + body_len == size:
            return head + b"x" * body_len
    raise ValueError(f"{size} bytes cannot hold an HTTP response")


class HttpResponder(asyncio.Protocol):
    """One client connection: answer each complete request head with the fixed response."""

    __slots__ = ("_pending", "_responses", "_transport")

    def __init__(self, responses: tuple[bytes, bytes]) -> None:
        self._responses = responses
        self._transport: asyncio.Transport | None = None
        self._pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the connection is accepted."""
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Called by the loop with each chunk; requests may be split or pipelined."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        buffer = self._pending + data if self._pending else data
        start = 0
        while True:
            end = buffer.find(END_OF_HEADERS, start)
            if end < 0:
                break
            head = buffer[start:end].lower()
            start = end + len(END_OF_HEADERS)
            if CLOSE_HEADER in head + b"\r\n":
                transport.write(self._responses[1])
                transport.close()
                return
            transport.write(self._responses[0])
        self._pending = buffer[start:]

    def eof_received(self) -> bool:
        """The client's FIN: close (after flushing) rather than keep a half-open socket."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """Called by the loop exactly once when the connection is gone."""
        self._transport = None


async def serve(port: int, size: int) -> None:
    """Listen on 127.0.0.1:PORT until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    responses = (build_response(size, close=False), build_response(size, close=True))
    server = await loop.create_server(
        lambda: HttpResponder(responses), "127.0.0.1", port, backlog=4096
    )
    bound = server.sockets[0].getsockname()
    print(f"httpd listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        server.close()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("port", type=int)
    parser.add_argument("--size", type=int, default=64, help="response size in bytes")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.size))


if __name__ == "__main__":
    main()
