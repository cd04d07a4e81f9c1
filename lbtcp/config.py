"""The config file: TOML in, frozen dataclasses out.

Theory of operation: ``load_config(path)`` reads the file and ``parse_config(data)`` walks the
table with a small ``_Reader`` per table. Every problem is recorded with its key path
(``pools.app.servers[1].address``) instead of raised, so that one run reports every error at
once, as ``haproxy -c`` and ``nginx -t`` do. Unknown keys are errors: a typo must never pass
silently. All durations become float seconds; all byte strings become ``bytes``.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import math
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lbtcp.addresses import AddressError, Endpoint, Network, parse_cidr, parse_endpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on old Pythons
    import tomli as tomllib

T = TypeVar("T")

NO_HEALTHY_MODES = ("close", "reset", "banner")
PROXY_IN_MODES = ("off", "v1", "v2", "any")
PROXY_OUT_MODES = ("off", "v1", "v2")
LOG_FORMATS = ("text", "json")
ON_SERVER_DOWN = ("keep", "close")
HASH_KEYS = ("source_ip", "source_ip_port")
FAMILIES = ("ipv4", "ipv6", "any")
INITIAL_STATES = ("unknown", "healthy")
MAX_WEIGHT = 256


class ConfigError(Exception):
    """One or more problems in a config; ``errors`` lists them as ``path: message``."""

    def __init__(self, errors: list[str], source: str = "") -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + ("; ".join(errors) if errors else "invalid config"))


@dataclass(frozen=True)
class GlobalConfig:
    workers: int = 1
    log_format: str = "text"
    access_log: bool = True
    drain_timeout: float = 30.0
    user: str = ""
    group: str = ""
    shutdown_grace: float = 0.0


@dataclass(frozen=True)
class AdminConfig:
    """``[admin]``. ``token`` is the effective token: the ``token`` key's value or the first
    line of ``token_file`` (read at load time); empty means no token."""

    listen: Endpoint
    token: str = ""
    token_file: str = ""
    auth_reads: bool = False


@dataclass(frozen=True)
class FleetConfig:
    """``[fleet]`` (DESIGN.md section 12). ``password`` is the first line of
    ``password_file`` (read at load time), empty without one."""

    etcd: tuple[str, ...] = ("http://127.0.0.1:2379",)
    prefix: str = "/lbtcp/"
    node: str = ""  # resolved to the host name at load time when empty
    timeout: float = 2.0
    lease_ttl: float = 10.0
    username: str = ""
    password_file: str = ""
    password: str = field(default="", repr=False)
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class ResolverConfig:
    nameservers: tuple[str, ...] = ()
    timeout: float = 2.0
    min_ttl: float = 1.0
    max_ttl: float = 300.0
    stale_for: float = 300.0
    family: str = "any"


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: tuple[str, ...]
    pool: str
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    max_connections: int = 0
    max_per_source: int = 0
    proxy_protocol: str = "off"
    proxy_protocol_from: tuple[Network, ...] = ()
    proxy_protocol_timeout: float = 3.0
    max_rate_per_source: int = 0
    no_healthy: str = "close"
    no_healthy_banner: bytes = b""
    idle_timeout: float = 3600.0
    backlog: int = 4096
    # SNI routing (DESIGN.md §10): names normalized (lower case, no trailing dot), in order.
    routes: tuple[RouteConfig, ...] = ()
    inspect_timeout: float = 3.0


@dataclass(frozen=True)
class RouteConfig:
    """One entry of ``listeners.NAME.routes``: a host name or ``*.suffix``, and a pool."""

    sni: str
    pool: str


@dataclass(frozen=True)
class ServerConfig:
    """One ``[[pools.X.servers]]`` entry. Exactly one of ``address`` and ``srv`` is set."""

    address: str = ""
    name: str = ""
    weight: int = 1
    backup: bool = False
    max_connections: int = 0
    srv: str = ""

    @property
    def display_name(self) -> str:
        return self.name or self.address or self.srv

    @property
    def is_dynamic(self) -> bool:
        """Found through DNS (a host name or SRV) rather than a fixed IP address."""
        if self.srv:
            return True
        try:
            return not parse_endpoint(self.address).is_ip
        except AddressError:
            return False


@dataclass(frozen=True)
class HealthConfig:
    interval: float = 2.0
    fast_interval: float = 0.5
    down_interval: float = 5.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1
    send: bytes = b""
    expect: bytes = b""
    initial: str = "unknown"
    send_proxy: bool = False


@dataclass(frozen=True)
class EjectionConfig:
    consecutive_failures: int = 5
    base_time: float = 30.0
    max_time: float = 300.0
    max_percent: int = 50
    slow_start: float = 0.0


@dataclass(frozen=True)
class PoolConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    balance: str = "round_robin"
    retries: int = 2
    connect_timeout: float = 2.0
    retry_budget: float = 5.0
    panic_threshold: int = 0
    proxy_protocol: str = "off"
    on_server_down: str = "keep"
    hash_key: str = "source_ip"
    health: HealthConfig | None = None
    ejection: EjectionConfig = field(default_factory=EjectionConfig)


@dataclass(frozen=True)
class Config:
    global_: GlobalConfig
    admin: AdminConfig | None
    resolver: ResolverConfig
    listeners: Mapping[str, ListenerConfig]
    pools: Mapping[str, PoolConfig]
    source: str = ""
    fleet: FleetConfig | None = None


# --- parsing -----------------------------------------------------------------------------

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_FD_NAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,255}$")


def parse_duration(value: object) -> float:
    """``"250ms"``, ``"2s"``, ``"5m"``, ``"1h"`` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '2s' or '250ms', got a boolean")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a duration such as '2s', '250ms', '5m' or '1h'")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        raise ValueError(f"expected a duration such as '2s', got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} must be a finite, non-negative duration")
    return seconds


class _Reader:
    """Reads one TOML table, recording errors under its key path instead of raising."""

    def __init__(self, table: object, path: str, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        self.seen: set[str] = set()
        if isinstance(table, dict):
            self.table: dict[str, Any] = table
        else:
            self.table = {}
            self.error(f"expected a table, got {type(table).__name__}")

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> None:
        where = self.key_path(key) if key is not None else (self.path or "(top level)")
        self.errors.append(f"{where}: {message}")

    def get(self, key: str, default: T, convert: Callable[[object], T]) -> T:
        self.seen.add(key)
        if key not in self.table:
            return default
        try:
            return convert(self.table[key])
        except (ValueError, TypeError, AddressError) as exc:
            self.error(str(exc), key)
            return default

    def has(self, key: str) -> bool:
        return key in self.table

    def sub(self, key: str) -> _Reader | None:
        self.seen.add(key)
        if key not in self.table:
            return None
        return _Reader(self.table[key], self.key_path(key), self.errors)

    def finish(self) -> None:
        for key in self.table:
            if key not in self.seen:
                self.error("unknown key", key)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int_in(low: int, high: int | None = None) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{value} is out of range ({span})")
        return value

    return convert


def _fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{value} is out of range (0 <= jitter < 1)")
    return float(value)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _bytes(value: object) -> bytes:
    text = _str(value)
    try:
        # TOML strings are Unicode; bytes on the wire are their Latin-1 code points so that
        # "\u00ff" can stand for the byte 0xff. Anything above U+00FF is a mistake.
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("holds characters above U+00FF; use \\u00XX escapes for bytes") from None


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in options:
            raise ValueError(f"{value!r} is not one of {', '.join(repr(o) for o in options)}")
        return str(value)

    return convert


MAX_WORKERS = 256


def _workers(value: object) -> int:
    """A count 1..256, or "auto": one per CPU this process may run on (its affinity mask,
    so that taskset and cgroup cpusets are honoured), capped at MAX_WORKERS."""
    if value == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    if isinstance(value, str):
        raise ValueError(f"{value!r} is neither a number of workers (1..256) nor 'auto'")
    return _int_in(1, MAX_WORKERS)(value)


def _cidr_list(reader: _Reader, key: str) -> tuple[Network, ...]:
    reader.seen.add(key)
    if key not in reader.table:
        return ()
    value = reader.table[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        reader.error(f"expected a list of CIDRs, got {value!r}", key)
        return ()
    networks: list[Network] = []
    for index, item in enumerate(items):
        try:
            networks.append(parse_cidr(item))
        except AddressError as exc:
            reader.errors.append(f"{reader.key_path(key)}[{index}]: {exc}")
    return tuple(networks)


def _bind_list(reader: _Reader) -> tuple[str, ...]:
    reader.seen.add("bind")
    if "bind" not in reader.table:
        reader.error("is required (an address such as '0.0.0.0:8080')", "bind")
        return ()
    value = reader.table["bind"]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        reader.error("expected an address or a non-empty list of addresses", "bind")
        return ()
    binds: list[str] = []
    for index, item in enumerate(items):
        where = f"{reader.key_path('bind')}[{index}]"
        if isinstance(item, str) and item.startswith("fd:"):
            # systemd's FileDescriptorName= rules: up to 255 printable characters, no ':'.
            fd_name = item[3:]
            if not _FD_NAME_RE.match(fd_name):
                reader.errors.append(
                    f"{where}: {item!r}: expected 'fd:NAME', NAME as in the socket unit's "
                    "FileDescriptorName= (letters, digits, '_', '-', '.', '@', at most 255)"
                )
                continue
            binds.append(item)
            continue
        try:
            endpoint = parse_endpoint(item, allow_names=False)
        except AddressError as exc:
            reader.errors.append(f"{where}: {exc}")
            continue
        binds.append(str(endpoint))
    if len(set(binds)) != len(binds):
        reader.error("lists the same address twice", "bind")
    return tuple(binds)


def _routes(reader: _Reader) -> tuple[RouteConfig, ...]:
    """``routes = [{sni = "...", pool = "..."}, ...]``: each name valid and used once (case
    and a trailing dot ignored); pools are checked against [pools] in parse_config."""
    from lbtcp.tls_hello import normalize_route  # late: config stays importable on its own

    reader.seen.add("routes")
    if "routes" not in reader.table:
        return ()
    value = reader.table["routes"]
    path = reader.key_path("routes")
    if not isinstance(value, list):
        reader.error("expected a list of {sni = '...', pool = '...'} tables", "routes")
        return ()
    routes: list[RouteConfig] = []
    first: dict[str, int] = {}
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        if not isinstance(item, dict):
            reader.errors.append(f"{where}: expected a table {{sni = '...', pool = '...'}}")
            continue
        unknown = sorted(set(item) - {"sni", "pool"})
        if unknown:
            reader.errors.append(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")
        sni, pool = item.get("sni"), item.get("pool")
        if not isinstance(sni, str) or not sni:
            reader.errors.append(f"{where}.sni: is required (a host name or '*.suffix')")
            continue
        if not isinstance(pool, str) or not pool:
            reader.errors.append(f"{where}.pool: is required (the name of a [pools.NAME] table)")
            continue
        try:
            name = normalize_route(sni)
        except ValueError as exc:
            reader.errors.append(f"{where}.sni: {exc}")
            continue
        if name in first:
            reader.errors.append(
                f"{where}.sni: {sni!r} is the same name as {path}[{first[name]}] "
                "(names are compared without case and trailing dot)"
            )
            continue
        first[name] = index
        routes.append(RouteConfig(sni=name, pool=pool))
    return tuple(routes)


def _valid_name(kind: str, name: str, errors: list[str], path: str) -> None:
    if not _NAME_RE.match(name):
        errors.append(f"{path}: {kind} name {name!r} may hold only letters, digits, '_', '-', '.'")


def _parse_global(reader: _Reader | None) -> GlobalConfig:
    if reader is None:
        return GlobalConfig()
    result = GlobalConfig(
        workers=reader.get("workers", 1, _workers),
        log_format=reader.get("log_format", "text", _choice(LOG_FORMATS)),
        access_log=reader.get("access_log", True, _bool),
        drain_timeout=reader.get("drain_timeout", 30.0, parse_duration),
        user=reader.get("user", "", _str),
        group=reader.get("group", "", _str),
        shutdown_grace=reader.get("shutdown_grace", 0.0, parse_duration),
    )
    # Unknown accounts are config errors (as haproxy -c and nginx -t report them), so that
    # "lbtcp check" catches them before a start or a reload.
    if result.user:
        try:
            pwd.getpwnam(result.user)
        except KeyError:
            reader.error(f"no user named {result.user!r} on this system", "user")
    if result.group:
        if not result.user:
            reader.error("needs 'user' too (the group is changed when dropping to it)", "group")
        try:
            grp.getgrnam(result.group)
        except KeyError:
            reader.error(f"no group named {result.group!r} on this system", "group")
    reader.finish()
    return result


_TOKEN_RE = re.compile(r"^[\x21-\x7e]+$")


def _admin_listen(value: object) -> Endpoint:
    return parse_endpoint(_str(value), allow_names=False)


def _read_token_file(reader: _Reader, path: str, source: str) -> str:
    """The first line of ``path`` (relative to the config file's folder), as a systemd
    credential or a Kubernetes secret holds it."""
    full = Path(source).parent / path if source else Path(path)
    try:
        with full.open("rb") as handle:
            first = handle.readline(64 * 1024)
    except (OSError, ValueError) as exc:  # ValueError: a path holding a NUL byte
        reader.error(f"cannot read {path!r}: {getattr(exc, 'strerror', None) or exc}", "token_file")
        return ""
    try:
        token = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        reader.error(f"{path!r} is not UTF-8 text", "token_file")
        return ""
    if not token:
        reader.error(f"{path!r} holds no token on its first line", "token_file")
    return token


def _parse_admin(reader: _Reader | None, source: str) -> AdminConfig | None:
    if reader is None:
        return None
    listen = reader.get("listen", Endpoint("127.0.0.1", 9900), _admin_listen)
    token = reader.get("token", "", _str)
    token_file = reader.get("token_file", "", _str)
    auth_reads = reader.get("auth_reads", False, _bool)
    reader.finish()
    if token and token_file:
        reader.error("'token' and 'token_file' are both set; give one")
    elif token_file:
        token = _read_token_file(reader, token_file, source)
    if token and not _TOKEN_RE.match(token):
        # It travels in an HTTP header: spaces or control characters could never match.
        key = "token_file" if token_file else "token"
        reader.error("the token may hold only visible ASCII characters, no spaces", key)
    if auth_reads and not token:
        reader.error("auth_reads = true needs a token (token or token_file)", "auth_reads")
    if not token and not ipaddress.ip_address(listen.host).is_loopback:
        # Redis' "protected mode": an open control API on a routable address lets anyone who
        # reaches it drain, disable or reweight every server.
        reader.error(
            f"{listen} is not a loopback address and no token is set: anyone who can reach "
            "it could drain, disable or reweight servers and read the topology; set "
            "admin.token or admin.token_file, or listen on 127.0.0.1 or [::1]",
            "listen",
        )
    return AdminConfig(listen=listen, token=token, token_file=token_file, auth_reads=auth_reads)


def _etcd_endpoints(value: object) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected an endpoint URL or a non-empty list of them")
    out: list[str] = []
    for item in items:
        text = _str(item).rstrip("/")
        match = _ETCD_URL_RE.match(text)
        if not match:
            raise ValueError(f"{text!r} is not an etcd endpoint such as 'http://127.0.0.1:2379'")
        port = int(match.group(2))
        if not 0 < port < 65536:
            raise ValueError(f"{text!r}: port {port} is out of range (1..65535)")
        out.append(text)
    return tuple(out)


_ETCD_URL_RE = re.compile(r"^https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _fleet_prefix(value: object) -> str:
    text = _str(value)
    if not text.startswith("/") or not text.endswith("/") or len(text) < 2:
        raise ValueError(f"{text!r} must start and end with '/', such as '/lbtcp/'")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise ValueError(f"{text!r} may hold only visible ASCII characters")
    return text


def _parse_fleet(reader: _Reader | None, source: str) -> FleetConfig | None:
    if reader is None:
        return None
    import socket  # late: only a config with [fleet] needs the host name

    base = Path(source).parent if source else Path()
    result = FleetConfig(
        etcd=reader.get("etcd", FleetConfig.etcd, _etcd_endpoints),
        prefix=reader.get("prefix", "/lbtcp/", _fleet_prefix),
        node=reader.get("node", "", _str),
        timeout=reader.get("timeout", 2.0, parse_duration),
        lease_ttl=reader.get("lease_ttl", 10.0, parse_duration),
        username=reader.get("username", "", _str),
        password_file=reader.get("password_file", "", _str),
        ca_file=reader.get("ca_file", "", _str),
        cert_file=reader.get("cert_file", "", _str),
        key_file=reader.get("key_file", "", _str),
    )
    reader.finish()
    node = result.node or socket.gethostname()
    if not _NAME_RE.match(node):
        reader.error(f"node name {node!r} may hold only letters, digits, '_', '-', '.'", "node")
    if result.timeout <= 0 or result.timeout > 60:
        reader.error("must be more than 0 and at most 60s", "timeout")
    # etcd grants leases in whole seconds, at least 2 (a shorter TTL would expire between
    # two keep-alives on a loaded machine).
    if not 2 <= result.lease_ttl <= 3600 or result.lease_ttl != int(result.lease_ttl):
        reader.error("must be a whole number of seconds from 2s to 1h", "lease_ttl")
    password = ""
    if result.password_file and not result.username:
        reader.error("needs 'username' too", "password_file")
    if result.username:
        if not result.password_file:
            reader.error("needs 'password_file' too", "username")
        else:
            full = base / result.password_file
            try:
                password = full.read_bytes().split(b"\n", 1)[0].decode("utf-8").strip()
            except (OSError, ValueError) as exc:
                why = getattr(exc, "strerror", None) or exc
                reader.error(f"cannot read {result.password_file!r}: {why}", "password_file")
    if bool(result.cert_file) != bool(result.key_file):
        reader.error("'cert_file' and 'key_file' go together; give both or neither")
    paths = {"ca_file": result.ca_file, "cert_file": result.cert_file, "key_file": result.key_file}
    for key, path in paths.items():
        if path and not (base / path).is_file():
            reader.error(f"no readable file {path!r}", key)
        elif path:
            paths[key] = str(base / path)
    if (result.ca_file or result.cert_file) and not all(
        url.startswith("https://") for url in result.etcd
    ):
        reader.error("TLS files are set but some endpoint is not https://", "etcd")
    return dataclasses.replace(
        result,
        node=node,
        password=password,
        ca_file=paths["ca_file"],
        cert_file=paths["cert_file"],
        key_file=paths["key_file"],
    )


def _parse_resolver(reader: _Reader | None) -> ResolverConfig:
    if reader is None:
        return ResolverConfig()

    def nameservers(value: object) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list of 'IP' or 'IP:PORT' strings")
        out: list[str] = []
        for item in value:
            text = _str(item)
            try:
                ipaddress.ip_address(text)
            except ValueError:
                endpoint = parse_endpoint(text, allow_names=False)
                if endpoint.port == 0:
                    raise ValueError(f"{text!r}: port 0 is not a nameserver port") from None
            out.append(text)
        return tuple(out)

    result = ResolverConfig(
        nameservers=reader.get("nameservers", (), nameservers),
        timeout=reader.get("timeout", 2.0, parse_duration),
        min_ttl=reader.get("min_ttl", 1.0, parse_duration),
        max_ttl=reader.get("max_ttl", 300.0, parse_duration),
        stale_for=reader.get("stale_for", 300.0, parse_duration),
        family=reader.get("family", "any", _choice(FAMILIES)),
    )
    if result.timeout <= 0:
        reader.error("must be more than 0", "timeout")
    if result.min_ttl > result.max_ttl:
        reader.error(f"min_ttl ({result.min_ttl}s) is above max_ttl ({result.max_ttl}s)")
    reader.finish()
    return result


def _parse_listener(name: str, reader: _Reader) -> ListenerConfig:
    _valid_name("listener", name, reader.errors, reader.path)
    bind = _bind_list(reader)
    reader.seen.add("pool")
    pool = reader.get("pool", "", _str)
    if not reader.has("pool"):
        reader.error("is required (the name of a [pools.NAME] table)", "pool")
    result = ListenerConfig(
        name=name,
        bind=bind,
        pool=pool,
        allow=_cidr_list(reader, "allow"),
        deny=_cidr_list(reader, "deny"),
        max_connections=reader.get("max_connections", 0, _int_in(0)),
        max_per_source=reader.get("max_per_source", 0, _int_in(0)),
        proxy_protocol=reader.get("proxy_protocol", "off", _choice(PROXY_IN_MODES)),
        proxy_protocol_from=_cidr_list(reader, "proxy_protocol_from"),
        proxy_protocol_timeout=reader.get("proxy_protocol_timeout", 3.0, parse_duration),
        max_rate_per_source=reader.get("max_rate_per_source", 0, _int_in(0, 1_000_000)),
        no_healthy=reader.get("no_healthy", "close", _choice(NO_HEALTHY_MODES)),
        no_healthy_banner=reader.get("no_healthy_banner", b"", _bytes),
        idle_timeout=reader.get("idle_timeout", 3600.0, parse_duration),
        backlog=reader.get("backlog", 4096, _int_in(1, 1 << 20)),
        routes=_routes(reader),
        inspect_timeout=reader.get("inspect_timeout", 3.0, parse_duration),
    )
    if result.proxy_protocol != "off" and not result.proxy_protocol_from:
        # Accepting headers from anyone would let any client spoof its address.
        reader.error(
            "is required when proxy_protocol is not 'off': the CIDRs of the proxies "
            "allowed to send a PROXY header",
            "proxy_protocol_from",
        )
    if result.proxy_protocol_timeout <= 0:
        reader.error("must be more than 0", "proxy_protocol_timeout")
    if result.inspect_timeout <= 0:
        reader.error("must be more than 0", "inspect_timeout")
    if result.no_healthy == "banner" and not result.no_healthy_banner:
        reader.error("is empty but no_healthy = 'banner'", "no_healthy_banner")
    reader.finish()
    return result


def _check_srv_name(reader: _Reader, srv: str) -> None:
    labels = srv.rstrip(".").split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
        reader.error(f"{srv!r} is not an SRV name such as '_app._tcp.example.internal'", "srv")
        return
    try:
        parse_endpoint(f"{srv.replace('_', 'x')}:1")
    except AddressError:
        reader.error(f"{srv!r} is not a valid DNS name", "srv")


def _parse_server(reader: _Reader) -> ServerConfig:
    address = reader.get("address", "", _str)
    srv = reader.get("srv", "", _str)
    result = ServerConfig(
        address=address,
        name=reader.get("name", "", _str),
        weight=reader.get("weight", 1, _int_in(0, MAX_WEIGHT)),
        backup=reader.get("backup", False, _bool),
        max_connections=reader.get("max_connections", 0, _int_in(0)),
        srv=srv,
    )
    if address and srv:
        reader.error("has both 'address' and 'srv'; give one")
    elif srv:
        _check_srv_name(reader, srv)
        if reader.has("weight"):
            reader.error("is taken from the SRV records; remove it", "weight")
    elif not reader.has("address"):
        reader.error("is required (IP:PORT, [IPv6]:PORT or NAME:PORT)", "address")
    elif address:
        try:
            endpoint = parse_endpoint(address)
        except AddressError as exc:
            reader.error(str(exc), "address")
        else:
            if endpoint.port == 0:
                reader.error(f"{address!r}: port 0 cannot be connected to", "address")
    reader.finish()
    return result


def _parse_health(reader: _Reader | None) -> HealthConfig | None:
    if reader is None:
        return None
    result = HealthConfig(
        interval=reader.get("interval", 2.0, parse_duration),
        fast_interval=reader.get("fast_interval", 0.5, parse_duration),
        down_interval=reader.get("down_interval", 5.0, parse_duration),
        timeout=reader.get("timeout", 1.0, parse_duration),
        rise=reader.get("rise", 2, _int_in(1, 1000)),
        fall=reader.get("fall", 3, _int_in(1, 1000)),
        jitter=reader.get("jitter", 0.1, _fraction),
        send=reader.get("send", b"", _bytes),
        expect=reader.get("expect", b"", _bytes),
        initial=reader.get("initial", "unknown", _choice(INITIAL_STATES)),
        send_proxy=reader.get("send_proxy", False, _bool),
    )
    for key in ("interval", "fast_interval", "down_interval", "timeout"):
        if getattr(result, key) <= 0:
            reader.error("must be more than 0", key)
    reader.finish()
    return result


def _parse_ejection(reader: _Reader | None) -> EjectionConfig:
    if reader is None:
        return EjectionConfig()
    result = EjectionConfig(
        consecutive_failures=reader.get("consecutive_failures", 5, _int_in(0, 1_000_000)),
        base_time=reader.get("base_time", 30.0, parse_duration),
        max_time=reader.get("max_time", 300.0, parse_duration),
        max_percent=reader.get("max_percent", 50, _int_in(0, 100)),
        slow_start=reader.get("slow_start", 0.0, parse_duration),
    )
    if result.max_time < result.base_time:
        reader.error(f"max_time ({result.max_time}s) is below base_time ({result.base_time}s)")
    reader.finish()
    return result


def _parse_pool(name: str, reader: _Reader, balancer_names: tuple[str, ...]) -> PoolConfig:
    _valid_name("pool", name, reader.errors, reader.path)

    def balance(value: object) -> str:
        text = _str(value)
        if text in balancer_names or (":" in text and all(text.split(":", 1))):
            return text
        raise ValueError(
            f"{text!r} is not a balancer: use one of {', '.join(balancer_names)} "
            "or 'module.path:ClassName'"
        )

    reader.seen.add("servers")
    servers: list[ServerConfig] = []
    raw_servers = reader.table.get("servers")
    if raw_servers is None:
        reader.error("is required: a pool needs at least one [[pools.NAME.servers]]", "servers")
    elif not isinstance(raw_servers, list) or not raw_servers:
        reader.error("expected a non-empty array of tables [[pools.NAME.servers]]", "servers")
    else:
        for index, raw in enumerate(raw_servers):
            servers.append(
                _parse_server(_Reader(raw, f"{reader.path}.servers[{index}]", reader.errors))
            )
        seen_names: dict[str, int] = {}
        for index, server in enumerate(servers):
            label = server.display_name
            if label and label in seen_names:
                reader.errors.append(
                    f"{reader.path}.servers[{index}]: the name {label!r} is already used by "
                    f"servers[{seen_names[label]}]; give each server a unique name"
                )
            seen_names.setdefault(label, index)

    result = PoolConfig(
        name=name,
        servers=tuple(servers),
        balance=reader.get("balance", "round_robin", balance),
        retries=reader.get("retries", 2, _int_in(0, 100)),
        connect_timeout=reader.get("connect_timeout", 2.0, parse_duration),
        retry_budget=reader.get("retry_budget", 5.0, parse_duration),
        panic_threshold=reader.get("panic_threshold", 0, _int_in(0, 100)),
        proxy_protocol=reader.get("proxy_protocol", "off", _choice(PROXY_OUT_MODES)),
        on_server_down=reader.get("on_server_down", "keep", _choice(ON_SERVER_DOWN)),
        hash_key=reader.get("hash_key", "source_ip", _choice(HASH_KEYS)),
        health=_parse_health(reader.sub("health")),
        ejection=_parse_ejection(reader.sub("ejection")),
    )
    if result.connect_timeout <= 0:
        reader.error("must be more than 0", "connect_timeout")
    if result.retry_budget <= 0:
        reader.error("must be more than 0", "retry_budget")
    if result.health is not None and result.health.send_proxy and result.proxy_protocol == "off":
        reader.errors.append(
            f"{reader.path}.health.send_proxy: needs the pool's proxy_protocol ('v1' or 'v2') "
            "to know which header to send"
        )
    reader.finish()
    return result


def _named_tables(reader: _Reader, key: str) -> Iterator[tuple[str, _Reader]]:
    sub = reader.sub(key)
    if sub is None:
        return
    for name, table in sub.table.items():
        sub.seen.add(name)
        yield name, _Reader(table, f"{key}.{name}", reader.errors)


def parse_config(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document. Raises ConfigError listing every problem found."""
    from lbtcp.balancing import BUILTIN_BALANCERS  # late: keeps config importable on its own

    errors: list[str] = []
    top = _Reader(dict(data), "", errors)
    global_ = _parse_global(top.sub("global"))
    admin = _parse_admin(top.sub("admin"), source)
    resolver = _parse_resolver(top.sub("resolver"))
    pools = {
        name: _parse_pool(name, reader, BUILTIN_BALANCERS)
        for name, reader in _named_tables(top, "pools")
    }
    listeners = {
        name: _parse_listener(name, reader) for name, reader in _named_tables(top, "listeners")
    }
    fleet = _parse_fleet(top.sub("fleet"), source)
    top.finish()

    if fleet is not None and global_.workers != 1:
        # Fleet changes are applied in the control plane; that they reach every worker has
        # not been tested yet, so the combination is refused rather than trusted.
        errors.append("fleet: [fleet] with workers > 1 is not supported yet; use workers = 1")
    if not listeners and "listeners" not in top.table:
        errors.append("listeners: at least one [listeners.NAME] table is required")
    seen_binds: dict[str, str] = {}
    for name, listener in listeners.items():
        if listener.pool and listener.pool not in pools:
            known = ", ".join(sorted(pools)) or "none defined"
            errors.append(
                f"listeners.{name}.pool: no pool named {listener.pool!r} (pools: {known})"
            )
        for index, route in enumerate(listener.routes):
            if route.pool not in pools:
                known = ", ".join(sorted(pools)) or "none defined"
                errors.append(
                    f"listeners.{name}.routes[{index}].pool: no pool named {route.pool!r} "
                    f"(pools: {known})"
                )
        for bind in listener.bind:
            if bind in seen_binds and not bind.endswith(":0"):
                errors.append(
                    f"listeners.{name}.bind: {bind} is also bound by listener {seen_binds[bind]!r}"
                )
            seen_binds.setdefault(bind, name)
    if errors:
        raise ConfigError(errors, source)
    return Config(
        global_=global_,
        admin=admin,
        resolver=resolver,
        listeners=listeners,
        pools=pools,
        source=source,
        fleet=fleet,
    )


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError (also for unreadable files)."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"the file is not UTF-8: {exc}"], source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax error: {exc}"], source) from None
    return parse_config(data, source)
