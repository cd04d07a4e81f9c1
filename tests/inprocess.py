"""A whole ``Runtime`` on the test's own event loop, for tests that read its counters directly.

The runtime runs exactly as ``lbtcp serve`` runs it (``Runtime.run``: listeners, probes, the
health timers), on uvloop like the real thing, with real sockets on 127.0.0.1; the clients and
the echo backends are asyncio protocols on the same loop. Any exception that reaches the loop's
exception handler fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar, cast

import uvloop

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from lbtcp.config import parse_config
from lbtcp.log import Log
from lbtcp.runtime import Runtime

T = TypeVar("T")


class EventLog(Log):
    """A Log that remembers its event lines and lets a test wait for one."""

    def __init__(self) -> None:
        super().__init__("text", access_log=False, stream=io.StringIO())
        self.events: list[tuple[str, dict[str, object]]] = []
        self._changed = asyncio.Event()

    def event(self, kind: str, message: str = "", **fields: object) -> None:
        self.events.append((kind, {"msg": message, **fields}))
        self._changed.set()
        super().event(kind, message, **fields)

    async def wait(self, kind: str, timeout: float = 10.0, **match: object) -> dict[str, object]:
        """The first event of ``kind`` whose fields include ``match``."""
        deadline = time.monotonic() + timeout
        while True:
            for seen, fields in self.events:
                if seen == kind and all(fields.get(k) == v for k, v in match.items()):
                    return fields
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} event {match} in {self.events[-10:]}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


LOOPS = ("uvloop", "asyncio")


def run(coro: Coroutine[Any, Any, T], loop: str = "uvloop") -> T:
    """Run ``coro`` on a fresh event loop (uvloop, as ``lbtcp serve`` does, or asyncio's
    own); fail if the loop's exception handler was called."""
    errors: list[dict[str, Any]] = []

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        try:
            return await coro
        finally:
            # Also when the test failed: a server left open makes uvloop's close hang under
            # pytest (its ResourceWarning is an error there) instead of reporting the failure.
            while _SERVERS:
                server = _SERVERS.pop()
                server.close()
                await server.wait_closed()
            for _ in range(100):  # bounded: abort() loses the connection on the next turn
                if not _CONNECTIONS:
                    break
                for transport in list(_CONNECTIONS):
                    transport.abort()
                await asyncio.sleep(0.01)

    result = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    assert not errors, f"the loop's exception handler was called: {errors}"
    return result


@contextlib.asynccontextmanager
async def running(config_text: str) -> AsyncIterator[tuple[Runtime, EventLog]]:
    """A runtime serving ``config_text`` until the block ends (then stopped at once)."""
    config = parse_config(tomllib.loads(config_text), source="inprocess.toml")
    log = EventLog()
    runtime = Runtime(config, log)
    task = asyncio.get_running_loop().create_task(runtime.run())
    try:
        await log.wait("start")
        yield runtime, log
    finally:
        runtime.request_stop("now")
        assert await asyncio.wait_for(task, 10) == 0


class Echo(asyncio.Protocol):
    """Echoes every byte and honours half-close (a FIN back after the client's)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        _CONNECTIONS.add(self.transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close after flushing: the client reads EOF

    def connection_lost(self, exc: Exception | None) -> None:
        _CONNECTIONS.discard(self.transport)


_SERVERS: list[asyncio.AbstractServer] = []
# Echo connections still open when a test ends: ``run`` aborts them before the loop closes,
# or the GC finds them in a later test ("unclosed transport", an error under pytest).
_CONNECTIONS: set[asyncio.Transport] = set()


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    """An echo server on 127.0.0.1; ``run`` closes it at the end if the test did not."""
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", 0)
    _SERVERS.append(server)
    return server, int(server.sockets[0].getsockname()[1])


def listener_address(runtime: Runtime, name: str = "web") -> tuple[str, int]:
    host, _, port = runtime.listeners[name].addresses[0].rpartition(":")
    return host.strip("[]"), int(port)


async def exchange(address: tuple[str, int], payload: bytes, timeout: float = 10.0) -> bytes:
    """``_exchange`` bounded by ``timeout``: a test fails rather than hangs."""
    return await asyncio.wait_for(_exchange(address, payload), timeout)


async def _exchange(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, half-close, read to EOF. A reset (or a close before the half-close)
    reads as what arrived before it: the tests' way to see a refusal."""
    reader, writer = await asyncio.open_connection(*address)
    chunks = []
    try:
        writer.write(payload)
        writer.write_eof()
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    except (ConnectionResetError, BrokenPipeError):
        pass
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:  # write_eof() after lbtcp already closed
            raise
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the close of a refused client reports its error
            await writer.wait_closed()
    return b"".join(chunks)


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` on the loop until it holds; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
