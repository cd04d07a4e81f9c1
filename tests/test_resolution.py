"""Name resolution: the pure parts with hypothesis, the watcher against a real DNS server.

The DNS tests run dnsmasq on 127.0.0.1 (``tests/dns_server.py``) and talk to it through
aiodns/c-ares, nothing mocked. Real waits are kept short with TTLs of 1 s and stale windows
of 1.5-2.5 s; time-sensitive assertions measure intervals on the loop clock instead of
sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pycares
import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import ResolverConfig
from lbtcp.resolution import (
    EMPTY,
    MAX_SERVER_WEIGHT,
    MIN_REFRESH,
    AioDnsResolver,
    Answer,
    DnsChanged,
    DnsEvent,
    DnsFailure,
    DnsRecovered,
    DnsWatcher,
    EntryFailed,
    EntryRecovered,
    EntryState,
    RecordEntry,
    RecordSet,
    RecordType,
    ResolvedTarget,
    ResolveError,
    RetryPolicy,
    SrvRecord,
    StaticResolver,
    address_targets,
    backoff_delay,
    clamp_ttl,
    diff_targets,
    map_srv_weight,
    srv_to_targets,
)
from tests.dns_server import Dnsmasq, DnsServerFactory, dns_servers, free_port

__all__ = ["dns_servers"]  # the fixture, imported for pytest to find

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
Runner = Callable[[Coroutine[Any, Any, None]], None]


@contextlib.contextmanager
def _runner(kind: str) -> Iterator[Runner]:
    loop = LOOPS[kind]()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    def run(coro: Coroutine[Any, Any, None]) -> None:
        loop.run_until_complete(asyncio.wait_for(coro, 30))

    try:
        yield run
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    assert not errors, f"the loop's exception handler was called: {errors}"


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """Run a coroutine on asyncio and on uvloop (aiodns must work on both)."""
    with _runner(request.param) as runner:
        yield runner


@pytest.fixture
def run_asyncio() -> Iterator[Runner]:
    """Run a coroutine on asyncio only (for the slower timing tests)."""
    with _runner("asyncio") as runner:
        yield runner


class Recorder:
    """Collects the watcher's callbacks with their loop times."""

    def __init__(self) -> None:
        self.changes: list[tuple[float, str, tuple[ResolvedTarget, ...]]] = []
        self.events: list[tuple[float, DnsEvent]] = []

    def on_change(self, key: str, targets: tuple[ResolvedTarget, ...]) -> None:
        self.changes.append((asyncio.get_running_loop().time(), key, targets))

    def on_event(self, event: DnsEvent) -> None:
        self.events.append((asyncio.get_running_loop().time(), event))

    def of(self, kind: type[Any]) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.events if isinstance(e, kind)]

    def watcher(self, config: ResolverConfig, **kwargs: Any) -> DnsWatcher:
        return DnsWatcher(config, on_change=self.on_change, on_event=self.on_event, **kwargs)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` on the loop until it holds; return the loop time it first held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time()


def hosts_of(targets: tuple[ResolvedTarget, ...]) -> set[str]:
    return {t.host for t in targets}


def config_for(server: Dnsmasq, **kwargs: Any) -> ResolverConfig:
    values: dict[str, Any] = {
        "nameservers": (server.nameserver,),
        "timeout": 1.0,
        "min_ttl": 1.0,
        "max_ttl": 60.0,
        "stale_for": 2.0,
        "family": "ipv4",
    }
    values.update(kwargs)
    return ResolverConfig(**values)


# ============================================================================================
# Pure parts
# ============================================================================================

finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(ttl=finite, low=finite, high=finite)
def test_clamp_ttl_stays_within_bounds(ttl: float, low: float, high: float) -> None:
    low, high = min(low, high), max(low, high)
    kept = clamp_ttl(ttl, low, high)
    assert low <= kept <= high
    if low <= ttl <= high:
        assert kept == ttl


def test_clamp_ttl_examples() -> None:
    assert clamp_ttl(2, 5, 300) == 5  # a short TTL is held for min_ttl
    assert clamp_ttl(86400, 1, 300) == 300  # a long one is refreshed after max_ttl
    assert clamp_ttl(60, 1, 300) == 60
    assert clamp_ttl(0, 1, 300) == 1


@given(
    base=st.floats(min_value=0.01, max_value=10),
    cap=st.floats(min_value=0.01, max_value=300),
    failures=st.integers(min_value=1, max_value=500),
)
def test_backoff_doubles_up_to_the_cap(base: float, cap: float, failures: int) -> None:
    delay = backoff_delay(failures, base=base, cap=cap)
    following = backoff_delay(failures + 1, base=base, cap=cap)
    assert min(base, cap) <= delay <= cap
    assert following >= delay
    assert following == pytest.approx(min(cap, 2 * delay))


def test_backoff_schedule_and_policy_caps() -> None:
    assert [backoff_delay(n, base=1.0, cap=30.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    with pytest.raises(ValueError, match="from 1"):
        backoff_delay(0, base=1.0, cap=30.0)
    assert RetryPolicy.for_config(ResolverConfig()) == RetryPolicy(base=1.0, cap=30.0)
    # A max_ttl below 30 s caps the retries too: never wait longer than an answer may live.
    assert RetryPolicy.for_config(ResolverConfig(max_ttl=5.0)) == RetryPolicy(1.0, 5.0)
    assert RetryPolicy.for_config(ResolverConfig(min_ttl=0.2, max_ttl=0.5)).cap == 0.5


def _target(name: str, weight: int, backup: bool) -> ResolvedTarget:
    return ResolvedTarget(f"10.0.0.{len(name)}", 80, weight, backup, name)


targets_strategy = st.dictionaries(
    st.sampled_from([f"s{i}" for i in range(8)]),
    st.tuples(st.integers(0, 3), st.booleans()),
).map(lambda d: [_target(n, w, b) for n, (w, b) in d.items()])


@given(old=targets_strategy, new=targets_strategy)
def test_diff_applied_to_old_gives_new(
    old: list[ResolvedTarget], new: list[ResolvedTarget]
) -> None:
    diff = diff_targets(old, new)
    result = {t.name: t for t in old}
    for t in diff.removed:
        assert result.pop(t.name) == t
    for t in diff.added:
        assert t.name not in result
        result[t.name] = t
    for t in diff.updated:
        assert result[t.name] != t
        result[t.name] = t
    assert result == {t.name: t for t in new}
    assert bool(diff) == ({t.name: t for t in old} != {t.name: t for t in new})


def test_map_srv_weight_examples() -> None:
    assert map_srv_weight(0, 0) == 1  # all-zero group: equal shares
    assert map_srv_weight(30, 30) == MAX_SERVER_WEIGHT
    assert map_srv_weight(10, 30) == 85
    assert map_srv_weight(0, 100) == 1  # weight 0 beside others: a very small share
    assert map_srv_weight(65535, 65535) == 256
    assert map_srv_weight(1, 65535) == 1


srv_strategy = st.lists(
    st.builds(
        SrvRecord,
        priority=st.integers(0, 3),
        weight=st.one_of(st.integers(0, 5), st.integers(0, 65535)),
        port=st.integers(1, 3),
        target=st.sampled_from(["a.test", "b.test", "c.test", "."]),
    ),
    max_size=10,
)
ADDRESSES = {"a.test": ("10.0.0.1",), "b.test": ("10.0.0.2", "fd00::2"), "c.test": ()}


@given(records=srv_strategy)
def test_srv_mapping_properties(records: list[SrvRecord]) -> None:
    targets = srv_to_targets(records, ADDRESSES)
    usable: dict[tuple[str, int], SrvRecord] = {}
    for r in records:
        if r.target == ".":
            continue
        seen = usable.get((r.target, r.port))
        if seen is None or (r.priority, -r.weight) < (seen.priority, -seen.weight):
            usable[(r.target, r.port)] = r
    expected_names = {
        f"{r.target}:{r.port}#{ip}" for r in usable.values() for ip in ADDRESSES[r.target]
    }
    assert {t.name for t in targets} == expected_names
    assert len(targets) == len(expected_names)
    if not usable:
        return
    lowest = min(r.priority for r in usable.values())
    group_max: dict[int, int] = {}
    for r in usable.values():
        group_max[r.priority] = max(group_max.get(r.priority, 0), r.weight)
    by_name = {t.name: t for t in targets}
    for r in usable.values():
        for ip in ADDRESSES[r.target]:
            t = by_name[f"{r.target}:{r.port}#{ip}"]
            assert t.host == ip and t.port == r.port
            assert 1 <= t.weight <= MAX_SERVER_WEIGHT
            assert t.backup == (r.priority != lowest)
            if r.weight == group_max[r.priority]:
                assert t.weight == (MAX_SERVER_WEIGHT if r.weight else 1)
    for a in usable.values():  # the order of weights within a priority is kept
        for b in usable.values():
            if a.priority == b.priority and a.weight < b.weight:
                wa = map_srv_weight(a.weight, group_max[a.priority])
                wb = map_srv_weight(b.weight, group_max[b.priority])
                assert wa <= wb


def test_srv_override_and_backup_flags() -> None:
    records = [SrvRecord(10, 5, 80, "a.test"), SrvRecord(20, 7, 81, "b.test")]
    targets = srv_to_targets(records, ADDRESSES, weight_override=3, backup=True)
    assert {t.weight for t in targets} == {3}
    assert all(t.backup for t in targets)
    assert srv_to_targets([SrvRecord(0, 0, 0, ".")], ADDRESSES) == ()


def test_address_targets_names_and_order() -> None:
    targets = address_targets("db.internal", 5432, 4, False, ["fd00::1", "10.0.0.3", "10.0.0.1"])
    assert [t.name for t in targets] == [
        "db.internal:5432#10.0.0.1",
        "db.internal:5432#10.0.0.3",
        "db.internal:5432#fd00::1",
    ]
    assert all(t.weight == 4 and not t.backup and t.port == 5432 for t in targets)


RECORD_SETS = [
    RecordSet.of(["10.0.0.1"]),
    RecordSet.of(["10.0.0.2", "10.0.0.1"]),
    RecordSet.of(["10.0.0.3"]),
]
step_strategy = st.tuples(
    st.floats(min_value=0, max_value=12, allow_nan=False),
    st.one_of(
        st.tuples(st.just("answer"), st.integers(0, 2), st.floats(0, 1000)),
        st.tuples(
            st.just("error"),
            st.sampled_from(["timeout", "servfail", "nxdomain", "unreachable", "nodata"]),
            st.just(0.0),
        ),
        st.tuples(st.just("empty"), st.just(0), st.just(0.0)),
        st.tuples(st.just("tick"), st.just(0), st.just(0.0)),
    ),
)


@settings(max_examples=300)
@given(
    steps=st.lists(step_strategy, max_size=40),
    stale_for=st.floats(min_value=0, max_value=20),
    min_ttl=st.floats(min_value=0, max_value=10),
    span=st.floats(min_value=0, max_value=100),
    empty_is_failure=st.booleans(),
)
def test_entry_follows_the_stale_model(
    steps: list[tuple[float, tuple[str, Any, float]]],
    stale_for: float,
    min_ttl: float,
    span: float,
    empty_is_failure: bool,
) -> None:
    """Against a plain model: what is served when, and one failure event per episode."""
    max_ttl = min_ttl + span
    retry = RetryPolicy(base=1.0, cap=30.0)
    entry = RecordEntry(
        min_ttl=min_ttl,
        max_ttl=max_ttl,
        stale_for=stale_for,
        retry=retry,
        empty_is_failure=empty_is_failure,
    )
    assert entry.query_due(0.0)
    now = 0.0
    served = EMPTY
    failing_since: float | None = None
    failures = episodes = recoveries = 0
    seen_failed = seen_recovered = 0

    def expire() -> None:
        nonlocal served
        if failing_since is not None and now >= failing_since + stale_for:
            served = EMPTY

    for dt, (action, arg, ttl) in steps:
        now += dt
        before = entry.records
        expire()
        if action == "tick":
            update = entry.on_timer(now)
            kind = "tick"
        elif action == "answer":
            update = entry.on_answer(RECORD_SETS[arg], ttl, now)
            kind = "good"
        elif action == "empty" or arg == "nodata":
            if action == "empty":
                update = entry.on_answer(EMPTY, 5.0, now)
            else:
                update = entry.on_error("nodata", "no data", now)
            kind = "bad" if (empty_is_failure or served) else "good-empty"
        else:
            update = entry.on_error(arg, "failed", now)
            kind = "bad"

        if kind in ("good", "good-empty"):
            if failing_since is not None:
                recoveries += 1
            failing_since = None
            failures = 0
            served = RECORD_SETS[arg] if kind == "good" else EMPTY
            refresh = clamp_ttl(ttl, min_ttl, max_ttl) if kind == "good" else None
            if refresh is not None:
                assert entry.next_query_at - now == pytest.approx(max(MIN_REFRESH, refresh))
        elif kind == "bad":
            had = served
            if failing_since is None:
                failing_since = now
                episodes += 1
                failed = [e for e in update.events if isinstance(e, EntryFailed)]
                assert len(failed) == 1
                assert failed[0].stale_until == (now + stale_for if had else None)
            failures += 1
            expected_delay = max(MIN_REFRESH, retry.delay(failures))
            assert entry.next_query_at - now == pytest.approx(expected_delay)
            expire()

        assert entry.records == served, (entry, served)
        assert update.changed == (entry.records != before)
        assert entry.state in (
            (EntryState.STALE, EntryState.DOWN)
            if failing_since is not None
            else (EntryState.UP, EntryState.STARTING)
        )
        seen_failed += sum(isinstance(e, EntryFailed) for e in update.events)
        seen_recovered += sum(isinstance(e, EntryRecovered) for e in update.events)
        assert (seen_failed, seen_recovered) == (episodes, recoveries)
        if entry.state is EntryState.STALE:
            assert entry.next_deadline() <= failing_since + stale_for  # type: ignore[operator]


def test_entry_start_up_failure_keeps_nothing_and_retries_with_backoff() -> None:
    entry = RecordEntry(min_ttl=1, max_ttl=300, stale_for=300, retry=RetryPolicy())
    update = entry.on_error("timeout", "no answer", 0.0)
    assert entry.records == EMPTY and entry.state is EntryState.DOWN
    assert update.events == (EntryFailed("timeout", "no answer", 0.0, None),)
    assert entry.next_query_at == 1.0
    assert entry.on_error("timeout", "no answer", 1.0).events == ()  # same episode
    assert entry.next_query_at == 3.0
    update = entry.on_answer(RECORD_SETS[0], 60, 3.5)
    assert update.changed and entry.records == RECORD_SETS[0]
    assert update.events == (EntryRecovered(failed_since=0.0, at=3.5),)
    assert entry.next_query_at == 63.5


def test_entry_with_stale_for_zero_drops_at_once() -> None:
    entry = RecordEntry(min_ttl=1, max_ttl=300, stale_for=0, retry=RetryPolicy())
    entry.on_answer(RECORD_SETS[1], 10, 0.0)
    update = entry.on_error("servfail", "SERVFAIL", 10.0)
    assert update.changed and entry.records == EMPTY and entry.state is EntryState.DOWN


def test_entry_empty_answer_is_normal_only_when_nothing_would_be_lost() -> None:
    # The AAAA entry of an IPv4-only name under family "any".
    entry = RecordEntry(
        min_ttl=1, max_ttl=300, stale_for=5, retry=RetryPolicy(), empty_is_failure=False
    )
    update = entry.on_error("nodata", "no data", 0.0)
    assert update.events == () and entry.state is EntryState.UP
    assert entry.next_query_at == 30.0  # EMPTY_REFRESH, clamped
    entry.on_answer(RECORD_SETS[0], 10, 30.0)
    # Records that existed vanish: kept for stale_for like any failure.
    update = entry.on_error("nodata", "no data", 40.0)
    assert [type(e) for e in update.events] == [EntryFailed]
    assert entry.records == RECORD_SETS[0]
    assert entry.on_timer(44.9).changed is False
    assert entry.on_timer(45.0).changed is True
    assert entry.records == EMPTY


def test_static_resolver_answers_and_fails() -> None:
    async def main() -> None:
        resolver = StaticResolver(
            {
                ("a.test", RecordType.A): Answer(RecordSet.of(["10.0.0.1"]), 5),
                ("b.test", RecordType.A): "servfail",
            }
        )
        answer = await resolver.query("A.test.", RecordType.A)
        assert answer.records.addresses == ("10.0.0.1",)
        with pytest.raises(ResolveError) as info:
            await resolver.query("b.test", RecordType.A)
        assert info.value.kind == "servfail"
        with pytest.raises(ResolveError) as info:
            await resolver.query("c.test", RecordType.A)
        assert info.value.kind == "nxdomain"
        assert resolver.count("a.test", RecordType.A) == 1
        with pytest.raises(ValueError, match="kind"):
            resolver.set("x.test", RecordType.A, "bogus")

    asyncio.run(main())


# ============================================================================================
# The watcher with a static resolver (fast, still a real event loop)
# ============================================================================================


def _answer(*addresses: str, ttl: float = 0.2) -> Answer:
    return Answer(RecordSet.of(addresses), ttl)


FAST = ResolverConfig(min_ttl=0.1, max_ttl=0.2, stale_for=0.3, family="ipv4")


def test_watcher_shares_lookups_between_watches_and_stops_on_unwatch(run: Runner) -> None:
    async def main() -> None:
        resolver = StaticResolver({("db.test", RecordType.A): _answer("10.0.0.1", "10.0.0.2")})
        rec = Recorder()
        watcher = rec.watcher(FAST, resolver=resolver, retry_base=0.1)
        watcher.watch_name("p1", "db.test", 80, 1, False)
        watcher.watch_name("p2", "DB.test.", 81, 2, True)
        watcher.watch_name("p3", "10.9.9.9", 82, 1, False)  # an IP literal: no DNS
        await watcher.start()
        assert resolver.count("db.test", RecordType.A) == 1
        assert [t.name for t in watcher.current("p1")] == [
            "db.test:80#10.0.0.1",
            "db.test:80#10.0.0.2",
        ]
        assert {(t.port, t.weight, t.backup) for t in watcher.current("p2")} == {(81, 2, True)}
        assert [t.host for t in watcher.current("p3")] == ["10.9.9.9"]
        # A watch added later sees what the cache knows at once.
        watcher.watch_name("p4", "db.test", 83, 1, False)
        assert len(watcher.current("p4")) == 2
        await wait_for(lambda: resolver.count("db.test", RecordType.A) >= 3, 2, "refreshes")
        for key in ("p1", "p2", "p4"):
            watcher.unwatch(key)
        await asyncio.sleep(0)
        stopped_at = resolver.count("db.test", RecordType.A)
        await asyncio.sleep(0.5)  # more than two refresh periods: nothing may be asked
        assert resolver.count("db.test", RecordType.A) == stopped_at
        assert watcher.current("p1") == ()
        await watcher.close()
        await watcher.close()  # idempotent
        assert not resolver.closed  # a resolver passed in belongs to the caller

    run(main())


def test_rewatching_a_key_keeps_the_cache(run_asyncio: Runner) -> None:
    """A reload that repeats a server must not drop its addresses or ask DNS again."""

    async def main() -> None:
        resolver = StaticResolver({("db.test", RecordType.A): _answer("10.0.0.1", ttl=60)})
        config = ResolverConfig(min_ttl=1, max_ttl=60, stale_for=1, family="ipv4")
        watcher = Recorder().watcher(config, resolver=resolver)
        watcher.watch_name("k", "db.test", 80, 1, False)
        await watcher.start()
        watcher.watch_name("k", "db.test", 81, 3, True)  # same name, other port and weight
        assert [(t.host, t.port, t.weight, t.backup) for t in watcher.current("k")] == [
            ("10.0.0.1", 81, 3, True)
        ]
        await asyncio.sleep(0.05)
        assert resolver.count("db.test", RecordType.A) == 1
        await watcher.close()

    run_asyncio(main())


def test_a_and_aaaa_failing_together_is_one_episode(run_asyncio: Runner) -> None:
    async def main() -> None:
        resolver = StaticResolver(
            {
                ("dual.test", RecordType.A): _answer("10.0.0.1"),
                ("dual.test", RecordType.AAAA): _answer("fd00::1"),
            }
        )
        rec = Recorder()
        config = ResolverConfig(min_ttl=0.1, max_ttl=0.2, stale_for=5, family="any")
        watcher = rec.watcher(config, resolver=resolver, retry_base=0.1)
        watcher.watch_name("k", "dual.test", 80, 1, False)
        await watcher.start()
        assert hosts_of(watcher.current("k")) == {"10.0.0.1", "fd00::1"}
        for rtype in (RecordType.A, RecordType.AAAA):
            resolver.set("dual.test", rtype, "servfail")
        await wait_for(lambda: watcher.query_counts["servfail"] >= 4, 3, "several failures")
        assert [e.kind for _, e in rec.of(DnsFailure)] == ["servfail"]
        assert hosts_of(watcher.current("k")) == {"10.0.0.1", "fd00::1"}  # stale, kept
        resolver.set("dual.test", RecordType.A, _answer("10.0.0.1"))
        await wait_for(lambda: watcher.query_counts["ok"] >= 3, 3, "A to answer again")
        assert rec.of(DnsRecovered) == []  # AAAA still fails: the episode goes on
        resolver.set("dual.test", RecordType.AAAA, _answer("fd00::1"))
        await wait_for(lambda: bool(rec.of(DnsRecovered)), 3, "the recovery")
        assert len(rec.of(DnsFailure)) == len(rec.of(DnsRecovered)) == 1
        await watcher.close()

    run_asyncio(main())


def test_watcher_survives_a_raising_callback(
    run_asyncio: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        resolver = StaticResolver({("db.test", RecordType.A): _answer("10.0.0.1")})
        seen: list[tuple[str, ...]] = []

        def on_change(key: str, targets: tuple[ResolvedTarget, ...]) -> None:
            seen.append(tuple(t.host for t in targets))
            raise RuntimeError("a broken subscriber")

        watcher = DnsWatcher(FAST, on_change=on_change, on_event=lambda e: None, resolver=resolver)
        watcher.watch_name("k", "db.test", 80, 1, False)
        await watcher.start()
        resolver.set("db.test", RecordType.A, _answer("10.0.0.2"))
        await wait_for(lambda: len(seen) >= 2, 2, "the second change")
        assert seen[:2] == [("10.0.0.1",), ("10.0.0.2",)]
        await watcher.close()

    with caplog.at_level(logging.ERROR, logger="lbtcp.resolution"):
        run_asyncio(main())
    assert "on_change for k failed" in caplog.text


def test_watcher_srv_target_changes_release_lookups(run_asyncio: Runner) -> None:
    async def main() -> None:
        def srv(*records: SrvRecord) -> Answer:
            return Answer(RecordSet.of(services=records), 0.2)

        resolver = StaticResolver(
            {
                ("_x._tcp.svc.test", RecordType.SRV): srv(
                    SrvRecord(1, 10, 80, "a.test"), SrvRecord(1, 10, 80, "b.test")
                ),
                ("a.test", RecordType.A): _answer("10.0.0.1"),
                ("b.test", RecordType.A): _answer("10.0.0.2"),
            }
        )
        rec = Recorder()
        watcher = rec.watcher(FAST, resolver=resolver)
        watcher.watch_srv("svc", "_x._tcp.svc.test", weight_override=7)
        await watcher.start()
        assert {(t.host, t.weight) for t in watcher.current("svc")} == {
            ("10.0.0.1", 7),
            ("10.0.0.2", 7),
        }
        resolver.set("_x._tcp.svc.test", RecordType.SRV, srv(SrvRecord(1, 10, 80, "b.test")))
        await wait_for(lambda: len(watcher.current("svc")) == 1, 2, "a.test to go")
        asked = resolver.count("a.test", RecordType.A)
        await asyncio.sleep(0.5)
        assert resolver.count("a.test", RecordType.A) == asked  # its refresh task is gone
        changed = [e for _, e in rec.of(DnsChanged) if e.key == "svc"]
        assert [t.host for t in changed[-1].removed] == ["10.0.0.1"]
        await watcher.close()

    run_asyncio(main())


def test_watcher_single_family_nodata_is_a_failure(run_asyncio: Runner) -> None:
    async def main() -> None:
        resolver = StaticResolver({("v4only.test", RecordType.AAAA): "nodata"})
        rec = Recorder()
        config = ResolverConfig(min_ttl=0.1, max_ttl=0.2, stale_for=0.3, family="ipv6")
        watcher = rec.watcher(config, resolver=resolver)
        watcher.watch_name("k", "v4only.test", 80, 1, False)
        await watcher.start()
        assert watcher.current("k") == ()
        failures = [e for _, e in rec.of(DnsFailure)]
        assert [(e.name, e.qtype, e.kind, e.stale_until) for e in failures] == [
            ("v4only.test", "AAAA", "nodata", None)
        ]
        assert watcher.query_counts["nodata"] == 1
        await watcher.close()

    run_asyncio(main())


class StuckResolver:
    """Never answers: a lookup ends only by being cancelled (counted in ``cancelled``)."""

    def __init__(self) -> None:
        self.started = 0
        self.cancelled = 0

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        self.started += 1
        try:
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        pass


class SwallowingResolver:
    """Answers only when cancelled, and then as if nothing happened: what ``asyncio.wait_for``
    did before Python 3.12 when a cancellation met an answer that was already there."""

    def __init__(self) -> None:
        self.started = 0

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        self.started += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.get_running_loop().create_future()
        return _answer("10.0.0.1")

    async def close(self) -> None:
        pass


class StubbornResolver:
    """Ignores every cancellation until ``release`` is set."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        self.started += 1
        while not self.release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await self.release.wait()
        return _answer("10.0.0.1")

    async def close(self) -> None:
        pass


def _tasks_left(baseline: set[asyncio.Task[Any]]) -> Callable[[], bool]:
    return lambda: not (asyncio.all_tasks() - baseline)


def test_a_lookup_that_never_returns_counts_as_a_timeout(run: Runner) -> None:
    """A refresh stuck in its resolver would freeze a pool's membership: each lookup is
    bounded by lookup_timeout, counted as a timeout, retried, and cancelled (not leaked)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        baseline = asyncio.all_tasks()
        resolver = StuckResolver()
        rec = Recorder()
        watcher = rec.watcher(FAST, resolver=resolver, retry_base=0.1, lookup_timeout=0.2)
        watcher.watch_name("k", "db.test", 80, 1, False)
        started = loop.time()
        await watcher.start(ready_timeout=5.0)
        # The bound, not ready_timeout, ended it (uvloop's clock is cached per iteration, in
        # whole milliseconds: a few ms of slack below).
        assert 0.18 <= loop.time() - started < 1.0
        assert watcher.query_counts["timeout"] == 1
        assert resolver.cancelled == 1
        assert [(e.name, e.kind) for _, e in rec.of(DnsFailure)] == [("db.test", "timeout")]
        await wait_for(lambda: watcher.query_counts["timeout"] >= 2, 2.0, "a retry to time out")
        await watcher.close()
        assert resolver.cancelled == resolver.started  # the one in flight too
        await wait_for(_tasks_left(baseline), 2.0, "every task to finish")

    run(main())


def test_close_stops_a_refresh_even_if_its_lookup_swallows_the_cancellation(
    run: Runner,
) -> None:
    """The hang seen against dnsmasq, without the timing luck: the cancellation that close()
    sends is lost inside the lookup, which returns an answer instead."""

    async def main() -> None:
        baseline = asyncio.all_tasks()
        resolver = SwallowingResolver()
        watcher = Recorder().watcher(FAST, resolver=resolver, lookup_timeout=5.0)
        watcher.watch_name("k", "db.test", 80, 1, False)
        await watcher.start(wait=False)
        await wait_for(lambda: resolver.started == 1, 2.0, "the first lookup")
        closing = asyncio.ensure_future(watcher.close())
        done, _ = await asyncio.wait((closing,), timeout=1.0)
        assert done, "close() did not return"
        await wait_for(_tasks_left(baseline), 1.0, "every task to finish")
        assert resolver.started == 1  # no refresh after close()

    run(main())


def test_close_lets_the_callers_cancellation_through(run: Runner) -> None:
    """close() waiting on a slow-to-stop refresh must not take its caller's cancellation for
    the refresh task's own (the old close() swallowed it and kept waiting)."""

    async def main() -> None:
        baseline = asyncio.all_tasks()
        resolver = StubbornResolver()
        watcher = Recorder().watcher(FAST, resolver=resolver, lookup_timeout=5.0)
        watcher.watch_name("k", "db.test", 80, 1, False)
        await watcher.start(wait=False)
        await wait_for(lambda: resolver.started == 1, 2.0, "the first lookup")
        closing = asyncio.ensure_future(watcher.close())
        await asyncio.sleep(0)  # close() has cancelled the refresh task and waits for it
        assert not closing.done()
        closing.cancel()
        done, _ = await asyncio.wait((closing,), timeout=1.0)
        assert done and closing.cancelled()
        resolver.release.set()
        await wait_for(_tasks_left(baseline), 2.0, "every task to finish")
        assert resolver.started == 1

    run(main())


def test_resolver_lets_a_cancellation_through_when_the_answer_is_ready(
    run: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind the hang: the query's task is cancelled (by close()) in the same loop
    iteration as c-ares hands the answer back. asyncio.wait_for before Python 3.12 returned
    the answer and lost the cancellation (CPython gh-86296). The answer is handed over by
    hand here (as aiodns' callback does) because real sockets cannot hit one loop iteration
    on purpose; the dnsmasq tests below hit it by chance."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        resolver = AioDnsResolver(ResolverConfig(nameservers=("127.0.0.1:1",)))  # never used
        answer: asyncio.Future[pycares.DNSResult] = loop.create_future()
        asked: list[str] = []

        def query_dns(host: str, qtype: str) -> asyncio.Future[pycares.DNSResult]:
            asked.append(host)
            return answer

        monkeypatch.setattr(resolver._dns, "query_dns", query_dns)
        query = asyncio.ensure_future(resolver.query("x.test", RecordType.A))
        await wait_for(lambda: bool(asked), 1.0, "the query to be sent")
        record = pycares.DNSRecord(
            "x.test",
            pycares.QUERY_TYPE_A,
            pycares.QUERY_CLASS_IN,
            5,
            pycares.ARecordData("10.0.0.1"),
        )
        answer.set_result(pycares.DNSResult([record], [], []))
        query.cancel()
        with pytest.raises(asyncio.CancelledError):
            await query
        # The same query without the cancellation gets its answer: the fake is faithful.
        answer = loop.create_future()
        answer.set_result(pycares.DNSResult([record], [], []))
        assert (await resolver.query("x.test", RecordType.A)).records.addresses == ("10.0.0.1",)
        await resolver.close()

    run(main())


# ============================================================================================
# Against a real DNS server (dnsmasq on 127.0.0.1)
# ============================================================================================


def test_three_a_records_then_the_set_changes(run: Runner, dns_servers: DnsServerFactory) -> None:
    server = dns_servers(hosts={"db.test": ["10.0.0.1", "10.0.0.2", "10.0.0.3"]}, local_ttl=1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        rec = Recorder()
        watcher = rec.watcher(config_for(server))
        watcher.watch_name("app/db", "db.test", 5432, 5, False)
        await watcher.start()
        targets = watcher.current("app/db")
        assert [t.name for t in targets] == [
            "db.test:5432#10.0.0.1",
            "db.test:5432#10.0.0.2",
            "db.test:5432#10.0.0.3",
        ]
        assert all(t.port == 5432 and t.weight == 5 and not t.backup for t in targets)
        assert rec.changes[0][1:] == ("app/db", targets)

        await asyncio.to_thread(server.set_hosts, {"db.test": ["10.0.0.2", "10.0.0.4"]})
        changed_at = loop.time()
        seen_at = await wait_for(
            lambda: hosts_of(watcher.current("app/db")) == {"10.0.0.2", "10.0.0.4"},
            3.0,
            "the new record set",
        )
        assert seen_at - changed_at <= 1.0 + 1.0  # within the TTL (+1 s)
        last = rec.of(DnsChanged)[-1][1]
        assert (last.key, last.name, last.reason) == ("app/db", "db.test", "answer")
        assert {t.host for t in last.added} == {"10.0.0.4"}
        assert {t.host for t in last.removed} == {"10.0.0.1", "10.0.0.3"}
        assert rec.changes[-1][2] == watcher.current("app/db")
        assert watcher.query_counts["ok"] >= 2
        assert server.queries("db.test", "A") == watcher.query_counts["ok"]
        assert not rec.of(DnsFailure)
        await watcher.close()

    run(main())


def test_ttl_is_clamped_by_min_and_max_ttl(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    # short.test has TTL 1 s but min_ttl is 3 s; long.test has TTL 100 s but max_ttl is 3 s.
    server = dns_servers(host_records=["short.test,10.0.1.1,1", "long.test,10.0.1.2,100"])

    async def main() -> None:
        loop = asyncio.get_running_loop()
        watcher = Recorder().watcher(config_for(server, min_ttl=3.0, max_ttl=3.0))
        watcher.watch_name("s", "short.test", 80, 1, False)
        watcher.watch_name("l", "long.test", 80, 1, False)
        await watcher.start()
        answered_at = loop.time()
        assert server.queries("short.test") == server.queries("long.test") == 1
        requeried: dict[str, float] = {}

        def both_requeried() -> bool:
            for name in ("short.test", "long.test"):
                if name not in requeried and server.queries(name) >= 2:
                    requeried[name] = loop.time()
            return len(requeried) == 2

        await wait_for(both_requeried, 5.0, "both names to be asked again")
        for name, at in requeried.items():
            assert 2.9 <= at - answered_at <= 3.8, (name, at - answered_at)
        assert server.queries("short.test", "AAAA") == 0  # family ipv4
        await watcher.close()

    run_asyncio(main())


def test_same_name_in_two_pools_is_looked_up_once(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    server = dns_servers(hosts={"shared.test": ["10.0.7.1"]}, local_ttl=1)

    async def main() -> None:
        watcher = Recorder().watcher(config_for(server))
        watcher.watch_name("web/a", "shared.test", 80, 1, False)
        watcher.watch_name("api/a", "shared.test", 8080, 1, False)
        await watcher.start()
        assert server.queries("shared.test") == 1
        assert [t.port for t in watcher.current("web/a")] == [80]
        assert [t.port for t in watcher.current("api/a")] == [8080]
        await wait_for(lambda: server.queries("shared.test") >= 2, 3.0, "the refresh")
        await asyncio.sleep(0.3)
        assert server.queries("shared.test") == 2  # one refresh, not one per pool
        await watcher.close()

    run_asyncio(main())


def test_server_stops_answering_keeps_stale_addresses_then_recovers(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    server = dns_servers(host_records=["db.test,10.0.2.1,1"])
    stale_for = 2.5

    async def main() -> None:
        rec = Recorder()
        # Retries every 0.5 s at most (not 1 s doubling): the retry and the recovery after
        # the resume below come within 0.5 s; the stale expiry is stale_for's alone.
        watcher = rec.watcher(
            config_for(server, timeout=0.5, stale_for=stale_for), retry_base=0.5, retry_cap=0.5
        )
        watcher.watch_name("k", "db.test", 80, 1, False)
        await watcher.start()
        assert hosts_of(watcher.current("k")) == {"10.0.2.1"}

        await asyncio.to_thread(server.pause)
        failed_at = await wait_for(lambda: bool(rec.of(DnsFailure)), 3.0, "the failure event")
        failure = rec.of(DnsFailure)[0][1]
        assert (failure.name, failure.qtype, failure.kind) == ("db.test", "A", "timeout")
        assert failure.stale_until == pytest.approx(failed_at + stale_for, abs=0.1)
        assert hosts_of(watcher.current("k")) == {"10.0.2.1"}  # kept while stale

        await wait_for(lambda: watcher.query_counts["timeout"] >= 2, 3.0, "a retry")
        assert hosts_of(watcher.current("k")) == {"10.0.2.1"}
        removed_at = await wait_for(lambda: not watcher.current("k"), 3.0, "the stale expiry")
        assert stale_for - 0.05 <= removed_at - failed_at <= stale_for + 0.5
        assert rec.changes[-1][2] == ()
        assert rec.of(DnsChanged)[-1][1].reason == "stale_expired"
        assert len(rec.of(DnsFailure)) == 1  # one event for the episode, not one per retry

        await asyncio.to_thread(server.resume)
        await wait_for(lambda: bool(watcher.current("k")), 6.0, "the recovery")
        assert hosts_of(watcher.current("k")) == {"10.0.2.1"}
        recovered = [e for _, e in rec.of(DnsRecovered)]
        assert len(recovered) == 1 and recovered[0].name == "db.test"
        assert recovered[0].failed_for > stale_for
        assert len(rec.of(DnsFailure)) == 1
        await watcher.close()

    run_asyncio(main())


def test_nxdomain_removes_addresses_only_after_stale_for(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    server = dns_servers(hosts={"gone.test": ["10.0.3.1", "10.0.3.2"]}, local_ttl=1)
    stale_for = 1.5

    async def main() -> None:
        rec = Recorder()
        watcher = rec.watcher(config_for(server, stale_for=stale_for))
        watcher.watch_name("k", "gone.test", 80, 1, False)
        await watcher.start()
        assert len(watcher.current("k")) == 2

        await asyncio.to_thread(server.set_hosts, {})
        failed_at = await wait_for(lambda: bool(rec.of(DnsFailure)), 3.0, "NXDOMAIN")
        assert rec.of(DnsFailure)[0][1].kind == "nxdomain"
        assert len(watcher.current("k")) == 2  # not at once
        removed_at = await wait_for(lambda: not watcher.current("k"), 3.0, "the removal")
        assert stale_for - 0.05 <= removed_at - failed_at <= stale_for + 0.5
        assert watcher.query_counts["nxdomain"] >= 1
        assert len(rec.of(DnsFailure)) == 1
        await watcher.close()

    run_asyncio(main())


def test_srv_priorities_and_weights(run: Runner, dns_servers: DnsServerFactory) -> None:
    server = dns_servers(
        srv_hosts=[
            "_db._tcp.svc.test,a1.test,8001,10,10",
            "_db._tcp.svc.test,a2.test,8002,10,30",
            "_db._tcp.svc.test,b1.test,9001,20,0",
        ],
        host_records=["a1.test,10.0.4.1", "a2.test,10.0.4.2", "b1.test,10.0.4.3"],
    )

    async def main() -> None:
        rec = Recorder()
        watcher = rec.watcher(config_for(server))
        watcher.watch_srv("pool/db", "_db._tcp.svc.test")
        watcher.watch_name("pool/a1", "a1.test", 7000, 1, False)  # shares a1.test's lookup
        await watcher.start()
        got = {(t.name, t.host, t.port, t.weight, t.backup) for t in watcher.current("pool/db")}
        assert got == {
            ("a1.test:8001#10.0.4.1", "10.0.4.1", 8001, 85, False),  # 10/30 of 256
            ("a2.test:8002#10.0.4.2", "10.0.4.2", 8002, 256, False),
            ("b1.test:9001#10.0.4.3", "10.0.4.3", 9001, 1, True),  # priority 20: backup
        }
        assert server.queries("_db._tcp.svc.test", "SRV") == 1
        assert server.queries("a1.test", "A") == 1
        assert [t.port for t in watcher.current("pool/a1")] == [7000]
        await watcher.close()

    run(main())


def test_dns_down_at_start_then_fills_when_the_server_answers(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    server = dns_servers(start=False, host_records=["late.test,10.0.5.1"])

    async def main() -> None:
        rec = Recorder()
        watcher = rec.watcher(config_for(server, timeout=0.5))
        watcher.watch_name("k", "late.test", 80, 1, False)
        await watcher.start()
        assert watcher.current("k") == ()  # the pool refuses until DNS answers
        failure = rec.of(DnsFailure)[0][1]
        assert (failure.kind, failure.stale_until) == ("unreachable", None)

        await asyncio.to_thread(server.start)
        await wait_for(lambda: bool(watcher.current("k")), 4.0, "the first answer")
        assert hosts_of(watcher.current("k")) == {"10.0.5.1"}
        assert len(rec.of(DnsFailure)) == 1
        assert len(rec.of(DnsRecovered)) == 1
        assert watcher.query_counts["unreachable"] >= 1 and watcher.query_counts["ok"] == 1
        await watcher.close()

    run_asyncio(main())


def test_family_any_merges_a_and_aaaa(run: Runner, dns_servers: DnsServerFactory) -> None:
    server = dns_servers(host_records=["dual.test,10.0.6.1,fd00::6", "v4only.test,10.0.6.2"])

    async def main() -> None:
        rec = Recorder()
        watcher = rec.watcher(config_for(server, family="any"))
        watcher.watch_name("d", "dual.test", 80, 1, False)
        watcher.watch_name("v", "v4only.test", 80, 1, False)
        await watcher.start()
        assert [t.name for t in watcher.current("d")] == [
            "dual.test:80#10.0.6.1",
            "dual.test:80#fd00::6",
        ]
        assert [t.host for t in watcher.current("v")] == ["10.0.6.2"]
        assert not rec.of(DnsFailure)  # no AAAA for an IPv4-only name is normal under "any"
        assert server.queries("v4only.test", "AAAA") == 1
        assert watcher.query_counts["nodata"] == 1
        await watcher.close()

    run(main())


def test_a_dead_nameserver_fails_within_timeout(
    run_asyncio: Runner, dns_servers: DnsServerFactory
) -> None:
    dead1 = dns_servers(host_records=["x.test,10.0.8.1"])
    dead2 = dns_servers(host_records=["x.test,10.0.8.1"])
    alive = dns_servers(host_records=["x.test,10.0.8.2"])
    dead1.pause()
    dead2.pause()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        both_dead = ResolverConfig(nameservers=(dead1.nameserver, dead2.nameserver), timeout=0.6)
        resolver = AioDnsResolver(both_dead)
        started = loop.time()
        with pytest.raises(ResolveError) as info:
            await resolver.query("x.test", RecordType.A)
        assert info.value.kind == "timeout"
        assert loop.time() - started <= 0.6 + 0.3
        await resolver.close()

        # The first server is dead, the second answers: still within the timeout.
        failover = ResolverConfig(nameservers=(dead1.nameserver, alive.nameserver), timeout=0.6)
        resolver = AioDnsResolver(failover)
        started = loop.time()
        answer = await resolver.query("x.test", RecordType.A)
        assert answer.records.addresses == ("10.0.8.2",)
        assert loop.time() - started <= 0.6 + 0.3
        await resolver.close()

    run_asyncio(main())


def test_nameserver_forms_and_ipv6_loopback(run: Runner, dns_servers: DnsServerFactory) -> None:
    server = dns_servers(host_records=["six.test,10.0.9.1,7"], extra_args=["--listen-address=::1"])

    async def main() -> None:
        resolver = AioDnsResolver(ResolverConfig(nameservers=(f"[::1]:{server.port}",)))
        assert resolver.nameservers == (f"[::1]:{server.port}",)
        answer = await resolver.query("six.test", RecordType.A)
        assert answer.records.addresses == ("10.0.9.1",)
        assert answer.ttl == 7  # the record's own TTL comes through
        await resolver.close()
        plain = AioDnsResolver(ResolverConfig(nameservers=("127.0.0.1",)))
        assert plain.nameservers == ("127.0.0.1:53",)  # no query sent: port 53 is not ours
        await plain.close()

    run(main())


def test_queries_over_tcp(run_asyncio: Runner, dns_servers: DnsServerFactory) -> None:
    """A TCP-only relay in front of dnsmasq: only a resolver speaking TCP gets an answer."""
    server = dns_servers(host_records=["tcp.test,10.0.10.1"])

    async def main() -> None:
        relayed = 0

        async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal relayed
            relayed += 1
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(ConnectionError):
                    while data := await src.read(4096):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

        port = free_port()  # free for UDP too: a UDP query there is refused
        tcp_only = await asyncio.start_server(relay, "127.0.0.1", port)
        config = ResolverConfig(nameservers=(f"127.0.0.1:{port}",), timeout=1.0)
        resolver = AioDnsResolver(config, use_tcp=True)
        answer = await resolver.query("tcp.test", RecordType.A)
        assert answer.records.addresses == ("10.0.10.1",)
        assert relayed == 1
        await resolver.close()

        udp = AioDnsResolver(config)
        with pytest.raises(ResolveError) as info:
            await udp.query("tcp.test", RecordType.A)
        assert info.value.kind in ("unreachable", "timeout")
        await udp.close()
        tcp_only.close()
        await tcp_only.wait_closed()

    run_asyncio(main())
