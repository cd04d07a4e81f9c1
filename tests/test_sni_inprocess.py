"""SNI routing in a whole runtime on uvloop and asyncio (the loop's exception handler
watched): counters, retries and failures land on the routed pool, /metrics and /status say
so, the bytes read to route are relayed first and unchanged, and clients that reset or
half-close during inspection are handled."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl

import pytest

from lbtcp.admin.status import status_document
from lbtcp.metrics import render
from lbtcp.relay import reset_transport
from tests.inprocess import LOOPS, echo_server, exchange, listener_address, run, running, until
from tests.support import closed_port


def client_hello(server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def config(app_port: int, api_port: int, dead_port: int) -> str:
    return f"""
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
routes = [{{sni = "api.example.com", pool = "api"}}, {{sni = "*.example.com", pool = "api"}}]
inspect_timeout = "300ms"

[pools.app]
[[pools.app.servers]]
address = "127.0.0.1:{app_port}"
name = "a"

[pools.api]
balance = "round_robin"
retries = 1
[[pools.api.servers]]
address = "127.0.0.1:{dead_port}"
name = "dead"
[[pools.api.servers]]
address = "127.0.0.1:{api_port}"
name = "b"
"""


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == want:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{{{want}}}")


@pytest.mark.parametrize("loop", LOOPS)
def test_routed_sessions_count_on_their_own_pool(loop: str) -> None:
    async def scenario() -> None:
        app, app_port = await echo_server()
        api, api_port = await echo_server()
        async with running(config(app_port, api_port, closed_port())) as (runtime, _log):
            address = listener_address(runtime)
            routed = [
                client_hello(name) + b"payload" for name in ("api.example.com", "x.example.com")
            ]
            for message in routed * 2:
                assert await exchange(address, message) == message  # relayed unchanged
            plain = b"plain client bytes"
            assert await exchange(address, plain) == plain
            # A TLS record that never completes: the default pool after inspect_timeout.
            half = client_hello("api.example.com")[:30]
            reader, writer = await asyncio.open_connection(*address)
            sent_at = asyncio.get_running_loop().time()
            writer.write(half)
            assert await asyncio.wait_for(reader.readexactly(len(half)), 5) == half
            assert asyncio.get_running_loop().time() - sent_at >= 0.29
            writer.close()
            await writer.wait_closed()
            await until(lambda: runtime.listeners["web"].active == 0, "sessions to end")
            text = render(runtime, "")[0].decode()
            document = status_document(runtime)
            pools = runtime.pools
            api_b, dead, app_a = (
                pools["api"].servers["b"],
                pools["api"].servers["dead"],
                pools["app"].servers["a"],
            )
            assert api_b.total == 4 and app_a.total == 2
            assert api_b.bytes_sent == sum(len(m) for m in routed) * 2
            assert app_a.bytes_sent == len(plain) + len(half)
            assert dead.connect_refused >= 1  # round robin put some first tries on it
            assert metric(text, "lbtcp_server_connections_total", pool="api", server="b") == 4
            assert metric(text, "lbtcp_server_connections_total", pool="app", server="a") == 2
            assert (
                metric(
                    text,
                    "lbtcp_server_connect_failures_total",
                    pool="api",
                    server="dead",
                    kind="refused",
                )
                == dead.connect_refused
            )
            assert metric(text, "lbtcp_listener_connections_total", listener="web") == 6
            (listener,) = document["listeners"]
            assert listener["pool"] == "app"
            assert listener["routes"] == [
                {"sni": "api.example.com", "pool": "api"},
                {"sni": "*.example.com", "pool": "api"},
            ]
        app.close()
        api.close()

    run(scenario(), loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_clients_that_reset_or_close_during_inspection(loop: str) -> None:
    async def scenario() -> None:
        app, app_port = await echo_server()
        async with running(config(app_port, closed_port(), closed_port())) as (runtime, _log):
            listener = runtime.listeners["web"]
            address = listener_address(runtime)
            hello = client_hello("api.example.com")
            for _ in range(5):
                _reader, writer = await asyncio.open_connection(*address)
                writer.write(hello[:20])
                await until(lambda: bool(listener.awaiting_header), "the reader to wait")
                reset_transport(writer.transport)  # an RST mid-record
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await until(lambda: listener.connections_total == 5, "resets to be counted")
            assert not listener.awaiting_header and listener.active == 0
            assert runtime.pools["app"].servers["a"].total == 0
            # A half record and a FIN: routed at once to the default pool with its bytes.
            started = asyncio.get_running_loop().time()
            assert await exchange(address, hello[:20]) == hello[:20]
            assert asyncio.get_running_loop().time() - started < 0.25
            # Clients still inspecting when lbtcp stops are closed by the stop.
            _reader, stalled = await asyncio.open_connection(*address)
            stalled.write(hello[:20])
            await until(lambda: bool(listener.awaiting_header), "the reader to wait")
        with contextlib.suppress(ConnectionResetError):  # closed by FIN or RST: not hanging
            assert await asyncio.wait_for(_reader.read(), 5) == b""
        stalled.close()
        app.close()

    run(scenario(), loop)
