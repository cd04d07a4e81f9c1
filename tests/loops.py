"""The ``run`` fixture of the in-process socket tests (relay, PROXY accept): each test runs on
a fresh asyncio loop and a fresh uvloop, and fails if the loop's exception handler was called
(as uvloop's own test base does). A module imports it as ``from tests.loops import run``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from tests.proxy_support import Recorder

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Callable[[Coroutine[Any, Any, None]], None]]:
    loop = LOOPS[request.param]()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def run_coro(coro: Coroutine[Any, Any, None]) -> None:
        loop.run_until_complete(asyncio.wait_for(coro, 60))

    yield run_coro
    leftover = Recorder.OPEN.pop(loop, set())
    for transport in leftover:
        transport.abort()
    if leftover:
        loop.run_until_complete(asyncio.sleep(0.01))  # abort() loses them on the next turn
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    assert not errors, f"the loop's exception handler was called: {errors}"
