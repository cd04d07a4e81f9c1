"""The connect attempts (lbtcp/connector.py) in-process, on asyncio and on uvloop, with real
sockets on 127.0.0.1: the connect leaves in the accept turn, a client that leaves mid-connect
costs its server nothing, a timeout that races the connect's completion closes that
connection and retries, refusals move on and end in ``CR``."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from typing import Any

import pytest

from lbtcp.connector import Connecting
from lbtcp.listener import Listener
from tests import loops
from tests.support import blackhole
from tests.test_relay import start_listener, wait_for

run = loops.run  # the fixture: each test on asyncio and on uvloop


class CountingEcho(asyncio.Protocol):
    """An echo server side that keeps its open connections in a set of its own."""

    def __init__(self, open_sides: set[asyncio.BaseTransport]) -> None:
        self.open_sides = open_sides

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.open_sides.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_sides.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def counting_echo() -> tuple[asyncio.AbstractServer, int, set[asyncio.BaseTransport]]:
    open_sides: set[asyncio.BaseTransport] = set()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CountingEcho(open_sides), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], open_sides


def closed_port() -> int:
    """A port nothing listens on (bound, never listened: connects are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def echo_through(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


def test_the_server_connect_is_sent_in_the_turn_the_client_is_accepted(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No task and no loop turn between accepting and connect(): right when the listener has
    taken the client, the server's kernel queue already holds lbtcp's connection."""
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen(8)
    backend.setblocking(False)
    queued_at_accept: list[bool] = []
    accepted = Listener.session_accepted

    def watched(self: Listener, session: Any) -> None:
        accepted(self, session)
        readable, _, _ = select.select([backend], [], [], 0)
        queued_at_accept.append(bool(readable))

    monkeypatch.setattr(Listener, "session_accepted", watched)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listener, address, _ = await start_listener([backend.getsockname()[1]])
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"ping")
        server_side, _ = await asyncio.wait_for(loop.sock_accept(backend), 5)
        server_side.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(server_side, 16), 5) == b"ping"
        await loop.sock_sendall(server_side, b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"pong"
        writer.close()
        server_side.close()
        await wait_for(lambda: listener.active == 0)
        assert queued_at_accept == [True]
        listener.stop_accepting()

    try:
        run(scenario())
    finally:
        backend.close()


def syn_sent_to(port: int) -> int:
    """Connections of this host in SYN-SENT to 127.0.0.1:port (from /proc/net/tcp)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        return sum(1 for line in table if line.split()[2] == wanted and line.split()[3] == "02")


def test_a_client_that_leaves_mid_connect_costs_its_server_nothing(run: Any) -> None:
    """The attempt's timer and half-made connection go with the client: the connect is
    abandoned at once, and no timeout is counted against the server, even after
    connect_timeout has passed."""

    async def scenario() -> None:
        listener, address, _ = await start_listener([hole], connect_timeout=2.0, retries=0)
        (server,) = listener.pool.servers.values()
        before = syn_sent_to(hole)  # the blackhole's own last filler is one
        client = socket.create_connection(address, timeout=5)
        await wait_for(lambda: listener.active == 1 and syn_sent_to(hole) == before + 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST while lbtcp is still connecting
        await wait_for(lambda: listener.active == 0)
        await wait_for(lambda: syn_sent_to(hole) == before, timeout=1.0)  # not at the 2 s timer
        await asyncio.sleep(0.3)
        assert (server.connect_timeouts, server.connect_failures) == (0, 0)
        listener.stop_accepting()

    with blackhole() as hole:
        run(scenario())


def test_a_timeout_racing_the_connect_closes_that_connection_and_retries(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer fires after connect() went out but before the loop saw it complete (the
    kernel completes a loopback handshake at once): that connection is closed, counted as a
    timeout, and the client is served by the next server."""
    start = Connecting.start

    def expire_at_once(self: Connecting) -> None:
        start(self)
        if len(self.tried) == 1:
            self._expired()

    monkeypatch.setattr(Connecting, "start", expire_at_once)

    async def scenario() -> None:
        first, first_port, first_open = await counting_echo()
        second, second_port, _ = await counting_echo()
        listener, address, log = await start_listener([first_port, second_port], retries=1)
        reply = await echo_through(address, b"x" * 10_000)
        assert reply == b"x" * 10_000
        await wait_for(lambda: listener.active == 0)
        await wait_for(lambda: not first_open)  # the raced connection did not stay open
        one, two = listener.pool.servers.values()
        assert (one.connect_timeouts, two.connect_timeouts) == (1, 0)
        assert one.total == 0 and two.total == 1
        assert "term=--" in log.getvalue()
        listener.stop_accepting()
        first.close()
        second.close()

    run(scenario())


def test_a_refused_server_is_counted_and_the_next_one_serves(run: Any) -> None:
    async def scenario() -> None:
        echo, echo_port, _ = await counting_echo()
        listener, address, _ = await start_listener([closed_port(), echo_port], retries=1)
        assert await echo_through(address, b"hello") == b"hello"
        refused, serving = listener.pool.servers.values()
        assert (refused.connect_refused, serving.connect_refused) == (1, 0)
        assert serving.total == 1
        listener.stop_accepting()
        echo.close()

    run(scenario())


def test_every_server_refusing_ends_in_cr_after_the_retries(run: Any) -> None:
    async def scenario() -> None:
        listener, address, log = await start_listener(
            [closed_port(), closed_port(), closed_port()], retries=1
        )
        assert await echo_through(address, b"hello") == b""
        await wait_for(lambda: listener.active == 0)
        assert "term=CR" in log.getvalue()
        # retries = 1: two servers tried, the third never.
        assert sorted(s.connect_refused for s in listener.pool.servers.values()) == [0, 1, 1]
        listener.stop_accepting()

    run(scenario())


def test_every_attempt_timing_out_ends_in_ct(run: Any) -> None:
    async def scenario() -> None:
        listener, address, log = await start_listener([hole], connect_timeout=0.2, retries=0)
        assert await echo_through(address, b"hello") == b""
        await wait_for(lambda: listener.active == 0)
        assert "term=CT" in log.getvalue()
        assert next(iter(listener.pool.servers.values())).connect_timeouts == 1
        listener.stop_accepting()

    with blackhole() as hole:
        run(scenario())
