"""``lbtcp doctor``: end to end against real local servers and a real dnsmasq, plus the pure
config checks (examples, configs built to trigger each finding, and property tests).

The e2e tests run ``python -m lbtcp doctor`` as a subprocess, as an operator would, and read
its text and ``--json`` output.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import ListenerConfig, PoolConfig, ServerConfig, load_config
from lbtcp.doctor import ServerReport, TargetReport, check_pool_config, time_bound
from tests.dns_server import Dnsmasq, free_port
from tests.support import Backends, Lbtcp, blackhole, closed_port, wait_until
from tests.test_admin_server import admin_address, post

DnsFactory = Callable[..., Dnsmasq]
StartLbtcp = Callable[..., Lbtcp]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Python start-up and the report's rendering, on a shared, loaded machine.
START_MARGIN = 0.7


class Pong(asyncio.Protocol):
    """Answers ``reply`` to every chunk and keeps the connection open (as Redis does)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(self.reply)


def run_doctor(path: Path, *args: str, timeout: float = 30.0) -> tuple[int, str, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "lbtcp", "doctor", str(path), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started


def pool_block(text: str, pool: str) -> str:
    return text.split(f"\npool {pool} ", 1)[1].split("\n\n", 1)[0]


def server_line(text: str, name: str, pool: str = "mixed") -> str:
    """The header line of one server of ``pool`` in the text report."""
    lines = [line for line in pool_block(text, pool).splitlines() if f"server {name} " in line]
    assert len(lines) == 1, (name, text)
    return lines[0]


def verdict_line(text: str, pool: str) -> str:
    block = pool_block(text, pool)
    return next(line for line in block.splitlines() if line.strip().startswith("verdict:"))


@pytest.fixture
def world(backends: Backends, dns_servers: DnsFactory, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Two pools over every kind of broken server; see the test for which is which."""
    good = backends.start(lambda box: Pong(b"+PONG\r\n"))
    wrong = backends.start(lambda box: Pong(b"-ERR unknown command\r\n"))
    refusing = closed_port()
    dead_dns = free_port()  # a nameserver address with nothing listening
    dns = dns_servers(
        hosts={"app.test": ["127.0.0.1"]},
        # down.test's own DNS server is that dead address: dnsmasq never gets an answer.
        extra_args=[f"--server=/down.test/127.0.0.1#{dead_dns}"],
    )
    with blackhole() as dropped:
        text = f"""
[resolver]
nameservers = ["{dns.nameserver}", "127.0.0.1:{dead_dns}"]
timeout = "1s"
family = "ipv4"

[listeners.web]
bind = "127.0.0.1:0"
pool = "mixed"

[listeners.other]
bind = "127.0.0.1:0"
pool = "broken"

[pools.mixed]
connect_timeout = "1s"
retries = 1
[pools.mixed.health]
interval = "2s"
timeout = "1s"
send = "PING\\r\\n"
expect = "+PONG"
[[pools.mixed.servers]]
name = "healthy"
address = "127.0.0.1:{good}"
[[pools.mixed.servers]]
name = "refusing"
address = "127.0.0.1:{refusing}"
[[pools.mixed.servers]]
name = "dropping"
address = "127.0.0.1:{dropped}"
[[pools.mixed.servers]]
address = "missing.test:{good}"
[[pools.mixed.servers]]
address = "db.down.test:{good}"
[[pools.mixed.servers]]
name = "wrong"
address = "127.0.0.1:{wrong}"
[[pools.mixed.servers]]
address = "app.test:{good}"

[pools.broken]
connect_timeout = "1s"
retries = 1
[pools.broken.health]
interval = "2s"
timeout = "1s"
send = "PING\\r\\n"
expect = "+PONG"
[[pools.broken.servers]]
name = "refusing"
address = "127.0.0.1:{refusing}"
[[pools.broken.servers]]
address = "missing.test:{good}"
[[pools.broken.servers]]
name = "dropping"
address = "127.0.0.1:{dropped}"
[[pools.broken.servers]]
name = "wrong"
address = "127.0.0.1:{wrong}"
"""
        path = tmp_path / "doctor.toml"
        path.write_text(text)
        yield {"path": path, "dns": dns, "dead_dns": dead_dns, "good": good}


def test_each_server_names_its_cause_and_the_verdicts(world: dict[str, Any]) -> None:
    path: Path = world["path"]
    dns: Dnsmasq = world["dns"]
    good = world["good"]
    bound = time_bound(load_config(path))
    assert bound == 1.0

    code, out, err, wall = run_doctor(path)

    assert code == 1, (out, err)
    assert err == ""
    # The whole run within the largest timeout plus a second (plus Python's start-up).
    assert wall < bound + 1.0 + START_MARGIN, (wall, out)
    assert "ok    server healthy " in server_line(out, "healthy")
    assert "would take clients" in server_line(out, "healthy")
    assert "nothing listens there" in server_line(out, "refusing")
    assert "a firewall or an overloaded server drops the SYN" in server_line(out, "dropping")
    assert "does not exist (NXDOMAIN)" in server_line(out, f"missing.test:{good}")
    assert dns.nameserver in server_line(out, f"missing.test:{good}")
    down = server_line(out, f"db.down.test:{good}")
    assert "no nameserver answered" in down or "DNS failed" in down
    assert f"{dns.nameserver}: timeout" in down
    assert f"127.0.0.1:{world['dead_dns']}: unreachable" in down
    assert "no reply holding '+PONG'" in server_line(out, "wrong")
    # A name that resolves becomes NAME:PORT#IP, as the running lbtcp names it, and serves.
    named = server_line(out, f"app.test:{good}#127.0.0.1")
    assert "would take clients" in named
    assert f"A app.test: 127.0.0.1 (TTL 1 s) from {dns.nameserver}" in out
    # Local servers answer in well under half of every timeout: no load hint.
    assert "load:" not in out
    # No config finding either: this config is sound, only its servers are not.
    assert "config:" not in out
    # The dead nameserver is named once, at the top.
    assert f"FAIL  resolver: nameserver 127.0.0.1:{world['dead_dns']} failed" in out

    mixed = verdict_line(out, "mixed")
    assert mixed.strip().startswith("verdict: serves: 2 of 7 servers would take a client")
    broken = verdict_line(out, "broken")
    assert "would refuse: no healthy upstream, because" in broken
    for cause in (
        "refusing: connection refused: nothing listens there",
        "missing.test",
        "NXDOMAIN",
        "dropping: connect timed out",
        "wrong: probe failed",
    ):
        assert cause in broken, (cause, broken)


def test_json_carries_the_same_verdicts(world: dict[str, Any]) -> None:
    code, out, err, _wall = run_doctor(world["path"], "--json")
    assert code == 1, err
    data = json.loads(out)
    assert data["exit"] == 1
    verdicts = {pool["name"]: pool["verdict"] for pool in data["pools"]}
    assert verdicts == {"mixed": "serves", "broken": "would refuse"}
    broken = next(pool for pool in data["pools"] if pool["name"] == "broken")
    assert len(broken["because"]) == 4
    mixed = next(pool for pool in data["pools"] if pool["name"] == "mixed")
    results = {
        target["name"]: [check["result"] for check in target["checks"] if "result" in check]
        for server in mixed["servers"]
        for target in server["targets"]
    }
    assert results["healthy"] == ["ok", "ok"]
    assert results["refusing"][0] == "refused"
    assert results["dropping"][0] == "timeout"
    assert results["wrong"] == ["ok", "timeout"]
    nx = next(s for s in mixed["servers"] if s["entry"].startswith("missing.test"))
    assert nx["targets"] == []
    assert {f["kind"] for f in nx["dns"]} == {"nxdomain"}
    for server in mixed["servers"]:
        for target in server["targets"]:
            for check in target["checks"]:
                if check["check"] in ("connect", "probe"):
                    assert check["duration_ms"] >= 0


def test_a_config_where_every_pool_serves_exits_0(backends: Backends, tmp_path: Path) -> None:
    port = backends.echo()
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n[pools.app]\n'
        f'[[pools.app.servers]]\naddress = "127.0.0.1:{port}"\n'
    )
    code, out, _, _ = run_doctor(path)
    assert code == 0, out
    assert "verdict: serves: 1 of 1 servers" in out
    assert "every pool serves" in out


def test_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[listeners.web]\nbind = "127.0.0.1:0"\npool = "nope"\n')
    code, out, err, _ = run_doctor(path)
    assert code == 2
    assert "listeners.web.pool" in err
    assert out == ""


def test_admin_unreachable_is_one_line(backends: Backends, tmp_path: Path) -> None:
    port = backends.echo()
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n[pools.app]\n'
        f'[[pools.app.servers]]\naddress = "127.0.0.1:{port}"\n'
    )
    code, out, err, _ = run_doctor(path, "--admin", f"127.0.0.1:{closed_port()}")
    assert code == 0, out
    assert "Traceback" not in err + out
    admin_lines = [line for line in out.splitlines() if "admin:" in line]
    assert len(admin_lines) == 1
    assert "no live view" in admin_lines[0]


def test_a_hung_admin_api_does_not_hold_the_run(backends: Backends, tmp_path: Path) -> None:
    port = backends.echo()
    path = tmp_path / "ok.toml"
    path.write_text(
        f'[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n[pools.app]\n'
        f'[[pools.app.servers]]\naddress = "127.0.0.1:{port}"\n'
    )
    bound = time_bound(load_config(path))  # connect_timeout's default, 2 s
    with blackhole() as hung:
        code, out, err, wall = run_doctor(path, "--admin", f"127.0.0.1:{hung}")
    assert code == 0, out + err
    assert wall < bound + 1.0 + START_MARGIN, wall
    (line,) = [line for line in out.splitlines() if "admin:" in line]
    assert f"127.0.0.1:{hung}" in line and "no live view" in line


def test_live_view_disagreements(
    backends: Backends, start_lbtcp: StartLbtcp, tmp_path: Path
) -> None:
    a = backends.echo()
    b = backends.echo()
    text = (
        '[admin]\nlisten = "127.0.0.1:0"\n[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app]\n[pools.app.health]\ninterval = "5s"\nfast_interval = "5s"\n'
        'timeout = "1s"\nrise = 1\nfall = 3\ninitial = "healthy"\n'
        f'[[pools.app.servers]]\nname = "a"\naddress = "127.0.0.1:{a}"\n'
        f'[[pools.app.servers]]\nname = "b"\naddress = "127.0.0.1:{b}"\n'
    )
    c = backends.echo()
    backends.stop(c)  # down when lbtcp starts; it comes back below
    text += (
        '[listeners.other]\nbind = "127.0.0.1:0"\npool = "other"\n'
        '[pools.other]\n[pools.other.health]\ninterval = "100ms"\nfast_interval = "100ms"\n'
        'down_interval = "1h"\ntimeout = "1s"\nrise = 1\nfall = 1\n'
        f'[[pools.other.servers]]\nname = "c"\naddress = "127.0.0.1:{c}"\n'
    )
    proc = start_lbtcp(text)
    admin = admin_address(proc)
    proc.wait_line(r"server_state .*server=c old=\S+ new=unhealthy")
    backends.echo(c)  # answers again; the running lbtcp probes it only in an hour
    assert post(admin, "/pools/app/servers/a/drain").status == 200
    backends.stop(b)  # b refuses from now on; the running lbtcp has not probed it yet
    wait_until(lambda: not _accepts(b), 5, "b to refuse")

    code, out, err, _ = run_doctor(proc.config_path, "--admin", f"127.0.0.1:{admin[1]}")

    assert code == 1, out + err
    assert "live view from the admin API" in out
    assert "a: draining by an operator: no new sessions" in out
    # Healthy, or failing if lbtcp's first probe of b came after b stopped: it still takes
    # clients there either way.
    assert re.search(r"b: the running lbtcp still has it (healthy|failing)", out), out
    assert "connection refused" in out
    verdict = verdict_line(out, "app")
    assert "a: draining by an operator in the running lbtcp (it answers doctor)" in verdict
    assert "FAIL  server a " in pool_block(out, "app")
    assert "b: connection refused" in verdict
    assert "still serves this pool" in out
    other = pool_block(out, "other")
    assert "c: the running lbtcp has it unhealthy (last change" in other
    assert "but it answered doctor just now" in other
    assert "the running lbtcp refuses this pool's clients right now" in other
    assert verdict_line(out, "other").strip().startswith("verdict: serves")


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


# --- config checks (pure) ------------------------------------------------------------------


def findings_of(pool: PoolConfig, listeners: tuple[ListenerConfig, ...] = ()) -> set[str]:
    return {f.data.get("finding", "") for f in check_pool_config(pool, listeners)}


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_have_no_findings(example: Path) -> None:
    config = load_config(example)
    for pool in config.pools.values():
        assert check_pool_config(pool, list(config.listeners.values())) == [], pool.name


def servers(*weights: int, backup: bool = False, limit: int = 0) -> tuple[ServerConfig, ...]:
    return tuple(
        ServerConfig(f"127.0.0.1:{9000 + i}", weight=w, backup=backup, max_connections=limit)
        for i, w in enumerate(weights)
    )


def test_weight_findings() -> None:
    assert findings_of(PoolConfig("p", servers(0, 0))) == {"weights_zero"}
    assert findings_of(PoolConfig("p", servers(1, 0))) == set()
    assert findings_of(PoolConfig("p", servers(20, 1, 1))) == {"dominant_weight"}
    assert findings_of(PoolConfig("p", servers(8, 1, 1))) == set()  # 80 %: not above
    assert findings_of(PoolConfig("p", servers(20, 1))) == set()  # a pool of 2
    assert findings_of(PoolConfig("p", servers(1, 1, backup=True))) == {"only_backups"}
    mixed = (*servers(0, 0), ServerConfig("127.0.0.1:9100", backup=True))
    assert findings_of(PoolConfig("p", mixed)) == {"primary_weights_zero"}


def test_timeout_findings() -> None:
    from lbtcp.config import HealthConfig

    base = servers(1, 1)
    tight = PoolConfig("p", base, retries=2, connect_timeout=2.0, retry_budget=3.0)
    assert findings_of(tight) == {"retry_budget"}
    message = check_pool_config(tight, ())[0].message
    assert "only 2 of the 3 attempts" in message
    # The documented defaults shorten the last attempt only: by design, no finding.
    assert findings_of(PoolConfig("p", base)) == set()
    slow = PoolConfig("p", base, health=HealthConfig(interval=1.0, timeout=3.0))
    assert findings_of(slow) == {"health_timeout"}
    assert findings_of(PoolConfig("p", base, health=HealthConfig())) == set()


def test_limit_findings() -> None:
    pool = PoolConfig("p", servers(1, 1, limit=100))
    unlimited = ListenerConfig("web", ("127.0.0.1:0",), "p")
    assert findings_of(pool, (unlimited,)) == {"max_connections"}
    small = ListenerConfig("web", ("127.0.0.1:0",), "p", max_connections=200)
    assert findings_of(pool, (small,)) == set()
    big = ListenerConfig("web", ("127.0.0.1:0",), "p", max_connections=201)
    (finding,) = check_pool_config(pool, (big,))
    assert "client 201 is refused as 'no healthy upstream'" in finding.message
    assert findings_of(PoolConfig("p", servers(1, 1)), (unlimited,)) == set()


@settings(max_examples=200, deadline=None)
@given(
    weights=st.lists(st.integers(0, 256), min_size=1, max_size=8),
    backups=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_weight_findings_property(weights: list[int], backups: list[bool]) -> None:
    pool = PoolConfig(
        "p",
        tuple(
            ServerConfig(f"127.0.0.1:{9000 + i}", weight=w, backup=backups[i])
            for i, w in enumerate(weights)
        ),
    )
    found = findings_of(pool)
    assert ("weights_zero" in found) == all(w == 0 for w in weights)
    assert ("only_backups" in found) == all(backups[: len(weights)])
    primaries = [w for w, b in zip(weights, backups, strict=False) if not b]
    dominant = len(primaries) >= 3 and sum(primaries) > 0 and max(primaries) > 0.8 * sum(primaries)
    assert ("dominant_weight" in found) == dominant


class SlowPong(Pong):
    """Answers ``reply`` only after ``delay`` seconds: a server under load."""

    def __init__(self, reply: bytes, delay: float) -> None:
        super().__init__(reply)
        self.delay = delay

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        loop.call_later(self.delay, lambda: self._answer())

    def _answer(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.reply)


def test_srv_servers_and_a_load_hint(
    backends: Backends, dns_servers: DnsFactory, tmp_path: Path
) -> None:
    slow = backends.start(lambda box: SlowPong(b"+PONG\r\n", 0.7))
    refusing = closed_port()
    dns = dns_servers(
        hosts={"app.test": ["127.0.0.1"], "spare.test": ["127.0.0.2"]},
        srv_hosts=[
            f"_app._tcp.svc.test,app.test,{slow},10,5",
            f"_app._tcp.svc.test,spare.test,{refusing},20,1",
        ],
    )
    path = tmp_path / "srv.toml"
    path.write_text(
        f'[resolver]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\nfamily = "ipv4"\n'
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "svc"\n'
        '[pools.svc]\nconnect_timeout = "1s"\n'
        '[pools.svc.health]\ntimeout = "1s"\nsend = "PING\\r\\n"\nexpect = "+PONG"\n'
        '[[pools.svc.servers]]\nsrv = "_app._tcp.svc.test"\n'
    )
    code, out, err, wall = run_doctor(path)
    assert code == 0, out + err
    assert wall < 1.0 + 1.0 + START_MARGIN
    assert f"SRV _app._tcp.svc.test: app.test:{slow} (priority 10, weight 5)" in out
    assert f"spare.test:{refusing} (priority 20, weight 1)" in out
    primary = server_line(out, f"app.test:{slow}#127.0.0.1", "svc")
    assert "weight 256)" in primary and "would take clients" in primary
    spare = server_line(out, f"spare.test:{refusing}#127.0.0.2", "svc")
    assert "backup" in spare and "nothing listens there" in spare
    # The probe passed, but slowly: the load hint says how close to the timeout it was.
    hint = next(line for line in out.splitlines() if "load:" in line)
    assert "of health.timeout (1 s)" in hint and "overloaded" in hint
    assert "verdict: serves: 1 of 2 servers" in out


def test_config_admin_with_port_0_is_one_line(backends: Backends, tmp_path: Path) -> None:
    port = backends.echo()
    path = tmp_path / "admin.toml"
    path.write_text(
        '[admin]\nlisten = "127.0.0.1:0"\n'
        f'[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n[pools.app]\n'
        f'[[pools.app.servers]]\naddress = "127.0.0.1:{port}"\n'
    )
    code, out, err, _ = run_doctor(path)
    assert code == 0, out + err
    (line,) = [line for line in out.splitlines() if "admin:" in line]
    assert "port 0" in line and "--admin" in line and "no live view" in line


# --- pure pieces of the report: the verdict and the live comparison -----------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
status_servers = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.sampled_from(["a", "b", "c"]) | json_values,
            "state": st.sampled_from(["healthy", "failing", "unhealthy", "rising"]) | json_values,
            "admin": st.sampled_from(["enabled", "draining", "disabled"]) | json_values,
            "weight": st.integers(0, 256) | json_values,
            "active": json_values,
            "max_connections": json_values,
            "last_change": json_values,
        },
    ),
    max_size=4,
)


def targets_strategy() -> st.SearchStrategy[list[TargetReport]]:
    return st.lists(
        st.builds(
            TargetReport,
            name=st.sampled_from(["a", "b", "c", "d"]),
            address=st.just("127.0.0.1:1"),
            weight=st.integers(0, 3),
            backup=st.booleans(),
            checks=st.just(()),
            cause=st.sampled_from(["", "connection refused: nothing listens there"]),
        ),
        max_size=5,
        unique_by=lambda t: t.name,
    )


@settings(max_examples=300, deadline=None)
@given(targets=targets_strategy(), document=json_values | status_servers)
def test_live_comparison_never_trips_over_a_document(
    targets: list[TargetReport], document: Any
) -> None:
    """Whatever the admin API sends, the comparison gives findings, never an exception, and
    only takes out servers the document says an operator (or a limit) took out."""
    from lbtcp.doctor import _live_listeners, compare_live

    report = [ServerReport("x", "ip", (), tuple(targets))]
    pool_doc = {"name": "p", "servers": document} if isinstance(document, list) else document
    if not isinstance(pool_doc, dict):
        pool_doc = {"servers": pool_doc}
    findings, unusable = compare_live(report, pool_doc, "p")
    assert all(f.level in ("ok", "note", "warn", "fail") for f in findings)
    assert set(unusable) <= {t.name for t in targets}
    _live_listeners({"listeners": document}, "p")


@settings(max_examples=300, deadline=None)
@given(targets=targets_strategy())
def test_verdict_serves_exactly_when_some_server_would_take_a_client(
    targets: list[TargetReport],
) -> None:
    from lbtcp.doctor import _verdict

    servers_ = [ServerReport(t.name, "ip", (), (t,)) for t in targets]
    serves, sentence, because = _verdict(PoolConfig("p", ()), servers_, {})
    assert serves == any(t.usable for t in targets)
    if serves:
        assert sentence.startswith("serves") and because == ()
    else:
        assert sentence.startswith("would refuse: no healthy upstream, because ")
        assert len(because) == max(1, len(targets))
        for target in targets:
            assert f"{target.name}: {target.cause}" in sentence


class ProxyPong(asyncio.Protocol):
    """Answers ``+PONG`` only to a PING that follows a PROXY header naming no client, as a
    server behind ``accept-proxy`` checks lbtcp's probes (``health.send_proxy``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.received += data
        if self.received == b"PROXY UNKNOWN\r\nPING\r\n":
            self.transport.write(b"+PONG\r\n")
        elif not b"PROXY UNKNOWN\r\nPING\r\n".startswith(self.received):
            self.transport.write(b"-ERR no PROXY header\r\n")
            self.transport.close()


@pytest.mark.parametrize("send_proxy", [True, False])
def test_probe_sends_the_proxy_header_as_configured(
    backends: Backends, tmp_path: Path, send_proxy: bool
) -> None:
    port = backends.start(lambda box: ProxyPong())
    path = tmp_path / "proxy.toml"
    path.write_text(
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app]\nproxy_protocol = "v1"\n'
        '[pools.app.health]\ntimeout = "1s"\nsend = "PING\\r\\n"\nexpect = "+PONG"\n'
        f"send_proxy = {'true' if send_proxy else 'false'}\n"
        f'[[pools.app.servers]]\nname = "behind-proxy"\naddress = "127.0.0.1:{port}"\n'
    )
    code, out, err, _ = run_doctor(path)
    line = server_line(out, "behind-proxy", "app")
    if send_proxy:
        assert code == 0, out + err
        assert "would take clients" in line
        assert "probe passed (expect matched) (after a PROXY header" in out
    else:
        assert code == 1, out + err
        assert "closed the connection without sending '+PONG'" in line
