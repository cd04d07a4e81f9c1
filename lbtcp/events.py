"""Events emitted by lbtcp's pure core.

The core (health, pool, balancing) never logs and never touches metrics itself: each call returns
a list of these frozen dataclasses, and the I/O layer turns them into log lines, metric updates
and actions (closing a down server's sessions, rescheduling a probe). Keeping them plain data
makes the core testable by comparing lists, and lets a control-plane process forward them.

Every event derives from ``Event`` so that ``list[Event]`` is a precise return type. Fields are
plain values: strings, numbers and ``str``-valued enums (``State`` compares equal to its string
value and serialises to it in JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: health imports this module at run time
    from lbtcp.health import State

__all__ = [
    "EjectionSkipped",
    "Event",
    "PoolEmpty",
    "PoolRecovered",
    "ServerAdded",
    "ServerEjected",
    "ServerStateChanged",
]


class Event:
    """Base of every event emitted by the core. Holds no fields of its own."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ServerAdded(Event):
    """A server joined a pool's health tracking (config load, reload, or DNS discovery)."""

    pool: str
    server: str
    state: State  # its initial state: "unknown", or "healthy" (initial = "healthy" / no probes)
    at: float


@dataclass(frozen=True, slots=True)
class ServerStateChanged(Event):
    """A server's displayed state or its underlying health state changed.

    ``old``/``new`` are the states shown to operators (admin state over health: a draining
    server shows ``draining`` whatever its probes say). ``old_health``/``new_health`` are the
    health states underneath, so a draining server that fails its probes still produces an
    event. ``marked_down`` is true when the health went from in-service (healthy/failing) to
    out of service (unhealthy/ejected): the hook for ``on_server_down = "close"`` (HAProxy's
    ``on-marked-down shutdown-sessions``). Admin actions and removal never set it.
    """

    pool: str
    server: str
    old: State
    new: State
    reason: str  # e.g. "probe: 3 consecutive failures (timeout)", "admin: drain", "removed"
    at: float
    old_health: State
    new_health: State
    marked_down: bool = False


@dataclass(frozen=True, slots=True)
class ServerEjected(Event):
    """Passive outlier detection ejected a server (always paired with a ServerStateChanged)."""

    pool: str
    server: str
    count: int  # the ejection multiplier n: this ejection lasts base_time * n (capped, jittered)
    duration: float  # seconds, after the cap and the jitter
    until: float  # the time (same clock as ``at``) at which the ejection expires
    at: float


@dataclass(frozen=True, slots=True)
class EjectionSkipped(Event):
    """A server reached the passive failure threshold but was not ejected."""

    pool: str
    server: str
    reason: str  # "max_percent": ejecting it would exceed the pool's max_percent
    ejected: int  # servers of the pool ejected at that moment
    total: int  # servers in the pool
    at: float


@dataclass(frozen=True, slots=True)
class PoolEmpty(Event):
    """The pool has no server that takes new sessions any more (emitted once per episode).

    New clients will now be refused (``no_healthy``) unless the pool uses backups or panic
    mode; log this once here rather than once per refused client.
    """

    pool: str
    servers: int  # servers in the pool, none of them eligible
    at: float


@dataclass(frozen=True, slots=True)
class PoolRecovered(Event):
    """The pool has an eligible server again after a ``PoolEmpty``."""

    pool: str
    eligible: int
    at: float
