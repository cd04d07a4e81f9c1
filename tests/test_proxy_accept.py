"""Accepting PROXY headers in-process, on asyncio and uvloop, with the loop's exception
handler watched: the hand-over keeps every byte, refusals are counted once per client."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable
from typing import Any

import pytest

from lbtcp.addresses import parse_cidr
from lbtcp.config import ListenerConfig, PoolConfig, ServerConfig
from lbtcp.listener import Listener
from lbtcp.log import Log
from lbtcp.pool import Pool
from lbtcp.proxy_protocol import Done, encode_v1, encode_v2, parse
from tests import loops
from tests.proxy_support import Recorder

run = loops.run  # the fixture: each test on asyncio and on uvloop


async def setup(
    received: list[bytearray], trusted: str = "127.0.0.0/8", **options: Any
) -> tuple[Listener, tuple[str, int], io.StringIO, asyncio.AbstractServer]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Recorder(received), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool_config = PoolConfig(
        name="app",
        servers=(ServerConfig(address=f"127.0.0.1:{port}"),),
        proxy_protocol=options.pop("send", "off"),
    )
    listener_config = ListenerConfig(
        name="web",
        bind=("127.0.0.1:0",),
        pool="app",
        proxy_protocol=options.pop("mode", "any"),
        proxy_protocol_from=(parse_cidr(trusted),),
        **options,
    )
    stream = io.StringIO()
    listener = Listener(
        listener_config, Pool.from_config(pool_config), Log("text", True, stream), loop
    )
    await listener.start()
    host, lport = listener.addresses[0].rsplit(":", 1)
    return listener, (host, int(lport)), stream, server


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


async def exchange(address: tuple[str, int], chunks: list[bytes]) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    for chunk in chunks:
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.02)  # separate segments: the header arrives split
    writer.write_eof()
    reply = await reader.read()
    writer.close()
    return reply


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_split_over_segments_then_bytes_in_the_same_read(run: Any, version: str) -> None:
    async def scenario() -> None:
        received: list[bytearray] = []
        listener, address, log, server = await setup(received, send="v2")
        encode = encode_v1 if version == "v1" else encode_v2
        header = encode(("203.0.113.9", 5555), ("198.51.100.1", 443))
        payload = b"hello after the header"
        # The header in three segments; the last also carries the first payload bytes.
        reply = await exchange(
            address, [header[:5], header[5:20], header[20:] + payload[:7], payload[7:]]
        )
        assert reply == payload
        await wait_for(lambda: listener.active == 0)
        sent = bytes(received[0])
        verdict = parse(sent, "v2")
        assert isinstance(verdict, Done)
        assert verdict.source == ("203.0.113.9", 5555)
        assert verdict.destination == ("198.51.100.1", 443)
        assert sent[verdict.header_length :] == payload
        assert "client=203.0.113.9:5555" in log.getvalue()
        assert listener.refused["proxy_protocol"] == 0
        assert listener.connections_total == 1
        listener.stop_accepting()
        server.close()

    run(scenario())


def test_refusals_are_counted_once_each(run: Any) -> None:
    async def scenario() -> None:
        received: list[bytearray] = []
        listener, address, log, server = await setup(
            received, mode="v1", proxy_protocol_timeout=0.3
        )
        # Garbage, a v2 header where v1 is expected, an EOF mid-header, and a stall.
        assert await exchange(address, [b"GET / HTTP/1.0\r\n\r\n"]) == b""
        assert await exchange(address, [encode_v2(("1.2.3.4", 1), ("1.2.3.4", 2))]) == b""
        assert await exchange(address, [b"PROXY TCP4 1.2"]) == b""
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"PROXY TCP4 1.2.3.4 ")
        started = asyncio.get_running_loop().time()
        assert await reader.read() == b""  # closed by lbtcp at the timeout
        waited = asyncio.get_running_loop().time() - started
        writer.close()
        assert 0.25 <= waited < 2.0, waited
        await wait_for(lambda: listener.refused["proxy_protocol"] == 4)
        assert listener.connections_total == 4
        assert not received, "no server connection for a refused client"
        assert log.getvalue().count("term=PP") == 4
        assert 'reason="no complete header within the timeout"' in log.getvalue()
        assert not listener.awaiting_header
        listener.stop_accepting()
        server.close()

    run(scenario())


def test_untrusted_peer_is_a_plain_client(run: Any) -> None:
    async def scenario() -> None:
        received: list[bytearray] = []
        listener, address, log, server = await setup(received, trusted="10.0.0.0/8", send="v1")
        fake = encode_v1(("203.0.113.9", 5555), ("198.51.100.1", 443))
        reply = await exchange(address, [fake + b"data"])
        assert reply == fake + b"data"
        sent = bytes(received[0])
        verdict = parse(sent, "v1")
        assert isinstance(verdict, Done)
        assert verdict.source is not None and verdict.source[0] == "127.0.0.1"
        assert verdict.destination == address
        assert sent[verdict.header_length :] == fake + b"data"
        assert "client=127.0.0.1:" in log.getvalue()
        listener.stop_accepting()
        server.close()

    run(scenario())


def test_shutdown_closes_waiting_clients_without_counting(run: Any) -> None:
    async def scenario() -> None:
        listener, address, _log, server = await setup([])
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"PROXY ")
        await wait_for(lambda: len(listener.awaiting_header) == 1)
        listener.close_sessions("ST")
        # Closed with an abort: an RST, or a FIN if the reset raced the read.
        with contextlib.suppress(ConnectionResetError):
            assert await reader.read() == b""
        writer.close()
        assert listener.refused["proxy_protocol"] == 0
        assert not listener.awaiting_header
        listener.stop_accepting()
        server.close()

    run(scenario())


@pytest.mark.parametrize("header", [encode_v2(None, None), b"PROXY UNKNOWN\r\n"])
def test_local_and_unknown_use_the_connection_address(run: Any, header: bytes) -> None:
    async def scenario() -> None:
        received: list[bytearray] = []
        listener, address, log, server = await setup(received, send="v1")
        assert await exchange(address, [header + b"probe"]) == b"probe"
        out = parse(bytes(received[0]), "v1")
        assert isinstance(out, Done)
        assert out.source is not None and out.source[0] == "127.0.0.1"
        assert out.destination == address
        await wait_for(lambda: listener.active == 0)
        assert f"client=127.0.0.1:{out.source[1]} " in log.getvalue()
        listener.stop_accepting()
        server.close()

    run(scenario())
