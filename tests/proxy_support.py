"""Helpers for the PROXY protocol tests: a recording server that understands a leading
PROXY header, and small client helpers."""

from __future__ import annotations

import asyncio
from typing import ClassVar, cast

from lbtcp.proxy_protocol import Done, Invalid, parse
from tests.support import roundtrip


class Recorder(asyncio.Protocol):
    """Records what each server connection received and echoes what follows a leading
    PROXY header (the header is lbtcp's, not the client's, so it is not echoed)."""

    # Connections still open, per loop: the in-process tests' loop aborts its own before it
    # closes (tests/loops.py), or the GC reports them in some later test as unclosed.
    OPEN: ClassVar[dict[asyncio.AbstractEventLoop, set[asyncio.Transport]]] = {}

    def __init__(self, received: list[bytearray]) -> None:
        self.data = bytearray()
        self.echoed = -1  # bytes of self.data echoed so far; -1 while the header is unknown
        received.append(self.data)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        Recorder.OPEN.setdefault(self.loop, set()).add(self.transport)

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

    def connection_lost(self, exc: Exception | None) -> None:
        """The loop calls this once the connection is closed, by either side."""
        open_here = Recorder.OPEN.get(self.loop, set())
        open_here.discard(self.transport)  # type: ignore[arg-type]
        if not open_here:
            Recorder.OPEN.pop(self.loop, None)


def header_of(data: bytes | bytearray) -> Done:
    """The PROXY header a server connection started with (fails the test if none)."""
    verdict = parse(bytes(data))
    assert isinstance(verdict, Done), (bytes(data[:120]), verdict)
    return verdict


# The PROXY tests' name for it (they pass source= to be seen as another client).
exchange = roundtrip
