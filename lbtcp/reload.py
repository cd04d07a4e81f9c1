"""What a reload changes: ``plan_reload(old, new) -> ReloadPlan`` (pure).

Theory of operation. A reload is planned from the two validated configs alone, then applied by
the runtime (``Runtime.reload``) in an order that never refuses a client: new sockets are bound
first (any failure refuses the whole reload before anything changed), then pools are updated or
created, then listeners are pointed at them, and only then do removed listeners stop accepting
and drain. This module decides *what* changes; it opens no socket and reads no clock.

Identity. A listener is its ``[listeners.NAME]``; a bind is its string (``"127.0.0.1:8080"``,
``"fd:web"``): a bind that stays keeps its socket. A pool is its ``[pools.NAME]``. A server is
its display name within its pool (``name``, else ``address``, else ``srv``), so a server that
stays keeps its health state, counters, ejection and admin state. A server whose name stays
but whose address changes is a different backend: it counts as removed and added (its old
health says nothing about the new address), as DNS membership changes do.

Weights. A server's weight may have been changed at runtime (admin API); the file's weight
replaces it only when the file's weight itself changed (``weights`` lists those servers).

Some settings cannot change in a running process: ``workers``, ``user`` and ``group``
(privileges are dropped once, at start). They are listed in ``restart_needed`` and the old
values are kept (``effective`` is the new config with them put back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from lbtcp.config import Config, ListenerConfig, PoolConfig, ServerConfig

RESTART_KEYS = ("workers", "user", "group")


@dataclass(frozen=True)
class ListenerChange:
    """A listener present before and after: binds to open and to close, and whether any of
    its other settings (ACL, limits, refusal, pool, ...) changed."""

    name: str
    add_binds: tuple[str, ...] = ()
    remove_binds: tuple[str, ...] = ()
    settings_changed: bool = False


@dataclass(frozen=True)
class PoolChange:
    """A pool present before and after."""

    name: str
    balancer_changed: bool = False
    health_changed: bool = False  # [health] or [ejection] differ
    settings_changed: bool = False  # anything else but the server list
    servers_added: tuple[str, ...] = ()
    servers_removed: tuple[str, ...] = ()
    servers_changed: tuple[str, ...] = ()  # same identity, other settings (weight, backup, ...)
    weights: dict[str, int] = field(default_factory=dict)  # file weight changed: server -> new
    dns_changed: bool = False  # a DNS (name or SRV) entry was added, removed or changed

    @property
    def changed(self) -> bool:
        return bool(
            self.balancer_changed
            or self.health_changed
            or self.settings_changed
            or self.servers_added
            or self.servers_removed
            or self.servers_changed
        )


@dataclass(frozen=True)
class ReloadPlan:
    effective: Config  # the config to run: the new one, restart-only keys kept at old values
    listeners_added: tuple[str, ...] = ()
    listeners_removed: tuple[str, ...] = ()
    listeners_changed: tuple[ListenerChange, ...] = ()
    pools_added: tuple[str, ...] = ()
    pools_removed: tuple[str, ...] = ()
    pools_changed: tuple[PoolChange, ...] = ()
    restart_needed: tuple[str, ...] = ()  # messages such as "global.workers: ..."
    global_changed: tuple[str, ...] = ()  # keys of [global] applied at once
    resolver_changed: bool = False
    admin_changed: bool = False
    servers_of_removed_pools: int = 0  # counted as removed servers

    def binds_to_open(self) -> list[tuple[str, str]]:
        """(listener, bind) pairs that need a socket before anything else changes."""
        wanted = [
            (name, bind)
            for name in self.listeners_added
            for bind in self.effective.listeners[name].bind
        ]
        wanted += [
            (change.name, bind) for change in self.listeners_changed for bind in change.add_binds
        ]
        return wanted

    def counts(self) -> dict[str, int]:
        """Totals for the summary line and the reload result."""
        servers_added = servers_removed = servers_changed = 0
        for name in self.pools_added:
            servers_added += len(self.effective.pools[name].servers)
        for change in self.pools_changed:
            servers_added += len(change.servers_added)
            servers_removed += len(change.servers_removed)
            servers_changed += len(change.servers_changed)
        return {
            "listeners_added": len(self.listeners_added),
            "listeners_removed": len(self.listeners_removed),
            "listeners_changed": len(self.listeners_changed),
            "pools_added": len(self.pools_added),
            "pools_removed": len(self.pools_removed),
            "pools_changed": sum(1 for c in self.pools_changed if c.changed),
            "servers_added": servers_added,
            "servers_removed": servers_removed + self.servers_of_removed_pools,
            "servers_changed": servers_changed,
        }

    def summary(self) -> str:
        """``listeners +1 -0 ~1, servers +2 -1 ~0`` (pools are in ``counts``)."""
        c = self.counts()
        return (
            f"listeners +{c['listeners_added']} -{c['listeners_removed']} "
            f"~{c['listeners_changed']}, servers +{c['servers_added']} "
            f"-{c['servers_removed']} ~{c['servers_changed']}"
        )


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did, for the log line, ``POST /reload`` and ``lbtcp reload``."""

    ok: bool
    source: str = ""
    summary: str = ""  # "listeners +1 -0 ~1, servers +2 -1 ~0"
    counts: dict[str, int] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # every error, when not ok; nothing was changed then
    restart_needed: tuple[str, ...] = ()
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "config": self.source,
            "summary": self.summary,
            "changes": dict(self.counts),
            "errors": list(self.errors),
            "restart_needed": list(self.restart_needed),
            "duration_ms": round(self.duration_ms, 3),
        }


def _servers_by_identity(pool: PoolConfig) -> dict[str, ServerConfig]:
    return {server.display_name: server for server in pool.servers}


def _pool_settings(pool: PoolConfig) -> PoolConfig:
    """The pool without what is compared separately (servers, balancer, health, ejection)."""
    return dataclasses.replace(
        pool, servers=(), balance="", health=None, ejection=type(pool.ejection)()
    )


def _plan_pool(old: PoolConfig, new: PoolConfig) -> PoolChange:
    old_servers = _servers_by_identity(old)
    new_servers = _servers_by_identity(new)
    added: list[str] = []
    removed: list[str] = [name for name in old_servers if name not in new_servers]
    changed: list[str] = []
    weights: dict[str, int] = {}
    dns_changed = False
    for name, server in new_servers.items():
        before = old_servers.get(name)
        if before is None:
            added.append(name)
            dns_changed = dns_changed or server.is_dynamic
            continue
        if (before.address, before.srv) != (server.address, server.srv):
            removed.append(name)  # another backend under the same name (module doc)
            added.append(name)
            dns_changed = dns_changed or server.is_dynamic or before.is_dynamic
            continue
        if before != server:
            changed.append(name)
            dns_changed = dns_changed or server.is_dynamic
        if before.weight != server.weight:
            weights[name] = server.weight
    dns_changed = dns_changed or any(old_servers[n].is_dynamic for n in removed)
    return PoolChange(
        name=new.name,
        balancer_changed=old.balance != new.balance,
        health_changed=(old.health, old.ejection) != (new.health, new.ejection),
        settings_changed=_pool_settings(old) != _pool_settings(new),
        servers_added=tuple(added),
        servers_removed=tuple(removed),
        servers_changed=tuple(changed),
        weights=weights,
        dns_changed=dns_changed,
    )


def _plan_listener(old: ListenerConfig, new: ListenerConfig) -> ListenerChange | None:
    if old == new:
        return None
    return ListenerChange(
        name=new.name,
        add_binds=tuple(b for b in new.bind if b not in old.bind),
        remove_binds=tuple(b for b in old.bind if b not in new.bind),
        settings_changed=dataclasses.replace(old, bind=()) != dataclasses.replace(new, bind=()),
    )


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """What applying ``new`` over the running ``old`` means (see the module doc)."""
    restart: list[str] = []
    kept: dict[str, object] = {}
    for key in RESTART_KEYS:
        before, after = getattr(old.global_, key), getattr(new.global_, key)
        if before != after:
            restart.append(
                f"global.{key}: {after!r} needs a restart to take effect; keeping {before!r}"
            )
            kept[key] = before
    global_ = dataclasses.replace(new.global_, **kept)  # type: ignore[arg-type]
    # The fleet's etcd session (lease, watch) is made once at start: a changed [fleet]
    # waits for a restart, as the resolver's settings do.
    fleet = new.fleet
    if old.fleet != new.fleet:
        restart.append("fleet: changed settings need a restart to take effect; keeping the old")
        fleet = old.fleet
    effective = dataclasses.replace(new, global_=global_, fleet=fleet)
    global_changed = tuple(
        f.name
        for f in dataclasses.fields(global_)
        if f.name not in RESTART_KEYS and getattr(old.global_, f.name) != getattr(global_, f.name)
    )

    listener_changes = [
        change
        for name in new.listeners
        if name in old.listeners
        and (change := _plan_listener(old.listeners[name], new.listeners[name])) is not None
    ]
    pool_changes = [
        _plan_pool(old.pools[name], new.pools[name]) for name in new.pools if name in old.pools
    ]
    removed_pools = tuple(name for name in old.pools if name not in new.pools)
    return ReloadPlan(
        effective=effective,
        listeners_added=tuple(name for name in new.listeners if name not in old.listeners),
        listeners_removed=tuple(name for name in old.listeners if name not in new.listeners),
        listeners_changed=tuple(listener_changes),
        pools_added=tuple(name for name in new.pools if name not in old.pools),
        pools_removed=removed_pools,
        pools_changed=tuple(pool_changes),
        restart_needed=tuple(restart),
        global_changed=global_changed,
        resolver_changed=old.resolver != new.resolver,
        admin_changed=old.admin != new.admin,
        servers_of_removed_pools=sum(len(old.pools[name].servers) for name in removed_pools),
    )
