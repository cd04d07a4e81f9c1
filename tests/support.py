"""Test helpers: backends on a private event loop thread, and lbtcp as a real subprocess."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it holds; fail the test with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def roundtrip(
    address: tuple[str, int], payload: bytes, timeout: float = 5.0, *, source: str | None = None
) -> bytes:
    """Send ``payload`` (from ``source``, a 127.x address, if given), half-close, and read
    until EOF. A reset reads as b"": a client that lbtcp closes with bytes still unread in its
    socket gets an RST from the kernel instead of a FIN, so either means "refused" to the
    tests."""
    bind = None if source is None else (source, 0)
    with socket.create_connection(address, timeout=timeout, source_address=bind) as sock:
        chunks = []
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            return b""
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # shutdown() after lbtcp already closed
                raise
            return b""
        return b"".join(chunks)


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port whose connects hang: a listener with backlog 0 whose queue is already full, so
    the kernel drops further SYNs (as a firewall DROP or a dead host would)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
            _, writable, _ = select.select([], [filler], [], 0.2)
            if not writable:  # this handshake did not complete: the queue is full
                break
        else:
            pytest.fail("could not fill the accept queue of the blackhole listener")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def open_session(address: tuple[str, int], probe: bytes = b"x") -> socket.socket:
    """A session through lbtcp to an echo server, proven spliced by one echoed probe."""
    sock = socket.create_connection(address, timeout=5)
    sock.sendall(probe)
    assert sock.recv(len(probe)) == probe
    return sock


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connects are refused)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    sock.close()
    return port


class Echo(asyncio.Protocol):
    """Echo with flow control and half-close, as a well-behaved server would do."""

    def __init__(self, owner: Backends, port_box: list[int]) -> None:
        self.owner = owner
        self.port_box = port_box
        self.transport: asyncio.Transport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.accepted[self.port_box[0]] += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # the loop closes the transport after flushing: the client sees EOF

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


class Tracked(asyncio.Protocol):
    """Hands every callback to a test's own protocol and keeps the transport in
    ``Backends.transports`` until it is lost, whatever the protocol is (a recording server,
    a streams handler), so that ``Backends.close()`` can abort every server connection. A
    transport left open when the loop closes is collected later, in some other test, whose
    run then fails with "unclosed transport" (ResourceWarning, filterwarnings=error)."""

    def __init__(self, owner: Backends, inner: asyncio.Protocol) -> None:
        self.owner = owner
        self.inner = inner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The loop calls this once the accepted socket has its transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.owner.transports.add(transport)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """The loop calls this once, when the transport is closed or aborted."""
        self.owner.transports.discard(self.transport)  # type: ignore[arg-type]
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class Backends:
    """Servers on their own event loop in a thread, so tests can use blocking sockets."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: dict[int, asyncio.AbstractServer] = {}
        self.accepted: collections.Counter[int] = collections.Counter()
        self.transports: set[asyncio.Transport] = set()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, factory: Callable[[list[int]], asyncio.Protocol], port: int = 0) -> int:
        box: list[int] = [0]

        async def make() -> asyncio.AbstractServer:
            return await self.loop.create_server(
                lambda: Tracked(self, factory(box)), "127.0.0.1", port, reuse_address=True
            )

        server = self.call(make())
        box[0] = server.sockets[0].getsockname()[1]
        self.servers[box[0]] = server
        return box[0]

    def echo(self, port: int = 0) -> int:
        return self.start(lambda box: Echo(self, box), port)

    def stream(
        self,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[Any, Any, None]],
    ) -> int:
        """A streams-API server running ``handler`` per connection (as ``start_server``
        builds it, but through ``start`` so that its connections are tracked too)."""
        return self.start(
            lambda _box: asyncio.StreamReaderProtocol(asyncio.StreamReader(), handler)
        )

    def stop(self, port: int) -> None:
        server = self.servers.pop(port)

        async def close() -> None:
            server.close()

        self.call(close())

    def close(self) -> None:
        for port in list(self.servers):
            self.stop(port)

        async def abort_all() -> None:
            # A connection accepted just before its server closed gets its transport a loop
            # turn or two later (in an accept task), and a streams handler may still run: abort
            # until no transport and no other task is left, then cancel what still runs.
            current = asyncio.current_task()
            deadline = self.loop.time() + 2.0
            while True:
                for transport in list(self.transports):
                    transport.abort()
                await asyncio.sleep(0.01)
                others = [task for task in asyncio.all_tasks() if task is not current]
                if not self.transports and not others:
                    return
                if self.loop.time() > deadline:
                    break
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            for transport in list(self.transports):
                transport.abort()
            await asyncio.sleep(0.01)
            assert not self.transports, f"server transports still open: {self.transports}"

        self.call(abort_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Lbtcp:
    """``lbtcp serve CONFIG`` as a subprocess, with its stderr collected line by line."""

    def __init__(
        self,
        config_text: str,
        tmp_path: Path,
        *,
        wait: bool = True,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
        python: str = sys.executable,
    ) -> None:
        """``env`` is added to the environment; ``prefix`` goes before the interpreter (e.g.
        systemd-socket-activate and its options); ``python`` runs ``-m lbtcp``."""
        self.config_path = tmp_path / "lbtcp.toml"
        self.config_path.write_text(config_text)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [*prefix, python, "-m", "lbtcp", "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_line(r"\bstart\b", timeout=15)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        """The first stderr line from index ``start`` matching ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return self.lines[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    output = "\n".join(self.lines[-40:])
                    raise AssertionError(f"no line matching {pattern!r}; stderr:\n{output}")
                self._cond.wait(min(left, 0.1))

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        with self._cond:
            return [line for line in self.lines if regex.search(line)]

    def address(self, listener: str = "web") -> tuple[str, int]:
        line = self.wait_line(
            rf'listening listener={listener} |"kind": "listening", "listener": "{listener}"'
        )
        match = re.search(r'address(?:=|": ")\[?([0-9a-f.:]+?)\]?:(\d+)', line)
        assert match, line
        return match.group(1), int(match.group(2))

    def reload(self, config_text: str, timeout: float = 15.0) -> str:
        """Write a new config file, send SIGHUP, and return the reload's outcome line
        (``reload`` or ``reload_failed``)."""
        with self._cond:
            start = len(self.lines)
        self.config_path.write_text(config_text)
        self.signal(signal.SIGHUP)
        return self.wait_line(
            r' reload(_failed)? msg=|"kind": "reload(_failed)?"', timeout, start=start
        )

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1)) * 1024

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return code

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.wait(10)


def config(
    servers: list[int],
    *,
    listener_extra: str = "",
    pool_extra: str = "",
    global_extra: str = "",
    server_extra: str = "",
    balance: str = "round_robin",
) -> str:
    """A one-listener, one-pool config over 127.0.0.1 servers, bound to a free port."""
    lines = [
        "[global]",
        global_extra,
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        listener_extra,
        "[pools.app]",
        f'balance = "{balance}"',
        pool_extra,
    ]
    for port in servers:
        lines += ["[[pools.app.servers]]", f'address = "127.0.0.1:{port}"', server_extra]
    return "\n".join(lines) + "\n"


class EchoProcess:
    """``lbtcp echo 0 0 ...`` as a subprocess: backends on another core than the test."""

    def __init__(self, count: int, mode: str = "echo") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbtcp", mode, *(["0"] * count)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ports: list[int] = []
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 15
        while len(self.ports) < count:
            line = self.proc.stderr.readline()
            if not line or time.monotonic() > deadline:
                raise AssertionError(f"lbtcp {mode} did not start: {line!r}")
            match = re.search(r"listening on .*:(\d+)", line)
            if match:
                self.ports.append(int(match.group(1)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
