"""The health of a pool's servers: active probes, passive ejection and admin state (pure).

Theory of operation
-------------------
Each server has two layers, as in HAProxy, which keeps the admin state apart from the check
state:

* the **health** state, driven by active probes and by real traffic (passive outlier detection):
  ``UNKNOWN``, ``HEALTHY``, ``FAILING``, ``UNHEALTHY``, ``RISING``, ``EJECTED``;
* the **admin** state, driven by the operator: enabled, ``DRAINING`` or ``DISABLED``.

The state shown to operators (``ServerHealth.state``) is the admin state when it is not
"enabled", else the health state; ``REMOVED`` is terminal. One table, ``TRANSITIONS``, maps
every (shown state, input) pair to either the next state or a small handler that updates the
counters and returns the next state; a pair missing from it raises ``TransitionError`` (a test
checks that none is missing). While a server is DRAINING or DISABLED its health inputs are
*delegated* to the health layer underneath: the table's row for the underlying health state
is applied there and the shown state stays DRAINING/DISABLED.

Probes (``rise``/``fall``, HAProxy ``check``): every count is of *consecutive* results.
HEALTHY --fail--> FAILING (still in service, as HAProxy's "going down") --fall fails-->
UNHEALTHY --ok--> RISING --rise oks--> HEALTHY. A success while FAILING goes straight back to
HEALTHY; a failure while RISING goes back down. ``initial = "unknown"`` starts a server in
UNKNOWN: out of service until ``rise`` successes (or UNHEALTHY after ``fall`` failures);
``initial = "healthy"`` starts it HEALTHY. Without a ``[health]`` table there are no probes
and every server is HEALTHY unless ejected.

Passive ejection (Envoy outlier detection, HAProxy ``observe layer4``): ``consecutive_failures``
connect failures in a row eject an in-service server for ``base_time * n`` (n = its ejection
multiplier, which grows by one per ejection and stops growing once ``base_time * n`` reaches
``max_time``, so that decay from the top takes bounded time), capped at ``max_time``, then
randomised by ± the jitter fraction. The jitter is the pool's ``health.jitter`` when probes are
configured, else the default 0.1, so that servers ejected together do not return together.
The multiplier decays by one every ``base_time`` the server spends in service and not ejected
(Envoy's decay). A pool never has more than ``max_percent`` of its servers ejected, except that
one server may always be: an ejection beyond the cap is skipped (``EjectionSkipped``) and the
failure count starts over. Passive results only count while a server is in service; probe
results are ignored while it is ejected: probes pause until the ejection expires (the next
probe is due exactly then). On expiry, a pool with probes moves the server to UNHEALTHY, so it
returns only after ``rise`` fresh successes; a pool without probes returns it to HEALTHY.

Admin: DRAINING takes no new sessions, live ones continue, probes continue underneath, and
"enable" returns to whatever the probes say now. DISABLED is out of rotation and not probed
(HAProxy's MAINT); probe and traffic results that arrive late are ignored. Because nothing is
known after a disable, "enable" (or "drain") restarts the health layer as for a newly added
server (``initial``), except that a running ejection and the ejection multiplier are kept.

Slow start (HAProxy ``slowstart``): when a server that was out of service (unhealthy, ejected
or disabled) becomes healthy again, ``weight_factor`` ramps linearly from 0.1 to 1.0 over
``slow_start`` seconds. It never applies to a server's first start.

Time is always passed in (``now``); the glue keeps one timer at ``next_deadline()`` and calls
``tick``. Every public call first applies the timers that are due, so a late ``tick`` never
leaves a state stale. Every mutating call returns a list of events (``lbtcp.events``).

Wiring: the prober reports each result with ``on_probe`` and schedules the next one at
``next_probe_at`` (after each result, and again on any ``ServerStateChanged`` of that server,
since a state change changes the interval); the connector reports every connect attempt with
``on_connect``; ``ServerStateChanged.marked_down`` drives ``on_server_down = "close"``;
``PoolEmpty``/``PoolRecovered`` are logged once per episode; the balancer asks ``is_eligible``
and ``weight_factor``; a reload calls ``add``/``remove``/``reconfigure``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator
from enum import Enum
from typing import TypeAlias

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

__all__ = [
    "DEFAULT_EJECTION_JITTER",
    "DOWN_STATES",
    "HEALTH_STATES",
    "SLOW_START_FLOOR",
    "TRANSITIONS",
    "UP_STATES",
    "Admin",
    "AdminAction",
    "Input",
    "PoolHealth",
    "ProbeResult",
    "ServerHealth",
    "State",
    "TransitionError",
    "jittered",
    "probe_interval",
    "spread_first_probes",
]

DEFAULT_EJECTION_JITTER = HealthConfig().jitter  # used when the pool has no [health] table
SLOW_START_FLOOR = 0.1  # weight factor at the moment of recovery


class State(str, Enum):
    """What a server is doing, as shown to operators (admin state over health state)."""

    UNKNOWN = "unknown"  # not probed conclusively yet; out of service
    HEALTHY = "healthy"
    FAILING = "failing"  # healthy, but failed fewer than `fall` probes in a row; in service
    UNHEALTHY = "unhealthy"
    RISING = "rising"  # unhealthy/unknown, passed fewer than `rise` probes in a row
    EJECTED = "ejected"  # passive outlier ejection running
    DRAINING = "draining"  # admin: no new sessions, live ones continue, still probed
    DISABLED = "disabled"  # admin: out of rotation, not probed
    REMOVED = "removed"  # gone from the pool (reload, DNS); terminal


HEALTH_STATES = frozenset(
    {State.UNKNOWN, State.HEALTHY, State.FAILING, State.UNHEALTHY, State.RISING, State.EJECTED}
)
UP_STATES = frozenset({State.HEALTHY, State.FAILING})  # in service, takes new sessions
DOWN_STATES = frozenset({State.UNHEALTHY, State.EJECTED})  # known bad


class Input(Enum):
    """Everything that can happen to a server."""

    PROBE_OK = "probe_ok"
    PROBE_FAIL = "probe_fail"
    PROBE_TIMEOUT = "probe_timeout"
    PASSIVE_OK = "passive_ok"  # a real client's connect to the server succeeded
    PASSIVE_FAIL = "passive_fail"  # ... failed (refused, timed out, reset)
    EJECTION_EXPIRED = "ejection_expired"
    ADMIN_DRAIN = "admin_drain"
    ADMIN_ENABLE = "admin_enable"
    ADMIN_DISABLE = "admin_disable"
    REMOVED = "removed"
    PROBES_REMOVED = "probes_removed"  # a reload dropped the pool's [health] table


class ProbeResult(str, Enum):
    """The outcome of one active probe, as reported by the prober."""

    OK = "ok"
    FAIL = "fail"
    TIMEOUT = "timeout"


class AdminAction(str, Enum):
    """An operator's command (admin API ``POST .../drain|enable|disable``)."""

    DRAIN = "drain"
    ENABLE = "enable"
    DISABLE = "disable"


class Admin(str, Enum):
    """The admin layer of a server."""

    ENABLED = "enabled"
    DRAINING = "draining"
    DISABLED = "disabled"


class TransitionError(RuntimeError):
    """The transition table has no entry for a (state, input) pair: a bug, never user error."""

    def __init__(self, state: State, inp: Input, detail: str = "") -> None:
        self.state = state
        self.input = inp
        extra = f": {detail}" if detail else ""
        super().__init__(f"no health transition for ({state.name}, {inp.name}){extra}")


_PROBE_INPUTS = {
    ProbeResult.OK: Input.PROBE_OK,
    ProbeResult.FAIL: Input.PROBE_FAIL,
    ProbeResult.TIMEOUT: Input.PROBE_TIMEOUT,
}
_ADMIN_INPUTS = {
    AdminAction.DRAIN: Input.ADMIN_DRAIN,
    AdminAction.ENABLE: Input.ADMIN_ENABLE,
    AdminAction.DISABLE: Input.ADMIN_DISABLE,
}


class ServerHealth:
    """The health record of one server. Read its attributes; change it only via PoolHealth.

    Attributes: ``name``; ``state`` (shown), ``health`` (underlying), ``admin``; ``eligible``
    (takes new sessions); ``ok_streak``/``fail_streak`` (consecutive probe results);
    ``passive_failures`` (consecutive connect failures); ``ejections`` (the decaying ejection
    multiplier n); ``ejections_total``; ``ejected_at``/``ejected_until`` (while ejected);
    ``recovered_at`` (start of the slow-start ramp, or None).
    """

    __slots__ = (
        "admin",
        "decay_at",
        "ejected_at",
        "ejected_until",
        "ejections",
        "ejections_total",
        "eligible",
        "fail_streak",
        "health",
        "known",
        "name",
        "ok_streak",
        "passive_failures",
        "recovered_at",
        "removed",
        "state",
        "was_down",
    )

    def __init__(self, name: str, health: State) -> None:
        self.name = name
        self.health = health
        self.admin = Admin.ENABLED
        self.removed = False
        self.state = health
        self.eligible = health in UP_STATES
        self.ok_streak = 0
        self.fail_streak = 0
        self.passive_failures = 0
        self.ejections = 0
        self.ejections_total = 0
        self.ejected_at: float | None = None
        self.ejected_until: float | None = None
        self.decay_at: float | None = None
        self.recovered_at: float | None = None
        # Has the health layer reached a verdict (up or down) since the last (re)start? Decides
        # whether a failure while RISING falls back to UNKNOWN or to UNHEALTHY.
        self.known = health is not State.UNKNOWN
        # Was the server out of service since it was last up? Slow start only ramps then.
        self.was_down = False

    def _refresh(self) -> None:
        if self.removed:
            self.state = State.REMOVED
        elif self.admin is Admin.DRAINING:
            self.state = State.DRAINING
        elif self.admin is Admin.DISABLED:
            self.state = State.DISABLED
        else:
            self.state = self.health
        self.eligible = self.state in UP_STATES

    def __repr__(self) -> str:
        return f"<ServerHealth {self.name} {self.state.value} (health {self.health.value})>"


class _Step:
    """The context of applying one input to one server: handlers read and fill it."""

    __slots__ = ("detail", "events", "inp", "now", "pool", "reason")

    def __init__(self, pool: PoolHealth, inp: Input, now: float, reason: str, detail: str):
        self.pool = pool
        self.inp = inp
        self.now = now
        self.reason = reason  # of the ServerStateChanged, if the state changes
        self.detail = detail  # e.g. the probe failure kind, for the reason text
        self.events: list[Event] = []  # emitted after the ServerStateChanged


Handler: TypeAlias = Callable[[ServerHealth, _Step], State]
Rule: TypeAlias = State | Handler


# --- handlers: each updates counters and returns the next state ----------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('ss') else 's'}"


def _seconds(value: float) -> str:
    return f"{round(value, 1):g}s"


def _probe_ok_up(srv: ServerHealth, step: _Step) -> State:
    """HEALTHY/FAILING + a successful probe: any failure streak is over."""
    srv.fail_streak = 0
    srv.ok_streak += 1
    step.reason = "probe: success"
    return State.HEALTHY


def _probe_fail_up(srv: ServerHealth, step: _Step) -> State:
    """HEALTHY/FAILING + a failed probe: out of service after `fall` in a row."""
    srv.ok_streak = 0
    srv.fail_streak += 1
    step.reason = f"probe: {_plural(srv.fail_streak, 'consecutive failure')} ({step.detail})"
    return State.UNHEALTHY if srv.fail_streak >= step.pool.fall else State.FAILING


def _probe_ok_down(srv: ServerHealth, step: _Step) -> State:
    """UNKNOWN/UNHEALTHY/RISING + a successful probe: in service after `rise` in a row."""
    srv.fail_streak = 0
    srv.ok_streak += 1
    step.reason = f"probe: {_plural(srv.ok_streak, 'consecutive success')}"
    return State.HEALTHY if srv.ok_streak >= step.pool.rise else State.RISING


def _probe_fail_down(srv: ServerHealth, step: _Step) -> State:
    """UNKNOWN/UNHEALTHY/RISING + a failed probe: back down; UNKNOWN stays so until `fall`."""
    srv.ok_streak = 0
    srv.fail_streak += 1
    step.reason = f"probe: {_plural(srv.fail_streak, 'consecutive failure')} ({step.detail})"
    if srv.known or srv.fail_streak >= step.pool.fall:
        return State.UNHEALTHY
    return State.UNKNOWN


def _passive_ok(srv: ServerHealth, step: _Step) -> State:
    """An in-service server accepted a real connection: the failure run is over."""
    srv.passive_failures = 0
    return srv.health


def _passive_fail(srv: ServerHealth, step: _Step) -> State:
    """An in-service server failed a real connection: eject after the threshold, if allowed."""
    pool = step.pool
    threshold = pool.ejection.consecutive_failures
    srv.passive_failures += 1
    if threshold <= 0 or srv.passive_failures < threshold:
        return srv.health
    # Start counting over whether or not the ejection happens: a skipped ejection is retried
    # after another full run of failures, not on every failure (Envoy resets it the same way).
    srv.passive_failures = 0
    ejected, total = pool.ejected_count(), len(pool)
    if ejected >= pool.max_ejected():
        step.events.append(
            EjectionSkipped(pool.pool, srv.name, "max_percent", ejected, total, step.now)
        )
        return srv.health
    n = min(srv.ejections + 1, pool.max_multiplier())
    duration = pool.ejection_time(n)
    srv.ejections = n
    srv.ejections_total += 1
    srv.ejected_at = step.now
    srv.ejected_until = step.now + duration
    srv.ok_streak = srv.fail_streak = 0
    step.reason = (
        f"passive: {_plural(threshold, 'consecutive connect failure')}, "
        f"ejected for {_seconds(duration)} (ejection {n})"
    )
    step.events.append(ServerEjected(pool.pool, srv.name, n, duration, srv.ejected_until, step.now))
    return State.EJECTED


def _expire(srv: ServerHealth, step: _Step) -> State:
    """EJECTED + its time is up: back through the probes, or straight back without probes."""
    srv.ok_streak = srv.fail_streak = 0
    step.reason = "ejection expired"
    return State.HEALTHY if step.pool.health is None else State.UNHEALTHY


def _probes_removed(srv: ServerHealth, step: _Step) -> State:
    """A reload dropped the probes: without probes every server that is not ejected is up."""
    srv.ok_streak = srv.fail_streak = 0
    step.reason = "probes removed"
    return State.HEALTHY


def _delegate(srv: ServerHealth, step: _Step) -> State:
    """DRAINING/DISABLED + a health input: apply the health row underneath, keep the admin."""
    target = _resolve(srv, srv.health, step)
    if target not in HEALTH_STATES:
        raise TransitionError(srv.health, step.inp, f"delegated to a non-health state {target}")
    _move(srv, target, step)
    return srv.state


def _undrain(srv: ServerHealth, step: _Step) -> State:
    """DRAINING + enable: back to whatever the probes (which kept running) say now."""
    return srv.health


def _restart(srv: ServerHealth, step: _Step) -> State:
    """DISABLED + enable: nothing was probed, so start over as a newly added server would."""
    now = step.now
    srv.ok_streak = srv.fail_streak = srv.passive_failures = 0
    if srv.health is not State.EJECTED:  # a running ejection is kept
        initial = step.pool.initial_state()
        srv.known = initial is not State.UNKNOWN
        srv.was_down = True  # it was out of service: slow start applies when it comes back
        if srv.health is not initial:
            _move(srv, initial, step)
        elif initial in UP_STATES:  # HEALTHY -> HEALTHY: _move sees no change, ramp by hand
            srv.recovered_at = now
            srv.was_down = False
    return srv.health


def _restart_draining(srv: ServerHealth, step: _Step) -> State:
    """DISABLED + drain: restart the health layer (probes resume) but take no sessions."""
    _restart(srv, step)
    return State.DRAINING


# --- the table -----------------------------------------------------------------------------

# Admin inputs and removal behave the same from every health state.
_ADMIN: dict[Input, Rule] = {
    Input.ADMIN_DRAIN: State.DRAINING,
    Input.ADMIN_DISABLE: State.DISABLED,
    Input.REMOVED: State.REMOVED,
}
# Health inputs while an admin state holds: the health layer keeps running underneath.
_UNDERNEATH: dict[Input, Rule] = {
    Input.PROBE_OK: _delegate,
    Input.PROBE_FAIL: _delegate,
    Input.PROBE_TIMEOUT: _delegate,
    Input.PASSIVE_OK: _delegate,
    Input.PASSIVE_FAIL: _delegate,
    Input.EJECTION_EXPIRED: _delegate,
    Input.PROBES_REMOVED: _delegate,
}

_ROWS: dict[State, dict[Input, Rule]] = {
    State.UNKNOWN: {
        Input.PROBE_OK: _probe_ok_down,
        Input.PROBE_FAIL: _probe_fail_down,
        Input.PROBE_TIMEOUT: _probe_fail_down,
        Input.PASSIVE_OK: State.UNKNOWN,  # not in service: real traffic only reaches it in
        Input.PASSIVE_FAIL: State.UNKNOWN,  # panic mode, and then it says nothing new
        Input.EJECTION_EXPIRED: State.UNKNOWN,  # a stale timer
        Input.ADMIN_ENABLE: State.UNKNOWN,  # already enabled
        Input.PROBES_REMOVED: _probes_removed,
        **_ADMIN,
    },
    State.HEALTHY: {
        Input.PROBE_OK: _probe_ok_up,
        Input.PROBE_FAIL: _probe_fail_up,
        Input.PROBE_TIMEOUT: _probe_fail_up,
        Input.PASSIVE_OK: _passive_ok,
        Input.PASSIVE_FAIL: _passive_fail,
        Input.EJECTION_EXPIRED: State.HEALTHY,
        Input.ADMIN_ENABLE: State.HEALTHY,
        Input.PROBES_REMOVED: State.HEALTHY,
        **_ADMIN,
    },
    State.FAILING: {
        Input.PROBE_OK: _probe_ok_up,
        Input.PROBE_FAIL: _probe_fail_up,
        Input.PROBE_TIMEOUT: _probe_fail_up,
        Input.PASSIVE_OK: _passive_ok,
        Input.PASSIVE_FAIL: _passive_fail,
        Input.EJECTION_EXPIRED: State.FAILING,
        Input.ADMIN_ENABLE: State.FAILING,
        Input.PROBES_REMOVED: _probes_removed,
        **_ADMIN,
    },
    State.UNHEALTHY: {
        Input.PROBE_OK: _probe_ok_down,
        Input.PROBE_FAIL: _probe_fail_down,
        Input.PROBE_TIMEOUT: _probe_fail_down,
        Input.PASSIVE_OK: State.UNHEALTHY,
        Input.PASSIVE_FAIL: State.UNHEALTHY,
        Input.EJECTION_EXPIRED: State.UNHEALTHY,
        Input.ADMIN_ENABLE: State.UNHEALTHY,
        Input.PROBES_REMOVED: _probes_removed,
        **_ADMIN,
    },
    State.RISING: {
        Input.PROBE_OK: _probe_ok_down,
        Input.PROBE_FAIL: _probe_fail_down,
        Input.PROBE_TIMEOUT: _probe_fail_down,
        Input.PASSIVE_OK: State.RISING,
        Input.PASSIVE_FAIL: State.RISING,
        Input.EJECTION_EXPIRED: State.RISING,
        Input.ADMIN_ENABLE: State.RISING,
        Input.PROBES_REMOVED: _probes_removed,
        **_ADMIN,
    },
    State.EJECTED: {
        Input.PROBE_OK: State.EJECTED,  # probes pause while ejected; a late result is ignored
        Input.PROBE_FAIL: State.EJECTED,
        Input.PROBE_TIMEOUT: State.EJECTED,
        Input.PASSIVE_OK: State.EJECTED,  # a connect begun before the ejection
        Input.PASSIVE_FAIL: State.EJECTED,
        Input.EJECTION_EXPIRED: _expire,
        Input.ADMIN_ENABLE: State.EJECTED,
        Input.PROBES_REMOVED: State.EJECTED,  # on expiry it will go straight to HEALTHY
        **_ADMIN,
    },
    State.DRAINING: {
        **_UNDERNEATH,
        Input.ADMIN_DRAIN: State.DRAINING,
        Input.ADMIN_ENABLE: _undrain,
        Input.ADMIN_DISABLE: State.DISABLED,
        Input.REMOVED: State.REMOVED,
    },
    State.DISABLED: {
        **_UNDERNEATH,
        Input.PROBE_OK: State.DISABLED,  # not probed: a late result says nothing current
        Input.PROBE_FAIL: State.DISABLED,
        Input.PROBE_TIMEOUT: State.DISABLED,
        Input.PASSIVE_OK: State.DISABLED,  # not in rotation: a late connect result likewise
        Input.PASSIVE_FAIL: State.DISABLED,
        Input.ADMIN_DRAIN: _restart_draining,
        Input.ADMIN_ENABLE: _restart,
        Input.ADMIN_DISABLE: State.DISABLED,
        Input.REMOVED: State.REMOVED,
    },
    State.REMOVED: dict.fromkeys(Input, State.REMOVED),  # terminal: late inputs are ignored
}

TRANSITIONS: dict[tuple[State, Input], Rule] = {
    (state, inp): rule for state, row in _ROWS.items() for inp, rule in row.items()
}
"""Every (shown state, input) pair -> the next shown state, or a handler returning it."""


def _resolve(srv: ServerHealth, state: State, step: _Step) -> State:
    try:
        rule = TRANSITIONS[(state, step.inp)]
    except KeyError:
        raise TransitionError(state, step.inp) from None
    return rule if isinstance(rule, State) else rule(srv, step)


def _move(srv: ServerHealth, new: State, step: _Step) -> None:
    """Set the health layer, keeping the timers and flags that hang off it consistent."""
    old = srv.health
    if new is old:
        return
    srv.health = new
    now = step.now
    if new is not State.UNKNOWN and new is not State.RISING:
        srv.known = True
    if new in DOWN_STATES:
        srv.was_down = True
    if old is State.EJECTED:
        srv.ejected_at = srv.ejected_until = None
    if new in UP_STATES:
        if old not in UP_STATES:
            if srv.was_down:
                srv.recovered_at = now
                srv.was_down = False
            base = step.pool.ejection.base_time
            srv.decay_at = now + base if srv.ejections > 0 and base > 0 else None
    else:
        # Out of service: no slow-start ramp, no decay, and a passive failure run is void.
        srv.recovered_at = None
        srv.decay_at = None
        srv.passive_failures = 0


def _apply(srv: ServerHealth, step: _Step) -> None:
    """Run one input through the table from the server's shown state."""
    target = _resolve(srv, srv.state, step)
    if target in HEALTH_STATES:
        _move(srv, target, step)
        srv.admin = Admin.ENABLED
    elif target is State.DRAINING:
        srv.admin = Admin.DRAINING
    elif target is State.DISABLED:
        srv.admin = Admin.DISABLED
    else:
        srv.removed = True
    srv._refresh()


# --- probe scheduling (pure) ---------------------------------------------------------------


def probe_interval(health: HealthConfig, state: State) -> float | None:
    """The base delay before the next probe of a server whose *health* state is ``state``.

    ``interval`` while healthy, ``fast_interval`` while the state is changing (failing, rising,
    unknown), ``down_interval`` while unhealthy; None while ejected (probes pause until the
    ejection expires) and for the admin/removed states, which are not health states.
    """
    if state is State.HEALTHY:
        return health.interval
    if state in (State.FAILING, State.RISING, State.UNKNOWN):
        return health.fast_interval
    if state is State.UNHEALTHY:
        return health.down_interval
    return None


def jittered(base: float, fraction: float, rng: random.Random) -> float:
    """``base`` randomised uniformly within ± ``fraction`` of itself (never negative)."""
    if fraction <= 0 or base <= 0:
        return base
    return max(0.0, base * (1.0 + rng.uniform(-fraction, fraction)))


def spread_first_probes(names: Iterable[str], interval: float, now: float) -> dict[str, float]:
    """First probe times spread over one interval: server i of n at ``now + i/n * interval``.

    Probing a whole pool at the same instant would burst connections at every start and
    reload, and keep the probes in lock-step ever after.
    """
    ordered = list(names)
    count = len(ordered)
    return {name: now + i / count * interval for i, name in enumerate(ordered)}


# --- the pool ------------------------------------------------------------------------------


class PoolHealth:
    """The health of every server of one pool, and the pool-level rules over them.

    The pool-level rules need all servers at once: the ``max_percent`` ejection cap, the
    eligible count for the panic threshold, and ``PoolEmpty``/``PoolRecovered``. Servers are
    keyed by name. Calls about an unknown name are ignored for probe and traffic reports (a
    result may arrive after its server was removed) and raise ``KeyError`` otherwise.
    """

    def __init__(
        self,
        pool: str,
        health: HealthConfig | None,
        ejection: EjectionConfig,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.pool = pool
        self.health = health
        self.ejection = ejection
        self._rng = rng if rng is not None else random.Random()
        self._servers: dict[str, ServerHealth] = {}
        self._eligible = 0
        self._empty = False  # a PoolEmpty was emitted and no PoolRecovered since
        self._deadline: float | None = None
        self._deadline_stale = False

    # -- configuration-derived values, used by the handlers --

    @property
    def rise(self) -> int:
        return max(1, self.health.rise) if self.health is not None else 1

    @property
    def fall(self) -> int:
        return max(1, self.health.fall) if self.health is not None else 1

    def initial_state(self) -> State:
        """The health state of a newly added (or re-enabled) server."""
        if self.health is None or self.health.initial == "healthy":
            return State.HEALTHY
        return State.UNKNOWN

    def max_ejected(self) -> int:
        """How many servers may be ejected at once: ``max_percent`` of them, but at least 1."""
        return max(1, len(self._servers) * self.ejection.max_percent // 100)

    def _max_time(self) -> float:
        # Envoy's rule: the cap is never below the base time (config also rejects that).
        return max(self.ejection.max_time, self.ejection.base_time)

    def max_multiplier(self) -> int:
        """The largest useful ejection multiplier: the first n with base_time * n >= max_time."""
        base = self.ejection.base_time
        return max(1, math.ceil(self._max_time() / base)) if base > 0 else 1

    def ejection_jitter(self) -> float:
        """The jitter fraction of ejection times (the probes' jitter, or 0.1 without probes)."""
        return self.health.jitter if self.health is not None else DEFAULT_EJECTION_JITTER

    def ejection_time(self, n: int) -> float:
        """How long ejection number ``n`` lasts: base_time * n, capped, ± jitter (random)."""
        nominal = min(self.ejection.base_time * n, self._max_time())
        return jittered(nominal, self.ejection_jitter(), self._rng)

    # -- membership --

    def add(self, name: str, now: float) -> list[Event]:
        """Start tracking a server, in the initial state. ``ValueError`` if already present."""
        if name in self._servers:
            raise ValueError(f"server {name!r} is already in pool {self.pool!r}")
        events = self._advance(now)
        srv = ServerHealth(name, self.initial_state())
        self._servers[name] = srv
        if srv.eligible:
            self._eligible += 1
        events.append(ServerAdded(self.pool, name, srv.state, now))
        return self._finish(events, now)

    def remove(self, name: str, now: float, reason: str = "removed") -> list[Event]:
        """Stop tracking a server (reload, DNS). ``KeyError`` if unknown. ``reason`` goes
        into the state-change event (e.g. "dns: no longer in the answer")."""
        srv = self._servers[name]
        events = self._advance(now)
        self._run(srv, Input.REMOVED, now, events, reason)
        del self._servers[name]
        self._deadline_stale = True
        return self._finish(events, now)

    def reconfigure(
        self, health: HealthConfig | None, ejection: EjectionConfig, now: float
    ) -> list[Event]:
        """Apply a reload's new settings; servers keep their states and counters.

        Dropping the ``[health]`` table brings every server that is not ejected to HEALTHY
        (without probes nothing else could bring it back). Adding it keeps healthy servers
        healthy until the probes say otherwise. Running ejections keep their end time.
        """
        events = self._advance(now)
        had_probes = self.health is not None
        self.health = health
        self.ejection = ejection
        if had_probes and health is None:
            for srv in list(self._servers.values()):
                self._run(srv, Input.PROBES_REMOVED, now, events)
        self._deadline_stale = True
        return self._finish(events, now)

    # -- inputs --

    def on_probe(self, name: str, result: ProbeResult, now: float, detail: str = "") -> list[Event]:
        """An active probe of ``name`` finished. ``detail`` (e.g. "connection refused",
        "expect mismatch") goes into the reason text; it defaults to the result's name.

        Ignored for unknown servers and when the pool has no probes (a late result).
        """
        events = self._advance(now)
        srv = self._servers.get(name)
        if srv is not None and self.health is not None:
            self._run(srv, _PROBE_INPUTS[result], now, events, "", detail or result.value)
        return self._finish(events, now)

    def on_connect(self, name: str, ok: bool, now: float) -> list[Event]:
        """A real client's connect attempt to ``name`` finished (passive outlier detection).

        Report failures of the connect itself only (refused, timed out, reset before
        established); what happens to the session afterwards is not the server's health.
        """
        events = self._advance(now)
        srv = self._servers.get(name)
        if srv is not None:
            self._run(srv, Input.PASSIVE_OK if ok else Input.PASSIVE_FAIL, now, events)
        return self._finish(events, now)

    def admin(self, name: str, action: AdminAction, now: float) -> list[Event]:
        """An operator drains, enables or disables ``name``. ``KeyError`` if unknown."""
        srv = self._servers[name]
        events = self._advance(now)
        self._run(srv, _ADMIN_INPUTS[action], now, events, f"admin: {action.value}")
        return self._finish(events, now)

    def tick(self, now: float) -> list[Event]:
        """Apply the timers due by ``now``: ejection expiries and multiplier decay."""
        return self._finish(self._advance(now), now)

    # -- queries --

    def next_deadline(self) -> float | None:
        """The earliest time ``tick`` has work to do, or None: keep one timer at it."""
        if self._deadline_stale:
            times = [
                t
                for srv in self._servers.values()
                for t in (srv.ejected_until, srv.decay_at)
                if t is not None
            ]
            self._deadline = min(times) if times else None
            self._deadline_stale = False
        return self._deadline

    def next_probe_at(self, name: str, now: float, rng: random.Random) -> float | None:
        """When to start the next probe of ``name`` (after the previous one finished, or on a
        ServerStateChanged); None if it needs no probe now (no probes configured, disabled,
        removed, unknown name).

        The delay follows the health state (a draining server is probed like its health):
        ``interval`` while healthy, ``fast_interval`` while failing, rising or unknown,
        ``down_interval`` while unhealthy, each ± ``jitter``; while ejected, probes wait for
        the ejection to expire and the next one is due exactly then.
        """
        srv = self._servers.get(name)
        if srv is None or self.health is None or srv.admin is Admin.DISABLED:
            return None
        if srv.health is State.EJECTED and srv.ejected_until is not None:
            return max(now, srv.ejected_until)
        base = probe_interval(self.health, srv.health)
        if base is None:  # pragma: no cover - every non-ejected health state has an interval
            return None
        return now + jittered(base, self.health.jitter, rng)

    def first_probe_times(self, now: float) -> dict[str, float]:
        """Initial probe times for every server that needs probes, spread over one interval."""
        if self.health is None:
            return {}
        names = [n for n, s in self._servers.items() if s.admin is not Admin.DISABLED]
        return spread_first_probes(names, self.health.interval, now)

    def is_eligible(self, name: str) -> bool:
        """Does ``name`` take new sessions (enabled and healthy or failing)? False if unknown."""
        srv = self._servers.get(name)
        return srv is not None and srv.eligible

    def healthy_count(self) -> int:
        """How many servers take new sessions (for the pool's panic threshold)."""
        return self._eligible

    def ejected_count(self) -> int:
        """How many servers are ejected right now (draining/disabled ones included)."""
        return sum(1 for srv in self._servers.values() if srv.health is State.EJECTED)

    def weight_factor(self, name: str, now: float) -> float:
        """Slow start: a multiplier of the server's configured weight, from 0.1 right after
        recovery to 1.0 after ``slow_start`` seconds; 1.0 otherwise (and for unknown names).

        The ramp is continuous: while any server's factor is below 1.0, the pool should
        refresh its effective weights now and then (e.g. every second).
        """
        srv = self._servers.get(name)
        span = self.ejection.slow_start
        if srv is None or srv.recovered_at is None or span <= 0:
            return 1.0
        elapsed = now - srv.recovered_at
        if elapsed >= span:
            return 1.0
        return SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(0.0, elapsed) / span

    def state(self, name: str) -> State:
        """The state shown for ``name``. ``KeyError`` if unknown."""
        return self._servers[name].state

    def health_state(self, name: str) -> State:
        """The health state under any admin state. ``KeyError`` if unknown."""
        return self._servers[name].health

    def server(self, name: str) -> ServerHealth:
        """The record of ``name``, for status pages (read only). ``KeyError`` if unknown."""
        return self._servers[name]

    def names(self) -> list[str]:
        return list(self._servers)

    def __len__(self) -> int:
        return len(self._servers)

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def __iter__(self) -> Iterator[ServerHealth]:
        return iter(list(self._servers.values()))

    # -- internals --

    def _run(
        self,
        srv: ServerHealth,
        inp: Input,
        now: float,
        events: list[Event],
        reason: str = "",
        detail: str = "",
    ) -> None:
        old_state, old_health, was_eligible = srv.state, srv.health, srv.eligible
        timers = (srv.ejected_until, srv.decay_at)
        step = _Step(self, inp, now, reason, detail)
        _apply(srv, step)
        if srv.eligible != was_eligible:
            self._eligible += 1 if srv.eligible else -1
        if (srv.ejected_until, srv.decay_at) != timers:
            self._deadline_stale = True
        if srv.state is not old_state or srv.health is not old_health:
            events.append(
                ServerStateChanged(
                    pool=self.pool,
                    server=srv.name,
                    old=old_state,
                    new=srv.state,
                    reason=step.reason or inp.value,
                    at=now,
                    old_health=old_health,
                    new_health=srv.health,
                    marked_down=old_health in UP_STATES and srv.health in DOWN_STATES,
                )
            )
        events.extend(step.events)

    def _advance(self, now: float) -> list[Event]:
        """Apply every timer due by ``now``, earliest first."""
        events: list[Event] = []
        deadline = self.next_deadline()
        if deadline is None or now < deadline:
            return events
        due = sorted(
            (
                srv
                for srv in self._servers.values()
                if srv.health is State.EJECTED
                and srv.ejected_until is not None
                and srv.ejected_until <= now
            ),
            key=lambda srv: srv.ejected_until or 0.0,
        )
        for srv in due:
            self._run(srv, Input.EJECTION_EXPIRED, now, events, "ejection expired")
        base = self.ejection.base_time
        for srv in self._servers.values():
            # Decay is bookkeeping, not a state change: no event, just a smaller multiplier.
            while srv.decay_at is not None and srv.decay_at <= now:
                srv.ejections = max(0, srv.ejections - 1)
                srv.decay_at = srv.decay_at + base if srv.ejections > 0 and base > 0 else None
        self._deadline_stale = True
        return events

    def _finish(self, events: list[Event], now: float) -> list[Event]:
        if self._eligible == 0 and not self._empty:
            self._empty = True
            events.append(PoolEmpty(self.pool, len(self._servers), now))
        elif self._eligible > 0 and self._empty:
            self._empty = False
            events.append(PoolRecovered(self.pool, self._eligible, now))
        return events
