"""``lbtcp doctor``: why would a pool answer "no healthy upstream"? (DESIGN.md section 11)

Theory of operation. A run walks every pool and server of a config as an operator would by
hand with dig, nc and a look at the weights, and reports in plain words:

- *config checks* (pure, no I/O: ``check_pool_config``): all weights 0, one server holding
  most of the weight, only backups, ``max_connections`` the servers cannot meet, retries that
  cannot fit in ``retry_budget``, ``health.timeout`` above ``health.interval``;
- *DNS* for servers named by DNS (``NAME:PORT`` and ``srv``): every nameserver of
  ``[resolver]`` is asked on its own (one ``resolution.AioDnsResolver`` per nameserver), so
  that the report can say which one answered and which one failed, with the answers' TTLs;
- *the network*: one TCP connect per address, bounded by the pool's ``connect_timeout``,
  classified as refused (nothing listens), timed out (a firewall or an overloaded server drops
  the SYN) or unreachable (no route);
- *the probe* as the pool configures it (``probes.probe_once``: send/expect, the PROXY
  header with ``send_proxy``), bounded by ``health.timeout``, beside the connect (both start
  at once: neither waits for the other);
- *load hints*: a connect or probe that took more than half of its timeout;
- with the admin API, *the live view*: the running instance's states and the reasons of their
  last changes, and where they disagree with what was just measured.

Each pool ends with a verdict: it serves when at least one server would take a client now
(its address resolves, it accepts a connection, it passes the probe, its weight is above 0,
and an operator has not drained or disabled it in the running instance); backups count when
no primary would. Otherwise it "would refuse: no healthy upstream, because ...".

Time: every check runs concurrently, and the whole run has one deadline, the largest timeout
involved (``[resolver] timeout``, each pool's ``connect_timeout`` and ``health.timeout``)
plus ``SLACK``. A step that starts late (a connect after a slow DNS answer) gets only the time
left; one still running at the deadline is reported as cut short. Doctor only ever connects to
the addresses in the config, its nameservers and the admin address.

Checking (the ``check_*`` functions, returning frozen ``Finding``\\ s) is apart from rendering
(``render_text``, ``to_json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import math
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lbtcp.addresses import Endpoint, parse_endpoint
from lbtcp.config import Config, HealthConfig, ListenerConfig, PoolConfig, ResolverConfig
from lbtcp.discovery import _server_from_target
from lbtcp.health import ProbeResult
from lbtcp.probes import probe_once
from lbtcp.proxy_protocol import encode
from lbtcp.relay import reset_transport
from lbtcp.resolution import (
    AioDnsResolver,
    Answer,
    RecordType,
    ResolvedTarget,
    ResolveError,
    address_targets,
    record_types_for,
    srv_to_targets,
)

__all__ = [
    "LEVELS",
    "SLACK",
    "Finding",
    "PoolReport",
    "Report",
    "ServerReport",
    "TargetReport",
    "check_connect",
    "check_pool_config",
    "check_probe",
    "compare_live",
    "load_hints",
    "probe_preface",
    "render_text",
    "run_doctor",
    "time_bound",
    "to_json",
]

# Finding levels, mildest first. "fail" is a check that failed; "warn" something that may
# cause refusals; "note" a fact worth knowing; "ok" a check that passed.
LEVELS = ("ok", "note", "warn", "fail")
# The run's deadline is the largest timeout plus this: room for the last results to come back
# and for the admin view, well inside DESIGN's "largest timeout plus a second".
SLACK = 0.3
# A connect or probe slower than this share of its timeout gets a load hint.
LOAD_SHARE = 0.5
# The dominant-weight finding: one primary above this share of a pool of MIN_POOL or more.
DOMINANT_SHARE = 0.8
DOMINANT_MIN_POOL = 3
# How long the admin API may take, at most (the run's deadline bounds it too).
ADMIN_TIMEOUT = 2.0

_UNREACHABLE = {errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL, errno.ENETDOWN}

_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------
# Findings and reports (frozen data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One thing doctor found. ``check`` says which check (``config``, ``resolver``, ``dns``,
    ``connect``, ``probe``, ``load``, ``live``, ``admin``); ``duration`` is what the check took
    (seconds), None for checks that take no time; ``data`` holds the facts for ``--json``."""

    check: str
    level: str
    message: str
    duration: float | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetReport:
    """One address a pool would connect to (the server name the running lbtcp uses)."""

    name: str
    address: str
    weight: int
    backup: bool
    checks: tuple[Finding, ...]
    cause: str = ""  # empty: it would take a client; else why not, in words

    @property
    def usable(self) -> bool:
        return not self.cause


@dataclass(frozen=True)
class ServerReport:
    """One ``[[pools.X.servers]]`` entry: its DNS findings and the addresses it became."""

    entry: str
    kind: str  # "ip" | "name" | "srv"
    dns: tuple[Finding, ...]
    targets: tuple[TargetReport, ...]
    cause: str = ""  # set when DNS gave no address at all


@dataclass(frozen=True)
class PoolReport:
    name: str
    balance: str
    config: tuple[Finding, ...]
    servers: tuple[ServerReport, ...]
    live: tuple[Finding, ...]
    serves: bool
    verdict: str  # the sentence: "serves: ..." or "would refuse: no healthy upstream, ..."
    because: tuple[str, ...]  # for a refusing pool: one cause per server


@dataclass(frozen=True)
class Report:
    source: str
    pools: tuple[PoolReport, ...]
    resolver: tuple[Finding, ...]
    admin: tuple[Finding, ...]
    bound: float  # seconds: the run's deadline
    duration: float  # seconds the checks took

    @property
    def exit_code(self) -> int:
        """0 when every pool serves, 1 otherwise (DESIGN.md section 1)."""
        return 0 if all(pool.serves for pool in self.pools) else 1


def _ms(seconds: float) -> str:
    if seconds < 0.001:
        return f"{seconds * 1000:.2f} ms"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


# --------------------------------------------------------------------------------------------
# Config checks (pure)
# --------------------------------------------------------------------------------------------


def _weights_zero(pool: PoolConfig) -> list[Finding]:
    fixed = [s for s in pool.servers if not s.srv]  # SRV weights come from DNS
    if not fixed or any(s.weight > 0 for s in fixed):
        primaries = [s for s in fixed if not s.backup]
        if primaries and all(s.weight == 0 for s in primaries) and len(primaries) < len(fixed):
            return [
                Finding(
                    "config",
                    "warn",
                    "every primary server has weight 0: only the backups take clients",
                    data={"finding": "primary_weights_zero"},
                )
            ]
        return []
    if any(s.srv for s in pool.servers):
        return [
            Finding(
                "config",
                "warn",
                "every server given by address has weight 0: only SRV servers take clients",
                data={"finding": "weights_zero"},
            )
        ]
    return [
        Finding(
            "config",
            "fail",
            "every server has weight 0: none takes new sessions, so every client is refused "
            "(weight 0 means 'drained')",
            data={"finding": "weights_zero"},
        )
    ]


def _dominant_weight(pool: PoolConfig) -> list[Finding]:
    primaries = [s for s in pool.servers if not s.backup and not s.srv]
    total = sum(s.weight for s in primaries)
    if len(primaries) < DOMINANT_MIN_POOL or total <= 0:
        return []
    heaviest = max(primaries, key=lambda s: s.weight)
    share = heaviest.weight / total
    if share <= DOMINANT_SHARE:
        return []
    return [
        Finding(
            "config",
            "warn",
            f"server {heaviest.display_name} holds {share:.0%} of the weight ({heaviest.weight} "
            f"of {total}): when it goes down, the other {len(primaries) - 1} servers get all of "
            "its traffic at once",
            data={"finding": "dominant_weight", "server": heaviest.display_name, "share": share},
        )
    ]


def _only_backups(pool: PoolConfig) -> list[Finding]:
    if not pool.servers or not all(s.backup for s in pool.servers):
        return []
    return [
        Finding(
            "config",
            "warn",
            "every server is a backup: there is no primary. The backups serve, but backups are "
            "meant to stand in while primaries are down; check 'backup = true'",
            data={"finding": "only_backups"},
        )
    ]


def _unmet_limits(pool: PoolConfig, listeners: Sequence[ListenerConfig]) -> list[Finding]:
    """The servers' ``max_connections`` summed is what the pool can hold at once (backups too:
    they take over when every primary is full). If a listener of the pool lets more clients in
    than that (or has no limit), the client beyond it is refused as "no healthy upstream" (NH)
    rather than at the listener (LM). Only pools whose servers are all fixed addresses: how many
    addresses a name brings is not known before DNS answers."""
    mine = [listener for listener in listeners if listener.pool == pool.name]
    servers = [s for s in pool.servers if s.weight > 0]
    if not mine or not servers or any(s.is_dynamic for s in pool.servers):
        return []
    if any(s.max_connections == 0 for s in servers):
        return []
    capacity = sum(s.max_connections for s in servers)
    limits = [listener.max_connections for listener in mine]
    admitted = math.inf if 0 in limits else sum(limits)
    if admitted <= capacity:
        return []
    names = ", ".join(listener.name for listener in mine)
    allows = "without a limit" if admitted == math.inf else f"up to {admitted:g} at once"
    return [
        Finding(
            "config",
            "warn",
            f"the servers take at most {capacity} sessions in total (their max_connections), "
            f"but listener {names} lets clients in {allows}: client {capacity + 1} is refused "
            "as 'no healthy upstream' (NH); set the listener's max_connections to at most "
            f"{capacity} to refuse it as a limit (LM) instead",
            data={"finding": "max_connections", "capacity": capacity},
        )
    ]


def _retry_budget(pool: PoolConfig) -> list[Finding]:
    """Attempt n (from 0) starts after n connect timeouts. lbtcp gives each attempt
    ``min(connect_timeout, what is left of retry_budget)``, so a last attempt that is only
    shortened is by design (the defaults, 2 s x 3 against 5 s, do that); the finding is for
    retries that can never start when servers time out."""
    if pool.retries == 0 or pool.connect_timeout <= 0:
        return []
    if pool.retries * pool.connect_timeout < pool.retry_budget:
        return []
    attempts = max(1, math.ceil(pool.retry_budget / pool.connect_timeout - 1e-9))
    return [
        Finding(
            "config",
            "warn",
            f"connect_timeout ({_secs(pool.connect_timeout)}) x {pool.retries + 1} attempts "
            f"(retries = {pool.retries}) does not fit in retry_budget "
            f"({_secs(pool.retry_budget)}): when servers time out, only {attempts} of the "
            f"{pool.retries + 1} attempts happen before the budget is spent",
            data={"finding": "retry_budget", "attempts": attempts},
        )
    ]


def _health_timing(health: HealthConfig | None) -> list[Finding]:
    if health is None or health.timeout <= health.interval:
        return []
    return [
        Finding(
            "config",
            "warn",
            f"health.timeout ({_secs(health.timeout)}) is above health.interval "
            f"({_secs(health.interval)}): the next probe is due before a silent server's probe "
            f"has timed out, so it is marked down only after {health.fall} x "
            f"{_secs(health.timeout)}, not {health.fall} x {_secs(health.interval)}",
            data={"finding": "health_timeout"},
        )
    ]


def check_pool_config(pool: PoolConfig, listeners: Sequence[ListenerConfig]) -> list[Finding]:
    """Every configuration finding of one pool (pure: the config alone, no I/O)."""
    return [
        *_weights_zero(pool),
        *_dominant_weight(pool),
        *_only_backups(pool),
        *_unmet_limits(pool, listeners),
        *_retry_budget(pool),
        *_health_timing(pool.health),
    ]


def time_bound(config: Config) -> float:
    """The largest timeout a run involves: the checks' deadline is this plus ``SLACK``."""
    bounds = [pool.connect_timeout for pool in config.pools.values()]
    bounds += [pool.health.timeout for pool in config.pools.values() if pool.health]
    if any(s.is_dynamic for pool in config.pools.values() for s in pool.servers):
        bounds.append(config.resolver.timeout)
    return max(bounds, default=1.0)


# --------------------------------------------------------------------------------------------
# Network checks
# --------------------------------------------------------------------------------------------


class _Held(asyncio.Protocol):
    """Keeps the transport of a doctor connect, so that it is closed however the wait ends."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Called by the loop once the connect succeeded."""
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Called by the loop with bytes the server sent first (a banner): not needed."""

    def release(self) -> None:
        # An RST, as the probes do: doctor leaves no TIME_WAIT on a server it only looked at.
        transport, self.transport = self.transport, None
        if transport is not None and not transport.is_closing():
            reset_transport(transport)


async def check_connect(
    loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float, budget: float
) -> Finding:
    """One TCP connect within ``min(timeout, budget)``; ``timeout`` is the pool's
    ``connect_timeout`` (for the load hint), ``budget`` what the run has left."""
    wait = max(0.0, min(timeout, budget))
    held = _Held()
    started = time.monotonic()
    try:
        await asyncio.wait_for(loop.create_connection(lambda: held, host, port), wait)
    except (asyncio.TimeoutError, TimeoutError):
        took = time.monotonic() - started
        if wait < timeout:
            return Finding(
                "connect",
                "fail",
                f"not connected after {_ms(took)}: doctor's time limit was reached "
                f"before connect_timeout ({_secs(timeout)})",
                took,
                {"result": "cut_short"},
            )
        return Finding(
            "connect",
            "fail",
            f"connect timed out after {_secs(timeout)}: a firewall or an overloaded server "
            "drops the SYN",
            took,
            {"result": "timeout"},
        )
    except OSError as exc:
        took = time.monotonic() - started
        if isinstance(exc, ConnectionRefusedError) or exc.errno == errno.ECONNREFUSED:
            result, why = "refused", "connection refused: nothing listens there"
        elif exc.errno in _UNREACHABLE:
            result, why = "unreachable", f"unreachable ({exc.strerror}): no route to it"
        elif exc.errno == errno.ETIMEDOUT:
            result = "timeout"
            why = "connect timed out: a firewall or an overloaded server drops the SYN"
        else:
            result, why = "error", f"connect failed: {exc.strerror or exc}"
        return Finding("connect", "fail", why, took, {"result": result})
    finally:
        held.release()
    took = time.monotonic() - started
    return Finding("connect", "ok", "connected", took, {"result": "ok"})


def _probe_words(result: ProbeResult, detail: str, health: HealthConfig) -> str:
    """The probe's detail, with what it most likely means."""
    expect = health.expect.decode("latin-1")
    if result is ProbeResult.OK:
        return f"probe passed ({detail})"
    if detail.startswith("reply timed out"):
        return (
            f"probe failed: connected, but no reply holding {expect!r} within "
            f"{_secs(health.timeout)}: the server answers something else, or too slowly "
            "(another service on this port?)"
        )
    if detail == "closed before the expected reply":
        return (
            f"probe failed: the server closed the connection without sending {expect!r} "
            "(another service on this port, or it rejected the probe)"
        )
    if detail.startswith("reply too long"):
        return f"probe failed: a long reply without {expect!r} (another service on this port?)"
    return f"probe failed: {detail}"


def probe_preface(pool: PoolConfig) -> bytes:
    """The PROXY header the pool's probes send first (``health.send_proxy``), as
    ``probes.Prober`` builds it: one that names no client (v2 LOCAL, v1 UNKNOWN)."""
    health = pool.health
    if health is None or not health.send_proxy or pool.proxy_protocol == "off":
        return b""
    return encode(pool.proxy_protocol, None, None)


async def check_probe(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    health: HealthConfig,
    budget: float,
    preface: bytes = b"",
) -> Finding:
    """The pool's probe as configured (``probes.probe_once``; ``preface`` is its PROXY header,
    see ``probe_preface``), within what the run has left."""
    bounded = health
    if budget < health.timeout:
        bounded = dataclasses.replace(health, timeout=max(0.001, budget))
    started = time.monotonic()
    result, detail = await probe_once(loop, host, port, bounded, preface)
    took = time.monotonic() - started
    level = "ok" if result is ProbeResult.OK else "fail"
    if result is ProbeResult.TIMEOUT and bounded is not health:
        message = f"probe cut short after {_ms(took)}: doctor's time limit was reached"
    else:
        message = _probe_words(result, detail, health)
    if preface:
        message += " (after a PROXY header, as health.send_proxy asks)"
    facts = {"result": result.value, "detail": detail, "proxy_header": bool(preface)}
    return Finding("probe", level, message, took, facts)


def load_hints(connect: Finding, probe: Finding | None, pool: PoolConfig) -> list[Finding]:
    """A connect or probe that passed but took more than ``LOAD_SHARE`` of its timeout."""
    hints: list[Finding] = []
    timed = [(connect, pool.connect_timeout, "connect_timeout")]
    if probe is not None and pool.health is not None:
        timed.append((probe, pool.health.timeout, "health.timeout"))
    for finding, timeout, key in timed:
        if finding.level != "ok" or finding.duration is None or timeout <= 0:
            continue
        share = finding.duration / timeout
        if share > LOAD_SHARE:
            hints.append(
                Finding(
                    "load",
                    "warn",
                    f"the {finding.check} took {_ms(finding.duration)}, {share:.0%} of {key} "
                    f"({_secs(timeout)}): the server or the network is overloaded; a little "
                    "more load and it times out",
                    data={"share": share, "of": key},
                )
            )
    return hints


# --------------------------------------------------------------------------------------------
# DNS
# --------------------------------------------------------------------------------------------

_DNS_WORDS = {
    "nxdomain": "the name does not exist (NXDOMAIN)",
    "nodata": "the name exists but has no record of this type",
    "servfail": "the nameserver could not get an answer (SERVFAIL): the name's own DNS "
    "servers are down or broken",
    "refused": "the nameserver refused to answer (REFUSED): it does not serve this name to us",
    "timeout": "no answer in time: that nameserver (or the one it asks for this name) is down "
    "or overloaded, or a firewall drops DNS",
    "unreachable": "nothing answers DNS there (nameserver down or wrong address)",
    "error": "the lookup failed",
}
# Answers that settle a lookup, as c-ares takes them: it does not ask the next nameserver.
_FINAL = ("nxdomain", "nodata")


@dataclass(frozen=True)
class _Asked:
    """One nameserver's result for one (name, type)."""

    nameserver: str
    answer: Answer | None
    kind: str  # "" with an answer, else a resolution.FAILURE_KINDS value
    message: str
    duration: float


@dataclass(frozen=True)
class _Lookup:
    """What lbtcp would get for one (name, type): the first nameserver, in order, that
    answered or said the name has nothing, plus every nameserver that failed before it."""

    name: str
    rtype: RecordType
    chosen: _Asked | None
    failed: tuple[_Asked, ...]
    duration: float


class _Dns:
    """One ``AioDnsResolver`` per nameserver; each (name, type) is looked up once per run."""

    def __init__(self, config: ResolverConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.config = config
        self.loop = loop
        self.types = record_types_for(config.family)
        self.resolvers: dict[str, AioDnsResolver] = {}
        self.lookups: dict[tuple[str, RecordType], asyncio.Task[_Lookup]] = {}
        self.asked: list[_Asked] = []

    async def open(self) -> None:
        servers = self.config.nameservers
        if not servers:  # /etc/resolv.conf, as lbtcp serve would use it
            system = AioDnsResolver(self.config, loop=self.loop)
            servers = system.nameservers
            await system.close()
        for server in servers:
            single = dataclasses.replace(self.config, nameservers=(server,))
            self.resolvers[server] = AioDnsResolver(single, loop=self.loop)

    async def close(self) -> None:
        for task in self.lookups.values():
            task.cancel()
        await asyncio.gather(*self.lookups.values(), return_exceptions=True)
        for resolver in self.resolvers.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(resolver.close(), 1.0)

    def lookup(self, name: str, rtype: RecordType) -> Awaitable[_Lookup]:
        key = (name.rstrip(".").lower(), rtype)
        if key not in self.lookups:
            self.lookups[key] = self.loop.create_task(self._lookup(*key))
        return asyncio.shield(self.lookups[key])

    async def _ask(self, server: str, name: str, rtype: RecordType) -> _Asked:
        started = time.monotonic()
        try:
            answer = await self.resolvers[server].query(name, rtype)
        except ResolveError as exc:
            asked = _Asked(server, None, exc.kind, exc.message, time.monotonic() - started)
        except (OSError, RuntimeError, ValueError) as exc:  # c-ares refusing the query itself
            asked = _Asked(server, None, "error", str(exc), time.monotonic() - started)
        else:
            asked = _Asked(server, answer, "", "", time.monotonic() - started)
        self.asked.append(asked)
        return asked

    async def _lookup(self, name: str, rtype: RecordType) -> _Lookup:
        started = time.monotonic()
        results = await asyncio.gather(*(self._ask(s, name, rtype) for s in self.resolvers))
        failed: list[_Asked] = []
        chosen = None
        for asked in results:
            if asked.answer is not None or asked.kind in _FINAL:
                chosen = asked
                break
            failed.append(asked)
        return _Lookup(name, rtype, chosen, tuple(failed), time.monotonic() - started)

    def summary(self) -> list[Finding]:
        """One line per nameserver: how many of doctor's queries it answered."""
        findings = []
        for server in self.resolvers:
            mine = [a for a in self.asked if a.nameserver == server]
            if not mine:
                continue
            bad = [a for a in mine if a.answer is None and a.kind not in _FINAL]
            data = {"nameserver": server, "queries": len(mine), "failed": len(bad)}
            if not bad:
                findings.append(
                    Finding(
                        "resolver",
                        "ok",
                        f"nameserver {server} answered every query ({len(mine)})",
                        data=data,
                    )
                )
                continue
            kinds = sorted({a.kind for a in bad})
            words = "; ".join(f"{k}: {_DNS_WORDS[k]}" for k in kinds)
            level = "fail" if len(bad) == len(mine) else "warn"
            findings.append(
                Finding(
                    "resolver",
                    level,
                    f"nameserver {server} failed {len(bad)} of {len(mine)} queries ({words})",
                    max(a.duration for a in bad),
                    data,
                )
            )
        return findings


def _dns_findings(lookups: Sequence[_Lookup]) -> tuple[list[Finding], str]:
    """Findings for the lookups of one name, and the cause when none gave an address."""
    findings: list[Finding] = []
    causes: list[str] = []
    for lookup in lookups:
        chosen = lookup.chosen
        facts: dict[str, Any] = {
            "name": lookup.name,
            "type": lookup.rtype.value,
            "failed": [
                {
                    "nameserver": a.nameserver,
                    "kind": a.kind,
                    "message": a.message,
                    "duration_ms": a.duration * 1000,
                }
                for a in lookup.failed
            ],
        }
        tried = "; ".join(
            f"{a.nameserver}: {a.kind} after {_ms(a.duration)}" for a in lookup.failed
        )
        if chosen is not None and chosen.answer is not None:
            answer = chosen.answer
            records = [*answer.records.addresses] + [
                f"{s.target}:{s.port} (priority {s.priority}, weight {s.weight})"
                for s in answer.records.services
            ]
            facts.update(
                nameserver=chosen.nameserver,
                records=records,
                ttl=answer.ttl,
                duration_ms=chosen.duration * 1000,
            )
            also = f" (before it, {tried})" if tried else ""
            findings.append(
                Finding(
                    "dns",
                    "warn" if tried else "ok",
                    f"{lookup.rtype.value} {lookup.name}: {', '.join(records)} (TTL "
                    f"{answer.ttl:g} s) from {chosen.nameserver}"
                    f"{also}",
                    lookup.duration,
                    facts,
                )
            )
            continue
        if chosen is not None:
            facts.update(nameserver=chosen.nameserver, kind=chosen.kind)
            level = "note" if chosen.kind == "nodata" else "fail"
            why = _DNS_WORDS[chosen.kind]
            findings.append(
                Finding(
                    "dns",
                    level,
                    f"{lookup.rtype.value} {lookup.name}: {why}, said {chosen.nameserver}",
                    lookup.duration,
                    facts,
                )
            )
            causes.append(f"DNS: {why} (from {chosen.nameserver})")
            continue
        kinds = sorted({a.kind for a in lookup.failed}) or ["error"]
        words = "; ".join(_DNS_WORDS[k] for k in kinds)
        facts["kind"] = kinds[0]
        message = (
            f"{lookup.rtype.value} {lookup.name}: no nameserver answered ({tried}): {words}"
            if lookup.failed
            else f"{lookup.rtype.value} {lookup.name}: no nameserver to ask"
        )
        findings.append(Finding("dns", "fail", message, lookup.duration, facts))
        short = "; ".join(f"{a.nameserver}: {a.kind}" for a in lookup.failed)
        causes.append(f"DNS: no nameserver answered ({short or 'none configured'})")
    # A name with an address of one type needs no cause for a missing other type.
    return findings, "; ".join(dict.fromkeys(causes))


# --------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------


class _Run:
    """The concurrent part of a run: DNS, then connect and probe per address."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.config = config
        self.loop = loop
        self.deadline = deadline
        self.dns = _Dns(config.resolver, loop)
        # Each address takes up to two sockets (connect and probe) at once: stay well inside
        # the open-files limit however big the config is.
        self.slots = asyncio.Semaphore(_parallel_limit())

    def left(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def target(self, pool: PoolConfig, target: ResolvedTarget, name: str) -> TargetReport:
        async with self.slots:
            return await self._target(pool, target, name)

    async def _target(self, pool: PoolConfig, target: ResolvedTarget, name: str) -> TargetReport:
        connect_task = check_connect(
            self.loop, target.host, target.port, pool.connect_timeout, self.left()
        )
        if pool.health is not None:
            connect, probe = await asyncio.gather(
                connect_task,
                check_probe(
                    self.loop,
                    target.host,
                    target.port,
                    pool.health,
                    self.left(),
                    probe_preface(pool),
                ),
            )
        else:
            connect, probe = await connect_task, None
        checks = [
            connect,
            *([probe] if probe is not None else []),
            *load_hints(connect, probe, pool),
        ]
        cause = ""
        if connect.level != "ok":
            cause = connect.message
        elif probe is not None and probe.level != "ok":
            cause = probe.message
        elif target.weight == 0:
            cause = "weight 0: it takes no new sessions"
        address = str(Endpoint(target.host, target.port))
        return TargetReport(name, address, target.weight, target.backup, tuple(checks), cause)

    async def server(self, pool: PoolConfig, index: int) -> ServerReport:
        entry = pool.servers[index]
        if not entry.is_dynamic:
            endpoint = parse_endpoint(entry.address)
            target = ResolvedTarget(
                endpoint.host, endpoint.port, entry.weight, entry.backup, entry.display_name
            )
            report = await self.target(pool, target, entry.display_name)
            return ServerReport(entry.display_name, "ip", (), (report,))
        if entry.srv:
            srv = await self.dns.lookup(entry.srv, RecordType.SRV)
            findings, cause = _dns_findings([srv])
            services = (
                srv.chosen.answer.records.services if srv.chosen and srv.chosen.answer else ()
            )
            hosts = sorted({s.target for s in services if s.target not in ("", ".")})
            lookups = await asyncio.gather(
                *(self.dns.lookup(h, t) for h in hosts for t in self.dns.types)
            )
            addresses: dict[str, list[str]] = {}
            for lookup in lookups:
                if lookup.chosen is not None and lookup.chosen.answer is not None:
                    addresses.setdefault(lookup.name, []).extend(
                        lookup.chosen.answer.records.addresses
                    )
            more, more_cause = _dns_findings(lookups)
            findings += more
            targets = srv_to_targets(services, addresses, backup=entry.backup)
            cause = cause or (
                ""
                if targets
                else more_cause or "DNS: the SRV records name no target with an address"
            )
            kind = "srv"
        else:
            endpoint = parse_endpoint(entry.address)
            lookups = await asyncio.gather(
                *(self.dns.lookup(endpoint.host, t) for t in self.dns.types)
            )
            findings, cause = _dns_findings(lookups)
            found = [
                ip
                for lookup in lookups
                if lookup.chosen is not None and lookup.chosen.answer is not None
                for ip in lookup.chosen.answer.records.addresses
            ]
            targets = address_targets(
                endpoint.host, endpoint.port, entry.weight, entry.backup, found
            )
            kind = "name"
        reports = await asyncio.gather(
            *(self.target(pool, t, _server_from_target(entry, t).name) for t in targets)
        )
        return ServerReport(
            entry.display_name, kind, tuple(findings), tuple(reports), "" if reports else cause
        )


def _parallel_limit() -> int:
    """How many addresses to check at once, from the open-files limit."""
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on Linux
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 64) // 2))


def _server_unchecked(entry: str, kind: str, why: str) -> ServerReport:
    return ServerReport(entry, kind, (Finding("check", "fail", why),), (), why)


def _with_live(server: ServerReport, unusable: Mapping[str, str]) -> ServerReport:
    """The server with the running instance's reasons not to use an address that answered
    doctor (drained, disabled, full, weight 0 at runtime) as that address's cause."""
    targets = tuple(
        dataclasses.replace(target, cause=f"{unusable[target.name]} (it answers doctor)")
        if target.usable and target.name in unusable
        else target
        for target in server.targets
    )
    return dataclasses.replace(server, targets=targets)


def _verdict(
    pool: PoolConfig, servers: Sequence[ServerReport], unusable_live: Mapping[str, str]
) -> tuple[bool, str, tuple[str, ...]]:
    """Whether the pool would take a client now, the sentence, and the causes."""
    targets = [t for s in servers for t in s.targets]

    def usable(target: TargetReport) -> bool:
        return target.usable and target.name not in unusable_live

    primaries = [t for t in targets if not t.backup and usable(t)]
    backups = [t for t in targets if t.backup and usable(t)]
    total = len(targets) + sum(1 for s in servers if not s.targets)
    if primaries:
        names = ", ".join(t.name for t in primaries)
        return (
            True,
            f"serves: {len(primaries)} of {total} servers would take a client ({names})",
            (),
        )
    if backups:
        names = ", ".join(t.name for t in backups)
        return (
            True,
            f"serves from backups only: no primary would take a client; {names} would",
            (),
        )
    because: list[str] = []
    for server in servers:
        if not server.targets:
            because.append(f"{server.entry}: {server.cause}")
        for target in server.targets:
            because.append(f"{target.name}: {target.cause}")
    if not servers:
        because.append("the pool has no servers")
    sentence = "would refuse: no healthy upstream, because " + "; ".join(because)
    tried = [t.name for t in targets if t.weight > 0 and t.name not in unusable_live]
    if pool.health is None and tried:
        sentence += (
            f" (without a [health] table lbtcp does not know this: it still sends clients to "
            f"{', '.join(tried)}, and closes them when the connect fails: CR or CT in the "
            "access log)"
        )
    return False, sentence, tuple(because)


# --------------------------------------------------------------------------------------------
# The live view (admin API)
# --------------------------------------------------------------------------------------------


def _items(value: object) -> list[Mapping[str, Any]]:
    """The objects of a JSON list from the admin API; anything else there is ignored (the
    document comes over the network: doctor must not trip over a wrong one)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _text(value: object) -> str:
    """A value of the admin API's document as printable text (no terminal escapes)."""
    from lbtcp.admin.client import printable

    return printable(str(value))[:200]


def _live_server_words(entry: Mapping[str, Any]) -> str:
    change = entry.get("last_change")
    if isinstance(change, Mapping) and change.get("reason"):
        old, new, reason = (_text(change.get(k)) for k in ("from", "to", "reason"))
        return f" (last change {old} -> {new}: {reason})"
    return ""


def compare_live(
    report_servers: Sequence[ServerReport], pool_doc: Mapping[str, Any] | None, pool: str
) -> tuple[list[Finding], dict[str, str]]:
    """Where the running instance disagrees with what doctor measured, and the servers an
    operator took out of rotation there (name -> why), which the verdict leaves out."""
    if pool_doc is None:
        return [
            Finding(
                "live",
                "warn",
                f"the running lbtcp has no pool {pool!r}: it runs another config, or this one "
                "was not reloaded",
            )
        ], {}
    findings: list[Finding] = []
    unusable: dict[str, str] = {}
    live = {_text(s.get("name")): s for s in _items(pool_doc.get("servers"))}
    measured = {t.name: t for s in report_servers for t in s.targets}
    for name, target in measured.items():
        entry = live.get(name)
        if entry is None:
            findings.append(
                Finding("live", "note", f"{name}: not in the running lbtcp (reload pending?)")
            )
            continue
        state = _text(entry.get("state"))
        admin = _text(entry.get("admin", "enabled"))
        why = _live_server_words(entry)
        data = {"server": name, "state": state, "admin": admin}
        if admin != "enabled":
            unusable[name] = f"{admin} by an operator in the running lbtcp"
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"{name}: {admin} by an operator: no new sessions{why}",
                    data=data,
                )
            )
            continue
        limit, active = entry.get("max_connections"), entry.get("active")
        if isinstance(limit, int) and isinstance(active, int) and 0 < limit <= active:
            unusable[name] = f"full in the running lbtcp ({active} of max_connections {limit})"
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"{name}: full: {active} sessions, max_connections "
                    f"{limit}: no new sessions until one ends",
                    data=data,
                )
            )
        if entry.get("weight") == 0 and target.weight != 0:
            unusable[name] = "weight set to 0 at runtime in the running lbtcp"
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"{name}: weight 0 at runtime (the config says "
                    f"{target.weight}): no new sessions",
                    data=data,
                )
            )
        if target.usable and state in ("unhealthy", "ejected"):
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"{name}: the running lbtcp has it {state}{why}, but it answered doctor "
                    "just now: it comes back after its next successful probes (or when the "
                    "ejection ends)",
                    data=data,
                )
            )
        elif target.usable and state == "failing":
            findings.append(
                Finding(
                    "live",
                    "note",
                    f"{name}: failing in the running lbtcp (recent probe failures{why}), but it "
                    "answered doctor just now; it still takes clients there",
                    data=data,
                )
            )
        elif target.usable and state in ("unknown", "rising"):
            findings.append(
                Finding(
                    "live",
                    "note",
                    f"{name}: still {state} in the running lbtcp: it takes "
                    f"clients once its probes have passed 'rise' times{why}",
                    data=data,
                )
            )
        elif not target.usable and state in ("healthy", "failing"):
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"{name}: the running lbtcp still has it {state}{why}, but doctor just "
                    f"found: {target.cause}. Clients sent to it now fail until its probes "
                    "(or passive ejection) take it out",
                    data=data,
                )
            )
        elif not target.usable:
            findings.append(
                Finding(
                    "live", "ok", f"{name}: {state} in the running lbtcp: it agrees{why}", data=data
                )
            )
        else:
            findings.append(
                Finding("live", "ok", f"{name}: {state} in the running lbtcp too", data=data)
            )
    for name in live:
        if name not in measured:
            findings.append(
                Finding(
                    "live",
                    "note",
                    f"{name}: in the running lbtcp but not in this config "
                    "(or its DNS answer changed)",
                )
            )
    return findings, unusable


def _fetch_status(endpoint: Endpoint, token: str, timeout: float) -> dict[str, Any]:
    from lbtcp.admin.client import AdminClient

    with AdminClient(endpoint, token, timeout) as client:
        return client.status()


async def _in_thread(call: Callable[[], _T], timeout: float) -> _T:
    """Run a blocking call in a daemon thread and wait at most ``timeout``. Not the loop's
    executor: ``asyncio.run`` joins its threads on the way out, and a hung admin API must not
    hold doctor past its deadline."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(value: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value = call()
        except BaseException as exc:  # handed to the waiting coroutine
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    threading.Thread(target=work, name="lbtcp-doctor-admin", daemon=True).start()
    try:
        return await asyncio.wait_for(future, timeout)
    finally:
        if not future.done():
            future.cancel()


async def _live_view(
    admin: tuple[Endpoint, str] | None, timeout: float
) -> tuple[dict[str, Any] | None, list[Finding]]:
    if admin is None:
        return None, []
    from lbtcp.admin.client import AdminError

    endpoint, token = admin
    started = time.monotonic()
    try:
        document = await _in_thread(lambda: _fetch_status(endpoint, token, timeout), timeout)
    except (asyncio.TimeoutError, TimeoutError):
        took = time.monotonic() - started
        return None, [
            Finding(
                "admin",
                "warn",
                f"the admin API at {endpoint} did not answer within {_secs(timeout)}: no live view",
                took,
            )
        ]
    except AdminError as exc:
        return None, [Finding("admin", "warn", f"{exc}: no live view", time.monotonic() - started)]
    took = time.monotonic() - started
    pid = _text(document.get("pid"))
    return document, [
        Finding(
            "admin",
            "ok",
            f"live view from the admin API at {endpoint} (pid {pid}) in {_ms(took)}",
            took,
            {"address": str(endpoint), "pid": pid},
        )
    ]


def _live_listeners(document: Mapping[str, Any], pool: str) -> list[Finding]:
    findings = []
    for listener in _items(document.get("listeners")):
        if listener.get("pool") != pool:
            continue
        refused = listener.get("refused")
        count = refused.get("no_healthy", 0) if isinstance(refused, Mapping) else 0
        if isinstance(count, int) and count > 0:
            findings.append(
                Finding(
                    "live",
                    "warn",
                    f"listener {_text(listener.get('name'))} has refused {count} clients as "
                    "'no healthy upstream' since it started",
                    data={"listener": _text(listener.get("name")), "no_healthy": count},
                )
            )
    return findings


async def run_doctor(
    config: Config, admin: tuple[Endpoint, str] | None = None, admin_problem: str = ""
) -> Report:
    """Check every pool of ``config``; with ``admin`` (address, token) add the live view.
    ``admin_problem`` is why the admin API cannot be asked (one line in the report)."""
    loop = asyncio.get_running_loop()
    bound = time_bound(config)
    started = time.monotonic()
    deadline = started + bound + SLACK
    # The steps end a little before the run's deadline, so that a step cut short still
    # reports what it saw rather than being cancelled with nothing said.
    run = _Run(config, loop, deadline - SLACK / 2)
    if any(s.is_dynamic for p in config.pools.values() for s in p.servers):
        await run.dns.open()
    listeners = list(config.listeners.values())
    jobs: dict[tuple[str, int], asyncio.Task[ServerReport]] = {
        (name, index): loop.create_task(run.server(pool, index))
        for name, pool in config.pools.items()
        for index in range(len(pool.servers))
    }
    live_task = loop.create_task(_live_view(admin, min(ADMIN_TIMEOUT, bound + SLACK)))
    pending = [*jobs.values(), live_task]
    try:
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await run.dns.close()
    duration = time.monotonic() - started
    document, admin_findings = (
        live_task.result() if live_task.done() and not live_task.cancelled() else (None, [])
    )
    if admin_problem:
        admin_findings = [Finding("admin", "warn", f"{admin_problem}: no live view")]
    live_pools: dict[str, Mapping[str, Any]] = {}
    if document is not None:
        live_pools = {_text(p.get("name")): p for p in _items(document.get("pools"))}
    pools: list[PoolReport] = []
    for name, pool in config.pools.items():
        servers: list[ServerReport] = []
        for index, entry in enumerate(pool.servers):
            task = jobs[(name, index)]
            kind = "srv" if entry.srv else ("name" if entry.is_dynamic else "ip")
            if not task.done() or task.cancelled():
                why = "not checked in time: doctor's time limit was reached"
                servers.append(_server_unchecked(entry.display_name, kind, why))
            elif (error := task.exception()) is not None:
                # A bug in doctor must still leave a report, and say so.
                why = f"doctor could not check it: {type(error).__name__}: {error}"
                servers.append(_server_unchecked(entry.display_name, kind, why))
            else:
                servers.append(task.result())
        live: list[Finding] = []
        unusable: dict[str, str] = {}
        if document is not None:
            live, unusable = compare_live(servers, live_pools.get(name), name)
            live += _live_listeners(document, name)
            servers = [_with_live(server, unusable) for server in servers]
        serves, sentence, because = _verdict(pool, servers, unusable)
        if document is not None and name in live_pools:
            live_verdict = _text(live_pools[name].get("verdict"))
            if serves and live_verdict == "empty":
                live.append(
                    Finding(
                        "live",
                        "warn",
                        "the running lbtcp refuses this pool's clients right "
                        "now (verdict 'empty'), though doctor found servers that answer: "
                        "see the states above",
                        data={"verdict": live_verdict},
                    )
                )
            elif not serves and live_verdict in ("ok", "degraded", "panic", "backup"):
                live.append(
                    Finding(
                        "live",
                        "warn",
                        f"the running lbtcp still serves this pool (verdict "
                        f"{live_verdict!r}), but doctor found no server that would take a "
                        "client: refusals are about to start",
                        data={"verdict": live_verdict},
                    )
                )
        pools.append(
            PoolReport(
                name,
                pool.balance,
                tuple(check_pool_config(pool, listeners)),
                tuple(servers),
                tuple(live),
                serves,
                sentence,
                because,
            )
        )
    return Report(
        config.source,
        tuple(pools),
        tuple(run.dns.summary()),
        tuple(admin_findings),
        bound + SLACK,
        duration,
    )


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_MARK = {"ok": "ok  ", "note": "note", "warn": "WARN", "fail": "FAIL"}


def _line(finding: Finding, indent: str) -> str:
    took = f" [{_ms(finding.duration)}]" if finding.duration is not None else ""
    mark = _MARK.get(finding.level, finding.level)
    return f"{indent}{mark}  {finding.check}: {finding.message}{took}"


def render_text(report: Report) -> str:
    """The report as an operator reads it on a terminal."""
    out = [
        f"lbtcp doctor {report.source}: {len(report.pools)} pool(s) checked in "
        f"{_ms(report.duration)} (time limit {_secs(report.bound)})"
    ]
    out += [_line(f, "") for f in (*report.admin, *report.resolver)]
    for pool in report.pools:
        out.append("")
        count = sum(len(s.targets) or 1 for s in pool.servers)
        out.append(f"pool {pool.name} ({pool.balance}, {count} server(s))")
        for server in pool.servers:
            if not server.targets:
                out.append(f"  FAIL  server {server.entry} ({server.kind}): {server.cause}")
            elif server.kind != "ip":
                out.append(f"  {server.kind} {server.entry}:")
            out += [_line(f, "        ") for f in server.dns]
            for target in server.targets:
                role = ", backup" if target.backup else ""
                state = "ok  " if target.usable else "FAIL"
                head = (
                    f"  {state}  server {target.name} ({target.address}, "
                    f"weight {target.weight}{role})"
                )
                out.append(head + (f": {target.cause}" if target.cause else ": would take clients"))
                out += [_line(f, "        ") for f in target.checks]
        out += [_line(f, "  ") for f in pool.config]
        out += [_line(f, "  ") for f in pool.live]
        out.append(f"  verdict: {pool.verdict}")
    out.append("")
    out.append(
        "every pool serves"
        if report.exit_code == 0
        else "some pool would refuse clients: see the verdicts above"
    )
    return "\n".join(out) + "\n"


def _finding_json(finding: Finding) -> dict[str, Any]:
    return {
        "check": finding.check,
        "level": finding.level,
        "message": finding.message,
        "duration_ms": None if finding.duration is None else finding.duration * 1000,
        **{k: v for k, v in finding.data.items() if k not in ("check", "level", "message")},
    }


def to_json(report: Report) -> dict[str, Any]:
    """The same report as data (``--json``); see the README's "lbtcp doctor" section."""
    return {
        "config": report.source,
        "exit": report.exit_code,
        "duration_ms": report.duration * 1000,
        "time_limit_s": report.bound,
        "admin": [_finding_json(f) for f in report.admin],
        "resolver": [_finding_json(f) for f in report.resolver],
        "pools": [
            {
                "name": pool.name,
                "balance": pool.balance,
                "serves": pool.serves,
                "verdict": "serves" if pool.serves else "would refuse",
                "summary": pool.verdict,
                "because": list(pool.because),
                "config": [_finding_json(f) for f in pool.config],
                "live": [_finding_json(f) for f in pool.live],
                "servers": [
                    {
                        "entry": server.entry,
                        "kind": server.kind,
                        "cause": server.cause,
                        "dns": [_finding_json(f) for f in server.dns],
                        "targets": [
                            {
                                "name": target.name,
                                "address": target.address,
                                "weight": target.weight,
                                "backup": target.backup,
                                "usable": target.usable,
                                "cause": target.cause,
                                "checks": [_finding_json(f) for f in target.checks],
                            }
                            for target in server.targets
                        ],
                    }
                    for server in pool.servers
                ],
            }
            for pool in report.pools
        ],
    }
