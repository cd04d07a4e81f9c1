"""Name resolution for server addresses: A/AAAA and SRV lookups with a TTL cache.

Theory of operation
-------------------
Operators name servers by DNS (``db.internal:5432``) or discover them from SRV records. This
module turns those names into concrete ``ResolvedTarget``\\ s and keeps them current, doing what
the peers do not: HAProxy's resolvers ignore the answer's TTL, Envoy's strict DNS drops every
host when a lookup fails, Envoy has no SRV.

It has two layers.

*The pure part* (no asyncio, time passed in as ``now=``):

- ``clamp_ttl`` and ``backoff_delay``: when to look again after an answer or a failure.
- ``RecordEntry``: the cache entry for one ``(name, record type)``. It is a small state machine
  (a table, ``_TRANSITIONS``) over the states STARTING (no answer yet), UP (serving a good
  answer), STALE (lookups failing, still serving the last good answer until ``stale_until``)
  and DOWN (lookups failing, nothing left to serve), driven by ANSWER, FAILURE and EXPIRE. It
  reports a failure once at the start of an episode and once on recovery, however many retries
  happen in between.
- ``srv_to_targets``, ``address_targets`` and ``diff_targets``: records to targets, and what
  changed between two target sets.

*The I/O part*: a ``Resolver`` protocol with ``AioDnsResolver`` (aiodns / c-ares) and
``StaticResolver`` (a table, for tests), and ``DnsWatcher``, which owns one refresh task per
``(name, record type)`` shared by every watch that needs it (two pools naming the same host
cause one query, not two), feeds answers into the entries, and calls ``on_change`` for every
watch whose targets changed. Refreshes happen in the background when an entry's TTL runs out;
the connect path only ever reads ``current(key)``.

Failure policy: on a timeout, SERVFAIL, REFUSED or unreachable nameservers the last good
addresses are kept for ``stale_for`` seconds while lookups are retried with exponential
backoff (1 s doubling, capped at 30 s or ``max_ttl``, whichever is lower). NXDOMAIN and an
empty answer remove addresses only after ``stale_for`` too: a DNS server briefly serving a
broken zone must not empty a pool. An empty answer for a type that never had records (the
AAAA of an IPv4-only name under ``family = "any"``) is simply "no records", not a failure.

SRV: the lowest priority present gives the primaries, every higher priority the backups;
within a priority the heaviest record maps to weight 256 and the others keep their ratio to
it (minimum 1, so SRV weight 0 becomes 1); each address of a target gets the target's weight
(``map_srv_weight``, ``srv_to_targets``). Display names are ``host:port#IP`` for A/AAAA and
``target:port#IP`` for SRV, stable across refreshes so that pools keep per-server state.

Events and counters: ``DnsFailure`` once when a name starts failing (A and AAAA failing
together are one episode), ``DnsRecovered`` when it answers again, ``DnsChanged`` whenever a
watch's targets change. ``DnsWatcher.query_counts`` counts every lookup by result, one of
``QUERY_RESULTS`` (ok, nxdomain, nodata, servfail, refused, timeout, unreachable, error).

Notes on c-ares (pycares 5, c-ares 1.34): ``tries=1`` and a per-try timeout of
``timeout / len(nameservers)`` make one lookup fail within ``timeout`` even when every
nameserver is dead (c-ares tries each server ``tries`` times, doubling the timeout per round).
c-ares keeps its own query cache, bounded by the answer's TTL, which pycares cannot turn off.
A refresh at or after the TTL always misses it; a refresh that ``max_ttl`` brings before the
TTL asks for a ``fresh`` lookup, which uses a throwaway channel. Names are looked up as given
(no search domains, no /etc/hosts), as HAProxy's ``resolvers`` do; use fully qualified names.

Notes on cancellation: the waits here use ``_bounded`` (``asyncio.wait`` with a timeout), not
``asyncio.wait_for``, which before Python 3.12 loses a cancellation that arrives in the same
loop iteration as the awaited result (CPython gh-86296). c-ares hands answers back from its
own thread, so ``close()`` landing just as an answer arrives is an everyday race, and a
refresh task that loses its cancellation there refreshes for ever and ``close()`` never
returns. Each watcher lookup is also bounded as a whole (``lookup_timeout``), and ``close()``
waits a bounded time.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import aiodns
import aiodns.error
import pycares

from lbtcp.config import ResolverConfig

__all__ = [
    "EMPTY",
    "FAILURE_KINDS",
    "MAX_SERVER_WEIGHT",
    "QUERY_RESULTS",
    "AioDnsResolver",
    "Answer",
    "DnsChanged",
    "DnsEvent",
    "DnsFailure",
    "DnsRecovered",
    "DnsWatcher",
    "EntryFailed",
    "EntryRecovered",
    "EntryState",
    "EntryUpdate",
    "RecordEntry",
    "RecordSet",
    "RecordType",
    "ResolveError",
    "ResolvedTarget",
    "Resolver",
    "RetryPolicy",
    "SrvRecord",
    "StaticResolver",
    "TargetDiff",
    "address_targets",
    "backoff_delay",
    "clamp_ttl",
    "diff_targets",
    "map_srv_weight",
    "record_types_for",
    "srv_to_targets",
]

log = logging.getLogger("lbtcp.resolution")

MAX_SERVER_WEIGHT = 256
# How long to wait before asking again for a type that has no records (negative answers
# carry their TTL in the SOA, which c-ares does not hand back); clamped like any TTL.
EMPTY_REFRESH = 30.0
# Floor on any refresh delay, so that min_ttl = 0 with a TTL of 0 (Consul's default) cannot
# turn into a busy loop of queries.
MIN_REFRESH = 0.1
# How far beyond [resolver] timeout the watcher lets one lookup run before it counts it as a
# timeout itself: above AioDnsResolver's own backstop (timeout + 1 s), so that the resolver's
# more precise answer wins whenever the resolver works at all.
LOOKUP_MARGIN = 1.5
# How long a lookup that was given up on (timeout, or its refresh task cancelled) may take to
# unwind, e.g. to close a throwaway channel, before it is left to finish on its own.
UNWIND_GRACE = 1.0
# How long close() waits for the refresh tasks it cancelled.
CLOSE_GRACE = 2.0

FAILURE_KINDS = ("nxdomain", "nodata", "servfail", "refused", "timeout", "unreachable", "error")
QUERY_RESULTS = ("ok", *FAILURE_KINDS)


class RecordType(enum.Enum):
    """The record types lbtcp asks for."""

    A = "A"
    AAAA = "AAAA"
    SRV = "SRV"


def record_types_for(family: str) -> tuple[RecordType, ...]:
    """The address record types to query for a ``[resolver] family`` value."""
    if family == "ipv4":
        return (RecordType.A,)
    if family == "ipv6":
        return (RecordType.AAAA,)
    if family == "any":
        return (RecordType.A, RecordType.AAAA)
    raise ValueError(f"unknown address family {family!r} (ipv4, ipv6 or any)")


# --------------------------------------------------------------------------------------------
# Bounded waits that never swallow a cancellation
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _consume(future: asyncio.Future[_T]) -> None:
    # Mark an abandoned future's exception as retrieved: nobody is left to read it, and an
    # unread one is reported to the loop's exception handler when it is collected.
    if not future.cancelled():
        future.exception()


async def _abandon(inner: asyncio.Future[_T]) -> None:
    """Cancel ``inner`` and give it ``UNWIND_GRACE`` to finish; never waits longer."""
    inner.cancel()
    inner.add_done_callback(_consume)
    if not inner.done():
        await asyncio.wait((inner,), timeout=UNWIND_GRACE)


async def _bounded(awaitable: Awaitable[_T], timeout: float) -> _T:
    """Await ``awaitable`` for at most ``timeout`` seconds, else raise ``asyncio.TimeoutError``.

    Not ``asyncio.wait_for``: before Python 3.12, when the awaiting task is cancelled in the
    same loop iteration as the awaitable completes, ``wait_for`` returns the result and the
    cancellation is lost (CPython gh-86296). That is exactly what happens when
    ``DnsWatcher.close()`` cancels a refresh task while c-ares is handing back an answer, and
    the refresh task then lives on forever. ``asyncio.wait`` lets the cancellation through
    always; the awaitable is cancelled on the way out (timeout or cancellation alike).
    """
    inner = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((inner,), timeout=timeout)
    except BaseException:
        await _abandon(inner)
        raise
    if not done:
        await _abandon(inner)
        raise asyncio.TimeoutError
    return inner.result()


# --------------------------------------------------------------------------------------------
# Records, answers, targets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class SrvRecord:
    """One SRV record (RFC 2782). ``target`` is normalised: lower case, no trailing dot."""

    priority: int
    weight: int
    port: int
    target: str


def _normalise_name(name: str) -> str:
    return name.rstrip(".").lower()


def _address_sort_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return (ip.version, int(ip))


@dataclass(frozen=True, slots=True)
class RecordSet:
    """The records of one answer, in a canonical order so that equality means "unchanged"."""

    addresses: tuple[str, ...] = ()
    services: tuple[SrvRecord, ...] = ()

    @classmethod
    def of(cls, addresses: Iterable[str] = (), services: Iterable[SrvRecord] = ()) -> RecordSet:
        """Build a set from records in any order, dropping duplicates."""
        return cls(
            addresses=tuple(sorted(set(addresses), key=_address_sort_key)),
            services=tuple(sorted(set(services))),
        )

    def __bool__(self) -> bool:
        return bool(self.addresses or self.services)

    def __len__(self) -> int:
        return len(self.addresses) + len(self.services)


EMPTY = RecordSet()


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful lookup: its records and the lowest TTL among them (seconds)."""

    records: RecordSet
    ttl: float


class ResolveError(Exception):
    """A failed lookup. ``kind`` is one of ``FAILURE_KINDS``."""

    def __init__(self, kind: str, message: str = "") -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"unknown DNS failure kind {kind!r}")
        self.kind = kind
        self.message = message or kind
        super().__init__(f"{kind}: {self.message}")


@dataclass(frozen=True, slots=True)
class ResolvedTarget:
    """One concrete server discovered from DNS.

    ``host`` is the IP address to connect to; ``name`` is the stable display name that pools,
    logs and metrics use: ``"db.internal:5432#10.0.0.3"`` for A/AAAA records and
    ``"target:port#IP"`` for SRV records.
    """

    host: str
    port: int
    weight: int
    backup: bool
    name: str


@dataclass(frozen=True, slots=True)
class TargetDiff:
    """What changed between two target sets, matched by ``name``."""

    added: tuple[ResolvedTarget, ...] = ()
    removed: tuple[ResolvedTarget, ...] = ()
    updated: tuple[ResolvedTarget, ...] = ()  # same name, other weight/backup/port (new values)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.updated)


def diff_targets(old: Sequence[ResolvedTarget], new: Sequence[ResolvedTarget]) -> TargetDiff:
    """Compare two target sets by name; order does not matter."""
    before = {t.name: t for t in old}
    after = {t.name: t for t in new}
    return TargetDiff(
        added=tuple(t for name, t in after.items() if name not in before),
        removed=tuple(t for name, t in before.items() if name not in after),
        updated=tuple(t for name, t in after.items() if name in before and before[name] != t),
    )


def address_targets(
    host: str, port: int, weight: int, backup: bool, addresses: Iterable[str]
) -> tuple[ResolvedTarget, ...]:
    """One target per address of ``host``, all with the server's own weight and backup flag."""
    unique = sorted(set(addresses), key=_address_sort_key)
    return tuple(ResolvedTarget(ip, port, weight, backup, f"{host}:{port}#{ip}") for ip in unique)


def map_srv_weight(weight: int, group_max: int) -> int:
    """Map an SRV weight (0..65535) onto an lbtcp weight (1..256).

    Weights only compare within one priority (RFC 2782), so they are scaled per priority group:
    the heaviest record of the group gets 256 and the others keep their ratio to it, rounded,
    with 1 as the floor. lbtcp weight 0 means "drained", so an SRV weight of 0 becomes 1: beside
    a 256 that is the "very small chance of being selected" RFC 2782 asks for, and when every
    record of the group weighs 0 they all get 1, an even share.
    """
    if group_max <= 0:
        return 1
    scaled = (weight * MAX_SERVER_WEIGHT + group_max // 2) // group_max
    return max(1, min(MAX_SERVER_WEIGHT, scaled))


def srv_to_targets(
    records: Iterable[SrvRecord],
    addresses: Mapping[str, Sequence[str]],
    *,
    weight_override: int | None = None,
    backup: bool = False,
) -> tuple[ResolvedTarget, ...]:
    """Turn SRV records plus their targets' addresses into targets.

    The lowest priority present gives the primaries; every higher priority becomes a backup
    (lbtcp has one backup tier, so priorities 20 and 30 behind a 10 are equal backups). Each
    address of a target gets the target's mapped weight, as nginx gives every address of a
    named server the server's weight. A target of ``"."`` ("service not available here") is
    skipped, as are targets with no addresses yet. ``weight_override`` replaces the SRV
    weights; ``backup=True`` makes every target a backup.
    """
    best: dict[tuple[str, int], SrvRecord] = {}
    for record in records:
        if record.target in ("", "."):
            continue
        slot = (record.target, record.port)
        seen = best.get(slot)
        # One (target, port) listed twice: keep the most preferred listing.
        if seen is None or (record.priority, -record.weight) < (seen.priority, -seen.weight):
            best[slot] = record
    if not best:
        return ()
    lowest = min(r.priority for r in best.values())
    group_max: dict[int, int] = {}
    for record in best.values():
        group_max[record.priority] = max(group_max.get(record.priority, 0), record.weight)
    out: dict[str, ResolvedTarget] = {}
    for record in sorted(best.values()):
        if weight_override is not None:
            weight = weight_override
        else:
            weight = map_srv_weight(record.weight, group_max[record.priority])
        is_backup = backup or record.priority != lowest
        for ip in addresses.get(record.target, ()):
            name = f"{record.target}:{record.port}#{ip}"
            if name not in out:
                out[name] = ResolvedTarget(ip, record.port, weight, is_backup, name)
    return tuple(sorted(out.values(), key=lambda t: (t.backup, t.name)))


# --------------------------------------------------------------------------------------------
# Timing: TTL clamping and retry backoff (pure)
# --------------------------------------------------------------------------------------------


def clamp_ttl(ttl: float, min_ttl: float, max_ttl: float) -> float:
    """How long to keep an answer: its TTL clamped to ``[min_ttl, max_ttl]``.

    If the bounds are crossed (config validation forbids it), ``max_ttl`` wins: it is the
    operator's promise of how stale an answer may get.
    """
    return min(max(ttl, min_ttl), max_ttl)


def backoff_delay(failures: int, *, base: float, cap: float) -> float:
    """Delay before retry number ``failures`` (1 = after the first failure): base * 2^(n-1)."""
    if failures < 1:
        raise ValueError("failures counts from 1")
    # Exponent bounded so huge failure counts neither overflow nor waste time.
    return min(cap, base * 2.0 ** min(failures - 1, 60))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff for failing lookups."""

    base: float = 1.0
    cap: float = 30.0

    @classmethod
    def for_config(
        cls, config: ResolverConfig, *, base: float = 1.0, cap: float = 30.0
    ) -> RetryPolicy:
        """1 s doubling, capped at ``cap`` or ``max_ttl``, whichever is lower."""
        effective_cap = max(MIN_REFRESH, min(cap, config.max_ttl))
        return cls(base=min(base, effective_cap), cap=effective_cap)

    def delay(self, failures: int) -> float:
        """Delay before the retry that follows ``failures`` consecutive failures."""
        return backoff_delay(failures, base=self.base, cap=self.cap)


# --------------------------------------------------------------------------------------------
# The cache entry state machine (pure)
# --------------------------------------------------------------------------------------------


class EntryState(enum.Enum):
    """Where one ``(name, type)`` cache entry stands."""

    STARTING = "starting"  # no answer yet
    UP = "up"  # serving a good answer
    STALE = "stale"  # lookups failing; serving the last good answer until stale_until
    DOWN = "down"  # lookups failing; nothing (left) to serve


class EntryInput(enum.Enum):
    """What can happen to an entry."""

    ANSWER = "answer"  # a usable answer (possibly legitimately empty)
    FAILURE = "failure"  # timeout, SERVFAIL, NXDOMAIN, an empty answer that removes records...
    EXPIRE = "expire"  # stale_until has passed


_TRANSITIONS: dict[tuple[EntryState, EntryInput], EntryState] = {
    (EntryState.STARTING, EntryInput.ANSWER): EntryState.UP,
    (EntryState.STARTING, EntryInput.FAILURE): EntryState.DOWN,
    (EntryState.UP, EntryInput.ANSWER): EntryState.UP,
    (EntryState.UP, EntryInput.FAILURE): EntryState.STALE,
    (EntryState.STALE, EntryInput.ANSWER): EntryState.UP,
    (EntryState.STALE, EntryInput.FAILURE): EntryState.STALE,
    (EntryState.STALE, EntryInput.EXPIRE): EntryState.DOWN,
    (EntryState.DOWN, EntryInput.ANSWER): EntryState.UP,
    (EntryState.DOWN, EntryInput.FAILURE): EntryState.DOWN,
}

_FAILING = (EntryState.STALE, EntryState.DOWN)


class EntryStateError(RuntimeError):
    """An input that the entry's state table has no transition for (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class EntryFailed:
    """An entry's failure episode began (reported once per episode)."""

    kind: str
    error: str
    at: float
    stale_until: float | None  # None when there were no records to keep


@dataclass(frozen=True, slots=True)
class EntryRecovered:
    """An entry's failure episode ended with a good answer."""

    failed_since: float
    at: float


EntryEvent = EntryFailed | EntryRecovered


@dataclass(frozen=True, slots=True)
class EntryUpdate:
    """The result of feeding an input to an entry."""

    changed: bool = False  # the served records changed
    events: tuple[EntryEvent, ...] = ()


_NO_UPDATE = EntryUpdate()


class RecordEntry:
    """The cache entry for one ``(name, record type)``; see the module docstring.

    The owner asks ``query_due(now)``, runs the lookup, feeds ``on_answer``/``on_error``, calls
    ``on_timer(now)`` when ``next_deadline()`` passes, and serves ``records``.
    """

    __slots__ = (
        "_retry",
        "cached_until",
        "empty_is_failure",
        "failing_since",
        "failures",
        "max_ttl",
        "min_ttl",
        "next_query_at",
        "records",
        "stale_for",
        "stale_until",
        "state",
    )

    def __init__(
        self,
        *,
        min_ttl: float,
        max_ttl: float,
        stale_for: float,
        retry: RetryPolicy,
        empty_is_failure: bool = True,
    ) -> None:
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.stale_for = stale_for
        self._retry = retry
        # False for a type whose absence is normal (AAAA under family "any"); an empty
        # answer still counts as a failure when it would remove records we have.
        self.empty_is_failure = empty_is_failure
        self.state = EntryState.STARTING
        self.records: RecordSet = EMPTY
        self.next_query_at = -math.inf  # look up at once
        self.stale_until: float | None = None
        self.failing_since: float | None = None
        self.failures = 0
        # Until when a cache on the way (c-ares' own, a recursive resolver) may still hold
        # the last answer: its full TTL, which max_ttl may have cut short.
        self.cached_until: float | None = None

    def __repr__(self) -> str:
        return f"<RecordEntry {self.state.value} {len(self.records)} records>"

    def _step(self, event: EntryInput) -> EntryState:
        try:
            new = _TRANSITIONS[(self.state, event)]
        except KeyError:
            raise EntryStateError(
                f"no transition from {self.state.value} on {event.value}"
            ) from None
        self.state = new
        return new

    def query_due(self, now: float) -> bool:
        """Whether the next lookup should be sent now."""
        return now >= self.next_query_at

    def wants_fresh(self, now: float) -> bool:
        """Whether the next lookup must bypass the resolver's cache to learn anything new.

        True when ``max_ttl`` (or a failure retry) brings the lookup before the last answer's
        own TTL ran out: c-ares would otherwise hand back its cached copy.
        """
        return self.cached_until is not None and now < self.cached_until

    def next_deadline(self) -> float:
        """The earliest time this entry needs attention: the next lookup or a stale expiry."""
        if self.state is EntryState.STALE and self.stale_until is not None:
            return min(self.next_query_at, self.stale_until)
        return self.next_query_at

    def on_answer(self, records: RecordSet, ttl: float, now: float) -> EntryUpdate:
        """A lookup returned ``records`` with ``ttl``."""
        before = self.records
        self._expire(now)  # stale records past their time are gone before anything else
        if not records:
            events = self._on_empty(now)
        else:
            refresh = max(MIN_REFRESH, clamp_ttl(ttl, self.min_ttl, self.max_ttl))
            events = self._accept(records, refresh, now)
            self.cached_until = now + ttl
        return EntryUpdate(changed=self.records != before, events=events)

    def on_error(self, kind: str, message: str, now: float) -> EntryUpdate:
        """A lookup failed with ``kind`` (one of ``FAILURE_KINDS``)."""
        before = self.records
        self._expire(now)
        events = self._on_empty(now) if kind == "nodata" else self._fail(kind, message, now)
        return EntryUpdate(changed=self.records != before, events=events)

    def on_timer(self, now: float) -> EntryUpdate:
        """Time passed: drop stale records whose ``stale_for`` ran out."""
        before = self.records
        self._expire(now)
        return _NO_UPDATE if self.records == before else EntryUpdate(changed=True)

    def _expire(self, now: float) -> None:
        if (
            self.state is EntryState.STALE
            and self.stale_until is not None
            and now >= self.stale_until
        ):
            self._step(EntryInput.EXPIRE)
            self.records = EMPTY
            self.stale_until = None

    def _on_empty(self, now: float) -> tuple[EntryEvent, ...]:
        if self.empty_is_failure or self.records:
            return self._fail("nodata", "the answer has no records of this type", now)
        refresh = max(MIN_REFRESH, clamp_ttl(EMPTY_REFRESH, self.min_ttl, self.max_ttl))
        self.cached_until = None
        return self._accept(EMPTY, refresh, now)

    def _accept(self, records: RecordSet, refresh: float, now: float) -> tuple[EntryEvent, ...]:
        before = self.state
        self._step(EntryInput.ANSWER)
        events: tuple[EntryEvent, ...] = ()
        if before in _FAILING:
            since = self.failing_since if self.failing_since is not None else now
            events = (EntryRecovered(failed_since=since, at=now),)
        self.records = records
        self.failures = 0
        self.failing_since = None
        self.stale_until = None
        self.next_query_at = now + refresh
        return events

    def _fail(self, kind: str, message: str, now: float) -> tuple[EntryEvent, ...]:
        before = self.state
        self._step(EntryInput.FAILURE)
        self.failures += 1
        self.next_query_at = now + max(MIN_REFRESH, self._retry.delay(self.failures))
        events: tuple[EntryEvent, ...] = ()
        if before not in _FAILING:
            self.failing_since = now
            if self.state is EntryState.STALE:
                self.stale_until = now + self.stale_for
            kept = self.stale_until if self.records else None
            events = (EntryFailed(kind=kind, error=message, at=now, stale_until=kept),)
        self._expire(now)  # stale_for = 0 drops the records at once
        return events


# --------------------------------------------------------------------------------------------
# Events for logs and metrics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsFailure:
    """Lookups of ``name`` started failing (once per episode, not per retry).

    ``qtype`` and ``kind`` are those of the first failing lookup. ``stale_until`` is the loop
    time until which its last good records are kept, or None when there were none to keep
    (e.g. DNS was down at start-up).
    """

    name: str
    qtype: str
    kind: str
    error: str
    stale_until: float | None


@dataclass(frozen=True, slots=True)
class DnsRecovered:
    """Lookups of ``name`` answer again after a failure episode of ``failed_for`` seconds."""

    name: str
    failed_for: float


@dataclass(frozen=True, slots=True)
class DnsChanged:
    """The targets of watch ``key`` (DNS name ``name``) changed.

    ``reason`` is ``"answer"`` (a lookup returned other records) or ``"stale_expired"`` (the
    last good records were dropped after ``stale_for`` of failures).
    """

    key: str
    name: str
    added: tuple[ResolvedTarget, ...]
    removed: tuple[ResolvedTarget, ...]
    updated: tuple[ResolvedTarget, ...]
    reason: str


DnsEvent = DnsFailure | DnsRecovered | DnsChanged


# --------------------------------------------------------------------------------------------
# Resolvers (I/O)
# --------------------------------------------------------------------------------------------


class Resolver(Protocol):
    """Looks up one record type of one name."""

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        """Return the answer, or raise ``ResolveError``; an empty answer raises kind nodata.

        ``fresh`` asks to bypass any cache the resolver keeps itself (the watcher asks for it
        when ``max_ttl`` refreshes an answer before its TTL ran out).
        """
        ...

    async def close(self) -> None:
        """Release sockets and threads; no queries after this."""
        ...


_ARES_KINDS: dict[int, str] = {
    aiodns.error.ARES_ENOTFOUND: "nxdomain",
    aiodns.error.ARES_ENODATA: "nodata",
    aiodns.error.ARES_ESERVFAIL: "servfail",
    aiodns.error.ARES_EREFUSED: "refused",
    aiodns.error.ARES_ETIMEOUT: "timeout",
    aiodns.error.ARES_ECONNREFUSED: "unreachable",
}


_ADDRESS_DATA: dict[RecordType, type[pycares.ARecordData] | type[pycares.AAAARecordData]] = {
    RecordType.A: pycares.ARecordData,
    RecordType.AAAA: pycares.AAAARecordData,
}


def _system_nameserver_count() -> int:
    # A channel without an event thread reads /etc/resolv.conf and sends nothing.
    channel = pycares.Channel(sock_state_cb=lambda fd, readable, writable: None)
    try:
        return len(channel.servers)
    finally:
        channel.close()


class AioDnsResolver:
    """The real resolver: aiodns (c-ares) ``query_dns``, which returns each record's TTL.

    Works on any asyncio loop, uvloop included: pycares 5 runs c-ares in its own event thread
    and hands results back with ``call_soon_threadsafe``. ``use_tcp`` sends every query over
    TCP (c-ares falls back to TCP on its own when a UDP answer is truncated). Create it on
    the loop that will use it (it takes the running loop unless ``loop`` is given).
    """

    def __init__(
        self,
        config: ResolverConfig,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        use_tcp: bool = False,
    ) -> None:
        servers = list(config.nameservers)
        count = len(servers) or _system_nameserver_count()
        # c-ares sends nservers * tries attempts, each with this timeout on the first round;
        # one round of one try each keeps a whole lookup within config.timeout.
        per_try = max(0.05, config.timeout / max(1, count))
        options: dict[str, object] = {"timeout": per_try, "tries": 1}
        if use_tcp:
            options["flags"] = pycares.ARES_FLAG_USEVC
        self._servers = servers or None
        self._options = options
        self._loop = loop or asyncio.get_running_loop()
        self._dns = self._channel()
        # A backstop in case c-ares overruns its own timeouts; never hit in normal operation.
        self._guard = config.timeout + 1.0

    def _channel(self) -> aiodns.DNSResolver:
        return aiodns.DNSResolver(nameservers=self._servers, loop=self._loop, **self._options)

    @property
    def nameservers(self) -> tuple[str, ...]:
        """The servers c-ares will ask, as ``IP:PORT`` strings."""
        return tuple(self._dns._channel.servers)

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        """Send one query; see ``Resolver.query``.

        c-ares caches answers for their TTL and pycares gives no way to turn that off, so a
        ``fresh`` query goes through a throwaway channel with an empty cache. The watcher asks
        for one only when ``max_ttl`` is below an answer's TTL, at most once per ``max_ttl``.
        """
        if not fresh:
            return await self._query(self._dns, name, rtype)
        channel = self._channel()
        try:
            return await self._query(channel, name, rtype)
        finally:
            await channel.close()

    async def _query(self, dns: aiodns.DNSResolver, name: str, rtype: RecordType) -> Answer:
        try:
            # _bounded(), not asyncio.wait_for: see _bounded() for the lost cancellation.
            result = await _bounded(dns.query_dns(name, rtype.value), self._guard)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise ResolveError("timeout", f"no answer within {self._guard:g}s") from None
        except aiodns.error.DNSError as exc:
            code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else -1
            message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
            raise ResolveError(_ARES_KINDS.get(code, "error"), message) from None
        address_type = _ADDRESS_DATA.get(rtype)
        addresses: list[str] = []
        services: list[SrvRecord] = []
        ttls: list[int] = []
        for record in result.answer:
            data = record.data
            if isinstance(data, pycares.CNAMERecordData):
                ttls.append(record.ttl)  # the chain is only as fresh as its shortest link
            elif address_type is not None and isinstance(data, address_type):
                addresses.append(data.addr)
                ttls.append(record.ttl)
            elif rtype is RecordType.SRV and isinstance(data, pycares.SRVRecordData):
                target = _normalise_name(data.target) or "."
                services.append(SrvRecord(data.priority, data.weight, data.port, target))
                ttls.append(record.ttl)
        records = RecordSet.of(addresses, services)
        if not records:
            # E.g. a CNAME pointing at a name with no record of this type.
            raise ResolveError("nodata", "the answer has no records of this type")
        return Answer(records=records, ttl=float(min(ttls)))

    async def close(self) -> None:
        """Cancel pending queries and release the c-ares channel."""
        await self._dns.close()


class StaticResolver:
    """Answers from a table: for tests, and for setups that pin names without DNS.

    A name missing from the table is NXDOMAIN. A value that is a string is a failure kind
    (``"timeout"``, ``"servfail"``...) raised as ``ResolveError``. ``queries`` records every
    lookup in order.
    """

    def __init__(
        self,
        table: Mapping[tuple[str, RecordType], Answer | str] | None = None,
        *,
        delay: float = 0.0,
    ) -> None:
        self._table: dict[tuple[str, RecordType], Answer | str] = {}
        for (name, rtype), value in (table or {}).items():
            self.set(name, rtype, value)
        self.delay = delay
        self.queries: list[tuple[str, RecordType]] = []
        self.fresh_queries = 0
        self.closed = False

    def set(self, name: str, rtype: RecordType, value: Answer | str) -> None:
        """Set the answer (or failure kind) for ``(name, rtype)``."""
        if isinstance(value, str) and value not in FAILURE_KINDS:
            raise ValueError(f"unknown DNS failure kind {value!r}")
        self._table[(_normalise_name(name), rtype)] = value

    def remove(self, name: str, rtype: RecordType) -> None:
        """Forget ``(name, rtype)``: it answers NXDOMAIN from now on."""
        self._table.pop((_normalise_name(name), rtype), None)

    def count(self, name: str, rtype: RecordType) -> int:
        """How many times ``(name, rtype)`` was looked up."""
        key = (_normalise_name(name), rtype)
        return sum(1 for q in self.queries if q == key)

    async def query(self, name: str, rtype: RecordType, *, fresh: bool = False) -> Answer:
        """Answer from the table; see ``Resolver.query`` (there is no cache to bypass)."""
        if self.closed:
            raise ResolveError("error", "resolver closed")
        key = (_normalise_name(name), rtype)
        self.queries.append(key)
        self.fresh_queries += fresh
        if self.delay > 0:
            await asyncio.sleep(self.delay)
        value = self._table.get(key)
        if value is None:
            raise ResolveError("nxdomain", f"{name} not in the table")
        if isinstance(value, str):
            raise ResolveError(value, f"{value} (static)")
        if not value.records:
            raise ResolveError("nodata", "the answer has no records of this type")
        return value

    async def close(self) -> None:
        """Refuse further queries."""
        self.closed = True


# --------------------------------------------------------------------------------------------
# The watcher (I/O): one refresh task per (name, type), shared by every watch
# --------------------------------------------------------------------------------------------

_SlotKey = tuple[str, RecordType]


class _Slot:
    """One cache entry plus the task that refreshes it and the watches that use it."""

    __slots__ = ("entry", "first_done", "name", "refs", "rtype", "task")

    def __init__(self, name: str, rtype: RecordType, entry: RecordEntry) -> None:
        self.name = name
        self.rtype = rtype
        self.entry = entry
        self.refs: set[str] = set()  # watch keys
        self.task: asyncio.Task[None] | None = None
        self.first_done = asyncio.Event()


@dataclass(slots=True)
class _NameWatch:
    key: str
    host: str  # as the operator wrote it, for display names
    qname: str  # normalised, for lookups
    port: int
    weight: int
    backup: bool
    literal: str | None  # an IP address given directly: no DNS
    slots: tuple[_SlotKey, ...]
    targets: tuple[ResolvedTarget, ...] = ()


@dataclass(slots=True)
class _SrvWatch:
    key: str
    srv_name: str
    weight_override: int | None
    backup: bool
    slot: _SlotKey
    target_slots: set[_SlotKey] = field(default_factory=set)
    targets: tuple[ResolvedTarget, ...] = ()


_Watch = _NameWatch | _SrvWatch


def _slots_of(watch: _Watch) -> set[_SlotKey]:
    if isinstance(watch, _NameWatch):
        return set(watch.slots)
    return {watch.slot, *watch.target_slots}


def _ip_literal(host: str) -> str | None:
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


class DnsWatcher:
    """Keeps the targets of named servers and SRV services current.

    ``on_change(key, targets)`` is called with the full new target tuple of a watch whenever
    it changes (including the first fill); ``on_event`` receives ``DnsFailure``,
    ``DnsRecovered`` and ``DnsChanged``. Both are called on the event loop and must not block;
    an exception from either is logged and does not stop the refreshing.

    ``query_counts`` counts lookups by result (``QUERY_RESULTS``) for the
    ``lbtcp_dns_queries_total{result}`` metric; ``name_query_counts`` the same per DNS name
    (its ``name`` label).

    No lookup may hold a refresh up for ever (which would freeze a pool's membership without
    a word): each is bounded by ``lookup_timeout`` (default ``timeout + LOOKUP_MARGIN``) and
    counted as a ``timeout`` failure past it, whatever the resolver does.
    """

    def __init__(
        self,
        resolver_config: ResolverConfig,
        *,
        on_change: Callable[[str, tuple[ResolvedTarget, ...]], None],
        on_event: Callable[[DnsEvent], None],
        clock: Callable[[], float] | None = None,
        resolver: Resolver | None = None,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        use_tcp: bool = False,
        lookup_timeout: float | None = None,
    ) -> None:
        self._config = resolver_config
        self._types = record_types_for(resolver_config.family)
        self._on_change = on_change
        self._on_event = on_event
        self._clock = clock
        self._resolver: Resolver | None = resolver
        self._own_resolver = resolver is None
        self._use_tcp = use_tcp
        self._lookup_timeout = (
            lookup_timeout
            if lookup_timeout is not None
            else resolver_config.timeout + LOOKUP_MARGIN
        )
        self._retry = RetryPolicy.for_config(resolver_config, base=retry_base, cap=retry_cap)
        self._slots: dict[_SlotKey, _Slot] = {}
        self._watches: dict[str, _Watch] = {}
        self._failing: dict[str, set[RecordType]] = {}  # DNS name -> types in a failure episode
        self._failing_since: dict[str, float] = {}
        self._retired: set[asyncio.Task[None]] = set()  # cancelled, not yet finished
        self._started = False
        self._closed = False
        self.query_counts: dict[str, int] = dict.fromkeys(QUERY_RESULTS, 0)
        # The same, per DNS name looked up (the metric's ``name`` label).
        self.name_query_counts: dict[str, dict[str, int]] = {}

    # -- public interface ---------------------------------------------------------------------

    def watch_name(self, key: str, host: str, port: int, weight: int, backup: bool) -> None:
        """Resolve ``host`` (A/AAAA per ``family``) into targets on ``port`` under ``key``.

        An IP literal needs no DNS and yields its one target at once. Watching an existing
        key replaces the old watch. ``current(key)`` holds what the cache already knows right
        after this call; ``on_change`` reports later changes.
        """
        literal = _ip_literal(host)
        qname = _normalise_name(host)
        slots = () if literal is not None else tuple((qname, t) for t in self._types)
        self._install(_NameWatch(key, host, qname, port, weight, backup, literal, slots))

    def watch_srv(
        self,
        key: str,
        srv_name: str,
        *,
        weight_override: int | None = None,
        backup: bool = False,
    ) -> None:
        """Discover servers from the SRV records of ``srv_name`` under ``key``.

        The lowest SRV priority gives primaries, higher ones backups; SRV weights map to lbtcp
        weights as ``map_srv_weight`` documents, unless ``weight_override`` is given.
        ``backup=True`` makes every discovered server a backup.
        """
        slot_key = (_normalise_name(srv_name), RecordType.SRV)
        self._install(_SrvWatch(key, srv_name, weight_override, backup, slot_key))

    def unwatch(self, key: str) -> None:
        """Stop watching ``key`` (e.g. a server removed by a reload); no-op if unknown."""
        watch = self._watches.pop(key, None)
        if watch is not None:
            for slot_key in _slots_of(watch):
                self._release(slot_key, key)

    def current(self, key: str) -> tuple[ResolvedTarget, ...]:
        """The targets of ``key`` right now (from the cache; never waits on DNS)."""
        watch = self._watches.get(key)
        return watch.targets if watch is not None else ()

    def keys(self) -> tuple[str, ...]:
        """The watched keys."""
        return tuple(self._watches)

    async def start(self, *, wait: bool = True, ready_timeout: float | None = None) -> None:
        """Start refreshing. With ``wait``, return once every name has had its first answer
        or failure (SRV targets included), or after ``ready_timeout`` seconds."""
        if self._closed:
            raise RuntimeError("DnsWatcher is closed")
        if self._resolver is None:
            self._resolver = AioDnsResolver(self._config, use_tcp=self._use_tcp)
        self._started = True
        for slot in self._slots.values():
            self._launch(slot)
        if wait:
            if ready_timeout is None:
                # Two rounds (SRV, then its targets), each bounded by the lookup timeout.
                ready_timeout = 2 * (self._config.timeout + 1.0)
            await self.wait_ready(ready_timeout)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until every current entry has finished its first lookup; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            pending = [s.first_done for s in self._slots.values() if not s.first_done.is_set()]
            if not pending:
                return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            waiters = [asyncio.ensure_future(event.wait()) for event in pending]
            try:
                # FIRST_COMPLETED, then look again: a slot released meanwhile (unwatch, SRV
                # targets that changed) never sets its event and must not be waited for.
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    async def close(self) -> None:
        """Stop every refresh task and close the resolver if this watcher created it.

        Waits at most ``CLOSE_GRACE`` for the tasks to finish (a task still running then is
        logged and left behind, never waited on for ever), and lets a cancellation of the
        caller through instead of taking it for one of the tasks' own.
        """
        if self._closed:
            return
        self._closed = True
        tasks = [s.task for s in self._slots.values() if s.task is not None]
        tasks += self._retired
        for task in tasks:
            task.cancel()
        if tasks:
            # asyncio.wait, not "await task" under suppress(CancelledError): that would also
            # swallow the CancelledError of the task calling close().
            done, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "DNS refresh task %s failed",
                        task.get_name(),
                        exc_info=task.exception(),
                    )
            for task in pending:
                log.warning(
                    "DNS refresh task %s did not stop within %gs", task.get_name(), CLOSE_GRACE
                )
        if self._resolver is not None and self._own_resolver:
            await self._resolver.close()

    # -- slots ------------------------------------------------------------------------------------

    def _install(self, watch: _Watch) -> None:
        # Subscribe the new watch before dropping the old one under the same key, so that a
        # reload repeating a name keeps its cache entry (and its addresses) instead of
        # starting from nothing.
        old = self._watches.get(watch.key)
        self._watches[watch.key] = watch
        slots = watch.slots if isinstance(watch, _NameWatch) else (watch.slot,)
        for slot_key in slots:
            self._acquire(slot_key, watch.key)
        watch.targets = self._compute(watch)
        if old is not None:
            for slot_key in _slots_of(old) - _slots_of(watch):
                self._release(slot_key, watch.key)

    def _acquire(self, slot_key: _SlotKey, watch_key: str) -> None:
        slot = self._slots.get(slot_key)
        if slot is None:
            name, rtype = slot_key
            entry = RecordEntry(
                min_ttl=self._config.min_ttl,
                max_ttl=self._config.max_ttl,
                stale_for=self._config.stale_for,
                retry=self._retry,
                # AAAA missing beside A (or the reverse) is normal under "any"; SRV and a
                # single family must have records.
                empty_is_failure=rtype is RecordType.SRV or len(self._types) == 1,
            )
            slot = self._slots[slot_key] = _Slot(name, rtype, entry)
        slot.refs.add(watch_key)
        if self._started and not self._closed:
            self._launch(slot)

    def _release(self, slot_key: _SlotKey, watch_key: str) -> None:
        slot = self._slots.get(slot_key)
        if slot is None:
            return
        slot.refs.discard(watch_key)
        if slot.refs:
            return
        del self._slots[slot_key]
        if slot.task is not None:
            slot.task.cancel()
            # Kept until it has finished, so that close() can wait for it.
            self._retired.add(slot.task)
            slot.task.add_done_callback(self._retired.discard)
        types = self._failing.get(slot.name)
        if types is not None:
            types.discard(slot.rtype)
            if not types:
                del self._failing[slot.name]
                self._failing_since.pop(slot.name, None)

    def _launch(self, slot: _Slot) -> None:
        if slot.task is None:
            slot.task = asyncio.get_running_loop().create_task(
                self._refresh_loop(slot), name=f"dns {slot.rtype.value} {slot.name}"
            )

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    async def _refresh_loop(self, slot: _Slot) -> None:
        entry = slot.entry
        # The checks of _closed are a second line behind task.cancel(): a cancellation lost
        # anywhere below (a resolver built on asyncio.wait_for, say) must not keep the task
        # refreshing after close().
        while not self._closed:
            now = self._now()
            if entry.query_due(now):
                outcome = await self._lookup(slot.name, slot.rtype, entry.wants_fresh(now))
                if self._closed or self._slots.get((slot.name, slot.rtype)) is not slot:
                    return  # closed or released while the query was in flight
                now = self._now()
                if isinstance(outcome, Answer):
                    update = entry.on_answer(outcome.records, outcome.ttl, now)
                else:
                    update = entry.on_error(outcome.kind, outcome.message, now)
                self._apply(slot, update, "answer")
                slot.first_done.set()
            self._apply(slot, entry.on_timer(now), "stale_expired")
            delay = entry.next_deadline() - self._now()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _lookup(self, name: str, rtype: RecordType, fresh: bool) -> Answer | ResolveError:
        assert self._resolver is not None
        per_name = self.name_query_counts.get(name)
        if per_name is None:
            per_name = self.name_query_counts[name] = dict.fromkeys(QUERY_RESULTS, 0)
        try:
            answer = await _bounded(
                self._resolver.query(name, rtype, fresh=fresh), self._lookup_timeout
            )
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            self.query_counts["timeout"] += 1
            per_name["timeout"] += 1
            log.warning("DNS %s %s: no result within %gs", rtype.value, name, self._lookup_timeout)
            return ResolveError("timeout", f"no result within {self._lookup_timeout:g}s")
        except ResolveError as exc:
            self.query_counts[exc.kind] += 1
            per_name[exc.kind] += 1
            return exc
        except (OSError, RuntimeError, ValueError) as exc:
            # A broken resolver must not kill the refresh task: count it, retry with backoff.
            self.query_counts["error"] += 1
            per_name["error"] += 1
            return ResolveError("error", f"{type(exc).__name__}: {exc}")
        self.query_counts["ok"] += 1
        per_name["ok"] += 1
        return answer

    # -- from entry updates to watches and events ---------------------------------------------

    def _apply(self, slot: _Slot, update: EntryUpdate, reason: str) -> None:
        for event in update.events:
            if isinstance(event, EntryFailed):
                self._entry_failed(slot, event)
            else:
                self._entry_recovered(slot, event)
        if update.changed:
            for key in sorted(slot.refs):
                self._refresh_watch(key, reason)

    def _entry_failed(self, slot: _Slot, event: EntryFailed) -> None:
        # Aggregated per DNS name: A and AAAA failing together is one episode for the operator.
        types = self._failing.setdefault(slot.name, set())
        first = not types
        types.add(slot.rtype)
        if first:
            self._failing_since[slot.name] = event.at
            self._emit(
                DnsFailure(slot.name, slot.rtype.value, event.kind, event.error, event.stale_until)
            )

    def _entry_recovered(self, slot: _Slot, event: EntryRecovered) -> None:
        types = self._failing.get(slot.name)
        if types is None:
            return
        types.discard(slot.rtype)
        if not types:
            del self._failing[slot.name]
            since = self._failing_since.pop(slot.name, event.failed_since)
            self._emit(DnsRecovered(slot.name, max(0.0, event.at - since)))

    def _addresses(self, qname: str) -> tuple[str, ...]:
        literal = _ip_literal(qname)
        if literal is not None:
            return (literal,)
        out: list[str] = []
        for rtype in self._types:
            slot = self._slots.get((qname, rtype))
            if slot is not None:
                out.extend(slot.entry.records.addresses)
        return tuple(out)

    def _compute(self, watch: _Watch) -> tuple[ResolvedTarget, ...]:
        """The targets of ``watch`` from the cache (subscribing an SRV watch to its targets)."""
        if isinstance(watch, _NameWatch):
            addresses = (watch.literal,) if watch.literal else self._addresses(watch.qname)
            return address_targets(watch.host, watch.port, watch.weight, watch.backup, addresses)
        slot = self._slots.get(watch.slot)
        services = slot.entry.records.services if slot is not None else ()
        self._sync_srv_targets(watch, services)
        return srv_to_targets(
            services,
            {r.target: self._addresses(r.target) for r in services},
            weight_override=watch.weight_override,
            backup=watch.backup,
        )

    def _refresh_watch(self, key: str, reason: str) -> None:
        watch = self._watches.get(key)
        if watch is None:
            return
        name = watch.host if isinstance(watch, _NameWatch) else watch.srv_name
        new = self._compute(watch)
        diff = diff_targets(watch.targets, new)
        if not diff:
            return
        watch.targets = new
        try:
            self._on_change(key, new)
        except Exception:
            log.exception("on_change for %s failed", key)
        self._emit(DnsChanged(key, name, diff.added, diff.removed, diff.updated, reason))

    def _sync_srv_targets(self, watch: _SrvWatch, services: Sequence[SrvRecord]) -> None:
        wanted = {
            (r.target, rtype)
            for r in services
            if r.target not in ("", ".") and _ip_literal(r.target) is None
            for rtype in self._types
        }
        for slot_key in wanted - watch.target_slots:
            self._acquire(slot_key, watch.key)
        for slot_key in watch.target_slots - wanted:
            self._release(slot_key, watch.key)
        watch.target_slots = wanted

    def _emit(self, event: DnsEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("on_event for %s failed", type(event).__name__)
