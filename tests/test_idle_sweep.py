"""The listener's shared idle sweep, in virtual time: every session is closed (CI) no sooner
than its idle_timeout after its last byte and no later than two sweep steps after that (the
bound a timer per session had), sessions without a timeout are never touched, and the timer
stops when nothing is left to watch."""

from __future__ import annotations

import asyncio
import heapq
import io
from collections.abc import Callable
from typing import Any

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import ListenerConfig, PoolConfig, ServerConfig
from lbtcp.listener import Listener
from lbtcp.log import Log
from lbtcp.pool import Pool
from lbtcp.relay import TERM_IDLE, TERM_NORMAL, Session, idle_step


class FakeHandle:
    def __init__(self, loop: FakeLoop, when: float) -> None:
        self.loop = loop
        self.when = when
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just what the sweep and a session use: a clock and call_at."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, int, FakeHandle, Callable[[], None]]] = []
        self.seq = 0
        self.errors: list[dict[str, Any]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(self, when)
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, handle, callback))
        return handle

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        self.errors.append(context)

    def live_timers(self) -> int:
        return sum(1 for _, _, handle, _ in self.timers if not handle.cancelled)

    def run_until(self, end: float, hook: Callable[[float], None]) -> None:
        """Run timers in order up to ``end``. ``hook(t)`` applies the test's own events up
        to ``t`` and returns; it runs before each timer and once more at ``end``; events may
        start timers, so the queue is looked at again after every hook."""
        while True:
            hook(self.timers[0][0] if self.timers else end)
            if not self.timers or self.timers[0][0] > end:
                break
            when, _, handle, callback = heapq.heappop(self.timers)
            if handle.cancelled:
                continue
            self.now = when
            callback()
        hook(end)
        self.now = end


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


def make_listener(loop: FakeLoop) -> Listener:
    pool = Pool.from_config(PoolConfig(name="app", servers=(ServerConfig(address="127.0.0.1:9"),)))
    config = ListenerConfig(name="web", bind=("127.0.0.1:0",), pool="app")
    return Listener(config, pool, Log("text", False, io.StringIO()), loop)  # type: ignore[arg-type]


def add_session(listener: Listener, loop: FakeLoop, timeout: float) -> Session:
    session = Session(listener, loop)  # type: ignore[arg-type]
    session.client = FakeTransport()  # type: ignore[assignment]
    session.idle_timeout = timeout
    listener.sessions.add(session)
    server = next(iter(listener.pool.servers.values()))
    session.attach_upstream(FakeTransport(), server)  # type: ignore[arg-type]
    return session


# A session: its timeout (0 = none), when it starts, and when bytes move through it.
session_plans = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.05, 0.3, 1.0, 7.0, 60.0]),
        st.floats(min_value=0.0, max_value=5.0),
        st.lists(st.floats(min_value=0.0, max_value=20.0), max_size=5),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(session_plans)
def test_every_idle_session_closes_within_its_bound(plans: list[Any]) -> None:
    loop = FakeLoop()
    listener = make_listener(loop)
    # Events in time order: start a session, or move a byte through one.
    events: list[tuple[float, int, str]] = []
    for index, (_, start, activity) in enumerate(plans):
        events.append((start, index, "start"))
        events.extend((start + offset, index, "byte") for offset in activity)
    events.sort()
    sessions: dict[int, Session] = {}
    last_byte: dict[int, float] = {}
    closed_at: dict[int, float] = {}
    end = 100.0

    def hook(t: float) -> None:
        # First note what the timer that just fired (at loop.now) closed, then apply every
        # event up to t (before the timer at t fires).
        for index, session in sessions.items():
            if session.term == TERM_IDLE and index not in closed_at:
                closed_at[index] = loop.now
                listener.sessions.discard(session)  # as connection_lost -> _finish would
        while events and events[0][0] <= t:
            if loop.timers and loop.timers[0][0] < events[0][0]:
                return  # a timer comes first: the driver fires it, then asks again
            when, index, kind = events.pop(0)
            loop.now = max(loop.now, when)
            if kind == "start":
                sessions[index] = add_session(listener, loop, plans[index][0])
                last_byte[index] = loop.now
            elif index in sessions and sessions[index].term == TERM_NORMAL:
                sessions[index].bytes_from_client += 1
                last_byte[index] = loop.now

    loop.run_until(end, hook)
    for index, (timeout, _, _) in enumerate(plans):
        session = sessions[index]
        if timeout == 0.0:
            assert session.term == TERM_NORMAL, "a session without idle_timeout was closed"
            continue
        assert index in closed_at, f"session {index} (timeout {timeout}) never closed"
        idle_for = closed_at[index] - last_byte[index]
        assert idle_for >= timeout - 1e-9, (timeout, idle_for)
        assert idle_for <= timeout + 2 * idle_step(timeout) + 1e-9, (timeout, idle_for)
    assert not loop.errors
    # Nothing left to watch: the sweep stopped instead of waking up forever.
    assert loop.live_timers() == 0


def test_a_shorter_timeout_brings_the_sweep_forward() -> None:
    loop = FakeLoop()
    listener = make_listener(loop)
    add_session(listener, loop, 3600.0)
    assert loop.live_timers() == 1
    first_due = min(when for when, _, h, _ in loop.timers if not h.cancelled)
    assert first_due == idle_step(3600.0)
    short = add_session(listener, loop, 0.4)
    due = min(when for when, _, h, _ in loop.timers if not h.cancelled)
    assert due == idle_step(0.4)
    assert loop.live_timers() == 1  # still one timer for the listener
    loop.run_until(0.4 + 2 * idle_step(0.4), lambda t: None)
    assert short.term == TERM_IDLE


@pytest.mark.parametrize("new_loop", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_real_loop_closes_an_idle_session(
    new_loop: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """The sweep on a real loop (asyncio's and uvloop's timers), not only on the fake one."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listener = make_listener(loop)  # type: ignore[arg-type]
        session = add_session(listener, loop, 0.08)  # type: ignore[arg-type]
        start = loop.time()
        while session.term != TERM_IDLE:
            assert loop.time() - start < 2.0, "idle session not closed"
            await asyncio.sleep(0.01)
        assert loop.time() - start >= 0.08

    loop = new_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert not errors
