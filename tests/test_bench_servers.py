"""The echo and sink backends, on both asyncio and uvloop, and as ``echo``/``sink`` commands."""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from lbtcp.bench.servers import (
    ECHO_HIGH_WATER,
    EchoProtocol,
    SinkProtocol,
    server_port,
    start_echo,
    start_sink,
)

DEADLINE = 10.0
READ_CHUNK_MAX = 256 * 1024  # the most either loop reads per data_received


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, Any]], Any]]:
    """Run a coroutine on a fresh loop of each kind; fail if the loop's handler was called."""
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        return loop.run_until_complete(asyncio.wait_for(coro, DEADLINE))

    try:
        yield runner
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert reported == []


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read()  # until EOF


def test_echo_round_trip_and_half_close(run: Callable[..., Any]) -> None:
    """The client sends, shuts down its write side, and gets the full echo then EOF."""

    async def main() -> None:
        server = await start_echo("127.0.0.1", 0)
        try:
            payload = os.urandom(3 * 1024 * 1024)  # far above the high-water mark
            reader, writer = await asyncio.open_connection("127.0.0.1", server_port(server))
            writer.write(payload)
            writer.write_eof()
            echoed = await _read_all(reader)
            assert len(echoed) == len(payload)
            assert echoed == payload
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()

    run(main())


def test_echo_on_ipv6_loopback(run: Callable[..., Any]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main() -> None:
        try:
            server = await start_echo("::1", 0)
        except OSError as exc:
            pytest.skip(f"no ::1 here: {exc}")
        try:
            assert server.sockets[0].family == socket.AF_INET6
            reader, writer = await asyncio.open_connection("::1", server_port(server))
            writer.write(b"hello over v6")
            writer.write_eof()
            assert await _read_all(reader) == b"hello over v6"
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()

    run(main())


def test_echo_stops_reading_from_a_client_that_does_not_read(run: Callable[..., Any]) -> None:
    """Flow control: a client that sends without reading cannot grow the echo's buffer."""
    protocols: list[EchoProtocol] = []

    def factory() -> EchoProtocol:
        protocol = EchoProtocol()
        protocols.append(protocol)
        return protocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, ("127.0.0.1", server_port(server)))
            chunk = os.urandom(64 * 1024)
            sent = 0
            deadline = time.monotonic() + DEADLINE

            def server_transport() -> asyncio.Transport | None:
                return protocols[0]._transport if protocols else None

            # Send until the echo has stopped reading from us (or we hit a generous limit).
            while True:
                transport = server_transport()
                if transport is not None and not transport.is_reading():
                    break
                assert time.monotonic() < deadline, "the echo never paused reading"
                assert sent < 256 * 1024 * 1024, "the echo kept reading without bound"
                with contextlib.suppress(BlockingIOError):
                    sent += client.send(chunk)
                await asyncio.sleep(0)  # let the server run (polling, not waiting for start-up)
            transport = server_transport()
            assert transport is not None
            assert transport.get_write_buffer_size() <= ECHO_HIGH_WATER + READ_CHUNK_MAX
            # Now read everything back: the echo resumes and every byte arrives in order.
            received = bytearray()
            while len(received) < sent:
                received += await loop.sock_recv(client, 1024 * 1024)
            assert len(received) == sent
            assert transport.is_reading()
        finally:
            client.close()
            server.close()
            # The echo's side sees the close only on a later loop turn, maybe after the
            # fixture closed the loop: abort it here, or the GC reports an unclosed transport
            # in some later test.
            for protocol in protocols:
                if protocol._transport is not None:
                    protocol._transport.abort()
            await asyncio.sleep(0)

    run(main())


def test_sink_discards_and_closes_on_eof(run: Callable[..., Any]) -> None:
    protocols: list[SinkProtocol] = []

    def factory() -> SinkProtocol:
        protocol = SinkProtocol()
        protocols.append(protocol)
        return protocol

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server_port(server))
            writer.write(os.urandom(5 * 1024 * 1024))
            await writer.drain()
            writer.write_eof()
            assert await _read_all(reader) == b""  # nothing back, then the sink's EOF
            writer.close()
            await writer.wait_closed()
            assert protocols[0].bytes_received == 5 * 1024 * 1024
        finally:
            server.close()

    run(main())


def test_start_sink_listens(run: Callable[..., Any]) -> None:
    async def main() -> None:
        server = await start_sink("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server_port(server))
            writer.write(b"x" * 100_000)
            writer.write_eof()
            assert await _read_all(reader) == b""
            writer.close()
            await writer.wait_closed()
        finally:
            server.close()

    run(main())


# --- the commands, as real processes ----------------------------------------------------------


def _start_command(*args: str) -> subprocess.Popen[bytes]:
    # Development mode shows ResourceWarnings (unclosed transports) on stderr.
    return subprocess.Popen(
        [sys.executable, "-X", "dev", "-m", "lbtcp.bench", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _read_lines(proc: subprocess.Popen[bytes], count: int) -> list[str]:
    """Read ``count`` lines of stderr, failing after DEADLINE (the process may hang).

    Reads the pipe's descriptor directly: a buffered readline() could swallow the next line
    and leave select() waiting for bytes that already arrived.
    """
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    data = b""
    deadline = time.monotonic() + DEADLINE
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only got {data!r}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"stderr closed after {data!r}; exit {proc.wait()}"
            data += chunk
    return data.decode().splitlines()[:count]


def _stop(proc: subprocess.Popen[bytes], sig: int | None) -> tuple[int, str]:
    """Signal the process (unless ``sig`` is None), wait for it, and return its exit code and
    remaining stderr."""
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.decode()


@pytest.mark.parametrize(("kind", "sig"), [("echo", signal.SIGTERM), ("sink", signal.SIGINT)])
def test_command_listens_on_every_port_and_stops_on_signal(kind: str, sig: int) -> None:
    proc = _start_command(kind, "0", "0")
    try:
        lines = _read_lines(proc, 2)
        ports = []
        for line in lines:
            prefix = f"{kind} listening on 127.0.0.1:"
            assert line.startswith(prefix), line
            ports.append(int(line[len(prefix) :]))
        assert len(set(ports)) == 2
        assert all(port > 0 for port in ports)
        for port in ports:
            with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
                conn.sendall(b"ping")
                conn.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := conn.recv(100):
                    reply += chunk
                assert reply == (b"ping" if kind == "echo" else b"")
    finally:
        code, err = _stop(proc, sig)
    assert code == 0
    assert "Traceback" not in err


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_command_stop_closes_live_connections(loop: str) -> None:
    proc = _start_command("echo", "0", "--loop", loop)
    signalled = False
    try:
        (line,) = _read_lines(proc, 1)
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
            conn.sendall(b"still here")
            assert conn.recv(100) == b"still here"
            proc.send_signal(signal.SIGTERM)
            signalled = True
            with contextlib.suppress(ConnectionResetError):  # an abort is equally closed
                assert conn.recv(100) == b""  # closed by the stop, not left hanging
    finally:
        # Signal only once: a second SIGTERM during shutdown kills, by design.
        code, err = _stop(proc, None if signalled else signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in err
    assert "ResourceWarning" not in err


def test_command_reports_a_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start_command("echo", str(port))
        try:
            _, raw = proc.communicate(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    err = raw.decode()
    assert proc.returncode == 1
    assert "cannot listen" in err
    assert "Traceback" not in err
