"""Balancers: choose the server for a new client (pure: no asyncio, no sockets, no clock).

Theory of operation
-------------------
The pool owns the servers and filters them: a balancer only ever sees ``candidates``, servers
that are healthy, not full, of positive weight and not yet tried for this client. Its job is to
return one of those objects (the very object, never a copy) in O(number of candidates).

Two calls make up the interface (:class:`Balancer`):

* ``update(servers)`` — membership changed (start, reload, DNS, weight change). ``servers`` is
  every server of the pool, eligible or not, in config order. It is never on the hot path, so a
  balancer may do real work here (``source_hash`` builds its Maglev table).
* ``pick(candidates, client)`` — the hot path, once per connect attempt.

Servers are identified by ``name`` (unique in a pool), never by object identity or position, so
per-server state survives a candidate set that changes from one pick to the next (a server
excluded for a single pick because it is full keeps its round-robin credit) and survives a
reload that rebuilds the server objects.

Built-ins (``balance = ...``, see DESIGN.md §4):

``round_robin``
    nginx's smooth weighted round robin. Weights 5, 1, 1 give ``a a b a c a a``.
``least_connections``
    fewest ``active / effective_weight``; ties go to smooth weighted round robin among the
    tied servers (as nginx ``least_conn``), so equal servers share the load in turn.
``random_two``
    power of two choices: two distinct servers sampled by weight, the less loaded one wins.
``random``
    weighted random.
``source_hash``
    Maglev consistent hashing over a prime table of 65537 slots, built in ``update()``. A
    server that is not a candidate (unhealthy, full, already tried) is skipped by walking the
    table forward, so its clients spread over the others while every other client stays put.

Anything else of the form ``"module.path:ClassName"`` is a plugin: the class is imported and
instantiated with no arguments (:func:`create_balancer`).

The random balancers own a ``random.Random``: a fixed ``seed`` makes tests deterministic. A
balancer created before ``fork()`` shares its random state with every worker, so the runtime
creates balancers in the worker that uses them (or passes a different seed per worker).
"""

from __future__ import annotations

import hashlib
import importlib
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, islice
from typing import Protocol, TypeVar, cast

__all__ = [
    "BUILTIN_BALANCERS",
    "MAGLEV_TABLE_SIZE",
    "Balancer",
    "BalancerError",
    "Candidate",
    "Client",
    "LeastConnections",
    "RandomTwo",
    "RoundRobin",
    "SourceHash",
    "WeightedRandom",
    "create_balancer",
    "maglev_table",
]

#: Maglev lookup table size. Prime, so that every skip in 1..size-1 visits every slot; about
#: 650 slots per server at 100 servers, which keeps shares within ~0.2 % of the weights.
MAGLEV_TABLE_SIZE = 65537


class BalancerError(ValueError):
    """A ``balance`` value that names no balancer, or a plugin that cannot be used."""


class Candidate(Protocol):
    """What a balancer sees of a server. The pool passes its own Server objects."""

    @property
    def name(self) -> str:
        """Stable and unique within the pool; the key of all per-server balancer state."""
        ...

    @property
    def effective_weight(self) -> float:
        """Weight now (slow start may make it fractional); > 0 for every candidate of pick."""
        ...

    @property
    def active(self) -> int:
        """Live sessions on this server now."""
        ...


CandidateT = TypeVar("CandidateT", bound=Candidate)


@dataclass(frozen=True, slots=True)
class Client:
    """The client a server is being chosen for."""

    ip: str
    port: int
    #: The bytes hashing balancers hash, chosen by the pool from ``hash_key``
    #: (``source_ip`` -> the IP, ``source_ip_port`` -> ``ip:port``).
    key: bytes


class Balancer(Protocol):
    """The interface of every balancer, built-in or plugin."""

    def update(self, servers: Sequence[Candidate]) -> None:
        """Membership changed: ``servers`` is every server of the pool (eligible or not), in
        config order. Called once at start and on every add/remove/weight change; never on the
        hot path."""
        ...

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """Choose among ``candidates`` (non-empty, already filtered by the pool). Return one of
        them (the object itself), or None only if it cannot choose."""
        ...


# --------------------------------------------------------------------------- round robin


class _SmoothWeights:
    """nginx's smooth weighted round robin state (``ngx_http_upstream_get_peer``).

    Each pick adds every candidate's weight to its current weight, takes the largest (the
    first one on a tie, i.e. config order) and subtracts the candidates' total weight from it.
    The picks of any window of ``sum(weights)`` consecutive picks match the weights exactly,
    and heavy servers are interleaved with light ones instead of served in a burst.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def retain(self, names: set[str]) -> None:
        """Forget servers that left the pool, so that a name reused later starts afresh."""
        current = self._current
        for name in [n for n in current if n not in names]:
            del current[name]

    def choose(self, candidates: Sequence[CandidateT]) -> CandidateT:
        current = self._current
        best = candidates[0]
        best_current = -math.inf
        total = 0.0
        for candidate in candidates:
            weight = candidate.effective_weight
            name = candidate.name
            value = current.get(name, 0.0) + weight
            current[name] = value
            total += weight
            if value > best_current:
                best, best_current = candidate, value
        current[best.name] = best_current - total
        return best


class _SmoothBalancer:
    """The state and ``update`` of the balancers built on :class:`_SmoothWeights`."""

    __slots__ = ("_smooth",)

    def __init__(self) -> None:
        self._smooth = _SmoothWeights()

    def update(self, servers: Sequence[Candidate]) -> None:
        """Drop the round-robin state of servers that are gone; the others keep their place in
        the cycle."""
        self._smooth.retain({s.name for s in servers})


class RoundRobin(_SmoothBalancer):
    """``round_robin``: smooth weighted round robin, as nginx."""

    __slots__ = ()

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """The candidate with the most accumulated credit."""
        if not candidates:
            return None
        return self._smooth.choose(candidates)


class LeastConnections(_SmoothBalancer):
    """``least_connections``: fewest active sessions relative to weight.

    Ties (common: every server idle) are broken by smooth weighted round robin among the tied
    servers, as nginx ``least_conn`` does, so idle servers take turns instead of the first one
    in config order taking every short-lived session.
    """

    __slots__ = ()

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """A candidate with the least ``active / effective_weight``."""
        if not candidates:
            return None
        best_load = math.inf
        tied: list[CandidateT] = []
        for candidate in candidates:
            weight = candidate.effective_weight
            load = candidate.active / weight if weight > 0 else math.inf
            if load < best_load:
                best_load = load
                tied = [candidate]
            elif load == best_load:
                tied.append(candidate)
        if not tied:  # only if every weight is <= 0, which the pool never passes
            return candidates[0]
        if len(tied) == 1:
            return tied[0]
        return self._smooth.choose(tied)


# --------------------------------------------------------------------------- random


def _load(candidate: Candidate) -> float:
    weight = candidate.effective_weight
    return candidate.active / weight if weight > 0 else math.inf


class _RandomBalancer:
    """The state and ``update`` of the random balancers: their own seedable generator."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def update(self, servers: Sequence[Candidate]) -> None:
        """Nothing to precompute: each pick draws from that pick's candidates."""


class RandomTwo(_RandomBalancer):
    """``random_two``: the power of two choices (Mitzenmacher) on ``active / effective_weight``.

    Two distinct candidates are sampled in proportion to their weights and the less loaded one
    wins; on a tie the first sample wins, so idle servers get picks in proportion to weight.
    Unlike least_connections it does not send a burst of new clients to the single least
    loaded server, which matters when several workers decide from stale counts.
    """

    __slots__ = ()

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """The less loaded of two weighted samples."""
        n = len(candidates)
        if n <= 1:
            return candidates[0] if candidates else None
        weights = [max(c.effective_weight, 0.0) for c in candidates]
        cumulative = list(accumulate(weights))
        total = cumulative[-1]
        if total <= 0:
            return candidates[0]
        rng = self._rng
        # min(): random() * total can round up to total itself.
        first = min(bisect_right(cumulative, rng.random() * total), n - 1)
        first_weight = weights[first]
        # The second sample is drawn from the others only: a point in [0, total - w_first)
        # that jumps over the first sample's interval.
        point = rng.random() * (total - first_weight)
        if point >= cumulative[first] - first_weight:
            point += first_weight
        second = min(bisect_right(cumulative, point), n - 1)
        if second == first:  # float rounding at an interval boundary
            second = (first + 1) % n
        a, b = candidates[first], candidates[second]
        return b if _load(b) < _load(a) else a


class WeightedRandom(_RandomBalancer):
    """``random``: a candidate drawn in proportion to its weight."""

    __slots__ = ()

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """A weighted random candidate."""
        n = len(candidates)
        if n <= 1:
            return candidates[0] if candidates else None
        cumulative = list(accumulate([max(c.effective_weight, 0.0) for c in candidates]))
        total = cumulative[-1]
        if total <= 0:
            return candidates[0]
        return candidates[min(bisect_right(cumulative, self._rng.random() * total), n - 1)]


# --------------------------------------------------------------------------- Maglev


def _stable_hash(data: bytes, purpose: bytes) -> int:
    """A 64-bit hash that is the same in every process and every run.

    Python's ``hash()`` is salted per process (PYTHONHASHSEED), which would send the same client
    to different servers from different workers or lbtcp instances. BLAKE2b is in hashlib,
    keyed here by ``purpose`` so that a server's offset and skip are independent.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=purpose).digest(), "little")


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


#: Below this many empty slots the table is finished by a direct search (see maglev_table).
_MAGLEV_TAIL = 128


def maglev_table(servers: Sequence[tuple[str, float]], size: int = MAGLEV_TABLE_SIZE) -> list[int]:
    """Build a Maglev lookup table: slot -> index into ``servers`` (``(name, weight)`` pairs).

    Maglev (Eisenbud et al., NSDI 2016, §3.4): every server has a preference list over the
    slots, ``offset + j * skip (mod size)``, with offset and skip from a stable hash of its
    name. Servers take turns claiming their next preferred free slot until the table is full.

    Weights, the "turn counts proportional to weight" variant: server ``i``'s ``k``-th turn
    comes at virtual time ``(k + 0.5) / weight_i`` and turns are taken in time order (ties by
    name). Every server thus ends with ``size * weight / total`` slots, within about one slot,
    the way Webster/Sainte-Laguë apportionment does it; with equal weights this is exactly
    the paper's round robin. Servers are ordered by name, not by the given order, so every
    process with the same pool builds the same table whatever its config order.

    Servers with a weight <= 0 get no slots. Returns an empty list when no server has a slot.

    Cost: the naive fill probes about ``size * ln(size)`` slots, most of them while the last
    few slots are being found. Below ``_MAGLEV_TAIL`` empty slots the rest is found directly:
    a server's next free slot is the free slot ``e`` with the smallest rank
    ``(e - position) * skip^-1 (mod size)`` in its preference list. Same table, a third faster.
    """
    if not _is_prime(size):
        raise ValueError(f"Maglev table size must be prime, got {size}")
    ranked = sorted(
        (
            (name, float(weight), index)
            for index, (name, weight) in enumerate(servers)
            if weight > 0
        ),
        key=lambda entry: (entry[0], entry[2]),
    )
    if not ranked:
        return []
    count = len(ranked)
    total_weight = math.fsum(weight for _, weight, _ in ranked)

    # The turn order, generated in bulk and sorted once (much cheaper than a heap per turn).
    # A server never needs more than weight * (size + count) / total + 1 turns: by then the
    # turns of all servers together outnumber the slots. The sort is stable and the lists
    # are concatenated in name order, which makes name the tie-break.
    times: list[float] = []
    owners: list[int] = []
    for rank, (_, weight, _) in enumerate(ranked):
        turns = int(weight * (size + count) / total_weight) + 2
        times.extend([(k + 0.5) / weight for k in range(turns)])
        owners.extend([rank] * turns)
    order = sorted(range(len(times)), key=times.__getitem__)

    position = [_stable_hash(name.encode(), b"lbtcp-offset") % size for name, _, _ in ranked]
    skip = [_stable_hash(name.encode(), b"lbtcp-skip") % (size - 1) + 1 for name, _, _ in ranked]
    table = [-1] * size
    head = size - min(_MAGLEV_TAIL, size - 1)
    for turn in order[:head]:
        rank = owners[turn]
        slot = position[rank]
        step = skip[rank]
        while table[slot] >= 0:
            slot = (slot + step) % size
        table[slot] = rank
        position[rank] = (slot + step) % size

    free = [slot for slot in range(size) if table[slot] < 0]
    inverse: dict[int, int] = {}
    for turn in order[head:]:
        if not free:
            break
        rank = owners[turn]
        inv = inverse.get(rank)
        if inv is None:
            inv = inverse[rank] = pow(skip[rank], -1, size)
        start = position[rank] * inv
        nearest = min(range(len(free)), key=lambda k: (free[k] * inv - start) % size)
        slot = free.pop(nearest)
        table[slot] = rank
        position[rank] = (slot + skip[rank]) % size

    original = [index for _, _, index in ranked]
    return [original[rank] for rank in table]


class SourceHash:
    """``source_hash``: Maglev consistent hashing of ``client.key``.

    The table is built in :meth:`update` from each server's name and ``effective_weight`` at
    that moment (rebuilt only when a name or weight changed). A server of weight 0 has no slot.
    Unhealthy and full servers keep their slots: :meth:`pick` walks forward from the client's
    slot to the first candidate, so a health flap moves only the clients of the flapping
    server, and they come back when it does.

    The pool should call ``update()`` for configured weight changes, not at every slow-start
    step: each rebuild moves a few keys and costs tens of milliseconds.
    """

    __slots__ = ("_names", "_signature", "_size", "_table")

    def __init__(self, table_size: int = MAGLEV_TABLE_SIZE) -> None:
        if not _is_prime(table_size):
            raise BalancerError(f"Maglev table size must be prime, got {table_size}")
        self._size = table_size
        self._table: list[str] = []
        self._names: frozenset[str] = frozenset()
        self._signature: tuple[tuple[str, float], ...] | None = None

    @property
    def table(self) -> Sequence[str]:
        """The lookup table: slot -> server name (empty before update or with no weight)."""
        return self._table

    def update(self, servers: Sequence[Candidate]) -> None:
        """Rebuild the lookup table if a server's name or weight changed."""
        signature = tuple((s.name, float(s.effective_weight)) for s in servers)
        if signature == self._signature:
            return
        slots = maglev_table(signature, self._size)
        names = [name for name, _ in signature]
        self._table = [names[i] for i in slots]
        self._names = frozenset(self._table)
        self._signature = signature

    def slot_of(self, key: bytes) -> int:
        """The table slot a client key hashes to."""
        return _stable_hash(key, b"lbtcp-client") % self._size

    def pick(self, candidates: Sequence[CandidateT], client: Client) -> CandidateT | None:
        """The candidate at or after the client's slot."""
        if not candidates:
            return None
        table = self._table
        by_name = {c.name: c for c in candidates}
        if not table or self._names.isdisjoint(by_name):
            # No candidate has a slot (added since the last update, or update never called):
            # still hash deterministically rather than piling every client on one server.
            return _rendezvous(candidates, client.key)
        slot = self.slot_of(client.key)
        found = by_name.get(table[slot])
        if found is not None:
            return found
        # Bounded: some candidate owns a slot, so the walk ends within one lap.
        for name in chain(islice(table, slot + 1, None), islice(table, 0, slot)):
            found = by_name.get(name)
            if found is not None:
                return found
        return candidates[0]  # unreachable, kept so the walk can never fail to answer


def _rendezvous(candidates: Sequence[CandidateT], key: bytes) -> CandidateT:
    """Highest-random-weight hashing: stable per key, and a candidate set change moves only
    the keys of the servers that came or went."""
    return max(candidates, key=lambda c: _stable_hash(key + b"\0" + c.name.encode(), b"lbtcp-hrw"))


# --------------------------------------------------------------------------- registry

_BUILTINS: dict[str, Callable[[int | None], Balancer]] = {
    "round_robin": lambda seed: RoundRobin(),
    "least_connections": lambda seed: LeastConnections(),
    "random_two": RandomTwo,
    "random": WeightedRandom,
    "source_hash": lambda seed: SourceHash(),
}

#: The names ``balance`` accepts besides a ``"module.path:ClassName"`` plugin.
BUILTIN_BALANCERS: tuple[str, ...] = tuple(_BUILTINS)


def create_balancer(spec: str, *, seed: int | None = None) -> Balancer:
    """Make the balancer a ``balance`` value names.

    ``spec`` is one of :data:`BUILTIN_BALANCERS` or ``"module.path:ClassName"``: a plugin
    class, imported, instantiated with no arguments and checked to have callable ``pick`` and
    ``update``. ``seed`` seeds the random built-ins (plugins do their own thing).

    Raises :class:`BalancerError` for an unknown name or a plugin that cannot be imported,
    instantiated or does not fit the interface.
    """
    if not isinstance(spec, str):
        raise BalancerError(f"balance must be a string, got {type(spec).__name__}")
    factory = _BUILTINS.get(spec)
    if factory is not None:
        return factory(seed)
    if ":" in spec:
        return _load_plugin(spec)
    raise BalancerError(
        f"unknown balancer {spec!r}: expected one of {', '.join(BUILTIN_BALANCERS)}, "
        "or 'module.path:ClassName' for a plugin"
    )


def _load_plugin(spec: str) -> Balancer:
    module_name, _, class_path = spec.partition(":")
    if not module_name.strip() or not class_path.strip() or ":" in class_path:
        raise BalancerError(f"bad plugin balancer {spec!r}: expected 'module.path:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BalancerError(
            f"plugin balancer {spec!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    except Exception as exc:  # the plugin's own import-time code failed
        raise BalancerError(
            f"plugin balancer {spec!r}: importing {module_name!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    factory: object = module
    for attribute in class_path.split("."):
        try:
            factory = getattr(factory, attribute)
        except AttributeError:
            raise BalancerError(
                f"plugin balancer {spec!r}: module {module_name!r} has no {class_path!r}"
            ) from None
    if not callable(factory):
        raise BalancerError(f"plugin balancer {spec!r}: {class_path!r} is not a class")
    try:
        instance = factory()
    except Exception as exc:
        raise BalancerError(
            f"plugin balancer {spec!r}: {class_path}() failed: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [m for m in ("pick", "update") if not callable(getattr(instance, m, None))]
    if missing:
        raise BalancerError(
            f"plugin balancer {spec!r}: {class_path} has no {' or '.join(missing)} method; "
            "a balancer needs pick(candidates, client) and update(servers)"
        )
    return cast(Balancer, instance)
