"""End to end: ``lbtcp serve`` as a subprocess, a known traffic pattern, then ``GET /metrics``
(parsed with prometheus_client's parsers, checked by ``promtool check metrics``) and
``GET /status`` showing exactly those counts and states, and agreeing with each other."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from lbtcp import __version__
from lbtcp.metrics import SERVER_STATES
from tests.dns_server import DOMAIN, Dnsmasq
from tests.support import Backends, Lbtcp, closed_port, roundtrip, wait_until

SIZE = 3000
BEFORE_KILL = 8
AFTER_KILL = 4

HEALTH = """interval = "100ms"
fast_interval = "50ms"
down_interval = "100ms"
timeout = "500ms"
rise = 1
fall = 2"""

Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def admin_address(proc: Lbtcp) -> tuple[str, int]:
    line = proc.wait_line(r"\badmin_listening\b")
    match = re.search(r"address=([0-9.]+):(\d+)", line)
    assert match, line
    return match.group(1), int(match.group(2))


def get(admin: tuple[str, int], path: str, accept: str = "") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection(*admin, timeout=10)
    try:
        conn.request("GET", path, headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def status(admin: tuple[str, int]) -> dict[str, Any]:
    code, content_type, body = get(admin, "/status")
    assert code == 200 and content_type.startswith("application/json"), (code, body)
    document: dict[str, Any] = json.loads(body)
    return document


def servers_of(document: dict[str, Any], pool: str) -> dict[str, dict[str, Any]]:
    (found,) = [p for p in document["pools"] if p["name"] == pool]
    return {s["name"]: s for s in found["servers"]}


def values_of(text: str) -> Values:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parse_text(text)
        for s in family.samples
    }


def value(values: Values, metric: str, /, **labels: str) -> float:
    return values[(metric, tuple(sorted(labels.items())))]


def test_metrics_and_status_after_a_known_traffic_pattern(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    proc = start_lbtcp(
        f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[listeners.acl]
bind = "127.0.0.1:0"
pool = "app"
deny = ["127.0.0.0/8"]
[listeners.nh]
bind = "127.0.0.1:0"
pool = "dead"
[pools.app]
[pools.app.health]
{HEALTH}
[[pools.app.servers]]
address = "127.0.0.1:{a}"
name = "a"
[[pools.app.servers]]
address = "127.0.0.1:{b}"
name = "b"
[pools.dead]
[pools.dead.health]
{HEALTH}
[[pools.dead.servers]]
address = "127.0.0.1:{closed_port()}"
name = "gone"
"""
    )
    admin = admin_address(proc)
    web, acl, nh = proc.address("web"), proc.address("acl"), proc.address("nh")

    def states() -> dict[str, str]:
        document = status(admin)
        return {
            f"{pool}/{name}": server["state"]
            for pool in ("app", "dead")
            for name, server in servers_of(document, pool).items()
        }

    wait_until(
        lambda: states() == {"app/a": "healthy", "app/b": "healthy", "dead/gone": "unhealthy"},
        what="a and b healthy, gone unhealthy",
    )
    for i in range(BEFORE_KILL):
        payload = bytes([i]) * SIZE
        assert roundtrip(web, payload) == payload
    backends.stop(b)  # killed: its port refuses from now on
    wait_until(lambda: states()["app/b"] == "unhealthy", what="b unhealthy after its kill")
    for i in range(AFTER_KILL):
        payload = bytes([100 + i]) * SIZE
        assert roundtrip(web, payload) == payload
    assert roundtrip(acl, b"no") == b""
    for _ in range(2):
        assert roundtrip(nh, b"no") == b""
    wait_until(
        lambda: all(listener["active"] == 0 for listener in status(admin)["listeners"]),
        what="every session to end",
    )

    code, content_type, body = get(admin, "/metrics")
    assert code == 200 and content_type == "text/plain; version=0.0.4; charset=utf-8"
    document = status(admin)
    om_code, om_type, om_body = get(
        admin, "/metrics", "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
    )
    assert om_code == 200 and om_type.startswith("application/openmetrics-text; version=1.0.0")
    assert om_body.endswith(b"# EOF\n")
    om_families = {f.name for f in parse_openmetrics(om_body.decode())}
    assert {"lbtcp_server_connections", "lbtcp_connect_seconds", "process_cpu_seconds"} <= (
        om_families
    )

    v = values_of(body.decode())
    sessions = BEFORE_KILL + AFTER_KILL
    # Listeners: every accepted client counted, refused ones by reason.
    assert value(v, "lbtcp_listener_connections_total", listener="web") == sessions
    assert value(v, "lbtcp_listener_connections_total", listener="acl") == 1
    assert value(v, "lbtcp_listener_connections_total", listener="nh") == 2
    assert value(v, "lbtcp_listener_refused_total", listener="acl", reason="acl") == 1
    assert value(v, "lbtcp_listener_refused_total", listener="nh", reason="no_healthy") == 2
    for reason in ("no_healthy", "acl", "limit", "proxy_protocol"):
        assert value(v, "lbtcp_listener_refused_total", listener="web", reason=reason) == 0
    for listener in ("web", "acl", "nh"):
        assert value(v, "lbtcp_listener_active_connections", listener=listener) == 0
    # Servers: every session on a or b, b none after its kill, bytes exact both ways.
    total_a = value(v, "lbtcp_server_connections_total", pool="app", server="a")
    total_b = value(v, "lbtcp_server_connections_total", pool="app", server="b")
    assert total_a + total_b == sessions
    assert total_a >= AFTER_KILL and 0 < total_b <= BEFORE_KILL
    for name, total in (("a", total_a), ("b", total_b)):
        for direction in ("sent", "received"):
            metric = f"lbtcp_server_bytes_{direction}_total"
            assert value(v, metric, pool="app", server=name) == total * SIZE
        for kind in ("refused", "timeout", "other"):
            failures = "lbtcp_server_connect_failures_total"
            assert value(v, failures, pool="app", server=name, kind=kind) == 0
        assert value(v, "lbtcp_server_ejections_total", pool="app", server=name) == 0
        assert value(v, "lbtcp_server_active_connections", pool="app", server=name) == 0
    shown = {("app", "a"): "healthy", ("app", "b"): "unhealthy", ("dead", "gone"): "unhealthy"}
    for (pool, name), state_now in shown.items():
        for state in SERVER_STATES:
            metric_state = value(v, "lbtcp_server_state", pool=pool, server=name, state=state)
            assert metric_state == (1 if state == state_now else 0), (name, state)
        up = value(v, "lbtcp_server_up", pool=pool, server=name)
        assert up == (1 if state_now == "healthy" else 0)
    assert value(v, "lbtcp_health_checks_total", pool="app", server="b", result="fail") >= 2
    assert value(v, "lbtcp_health_checks_total", pool="dead", server="gone", result="ok") == 0
    assert value(v, "lbtcp_pool_servers", pool="app") == 2
    assert value(v, "lbtcp_pool_healthy_servers", pool="app") == 1
    assert value(v, "lbtcp_pool_in_service_servers", pool="app") == 1
    assert value(v, "lbtcp_pool_in_service_servers", pool="dead") == 0
    assert value(v, "lbtcp_connect_seconds_count", pool="app") == sessions
    assert value(v, "lbtcp_connect_seconds_bucket", pool="app", le="+Inf") == sessions
    assert value(v, "lbtcp_session_seconds_count", listener="web") == sessions
    assert value(v, "lbtcp_session_seconds_count", listener="nh") == 0
    assert value(v, "lbtcp_build_info", version=__version__) == 1
    assert value(v, "lbtcp_config_last_reload_successful") == 1
    assert value(v, "lbtcp_config_reloads_total", result="failure") == 0
    assert value(v, "lbtcp_config_last_reload_success_timestamp_seconds") == pytest.approx(
        document["started_at"], abs=1e-6
    )
    assert value(v, "process_resident_memory_bytes") > 0

    # /status agrees with /metrics.
    listeners = {listener["name"]: listener for listener in document["listeners"]}
    for name, listener in listeners.items():
        assert value(v, "lbtcp_listener_connections_total", listener=name) == listener["total"]
        for reason, count in listener["refused"].items():
            assert value(v, "lbtcp_listener_refused_total", listener=name, reason=reason) == count
    pools = {pool["name"]: pool for pool in document["pools"]}
    assert pools["app"]["verdict"] == "degraded" and pools["dead"]["verdict"] == "empty"
    for pool_name, pool in pools.items():
        assert value(v, "lbtcp_pool_in_service_servers", pool=pool_name) == pool["in_service"]
        assert value(v, "lbtcp_pool_servers", pool=pool_name) == pool["servers_total"]
        for server in pool["servers"]:
            labels = {"pool": pool_name, "server": server["name"]}
            assert value(v, "lbtcp_server_connections_total", **labels) == server["total"]
            assert value(v, "lbtcp_server_bytes_sent_total", **labels) == server["bytes_sent"]
            assert (
                value(v, "lbtcp_server_bytes_received_total", **labels) == server["bytes_received"]
            )
            assert value(v, "lbtcp_server_state", state=server["state"], **labels) == 1
    b_doc = servers_of(document, "app")["b"]
    assert b_doc["last_probe"]["result"] == "fail"
    assert b_doc["last_probe"]["detail"] == "connection refused"
    # fall = 2: the first failed probe made it "failing", the second "unhealthy".
    assert (b_doc["last_change"]["from"], b_doc["last_change"]["to"]) == ("failing", "unhealthy")
    assert b_doc["last_change"]["reason"].startswith("probe:")

    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: run scripts/install-test-deps (Debian's prometheus)"
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert checked.returncode == 0 and not checked.stdout and not checked.stderr, (
        checked.stdout.decode() + checked.stderr.decode()
    )


def test_dns_queries_by_name_and_result_match_what_the_nameserver_saw(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], dns_servers: Callable[..., Dnsmasq]
) -> None:
    echo = backends.echo()
    dns = dns_servers(hosts={f"app.{DOMAIN}": ["127.0.0.1"]}, local_ttl=1)
    proc = start_lbtcp(
        f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
[resolver]
nameservers = ["{dns.nameserver}"]
timeout = "500ms"
min_ttl = "1s"
family = "ipv4"
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
address = "app.{DOMAIN}:{echo}"
[[pools.app.servers]]
address = "missing.{DOMAIN}:{echo}"
"""
    )
    admin = admin_address(proc)
    app, missing = f"app.{DOMAIN}", f"missing.{DOMAIN}"

    def scrape() -> Values:
        code, _, body = get(admin, "/metrics")
        assert code == 200
        return values_of(body.decode())

    def looked_up() -> bool:
        v = scrape()
        return (
            v.get(("lbtcp_dns_queries_total", (("name", app), ("result", "ok"))), 0) >= 2
            and v.get(("lbtcp_dns_queries_total", (("name", missing), ("result", "nxdomain"))), 0)
            >= 1
        )

    wait_until(looked_up, 15, "two answers for app and an NXDOMAIN for missing")
    v = scrape()
    results = ("ok", "nxdomain", "nodata", "servfail", "refused", "timeout", "unreachable", "error")
    counts = {
        name: {r: value(v, "lbtcp_dns_queries_total", name=name, result=r) for r in results}
        for name in (app, missing)
    }
    assert {r for r, n in counts[app].items() if n} == {"ok"}
    assert {r for r, n in counts[missing].items() if n} == {"nxdomain"}
    # dnsmasq's own log of the queries it received: every lookup lbtcp counted reached it
    # (one more may have been in flight after the scrape).
    for name in (app, missing):
        counted = sum(counts[name].values())
        wait_until(
            lambda n=name, c=counted: dns.queries(n, "A") >= c, 5, f"dnsmasq's log of {name}"
        )
        assert counted <= dns.queries(name, "A") <= counted + 1
        assert dns.queries(name, "AAAA") == 0  # family = "ipv4"
    # The server behind the name is in /status under its DNS name.
    assert set(servers_of(status(admin), "app")) == {f"app.{DOMAIN}:{echo}#127.0.0.1"}
