"""The floor uvloop sets: the least a TCP relay on uvloop can do per connection.

    python benchmarks/bare_relay.py LISTEN_PORT BACKEND_PORT

Accept, one task that connects to 127.0.0.1:BACKEND_PORT, relay both ways with half-close,
close once both ways have ended: no pool, no health, no counters, no timeouts, no logs.
lbtcp does all of that on the same loop, so the connections per CPU-second of this relay
(``benchmarks/conncost.py`` measures it beside lbtcp, HAProxy and nginx) bound what lbtcp can
reach without leaving uvloop. It is a measuring stick, not a proxy: it ignores flow control.

Prints ``bare relay listening on 127.0.0.1:PORT`` to stderr once listening.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop


class Upstream(asyncio.Protocol):
    # Even a measuring stick must never write after write_eof() or close(): uvloop aborts
    # the process on that under a connection-rate load (STYLE.md habit 7).
    def __init__(self, client: Client) -> None:
        self.client = client
        self.shut = False

    def data_received(self, data: bytes) -> None:
        transport = self.client.transport
        if not self.shut and not transport.is_closing():
            transport.write(data)

    def eof_received(self) -> bool:
        transport = self.client.transport
        if not self.shut and not transport.is_closing():
            self.shut = True
            transport.write_eof()
            self.client.close_if_done()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.upstream: asyncio.Transport | None = None
        self.upstream_protocol: Upstream | None = None
        self.held: list[bytes] = []
        self.eof = False  # the client's FIN came (held until connected, then passed on)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, self.upstream_protocol = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", self.backend
            )
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream  # type: ignore[assignment]
        for chunk in self.held:
            upstream.write(chunk)
        self.held = []
        if self.eof:
            upstream.write_eof()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.eof:
            return
        if self.upstream is None:
            self.held.append(data)
        elif not self.upstream.is_closing():
            self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.eof:
            return True
        self.eof = True
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.write_eof()
            self.close_if_done()
        return True

    def close_if_done(self) -> None:
        """Close both sides once each has passed its EOF on.

        Nothing else would: with both EOFs in, neither transport reads or writes any more,
        and the pair lives on until the garbage collector frees it. uvloop 0.23 then frees
        an open transport whose write_eof() shutdown request is still pending, and the
        request's callback later runs on freed memory (glibc "double free or corruption",
        SIGABRT, seen here under wrk's Connection: close load).
        """
        protocol = self.upstream_protocol
        if self.eof and protocol is not None and protocol.shut and self.upstream is not None:
            self.transport.close()
            self.upstream.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def main(port: int, backend: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(backend), "127.0.0.1", port, backlog=4096)
    print(f"bare relay listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
