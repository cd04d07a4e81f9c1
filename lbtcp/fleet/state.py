"""The fleet's desired state, as etcd holds it under the prefix (pure: no I/O, no asyncio).

Theory of operation. Every key under ``[fleet] prefix`` is one small JSON object; its place in
the key layout says what it is (``parse_key``), ``validate`` checks its value strictly (unknown
fields, wrong types and out-of-range numbers are errors: the whole value is refused).
``FleetState`` is a node's copy: ``load`` (a full listing) and ``apply`` (one watch event) keep
the last *valid* value of each key, so garbage written over a good value changes nothing, and
report for each key whether it was applied or invalid (with a message naming the key).

Key layout (``P`` is the prefix, ``/lbtcp/`` by default):

- ``P pools/{pool}/servers/{name}`` -> ``{"address": "IP:PORT", "weight": 1, "backup": false}``:
  a server joining the file's servers of ``pool`` (``weight`` and ``backup`` optional).
- ``P overrides/{pool}/{server}`` -> ``{"admin": "drain"|"disable"|"enable", "weight": N}``:
  a fleet-wide admin override (either field may be left out; ``enable`` equals no override).
- ``P nodes/{node}`` (lease-bound, written by each node) -> ``{"version", "admin",
  "started_at", "health": {pool: {server: state}}}``.

Precedence on a node (DESIGN.md section 12): the admin state is the stricter of the local one
and the fleet's (disabled > draining > enabled); the weight is a local runtime weight if one
was set, else the fleet's, else the file's. ``disagreements`` turns the registry's per-node
health into "where do the nodes' views differ".
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping

from lbtcp.config import MAX_WEIGHT

NAME_RE = re.compile(r"^[A-Za-z0-9_.:#/@\[\]-]{1,200}$")
_NODE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_POOL_RE = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
# Values are small JSON; a node's registry entry grows with its servers (about 40 bytes each:
# 10,000 servers fit), and etcd refuses requests above 1.5 MiB.
MAX_VALUE_BYTES = 1024 * 1024

ADMIN_ORDER = {"enabled": 0, "draining": 1, "disabled": 2}
# The override's word (the CLI's verbs) -> the admin state it asks for.
OVERRIDE_ADMIN = {"enable": "enabled", "drain": "draining", "disable": "disabled"}
ADMIN_ACTION = {"enabled": "enable", "draining": "drain", "disabled": "disable"}

# The coarse verdict a node's health state stands for, for comparing nodes' views: a state a
# node reached by its own probes ("up" or "down"), or nothing conclusive yet.
VERDICT = {
    "healthy": "up",
    "failing": "up",
    "unhealthy": "down",
    "ejected": "down",
    "unknown": "unknown",
    "rising": "down",
}


class ValueInvalid(ValueError):
    """A key or value that fails validation; the message says what is wrong."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExtraServer:
    address: str
    weight: int = 1
    backup: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Override:
    admin: str | None = None  # "enabled" | "draining" | "disabled" (None: not overridden)
    weight: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeInfo:
    version: str
    admin: str
    started_at: float
    health: Mapping[str, Mapping[str, str]]


Value = ExtraServer | Override | NodeInfo


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """Where a key sits in the layout. ``kind`` is "server", "override" or "node"."""

    kind: str
    pool: str = ""
    name: str = ""  # the server's name, or the node's


@dataclasses.dataclass(frozen=True, slots=True)
class Update:
    """What one key's put or delete did to the state."""

    key: str
    result: str  # "applied" | "invalid" | "unchanged"
    kind: str = ""
    pool: str = ""
    message: str = ""
    name: str = ""  # the server's (or node's) name from the key


def parse_key(prefix: str, key: str) -> Key:
    """The key's place in the layout; ValueInvalid for anything else under the prefix."""
    if not key.startswith(prefix):
        raise ValueInvalid("not under the prefix")
    parts = key[len(prefix) :].split("/")
    if len(parts) == 4 and parts[0] == "pools" and parts[2] == "servers":
        pool, name = parts[1], parts[3]
        kind = "server"
    elif len(parts) == 3 and parts[0] == "overrides":
        pool, name = parts[1], parts[2]
        kind = "override"
    elif len(parts) == 2 and parts[0] == "nodes":
        if not _NODE_RE.match(parts[1]):
            raise ValueInvalid(f"node name {parts[1]!r} is not a valid name")
        return Key("node", name=parts[1])
    else:
        raise ValueInvalid(
            "not a key of the layout (pools/POOL/servers/NAME, overrides/POOL/SERVER, nodes/NODE)"
        )
    if not _POOL_RE.match(pool):
        raise ValueInvalid(f"pool name {pool!r} is not a valid name")
    if not NAME_RE.match(name):
        raise ValueInvalid(f"server name {name!r} is not a valid name")
    return Key(kind, pool, name)


def _object(raw: bytes, allowed: Iterable[str]) -> dict[str, object]:
    if len(raw) > MAX_VALUE_BYTES:
        raise ValueInvalid(f"value of {len(raw)} bytes is above the {MAX_VALUE_BYTES} allowed")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueInvalid(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueInvalid(f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ValueInvalid(f"unknown field(s): {', '.join(unknown)}")
    return data


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _weight(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueInvalid(f"weight must be a whole number, got {value!r}")
    if not 0 <= value <= MAX_WEIGHT:
        raise ValueInvalid(f"weight {value} is out of range (0..{MAX_WEIGHT})")
    return value


def _address(value: object) -> str:
    """A fixed IP:PORT or [IPv6]:PORT: the fleet adds servers, DNS names stay in the file."""
    if not isinstance(value, str):
        raise ValueInvalid(f"address must be a string, got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueInvalid(f"address {value!r} is not IP:PORT with a port of 1..65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueInvalid(f"address {value!r} is not IP:PORT (IPv6 as [IP]:PORT)") from None
    if ip.version != version:
        raise ValueInvalid(f"address {value!r}: an IPv6 address goes in brackets")
    return value


def validate(key: Key, raw: bytes) -> Value:
    """The value of ``key`` if it is valid; ValueInvalid otherwise."""
    if key.kind == "server":
        data = _object(raw, ("address", "weight", "backup"))
        if "address" not in data:
            raise ValueInvalid("address is required")
        backup = data.get("backup", False)
        if not isinstance(backup, bool):
            raise ValueInvalid(f"backup must be true or false, got {backup!r}")
        return ExtraServer(_address(data["address"]), _weight(data.get("weight", 1)), backup)
    if key.kind == "override":
        data = _object(raw, ("admin", "weight"))
        admin = data.get("admin")
        if admin is not None and admin not in OVERRIDE_ADMIN:
            raise ValueInvalid(f"admin must be 'drain', 'disable' or 'enable', got {admin!r}")
        weight = data.get("weight")
        return Override(
            OVERRIDE_ADMIN[admin] if isinstance(admin, str) else None,
            None if weight is None else _weight(weight),
        )
    data = _object(raw, ("version", "admin", "started_at", "health"))
    version, admin, started = data.get("version", ""), data.get("admin", ""), data.get("started_at")
    if not isinstance(version, str) or not isinstance(admin, str):
        raise ValueInvalid("version and admin must be strings")
    if isinstance(started, bool) or not isinstance(started, int | float):
        raise ValueInvalid("started_at must be a number (Unix time)")
    if not math.isfinite(started):
        raise ValueInvalid("started_at must be finite")
    health = data.get("health", {})
    if not isinstance(health, dict) or not all(
        isinstance(servers, dict)
        and all(isinstance(s, str) and s in _KNOWN_STATES for s in servers.values())
        for servers in health.values()
    ):
        raise ValueInvalid("health must be {pool: {server: state}} with known state names")
    return NodeInfo(version, admin, float(started), health)


_KNOWN_STATES = frozenset([*VERDICT, "draining", "disabled", "removed"])


def encode(value: Value) -> bytes:
    """The JSON an operator would write for ``value`` (the inverse of ``validate``)."""
    if isinstance(value, ExtraServer):
        data: dict[str, object] = {"address": value.address, "weight": value.weight}
        if value.backup:
            data["backup"] = True
    elif isinstance(value, Override):
        data = {}
        if value.admin is not None:
            data["admin"] = ADMIN_ACTION[value.admin]
        if value.weight is not None:
            data["weight"] = value.weight
    else:
        data = {
            "version": value.version,
            "admin": value.admin,
            "started_at": value.started_at,
            "health": {p: dict(s) for p, s in value.health.items()},
        }
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


class FleetState:
    """A node's copy of the desired state: the last valid value of every key."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.values: dict[str, tuple[Key, Value]] = {}
        self.revision = 0  # of the last change applied (or of the listing)
        # Indexes by pool, kept with ``values``: a change to one key of 10,000 must not
        # make every lookup scan them all.
        self._extras: dict[str, dict[str, ExtraServer]] = {}
        self._overrides: dict[str, dict[str, Override]] = {}

    def apply(self, key: str, raw: bytes | None, revision: int) -> Update:
        """One put (``raw`` the value) or delete (``raw`` None) at ``revision``."""
        if revision > self.revision:
            self.revision = revision
        try:
            parsed = parse_key(self.prefix, key)
        except ValueInvalid as exc:
            return Update(key, "unchanged" if raw is None else "invalid", message=str(exc))
        if raw is None:
            gone = self.values.pop(key, None)
            self._index(parsed, None)
            result = "applied" if gone is not None else "unchanged"
            return Update(key, result, parsed.kind, parsed.pool, name=parsed.name)
        try:
            value = validate(parsed, raw)
        except ValueInvalid as exc:
            # The last valid value for the key stays (DESIGN.md section 12).
            return Update(key, "invalid", parsed.kind, parsed.pool, str(exc), parsed.name)
        old = self.values.get(key)
        if old is not None and old[1] == value:
            return Update(key, "unchanged", parsed.kind, parsed.pool, name=parsed.name)
        self.values[key] = (parsed, value)
        self._index(parsed, value)
        return Update(key, "applied", parsed.kind, parsed.pool, name=parsed.name)

    def _index(self, key: Key, value: Value | None) -> None:
        index: dict[str, dict[str, ExtraServer]] | dict[str, dict[str, Override]]
        if key.kind == "server":
            index = self._extras
        elif key.kind == "override":
            index = self._overrides
        else:
            return
        if value is None:
            index.get(key.pool, {}).pop(key.name, None)
        else:
            index.setdefault(key.pool, {})[key.name] = value  # type: ignore[assignment]

    def load(self, items: Iterable[tuple[str, bytes]], revision: int) -> list[Update]:
        """A full listing at ``revision``: keys missing from it are deleted; a key whose
        listed value is invalid keeps its last valid one."""
        listed: dict[str, bytes] = dict(items)
        updates = [
            self.apply(key, None, revision) for key in list(self.values) if key not in listed
        ]
        updates += [self.apply(key, raw, revision) for key, raw in listed.items()]
        self.revision = revision
        return updates

    # --- queries ---------------------------------------------------------------------

    def extra_servers(self, pool: str) -> dict[str, ExtraServer]:
        return self._extras.get(pool, {})

    def override(self, pool: str, server: str) -> Override:
        return self._overrides.get(pool, {}).get(server, _NO_OVERRIDE)

    def pool_overrides(self, pool: str) -> dict[str, Override]:
        return self._overrides.get(pool, {})

    def overrides(self) -> dict[tuple[str, str], Override]:
        return {
            (pool, name): value
            for pool, values in self._overrides.items()
            for name, value in values.items()
        }

    def nodes(self) -> dict[str, NodeInfo]:
        return {
            k.name: v
            for k, v in self.values.values()
            if k.kind == "node" and isinstance(v, NodeInfo)
        }


_NO_OVERRIDE = Override()


def stricter(a: str, b: str) -> str:
    """The stricter of two admin states (disabled > draining > enabled)."""
    return a if ADMIN_ORDER[a] >= ADMIN_ORDER[b] else b


def effective_weight(local: int | None, fleet: int | None, file: int) -> int:
    """A local runtime weight if one was set, else the fleet's, else the file's."""
    if local is not None:
        return local
    if fleet is not None:
        return fleet
    return file


@dataclasses.dataclass(frozen=True, slots=True)
class Disagreement:
    pool: str
    server: str
    views: Mapping[str, tuple[str, ...]]  # verdict -> the nodes that hold it (sorted)
    summary: str  # e.g. "down from node c only"


def disagreements(nodes: Mapping[str, NodeInfo]) -> list[Disagreement]:
    """Servers on which the live nodes' health verdicts differ. A node that does not have
    the server at all counts as "absent". The summary names the minority: each verdict held
    by fewer nodes than the most common one, as "VERDICT from node X[, Y] only"."""
    servers = sorted(
        {(p, s) for info in nodes.values() for p, ss in info.health.items() for s in ss}
    )
    out: list[Disagreement] = []
    for pool, server in servers:
        views: dict[str, list[str]] = {}
        for node in sorted(nodes):
            state = nodes[node].health.get(pool, {}).get(server)
            verdict = "absent" if state is None else VERDICT.get(state, state)
            views.setdefault(verdict, []).append(node)
        if len(views) < 2:
            continue
        top = max(len(v) for v in views.values())
        majority = [verdict for verdict, held in views.items() if len(held) == top]
        parts = [
            f"{verdict} from node {', '.join(held)} only"
            for verdict, held in sorted(views.items())
            if len(held) < top or len(majority) == len(views)
        ]
        out.append(
            Disagreement(
                pool, server, {v: tuple(n) for v, n in sorted(views.items())}, "; ".join(parts)
            )
        )
    return out
