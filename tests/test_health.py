"""The health/ejection state machine, in virtual time: examples, then a hypothesis model."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lbtcp import health as health_mod
from lbtcp.config import EjectionConfig, HealthConfig
from lbtcp.events import (
    EjectionSkipped,
    Event,
    PoolEmpty,
    PoolRecovered,
    ServerAdded,
    ServerEjected,
    ServerStateChanged,
)
from lbtcp.health import (
    DOWN_STATES,
    HEALTH_STATES,
    TRANSITIONS,
    UP_STATES,
    AdminAction,
    Input,
    PoolHealth,
    ProbeResult,
    State,
    TransitionError,
    jittered,
    probe_interval,
    spread_first_probes,
)

OK, FAIL, TIMEOUT = ProbeResult.OK, ProbeResult.FAIL, ProbeResult.TIMEOUT
EXACT = HealthConfig(jitter=0.0)  # rise 2, fall 3, intervals 2 / 0.5 / 5


def make(
    names: tuple[str, ...] = ("a",),
    health: HealthConfig | None = EXACT,
    ejection: EjectionConfig | None = None,
    seed: int = 1,
) -> PoolHealth:
    pool = PoolHealth("app", health, ejection or EjectionConfig(), rng=random.Random(seed))
    for name in names:
        pool.add(name, 0.0)
    return pool


def changes(events: list[Event]) -> list[tuple[str, State, State]]:
    return [(e.server, e.old, e.new) for e in events if isinstance(e, ServerStateChanged)]


def of_type(events: list[Event], kind: type[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, kind)]


def probes(pool: PoolHealth, name: str, result: ProbeResult, count: int, now: float) -> list[Event]:
    events: list[Event] = []
    for _ in range(count):
        events += pool.on_probe(name, result, now)
    return events


def fail_connects(pool: PoolHealth, name: str, count: int, now: float) -> list[Event]:
    events: list[Event] = []
    for _ in range(count):
        events += pool.on_connect(name, False, now)
    return events


# --- the table --------------------------------------------------------------------------------


def test_every_state_input_pair_is_defined() -> None:
    missing = [(s, i) for s in State for i in Input if (s, i) not in TRANSITIONS]
    assert missing == []
    assert len(TRANSITIONS) == len(State) * len(Input)


def test_a_missing_pair_is_an_explicit_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = make()
    monkeypatch.delitem(TRANSITIONS, (State.UNKNOWN, Input.PROBE_OK))
    with pytest.raises(TransitionError, match="UNKNOWN, PROBE_OK"):
        pool.on_probe("a", OK, 1.0)


def test_draining_and_disabled_rows_never_make_a_server_eligible() -> None:
    # Plain targets from the admin rows must stay admin states or go through a handler.
    for (state, inp), target in TRANSITIONS.items():
        if state in (State.DRAINING, State.DISABLED) and isinstance(target, State):
            assert target not in UP_STATES, (state, inp)


# --- probes: rise / fall ------------------------------------------------------------------------


def test_unknown_server_needs_rise_successes() -> None:
    pool = make()
    assert pool.state("a") is State.UNKNOWN
    assert not pool.is_eligible("a")
    events = pool.on_probe("a", OK, 1.0)
    assert changes(events) == [("a", State.UNKNOWN, State.RISING)]
    assert not pool.is_eligible("a")
    events = pool.on_probe("a", OK, 1.5)
    assert changes(events) == [("a", State.RISING, State.HEALTHY)]
    change = of_type(events, ServerStateChanged)[0]
    assert isinstance(change, ServerStateChanged)
    assert change.reason == "probe: 2 consecutive successes"
    assert pool.is_eligible("a")


def test_healthy_server_falls_after_fall_consecutive_failures() -> None:
    pool = make(health=HealthConfig(jitter=0.0, initial="healthy"))
    assert pool.state("a") is State.HEALTHY
    events = pool.on_probe("a", TIMEOUT, 1.0)
    assert changes(events) == [("a", State.HEALTHY, State.FAILING)]
    assert pool.is_eligible("a"), "a server failing fewer than `fall` probes takes traffic"
    pool.on_probe("a", FAIL, 1.5)
    events = pool.on_probe("a", TIMEOUT, 2.0)
    (change,) = of_type(events, ServerStateChanged)
    assert isinstance(change, ServerStateChanged)
    assert (change.old, change.new) == (State.FAILING, State.UNHEALTHY)
    assert change.reason == "probe: 3 consecutive failures (timeout)"
    assert change.marked_down
    assert not pool.is_eligible("a")


def test_a_success_interrupts_a_failure_run() -> None:
    pool = make(health=HealthConfig(jitter=0.0, initial="healthy"))
    probes(pool, "a", FAIL, 2, 1.0)
    assert pool.state("a") is State.FAILING
    assert changes(pool.on_probe("a", OK, 2.0)) == [("a", State.FAILING, State.HEALTHY)]
    probes(pool, "a", FAIL, 2, 3.0)
    assert pool.state("a") is State.FAILING, "the run starts over after a success"
    probes(pool, "a", FAIL, 1, 3.0)
    assert pool.state("a") is State.UNHEALTHY


def test_a_failure_while_rising_starts_the_rise_over() -> None:
    pool = make(health=HealthConfig(jitter=0.0, rise=3, initial="healthy"))
    probes(pool, "a", FAIL, 3, 1.0)
    probes(pool, "a", OK, 2, 2.0)
    assert pool.state("a") is State.RISING
    assert changes(pool.on_probe("a", FAIL, 3.0)) == [("a", State.RISING, State.UNHEALTHY)]
    probes(pool, "a", OK, 2, 4.0)
    assert pool.state("a") is State.RISING
    pool.on_probe("a", OK, 5.0)
    assert pool.state("a") is State.HEALTHY


def test_unknown_server_becomes_unhealthy_only_after_fall_failures() -> None:
    pool = make()
    probes(pool, "a", FAIL, 2, 1.0)
    assert pool.state("a") is State.UNKNOWN
    pool.on_probe("a", OK, 2.0)
    assert pool.state("a") is State.RISING
    pool.on_probe("a", FAIL, 3.0)
    assert pool.state("a") is State.UNKNOWN, "still undecided: one failure after one success"
    probes(pool, "a", FAIL, 2, 4.0)
    assert pool.state("a") is State.UNHEALTHY


def test_initial_healthy_versus_unknown() -> None:
    healthy = PoolHealth("app", HealthConfig(initial="healthy"), EjectionConfig())
    events = healthy.add("a", 0.0)
    assert of_type(events, ServerAdded) == [ServerAdded("app", "a", State.HEALTHY, 0.0)]
    assert of_type(events, PoolEmpty) == []
    assert healthy.is_eligible("a")
    assert healthy.healthy_count() == 1

    unknown = PoolHealth("app", HealthConfig(initial="unknown"), EjectionConfig())
    events = unknown.add("a", 0.0)
    assert of_type(events, ServerAdded) == [ServerAdded("app", "a", State.UNKNOWN, 0.0)]
    assert of_type(events, PoolEmpty) == [PoolEmpty("app", 1, 0.0)]
    assert not unknown.is_eligible("a")
    assert unknown.healthy_count() == 0

    no_probes = PoolHealth("app", None, EjectionConfig())
    no_probes.add("a", 0.0)
    assert no_probes.state("a") is State.HEALTHY
    assert no_probes.on_probe("a", FAIL, 1.0) == [], "a late probe result after a reload"
    assert no_probes.state("a") is State.HEALTHY


# --- probe scheduling ------------------------------------------------------------------------


def test_probe_delay_per_state_without_jitter() -> None:
    rng = random.Random(0)
    pool = make(("a",), health=HealthConfig(jitter=0.0, fall=2, rise=2))
    assert pool.next_probe_at("a", 10.0, rng) == 10.5  # UNKNOWN: fast
    pool.on_probe("a", OK, 10.0)
    assert pool.next_probe_at("a", 10.0, rng) == 10.5  # RISING: fast
    pool.on_probe("a", OK, 10.0)
    assert pool.next_probe_at("a", 10.0, rng) == 12.0  # HEALTHY: interval
    pool.on_probe("a", FAIL, 10.0)
    assert pool.next_probe_at("a", 10.0, rng) == 10.5  # FAILING: fast
    pool.on_probe("a", FAIL, 10.0)
    assert pool.state("a") is State.UNHEALTHY
    assert pool.next_probe_at("a", 10.0, rng) == 15.0  # UNHEALTHY: down_interval
    pool.admin("a", AdminAction.DRAIN, 10.0)
    assert pool.next_probe_at("a", 10.0, rng) == 15.0, "draining: probed as its health says"
    pool.admin("a", AdminAction.DISABLE, 10.0)
    assert pool.next_probe_at("a", 10.0, rng) is None, "disabled: not probed"
    assert pool.next_probe_at("nope", 10.0, rng) is None
    assert make(health=None).next_probe_at("a", 10.0, rng) is None


def test_probes_pause_while_ejected_and_resume_at_expiry() -> None:
    rng = random.Random(0)
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    fail_connects(pool, "a", 5, 100.0)
    assert pool.state("a") is State.EJECTED
    assert pool.next_probe_at("a", 101.0, rng) == 130.0
    assert pool.next_probe_at("a", 140.0, rng) == 140.0, "overdue: probe now"


def test_probe_delay_with_jitter_stays_within_bounds() -> None:
    rng = random.Random(42)
    pool = make(("a",), health=HealthConfig(jitter=0.1, initial="healthy"))
    delays = [pool.next_probe_at("a", 0.0, rng) for _ in range(2000)]
    assert all(d is not None and 1.8 <= d <= 2.2 for d in delays)
    floats = [d for d in delays if d is not None]
    # Jitter is really applied and covers the whole range, not a constant.
    assert min(floats) < 1.82
    assert max(floats) > 2.18
    assert 1.97 < sum(floats) / len(floats) < 2.03


def test_probe_interval_and_jitter_helpers() -> None:
    cfg = HealthConfig(interval=3.0, fast_interval=1.0, down_interval=7.0)
    assert probe_interval(cfg, State.HEALTHY) == 3.0
    assert probe_interval(cfg, State.FAILING) == 1.0
    assert probe_interval(cfg, State.RISING) == 1.0
    assert probe_interval(cfg, State.UNKNOWN) == 1.0
    assert probe_interval(cfg, State.UNHEALTHY) == 7.0
    assert probe_interval(cfg, State.EJECTED) is None
    assert jittered(5.0, 0.0, random.Random(1)) == 5.0
    assert jittered(0.0, 0.5, random.Random(1)) == 0.0


def test_first_probes_are_spread_over_one_interval() -> None:
    assert spread_first_probes(["a", "b", "c", "d"], 2.0, 10.0) == {
        "a": 10.0,
        "b": 10.5,
        "c": 11.0,
        "d": 11.5,
    }
    assert spread_first_probes([], 2.0, 10.0) == {}
    pool = make(("a", "b", "c"), health=HealthConfig(interval=3.0))
    pool.admin("b", AdminAction.DISABLE, 0.0)
    assert pool.first_probe_times(5.0) == {"a": 5.0, "c": 6.5}
    assert make(health=None).first_probe_times(5.0) == {}


# --- passive ejection ------------------------------------------------------------------------


def test_consecutive_connect_failures_eject_with_reason() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    assert fail_connects(pool, "a", 4, 1.0) == []
    pool.on_connect("a", True, 1.0)
    assert fail_connects(pool, "a", 4, 1.0) == [], "a success resets the run"
    events = pool.on_connect("a", False, 1.0)
    (change,) = of_type(events, ServerStateChanged)
    assert isinstance(change, ServerStateChanged)
    assert change.reason == "passive: 5 consecutive connect failures, ejected for 30s (ejection 1)"
    assert (change.old, change.new, change.marked_down) == (State.HEALTHY, State.EJECTED, True)
    assert of_type(events, ServerEjected) == [ServerEjected("app", "a", 1, 30.0, 31.0, 1.0)]
    assert not pool.is_eligible("a")
    assert pool.next_deadline() == 31.0


def test_ejection_lasts_its_time_then_needs_rise_probes() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    fail_connects(pool, "a", 5, 0.0)
    assert pool.tick(29.999) == []
    assert pool.on_probe("a", OK, 29.999) == [], "probe results are ignored while ejected"
    assert pool.state("a") is State.EJECTED
    events = pool.tick(30.0)
    assert changes(events) == [("a", State.EJECTED, State.UNHEALTHY)]
    expected = ServerStateChanged(
        "app", "a", State.EJECTED, State.UNHEALTHY, "ejection expired", 30.0, State.EJECTED,
        State.UNHEALTHY,
    )  # fmt: skip
    assert of_type(events, ServerStateChanged) == [expected]
    assert not pool.is_eligible("a")
    pool.on_probe("a", OK, 30.1)
    assert pool.state("a") is State.RISING
    pool.on_probe("a", OK, 30.6)
    assert pool.state("a") is State.HEALTHY


def test_without_probes_an_ejected_server_returns_on_expiry() -> None:
    pool = make(("a", "b"), health=None)
    events = fail_connects(pool, "a", 5, 0.0)
    (ejected,) = of_type(events, ServerEjected)
    assert isinstance(ejected, ServerEjected)
    # No [health] table: the default ±10 % jitter applies to ejections.
    assert 27.0 <= ejected.duration <= 33.0
    assert pool.tick(ejected.until - 0.001) == []
    events = pool.tick(ejected.until)
    assert changes(events) == [("a", State.EJECTED, State.HEALTHY)]
    assert pool.is_eligible("a")


def test_ejection_jitter_spreads_the_return_of_servers() -> None:
    durations = set()
    for seed in range(20):
        pool = make(("a", "b"), health=None, seed=seed)
        (ejected,) = of_type(fail_connects(pool, "a", 5, 0.0), ServerEjected)
        assert isinstance(ejected, ServerEjected)
        assert 27.0 <= ejected.duration <= 33.0
        durations.add(round(ejected.duration, 3))
    assert len(durations) > 10


def eject_and_recover(pool: PoolHealth, name: str, now: float) -> tuple[ServerEjected, float]:
    """Eject ``name`` at ``now``, let it expire and pass one probe (rise 1); return the
    ejection and the time it was back."""
    (ejected,) = of_type(fail_connects(pool, name, 5, now), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    pool.tick(ejected.until)
    pool.on_probe(name, OK, ejected.until)
    assert pool.state(name) is State.HEALTHY
    return ejected, ejected.until


def test_ejection_backoff_grows_by_base_time_up_to_max_time() -> None:
    pool = make(
        ("a", "b"),
        health=HealthConfig(jitter=0.0, rise=1, initial="healthy"),
        ejection=EjectionConfig(base_time=30.0, max_time=100.0),
    )
    now, durations, counts = 0.0, [], []
    for _ in range(6):
        ejected, now = eject_and_recover(pool, "a", now)
        durations.append(ejected.duration)
        counts.append(ejected.count)
    assert durations == [30.0, 60.0, 90.0, 100.0, 100.0, 100.0]
    # The multiplier stops growing at the cap, so that decaying from the top is bounded.
    assert counts == [1, 2, 3, 4, 4, 4]


def test_ejection_multiplier_decays_while_healthy() -> None:
    pool = make(
        ("a", "b"),
        health=HealthConfig(jitter=0.0, rise=1, initial="healthy"),
        ejection=EjectionConfig(base_time=10.0, max_time=300.0),
    )
    now = 0.0
    for _ in range(3):
        _, now = eject_and_recover(pool, "a", now)
    assert pool.server("a").ejections == 3
    back = now
    assert pool.next_deadline() == back + 10.0
    pool.tick(back + 9.9)
    assert pool.server("a").ejections == 3
    pool.tick(back + 10.0)
    assert pool.server("a").ejections == 2
    pool.tick(back + 25.0)  # one more full base_time (at +20)
    assert pool.server("a").ejections == 1
    # The next ejection is number 2 again: 20 s, not 40 s.
    (ejected,) = of_type(fail_connects(pool, "a", 5, back + 25.0), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    assert (ejected.count, ejected.duration) == (2, 20.0)


def test_no_decay_while_out_of_service() -> None:
    pool = make(
        ("a", "b"),
        health=HealthConfig(jitter=0.0, rise=1, fall=1, initial="healthy"),
        ejection=EjectionConfig(base_time=10.0),
    )
    _, now = eject_and_recover(pool, "a", 0.0)
    pool.on_probe("a", FAIL, now + 1.0)
    assert pool.state("a") is State.UNHEALTHY
    assert pool.next_deadline() is None
    pool.tick(now + 100.0)
    assert pool.server("a").ejections == 1


def test_max_percent_caps_ejections_but_one_is_always_allowed() -> None:
    pool = make(("a", "b", "c", "d"), health=None, ejection=EjectionConfig(max_percent=50))
    fail_connects(pool, "a", 5, 0.0)
    fail_connects(pool, "b", 5, 0.0)
    events = fail_connects(pool, "c", 5, 0.0)
    assert of_type(events, EjectionSkipped) == [
        EjectionSkipped("app", "c", "max_percent", ejected=2, total=4, at=0.0)
    ]
    assert pool.state("c") is State.HEALTHY
    assert pool.ejected_count() == 2
    # The run starts over: the next failure alone does not retry the ejection.
    assert pool.on_connect("c", False, 0.0) == []

    lone = make(("a",), health=None, ejection=EjectionConfig(max_percent=0))
    fail_connects(lone, "a", 5, 0.0)
    assert lone.state("a") is State.EJECTED, "at least one server may always be ejected"

    three = make(("a", "b", "c"), health=None, ejection=EjectionConfig(max_percent=50))
    fail_connects(three, "a", 5, 0.0)
    fail_connects(three, "b", 5, 0.0)
    assert three.ejected_count() == 1, "50 % of 3 rounds down to 1"


@pytest.mark.parametrize(
    ("servers", "max_percent", "allowed"),
    [
        (1, 0, 1),
        (1, 100, 1),
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (5, 0, 1),
        (5, 99, 4),
        (5, 100, 5),
    ],
)
def test_max_percent_of_the_pool(servers: int, max_percent: int, allowed: int) -> None:
    names = tuple(f"s{i}" for i in range(servers))
    pool = make(names, health=None, ejection=EjectionConfig(max_percent=max_percent))
    skipped = []
    for name in names:
        skipped += of_type(fail_connects(pool, name, 5, 0.0), EjectionSkipped)
    assert pool.ejected_count() == allowed
    assert len(skipped) == servers - allowed


def test_ejections_end_at_their_own_time() -> None:
    pool = make(
        ("a", "b", "c"),
        health=HealthConfig(jitter=0.0, initial="healthy"),
        ejection=EjectionConfig(max_percent=100),
    )
    fail_connects(pool, "a", 5, 0.0)
    fail_connects(pool, "b", 5, 0.5)
    assert pool.next_deadline() == 30.0
    assert changes(pool.tick(30.0)) == [("a", State.EJECTED, State.UNHEALTHY)]
    assert pool.state("b") is State.EJECTED
    assert pool.next_deadline() == 30.5
    assert changes(pool.tick(30.5)) == [("b", State.EJECTED, State.UNHEALTHY)]


def test_passive_ejection_can_be_off() -> None:
    pool = make(("a",), health=None, ejection=EjectionConfig(consecutive_failures=0))
    assert fail_connects(pool, "a", 50, 0.0) == []
    assert pool.state("a") is State.HEALTHY


def test_passive_results_do_not_count_for_servers_out_of_service() -> None:
    pool = make(("a", "b"))  # both UNKNOWN: only panic mode would send them traffic
    assert fail_connects(pool, "a", 10, 0.0) == []
    assert pool.state("a") is State.UNKNOWN


def test_every_call_applies_due_timers_first() -> None:
    pool = make(("a", "b"), health=None, ejection=EjectionConfig(base_time=10.0))
    (ejected,) = of_type(fail_connects(pool, "a", 5, 0.0), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    # No tick was run; a connect report after the expiry sees the server back first.
    events = pool.on_connect("b", True, ejected.until + 1.0)
    assert changes(events) == [("a", State.EJECTED, State.HEALTHY)]


# --- slow start ------------------------------------------------------------------------------


def test_slow_start_ramps_after_recovery_only() -> None:
    pool = make(
        ("a", "b"),
        health=HealthConfig(jitter=0.0, rise=1, fall=1),
        ejection=EjectionConfig(slow_start=60.0),
    )
    pool.on_probe("a", OK, 1.0)
    assert pool.state("a") is State.HEALTHY
    assert pool.weight_factor("a", 1.0) == 1.0, "no ramp at the initial start"
    pool.on_probe("a", FAIL, 2.0)
    pool.on_probe("a", OK, 10.0)
    assert pool.weight_factor("a", 10.0) == pytest.approx(0.1)
    assert pool.weight_factor("a", 40.0) == pytest.approx(0.55)
    assert pool.weight_factor("a", 69.9) < 1.0
    assert pool.weight_factor("a", 70.0) == 1.0
    assert pool.weight_factor("a", 1000.0) == 1.0
    # Going down again mid-ramp cancels the ramp; the next recovery starts a new one.
    pool.on_probe("a", FAIL, 80.0)
    pool.on_probe("a", OK, 100.0)
    assert pool.weight_factor("a", 100.0) == pytest.approx(0.1)


def test_slow_start_after_ejection_without_probes() -> None:
    pool = make(("a", "b"), health=None, ejection=EjectionConfig(slow_start=10.0))
    (ejected,) = of_type(fail_connects(pool, "a", 5, 0.0), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    pool.tick(ejected.until)
    assert pool.weight_factor("a", ejected.until) == pytest.approx(0.1)
    assert pool.weight_factor("a", ejected.until + 5.0) == pytest.approx(0.55)
    assert pool.weight_factor("b", ejected.until) == 1.0


# --- admin -----------------------------------------------------------------------------------


def test_drain_keeps_probing_and_enable_returns_to_the_probed_state() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    events = pool.admin("a", AdminAction.DRAIN, 1.0)
    (change,) = of_type(events, ServerStateChanged)
    assert isinstance(change, ServerStateChanged)
    assert (change.old, change.new, change.reason) == (
        State.HEALTHY,
        State.DRAINING,
        "admin: drain",
    )
    assert not change.marked_down
    assert not pool.is_eligible("a")
    assert pool.healthy_count() == 1
    events = probes(pool, "a", FAIL, 3, 2.0)
    last = of_type(events, ServerStateChanged)[-1]
    assert isinstance(last, ServerStateChanged)
    assert (last.old, last.new) == (State.DRAINING, State.DRAINING)
    assert (last.old_health, last.new_health, last.marked_down) == (
        State.FAILING,
        State.UNHEALTHY,
        True,
    )
    assert changes(pool.admin("a", AdminAction.ENABLE, 3.0)) == [
        ("a", State.DRAINING, State.UNHEALTHY)
    ]
    probes(pool, "a", OK, 2, 4.0)
    pool.admin("a", AdminAction.DRAIN, 5.0)
    assert changes(pool.admin("a", AdminAction.ENABLE, 6.0)) == [
        ("a", State.DRAINING, State.HEALTHY)
    ]
    assert pool.is_eligible("a")


def test_disable_stops_probes_and_enable_starts_over() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0))
    probes(pool, "a", OK, 2, 1.0)
    assert pool.state("a") is State.HEALTHY
    pool.admin("a", AdminAction.DISABLE, 2.0)
    assert pool.state("a") is State.DISABLED
    assert not pool.is_eligible("a")
    assert pool.on_probe("a", FAIL, 3.0) == [], "a late probe result is ignored"
    assert pool.health_state("a") is State.HEALTHY
    events = pool.admin("a", AdminAction.ENABLE, 4.0)
    assert changes(events) == [("a", State.DISABLED, State.UNKNOWN)]
    assert not pool.is_eligible("a"), "initial = unknown: it must pass `rise` probes again"
    probes(pool, "a", OK, 2, 5.0)
    assert pool.is_eligible("a")


def test_enable_after_disable_with_initial_healthy_ramps_slowly() -> None:
    pool = make(
        ("a", "b"),
        health=HealthConfig(jitter=0.0, initial="healthy"),
        ejection=EjectionConfig(slow_start=10.0),
    )
    pool.admin("a", AdminAction.DISABLE, 1.0)
    events = pool.admin("a", AdminAction.ENABLE, 2.0)
    assert changes(events) == [("a", State.DISABLED, State.HEALTHY)]
    assert pool.weight_factor("a", 2.0) == pytest.approx(0.1)


def test_disable_keeps_a_running_ejection() -> None:
    pool = make(("a", "b"), health=None)
    (ejected,) = of_type(fail_connects(pool, "a", 5, 0.0), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    pool.admin("a", AdminAction.DISABLE, 1.0)
    assert changes(pool.admin("a", AdminAction.ENABLE, 2.0)) == [
        ("a", State.DISABLED, State.EJECTED)
    ]
    pool.admin("a", AdminAction.DISABLE, 3.0)
    events = pool.tick(ejected.until)
    (change,) = of_type(events, ServerStateChanged)
    assert isinstance(change, ServerStateChanged)
    assert (change.new, change.old_health, change.new_health) == (
        State.DISABLED,
        State.EJECTED,
        State.HEALTHY,
    )
    assert not pool.is_eligible("a")


# --- membership and pool events --------------------------------------------------------------


def test_pool_empty_once_and_recovered_once() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    seen: list[Event] = []
    seen += probes(pool, "a", FAIL, 3, 1.0)
    assert of_type(seen, PoolEmpty) == []
    seen += probes(pool, "b", TIMEOUT, 3, 2.0)
    seen += probes(pool, "a", FAIL, 5, 3.0)
    seen += probes(pool, "b", FAIL, 5, 3.0)
    assert of_type(seen, PoolEmpty) == [PoolEmpty("app", 2, 2.0)]
    seen += probes(pool, "a", OK, 2, 4.0)
    seen += probes(pool, "b", OK, 2, 5.0)
    assert of_type(seen, PoolEmpty) == [PoolEmpty("app", 2, 2.0)]
    assert of_type(seen, PoolRecovered) == [PoolRecovered("app", 1, 4.0)]
    # A new episode is reported again.
    seen = pool.admin("a", AdminAction.DRAIN, 6.0) + pool.admin("b", AdminAction.DISABLE, 6.0)
    assert of_type(seen, PoolEmpty) == [PoolEmpty("app", 2, 6.0)]


def test_remove_and_unknown_names() -> None:
    pool = make(("a", "b"), health=HealthConfig(jitter=0.0, initial="healthy"))
    events = pool.remove("a", 1.0)
    (change,) = of_type(events, ServerStateChanged)
    assert isinstance(change, ServerStateChanged)
    assert (change.old, change.new, change.reason) == (State.HEALTHY, State.REMOVED, "removed")
    assert not change.marked_down
    assert "a" not in pool
    assert len(pool) == 1
    assert pool.on_probe("a", FAIL, 2.0) == [], "a probe finishing after removal is dropped"
    assert pool.on_connect("a", False, 2.0) == []
    assert not pool.is_eligible("a")
    assert pool.weight_factor("a", 2.0) == 1.0
    with pytest.raises(KeyError):
        pool.admin("a", AdminAction.DRAIN, 2.0)
    with pytest.raises(KeyError):
        pool.remove("a", 2.0)
    with pytest.raises(ValueError, match="already"):
        pool.add("b", 2.0)
    events = pool.remove("b", 3.0)
    assert of_type(events, PoolEmpty) == [PoolEmpty("app", 0, 3.0)]


def test_reload_dropping_probes_brings_servers_back() -> None:
    pool = make(("a", "b", "c"), health=HealthConfig(jitter=0.0, initial="healthy"))
    probes(pool, "a", FAIL, 3, 1.0)
    (ejected,) = of_type(fail_connects(pool, "b", 5, 1.0), ServerEjected)
    assert isinstance(ejected, ServerEjected)
    events = pool.reconfigure(None, EjectionConfig(), 2.0)
    assert changes(events) == [("a", State.UNHEALTHY, State.HEALTHY)]
    assert pool.state("b") is State.EJECTED, "a running ejection keeps its end"
    assert changes(pool.tick(ejected.until)) == [("b", State.EJECTED, State.HEALTHY)]
    assert pool.on_probe("c", FAIL, 40.0) == []


def test_events_are_frozen_slotted_dataclasses() -> None:
    event = PoolEmpty("app", 1, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.pool = "other"  # type: ignore[misc]
    for kind in (ServerAdded, ServerStateChanged, ServerEjected, EjectionSkipped, PoolEmpty):
        assert dataclasses.is_dataclass(kind)
        assert "__slots__" in vars(kind)
    assert not hasattr(event, "__dict__")
    assert isinstance(event, Event)


# --- the model: hypothesis over random inputs and time ---------------------------------------

NAMES = ("s0", "s1", "s2", "s3", "s4")


class HealthMachine(RuleBasedStateMachine):
    """Drives one PoolHealth with random probes, connects, admin actions, membership changes
    and clock moves, and checks it against an independent model of the consecutive counts."""

    @initialize(
        count=st.integers(1, 5),
        with_probes=st.booleans(),
        rise=st.integers(1, 3),
        fall=st.integers(1, 3),
        initial=st.sampled_from(["unknown", "healthy"]),
        jitter=st.sampled_from([0.0, 0.1, 0.3]),
        threshold=st.integers(0, 3),
        base=st.sampled_from([1.0, 2.5, 10.0]),
        max_mult=st.integers(1, 4),
        max_percent=st.integers(0, 100),
        slow_start=st.sampled_from([0.0, 5.0]),
        seed=st.integers(0, 2**32 - 1),
    )
    def setup(
        self,
        count: int,
        with_probes: bool,
        rise: int,
        fall: int,
        initial: str,
        jitter: float,
        threshold: int,
        base: float,
        max_mult: int,
        max_percent: int,
        slow_start: float,
        seed: int,
    ) -> None:
        self.now = 0.0
        self.health = (
            HealthConfig(rise=rise, fall=fall, jitter=jitter, initial=initial)
            if with_probes
            else None
        )
        self.ejection = EjectionConfig(
            consecutive_failures=threshold,
            base_time=base,
            max_time=base * max_mult,
            max_percent=max_percent,
            slow_start=slow_start,
        )
        self.jitter = jitter if with_probes else health_mod.DEFAULT_EJECTION_JITTER
        self.pool = PoolHealth("p", self.health, self.ejection, rng=random.Random(seed))
        self.ok_run: dict[str, int] = {}
        self.fail_run: dict[str, int] = {}
        self.ejected_until: dict[str, float] = {}
        self.empty = False
        self.maybe_over_cap = False
        for name in NAMES[:count]:
            self.add_server(name)

    # -- model bookkeeping --

    def add_server(self, name: str) -> None:
        self.ok_run[name] = self.fail_run[name] = 0
        self.check(self.pool.add(name, self.now))
        assert self.pool.state(name) is self.pool.initial_state()

    def check(self, events: Sequence[Event]) -> None:
        """Check every event against the model and update the model."""
        for event in events:
            if isinstance(event, ServerEjected):
                self.check_ejected(event)
            elif isinstance(event, ServerStateChanged):
                self.check_change(event)
            elif isinstance(event, PoolEmpty):
                assert not self.empty, "PoolEmpty twice in a row"
                self.empty = True
            elif isinstance(event, PoolRecovered):
                assert self.empty, "PoolRecovered without a PoolEmpty"
                self.empty = False
            elif isinstance(event, EjectionSkipped):
                assert event.reason == "max_percent"
                assert event.ejected >= max(1, event.total * self.ejection.max_percent // 100)

    def check_ejected(self, event: ServerEjected) -> None:
        cap = self.ejection.max_time
        nominal = min(self.ejection.base_time * event.count, cap)
        assert 1 <= event.count <= self.pool.max_multiplier()
        slack = 1e-9
        assert nominal * (1 - self.jitter) - slack <= event.duration
        assert event.duration <= nominal * (1 + self.jitter) + slack
        assert event.until == pytest.approx(event.at + event.duration)
        assert self.pool.ejected_count() <= self.cap(), "max_percent exceeded"
        self.ejected_until[event.server] = event.until
        self.ok_run[event.server] = self.fail_run[event.server] = 0

    def check_change(self, event: ServerStateChanged) -> None:
        name, old_h, new_h = event.server, event.old_health, event.new_health
        assert event.marked_down == (old_h in UP_STATES and new_h in DOWN_STATES)
        if old_h is State.EJECTED and new_h is not State.EJECTED:
            assert event.reason == "ejection expired"
            assert event.at >= self.ejected_until[name], "ejection ended early"
            assert new_h is (State.HEALTHY if self.health is None else State.UNHEALTHY)
            self.ok_run[name] = self.fail_run[name] = 0
        if event.old is State.DISABLED and event.new is not State.DISABLED:
            self.ok_run[name] = self.fail_run[name] = 0  # a restart
        if old_h not in UP_STATES and new_h in UP_STATES:
            if event.reason.startswith("probe:"):
                assert self.health is not None
                assert self.ok_run[name] >= self.health.rise, "healthy before `rise` successes"
            else:
                # Only ways up without probes passing: probes are off, or initial = healthy.
                assert self.pool.initial_state() is State.HEALTHY, event
        if old_h in UP_STATES and new_h is State.UNHEALTHY:
            assert self.health is not None
            assert event.reason.startswith("probe:")
            assert self.fail_run[name] >= self.health.fall, "unhealthy before `fall` failures"
        if event.new is State.REMOVED:
            del self.ok_run[name], self.fail_run[name]
            self.ejected_until.pop(name, None)

    def cap(self) -> int:
        return max(1, len(self.pool) * self.ejection.max_percent // 100)

    def check_ignored(self, name: str, events: Sequence[Event]) -> None:
        """A report about a removed server changes nothing about it (due timers may fire)."""
        assert all(getattr(e, "server", None) != name for e in events)
        self.check(events)

    # -- rules --

    @rule(index=st.integers(0, 4), result=st.sampled_from(list(ProbeResult)))
    def probe(self, index: int, result: ProbeResult) -> None:
        name = NAMES[index]
        if name not in self.pool:
            self.check_ignored(name, self.pool.on_probe(name, result, self.now))
            return
        srv = self.pool.server(name)
        before_health, before_admin = srv.health, srv.admin
        if before_health is State.EJECTED and self.ejected_until[name] <= self.now:
            before_health = State.UNHEALTHY if self.health is not None else State.HEALTHY
        counted = (
            self.health is not None
            and before_admin is not health_mod.Admin.DISABLED
            and before_health is not State.EJECTED
        )
        # Expiry events come first in the list and reset the model; then the probe counts.
        events = self.pool.on_probe(name, result, self.now)
        expiries = [
            e
            for e in events
            if isinstance(e, ServerStateChanged) and e.reason == "ejection expired"
        ]
        self.check(expiries)
        if counted:
            if result is ProbeResult.OK:
                self.ok_run[name] += 1
                self.fail_run[name] = 0
            else:
                self.fail_run[name] += 1
                self.ok_run[name] = 0
        self.check([e for e in events if e not in expiries])
        after = self.pool.health_state(name)
        if not counted:
            assert after is before_health
            return
        assert self.health is not None
        if result is ProbeResult.OK:
            expect_up = before_health in UP_STATES or self.ok_run[name] >= self.health.rise
            assert (after in UP_STATES) == expect_up
        elif before_health in UP_STATES:
            expect = State.UNHEALTHY if self.fail_run[name] >= self.health.fall else State.FAILING
            assert after is expect
        else:
            assert after not in UP_STATES
            if self.fail_run[name] >= self.health.fall:
                assert after is State.UNHEALTHY

    @rule(index=st.integers(0, 4), ok=st.booleans(), times=st.integers(1, 4))
    def connect(self, index: int, ok: bool, times: int) -> None:
        # Runs of the same result, so that consecutive-failure thresholds are really reached.
        name = NAMES[index]
        for _ in range(times):
            if name not in self.pool:
                self.check_ignored(name, self.pool.on_connect(name, ok, self.now))
            else:
                self.check(self.pool.on_connect(name, ok, self.now))

    @rule(index=st.integers(0, 4), action=st.sampled_from(list(AdminAction)))
    def admin(self, index: int, action: AdminAction) -> None:
        name = NAMES[index]
        if name not in self.pool:
            with pytest.raises(KeyError):
                self.pool.admin(name, action, self.now)
            return
        self.check(self.pool.admin(name, action, self.now))
        state = self.pool.state(name)
        if action is AdminAction.DRAIN:
            assert state is State.DRAINING
        elif action is AdminAction.DISABLE:
            assert state is State.DISABLED
        else:
            assert state in HEALTH_STATES

    @rule(index=st.integers(0, 4), membership_change=st.integers(0, 2))
    def add_or_remove(self, index: int, membership_change: int) -> None:
        name = NAMES[index]
        if membership_change:
            return  # keep churn rarer than the other inputs, so that ejections run their course
        if name in self.pool:
            if self.pool.ejected_count() > 0:
                self.maybe_over_cap = True
            self.check(self.pool.remove(name, self.now))
            assert name not in self.pool
        else:
            self.add_server(name)

    @rule(seconds=st.floats(0.0, 45.0, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.now += seconds  # without a tick: the next call must apply the due timers

    @rule()
    def tick(self) -> None:
        self.check(self.pool.tick(self.now))
        for srv in self.pool:
            if srv.health is State.EJECTED:
                assert srv.ejected_until is not None
                assert srv.ejected_until > self.now
        deadline = self.pool.next_deadline()
        assert deadline is None or deadline > self.now

    # -- invariants --

    @invariant()
    def eligibility_follows_state(self) -> None:
        eligible = 0
        for srv in self.pool:
            assert srv.eligible == self.pool.is_eligible(srv.name)
            assert srv.eligible == (srv.state in UP_STATES)
            if srv.state in (State.DRAINING, State.DISABLED, State.EJECTED):
                assert not srv.eligible
            assert srv.health in HEALTH_STATES
            assert (srv.state in HEALTH_STATES) == (srv.admin is health_mod.Admin.ENABLED)
            eligible += srv.eligible
        assert self.pool.healthy_count() == eligible

    @invariant()
    def pool_empty_is_reported(self) -> None:
        assert self.empty == (self.pool.healthy_count() == 0)

    @invariant()
    def ejected_share_is_capped(self) -> None:
        # Removing servers while some are ejected can leave more ejected than the smaller pool's
        # cap allows (they are not un-ejected early); each new ejection is checked on its own.
        ejected = self.pool.ejected_count()
        if ejected == 0:
            self.maybe_over_cap = False
        if not self.maybe_over_cap:
            assert ejected <= self.cap()

    @invariant()
    def deadline_is_the_earliest_timer(self) -> None:
        times = [t for srv in self.pool for t in (srv.ejected_until, srv.decay_at) if t is not None]
        assert self.pool.next_deadline() == (min(times) if times else None)

    @invariant()
    def weight_factor_in_range(self) -> None:
        for srv in self.pool:
            factor = self.pool.weight_factor(srv.name, self.now)
            assert health_mod.SLOW_START_FLOOR <= factor <= 1.0

    @invariant()
    def probe_schedule_follows_state(self) -> None:
        rng = random.Random(7)
        for srv in self.pool:
            at = self.pool.next_probe_at(srv.name, self.now, rng)
            if self.health is None or srv.state is State.DISABLED:
                assert at is None
            elif srv.health is State.EJECTED:
                assert at == max(self.now, self.ejected_until[srv.name])
            else:
                base = probe_interval(self.health, srv.health)
                assert base is not None
                assert at is not None
                j = self.health.jitter
                assert base * (1 - j) - 1e-9 <= at - self.now <= base * (1 + j) + 1e-9


HealthMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
TestHealthMachine = HealthMachine.TestCase


def test_pool_reports_its_real_size_when_empty_at_start() -> None:
    """With initial = "unknown" nothing is eligible at start: one PoolEmpty naming all servers."""
    from lbtcp.config import PoolConfig, ServerConfig
    from lbtcp.events import PoolEmpty
    from lbtcp.pool import Pool

    config = PoolConfig(
        name="app",
        servers=tuple(ServerConfig(address=f"127.0.0.1:{port}") for port in (1, 2, 3)),
        health=HealthConfig(),
    )
    pool = Pool.from_config(config, now=0.0)
    empties = [e for e in pool.initial_events if isinstance(e, PoolEmpty)]
    assert len(empties) == 1
    assert empties[0].servers == 3
