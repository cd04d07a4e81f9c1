"""``lbtcp drain|enable|disable|weight ... --fleet`` and ``lbtcp status --fleet``: etcd, not
the admin API. Each returns the text to print; ``FleetCommandError`` is one line for the user.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from lbtcp.config import FleetConfig
from lbtcp.fleet.etcd import EtcdClient, EtcdError
from lbtcp.fleet.state import (
    FleetState,
    Key,
    Override,
    ValueInvalid,
    disagreements,
    encode,
    parse_key,
    validate,
)


class FleetCommandError(Exception):
    pass


def change(config: FleetConfig, pool: str, server: str, action: str, weight: int) -> str:
    """Write the fleet-wide override for POOL/SERVER; keeps the field the action leaves."""
    return asyncio.run(_change(config, pool, server, action, weight))


async def _change(config: FleetConfig, pool: str, server: str, action: str, weight: int) -> str:
    key = f"{config.prefix}overrides/{pool}/{server}"
    try:
        parsed = parse_key(config.prefix, key)
    except ValueInvalid as exc:
        raise FleetCommandError(f"{pool}/{server}: {exc}") from None
    client = EtcdClient(config)
    try:
        items, _revision = await client.list_prefix(key)
        current = _current(parsed, [kv.value for kv in items if kv.key == key])
        admin = {"drain": "draining", "disable": "disabled", "enable": "enabled"}.get(action)
        if action == "weight":
            new = Override(current.admin, weight)
        else:
            new = Override(admin, current.weight)
        revision = await client.put(key, encode(new))
    except EtcdError as exc:
        raise FleetCommandError(f"etcd: {exc}") from None
    finally:
        await client.close()
    what = f"weight {weight}" if action == "weight" else action
    return f"{pool}/{server}: {what} written for the fleet (etcd revision {revision})"


def _current(key: Key, values: list[bytes | None]) -> Override:
    for raw in values:
        if raw is None:
            continue
        try:
            value = validate(key, raw)
        except ValueInvalid:
            return Override()  # garbage there: the command's value replaces it
        if isinstance(value, Override):
            return value
    return Override()


def status(config: FleetConfig) -> dict[str, Any]:
    """Every live node and where their health verdicts differ, as a JSON document."""
    return asyncio.run(_status(config))


async def _status(config: FleetConfig) -> dict[str, Any]:
    client = EtcdClient(config)
    try:
        items, revision = await client.list_prefix(f"{config.prefix}nodes/")
    except EtcdError as exc:
        raise FleetCommandError(f"etcd: {exc}") from None
    finally:
        await client.close()
    state = FleetState(config.prefix)
    state.load(((kv.key, kv.value or b"") for kv in items), revision)
    nodes = state.nodes()
    return {
        "revision": revision,
        "nodes": {
            name: {
                "version": info.version,
                "admin": info.admin,
                "started_at": info.started_at,
                "servers": sum(len(servers) for servers in info.health.values()),
            }
            for name, info in sorted(nodes.items())
        },
        "disagreements": [
            {"pool": d.pool, "server": d.server, "views": d.views, "summary": d.summary}
            for d in disagreements(nodes)
        ],
    }


def status_text(document: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    lines = [f"fleet: {len(document['nodes'])} live node(s), etcd revision {document['revision']}"]
    for name, node in document["nodes"].items():
        up = max(0.0, now - node["started_at"])
        lines.append(
            f"  node {name}: lbtcp {node['version']}, admin {node['admin'] or '-'}, "
            f"up {up:.0f}s, {node['servers']} server(s)"
        )
    if not document["disagreements"]:
        lines.append("every node agrees on every server")
    for item in document["disagreements"]:
        lines.append(f"  {item['pool']}/{item['server']}: {item['summary']}")
    return "\n".join(lines) + "\n"


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2)
