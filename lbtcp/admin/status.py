"""The ``GET /status`` document: listeners, pools and servers as plain JSON-ready data.

Theory of operation. ``status_document(runtime)`` reads the plain counters and health records
the data plane keeps (nothing is counted here) and returns a dict whose shape is the contract
in the README's "Status document" section, which the CLI, the status page and the alert
rules' authors read. Times the core keeps on the loop clock (``loop.time()``) are converted
to Unix wall-clock seconds with one offset taken when the document is built.

The pool verdict follows ``pool.py``'s candidate rules: ``empty`` (no candidate: clients are
refused), ``backup`` (no primary in service, healthy backups serve), ``panic`` (rules 2 and 4:
health is ignored), ``degraded`` (primaries serve but not all of them are in service, for any
reason: health, draining, disabled, weight 0, full), ``ok`` (every primary in service).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

from lbtcp import __version__
from lbtcp.addresses import format_address
from lbtcp.counters import live_bytes

if TYPE_CHECKING:
    from lbtcp.listener import Listener
    from lbtcp.pool import Pool, Server
    from lbtcp.runtime import Runtime

__all__ = ["VERDICTS", "pool_verdict", "status_document"]

VERDICTS = ("ok", "degraded", "panic", "backup", "empty")


def pool_verdict(pool: Pool) -> str:
    """One word for what a pool serves from now (see the module docstring)."""
    servers = pool.servers.values()
    primaries = [s for s in servers if not s.backup]
    in_service = [s for s in primaries if s.available()]
    threshold = pool.panic_threshold
    if in_service:
        if threshold and len(in_service) * 100 < threshold * len(primaries):
            return "panic"  # rule 2
        return "ok" if len(in_service) == len(primaries) else "degraded"
    if any(s.available() for s in servers if s.backup):
        return "backup"  # rule 3
    if threshold and any(s.available_in_panic() for s in primaries):
        return "panic"  # rule 4
    return "empty"  # rule 5


def _clock_offset() -> float:
    """Seconds to add to a loop time to get the wall clock."""
    try:
        loop_now = asyncio.get_running_loop().time()
    except RuntimeError:  # no loop: a test or a tool reading a runtime after it stopped
        loop_now = time.monotonic()
    return time.time() - loop_now


def _listener(listener: Listener) -> dict[str, Any]:
    config = listener.config
    return {
        "name": listener.name,
        "pool": listener.pool.name,
        "addresses": list(listener.addresses) or list(config.bind),
        "active": listener.active,
        "total": listener.connections_total,
        "max_connections": config.max_connections,
        "refused": dict(listener.refused),
        # SNI routing: the pool each name goes to; the default is "pool" above.
        "routes": [{"sni": route.sni, "pool": route.pool} for route in config.routes],
    }


def _server(
    pool: Pool, server: Server, live: dict[Server, tuple[int, int]], offset: float
) -> dict[str, Any] | None:
    if server.name not in pool.health:
        return None
    record = pool.health.server(server.name)
    sent, received = live.get(server, (0, 0))
    probe = server.last_probe
    change = server.last_change
    last_change: dict[str, Any] | None = None
    if change is not None:
        # A health change under an admin state (a draining server failing its probes) leaves
        # the shown state alone: show the health states then, so the change is visible.
        shown = change.old is not change.new
        last_change = {
            "at": change.at + offset,
            "from": (change.old if shown else change.old_health).value,
            "to": (change.new if shown else change.new_health).value,
            "reason": change.reason,
        }
    return {
        "name": server.name,
        "address": format_address(server.host, server.port),
        "backup": server.backup,
        "state": record.state.value,
        "health": record.health.value,
        "admin": record.admin.value,
        "weight": server.weight,
        "effective_weight": server.effective_weight,
        "max_connections": server.max_connections,
        "active": server.active,
        "total": server.total,
        "connect_failures": {
            "refused": server.connect_refused,
            "timeout": server.connect_timeouts,
            "other": server.connect_other,
        },
        "ejections": server.ejections,
        "bytes_sent": server.bytes_sent + sent,
        "bytes_received": server.bytes_received + received,
        "last_probe": None
        if probe is None
        else {
            "result": probe.result,
            "detail": probe.detail,
            "duration_ms": probe.duration * 1000.0,
            "at": probe.at + offset,
        },
        "last_change": last_change,
    }


def _pool(pool: Pool, live: dict[Server, tuple[int, int]], offset: float) -> dict[str, Any]:
    servers = [_server(pool, server, live, offset) for server in pool.servers.values()]
    return {
        "name": pool.name,
        "balance": pool.config.balance,
        "verdict": pool_verdict(pool),
        "servers_total": len(pool.servers),
        "in_service": len(pool.candidates()),
        "servers": [s for s in servers if s is not None],
    }


def status_document(runtime: Runtime) -> dict[str, Any]:
    """The /status document of a running ``runtime`` (called by the admin server per GET)."""
    offset = _clock_offset()
    now = time.time()
    started_at: float = runtime.started_at
    live = live_bytes(
        session for listener in runtime.listeners.values() for session in listener.sessions
    )
    document = {
        "version": __version__,
        "pid": os.getpid(),
        "config": runtime.config.source,
        "started_at": started_at,
        "uptime_s": max(0.0, now - started_at),
        "draining": runtime.draining,
        "listeners": [_listener(listener) for listener in runtime.listeners.values()],
        "pools": [_pool(pool, live, offset) for pool in runtime.pools.values()],
    }
    fleet = runtime.fleet
    if fleet is not None:  # only with [fleet]: without it the document is unchanged
        document["fleet"] = {
            "node": fleet.config.node,
            "connected": fleet.connected,
            "revision": fleet.revision,
            "updates": dict(fleet.updates),
            "overrides": [
                {"pool": pool, "server": server, "admin": o.admin, "weight": o.weight}
                for (pool, server), o in sorted(fleet.state.overrides().items())
            ],
        }
    # workers > 1: each worker's pid and live sessions (lbtcp.workers.supervisor).
    workers_info = getattr(runtime, "workers_info", None)
    if workers_info is not None:
        document["workers"] = workers_info()
    return document
