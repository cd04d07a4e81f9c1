"""End-to-end: ``lbtcp serve`` as a subprocess, real bytes over 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from tests.support import (
    Backends,
    EchoProcess,
    Lbtcp,
    blackhole,
    closed_port,
    config,
    open_session,
    roundtrip,
    wait_until,
)

StartLbtcp = Callable[..., Lbtcp]
MiB = 1024 * 1024


async def _echo_session(address: tuple[str, int], size: int) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(*address)
    payload = os.urandom(size)
    received = hashlib.sha256()
    count = 0

    async def send() -> None:
        view = memoryview(payload)
        for offset in range(0, size, 256 * 1024):
            writer.write(view[offset : offset + 256 * 1024])
            await writer.drain()
        writer.write_eof()

    async def receive() -> None:
        nonlocal count
        while chunk := await reader.read(1 << 18):
            received.update(chunk)
            count += len(chunk)

    await asyncio.gather(send(), receive())
    writer.close()
    assert count == size
    return hashlib.sha256(payload).digest(), received.digest()


def test_integrity_32_sessions_of_16_mib_both_ways(
    start_lbtcp: StartLbtcp, echo_processes: Callable[..., EchoProcess]
) -> None:
    echo = echo_processes(3)
    lb = start_lbtcp(config(echo.ports, global_extra="access_log = true"))
    address = lb.address()

    async def run_all() -> list[tuple[bytes, bytes]]:
        return await asyncio.gather(*(_echo_session(address, 16 * MiB) for _ in range(32)))

    results = asyncio.run(asyncio.wait_for(run_all(), 120))
    assert len(results) == 32
    for sent, received in results:
        assert sent == received
    wait_until(lambda: len(lb.matching(r" access .*term=--")) == 32, 10, "32 access lines")
    for line in lb.matching(r" access "):
        assert f"bytes_in={16 * MiB} bytes_out={16 * MiB}" in line


def test_half_close_client_shuts_write_side_and_gets_full_reply(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    async def reply_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's FIN
        writer.write(b"got:" + request * 1000)
        await writer.drain()
        writer.close()

    port = backends.stream(reply_after_eof)
    lb = start_lbtcp(config([port]))
    reply = roundtrip(lb.address(), b"question")
    assert reply == b"got:" + b"question" * 1000


def test_half_close_server_replies_then_closes_client_sees_eof(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    async def greet_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello\r\n")
        await writer.drain()
        writer.close()

    port = backends.stream(greet_and_close)
    lb = start_lbtcp(config([port]))
    with socket.create_connection(lb.address(), timeout=5) as sock:
        data = b""
        while chunk := sock.recv(1024):
            data += chunk
        assert data == b"220 hello\r\n"  # then recv returned b"": EOF reached the client


def test_server_half_close_keeps_client_to_server_direction_open(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    """The server shuts its write side first; the client may still send, and be heard."""
    heard: list[bytes] = []

    async def shut_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ready")
        writer.write_eof()
        heard.append(await reader.read())
        writer.close()

    port = backends.stream(shut_first)
    lb = start_lbtcp(config([port]))
    with socket.create_connection(lb.address(), timeout=5) as sock:
        assert sock.recv(100) == b"ready"
        assert sock.recv(100) == b""  # EOF from the server
        sock.sendall(b"still talking")
        sock.shutdown(socket.SHUT_WR)
    wait_until(lambda: heard == [b"still talking"], 5, "the server to hear the client")


def test_backpressure_bounds_memory_when_client_stops_reading(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    """A server streams 200 MiB to a client that does not read: lbtcp must not buffer it."""
    total = 200 * MiB
    written = [0]

    async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = b"x" * (256 * 1024)
        while written[0] < total:
            writer.write(chunk)
            written[0] += len(chunk)
            await writer.drain()
        writer.close()

    port = backends.stream(firehose)
    lb = start_lbtcp(config([port]))
    baseline = lb.rss_bytes()
    sock = socket.create_connection(lb.address(), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    # Wait until the server is stuck: its writes stop advancing because lbtcp stopped reading.
    last = -1
    while written[0] != last:
        last = written[0]
        time.sleep(0.3)
    stalled_at = written[0]
    growth = lb.rss_bytes() - baseline
    assert stalled_at < 50 * MiB, "the server should be held back, not drained into lbtcp"
    assert growth < 16 * MiB, f"lbtcp grew by {growth / MiB:.1f} MiB"
    # Then read everything: nothing was lost while paused.
    received = 0
    while chunk := sock.recv(1 << 20):
        received += len(chunk)
    sock.close()
    assert received == total


def test_retries_route_around_a_refusing_server(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    ports = [backends.echo(), closed_port(), backends.echo()]
    lb = start_lbtcp(config(ports, pool_extra="retries = 2", global_extra="access_log = false"))
    address = lb.address()
    for index in range(1000):
        payload = b"client %d" % index
        assert roundtrip(address, payload) == payload
    # Every third first choice was the refusing server: the retries really happened.
    assert backends.accepted[ports[0]] + backends.accepted[ports[2]] == 1000


def test_all_servers_refusing_closes_clients_quickly_with_cr(start_lbtcp: StartLbtcp) -> None:
    ports = [closed_port(), closed_port(), closed_port()]
    lb = start_lbtcp(config(ports, pool_extra="retries = 2"))
    address = lb.address()
    for _ in range(5):
        started = time.monotonic()
        assert roundtrip(address, b"hello") == b""
        assert time.monotonic() - started < 0.5
    wait_until(lambda: len(lb.matching(r"term=CR")) == 5, 5, "five CR access lines")
    assert not lb.matching(r"term=--")


def test_connect_timeout_logs_ct(start_lbtcp: StartLbtcp) -> None:
    with blackhole() as port:
        lb = start_lbtcp(config([port], pool_extra='retries = 0\nconnect_timeout = "300ms"'))
        started = time.monotonic()
        assert roundtrip(lb.address(), b"hi") == b""
        elapsed = time.monotonic() - started
        assert 0.25 < elapsed < 2.0
        lb.wait_line(r"term=CT", 5)


@pytest.mark.parametrize("mode", ["close", "reset", "banner"])
def test_no_eligible_server_is_refused_at_once(
    start_lbtcp: StartLbtcp, backends: Backends, mode: str
) -> None:
    port = backends.echo()
    extra = f'no_healthy = "{mode}"'
    if mode == "banner":
        extra += '\nno_healthy_banner = "503 no healthy upstream\\r\\n"'
    lb = start_lbtcp(config([port], listener_extra=extra, server_extra="weight = 0"))
    started = time.monotonic()
    with socket.create_connection(lb.address(), timeout=5) as sock:
        if mode == "reset":
            with pytest.raises(ConnectionResetError):
                sock.recv(100)
        else:
            data = b""
            while chunk := sock.recv(100):
                data += chunk
            assert data == (b"503 no healthy upstream\r\n" if mode == "banner" else b"")
    assert time.monotonic() - started < 0.5
    lb.wait_line(r"term=NH", 5)
    assert backends.accepted[port] == 0  # no connect attempt was made


def test_full_servers_are_skipped_and_then_refused(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    port = backends.echo()
    lb = start_lbtcp(config([port], server_extra="max_connections = 1"))
    first = open_session(lb.address(), b"a")
    assert roundtrip(lb.address(), b"second") == b""  # the only server is full
    lb.wait_line(r"term=NH", 5)
    first.close()


def test_idle_timeout_closes_silent_session(start_lbtcp: StartLbtcp, backends: Backends) -> None:
    port = backends.echo()
    lb = start_lbtcp(config([port], listener_extra='idle_timeout = "400ms"'))
    with socket.create_connection(lb.address(), timeout=5) as sock:
        sock.sendall(b"ping")
        assert sock.recv(10) == b"ping"
        started = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(10) == b""
        elapsed = time.monotonic() - started
    assert 0.35 < elapsed < 1.5
    lb.wait_line(r"term=CI", 5)


def test_acl_and_per_source_limit(start_lbtcp: StartLbtcp, backends: Backends) -> None:
    port = backends.echo()
    denied = start_lbtcp(config([port], listener_extra='deny = ["127.0.0.0/8"]'))
    assert roundtrip(denied.address(), b"x") == b""
    denied.wait_line(r"term=AC", 5)

    limited = start_lbtcp(config([port], listener_extra="max_per_source = 1"))
    held = open_session(limited.address(), b"a")
    assert roundtrip(limited.address(), b"x") == b""
    limited.wait_line(r"term=LM", 5)
    held.close()
    wait_until(lambda: roundtrip(limited.address(), b"y") == b"y", 5, "the slot to free up")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_live_session_and_refuses_new(
    start_lbtcp: StartLbtcp, backends: Backends, workers: int
) -> None:
    port = backends.echo()
    lb = start_lbtcp(config([port], global_extra=f'drain_timeout = "10s"\nworkers = {workers}'))
    address = lb.address()
    live = open_session(address, b"before")
    lb.signal(signal.SIGTERM)
    lb.wait_line(r"\bdrain\b", 5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
    # The live session still carries a sizeable transfer after the signal.
    payload = os.urandom(4 * MiB)
    live.sendall(payload)
    live.shutdown(socket.SHUT_WR)
    received = bytearray()
    while chunk := live.recv(1 << 20):
        received += chunk
    live.close()
    assert bytes(received) == payload
    assert lb.wait(15) == 0
    assert lb.matching(r"term=--")


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_closes_sessions_left_after_drain_timeout(
    start_lbtcp: StartLbtcp, backends: Backends, workers: int
) -> None:
    port = backends.echo()
    lb = start_lbtcp(config([port], global_extra=f'drain_timeout = "300ms"\nworkers = {workers}'))
    live = open_session(lb.address(), b"x")
    lb.signal(signal.SIGTERM)
    assert lb.wait(10) == 0
    with contextlib.suppress(ConnectionResetError):
        assert live.recv(10) == b""
    live.close()
    assert lb.matching(r"term=ST")


def test_ipv6_listener_and_server(start_lbtcp: StartLbtcp, tmp_path: object) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback; lbtcp's IPv6 support cannot be tested")
    server = socket.socket(socket.AF_INET6)
    server.bind(("::1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    text = config([]).replace('bind = "127.0.0.1:0"', 'bind = ["[::1]:0", "127.0.0.1:0"]')
    text += f'[[pools.app.servers]]\naddress = "[::1]:{port}"\n'
    lb = start_lbtcp(text)
    line = lb.wait_line(r"listening listener=web address=\[::1\]")
    lb_port = int(line.rsplit(":", 1)[1].split()[0])
    client = socket.create_connection(("::1", lb_port), timeout=5)
    conn, _ = server.accept()
    client.sendall(b"v6")
    assert conn.recv(10) == b"v6"
    conn.close()
    client.close()
    server.close()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbtcp", *args], capture_output=True, text=True, timeout=30
    )


def test_serve_exits_2_on_bad_config_naming_the_key(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.toml")
    with open(path, "w") as handle:
        handle.write(config([]) + '[[pools.app.servers]]\naddress = "10.0.0.1"\n')
    result = run_cli("serve", path)
    assert result.returncode == 2
    assert "pools.app.servers[0].address: '10.0.0.1' has no port" in result.stderr
    assert path in result.stderr


def test_serve_exits_1_when_the_port_is_in_use(tmp_path: os.PathLike[str]) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    path = os.path.join(tmp_path, "c.toml")
    with open(path, "w") as handle:
        handle.write(config([9]).replace("127.0.0.1:0", f"127.0.0.1:{port}"))
    try:
        result = run_cli("serve", path)
    finally:
        taken.close()
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert errno.errorcode[errno.EADDRINUSE] in result.stderr or "in use" in result.stderr


def test_json_access_log_has_every_field(start_lbtcp: StartLbtcp, backends: Backends) -> None:
    import json

    port = backends.echo()
    lb = start_lbtcp(config([port], global_extra='log_format = "json"'))
    assert roundtrip(lb.address(), b"hello json") == b"hello json"
    line = lb.wait_line(r'"kind": "access"', 5)
    record = json.loads(line)
    assert record["listener"] == "web"
    assert record["pool"] == "app"
    assert record["server"] == f"127.0.0.1:{port}"
    assert record["client"].startswith("127.0.0.1:")
    assert (record["bytes_in"], record["bytes_out"], record["term"]) == (10, 10, "--")
    assert record["connect_ms"] >= 0
    assert record["duration_ms"] >= record["connect_ms"]
    assert record["time"].endswith("Z")
    start = json.loads(lb.wait_line(r'"kind": "start"'))
    assert start["pid"] == lb.proc.pid


def test_sigint_closes_live_sessions_at_once(start_lbtcp: StartLbtcp, backends: Backends) -> None:
    port = backends.echo()
    lb = start_lbtcp(config([port], global_extra='drain_timeout = "30s"'))
    live = open_session(lb.address(), b"x")
    started = time.monotonic()
    lb.signal(signal.SIGINT)
    assert lb.wait(10) == 0
    assert time.monotonic() - started < 2.0  # did not wait for the 30 s drain
    with contextlib.suppress(ConnectionResetError):
        assert live.recv(10) == b""
    live.close()
    assert lb.matching(r"term=ST")


def test_allow_list_and_listener_connection_limit(
    start_lbtcp: StartLbtcp, backends: Backends
) -> None:
    port = backends.echo()
    outside = start_lbtcp(config([port], listener_extra='allow = ["10.0.0.0/8"]'))
    assert roundtrip(outside.address(), b"x") == b""
    outside.wait_line(r"term=AC", 5)

    inside = start_lbtcp(
        config([port], listener_extra='allow = ["127.0.0.0/8"]\nmax_connections = 1')
    )
    assert roundtrip(inside.address(), b"in") == b"in"
    held = open_session(inside.address(), b"a")
    assert roundtrip(inside.address(), b"second") == b""  # the listener is full
    inside.wait_line(r"term=LM", 5)
    held.close()
    wait_until(lambda: roundtrip(inside.address(), b"y") == b"y", 5, "the slot to free up")
