"""Servers of a pool and the choice of one for a new session (pure).

Theory of operation: a ``Pool`` owns its ``Server`` objects and a balancer. ``choose()`` is the
hot-path entry: it filters the servers that may take a new session right now (eligible, weight
above zero, below their ``max_connections``, not yet tried for this client), prefers primaries
over backups, and lets the balancer pick among what is left. The I/O layer calls
``session_started``/``session_ended`` around each session so that active counts (used by
``least_connections``, ``random_two`` and ``max_connections``) stay exact. Nothing here touches
sockets or the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lbtcp.addresses import Endpoint, parse_endpoint
from lbtcp.balancing import Balancer, Client, create_balancer
from lbtcp.config import PoolConfig, ServerConfig


class Server:
    """One backend server and its live counters. Identified by ``name`` within its pool."""

    __slots__ = (
        "active",
        "backup",
        "bytes_received",
        "bytes_sent",
        "connect_failures",
        "eligible",
        "host",
        "max_connections",
        "name",
        "port",
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
        # Health and admin state decide this; without health checks every server is eligible.
        self.eligible = True
        # Slow start scales the weight in (0, 1]; 1.0 at full weight.
        self.weight_factor = 1.0
        self.active = 0
        self.total = 0
        self.connect_failures = 0
        self.bytes_sent = 0
        self.bytes_received = 0

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

    def __repr__(self) -> str:
        return f"Server({self.name!r}, {self.host}:{self.port})"


class Pool:
    """A named set of servers with a balancer."""

    __slots__ = ("_backups", "_primaries", "balancer", "config", "hash_key", "name", "servers")

    def __init__(
        self, config: PoolConfig, servers: Iterable[Server], balancer: Balancer | None = None
    ) -> None:
        self.name = config.name
        self.config = config
        self.hash_key = config.hash_key
        self.balancer = balancer if balancer is not None else create_balancer(config.balance)
        self.servers: dict[str, Server] = {}
        self._primaries: list[Server] = []
        self._backups: list[Server] = []
        self.set_servers(servers)

    @classmethod
    def from_config(cls, config: PoolConfig) -> Pool:
        return cls(config, (Server.from_config(s) for s in config.servers))

    def set_servers(self, servers: Iterable[Server]) -> None:
        """Replace the membership (off the hot path) and tell the balancer."""
        self.servers = {server.name: server for server in servers}
        self._primaries = [s for s in self.servers.values() if not s.backup]
        self._backups = [s for s in self.servers.values() if s.backup]
        self.balancer.update(list(self.servers.values()))

    def client(self, ip: str, port: int) -> Client:
        key = f"{ip}:{port}" if self.hash_key == "source_ip_port" else ip
        return Client(ip, port, key.encode())

    def candidates(self, tried: Sequence[Server] = ()) -> list[Server]:
        """Servers that may take this client now: primaries, else backups if no primary is
        available at all (tried or not, so a retry stays on the primaries while any is up)."""
        primaries = [s for s in self._primaries if s.available()]
        if primaries:
            return [s for s in primaries if s not in tried] if tried else primaries
        backups = [s for s in self._backups if s.available()]
        return [s for s in backups if s not in tried] if tried else backups

    def choose(self, client: Client, tried: Sequence[Server] = ()) -> Server | None:
        """The server for a new session, or None when nothing may take it."""
        candidates = self.candidates(tried)
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        picked = self.balancer.pick(candidates, client)
        if picked is None:
            return None
        # Balancers hand back one of the candidates; the pool only deals in its own Servers.
        assert isinstance(picked, Server)
        return picked

    @staticmethod
    def session_started(server: Server) -> None:
        server.active += 1
        server.total += 1

    @staticmethod
    def session_ended(server: Server, bytes_sent: int, bytes_received: int) -> None:
        server.active -= 1
        server.bytes_sent += bytes_sent
        server.bytes_received += bytes_received
