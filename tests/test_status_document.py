"""The /status document: the pool verdict rules (property tests against pool.candidates()),
and the whole document of a running runtime after a known pattern, field by field, and in
agreement with /metrics."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from lbtcp import __version__
from lbtcp.admin.status import VERDICTS, pool_verdict, status_document
from lbtcp.config import PoolConfig
from lbtcp.health import AdminAction
from lbtcp.metrics import SERVER_STATES, render
from lbtcp.pool import Pool, Server
from tests.inprocess import LOOPS, echo_server, exchange, listener_address, run, running, until
from tests.support import closed_port

# --- verdicts ---------------------------------------------------------------------------------

server_strategy = st.fixed_dictionaries(
    {
        "backup": st.booleans(),
        "eligible": st.booleans(),  # health lets it take sessions
        "admin_ok": st.booleans(),  # not draining or disabled
        "weight": st.sampled_from([0, 1, 3]),
        "full": st.booleans(),
    }
)


def _pool(specs: list[dict[str, Any]], panic_threshold: int = 0) -> Pool:
    servers = []
    for i, spec in enumerate(specs):
        server = Server(
            f"s{i}",
            "127.0.0.1",
            10000 + i,
            weight=spec["weight"],
            backup=spec["backup"],
            max_connections=1 if spec["full"] else 0,
        )
        servers.append(server)
    pool = Pool(PoolConfig("app", (), panic_threshold=panic_threshold), servers)
    for server, spec in zip(servers, specs, strict=True):
        # What the health machine and the operator decide, as candidates() reads it.
        server.admin_ok = spec["admin_ok"]
        server.eligible = spec["eligible"] and spec["admin_ok"]
        server.active = 1 if spec["full"] else 0
    return pool


@settings(max_examples=500, deadline=None)
@given(
    specs=st.lists(server_strategy, max_size=8),
    threshold=st.sampled_from([0, 0, 30, 50, 100]),
)
def test_verdict_says_what_the_candidates_are(specs: list[dict[str, Any]], threshold: int) -> None:
    pool = _pool(specs, threshold)
    verdict = pool_verdict(pool)
    candidates = pool.candidates()
    primaries = [s for s in pool.servers.values() if not s.backup]
    in_service = [s for s in primaries if s.available()]
    assert verdict in VERDICTS
    # empty: clients are refused, and only then.
    assert (verdict == "empty") == (not candidates)
    if verdict == "backup":
        assert candidates and all(s.backup for s in candidates)
        assert not in_service
    if candidates and all(s.backup for s in candidates):
        assert verdict == "backup"
    if verdict == "ok":
        assert primaries and in_service == primaries and candidates == primaries
    if verdict == "degraded":
        assert candidates == in_service and 0 < len(in_service) < len(primaries)
    if verdict == "panic":
        # Health is ignored: below the threshold, or nothing healthy and no backup.
        assert threshold > 0
        assert len(in_service) * 100 < threshold * len(primaries)
        assert all(not s.backup for s in candidates)
        assert candidates == [s for s in primaries if s.available_in_panic()]


@pytest.mark.parametrize(
    ("specs", "threshold", "verdict"),
    [
        ([], 0, "empty"),
        ([{"backup": False, "eligible": True}] * 2, 0, "ok"),
        (
            [{"backup": False, "eligible": True}, {"backup": False, "eligible": False}],
            0,
            "degraded",
        ),
        # Draining (admin), weight 0 and full count as out of service too.
        (
            [{"backup": False, "eligible": True}, {"backup": False, "admin_ok": False}],
            0,
            "degraded",
        ),
        ([{"backup": False, "eligible": True}, {"backup": False, "weight": 0}], 0, "degraded"),
        ([{"backup": False, "eligible": True}, {"backup": False, "full": True}], 0, "degraded"),
        ([{"backup": False, "eligible": False}, {"backup": True, "eligible": True}], 0, "backup"),
        ([{"backup": False, "eligible": False}, {"backup": True, "eligible": False}], 0, "empty"),
        # Rule 2: 1 of 3 healthy is below 50 %: panic over every primary.
        (
            [{"backup": False, "eligible": True}] + [{"backup": False, "eligible": False}] * 2,
            50,
            "panic",
        ),
        # Rule 4: nothing healthy, no backup, a threshold: panic.
        ([{"backup": False, "eligible": False}], 50, "panic"),
        # Panic never uses draining or disabled servers: nothing left is empty.
        ([{"backup": False, "eligible": False, "admin_ok": False}], 50, "empty"),
    ],
)
def test_verdict_examples(specs: list[dict[str, Any]], threshold: int, verdict: str) -> None:
    defaults = {"backup": False, "eligible": True, "admin_ok": True, "weight": 1, "full": False}
    pool = _pool([{**defaults, **spec} for spec in specs], threshold)
    assert pool_verdict(pool) == verdict


# --- the document of a running runtime ---------------------------------------------------------

TOP_KEYS = {"version", "pid", "config", "started_at", "uptime_s", "draining", "listeners", "pools"}
LISTENER_KEYS = {
    "name",
    "pool",
    "addresses",
    "active",
    "total",
    "max_connections",
    "refused",
    "routes",
}
POOL_KEYS = {"name", "balance", "verdict", "servers_total", "in_service", "servers"}
SERVER_KEYS = {
    "name",
    "address",
    "backup",
    "state",
    "health",
    "admin",
    "weight",
    "effective_weight",
    "max_connections",
    "active",
    "total",
    "connect_failures",
    "ejections",
    "bytes_sent",
    "bytes_received",
    "last_probe",
    "last_change",
}


def _config(live: int, dead: int, spare: int) -> str:
    return f"""
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
max_connections = 50
[pools.app]
balance = "least_connections"
retries = 3
[[pools.app.servers]]
address = "127.0.0.1:{live}"
name = "live"
weight = 3
[[pools.app.servers]]
address = "127.0.0.1:{dead}"
name = "dead"
[[pools.app.servers]]
address = "127.0.0.1:{spare}"
name = "spare"
backup = true
[pools.app.health]
interval = "40ms"
fast_interval = "20ms"
down_interval = "40ms"
rise = 1
fall = 2
"""


def _metric_values(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


@pytest.mark.parametrize("loop", LOOPS)
def test_status_document_of_a_running_runtime(loop: str) -> None:
    async def scenario() -> None:
        echo, live_port = await echo_server()
        spare, spare_port = await echo_server()
        config = _config(live_port, closed_port(), spare_port)
        before = time.time()
        async with running(config) as (runtime, log):
            await log.wait("server_state", server="live", new="healthy")
            await log.wait("server_state", server="dead", new="unhealthy")
            for i in range(4):
                payload = bytes([65 + i]) * 500
                assert await exchange(listener_address(runtime), payload) == payload
            pool = runtime.pools["app"]
            loop_now = runtime.listeners["web"].loop.time()
            runtime.on_events(pool, pool.admin("spare", AdminAction.DRAIN, loop_now))
            await until(lambda: runtime.listeners["web"].active == 0, "sessions to end")
            document = status_document(runtime)
            body, _ = render(runtime, "")
        echo.close()
        spare.close()
        after = time.time()

        json.dumps(document)  # JSON-ready as it is
        assert set(document) == TOP_KEYS
        assert document["version"] == __version__
        assert document["config"] == "inprocess.toml"
        assert before <= document["started_at"] <= after
        assert 0 <= document["uptime_s"] <= after - before
        assert document["draining"] is False
        (listener,) = document["listeners"]
        assert set(listener) == LISTENER_KEYS
        assert listener["name"] == "web" and listener["pool"] == "app"
        assert listener["addresses"] == runtime.listeners["web"].addresses
        assert (listener["active"], listener["total"], listener["max_connections"]) == (0, 4, 50)
        assert listener["refused"] == {"no_healthy": 0, "acl": 0, "limit": 0, "proxy_protocol": 0}

        (pool_doc,) = document["pools"]
        assert set(pool_doc) == POOL_KEYS
        assert pool_doc["balance"] == "least_connections"
        # "dead" is down, so the primaries are not all in service.
        assert pool_doc["verdict"] == "degraded"
        assert (pool_doc["servers_total"], pool_doc["in_service"]) == (3, 1)
        servers = {s["name"]: s for s in pool_doc["servers"]}
        assert list(servers) == ["live", "dead", "spare"]  # config order
        for server in servers.values():
            assert set(server) == SERVER_KEYS
            assert set(server["connect_failures"]) == {"refused", "timeout", "other"}

        live = servers["live"]
        assert live["address"] == f"127.0.0.1:{live_port}"
        assert (live["state"], live["health"], live["admin"]) == ("healthy", "healthy", "enabled")
        assert (live["weight"], live["effective_weight"], live["backup"]) == (3, 3.0, False)
        assert (live["active"], live["total"]) == (0, 4)
        assert (live["bytes_sent"], live["bytes_received"]) == (2000, 2000)
        assert live["connect_failures"] == {"refused": 0, "timeout": 0, "other": 0}
        assert live["last_probe"]["result"] == "ok"
        assert live["last_probe"]["detail"] == "connected"
        assert 0 <= live["last_probe"]["duration_ms"] < 1000
        assert before <= live["last_probe"]["at"] <= after
        change = live["last_change"]
        assert (change["from"], change["to"]) == ("unknown", "healthy")
        assert change["reason"].startswith("probe:")
        assert before <= change["at"] <= after

        dead = servers["dead"]
        assert (dead["state"], dead["health"], dead["admin"]) == (
            "unhealthy",
            "unhealthy",
            "enabled",
        )
        assert dead["total"] == 0 and dead["bytes_sent"] == 0
        assert dead["last_probe"]["result"] == "fail"
        assert dead["last_probe"]["detail"] == "connection refused"
        assert (dead["last_change"]["from"], dead["last_change"]["to"]) == ("unknown", "unhealthy")

        spare_doc = servers["spare"]
        assert spare_doc["backup"] is True
        assert (spare_doc["state"], spare_doc["admin"]) == ("draining", "draining")
        assert spare_doc["health"] == "healthy"  # still probed underneath
        assert spare_doc["last_change"]["to"] == "draining"
        assert spare_doc["last_change"]["reason"] == "admin: drain"

        # /metrics says the same as /status, server by server.
        v = _metric_values(body)
        for name, server in servers.items():
            key = (("pool", "app"), ("server", name))
            assert v[("lbtcp_server_connections_total", key)] == server["total"]
            assert v[("lbtcp_server_active_connections", key)] == server["active"]
            assert v[("lbtcp_server_bytes_sent_total", key)] == server["bytes_sent"]
            assert v[("lbtcp_server_bytes_received_total", key)] == server["bytes_received"]
            assert v[("lbtcp_server_ejections_total", key)] == server["ejections"]
            for kind, count in server["connect_failures"].items():
                labels = (("kind", kind), ("pool", "app"), ("server", name))
                assert v[("lbtcp_server_connect_failures_total", labels)] == count
            for state in SERVER_STATES:
                labels = (("pool", "app"), ("server", name), ("state", state))
                assert v[("lbtcp_server_state", labels)] == (state == server["state"])
            up = server["health"] in ("healthy", "failing")
            assert v[("lbtcp_server_up", key)] == up
        assert v[("lbtcp_pool_in_service_servers", (("pool", "app"),))] == pool_doc["in_service"]
        assert v[("lbtcp_pool_servers", (("pool", "app"),))] == pool_doc["servers_total"]
        assert v[("lbtcp_listener_connections_total", (("listener", "web"),))] == listener["total"]

    run(scenario(), loop)


def test_no_probes_means_no_last_probe_and_a_health_change_under_drain_shows() -> None:
    async def scenario() -> None:
        echo, port = await echo_server()
        config = f"""
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
address = "127.0.0.1:{port}"
name = "only"
[pools.app.ejection]
consecutive_failures = 1
"""
        async with running(config) as (runtime, _log):
            document = status_document(runtime)
            (server,) = document["pools"][0]["servers"]
            assert server["last_probe"] is None
            assert server["last_change"] is None  # healthy from the start, never changed
            assert document["pools"][0]["verdict"] == "ok"
            pool = runtime.pools["app"]
            only = pool.servers["only"]
            now = runtime.listeners["web"].loop.time()
            runtime.on_events(pool, pool.admin("only", AdminAction.DRAIN, now))
            assert status_document(runtime)["pools"][0]["verdict"] == "empty"
            # A passive failure ejects it underneath the drain: the shown state stays
            # "draining", and last_change shows the health change instead.
            runtime.on_events(pool, pool.connect_result(only, False, now, "timeout"))
            server = status_document(runtime)["pools"][0]["servers"][0]
        echo.close()
        assert (server["state"], server["health"], server["admin"]) == (
            "draining",
            "ejected",
            "draining",
        )
        change = server["last_change"]
        assert (change["from"], change["to"]) == ("healthy", "ejected")
        assert server["ejections"] == 1
        assert server["connect_failures"] == {"refused": 0, "timeout": 1, "other": 0}

    run(scenario())
