"""A node of the fleet: list and watch the prefix, apply it to the runtime, keep the registry.

Theory of operation. ``Fleet.start`` lists the prefix once, except its ``nodes/`` registry
(``desired_ranges``; bounded by ``[fleet] timeout``: a start never waits longer for etcd;
unreachable, the node serves its file and says so once), then one task watches the same two
ranges from the listed revision + 1, each resuming from the revision it delivered. Each batch
of watch events goes through ``FleetState`` (validation, last valid value kept) and then to the
runtime through the paths
reload and the admin API use: ``Pool.set_servers`` (a server that stays keeps its health),
``Pool.admin`` and the balancer update of a weight change. A broken stream is resumed from the
last revision seen; a compacted one is listed again. etcd going away and coming back are one
log line each, however many retries happen in between; the desired state last seen stays in
force meanwhile (never an empty pool because of etcd).

A second task keeps the node's registry entry: a lease of ``lease_ttl`` with keep-alives at a
third of it, and the entry rewritten when the node's health verdicts change (debounced), not
per probe. ``close`` (SIGTERM) revokes the lease, so the entry goes at once; after a kill -9
etcd drops it when the lease expires.

This runs in the control plane (the runtime's loop), never on a data-plane hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from lbtcp import __version__
from lbtcp.config import FleetConfig
from lbtcp.events import Event, ServerAdded, ServerStateChanged
from lbtcp.fleet.etcd import Compacted, EtcdClient, EtcdError, KeyValue, Rewound, prefix_end
from lbtcp.fleet.state import (
    ADMIN_ACTION,
    FleetState,
    NodeInfo,
    Update,
    effective_weight,
    encode,
    stricter,
)
from lbtcp.health import Admin, AdminAction
from lbtcp.pool import Pool, Server

if TYPE_CHECKING:
    from lbtcp.runtime import Runtime

RETRY_MIN = 0.2  # first retry after etcd went away; doubles up to RETRY_MAX
RETRY_MAX = 1.0  # short: a node must resync within about a second of etcd's return
REGISTRY_DEBOUNCE = 0.1  # health changes within this are one registry write


def desired_ranges(prefix: str) -> list[tuple[str, str]]:
    """The prefix without its ``nodes/`` registry, as ``[key, range_end)`` ranges. Nodes do
    not watch each other's registry entries: with 100 nodes each rewriting a 180 KB entry,
    every node would receive all of them; only ``lbtcp status --fleet`` reads them."""
    nodes = prefix + "nodes/"
    return [(prefix, nodes), (prefix_end(nodes), prefix_end(prefix))]


class Fleet:
    """The fleet side of one runtime."""

    def __init__(self, config: FleetConfig, runtime: Runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.state = FleetState(config.prefix)
        self.client = EtcdClient(config)
        self.connected = False
        self.updates = {"applied": 0, "invalid": 0}
        # Local admin-API decisions, kept apart so that the fleet's can be combined with them.
        self.local_admin: dict[tuple[str, str], str] = {}
        self.local_weight: dict[tuple[str, str], int] = {}
        # Each server's weight before the fleet's and the local override (the file's, DNS's
        # or its etcd entry's), by pool: what a deleted weight override falls back to.
        self._base_weight: dict[str, dict[str, int]] = {}
        self.lease = 0
        self.ranges = desired_ranges(config.prefix)
        # Per watched range, the revision it has delivered up to: each resumes from its own.
        self._seen = [0] * len(self.ranges)
        self._listed_at = 0  # events at or before the last listing are in it already
        self.started_at = time.time()
        self._ever_connected = False
        self._said_down = False
        self._tasks: list[asyncio.Task[None]] = []
        self._registry_dirty = asyncio.Event()
        self._written = b""
        self._closing = False

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def node_key(self) -> str:
        return f"{self.config.prefix}nodes/{self.config.node}"

    # --- start and stop -------------------------------------------------------------------

    async def start(self) -> None:
        """List once (bounded by the timeout), then watch and keep the registry in tasks."""
        try:
            await asyncio.wait_for(self._list(), self.config.timeout)
        except (EtcdError, asyncio.TimeoutError) as exc:
            self._went_down(exc if isinstance(exc, EtcdError) else "no answer in time")
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_loop()), loop.create_task(self._lease_loop())]

    async def close(self) -> None:
        """On stop: end the tasks, revoke the lease (the registry entry goes at once)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.lease:
            with contextlib.suppress(EtcdError, asyncio.TimeoutError):
                await asyncio.wait_for(self.client.revoke(self.lease), self.config.timeout)
        await self.client.close()

    # --- connectivity lines ---------------------------------------------------------------

    def _went_down(self, why: object) -> None:
        self.connected = False
        if self._said_down:
            return
        self._said_down = True
        if self._ever_connected:
            message = "etcd unreachable: keeping the last desired state from the fleet"
        else:
            message = "etcd unreachable at start: serving the config file's state"
        self.runtime.log.event(
            "fleet_unreachable", message, etcd=",".join(self.config.etcd), error=str(why)
        )

    def _came_back(self, how: str, **fields: object) -> None:
        """etcd answered (``how``: "listed" or "watch resumed"); one line if it was away."""
        self.connected = True
        if self._said_down:
            self._said_down = False
            self.runtime.log.event(
                "fleet_connected",
                "etcd reachable again: desired state resynchronised",
                revision=self.state.revision,
                how=how,
                **fields,
            )
        elif not self._ever_connected:
            self.runtime.log.event(
                "fleet_connected",
                "fleet: desired state listed from etcd",
                revision=self.state.revision,
                node=self.config.node,
                **fields,
            )
        self._ever_connected = True

    # --- desired state --------------------------------------------------------------------

    async def _list(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        items, revision = await self.client.list_ranges(self.ranges)
        listed = loop.time()
        self._seen = [revision] * len(self.ranges)
        self._listed_at = revision
        updates = self.state.load(((kv.key, kv.value or b"") for kv in items), revision)
        self._account(updates, log_applied=False)
        self._apply_pools({u.pool for u in updates if u.pool and u.result == "applied"}, True)
        self._came_back(
            "listed",
            keys=len(items),
            list_ms=round((listed - started) * 1000, 1),
            apply_ms=round((loop.time() - listed) * 1000, 1),
        )

    async def _watch_loop(self) -> None:
        """Task: watch from the last revision seen (a broken stream resumes there, so no
        change is missed or applied twice); list again only when etcd has compacted that
        revision away, or when the node never listed (etcd was down at start)."""
        delay = RETRY_MIN
        must_list = not self._ever_connected
        while not self._closing:
            try:
                if must_list:
                    # Not bounded as a whole (the start is): each request and read is, by
                    # httpx's timeout, and a large prefix may take longer than one of them.
                    await self._list()
                    must_list = False
                watches = [
                    asyncio.ensure_future(self._watch_range(index))
                    for index in range(len(self.ranges))
                ]
                try:
                    # Both run until one fails; then both restart, each from its revision.
                    done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_EXCEPTION)
                finally:
                    for task in watches:
                        task.cancel()
                    await asyncio.gather(*watches, return_exceptions=True)
                for task in done:
                    task.result()  # raises what ended it
            except Compacted as exc:
                why = (
                    "etcd's revision went back (a restored or new store)"
                    if isinstance(exc, Rewound)
                    else "etcd compacted the revisions this node missed"
                )
                self.runtime.log.event(
                    "fleet_relist",
                    f"{why}: listing the prefix again",
                    revision=self.state.revision,
                    compacted_to=exc.compact_revision,
                )
                must_list = True
            except (EtcdError, asyncio.TimeoutError) as exc:
                if self.connected:
                    delay = RETRY_MIN  # it worked until now: the first retry comes soon
                self._went_down(exc if isinstance(exc, EtcdError) else "no answer in time")
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception as exc:  # a bug must not take the node down; retry
                self.runtime._loop_exception("fleet watch failed", exc)
                await asyncio.sleep(RETRY_MAX)

    async def _watch_range(self, index: int) -> None:
        key, end = self.ranges[index]
        async for batch in self.client.watch(key, end, self._seen[index] + 1):
            if not self.connected:
                self._came_back("watch resumed")
            if batch:
                self._seen[index] = max(self._seen[index], *(kv.mod_revision for kv in batch))
                self._on_batch([kv for kv in batch if kv.mod_revision > self._listed_at])

    def _on_batch(self, batch: list[KeyValue]) -> None:
        updates = [self.state.apply(kv.key, kv.value, kv.mod_revision) for kv in batch]
        applied = [u for u in updates if u.result == "applied"]
        # Membership changes rebuild their pool; an override touches its server only (one
        # drain among 10,000 servers must not rebuild them all).
        members = {u.pool for u in applied if u.kind == "server"}
        self._apply_pools(members, False)
        for update in applied:
            if update.kind == "override" and update.pool not in members:
                pool = self.runtime.pools.get(update.pool)
                if pool is not None and update.name in pool.servers:
                    self.apply_override(pool, update.name)
        # Applied first, logged after: the line means "in force on this node".
        self._account(updates, log_applied=True)

    def _account(self, updates: list[Update], log_applied: bool) -> None:
        log = self.runtime.log
        for update in updates:
            if update.result == "invalid":
                self.updates["invalid"] += 1
                log.event(
                    "fleet_invalid",
                    f"ignored an invalid value in etcd: {update.message}",
                    key=update.key,
                )
            elif update.result == "applied" and update.kind != "node":
                # Other nodes' registry entries are news, not desired state: not counted.
                self.updates["applied"] += 1
                if log_applied:
                    log.event(
                        "fleet_update",
                        "fleet: desired state changed",
                        key=update.key,
                        revision=self.state.revision,
                    )

    def _apply_pools(self, pools: set[str], everything: bool) -> None:
        names = list(self.runtime.pools) if everything else [p for p in pools if p]
        for name in names:
            pool = self.runtime.pools.get(name)
            if pool is not None:
                self.apply_pool(pool)

    def apply_pool(self, pool: Pool) -> None:
        """The pool's membership and admin states as file + DNS + fleet now say."""
        discovery = self.runtime.discovery
        loop = self.runtime._loop
        if discovery is None or loop is None:
            return
        now = loop.time()
        events = pool.set_servers(
            discovery.membership(pool.name), now, reason="fleet: removed from etcd"
        )
        self.runtime.on_events(pool, events)
        self.apply_admin(pool)

    def apply_override(self, pool: Pool, name: str) -> None:
        """One server's fleet override changed: its weight and admin state by precedence."""
        loop = self.runtime._loop
        base = self._base_weight.get(pool.name, {}).get(name)
        if loop is None or base is None:
            return
        key = (pool.name, name)
        fleet = self.state.override(pool.name, name).weight
        weight = effective_weight(self.local_weight.get(key), fleet, base)
        if pool.servers[name].weight != weight:
            pool.set_weight(name, weight, loop.time())
        self.apply_admin(pool, [name])

    def apply_admin(self, pool: Pool, names: list[str] | None = None) -> None:
        """Each server's admin state = the stricter of the local one and the fleet's
        (``names``: only these servers; default every server of the pool)."""
        loop = self.runtime._loop
        if loop is None:
            return
        if names is None:
            # Only servers that have an admin override, local or fleet, or that are not
            # enabled now (an override of theirs may have gone): not every one of 10,000.
            names = [n for n, o in self.state.pool_overrides(pool.name).items() if o.admin]
            names += [n for (p, n) in self.local_admin if p == pool.name]
            names += [r.name for r in pool.health if r.admin is not Admin.ENABLED]
        for name in dict.fromkeys(names):
            if name not in pool.servers:
                continue
            wanted = self.wanted_admin(pool.name, name)
            if name in pool.health and pool.health.server(name).admin.value != wanted:
                action = AdminAction(ADMIN_ACTION[wanted])
                self.runtime.on_events(pool, pool.admin(name, action, loop.time()))

    def wanted_admin(self, pool: str, server: str) -> str:
        fleet = self.state.override(pool, server).admin or "enabled"
        return stricter(self.local_admin.get((pool, server), "enabled"), fleet)

    def membership(self, pool_name: str, servers: list[Server]) -> list[Server]:
        """Discovery's hook: the file's and DNS's servers, the fleet's extra servers joining
        them (a name the file has wins), weights by precedence."""
        by_name = {server.name: server for server in servers}
        for name, extra in sorted(self.state.extra_servers(pool_name).items()):
            if name in by_name:
                continue
            host, _, port = extra.address.rpartition(":")
            by_name[name] = Server(
                name, host.strip("[]"), int(port), weight=extra.weight, backup=extra.backup
            )
        self._base_weight[pool_name] = {name: s.weight for name, s in by_name.items()}
        # Only the servers with an override or a local weight change: no scan of them all.
        for name, override in self.state.pool_overrides(pool_name).items():
            server = by_name.get(name)
            if server is not None and override.weight is not None:
                server.weight = override.weight
        for (pool, name), weight in self.local_weight.items():
            server = by_name.get(name)
            if pool == pool_name and server is not None:
                server.weight = weight
        return list(by_name.values())

    # --- local admin API ------------------------------------------------------------------

    def local_action(self, pool: str, server: str, action: AdminAction) -> AdminAction:
        """The admin API asked for ``action``: remember it; the action to apply is the
        stricter of it and the fleet's override."""
        local = {"drain": "draining", "disable": "disabled", "enable": "enabled"}[action.value]
        self.local_admin[(pool, server)] = local
        return AdminAction(ADMIN_ACTION[self.wanted_admin(pool, server)])

    # --- registry -------------------------------------------------------------------------

    def on_pool_events(self, pool: Pool, events: list[Event]) -> None:
        """Called by ``Runtime.on_events`` for every batch of core events."""
        added = False
        for event in events:
            if isinstance(event, ServerAdded):
                added = True
            if isinstance(event, ServerStateChanged | ServerAdded):
                self._registry_dirty.set()
        if added and (self.state.overrides() or self.local_admin):
            # A server that joined (DNS, reload) takes the fleet's override for its name.
            loop = self.runtime._loop
            if loop is not None:
                loop.call_soon(self.apply_admin, pool)

    def node_info(self) -> NodeInfo:
        admin = self.runtime.admin
        return NodeInfo(
            version=__version__,
            admin=admin.address if admin is not None else "",
            started_at=round(self.started_at, 3),
            health={
                pool.name: {name: pool.health.health_state(name).value for name in pool.servers}
                for pool in self.runtime.pools.values()
            },
        )

    async def _lease_loop(self) -> None:
        """Task: keep the lease alive and the registry entry current."""
        ttl = int(self.config.lease_ttl)
        step = max(ttl / 3, 0.5)
        loop = asyncio.get_running_loop()
        kept_alive = loop.time()
        self._registry_dirty.set()
        while not self._closing:
            try:
                if not self.lease:
                    self.lease = await asyncio.wait_for(self.client.grant(ttl), self.config.timeout)
                    self._written = b""
                    kept_alive = loop.time()
                if self._registry_dirty.is_set():
                    await asyncio.sleep(REGISTRY_DEBOUNCE)
                    self._registry_dirty.clear()
                    value = encode(self.node_info())
                    if value != self._written:
                        await asyncio.wait_for(
                            self.client.put(self.node_key, value, self.lease), self.config.timeout
                        )
                        self._written = value
                wait = kept_alive + step - loop.time()
                if wait > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._registry_dirty.wait(), wait)
                    continue
                left = await asyncio.wait_for(
                    self.client.keepalive(self.lease), self.config.timeout
                )
                kept_alive = loop.time()
                if left <= 0:  # expired while etcd was away: a new lease, a new entry
                    self.lease = 0
                    self._registry_dirty.set()
            except (EtcdError, asyncio.TimeoutError) as exc:
                # The watch task says "unreachable" once; here only retry (the entry is
                # rewritten once a keep-alive or put gets through).
                if "not found" in str(exc):
                    self.lease = 0
                self._written = b""
                self._registry_dirty.set()
                await asyncio.sleep(RETRY_MAX)
            except Exception as exc:  # a bug must not take the node down
                self.runtime._loop_exception("fleet registry failed", exc)
                await asyncio.sleep(RETRY_MAX)
