"""Helpers for the PROXY protocol tests: a recording server that understands a leading
PROXY header, and small client helpers."""

from __future__ import annotations

import asyncio
import socket
from typing import cast

from lbtcp.proxy_protocol import Done, Invalid, parse


class Recorder(asyncio.Protocol):
    """Records what each server connection received and echoes what follows a leading
    PROXY header (the header is lbtcp's, not the client's, so it is not echoed)."""

    def __init__(self, received: list[bytearray]) -> None:
        self.data = bytearray()
        self.echoed = -1  # bytes of self.data echoed so far; -1 while the header is unknown
        received.append(self.data)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.echoed < 0:
            verdict = parse(bytes(self.data))
            if isinstance(verdict, Done):
                self.echoed = verdict.header_length
            elif isinstance(verdict, Invalid):
                self.echoed = 0
            else:
                return
        assert self.transport is not None
        self.transport.write(bytes(self.data[self.echoed :]))
        self.echoed = len(self.data)

    def eof_received(self) -> bool:
        return False


def header_of(data: bytes | bytearray) -> Done:
    """The PROXY header a server connection started with (fails the test if none)."""
    verdict = parse(bytes(data))
    assert isinstance(verdict, Done), (bytes(data[:120]), verdict)
    return verdict


def exchange(
    address: tuple[str, int],
    payload: bytes,
    *,
    source: str | None = None,
    timeout: float = 5.0,
) -> bytes:
    """Send ``payload`` (from ``source``, a 127.x address, if given), half-close, and read
    to EOF; a reset reads as b"" (a refused client)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        chunks = []
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError as exc:
            if exc.errno != 107:  # ENOTCONN: shutdown() after lbtcp already closed
                raise
            return b""
        return b"".join(chunks)
    finally:
        sock.close()
