"""Servers of a pool, their health, and the choice of one for a new session (pure).

Theory of operation: a ``Pool`` owns its ``Server`` objects, a balancer, and a
``health.PoolHealth`` (the per-server state machines). ``choose()`` is the hot-path entry: it
filters the servers that may take a new session right now (eligible by health and admin state,
weight above zero, below their ``max_connections``, not yet tried for this client), applies the
backup and panic rules, and lets the balancer pick among what is left.

Which servers are candidates:

1. some primary is healthy, and (no ``panic_threshold``, or the healthy share of primaries is at
   least the threshold): the healthy primaries;
2. some primary is healthy but the share is below ``panic_threshold``: panic, every primary
   whatever its health (as Envoy: spreading over all beats crushing the few that are left);
3. no primary is healthy: the healthy backups;
4. none of those either, and ``panic_threshold`` > 0: panic over every primary;
5. otherwise nothing: the listener refuses the client (``no_healthy``).

Draining and disabled servers are never candidates, not even in panic. Health inputs (probe
results, connect results, admin actions, timers) go through the pool so that each server's
``eligible`` flag is kept in step with its state machine; they return the core's events for
the I/O layer to log and act on. Nothing here touches sockets or reads the clock.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterable, Sequence

from lbtcp.addresses import Endpoint, parse_endpoint
from lbtcp.balancing import Balancer, Client, create_balancer
from lbtcp.config import MAX_WEIGHT, PoolConfig, ServerConfig
from lbtcp.counters import CONNECT_BUCKETS, Histogram
from lbtcp.events import Event, PoolEmpty, ServerAdded, ServerEjected, ServerStateChanged
from lbtcp.health import Admin, AdminAction, PoolHealth, ProbeResult


@dataclasses.dataclass(frozen=True, slots=True)
class ProbeRecord:
    """The outcome of one finished active probe, as the status document shows it."""

    result: str  # a ProbeResult value: "ok", "fail", "timeout"
    detail: str  # e.g. "connection refused", "expect matched"
    duration: float  # seconds
    at: float  # loop time at which it finished


class Server:
    """One backend server and its live counters. Identified by ``name`` within its pool."""

    __slots__ = (
        "active",
        "admin_ok",
        "backup",
        "bytes_received",
        "bytes_sent",
        "connect_failures",
        "connect_other",
        "connect_refused",
        "connect_timeouts",
        "ejections",
        "eligible",
        "health_checks",
        "host",
        "last_change",
        "last_probe",
        "max_connections",
        "name",
        "port",
        "removed",
        "total",
        "weight",
        "weight_factor",
    )

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        weight: int = 1,
        backup: bool = False,
        max_connections: int = 0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.weight = weight
        self.backup = backup
        self.max_connections = max_connections
        # Kept in step with the pool's health machine: takes new sessions (healthy and enabled).
        self.eligible = True
        # Not draining or disabled by an operator: panic mode may still use it.
        self.admin_ok = True
        # Gone from the config or DNS: live sessions finish, no new ones.
        self.removed = False
        # Slow start scales the weight in (0, 1]; 1.0 at full weight.
        self.weight_factor = 1.0
        self.active = 0
        self.total = 0
        # Failed connect attempts of real clients: the total (passive health) and by kind.
        self.connect_failures = 0
        self.connect_refused = 0
        self.connect_timeouts = 0
        self.connect_other = 0
        # Passive ejections (ServerEjected events), for metrics and status.
        self.ejections = 0
        # What lbtcp wrote to the server and read from it, added when a session ends.
        self.bytes_sent = 0
        self.bytes_received = 0
        # Active probe results by ProbeResult value, and the last one (the prober sets both).
        self.health_checks: dict[str, int] = {"ok": 0, "fail": 0, "timeout": 0}
        self.last_probe: ProbeRecord | None = None
        # The last ServerStateChanged of this server (kept by Pool._sync), or None.
        self.last_change: ServerStateChanged | None = None

    @classmethod
    def from_config(cls, config: ServerConfig) -> Server:
        endpoint: Endpoint = parse_endpoint(config.address)
        return cls(
            config.display_name,
            endpoint.host,
            endpoint.port,
            weight=config.weight,
            backup=config.backup,
            max_connections=config.max_connections,
        )

    @property
    def effective_weight(self) -> float:
        return self.weight * self.weight_factor

    @property
    def full(self) -> bool:
        return 0 < self.max_connections <= self.active

    def available(self) -> bool:
        """May take a new session now (ignoring whether it was tried for this client)."""
        return self.eligible and self.weight > 0 and not (0 < self.max_connections <= self.active)

    def available_in_panic(self) -> bool:
        """May take a new session when the pool panics: health is ignored, admin is not."""
        return self.admin_ok and self.weight > 0 and not (0 < self.max_connections <= self.active)

    def __repr__(self) -> str:
        return f"Server({self.name!r}, {self.host}:{self.port})"


class Pool:
    """A named set of servers with a balancer and their health."""

    __slots__ = (
        "_backups",
        "_primaries",
        "_ramping",
        "balancer",
        "config",
        "connect_seconds",
        "hash_key",
        "health",
        "initial_events",
        "name",
        "panic_threshold",
        "servers",
    )

    def __init__(
        self,
        config: PoolConfig,
        servers: Iterable[Server],
        balancer: Balancer | None = None,
        *,
        now: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.hash_key = config.hash_key
        self.panic_threshold = config.panic_threshold
        self.balancer = balancer if balancer is not None else create_balancer(config.balance)
        self.health = PoolHealth(config.name, config.health, config.ejection, rng=rng)
        self.servers: dict[str, Server] = {}
        self._primaries: list[Server] = []
        self._backups: list[Server] = []
        self._ramping = False
        # Accept-to-connected time of the sessions it established (per pool, not per server:
        # a histogram is 16 series, times 1,000 servers would swamp a Prometheus).
        self.connect_seconds = Histogram(CONNECT_BUCKETS)
        # Events of the initial membership, for the runtime to log once it runs.
        self.initial_events = self.set_servers(servers, now)

    @staticmethod
    def make_balancer(config: PoolConfig) -> Balancer:
        """The balancer ``config.balance`` names (``BalancerError`` if it cannot be made)."""
        return create_balancer(config.balance)

    @classmethod
    def from_config(cls, config: PoolConfig, *, now: float = 0.0) -> Pool:
        """The pool with its fixed-IP servers; servers named by DNS join through
        ``discovery`` once their names resolve."""
        static = (Server.from_config(s) for s in config.servers if not s.is_dynamic)
        return cls(config, static, now=now)

    # --- membership ----------------------------------------------------------------------

    def set_servers(
        self, servers: Iterable[Server], now: float, reason: str = "removed"
    ) -> list[Event]:
        """Make the membership ``servers`` (off the hot path): a diff by name. A server that
        stays keeps its object, counters and health; a new one enters in the health
        machine's initial state; a removed one takes no new sessions (live ones go on).
        ``reason`` says why servers left, for the log."""
        events: list[Event] = []
        wanted = {server.name: server for server in servers}
        for name in [n for n in self.servers if n not in wanted]:
            gone = self.servers.pop(name)
            gone.removed = True
            gone.eligible = False
            events += self.health.remove(name, now, reason)
        for name, server in wanted.items():
            kept = self.servers.get(name)
            if kept is not None and (kept.host, kept.port) == (server.host, server.port):
                kept.weight = server.weight
                kept.backup = server.backup
                kept.max_connections = server.max_connections
                continue
            if kept is not None:  # same name, new address: a new server
                kept.removed = True
                events += self.health.remove(name, now, reason)
            self.servers[name] = server
            events += self.health.add(name, now)
        self._primaries = [s for s in self.servers.values() if not s.backup]
        self._backups = [s for s in self.servers.values() if s.backup]
        self.balancer.update(list(self.servers.values()))
        # The health machine reports an empty pool as soon as the first server is added (it
        # is not eligible before its probes pass); report the pool's real size instead.
        events = [
            dataclasses.replace(e, servers=len(self.servers)) if isinstance(e, PoolEmpty) else e
            for e in events
        ]
        return self._sync(events, now)

    # --- health inputs -------------------------------------------------------------------

    def connect_result(
        self, server: Server, ok: bool, now: float, kind: str = "other"
    ) -> list[Event]:
        """A real client's connect attempt finished (passive outlier detection). ``kind``
        of a failure: "refused", "timeout" or "other" (counted per server)."""
        if ok and not self._has_passive_failures(server):
            return []  # the common case: nothing to count, no state machine run
        if not ok:
            server.connect_failures += 1
            if kind == "refused":
                server.connect_refused += 1
            elif kind == "timeout":
                server.connect_timeouts += 1
            else:
                server.connect_other += 1
        return self._sync(self.health.on_connect(server.name, ok, now), now)

    def _has_passive_failures(self, server: Server) -> bool:
        name = server.name
        return name in self.health and self.health.server(name).passive_failures > 0

    def probe_result(
        self, name: str, result: ProbeResult, now: float, detail: str = ""
    ) -> list[Event]:
        return self._sync(self.health.on_probe(name, result, now, detail), now)

    def admin(self, name: str, action: AdminAction, now: float) -> list[Event]:
        """Drain, enable or disable a server. KeyError if the pool has no such server."""
        return self._sync(self.health.admin(name, action, now), now)

    def set_weight(self, name: str, weight: int, now: float) -> int:
        """Set a server's weight at runtime (admin API); returns the old weight. Weight 0
        takes no new sessions; live ones go on. KeyError if the pool has no such server,
        ValueError if the weight is outside 0..MAX_WEIGHT."""
        server = self.servers[name]
        if not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight {weight} is out of range (0..{MAX_WEIGHT})")
        old = server.weight
        server.weight = weight
        # The balancers keep per-server state (smooth round-robin credit, the Maglev table)
        # built from the weights: they must see the change, as for a membership change.
        self.balancer.update(list(self.servers.values()))
        self.refresh_weights(now)
        return old

    def tick(self, now: float) -> list[Event]:
        """Timers due by ``now`` (ejection expiries); also advances slow-start ramps."""
        events = self._sync(self.health.tick(now), now)
        if self._ramping:
            self.refresh_weights(now)
        return events

    def next_deadline(self) -> float | None:
        return self.health.next_deadline()

    @property
    def ramping(self) -> bool:
        """Some server is in slow start: call ``refresh_weights`` now and then."""
        return self._ramping

    def refresh_weights(self, now: float) -> None:
        ramping = False
        for server in self.servers.values():
            factor = self.health.weight_factor(server.name, now)
            server.weight_factor = factor
            ramping = ramping or factor < 1.0
        self._ramping = ramping

    def _sync(self, events: list[Event], now: float) -> list[Event]:
        for event in events:
            if isinstance(event, ServerEjected):
                ejected = self.servers.get(event.server)
                if ejected is not None:
                    ejected.ejections += 1
            if isinstance(event, ServerStateChanged | ServerAdded):
                server = self.servers.get(event.server)
                if server is None or event.server not in self.health:
                    continue
                if isinstance(event, ServerStateChanged):
                    server.last_change = event
                record = self.health.server(event.server)
                server.eligible = record.eligible
                server.admin_ok = record.admin is Admin.ENABLED
        if any(isinstance(event, ServerStateChanged) for event in events):
            self.refresh_weights(now)
        return events

    # --- choosing ------------------------------------------------------------------------

    def client(self, ip: str, port: int) -> Client:
        key = f"{ip}:{port}" if self.hash_key == "source_ip_port" else ip
        return Client(ip, port, key.encode())

    def candidates(self, tried: Sequence[Server] = ()) -> list[Server]:
        """Servers that may take this client now, by the rules of the module docstring.
        ``tried`` (servers that already failed for this client) are left out last, so that a
        retry stays on the primaries while any is up."""
        primaries = self._primaries
        healthy = [s for s in primaries if s.available()]
        threshold = self.panic_threshold
        if healthy and threshold and len(healthy) * 100 < threshold * len(primaries):
            chosen = [s for s in primaries if s.available_in_panic()]
        elif healthy:
            chosen = healthy
        else:
            chosen = [s for s in self._backups if s.available()]
            if not chosen and threshold:
                chosen = [s for s in primaries if s.available_in_panic()]
        if tried:
            return [s for s in chosen if s not in tried]
        return chosen

    def choose(self, client: Client, tried: Sequence[Server] = ()) -> Server | None:
        """The server for a new session, or None when nothing may take it."""
        candidates = self.candidates(tried)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return self.balancer.pick(candidates, client)

    @staticmethod
    def session_started(server: Server) -> None:
        server.active += 1
        server.total += 1

    @staticmethod
    def session_ended(server: Server, bytes_sent: int, bytes_received: int) -> None:
        server.active -= 1
        server.bytes_sent += bytes_sent
        server.bytes_received += bytes_received
