"""One active probe against real servers on 127.0.0.1: each verdict and its reason."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from lbtcp.config import HealthConfig
from lbtcp.health import ProbeResult
from lbtcp.probes import probe_once
from tests.support import blackhole, closed_port


def run(coro: object) -> object:
    return uvloop.run(coro)  # type: ignore[arg-type]


async def serve(handler: object) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)  # type: ignore[arg-type]
    return server, server.sockets[0].getsockname()[1]


def test_connect_only_probe_ok_and_refused() -> None:
    async def scenario() -> None:
        async def idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()
            writer.close()

        server, port = await serve(idle)
        loop = asyncio.get_running_loop()
        health = HealthConfig(timeout=1.0)
        assert await probe_once(loop, "127.0.0.1", port, health) == (ProbeResult.OK, "connected")
        result, detail = await probe_once(loop, "127.0.0.1", closed_port(), health)
        assert (result, detail) == (ProbeResult.FAIL, "connection refused")
        server.close()

    run(scenario())


@pytest.mark.parametrize(
    ("reply", "expected", "detail"),
    [
        (b"+PONG\r\n", ProbeResult.OK, "expect matched"),
        (b"-ERR\r\n", ProbeResult.FAIL, "closed before the expected reply"),
        (None, ProbeResult.TIMEOUT, "reply timed out after 0.2s"),
    ],
)
def test_send_expect_verdicts(reply: bytes | None, expected: ProbeResult, detail: str) -> None:
    async def scenario() -> None:
        heard: list[bytes] = []

        async def redis_like(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.append(await reader.readline())
            if reply is not None:
                writer.write(reply)
                await writer.drain()
                writer.close()
            else:
                await reader.read()  # never answers
                writer.close()

        server, port = await serve(redis_like)
        health = HealthConfig(timeout=0.2, send=b"PING\r\n", expect=b"+PONG")
        loop = asyncio.get_running_loop()
        assert await probe_once(loop, "127.0.0.1", port, health) == (expected, detail)
        assert heard == [b"PING\r\n"]
        server.close()

    run(scenario())


def test_send_without_expect_still_delivers_the_bytes() -> None:
    async def scenario() -> None:
        heard = asyncio.get_running_loop().create_future()

        async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            heard.set_result(await reader.read())  # until the probe's FIN
            writer.close()

        server, port = await serve(record)
        health = HealthConfig(timeout=1.0, send=b"QUIT\r\n")
        loop = asyncio.get_running_loop()
        assert (await probe_once(loop, "127.0.0.1", port, health))[0] is ProbeResult.OK
        assert await asyncio.wait_for(heard, 2) == b"QUIT\r\n"
        server.close()

    run(scenario())


def test_connect_timeout_to_a_full_backlog() -> None:
    async def scenario(port: int) -> None:
        health = HealthConfig(timeout=0.2)
        loop = asyncio.get_running_loop()
        result = await probe_once(loop, "127.0.0.1", port, health)
        assert result == (ProbeResult.TIMEOUT, "connect timed out after 0.2s")

    with blackhole() as port:
        run(scenario(port))
