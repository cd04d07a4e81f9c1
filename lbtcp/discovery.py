"""Servers named by DNS: keeps each pool's membership in step with ``resolution.DnsWatcher``.

Theory of operation. A server entry whose address is ``NAME:PORT``, or that has ``srv``, is
dynamic: one watch per entry (key ``POOL/NAME``, by the entry's display name) in a single
``DnsWatcher`` shared by every pool, so a name used twice is looked up once. Whenever the
targets of a watch change, the pool's whole membership is rebuilt (its static IP servers plus
the current targets of each of its watches) and handed to ``Pool.set_servers``, which diffs by
server name: an address that stays keeps its health state, ejection history and counters; a
new one enters through the health machine's initial state; a removed one takes no new sessions
while its live sessions run to their natural end. Membership changes never happen on the
connect path.

Server names: ``NAME:PORT#IP`` for a name (``display#IP`` when the entry has a ``name``), and
``TARGET:PORT#IP`` for SRV records (``name/TARGET:PORT#IP`` with a ``name``). They are stable
across refreshes as long as the address stays.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lbtcp.addresses import parse_endpoint
from lbtcp.config import Config, PoolConfig, ServerConfig
from lbtcp.events import Event
from lbtcp.log import Log
from lbtcp.pool import Pool, Server
from lbtcp.resolution import (
    DnsChanged,
    DnsEvent,
    DnsFailure,
    DnsRecovered,
    DnsWatcher,
    ResolvedTarget,
)


def static_servers(config: PoolConfig) -> list[Server]:
    return [Server.from_config(entry) for entry in config.servers if not entry.is_dynamic]


def _server_from_target(entry: ServerConfig, target: ResolvedTarget) -> Server:
    if entry.srv:
        name = f"{entry.name}/{target.name}" if entry.name else target.name
    else:
        name = f"{entry.name}#{target.host}" if entry.name else target.name
    return Server(
        name,
        target.host,
        target.port,
        weight=target.weight,
        backup=target.backup,
        max_connections=entry.max_connections,
    )


def dynamic_entries(config: Config) -> dict[str, tuple[str, ServerConfig]]:
    """The DNS entries of every pool, keyed ``POOL/NAME`` by the entry's display name (unique
    in its pool): stable when a reload reorders or inserts entries, so a name that stays keeps
    its watch."""
    return {
        f"{pool_name}/{entry.display_name}": (pool_name, entry)
        for pool_name, pool_config in config.pools.items()
        for entry in pool_config.servers
        if entry.is_dynamic
    }


class Discovery:
    """The DNS side of a runtime: watches, membership rebuilds, and DNS log lines."""

    def __init__(
        self,
        config: Config,
        pools: dict[str, Pool],
        loop: asyncio.AbstractEventLoop,
        log: Log,
        on_pool_events: Callable[[Pool, list[Event]], None],
    ) -> None:
        self.config = config
        self.pools = pools
        self.loop = loop
        self.log = log
        self.on_pool_events = on_pool_events
        self.entries = dynamic_entries(config)
        self.watcher: DnsWatcher | None = None
        self._started = False
        # The fleet's extra servers and weights join every membership rebuild (reload, DNS,
        # fleet change alike), so that none of them drops what another one added.
        self.membership_hook: Callable[[str, list[Server]], list[Server]] | None = None

    @property
    def query_counts(self) -> dict[str, int]:
        return self.watcher.query_counts if self.watcher is not None else {}

    @property
    def name_query_counts(self) -> dict[str, dict[str, int]]:
        """Lookups by DNS name, then by result (``resolution.QUERY_RESULTS``)."""
        return self.watcher.name_query_counts if self.watcher is not None else {}

    async def start(self) -> None:
        """Start the lookups and wait (bounded by the resolver timeout) for first answers.
        With DNS down, lbtcp starts anyway: those pools refuse until a lookup succeeds."""
        if not self.entries:
            return
        self.watcher = DnsWatcher(
            self.config.resolver,
            on_change=self._on_change,
            on_event=self._on_event,
            clock=self.loop.time,
        )
        for key, (_pool, entry) in self.entries.items():
            self._watch(key, entry)
        await self.watcher.start(wait=True, ready_timeout=self.config.resolver.timeout + 0.5)
        self._started = True
        for pool_name in {pool for pool, _entry in self.entries.values()}:
            self._rebuild(pool_name)

    def _watch(self, key: str, entry: ServerConfig) -> None:
        assert self.watcher is not None
        if entry.srv:
            self.watcher.watch_srv(key, entry.srv, backup=entry.backup)
        else:
            endpoint = parse_endpoint(entry.address)
            self.watcher.watch_name(key, endpoint.host, endpoint.port, entry.weight, entry.backup)

    async def reconfigure(self, config: Config) -> None:
        """A reload: watch the names that are new or changed, unwatch those that left. The
        pools are rebuilt by the caller (it applies the rest of the reload to them first).
        A name watched before keeps its cached answer, so its servers stay members."""
        entries = dynamic_entries(config)
        self.config = config
        old, self.entries = self.entries, entries
        if self.watcher is None:
            if entries:
                # The first names: start the watcher without waiting for answers (a reload
                # must not stall); the pools fill in when the answers arrive.
                self.watcher = DnsWatcher(
                    config.resolver,
                    on_change=self._on_change,
                    on_event=self._on_event,
                    clock=self.loop.time,
                )
                for key, (_pool, entry) in entries.items():
                    self._watch(key, entry)
                await self.watcher.start(wait=False)
                self._started = True
            return
        for key in old:
            if key not in entries:
                self.watcher.unwatch(key)
        for key, (pool_name, entry) in entries.items():
            if old.get(key) != (pool_name, entry):
                self._watch(key, entry)

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.close()

    def membership(self, pool_name: str) -> list[Server]:
        """The pool's servers now: its static ones, then what DNS currently says."""
        pool = self.pools[pool_name]
        servers = static_servers(pool.config)
        for key, (owner, _entry) in self.entries.items():
            if owner == pool_name:
                servers += self.entry_servers(key)
        if self.membership_hook is not None:
            servers = self.membership_hook(pool_name, servers)
        return servers

    def entry_servers(self, key: str) -> list[Server]:
        """The servers one DNS entry (``POOL/NAME``) yields now."""
        if self.watcher is None or key not in self.entries:
            return []
        entry = self.entries[key][1]
        return [_server_from_target(entry, t) for t in self.watcher.current(key)]

    def _rebuild(self, pool_name: str) -> None:
        pool = self.pools[pool_name]
        events = pool.set_servers(
            self.membership(pool_name), self.loop.time(), reason="dns: no longer in the answer"
        )
        self.on_pool_events(pool, events)

    def _on_change(self, key: str, targets: tuple[ResolvedTarget, ...]) -> None:
        """Called by the watcher when the targets of ``key`` changed."""
        if self._started and key in self.entries:
            self._rebuild(self.entries[key][0])

    def _on_event(self, event: DnsEvent) -> None:
        """DNS events become log lines: failures once per episode, recoveries, changes."""
        if isinstance(event, DnsFailure):
            if event.stale_until is not None:
                kept = round(max(0.0, event.stale_until - self.loop.time()), 1)
                message = f"DNS lookups failing; keeping the last good addresses for {kept}s"
            else:
                message = "DNS lookups failing; no addresses known yet"
            self.log.event(
                "dns_failure",
                message,
                name=event.name,
                qtype=event.qtype,
                failure=event.kind,
                error=event.error,
            )
        elif isinstance(event, DnsRecovered):
            self.log.event(
                "dns_recovered",
                "DNS lookups answer again",
                name=event.name,
                failed_for_s=round(event.failed_for, 3),
            )
        elif isinstance(event, DnsChanged):
            pool_name = self.entries.get(event.key, ("?", None))[0]
            self.log.event(
                "dns_change",
                "the servers behind a name changed",
                pool=pool_name,
                name=event.name,
                added=",".join(t.host for t in event.added) or "-",
                removed=",".join(t.host for t in event.removed) or "-",
            )
