"""The measuring sticks ``benchmarks/conncost.py`` runs beside lbtcp: ``bare_relay.py``
(uvloop transports) and ``raw_relay.py`` (raw sockets, add_reader/add_writer), each as a real
subprocess between a real client and a real echo server on 127.0.0.1.

A floor that drops bytes, leaks finished sessions or dies when a client leaves is not a floor:
these check that each relay moves every byte in order with half-close, closes both sockets of
a finished session, survives clients that reset mid-stream and servers that refuse, and (the
raw relay, which keeps flow control) holds a bounded amount while the server does not read.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import REPO, Backends, closed_port, roundtrip, wait_until

RELAYS = ["bare_relay.py", "raw_relay.py"]
DEADLINE = 10.0
MIB = 1024 * 1024


class Relay:
    """One relay script as a subprocess: LISTEN_PORT -> 127.0.0.1:BACKEND_PORT."""

    def __init__(self, script: str, backend: int) -> None:
        self.port = closed_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks" / script), str(self.port), str(backend)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        ready, _, _ = select.select([self.proc.stderr], [], [], DEADLINE)
        line = self.proc.stderr.readline().decode() if ready else ""
        assert f"listening on 127.0.0.1:{self.port}" in line, line
        self.baseline = self.sockets()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def sockets(self) -> int:
        """How many sockets the relay process holds open now."""
        fds = Path(f"/proc/{self.proc.pid}/fd")
        count = 0
        for fd in fds.iterdir():
            with contextlib.suppress(FileNotFoundError):  # closed since the listing
                count += os.readlink(fd).startswith("socket:")
        return count

    def wait_sessions_closed(self) -> None:
        """Every socket of every session is closed again (the listener stays)."""
        wait_until(
            lambda: self.sockets() == self.baseline,
            DEADLINE,
            f"the relay to close its sessions' sockets (holds {self.sockets()}, "
            f"{self.baseline} when idle)",
        )

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS line")

    def stop(self) -> str:
        """Stop it (SIGTERM); return what it printed after the listening line."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=DEADLINE)
        return err.decode()


StartRelay = Callable[[str, int], "Relay"]


@pytest.fixture
def start_relay() -> Iterator[StartRelay]:
    started: list[Relay] = []

    def start(script: str, backend: int) -> Relay:
        relay = Relay(script, backend)
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


def _exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload`` and half-close from a thread while reading until EOF (the echo sends
    back while we still send, so one thread doing both in turn would deadlock)."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while chunk := sock.recv(256 * 1024):
            chunks.append(chunk)
        sender.join(DEADLINE)
        assert not sender.is_alive()
        return b"".join(chunks)


def _stopped_cleanly(relay: Relay) -> None:
    """The relay was still running and, stopped, exits 0 having printed nothing more: no
    crash, no exception reported from a loop callback, no unclosed-resource warning."""
    assert relay.proc.poll() is None, f"the relay died (exit {relay.proc.returncode})"
    rest = relay.stop()
    assert relay.proc.returncode == 0
    assert rest == ""


@pytest.mark.parametrize("script", RELAYS)
def test_every_byte_comes_back_in_order_and_the_session_closes(
    script: str, backends: Backends, start_relay: StartRelay
) -> None:
    relay = start_relay(script, backends.echo())
    payload = os.urandom(MIB + 12345)
    for _ in range(2):
        assert _exchange(relay.address, payload) == payload
        relay.wait_sessions_closed()
        wait_until(lambda: not backends.transports, DEADLINE, "the echo's connection to close")
    _stopped_cleanly(relay)


@pytest.mark.parametrize("script", RELAYS)
def test_a_fin_right_after_the_connect_is_passed_on(
    script: str, backends: Backends, start_relay: StartRelay
) -> None:
    """The client's bytes and FIN may arrive before the relay's own connect has finished."""
    relay = start_relay(script, backends.echo())
    for index in range(20):
        payload = b"ping %d" % index
        assert roundtrip(relay.address, payload) == payload
    relay.wait_sessions_closed()
    _stopped_cleanly(relay)


def _syn_sent_to(port: int) -> bool:
    """A connect to 127.0.0.1:``port`` waits in its handshake (SYN_SENT in /proc/net/tcp)."""
    remote = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == remote and fields[3] == "02":
            return True
    return False


@pytest.mark.parametrize("payload", [b"", b"hello"])
@pytest.mark.parametrize("script", RELAYS)
def test_bytes_and_fin_wait_for_a_slow_connect(
    script: str, payload: bytes, start_relay: StartRelay
) -> None:
    """The client sends and half-closes while the relay's connect is still in its handshake
    (the server's accept queue is full, so the relay's SYN waits for its retransmit, 1 s
    later): the bytes, then the FIN, reach the server once it has room, and the server's
    answer comes back. A shutdown during the handshake would abort the connect instead."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    listener.settimeout(DEADLINE)
    fillers: list[socket.socket] = []
    while True:  # fill the accept queue until a connect no longer completes
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
        _, writable, _ = select.select([], [filler], [], 0.2)
        if not writable or len(fillers) > 16:
            break
    assert 1 < len(fillers) <= 16, "could not fill the accept queue"
    fillers.pop().close()  # the one still in its handshake: it would take the room later
    port = listener.getsockname()[1]
    relay = start_relay(script, port)
    with socket.create_connection(relay.address, timeout=DEADLINE) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        # The relay reads these at once, long before its SYN's retransmit (1 s).
        wait_until(lambda: _syn_sent_to(port), DEADLINE, "the relay's connect in its handshake")
        for filler in fillers:
            accepted, _ = listener.accept()
            accepted.close()
            filler.close()
        server, _ = listener.accept()  # the relay's connection, after its SYN's retransmit
        with server:
            server.settimeout(DEADLINE)
            received = b""
            while chunk := server.recv(65536):
                received += chunk
            assert received == payload
            server.sendall(b"answer")
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
        assert reply == b"answer"
    listener.close()
    relay.wait_sessions_closed()
    _stopped_cleanly(relay)


@pytest.mark.parametrize("script", RELAYS)
def test_clients_that_leave_mid_stream_do_not_stop_the_relay(
    script: str, backends: Backends, start_relay: StartRelay
) -> None:
    relay = start_relay(script, backends.echo())
    payload = os.urandom(4 * MIB)
    for reset in (True, False):
        sock = socket.create_connection(relay.address, timeout=DEADLINE)
        sock.sendall(payload[: 512 * 1024])
        got = 0
        while got < 64 * 1024:
            got += len(sock.recv(64 * 1024))
        if reset:  # an RST at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with echoed bytes unread: the kernel resets too
    relay.wait_sessions_closed()
    wait_until(lambda: not backends.transports, DEADLINE, "the echo's connections to close")
    assert _exchange(relay.address, payload) == payload  # the next client is served
    relay.wait_sessions_closed()
    _stopped_cleanly(relay)


@pytest.mark.parametrize("script", RELAYS)
def test_a_refused_connect_closes_the_client(script: str, start_relay: StartRelay) -> None:
    relay = start_relay(script, closed_port())
    for _ in range(3):
        assert roundtrip(relay.address, b"hello") == b""
    relay.wait_sessions_closed()
    _stopped_cleanly(relay)


def test_raw_relay_holds_a_bounded_amount_while_the_server_does_not_read(
    start_relay: StartRelay,
) -> None:
    """Flow control: with the server not reading, the client's sends stall once the kernel
    buffers on the way are full, the relay's memory does not grow with what the client tries
    to send, and once the server reads, every byte arrives in order (the unsent rest of a
    partial send was kept), then the EOF."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(DEADLINE)
    relay = start_relay("raw_relay.py", listener.getsockname()[1])
    # More than every kernel buffer on the way can take (tcp_rmem max 32 MiB on the relay's
    # client side, tcp_wmem max 4 MiB on its server side, 64 KiB at either end).
    total = 48 * MIB
    payload = os.urandom(total)
    view = memoryview(payload)
    rss_before = relay.rss_kib()
    client = socket.create_connection(relay.address, timeout=DEADLINE)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    server, _ = listener.accept()
    server.settimeout(DEADLINE)
    client.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 4 * DEADLINE
    while sent < total and time.monotonic() < deadline:
        _, writable, _ = select.select([], [client], [], 1.0)
        if not writable:
            break  # stalled for a second: every buffer on the way is full
        try:
            sent += client.send(view[sent : sent + 256 * 1024])
        except BlockingIOError:
            continue
    assert sent < total, "the client was never held back"
    grown_kib = relay.rss_kib() - rss_before
    assert grown_kib < 16 * 1024, f"the relay grew by {grown_kib} KiB holding {sent} bytes"
    client.settimeout(DEADLINE)

    def send_rest() -> None:
        client.sendall(view[sent:])
        client.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send_rest)
    sender.start()
    received = bytearray()
    while chunk := server.recv(1024 * 1024):
        received += chunk
    sender.join(DEADLINE)
    assert len(received) == total
    assert received == payload
    server.close()  # the server's FIN: both ways done, the relay closes the client
    assert client.recv(1) == b""
    client.close()
    listener.close()
    relay.wait_sessions_closed()
    _stopped_cleanly(relay)
