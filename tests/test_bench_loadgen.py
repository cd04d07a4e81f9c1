"""The load generator end to end: real sockets on 127.0.0.1 against real and misbehaving servers.

The servers run on their own event loop in a background thread (the bench runs its own loop
in the main thread, or in subprocesses); each test server's connections are tracked so none
outlives its loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest
import uvloop
from click.testing import CliRunner

from lbtcp.addresses import format_address
from lbtcp.bench.commands import bench as bench_command
from lbtcp.bench.loadgen import BenchResult, BenchSpec, run_bench
from lbtcp.bench.servers import EchoProtocol, SinkProtocol, server_port

DEADLINE = 10.0


# --- test servers -----------------------------------------------------------------------------


class BackgroundServer:
    """A server on a uvloop loop in a daemon thread; ``port`` is valid inside ``with``."""

    def __init__(self, protocol: type[asyncio.BaseProtocol], host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.accepted = 0
        self.reported: list[dict[str, Any]] = []
        self._open: set[asyncio.Transport] = set()
        self._all_closed: asyncio.Event | None = None
        self._factory = self._tracking(protocol)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _tracking(self, base: type[asyncio.BaseProtocol]) -> Callable[[], asyncio.BaseProtocol]:
        server = self

        class Tracked(base):  # type: ignore[valid-type, misc]
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self._tracked = cast(asyncio.Transport, transport)
                server._open.add(self._tracked)
                server.accepted += 1
                super().connection_made(transport)

            def connection_lost(self, exc: Exception | None) -> None:
                server._open.discard(self._tracked)
                if not server._open and server._all_closed is not None:
                    server._all_closed.set()
                super().connection_lost(exc)

        return Tracked

    @property
    def target(self) -> str:
        return format_address(self.host, self.port)

    def _main(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        loop.set_exception_handler(lambda _loop, context: self.reported.append(context))

        async def serve() -> None:
            self._stop = asyncio.Event()
            server = await loop.create_server(self._factory, self.host, 0)
            self.port = server_port(server)
            self._ready.set()
            await self._stop.wait()
            server.close()
            if self._open:
                self._all_closed = asyncio.Event()
                for transport in list(self._open):
                    transport.abort()
                await asyncio.wait_for(self._all_closed.wait(), DEADLINE)

        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        assert self._ready.wait(DEADLINE), "server did not start"
        if self._error is not None:
            raise self._error
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(DEADLINE)
        assert not self._thread.is_alive()
        if exc_type is None:
            assert self._error is None
            assert self.reported == [], self.reported
            assert not self._open


class _Base(asyncio.Protocol):
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]


class CorruptingEcho(_Base):
    """Echoes, but flips one bit of every 1000th byte (the first at byte 500)."""

    def __init__(self) -> None:
        self.seen = 0
        self.next_flip = 500

    def data_received(self, data: bytes) -> None:
        end = self.seen + len(data)
        if self.next_flip < end:
            buf = bytearray(data)
            while self.next_flip < end:
                buf[self.next_flip - self.seen] ^= 0x01
                self.next_flip += 1000
            data = bytes(buf)
        self.seen = end
        self.transport.write(data)


class BlackHole(_Base):
    """Reads and never answers."""

    def data_received(self, data: bytes) -> None:
        pass


class Stalled(_Base):
    """Never reads, so a client's writes back up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Not directly: uvloop 0.23 starts reading after connection_made() returns, undoing a
        # pause_reading() made inside it.
        asyncio.get_running_loop().call_soon(self.transport.pause_reading)


class HalfEchoThenClose(_Base):
    """Echoes half of the first chunk, then closes (FIN)."""

    def data_received(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data[: max(1, len(data) // 2)])
            self.transport.close()


class ResetOnData(_Base):
    """Answers the first bytes with a TCP RST."""

    def data_received(self, data: bytes) -> None:
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class BannerEcho(EchoProtocol):
    """Sends bytes nobody asked for before echoing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._transport.write(b"HELLO\r\n")  # type: ignore[union-attr]


class SlowEcho(_Base):
    """Echoes every chunk 100 ms late: a server that cannot keep up with 100 requests/s."""

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_later(0.1, self._echo, data)

    def _echo(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)


@pytest.fixture
def echo() -> Iterator[BackgroundServer]:
    with BackgroundServer(EchoProtocol) as server:
        yield server


def run(server: BackgroundServer, **options: Any) -> BenchResult:
    """Run the bench in this process against ``server``; the tool itself must not fail."""
    args: dict[str, Any] = {"mode": "rr", "connections": 2, "duration": 0.5, "size": 1024}
    args.update(options)
    spec = BenchSpec(target=server.target, host=server.host, port=server.port, **args)
    result = run_bench(spec)
    assert result.problems == []
    return result


def errors_except(result: BenchResult, kind: str) -> dict[str, int]:
    return {k: n for k, n in result.tally.errors.items() if k != kind and n}


# --- against lbtcp's own backends ---------------------------------------------------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_rr_against_echo(echo: BackgroundServer, loop: str) -> None:
    result = run(echo, connections=4, duration=1.0, loop=loop)
    tally = result.tally
    assert tally.errors_total == 0, tally.errors
    assert tally.requests > 500
    assert tally.sessions == 4
    assert tally.latency_ns.count == tally.requests
    assert 0.9 <= tally.window_s <= 1.5
    # Every completed request's echo was read; at most one message per connection in flight.
    assert tally.requests * 1024 <= tally.bytes_received <= (tally.requests + 4) * 1024
    assert tally.requests * 1024 <= tally.bytes_sent <= (tally.requests + 4) * 1024
    assert 0 < tally.latency_ns.percentile(50) <= tally.latency_ns.max


def test_rr_over_ipv6() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    with BackgroundServer(EchoProtocol, host="::1") as server:
        assert server.target.startswith("[::1]:")
        result = run(server, duration=0.3)
    assert result.tally.errors_total == 0
    assert result.tally.requests > 100


def test_rr_with_large_messages(echo: BackgroundServer) -> None:
    # Bigger than the scratch buffer and the echo's high-water mark: many reads per reply.
    result = run(echo, connections=2, duration=0.5, size=1024 * 1024)
    assert result.tally.errors_total == 0, result.tally.errors
    assert result.tally.requests >= 2


def test_connect_against_echo(echo: BackgroundServer) -> None:
    result = run(echo, mode="connect", connections=4, duration=1.0, size=64)
    tally = result.tally
    assert tally.errors_total == 0, tally.errors
    assert tally.sessions > 100  # sessions/s, over one second
    # Each session is one exchange; at most one per worker was cut off by the end of the run.
    assert 0 <= tally.sessions - tally.requests <= 4
    assert tally.latency_ns.count == tally.requests


def test_stream_against_sink() -> None:
    with BackgroundServer(SinkProtocol) as sink:
        result = run(sink, mode="stream", connections=2, duration=1.0, size=64 * 1024)
    tally = result.tally
    assert tally.errors_total == 0, tally.errors
    assert tally.sessions == 2
    assert tally.bytes_received == 0
    assert tally.bytes_sent * 8 / tally.window_s > 50e6  # over 50 Mbit/s even on a busy box
    assert tally.latency_ns.count == 0


def test_warmup_is_not_counted(echo: BackgroundServer) -> None:
    result = run(echo, warmup=0.5, duration=0.5)
    tally = result.tally
    assert tally.errors_total == 0
    assert tally.requests > 100
    # The kept-open connections were made during the warmup, which is not counted.
    assert tally.sessions == 0
    assert 0.45 <= tally.window_s <= 0.8


# --- open loop ----------------------------------------------------------------------------------


def test_rate_is_respected(echo: BackgroundServer) -> None:
    result = run(echo, connections=4, duration=1.0, rate=200.0)
    assert result.tally.errors_total == 0
    assert 140 <= result.tally.requests <= 260


def test_open_loop_counts_latency_from_the_intended_send_time() -> None:
    """A server that answers in 100 ms cannot do 100 requests/s on one connection: a closed loop
    would report ~100 ms, the open loop reports the queueing delay too (no coordinated
    omission)."""
    with BackgroundServer(SlowEcho) as slow:
        closed = run(slow, connections=1, duration=1.0, size=64)
        opened = run(slow, connections=1, duration=1.0, size=64, rate=100.0)
    closed_p90 = closed.tally.latency_ns.percentile(90) / 1e6
    open_p90 = opened.tally.latency_ns.percentile(90) / 1e6
    assert 95 <= closed_p90 <= 200
    assert open_p90 > 300
    assert opened.tally.requests <= 12  # the server's pace, not the offered rate


# --- errors, by kind ----------------------------------------------------------------------------


def test_mismatch_against_a_corrupting_echo() -> None:
    with BackgroundServer(CorruptingEcho) as bad:
        result = run(bad, size=64)
    tally = result.tally
    assert tally.errors["mismatch"] > 0
    # Byte 500 of each connection is the first flipped: 7 clean 64-byte replies, then one bad.
    assert tally.requests > 0
    assert errors_except(result, "mismatch") == {}


def test_mismatch_on_bytes_nobody_asked_for() -> None:
    with BackgroundServer(BannerEcho) as bad:
        result = run(bad, size=64, duration=0.3)
    assert result.tally.errors["mismatch"] > 0
    assert result.tally.requests == 0


def test_timeout_when_nothing_comes_back() -> None:
    with BackgroundServer(BlackHole) as hole:
        result = run(hole, duration=1.0, timeout=0.2)
    assert result.tally.errors["timeout"] >= 2
    assert result.tally.requests == 0
    assert errors_except(result, "timeout") == {}


def test_stream_timeout_when_the_sink_stops_reading() -> None:
    with BackgroundServer(Stalled) as stalled:
        result = run(stalled, mode="stream", connections=1, duration=1.0, timeout=0.3)
    assert result.tally.errors["timeout"] >= 1
    assert errors_except(result, "timeout") == {}


def test_short_read_when_the_server_closes_early() -> None:
    with BackgroundServer(HalfEchoThenClose) as closer:
        result = run(closer, mode="connect", duration=0.3)
    assert result.tally.errors["short_read"] > 0
    assert result.tally.requests == 0
    assert errors_except(result, "short_read") == {}


def test_reset_when_the_server_resets() -> None:
    with BackgroundServer(ResetOnData) as resetter:
        result = run(resetter, duration=0.3)
    assert result.tally.errors["reset"] > 0
    assert result.tally.requests == 0
    assert errors_except(result, "reset") == {}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.mark.parametrize("mode", ["rr", "connect", "stream"])
def test_refused_on_a_closed_port_via_the_command(mode: str, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        bench_command,
        [
            f"127.0.0.1:{_closed_port()}",
            "--mode",
            mode,
            "-d",
            "300ms",
            "-c",
            "2",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None
    report = json.loads(out.read_text())
    assert report["errors"]["refused"] > 0
    assert report["errors_total"] == report["errors"]["refused"]
    assert report["requests"] == 0
    assert "refused" in result.stdout


# --- the command ----------------------------------------------------------------------------------

DOCUMENTED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "mode": str,
    "target": str,
    "address": str,
    "connections": int,
    "processes": int,
    "size_bytes": int,
    "rate": (float, type(None)),
    "warmup_s": float,
    "duration_s": float,
    "requests": int,
    "requests_per_s": float,
    "sessions": int,
    "sessions_per_s": float,
    "bytes_sent": int,
    "bytes_received": int,
    "throughput_gbps": float,
    "sent_gbps": float,
    "received_gbps": float,
    "errors": dict,
    "errors_total": int,
    "latency_ms": dict,
}


def test_json_report_has_every_documented_field(echo: BackgroundServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = CliRunner().invoke(
        bench_command,
        [echo.target, "--duration", "300ms", "--size", "1KiB", "-c", "3", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert set(report) == set(DOCUMENTED_FIELDS)
    for name, kind in DOCUMENTED_FIELDS.items():
        assert isinstance(report[name], kind), name
    assert set(report["errors"]) == {
        "refused",
        "reset",
        "timeout",
        "short_read",
        "mismatch",
        "other",
    }
    assert set(report["latency_ms"]) == {
        "p50",
        "p90",
        "p99",
        "p99_9",
        "max",
        "min",
        "mean",
        "count",
    }
    assert report["mode"] == "rr"
    assert report["target"] == echo.target
    assert report["connections"] == 3
    assert report["size_bytes"] == 1024
    assert report["errors_total"] == 0
    assert report["requests"] > 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99_9"]
    assert latency["p99_9"] <= latency["max"]
    # The text report says the same.
    assert f"{report['requests']} total" in result.stdout
    assert "p99.9" in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["127.0.0.1"],
        ["127.0.0.1:9", "--mode", "udp"],
        ["127.0.0.1:9", "--size", "1 parsec"],
        ["127.0.0.1:9", "--size", "0"],
        ["127.0.0.1:9", "--duration", "soon"],
        ["127.0.0.1:9", "--duration", "0"],
        ["127.0.0.1:9", "--connections", "0"],
        ["127.0.0.1:9", "--rate", "-5"],
        ["127.0.0.1:9", "--mode", "stream", "--rate", "100"],
        ["127.0.0.1:9", "--timeout", "0s"],
    ],
)
def test_bad_arguments_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def _bench_process(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # Development mode: unclosed transports would show as ResourceWarnings on stderr.
        [sys.executable, "-X", "dev", "-m", "lbtcp.bench", "bench", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_processes_merge_their_results(echo: BackgroundServer, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    proc = _bench_process(echo.target, "-p", "2", "-c", "4", "-d", "1s", "--json", str(out))
    try:
        stdout, stderr = proc.communicate(timeout=DEADLINE + 10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    report = json.loads(out.read_text())
    assert report["processes"] == 2
    assert report["connections"] == 4
    assert report["errors_total"] == 0
    assert report["requests"] > 200
    assert report["latency_ms"]["count"] == report["requests"]
    assert report["sessions"] == 4  # both processes' connections are in the merged report
    assert 0.9 <= report["duration_s"] <= 1.6
    assert b"2 processes" in stdout
    assert b"Warning" not in stderr


@pytest.mark.parametrize(("processes", "sig"), [("1", signal.SIGINT), ("2", signal.SIGTERM)])
def test_a_signal_ends_the_run_early_with_a_report(
    echo: BackgroundServer, processes: str, sig: int
) -> None:
    started = time.monotonic()
    proc = _bench_process(echo.target, "-p", processes, "-c", "2", "-d", "60s", "-q")
    try:
        # Wait for the load to reach the server: then the bench's handlers are installed.
        deadline = time.monotonic() + DEADLINE
        while echo.accepted < 2:
            assert time.monotonic() < deadline, "the bench never connected"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)  # polling a condition with a deadline
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert time.monotonic() - started < 30
    assert b"requests" in stdout
    assert b"Traceback" not in stderr
    assert b"Warning" not in stderr
