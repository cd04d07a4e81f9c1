"""The splicer in-process, on both asyncio and uvloop, with the loop's exception handler
watched: any exception that reaches it fails the test (as uvloop's own test base does).

These tests force the awkward orders on purpose: a client FIN or RST that arrives before the
server connection is up, and connection-rate churn where clients vanish at every stage.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from lbtcp.config import ListenerConfig, PoolConfig, ServerConfig
from lbtcp.listener import Listener
from lbtcp.log import Log
from lbtcp.pool import Pool
from tests import loops
from tests.support import blackhole

run = loops.run  # the fixture: each test on asyncio and on uvloop

# Server-side connections of echo_server() still open: lbtcp must leave none behind.
OPEN_SERVER_SIDE: set[asyncio.BaseTransport] = set()


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            OPEN_SERVER_SIDE.add(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            OPEN_SERVER_SIDE.discard(self.transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]

        def eof_received(self) -> bool:
            return False

    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def start_listener(
    ports: list[int], **pool_options: Any
) -> tuple[Listener, tuple[str, int], io.StringIO]:
    pool_config = PoolConfig(
        name="app",
        servers=tuple(ServerConfig(address=f"127.0.0.1:{port}") for port in ports),
        **pool_options,
    )
    listener_config = ListenerConfig(name="web", bind=("127.0.0.1:0",), pool="app")
    stream = io.StringIO()
    log = Log("text", True, stream)
    listener = Listener(
        listener_config, Pool.from_config(pool_config), log, asyncio.get_running_loop()
    )
    await listener.start()
    host, port = listener.addresses[0].rsplit(":", 1)
    return listener, (host, int(port)), stream


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def test_client_fin_before_server_connect_is_held_and_forwarded(run: Any) -> None:
    async def scenario() -> None:
        server, echo_port = await echo_server()
        # First choice (round robin) is the blackhole: the connect hangs for 200 ms, then the
        # retry reaches the echo server. The client's data and FIN arrive during the hang.
        listener, address, log = await start_listener(
            [hole, echo_port], retries=1, connect_timeout=0.2
        )
        reader, writer = await asyncio.open_connection(*address)
        payload = os.urandom(100_000)
        writer.write(payload)
        writer.write_eof()
        reply = await reader.read()
        writer.close()
        assert reply == payload
        await wait_for(lambda: listener.active == 0)
        assert "term=--" in log.getvalue()
        listener.stop_accepting()
        server.close()

    with blackhole() as hole:
        run(scenario())


def test_client_reset_before_server_connect_leaves_nothing_behind(run: Any) -> None:
    async def scenario() -> None:
        listener, address, log = await start_listener([hole], connect_timeout=0.3)
        for _ in range(20):
            sock = socket.create_connection(address)
            sock.sendall(b"early bytes")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST while lbtcp is still connecting
        await wait_for(lambda: listener.connections_total == 20)
        await wait_for(lambda: listener.active == 0)
        assert log.getvalue().count(" access ") == 20
        listener.stop_accepting()

    with blackhole() as hole:
        run(scenario())


def test_connection_churn_with_early_fin_and_rst(run: Any) -> None:
    """Clients that send and vanish at once, at a connection rate, in every order."""

    async def scenario() -> None:
        server, echo_port = await echo_server()
        listener, address, _log = await start_listener([echo_port])

        async def client(index: int) -> None:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"x" * (index % 7 * 1000 + 1))
            if index % 3 == 0:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write_eof()
            if index % 3 == 1:
                writer.close()  # FIN both ways without reading the reply
                return
            data = await reader.read()
            assert len(data) == index % 7 * 1000 + 1
            writer.close()

        for start in range(0, 600, 50):
            await asyncio.gather(
                *(client(i) for i in range(start, start + 50)), return_exceptions=False
            )
        await wait_for(lambda: listener.active == 0, 10)
        assert listener.connections_total == 600
        # No server connection was left behind, whatever the client did meanwhile.
        await wait_for(lambda: not OPEN_SERVER_SIDE, 10)
        listener.stop_accepting()
        server.close()

    run(scenario())


def test_large_transfer_with_tiny_socket_buffers(run: Any) -> None:
    """Backpressure forced with small kernel buffers on both ends: nothing lost."""

    async def scenario() -> None:
        server, echo_port = await echo_server()
        listener, address, _log = await start_listener([echo_port])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        reader, writer = await asyncio.open_connection(sock=sock)
        payload = os.urandom(8 * 1024 * 1024)

        async def send() -> None:
            for offset in range(0, len(payload), 65536):
                writer.write(payload[offset : offset + 65536])
                await writer.drain()
            writer.write_eof()

        async def receive() -> bytes:
            chunks = []
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                await asyncio.sleep(0)  # a slowish reader
            return b"".join(chunks)

        _, reply = await asyncio.gather(send(), receive())
        writer.close()
        assert reply == payload
        listener.stop_accepting()
        server.close()

    run(scenario())


def test_tcp_nodelay_is_on_for_both_sides(run: Any) -> None:
    """Small request/response traffic must not wait on Nagle's algorithm on either side."""

    async def scenario() -> None:
        server, echo_port = await echo_server()
        listener, address, _log = await start_listener([echo_port])
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        (session,) = listener.sessions
        for transport in (session.client, session.upstream):
            assert transport is not None
            sock = transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        writer.close()
        await wait_for(lambda: listener.active == 0)
        await asyncio.sleep(0.05)  # let the echo server see its EOF and close
        listener.stop_accepting()
        server.close()

    run(scenario())
