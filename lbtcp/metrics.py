"""Prometheus metrics: read the data plane's plain-int counters at scrape time.

Theory of operation. The hot path never touches this module: listeners, pools and servers
keep plain integers and fixed-bound histograms (``lbtcp.counters``). On a scrape,
``families(runtime)`` walks the runtime once and returns every family of DESIGN.md §7 (prefix
``lbtcp_``) as plain data: a name, a type, a HELP text, label names, and one tuple of label
values per sample. Two things read that list:

* ``RuntimeCollector``, a prometheus_client custom collector, on a registry of our own (never
  the global one, so that two runtimes in one process cannot collide) beside the library's
  ``ProcessCollector`` for ``process_*``: ``registry_for(runtime)`` gives it to anything that
  speaks prometheus_client, and the tests hold ``render`` against it.
* ``render``, which the admin server calls per scrape. It writes the text itself: measured
  here, prometheus_client's exposition needs about 11 µs per sample (label-name validation
  and escaping per sample), 190 ms for the 17,000 samples of a 1,000-server pool, where this
  writer renders each label set once and needs a few milliseconds. ``process_*`` still come
  from the library's exposition of a ProcessCollector (a dozen samples). The Accept header
  picks OpenMetrics 1.0.0 or the classic text format 0.0.4, as prometheus_client's
  ``choose_encoder`` does; the tests parse both with the library's parsers and compare them
  sample by sample with the library's own exposition of ``RuntimeCollector``.

Meanings (README "Metrics"): ``listener_connections_total`` counts every accepted client,
refused ones included; ``server_connections_total`` counts sessions established to the server;
``server_bytes_sent_total`` is what lbtcp wrote to the server (client -> server) and
``server_bytes_received_total`` what it read from it, live sessions included; ``server_up`` is
1 while the health layer has the server in service (``healthy`` or ``failing``, so not
``ejected``) whatever its admin state; ``server_state{state}`` is 1 for the state shown in the
README's table and 0 for the seven others.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import exposition
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from lbtcp import __version__
from lbtcp.counters import Histogram, live_bytes
from lbtcp.health import UP_STATES, State
from lbtcp.listener import REFUSAL_REASONS
from lbtcp.resolution import QUERY_RESULTS

if TYPE_CHECKING:
    from lbtcp.runtime import Runtime

__all__ = [
    "CONTENT_TYPE_OPENMETRICS",
    "CONTENT_TYPE_TEXT",
    "SERVER_STATES",
    "Family",
    "RuntimeCollector",
    "families",
    "registry_for",
    "render",
    "to_prometheus",
    "wants_openmetrics",
    "write_families",
]

# Every state a server can show (README state table); a removed server is no longer shown.
SERVER_STATES: tuple[str, ...] = tuple(s.value for s in State if s is not State.REMOVED)
CONNECT_FAILURE_KINDS = ("refused", "timeout", "other")
CHECK_RESULTS = ("ok", "fail", "timeout")

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

Labels = tuple[str, ...]


@dataclass(slots=True)
class Family:
    """One metric family as plain data. ``name`` is the family's name (for a counter without
    ``_total``, as OpenMetrics names it); ``kind`` is "counter", "gauge" or "histogram"."""

    name: str
    kind: str
    help: str
    labels: Labels = ()
    samples: list[tuple[Labels, float]] = field(default_factory=list)
    histograms: list[tuple[Labels, Histogram]] = field(default_factory=list)


# --- building the families ------------------------------------------------------------------


def families(runtime: Runtime) -> list[Family]:
    """Every lbtcp family of ``runtime``, read now. Called per scrape, off the hot path."""
    out = _listener_families(runtime)
    out += _server_families(runtime)
    out += _pool_families(runtime)
    out += _dns_families(runtime)
    out += _config_families(runtime)
    if runtime.fleet is not None:
        out += _fleet_families(runtime)
    # workers > 1: the parent's own families (lbtcp.workers.supervisor.ControlRuntime).
    worker_families = getattr(runtime, "worker_families", None)
    if worker_families is not None:
        out += worker_families()
    build = Family("lbtcp_build_info", "gauge", "lbtcp's version (always 1)", ("version",))
    build.samples.append(((__version__,), 1))
    out.append(build)
    return out


def _listener_families(runtime: Runtime) -> list[Family]:
    by_listener = ("listener",)
    total = Family(
        "lbtcp_listener_connections",
        "counter",
        "Clients accepted by the listener, refused ones included",
        by_listener,
    )
    active = Family(
        "lbtcp_listener_active_connections",
        "gauge",
        "Sessions of the listener now (accepted, not refused, not ended)",
        by_listener,
    )
    limit = Family(
        "lbtcp_listener_max_connections",
        "gauge",
        "The listener's max_connections (0 = unlimited), for alerts on nearing it",
        by_listener,
    )
    refused = Family(
        "lbtcp_listener_refused",
        "counter",
        "Clients accepted then closed at once, by reason (no_healthy, acl, limit, proxy_protocol)",
        ("listener", "reason"),
    )
    sessions = Family(
        "lbtcp_session_seconds",
        "histogram",
        "Duration of the sessions that reached a server, from accept to end",
        by_listener,
    )
    for listener in runtime.listeners.values():
        key = (listener.name,)
        total.samples.append((key, listener.connections_total))
        active.samples.append((key, listener.active))
        limit.samples.append((key, listener.config.max_connections))
        counts = listener.refused
        for reason in REFUSAL_REASONS:
            refused.samples.append(((listener.name, reason), counts.get(reason, 0)))
        sessions.histograms.append((key, listener.session_seconds))
    return [total, active, limit, refused, sessions]


def _server_families(runtime: Runtime) -> list[Family]:
    by_server = ("pool", "server")
    up = Family(
        "lbtcp_server_up",
        "gauge",
        "1 while the server's health lets it take sessions (healthy or failing, not "
        "ejected), whatever its admin state; else 0",
        by_server,
    )
    state = Family(
        "lbtcp_server_state",
        "gauge",
        "1 for the server's current state (README state table), 0 for the others",
        ("pool", "server", "state"),
    )
    active = Family(
        "lbtcp_server_active_connections", "gauge", "Live sessions on the server", by_server
    )
    total = Family(
        "lbtcp_server_connections", "counter", "Sessions established to the server", by_server
    )
    failures = Family(
        "lbtcp_server_connect_failures",
        "counter",
        "Failed connect attempts of real clients to the server, by kind (refused, timeout, other)",
        ("pool", "server", "kind"),
    )
    sent = Family(
        "lbtcp_server_bytes_sent",
        "counter",
        "Bytes lbtcp wrote to the server (client to server), live sessions included",
        by_server,
    )
    received = Family(
        "lbtcp_server_bytes_received",
        "counter",
        "Bytes lbtcp read from the server (server to client), live sessions included",
        by_server,
    )
    ejections = Family(
        "lbtcp_server_ejections",
        "counter",
        "Passive ejections of the server (consecutive connect failures)",
        by_server,
    )
    checks = Family(
        "lbtcp_health_checks",
        "counter",
        "Active health probes of the server, by result (ok, fail, timeout)",
        ("pool", "server", "result"),
    )
    connect = Family(
        "lbtcp_connect_seconds",
        "histogram",
        "Time from a client's accept to its server connection being up, retries included",
        ("pool",),
    )
    live = live_bytes(
        session for listener in runtime.listeners.values() for session in listener.sessions
    )
    for pool_name, pool in runtime.pools.items():
        probed = pool.config.health is not None
        health = pool.health
        for server in pool.servers.values():
            name = server.name
            if name not in health:
                continue
            record = health.server(name)
            key = (pool_name, name)
            up.samples.append((key, 1 if record.health in UP_STATES else 0))
            shown = record.state.value
            state.samples += [
                ((pool_name, name, value), 1 if value == shown else 0) for value in SERVER_STATES
            ]
            active.samples.append((key, server.active))
            total.samples.append((key, server.total))
            failures.samples += [
                ((pool_name, name, "refused"), server.connect_refused),
                ((pool_name, name, "timeout"), server.connect_timeouts),
                ((pool_name, name, "other"), server.connect_other),
            ]
            live_sent, live_received = live.get(server, (0, 0))
            sent.samples.append((key, server.bytes_sent + live_sent))
            received.samples.append((key, server.bytes_received + live_received))
            ejections.samples.append((key, server.ejections))
            if probed:
                counts = server.health_checks
                checks.samples += [
                    ((pool_name, name, result), counts.get(result, 0)) for result in CHECK_RESULTS
                ]
        connect.histograms.append(((pool_name,), pool.connect_seconds))
    return [up, state, active, total, failures, sent, received, ejections, checks, connect]


def _pool_families(runtime: Runtime) -> list[Family]:
    by_pool = ("pool",)
    servers = Family(
        "lbtcp_pool_servers", "gauge", "Servers in the pool, backups included", by_pool
    )
    healthy = Family(
        "lbtcp_pool_healthy_servers",
        "gauge",
        "Servers of the pool whose health is healthy or failing (the sum of server_up)",
        by_pool,
    )
    in_service = Family(
        "lbtcp_pool_in_service_servers",
        "gauge",
        "Servers that would take a new session now; 0 means clients are refused",
        by_pool,
    )
    for name, pool in runtime.pools.items():
        health = pool.health
        key = (name,)
        servers.samples.append((key, len(pool.servers)))
        up = sum(
            1
            for s in pool.servers.values()
            if s.name in health and health.server(s.name).health in UP_STATES
        )
        healthy.samples.append((key, up))
        in_service.samples.append((key, len(pool.candidates())))
    return [servers, healthy, in_service]


def _dns_families(runtime: Runtime) -> list[Family]:
    queries = Family(
        "lbtcp_dns_queries",
        "counter",
        "DNS lookups of server names, by name and result (ok, nxdomain, nodata, servfail, "
        "refused, timeout, unreachable, error)",
        ("name", "result"),
    )
    discovery = runtime.discovery
    if discovery is not None:
        for name, counts in sorted(discovery.name_query_counts.items()):
            queries.samples += [((name, r), counts.get(r, 0)) for r in QUERY_RESULTS]
    return [queries]


def _fleet_families(runtime: Runtime) -> list[Family]:
    fleet = runtime.fleet
    assert fleet is not None
    connected = Family("lbtcp_fleet_connected", "gauge", "1 while etcd answers, else 0")
    connected.samples.append(((), 1 if fleet.connected else 0))
    revision = Family(
        "lbtcp_fleet_revision", "gauge", "The etcd revision of the last fleet change applied"
    )
    revision.samples.append(((), fleet.revision))
    updates = Family(
        "lbtcp_fleet_updates",
        "counter",
        "Keys of the fleet's desired state taken from etcd, by result (applied, invalid)",
        ("result",),
    )
    updates.samples += [((result,), count) for result, count in sorted(fleet.updates.items())]
    return [connected, revision, updates]


def _config_families(runtime: Runtime) -> list[Family]:
    stats = runtime.reloads
    reloads = Family(
        "lbtcp_config_reloads",
        "counter",
        "Configuration reloads (SIGHUP, POST /reload) by result; the start is not one",
        ("result",),
        [(("success",), stats.successes), (("failure",), stats.failures)],
    )
    last_ok = Family(
        "lbtcp_config_last_reload_successful",
        "gauge",
        "1 if the last configuration load (the start, or the last reload) succeeded",
        samples=[((), 1 if stats.last_successful else 0)],
    )
    last_at = Family(
        "lbtcp_config_last_reload_success_timestamp_seconds",
        "gauge",
        "Unix time of the last successful configuration load (the start counts)",
        samples=[((), stats.last_success_at)],
    )
    return [reloads, last_ok, last_at]


# --- prometheus_client: the collector and the registry ---------------------------------------


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


class RuntimeCollector(Collector):
    """A prometheus_client collector yielding ``families(runtime)`` as the library's types."""

    def __init__(self, runtime: Runtime) -> None:
        # A weak reference: the registry is cached per runtime and must not keep it alive.
        self._runtime = weakref.ref(runtime)

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: the registry then never collects at registration time.
        return []

    def collect(self) -> Iterator[Metric]:
        runtime = self._runtime()
        if runtime is not None:
            yield from to_prometheus(families(runtime))


def to_prometheus(plain: Iterable[Family]) -> Iterator[Metric]:
    """The families as prometheus_client's metric types, for its registry and exposition."""
    for family in plain:
        labels = list(family.labels)
        metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if family.kind == "histogram":
            metric = HistogramMetricFamily(family.name, family.help, labels=labels)
            for key, histogram in family.histograms:
                buckets = [(_le(b), float(n)) for b, n in histogram.cumulative()]
                metric.add_metric(list(key), buckets, histogram.sum)
        else:
            cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = cls(family.name, family.help, labels=labels)
            for key, value in family.samples:
                metric.add_metric(list(key), value)
        yield metric


_registries: weakref.WeakKeyDictionary[Runtime, CollectorRegistry] = weakref.WeakKeyDictionary()

# process_* describe the process, not a runtime: one collector serves every render.
_PROCESS = CollectorRegistry(auto_describe=False)
ProcessCollector(registry=_PROCESS)


def registry_for(runtime: Runtime) -> CollectorRegistry:
    """A registry of ``runtime``'s collector and process_* (made on first use, then kept)."""
    registry = _registries.get(runtime)
    if registry is None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RuntimeCollector(runtime))
        ProcessCollector(registry=registry)
        _registries[runtime] = registry
    return registry


# --- exposition -----------------------------------------------------------------------------


def wants_openmetrics(accept_header: str) -> bool:
    """Does the Accept header ask for OpenMetrics (any version, as Prometheus sends it)?"""
    return any(
        part.split(";", 1)[0].strip().lower() == "application/openmetrics-text"
        for part in (accept_header or "").split(",")
    )


def _escape_value(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return value  # the common case, checked first: three scans instead of three copies


def _escape_help(text: str, om: bool) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if om else text


def _number(value: float) -> str:
    # Counters are ints (exact however large); floats keep Python's shortest round trip.
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label_text(names: Labels, values: Labels) -> str:
    return ",".join(f'{n}="{_escape_value(v)}"' for n, v in zip(names, values, strict=True))


LabelCache = dict[Labels, dict[Labels, str]]


def _cached_labels(names: Labels, values: Labels, cache: LabelCache) -> str:
    """``name="value",...`` for one label set, each distinct set rendered once per scrape.

    A server's (pool, server) labels recur in six families and start the labels of three
    more (state, kind, result): a longer set reuses the rendering of its first labels. The
    cache is per tuple of label names, so equal values under other names never mix."""
    per_names = cache.get(names)
    if per_names is None:
        per_names = cache[names] = {}
    text = per_names.get(values)
    if text is None:
        if len(values) > 1:
            head = _cached_labels(names[:-1], values[:-1], cache)
            text = f'{head},{names[-1]}="{_escape_value(values[-1])}"'
        else:
            text = _label_text(names, values)
        per_names[values] = text
    return text


def _write_family(family: Family, om: bool, out: list[str], cache: LabelCache) -> None:
    name = family.name
    kind = family.kind
    # Text 0.0.4 names a counter family by its sample name; OpenMetrics without _total.
    shown = f"{name}_total" if kind == "counter" and not om else name
    out.append(f"# HELP {shown} {_escape_help(family.help, om)}\n")
    out.append(f"# TYPE {shown} {kind}\n")
    names = family.labels
    if kind == "histogram":
        for key, histogram in family.histograms:
            base = _label_text(names, key)
            sep = "," if base else ""
            labels = f"{{{base}}}" if base else ""
            for bound, count in histogram.cumulative():
                out.append(f'{name}_bucket{{{base}{sep}le="{_le(bound)}"}} {count}\n')
            out.append(f"{name}_count{labels} {histogram.count}\n")
            out.append(f"{name}_sum{labels} {_number(histogram.sum)}\n")
        return
    sample_name = f"{name}_total" if kind == "counter" else name
    if not names:
        out += [f"{sample_name} {_number(value)}\n" for _key, value in family.samples]
        return
    # The per-sample work, kept to one dict lookup and one f-string in the common case (a
    # label set rendered already, an int value): this loop runs 17,000 times for 1,000
    # servers.
    known = cache.get(names)
    if known is None:
        known = cache[names] = {}
    get = known.get
    out += [
        f"{sample_name}{{{get(key) or _cached_labels(names, key, cache)}}} "
        f"{value if value.__class__ is int else _number(value)}\n"
        for key, value in family.samples
    ]


def write_families(plain: Iterable[Family], om: bool) -> str:
    """The exposition text of ``plain``: OpenMetrics 1.0.0 syntax if ``om`` (without the
    closing ``# EOF``, so that more families may follow), else the text format 0.0.4."""
    out: list[str] = []
    cache: LabelCache = {}
    for family in plain:
        _write_family(family, om, out, cache)
    return "".join(out)


def render(runtime: Runtime, accept_header: str) -> tuple[bytes, str]:
    """The /metrics body and its content type (the admin server calls this per scrape):
    OpenMetrics 1.0.0 when the Accept header asks for it, else the text format 0.0.4."""
    om = wants_openmetrics(accept_header)
    body = write_families(families(runtime), om).encode()
    if not om:
        return body + exposition.generate_latest(_PROCESS), CONTENT_TYPE_TEXT
    # The library's OpenMetrics writer has no type hints.
    process: bytes = openmetrics.generate_latest(_PROCESS)  # type: ignore[no-untyped-call]
    eof = b"# EOF\n"
    process = process.removesuffix(eof)
    return body + process + eof, CONTENT_TYPE_OPENMETRICS
