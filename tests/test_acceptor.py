"""The batch acceptor (lbtcp/acceptor.py): at most ACCEPT_BATCH clients per readiness event,
every queued client served, a pause instead of a spin when descriptors run out, and a bad
protocol costing one client only. In-process tests run on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from lbtcp import acceptor
from lbtcp.acceptor import ACCEPT_PAUSE, Acceptor
from tests import loops
from tests.support import Lbtcp, config

run = loops.run  # the fixture: each test on asyncio and on uvloop


class Echo(asyncio.Protocol):
    made: ClassVar[list[Echo]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        Echo.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def listening() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock


def test_one_event_takes_at_most_a_batch_and_the_rest_follow(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clients queued before the loop looks: one reader call accepts exactly ACCEPT_BATCH
    (made 16 here, so that the test needs few descriptors), the following turns take the
    rest, and every client gets its own bytes back."""
    monkeypatch.setattr(acceptor, "ACCEPT_BATCH", 16)

    async def scenario() -> None:
        Echo.made = []
        loop = asyncio.get_running_loop()
        sock = listening()
        count = acceptor.ACCEPT_BATCH * 2 + 17
        clients = [socket.create_connection(sock.getsockname()) for _ in range(count)]
        server = Acceptor(loop, sock, Echo)
        loop.remove_reader(sock.fileno())  # drive the first batch by hand
        server._accept_batch()
        await asyncio.sleep(0)  # connection_made runs in the loop's next callbacks
        await asyncio.sleep(0)
        assert len(Echo.made) == acceptor.ACCEPT_BATCH
        loop.add_reader(sock.fileno(), server._accept_batch)
        deadline = loop.time() + 10
        while len(Echo.made) < count:
            assert loop.time() < deadline, f"{len(Echo.made)} of {count} accepted"
            await asyncio.sleep(0.005)
        for index, client in enumerate(clients):
            client.setblocking(False)
            payload = f"client {index} ".encode() * 50
            await loop.sock_sendall(client, payload)
            got = b""
            while len(got) < len(payload):
                chunk = await loop.sock_recv(client, 65536)
                assert chunk, "closed early"
                got += chunk
            assert got == payload
            client.close()
        server.close()
        server.close()  # idempotent
        assert server.sockets == ()
        for made in Echo.made:
            made.transport.close()
        await asyncio.sleep(0.01)

    run(scenario())


def test_a_failing_protocol_costs_one_client_only(run: Any) -> None:
    """connection_made raising reaches the loop's exception handler (the fixture would fail
    on it, so it is caught here) and the next clients are served."""

    async def scenario() -> None:
        Echo.made = []
        loop = asyncio.get_running_loop()
        seen: list[dict[str, Any]] = []
        previous = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, context: seen.append(context))
        calls = [0]

        class Flaky(Echo):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                calls[0] += 1
                if calls[0] == 1:
                    transport.close()
                    raise RuntimeError("the first client's protocol is broken")
                super().connection_made(transport)

        sock = listening()
        server = Acceptor(loop, sock, Flaky)
        first = socket.create_connection(sock.getsockname())
        await asyncio.sleep(0.1)
        second = socket.create_connection(sock.getsockname())
        second.setblocking(False)
        await loop.sock_sendall(second, b"still here")
        assert await asyncio.wait_for(loop.sock_recv(second, 100), 5) == b"still here"
        assert any(isinstance(c.get("exception"), RuntimeError) for c in seen), seen
        loop.set_exception_handler(previous)
        for client in (first, second):
            client.close()
        server.close()
        for made in Echo.made:
            made.transport.close()
        await asyncio.sleep(0.01)

    run(scenario())


def test_close_refuses_new_clients(run: Any) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        sock = listening()
        address = sock.getsockname()
        server = Acceptor(loop, sock, Echo)
        server.close()
        try:
            socket.create_connection(address, timeout=2).close()
        except ConnectionRefusedError:
            return
        raise AssertionError("a closed acceptor still took a connection")

    run(scenario())


def test_accept_out_of_descriptors_pauses_instead_of_spinning(run: Any) -> None:
    """accept() failing with EMFILE (made to fail by a wrapper round the real socket) stops
    the reader for ACCEPT_PAUSE, reports once per failure, and the queued client is served
    once accept() works again."""

    async def scenario() -> None:
        Echo.made = []
        loop = asyncio.get_running_loop()
        sock = listening()
        errors: list[OSError] = []
        server = Acceptor(loop, sock, Echo, errors.append)

        class Failing:
            calls = 0
            failing = True

            def _accept(self) -> tuple[int, Any]:  # the C call under socket.accept()
                Failing.calls += 1
                if Failing.failing:
                    raise OSError(errno.EMFILE, "Too many open files")
                return sock._accept()  # type: ignore[attr-defined,no-any-return]

        server._sock = Failing()  # type: ignore[assignment]
        client = socket.create_connection(sock.getsockname())
        await asyncio.sleep(ACCEPT_PAUSE * 3.5)
        # One call per pause (about 4 in 3.5 pauses), where a spin would make thousands.
        assert 2 <= Failing.calls <= 6, Failing.calls
        assert len(errors) == Failing.calls
        assert all(e.errno == errno.EMFILE for e in errors)
        assert not Echo.made
        Failing.failing = False
        client.setblocking(False)
        await loop.sock_sendall(client, b"served")
        assert await asyncio.wait_for(loop.sock_recv(client, 100), 5) == b"served"
        client.close()
        server._sock = sock
        server.close()
        for made in Echo.made:
            made.transport.close()
        await asyncio.sleep(0.01)

    run(scenario())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pauses_and_recovers(start_lbtcp: Any, backends: Any) -> None:
    """lbtcp under a 64-descriptor limit with more clients than it can hold: it logs
    accept_paused, does not spin on the readable socket, does not blame the server (its
    connects failed for lbtcp's own lack of descriptors), answers every client (served, or
    closed), and serves new clients once descriptors are free again."""
    echo = backends.echo()
    proc: Lbtcp = start_lbtcp(  # the fixture stops it however the test ends
        config([echo], global_extra="access_log = false"),
        prefix=("prlimit", "--nofile=64:64", "--"),
    )
    address = proc.address()
    clients: list[socket.socket] = []
    for _ in range(60):  # two descriptors a session: more than 64 can hold
        client = socket.create_connection(address, timeout=5)
        client.sendall(b"x")
        clients.append(client)
    proc.wait_line(r"accept_paused .*listener=web", timeout=10)
    # Paused, not spinning: a loop on a readable socket would burn a whole core.
    before = cpu_seconds(proc.proc.pid)
    time.sleep(1.0)
    assert cpu_seconds(proc.proc.pid) - before < 0.5
    served = 0
    for client in clients:  # closing each frees descriptors for the ones still queued
        answer = _answer(client, timeout=10)
        assert answer in (b"x", b""), "a client was left hanging"
        served += answer == b"x"
        client.close()
    assert served >= 10, served
    assert not proc.matching(r"server_state .*new=ejected"), "lbtcp's shortage blamed the server"
    for _ in range(3):
        with socket.create_connection(address, timeout=5) as client:
            client.sendall(b"x")
            assert _answer(client, timeout=5) == b"x"
    assert proc.proc.poll() is None


def _answer(client: socket.socket, timeout: float) -> bytes | None:
    """What comes back for the b"x" already sent: b"x", b"" (closed or reset), or None
    (nothing within ``timeout``)."""
    client.settimeout(timeout)
    try:
        return client.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""
