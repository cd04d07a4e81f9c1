"""The listener's one inspect timer for all its routing sessions, in virtual time: every
session still inspecting is routed to the default pool exactly at its inspect_timeout (never
before, never later), sessions that got their verdict are never touched, one timer at most is
armed, and a reload that shortens the timeout keeps the bound for the new clients."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st

from lbtcp.config import ListenerConfig, PoolConfig, ServerConfig
from lbtcp.listener import Listener
from lbtcp.log import Log
from lbtcp.pool import Pool
from lbtcp.proxy_accept import RoutingSession


@dataclass
class Handle:
    when: float
    callback: Any
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeLoop:
    """The clock and the timers a listener uses, advanced by hand."""

    now: float = 0.0
    handles: list[Handle] = field(default_factory=list)

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Any) -> Handle:
        handle = Handle(when, callback)
        self.handles.append(handle)
        return handle

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        raise AssertionError(context)

    def armed(self) -> list[Handle]:
        return [handle for handle in self.handles if not handle.cancelled]

    def advance(self, to: float) -> None:
        """Run every due timer in time order, as a loop would, up to ``to``."""
        while True:
            due = [h for h in self.armed() if h.when <= to]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self.now = max(self.now, handle.when)
            handle.cancelled = True
            handle.callback()
        self.now = to


class FakeSession:
    """What the listener's queue sees of a RoutingSession."""

    def __init__(self, loop: FakeLoop) -> None:
        self.loop = loop
        self.inspecting = True
        self.expired_at: float | None = None

    def inspect_expired(self) -> None:
        assert self.inspecting, "a session with a verdict was timed out"
        self.inspecting = False
        self.expired_at = self.loop.now


def listener(loop: FakeLoop, timeout: float) -> Listener:
    pool = Pool.from_config(PoolConfig(name="app", servers=(ServerConfig(address="127.0.0.1:9"),)))
    config = ListenerConfig(name="web", bind=("127.0.0.1:0",), pool="app", inspect_timeout=timeout)
    return Listener(config, pool, Log("text", False), cast(Any, loop))


# Each step: the time to the next arrival, and after how long that client's hello completes
# (None: it stalls).
steps = st.lists(
    st.tuples(
        st.floats(0.0, 2.0),
        st.one_of(st.none(), st.floats(0.0, 5.0)),
    ),
    min_size=1,
    max_size=40,
)


@given(steps, st.floats(0.05, 3.0))
def test_every_stalled_session_expires_exactly_at_its_timeout(
    arrivals: list[tuple[float, float | None]], timeout: float
) -> None:
    loop = FakeLoop()
    owner = listener(loop, timeout)
    sessions: list[tuple[float, float | None, FakeSession]] = []
    verdicts: list[tuple[float, FakeSession]] = []
    for gap, completes_after in arrivals:
        arrive = loop.now + gap
        # Verdicts that happen before this arrival, in time order, with the timer running.
        for at, session in sorted(verdicts, key=lambda v: v[0]):
            if at <= arrive:
                loop.advance(max(at, loop.now))
                if session.inspecting:
                    session.inspecting = False
        verdicts = [(at, s) for at, s in verdicts if at > arrive]
        loop.advance(arrive)
        session = FakeSession(loop)
        owner.inspect_started(cast(RoutingSession, session))
        assert len(loop.armed()) == 1  # one timer for the listener, whatever the count
        sessions.append((arrive, completes_after, session))
        if completes_after is not None:
            verdicts.append((arrive + completes_after, session))
    for at, session in sorted(verdicts, key=lambda v: v[0]):
        loop.advance(max(at, loop.now))
        if session.inspecting:
            session.inspecting = False
    loop.advance(loop.now + timeout + 1.0)
    for arrive, completes_after, session in sessions:
        if completes_after is not None and completes_after < timeout:
            assert session.expired_at is None  # its hello came in time: left alone
        elif completes_after is None:
            assert session.expired_at == arrive + timeout
        else:  # the hello and the deadline race; either may win, but never later
            assert session.expired_at in (None, arrive + timeout)
    assert not owner.awaiting_header
    assert not loop.armed()  # nothing left to wait for: no timer
    assert not owner.inspecting


def test_a_reload_that_shortens_the_timeout_keeps_the_new_bound() -> None:
    loop = FakeLoop()
    owner = listener(loop, 3.0)
    slow = FakeSession(loop)
    owner.inspect_started(cast(RoutingSession, slow))
    owner.config = ListenerConfig(
        name="web", bind=("127.0.0.1:0",), pool="app", inspect_timeout=0.5
    )
    loop.advance(0.1)
    quick = FakeSession(loop)
    owner.inspect_started(cast(RoutingSession, quick))
    assert len(loop.armed()) == 1
    loop.advance(1.0)
    assert quick.expired_at == 0.6 and slow.inspecting
    loop.advance(5.0)
    assert slow.expired_at == 3.0


def test_finished_sessions_are_dropped_from_the_head_on_the_next_arrival() -> None:
    loop = FakeLoop()
    owner = listener(loop, 3.0)
    for _ in range(100):
        session = FakeSession(loop)
        owner.inspect_started(cast(RoutingSession, session))
        session.inspecting = False  # its hello arrived whole, at once
        loop.advance(loop.now + 0.001)
    assert len(owner.inspecting) == 1  # only the last one, not 100 held for 3 s
