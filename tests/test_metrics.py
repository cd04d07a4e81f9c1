"""Metrics: the histogram's bucketing (property tests), the exposition writer against
prometheus_client's own, and a whole runtime's /metrics after a known traffic pattern, parsed
with prometheus_client's parsers and checked by ``promtool check metrics``."""

from __future__ import annotations

import asyncio
import math
import shutil
import subprocess
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import exposition
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from lbtcp import __version__, metrics
from lbtcp.counters import CONNECT_BUCKETS, SESSION_BUCKETS, Histogram, ReloadStats
from lbtcp.metrics import Family, families, render, to_prometheus, write_families
from lbtcp.runtime import Runtime
from tests.inprocess import LOOPS, echo_server, exchange, listener_address, run, running, until
from tests.support import blackhole, closed_port

# --- the histogram ----------------------------------------------------------------------------

bounds_strategy = st.lists(
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=20, unique=True
).map(sorted)
values_strategy = st.lists(
    st.floats(min_value=-2e6, max_value=2e6, allow_nan=False, allow_infinity=False), max_size=200
)


@settings(max_examples=300, deadline=None)
@given(bounds=bounds_strategy, values=values_strategy)
def test_histogram_counts_what_a_naive_count_of_le_gives(
    bounds: list[float], values: list[float]
) -> None:
    histogram = Histogram(bounds)
    for value in values:
        histogram.observe(value)
    cumulative = histogram.cumulative()
    # Prometheus' "le": a bucket counts every observation at or below its bound.
    assert [b for b, _ in cumulative] == [*bounds, math.inf]
    assert [n for _, n in cumulative] == [
        sum(1 for v in values if v <= bound) for bound in (*bounds, math.inf)
    ]
    assert histogram.count == len(values)
    assert histogram.sum == pytest.approx(math.fsum(values), abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(bounds=bounds_strategy, value=st.floats(allow_nan=False, allow_infinity=False))
def test_each_observation_touches_exactly_one_bucket(bounds: list[float], value: float) -> None:
    histogram = Histogram(bounds)
    histogram.observe(value)
    (index,) = [i for i, n in enumerate(histogram.counts) if n]
    upper = (*bounds, math.inf)[index]
    lower = -math.inf if index == 0 else bounds[index - 1]
    assert lower < value <= upper


def test_a_value_on_a_bound_is_in_that_bound_bucket() -> None:
    histogram = Histogram([0.1, 1.0])
    histogram.observe(0.1)
    histogram.observe(1.0)
    histogram.observe(1.0000001)
    assert histogram.counts == [1, 1, 1]


@pytest.mark.parametrize("bounds", [[], [1.0, 1.0], [2.0, 1.0]])
def test_bad_bounds_are_refused(bounds: list[float]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram(bounds)


def test_default_buckets_cover_the_timeouts() -> None:
    # A connect slower than the default connect_timeout (2 s) still falls in a finite bucket
    # (retries within retry_budget = 5 s), and so does a session at the idle_timeout (1 h).
    assert CONNECT_BUCKETS[-1] >= 5.0
    assert SESSION_BUCKETS[-1] > 3600.0
    Histogram(CONNECT_BUCKETS)
    Histogram(SESSION_BUCKETS)


def test_reload_stats_start_as_one_successful_load() -> None:
    stats = ReloadStats(loaded_at=1000.0)
    assert (stats.successes, stats.failures, stats.last_successful) == (0, 0, True)
    assert stats.last_success_at == 1000.0
    stats.failed()
    assert (stats.failures, stats.last_successful, stats.last_success_at) == (1, False, 1000.0)
    stats.succeeded(2000.0)
    assert (stats.successes, stats.last_successful, stats.last_success_at) == (1, True, 2000.0)


# --- the writer against prometheus_client's ---------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        ("", False),
        ("text/plain; version=0.0.4", False),
        ("*/*", False),
        ("application/openmetrics-text; version=1.0.0", True),
        (
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            True,
        ),  # what Prometheus 2.x sends
        ("text/plain, Application/OpenMetrics-Text", True),
    ],
)
def test_accept_header_picks_the_format(accept: str, openmetrics: bool) -> None:
    assert metrics.wants_openmetrics(accept) is openmetrics


label_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=12,
)


@st.composite
def family_lists(draw: st.DrawFn) -> list[Family]:
    out: list[Family] = []
    names = draw(
        st.lists(st.from_regex(r"\Albtcp_[a-z]{1,8}\Z"), min_size=1, max_size=4, unique=True)
    )
    for index, name in enumerate(names):
        kind = draw(st.sampled_from(["counter", "gauge", "histogram"]))
        labels = tuple(draw(st.lists(st.sampled_from(["pool", "server", "state"]), unique=True)))
        help_text = draw(label_text)
        family = Family(f"{name}_{index}", kind, help_text or "help", labels)
        keys = draw(
            st.lists(st.tuples(*[label_text for _ in labels]), max_size=5, unique=True)
            if labels
            else st.just([()])
        )
        for key in keys:
            if kind == "histogram":
                histogram = Histogram([0.5, 1.0, 10.0])
                for value in draw(st.lists(st.floats(0, 20, allow_nan=False), max_size=5)):
                    histogram.observe(value)
                family.histograms.append((key, histogram))
            elif kind == "counter":
                family.samples.append((key, draw(st.integers(0, 2**62))))
            else:
                family.samples.append(
                    (key, draw(st.one_of(st.integers(-(2**40), 2**40), st.floats(-1e9, 1e9))))
                )
        out.append(family)
    return out


class _Fixed(Collector):
    def __init__(self, plain: list[Family]) -> None:
        self.plain = plain

    def collect(self) -> Iterable[object]:  # type: ignore[override]
        return to_prometheus(self.plain)


def _samples(parsed: Iterable[object]) -> list[tuple[str, str, str, list[tuple[object, ...]]]]:
    """Families as comparable data: name, type, help, sorted (name, labels, value) samples."""
    out = []
    for family in parsed:
        samples: list[Sample] = family.samples  # type: ignore[attr-defined]
        out.append(
            (
                family.name,  # type: ignore[attr-defined]
                family.type,  # type: ignore[attr-defined]
                family.documentation,  # type: ignore[attr-defined]
                # Prometheus keeps float64: our exact integers and its floats are one value.
                sorted((s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in samples),
            )
        )
    return sorted(out)


@settings(max_examples=150, deadline=None)
@given(plain=family_lists())
def test_writer_says_what_prometheus_client_says(plain: list[Family]) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(plain))
    ours_text = write_families(plain, om=False)
    theirs_text = exposition.generate_latest(registry).decode()
    assert _samples(parse_text(ours_text)) == _samples(parse_text(theirs_text))
    ours_om = write_families(plain, om=True) + "# EOF\n"
    theirs_om = om_exposition.generate_latest(registry).decode()  # type: ignore[no-untyped-call]
    assert _samples(parse_openmetrics(ours_om)) == _samples(parse_openmetrics(theirs_om))


# --- a whole runtime ----------------------------------------------------------------------------

PAYLOAD = 1000
SESSIONS = 10


def _config(echo_port: int, dead_port: int, gone_port: int) -> str:
    return f"""
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[listeners.closed]
bind = "127.0.0.1:0"
pool = "app"
deny = ["127.0.0.0/8"]
[listeners.nohealthy]
bind = "127.0.0.1:0"
pool = "down"

[pools.app]
retries = 2
[[pools.app.servers]]
address = "127.0.0.1:{echo_port}"
name = 'a "quoted" \\ one'
[[pools.app.servers]]
address = "127.0.0.1:{dead_port}"
name = "dead"
[pools.app.ejection]
consecutive_failures = 2
base_time = "60s"
max_time = "60s"

[pools.down]
[[pools.down.servers]]
address = "127.0.0.1:{gone_port}"
name = "gone"
[pools.down.health]
interval = "50ms"
fast_interval = "20ms"
down_interval = "50ms"
fall = 2
"""


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_text(text)
        for s in family.samples
    }


def _value(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return values[(name, tuple(sorted(labels.items())))]


DESIGN_FAMILIES = {
    "lbtcp_listener_connections": "counter",
    "lbtcp_listener_active_connections": "gauge",
    "lbtcp_listener_refused": "counter",
    "lbtcp_server_up": "gauge",
    "lbtcp_server_state": "gauge",
    "lbtcp_server_active_connections": "gauge",
    "lbtcp_server_connections": "counter",
    "lbtcp_server_connect_failures": "counter",
    "lbtcp_server_bytes_sent": "counter",
    "lbtcp_server_bytes_received": "counter",
    "lbtcp_server_ejections": "counter",
    "lbtcp_health_checks": "counter",
    "lbtcp_connect_seconds": "histogram",
    "lbtcp_session_seconds": "histogram",
    "lbtcp_dns_queries": "counter",
    "lbtcp_pool_healthy_servers": "gauge",
    "lbtcp_pool_servers": "gauge",
    "lbtcp_build_info": "gauge",
    "lbtcp_config_reloads": "counter",
    "lbtcp_config_last_reload_successful": "gauge",
    "lbtcp_config_last_reload_success_timestamp_seconds": "gauge",
}


async def _traffic(runtime: Runtime) -> None:
    web = listener_address(runtime, "web")
    for i in range(SESSIONS):
        payload = bytes([i]) * PAYLOAD
        assert await exchange(web, payload) == payload
    for _ in range(2):
        assert await exchange(listener_address(runtime, "closed"), b"hello") == b""
    for _ in range(3):
        assert await exchange(listener_address(runtime, "nohealthy"), b"hello") == b""
    await until(
        lambda: all(listener.active == 0 for listener in runtime.listeners.values()),
        "every session to end",
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_runtime_metrics_after_a_known_traffic_pattern(loop: str) -> None:
    async def scenario() -> None:
        echo, echo_port = await echo_server()
        config = _config(echo_port, closed_port(), closed_port())
        async with running(config) as (runtime, log):
            await log.wait("server_state", server="gone", new="unhealthy")
            await _traffic(runtime)
            body, content_type = render(runtime, "")
            om_body, om_type = render(runtime, "application/openmetrics-text; version=1.0.0")
            prober = runtime.probers["down"]
            probes_failed = prober.probes_total["fail"]
            started_at = runtime.started_at
        echo.close()

        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert om_type == "application/openmetrics-text; version=1.0.0; charset=utf-8"
        text = body.decode()
        parsed = {family.name: family for family in parse_text(text)}
        for name, kind in DESIGN_FAMILIES.items():
            assert parsed[name].type == kind, name
            assert parsed[name].documentation, name
        for name in ("process_cpu_seconds", "process_resident_memory_bytes"):
            assert name in parsed
        # OpenMetrics says the same (the strict parser also checks the syntax and # EOF).
        om_values = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parse_openmetrics(om_body.decode())
            for s in family.samples
            if s.name.startswith("lbtcp_")
        }
        values = _values(text)
        assert om_values == {
            key: value for key, value in values.items() if key[0].startswith("lbtcp_")
        }

        a = 'a "quoted" \\ one'
        v = values
        assert _value(v, "lbtcp_listener_connections_total", listener="web") == SESSIONS
        assert _value(v, "lbtcp_listener_connections_total", listener="closed") == 2
        assert _value(v, "lbtcp_listener_connections_total", listener="nohealthy") == 3
        for listener, reason, count in [
            ("web", "no_healthy", 0),
            ("web", "acl", 0),
            ("closed", "acl", 2),
            ("closed", "no_healthy", 0),
            ("nohealthy", "no_healthy", 3),
            ("nohealthy", "limit", 0),
            ("nohealthy", "proxy_protocol", 0),
        ]:
            assert _value(v, "lbtcp_listener_refused_total", listener=listener, reason=reason) == (
                count
            ), (listener, reason)
        for listener in ("web", "closed", "nohealthy"):
            assert _value(v, "lbtcp_listener_active_connections", listener=listener) == 0
        # Every session went to "a": the two that tried "dead" first were retried there.
        assert _value(v, "lbtcp_server_connections_total", pool="app", server=a) == SESSIONS
        assert _value(v, "lbtcp_server_connections_total", pool="app", server="dead") == 0
        assert _value(v, "lbtcp_server_bytes_sent_total", pool="app", server=a) == (
            SESSIONS * PAYLOAD
        )
        assert _value(v, "lbtcp_server_bytes_received_total", pool="app", server=a) == (
            SESSIONS * PAYLOAD
        )
        assert _value(v, "lbtcp_server_bytes_sent_total", pool="app", server="dead") == 0
        for kind, count in [("refused", 2), ("timeout", 0), ("other", 0)]:
            assert (
                _value(
                    v, "lbtcp_server_connect_failures_total", pool="app", server="dead", kind=kind
                )
                == count
            )
            assert (
                _value(v, "lbtcp_server_connect_failures_total", pool="app", server=a, kind=kind)
                == 0
            )
        assert _value(v, "lbtcp_server_ejections_total", pool="app", server="dead") == 1
        assert _value(v, "lbtcp_server_ejections_total", pool="app", server=a) == 0
        expected_states = {
            ("app", a): "healthy",
            ("app", "dead"): "ejected",
            ("down", "gone"): "unhealthy",
        }
        for (pool, server), shown in expected_states.items():
            for state in metrics.SERVER_STATES:
                assert _value(v, "lbtcp_server_state", pool=pool, server=server, state=state) == (
                    1 if state == shown else 0
                ), (server, state)
        assert _value(v, "lbtcp_server_up", pool="app", server=a) == 1
        assert _value(v, "lbtcp_server_up", pool="app", server="dead") == 0
        assert _value(v, "lbtcp_server_up", pool="down", server="gone") == 0
        assert _value(v, "lbtcp_pool_servers", pool="app") == 2
        assert _value(v, "lbtcp_pool_healthy_servers", pool="app") == 1
        assert _value(v, "lbtcp_pool_in_service_servers", pool="app") == 1
        assert _value(v, "lbtcp_pool_servers", pool="down") == 1
        assert _value(v, "lbtcp_pool_healthy_servers", pool="down") == 0
        assert _value(v, "lbtcp_pool_in_service_servers", pool="down") == 0
        # Probes: only the probed pool has the series; it counted what the prober counted.
        assert not any(
            name == "lbtcp_health_checks_total" and dict(labels)["pool"] == "app"
            for name, labels in v
        )
        assert (
            _value(v, "lbtcp_health_checks_total", pool="down", server="gone", result="fail")
            == probes_failed
        )
        assert _value(v, "lbtcp_health_checks_total", pool="down", server="gone", result="ok") == 0
        # Histograms: one observation per established session.
        assert _value(v, "lbtcp_connect_seconds_count", pool="app") == SESSIONS
        assert _value(v, "lbtcp_connect_seconds_bucket", pool="app", le="+Inf") == SESSIONS
        assert _value(v, "lbtcp_connect_seconds_count", pool="down") == 0
        assert 0 < _value(v, "lbtcp_connect_seconds_sum", pool="app") < SESSIONS * 1.0
        assert _value(v, "lbtcp_session_seconds_count", listener="web") == SESSIONS
        assert _value(v, "lbtcp_session_seconds_count", listener="closed") == 0
        assert _value(v, "lbtcp_session_seconds_count", listener="nohealthy") == 0
        assert _value(v, "lbtcp_config_reloads_total", result="success") == 0
        assert _value(v, "lbtcp_config_reloads_total", result="failure") == 0
        assert _value(v, "lbtcp_config_last_reload_successful") == 1
        assert _value(v, "lbtcp_config_last_reload_success_timestamp_seconds") == started_at
        assert _value(v, "lbtcp_build_info", version=__version__) == 1
        assert parsed["lbtcp_dns_queries"].samples == []  # no server is named by DNS

        _promtool_check(body)

    run(scenario(), loop)


def _promtool_check(body: bytes) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/install-test-deps (Debian's prometheus)"
    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0 and not result.stdout and not result.stderr, (
        result.stdout.decode() + result.stderr.decode()
    )


def test_runtime_collector_and_render_agree() -> None:
    """prometheus_client's exposition of RuntimeCollector and ``render`` say the same."""

    async def scenario() -> None:
        echo, echo_port = await echo_server()
        config = _config(echo_port, closed_port(), closed_port()).split("[pools.down.health]")[0]
        async with running(config) as (runtime, _log):
            await _traffic(runtime)
            ours = render(runtime, "")[0].decode()
            theirs = exposition.generate_latest(metrics.registry_for(runtime)).decode()
            ours_om = render(runtime, "application/openmetrics-text")[0].decode()
            theirs_om = om_exposition.generate_latest(  # type: ignore[no-untyped-call]
                metrics.registry_for(runtime)
            ).decode()
        echo.close()

        def lbtcp_only(parsed: Iterable[object]) -> list[object]:
            return [f for f in _samples(parsed) if f[0].startswith("lbtcp_")]

        assert lbtcp_only(parse_text(ours)) == lbtcp_only(parse_text(theirs))
        assert lbtcp_only(parse_openmetrics(ours_om)) == lbtcp_only(parse_openmetrics(theirs_om))
        assert "process_cpu_seconds_total" in theirs and "process_cpu_seconds_total" in ours

    run(scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_live_session_bytes_show_before_it_ends(loop: str) -> None:
    async def scenario() -> None:
        echo, echo_port = await echo_server()
        config = _config(echo_port, closed_port(), closed_port()).split("[pools.down.health]")[0]
        async with running(config) as (runtime, _log):
            reader, writer = await asyncio.open_connection(*listener_address(runtime, "web"))
            sent = 0
            for size in (100, 2000):
                writer.write(b"z" * size)
                sent += size
                assert await reader.readexactly(size) == b"z" * size
                v = _values(render(runtime, "")[0].decode())
                a = 'a "quoted" \\ one'
                # A scrape during the session shows the bytes so far, both ways.
                assert _value(v, "lbtcp_server_bytes_sent_total", pool="app", server=a) == sent
                assert _value(v, "lbtcp_server_bytes_received_total", pool="app", server=a) == sent
                assert _value(v, "lbtcp_server_active_connections", pool="app", server=a) == 1
                assert _value(v, "lbtcp_listener_active_connections", listener="web") == 1
            writer.close()
            await until(lambda: runtime.listeners["web"].active == 0, "the session to end")
            v = _values(render(runtime, "")[0].decode())
            # Ended: moved from the live sessions into the server's counter, unchanged.
            assert _value(v, "lbtcp_server_bytes_sent_total", pool="app", server=a) == sent
            assert _value(v, "lbtcp_server_active_connections", pool="app", server=a) == 0
        echo.close()

    run(scenario(), loop)


def test_a_thousand_servers_every_series_once() -> None:
    """The content of a big pool's scrape (its time is measured in benchmarks/)."""
    servers = 1000
    lines = ["[listeners.web]", 'bind = "127.0.0.1:0"', 'pool = "big"', "[pools.big]"]
    for i in range(servers):
        lines += ["[[pools.big.servers]]", f'address = "127.0.0.{1 + i // 250}:{10000 + i}"']

    async def scenario() -> None:
        async with running("\n".join(lines) + "\n") as (runtime, _log):
            body, _ = render(runtime, "")
            plain = families(runtime)
        parsed = {family.name: family for family in parse_text(body.decode())}
        per_server = {
            "lbtcp_server_up": 1,
            "lbtcp_server_state": len(metrics.SERVER_STATES),
            "lbtcp_server_active_connections": 1,
            "lbtcp_server_connections": 1,
            "lbtcp_server_connect_failures": 3,
            "lbtcp_server_bytes_sent": 1,
            "lbtcp_server_bytes_received": 1,
            "lbtcp_server_ejections": 1,
        }
        for name, count in per_server.items():
            samples = parsed[name].samples
            assert len(samples) == servers * count, name
            assert len({tuple(sorted(s.labels.items())) for s in samples}) == len(samples), name
        states = parsed["lbtcp_server_state"].samples
        assert sum(s.value for s in states) == servers
        assert {s.labels["state"] for s in states if s.value == 1} == {"healthy"}
        assert sum(len(f.samples) for f in plain) > 17 * servers

    run(scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_connect_timeouts_count_as_timeout(loop: str) -> None:
    async def scenario(port: int) -> None:
        config = f"""
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
retries = 0
connect_timeout = "100ms"
[[pools.app.servers]]
address = "127.0.0.1:{port}"
name = "hole"
[pools.app.ejection]
consecutive_failures = 0
"""
        async with running(config) as (runtime, _log):
            for _ in range(2):
                assert await exchange(listener_address(runtime), b"lost") == b""
            await until(lambda: runtime.listeners["web"].active == 0, "the sessions to end")
            v = _values(render(runtime, "")[0].decode())
        for kind, count in [("timeout", 2), ("refused", 0), ("other", 0)]:
            assert (
                _value(
                    v, "lbtcp_server_connect_failures_total", pool="app", server="hole", kind=kind
                )
                == count
            )
        assert _value(v, "lbtcp_server_connections_total", pool="app", server="hole") == 0
        assert _value(v, "lbtcp_connect_seconds_count", pool="app") == 0
        assert _value(v, "lbtcp_session_seconds_count", listener="web") == 0
        assert _value(v, "lbtcp_listener_connections_total", listener="web") == 2
        assert _value(v, "lbtcp_server_state", pool="app", server="hole", state="healthy") == 1

    with blackhole() as port:
        run(scenario(port), loop)
