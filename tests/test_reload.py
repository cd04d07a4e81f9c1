"""Reload in place (SIGHUP): the pure plan, and ``lbtcp serve`` applying it end to end."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import parse_config
from lbtcp.reload import plan_reload
from tests.support import (
    REPO,
    Backends,
    Lbtcp,
    closed_port,
    open_session,
    roundtrip,
    wait_until,
)

# --- the plan (pure) ---------------------------------------------------------------------


def _config(
    servers: dict[str, int] | None = None,
    *,
    listeners: dict[str, str] | None = None,
    balance: str = "round_robin",
    workers: int = 1,
    extra_pool: dict[str, Any] | None = None,
) -> Any:
    servers = {"a": 1} if servers is None else servers
    listeners = {"web": "127.0.0.1:8080"} if listeners is None else listeners
    data: dict[str, Any] = {
        "global": {"workers": workers},
        "listeners": {name: {"bind": bind, "pool": "app"} for name, bind in listeners.items()},
        "pools": {
            "app": {
                "balance": balance,
                "servers": [
                    {"name": name, "address": f"127.0.0.1:{9000 + i}", "weight": weight}
                    for i, (name, weight) in enumerate(sorted(servers.items()))
                ],
                **(extra_pool or {}),
            }
        },
    }
    return parse_config(data, "test.toml")


def test_plan_of_the_same_config_changes_nothing() -> None:
    config = _config({"a": 1, "b": 2})
    plan = plan_reload(config, config)
    assert plan.summary() == "listeners +0 -0 ~0, servers +0 -0 ~0"
    assert plan.binds_to_open() == []
    assert not plan.restart_needed


def test_plan_counts_listeners_servers_and_weights() -> None:
    old = _config({"a": 1, "b": 1}, listeners={"web": "127.0.0.1:8080", "old": "127.0.0.1:81"})
    new = _config(
        {"a": 5, "c": 1, "d": 1},
        listeners={"web": "127.0.0.1:8081", "api": "127.0.0.1:82"},
        balance="source_hash",
    )
    plan = plan_reload(old, new)
    assert plan.summary() == "listeners +1 -1 ~1, servers +2 -1 ~1"
    assert plan.listeners_added == ("api",)
    assert plan.listeners_removed == ("old",)
    (web,) = plan.listeners_changed
    assert (web.add_binds, web.remove_binds, web.settings_changed) == (
        ("127.0.0.1:8081",),
        ("127.0.0.1:8080",),
        False,
    )
    assert set(plan.binds_to_open()) == {("api", "127.0.0.1:82"), ("web", "127.0.0.1:8081")}
    (pool,) = plan.pools_changed
    assert pool.balancer_changed
    assert pool.weights == {"a": 5}


def test_a_new_address_under_the_same_name_is_another_server() -> None:
    old = _config({"a": 1})
    data = {
        "listeners": {"web": {"bind": "127.0.0.1:8080", "pool": "app"}},
        "pools": {"app": {"servers": [{"name": "a", "address": "127.0.0.1:7777"}]}},
    }
    plan = plan_reload(old, parse_config(data))
    (pool,) = plan.pools_changed
    assert (pool.servers_added, pool.servers_removed) == (("a",), ("a",))


def test_workers_need_a_restart_and_keep_their_old_value() -> None:
    old = _config()
    # workers > 1 is not accepted by this version's config: build the new one by hand.
    new = dataclasses.replace(old, global_=dataclasses.replace(old.global_, workers=4))
    plan = plan_reload(old, new)
    assert plan.effective.global_.workers == 1
    assert len(plan.restart_needed) == 1
    assert "global.workers" in plan.restart_needed[0]


server_sets = st.dictionaries(
    st.sampled_from([f"s{i}" for i in range(8)]), st.integers(0, 5), max_size=8
)


@settings(max_examples=200, deadline=None)
@given(server_sets, server_sets)
def test_plan_server_diff_matches_the_sets(
    old_servers: dict[str, int], new_servers: dict[str, int]
) -> None:
    old_servers = old_servers or {"s0": 1}
    new_servers = new_servers or {"s0": 1}
    # Addresses follow the sorted order: the same name may land on another address, which
    # makes it another server; compute what the plan must say from the addresses.
    old_cfg, new_cfg = _config(old_servers), _config(new_servers)
    old_addr = {s.name: s.address for s in old_cfg.pools["app"].servers}
    new_addr = {s.name: s.address for s in new_cfg.pools["app"].servers}
    plan = plan_reload(old_cfg, new_cfg)
    (pool,) = plan.pools_changed
    stays = {n for n in new_addr if old_addr.get(n) == new_addr[n]}
    assert set(pool.servers_added) == set(new_addr) - stays
    assert set(pool.servers_removed) == set(old_addr) - stays
    assert set(pool.servers_changed) == {n for n in stays if old_servers[n] != new_servers[n]}
    assert pool.weights == {n: new_servers[n] for n in stays if old_servers[n] != new_servers[n]}
    counts = plan.counts()
    assert counts["servers_added"] == len(new_addr) - len(stays)
    assert counts["servers_removed"] == len(old_addr) - len(stays)


listener_sets = st.dictionaries(
    st.sampled_from(["web", "api", "db", "ops"]),
    st.sets(st.integers(8000, 8005), min_size=1, max_size=3),
    min_size=1,
    max_size=4,
)


def _with_listeners(listeners: dict[str, set[int]]) -> Any:
    data: dict[str, Any] = {
        "listeners": {
            name: {"bind": [f"127.0.0.1:{port}" for port in sorted(ports)], "pool": "app"}
            for name, ports in listeners.items()
        },
        "pools": {"app": {"servers": [{"address": "127.0.0.1:9000"}]}},
    }
    # Two listeners may not share an address in one file: keep the first one's.
    seen: set[str] = set()
    for table in data["listeners"].values():
        table["bind"] = [b for b in table["bind"] if b not in seen] or ["127.0.0.1:0"]
        seen.update(b for b in table["bind"] if not b.endswith(":0"))
    return parse_config(data)


@settings(max_examples=200, deadline=None)
@given(listener_sets, listener_sets)
def test_plan_opens_exactly_the_new_binds(
    old_listeners: dict[str, set[int]], new_listeners: dict[str, set[int]]
) -> None:
    old, new = _with_listeners(old_listeners), _with_listeners(new_listeners)
    plan = plan_reload(old, new)
    expected = {
        (name, bind)
        for name, listener in new.listeners.items()
        for bind in listener.bind
        if name not in old.listeners or bind not in old.listeners[name].bind
    }
    assert set(plan.binds_to_open()) == expected
    closed = {(c.name, b) for c in plan.listeners_changed for b in c.remove_binds}
    assert closed == {
        (name, bind)
        for name, listener in old.listeners.items()
        if name in new.listeners
        for bind in listener.bind
        if bind not in new.listeners[name].bind
    }
    assert set(plan.listeners_removed) == set(old.listeners) - set(new.listeners)
    assert set(plan.listeners_added) == set(new.listeners) - set(old.listeners)


# --- end to end --------------------------------------------------------------------------


def _lbtcp_config(
    servers: list[int] | dict[str, int],
    *,
    listeners: dict[str, str] | None = None,
    balance: str = "round_robin",
    pool_extra: str = "",
    health: str = "",
    global_extra: str = "",
) -> str:
    """A config with listeners (name -> bind) on one pool; servers named by port, or given
    as name -> port."""
    listeners = {"web": "127.0.0.1:0"} if listeners is None else listeners
    named = servers if isinstance(servers, dict) else {str(p): p for p in servers}
    lines = ["[global]", global_extra]
    for name, bind in listeners.items():
        lines += [f"[listeners.{name}]", f'bind = "{bind}"', 'pool = "app"']
    lines += ["[pools.app]", f'balance = "{balance}"', "retries = 0", pool_extra]
    for name, port in named.items():
        lines += ["[[pools.app.servers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"']
    if health:
        lines += ["[pools.app.health]", health]
    return "\n".join(lines) + "\n"


def _spread(backends: Backends, address: tuple[str, int], count: int) -> Counter[int]:
    """Which backend ports ``count`` fresh sessions reached (every one must be echoed)."""
    before = Counter(backends.accepted)
    for i in range(count):
        payload = f"hello {i}".encode()
        assert roundtrip(address, payload) == payload
    after = Counter(backends.accepted)
    after.subtract(before)
    return +after


def test_reload_adds_and_removes_servers_without_cutting_sessions(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b, c = backends.echo(), backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a, b]))
    address = lbtcp.address()
    assert set(_spread(backends, address, 4)) == {a, b}
    live = [open_session(address, f"live {i}".encode()) for i in range(4)]

    line = lbtcp.reload(_lbtcp_config([a, c]))
    assert "listeners +0 -0 ~0, servers +1 -1 ~0" in line
    assert set(_spread(backends, address, 6)) == {a, c}
    lbtcp.wait_line(r"server_state .*server=" + str(b) + r" .*new=removed")
    # Sessions opened before the reload (to a and to the removed b) are still spliced.
    for i, sock in enumerate(live):
        payload = f"still here {i}".encode() * 100
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk, "a live session was cut by the reload"
            got += chunk
        assert got == payload
        sock.close()


def test_reload_changes_weight_and_balancer(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a, b]))
    address = lbtcp.address()
    assert _spread(backends, address, 10) == Counter({a: 5, b: 5})
    weighted = _lbtcp_config([a, b]).replace(
        f'address = "127.0.0.1:{a}"', f'address = "127.0.0.1:{a}"\nweight = 4'
    )
    line = lbtcp.reload(weighted)
    assert "servers +0 -0 ~1" in line
    assert _spread(backends, address, 10) == Counter({a: 8, b: 2})
    # source_hash: every client from 127.0.0.1 lands on the same server.
    line = lbtcp.reload(weighted.replace('"round_robin"', '"source_hash"'))
    assert "listeners +0 -0 ~0, servers +0 -0 ~0" in line
    assert "pools_changed=1" in line
    assert len(_spread(backends, address, 10)) == 1


def test_reload_adds_and_removes_listeners(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a = backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a]))
    web = lbtcp.address("web")
    live = open_session(web, b"before")

    line = lbtcp.reload(_lbtcp_config([a], listeners={"api": "127.0.0.1:0"}))
    assert "listeners +1 -1 ~0" in line
    api = lbtcp.address("api")
    assert roundtrip(api, b"via api") == b"via api"
    lbtcp.wait_line(r"listener_removed .*listener=web")
    # The removed listener accepts no one any more...
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(web, timeout=2).close()
    # ...but its live session drains: still spliced, byte exact, and ends normally.
    live.sendall(b"after the reload")
    assert live.recv(100) == b"after the reload"
    live.shutdown(socket.SHUT_WR)
    assert live.recv(100) == b""
    live.close()
    lbtcp.wait_line(r"access .*listener=web .*term=--")


def test_renamed_listener_keeps_its_fixed_port(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    """A bind moving from one listener to another is handed over, not refused as in use."""
    a = backends.echo()
    port = closed_port()
    lbtcp = start_lbtcp(_lbtcp_config([a], listeners={"web": f"127.0.0.1:{port}"}))
    assert roundtrip(("127.0.0.1", port), b"x") == b"x"
    line = lbtcp.reload(_lbtcp_config([a], listeners={"www": f"127.0.0.1:{port}"}))
    assert "listeners +1 -1 ~0" in line
    for i in range(5):
        assert roundtrip(("127.0.0.1", port), b"y%d" % i) == b"y%d" % i
    wait_until(lambda: bool(lbtcp.matching(r"access .*listener=www")), what="www served")


def test_servers_that_stay_keep_their_health_state(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    """An unhealthy server stays unhealthy across a reload (it is not re-added as new)."""
    a, b = backends.echo(), backends.echo()
    down = closed_port()
    health = 'interval = "100ms"\nfast_interval = "50ms"\nrise = 1\nfall = 1\ninitial = "healthy"'
    servers = {"a": a, "down": down}
    lbtcp = start_lbtcp(_lbtcp_config(servers, health=health))
    lbtcp.wait_line(r"server_state .*server=down .*new=unhealthy")
    address = lbtcp.address()
    assert set(_spread(backends, address, 4)) == {a}
    start = len(lbtcp.lines)
    line = lbtcp.reload(_lbtcp_config({**servers, "b": b}, health=health))
    assert "servers +1 -0 ~0" in line
    # retries = 0: a client sent to "down" would be refused; every one is served by a or b.
    assert set(_spread(backends, address, 10)) == {a, b}
    assert not [x for x in lbtcp.lines[start:] if re.search(r"server=down .*new=", x)]


def test_invalid_file_changes_nothing_and_reports_every_error(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a]))
    address = lbtcp.address()
    bad = _lbtcp_config([a, b]).replace('"round_robin"', '"nope"').replace("= 0", "= -1")
    bad = "[typo]\nx = 1\n" + bad
    line = lbtcp.reload(bad)
    assert "reload_failed" in line
    assert "errors=3" in line
    errors = lbtcp.matching(r"reload_error ")
    assert any("pools.app.balance" in e for e in errors)
    assert any("pools.app.retries" in e for e in errors)
    assert any("typo" in e for e in errors)
    # The running config is untouched: b (only in the bad file) gets nothing.
    assert set(_spread(backends, address, 4)) == {a}
    # A later valid file applies.
    assert "servers +1 -0 ~0" in lbtcp.reload(_lbtcp_config([a, b]))
    assert set(_spread(backends, address, 4)) == {a, b}


def test_a_bind_conflict_refuses_the_whole_reload(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a]))
    address = lbtcp.address()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        line = lbtcp.reload(
            _lbtcp_config([a, b], listeners={"web": "127.0.0.1:0", "api": f"127.0.0.1:{port}"})
        )
        assert "reload_failed" in line
        (error,) = lbtcp.matching(r"reload_error ")
        assert f"listeners.api.bind: 127.0.0.1:{port}" in error
        assert "in use" in error
        # Nothing of that file was applied: no new server, no api listener.
        assert set(_spread(backends, address, 4)) == {a}
        assert not lbtcp.matching(r"listening listener=api")
    finally:
        taken.close()


def test_check_and_reload_of_the_example_units_config(tmp_path: Path) -> None:
    """``lbtcp check`` accepts user/group/shutdown_grace and fd: binds (the unit files use
    ExecStartPre=lbtcp check and ExecReload=lbtcp check)."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[global]\nuser = "nobody"\nshutdown_grace = "2s"\n'
        '[listeners.web]\nbind = ["fd:web", "127.0.0.1:0"]\npool = "app"\n'
        '[pools.app]\n[[pools.app.servers]]\naddress = "127.0.0.1:1"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "lbtcp", "check", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_reload_under_load_loses_nothing(tmp_path: Path) -> None:
    """benchmarks/reload_under_load.py for 5 s (the 30 s run is the benchmark): a reload
    every 250 ms while lbtcp bench runs rr and connect loads."""
    out = tmp_path / "result.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "reload_under_load.py"),
            "--duration",
            "5",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    result = json.loads(out.read_text())
    assert result["failures"] == [], done.stdout + done.stderr
    assert done.returncode == 0
    assert result["reloads"]["failed"] == 0
    assert result["reloads"]["ok"] >= 12  # about 20 in 5 s; fewer only on a crowded machine
    for mode in ("rr", "connect"):
        assert result[mode]["errors_total"] == 0, result[mode]
        assert result[mode]["requests"] > 100, result[mode]
    assert result["long_lived"]["alive_at_end"] == result["long_lived"]["sessions"]
    assert result["long_lived"]["byte_exact"]
    assert result["lbtcp_exit_code"] == 0


def test_reload_watches_and_unwatches_dns_names(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp], dns_servers: Any
) -> None:
    from tests.dns_server import DOMAIN

    a, b = backends.echo(), backends.echo()
    dns = dns_servers(hosts={f"app.{DOMAIN}": ["127.0.0.1"]})
    resolver = f'[resolver]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\nfamily = "ipv4"\n'
    lbtcp = start_lbtcp(_lbtcp_config([a]) + resolver)
    address = lbtcp.address()
    by_name = f'[[pools.app.servers]]\nname = "named"\naddress = "app.{DOMAIN}:{b}"\n'
    line = lbtcp.reload(_lbtcp_config([a]) + by_name + resolver)
    assert "servers +1 -0 ~0" in line
    wait_until(lambda: b in _spread(backends, address, 2), what="the name's server in use")
    assert set(_spread(backends, address, 6)) == {a, b}
    # The name leaves the file: its server is removed (no new sessions), the name unwatched.
    line = lbtcp.reload(_lbtcp_config([a]) + resolver)
    assert "servers +0 -1 ~0" in line
    lbtcp.wait_line(r"server_state .*server=named#127.0.0.1 .*new=removed")
    assert set(_spread(backends, address, 6)) == {a}


def test_reload_of_health_settings(backends: Backends, start_lbtcp: Callable[..., Lbtcp]) -> None:
    """Probes added by a reload find a dead server; probes removed bring it back in."""
    a = backends.echo()
    dead = closed_port()
    servers = {"a": a, "dead": dead}
    lbtcp = start_lbtcp(_lbtcp_config(servers))
    health = 'interval = "100ms"\nfast_interval = "50ms"\nfall = 1\ninitial = "healthy"'
    line = lbtcp.reload(_lbtcp_config(servers, health=health))
    assert "pools_changed=1" in line
    lbtcp.wait_line(r"server_state .*server=dead .*new=unhealthy")
    start = len(lbtcp.lines)
    lbtcp.reload(_lbtcp_config(servers))
    lbtcp.wait_line(r"server_state .*server=dead .*new=healthy", start=start)
    assert lbtcp.matching(r"probes removed.* server=dead ")


def test_a_listener_moved_to_a_new_pool_and_the_old_pool_removed(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a]))
    address = lbtcp.address()
    live = open_session(address, b"on the old pool")
    moved = (
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "new"\n'
        f'[pools.new]\nbalance = "random"\n[[pools.new.servers]]\naddress = "127.0.0.1:{b}"\n'
    )
    line = lbtcp.reload(moved)
    assert "listeners +0 -0 ~1, servers +1 -1 ~0" in line
    assert "pools_added=1 pools_removed=1" in line
    lbtcp.wait_line(r"server_state .*reload: pool removed.* pool=app ")
    assert set(_spread(backends, address, 5)) == {b}
    live.sendall(b"still relayed")
    assert live.recv(100) == b"still relayed"
    live.close()
    lbtcp.wait_line(r"access .*pool=(app|new) server=" + str(a) + " .*term=--")


def test_reload_line_in_json_and_a_log_format_change_applies_at_once(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    a, b = backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a], global_extra='log_format = "json"'))
    line = lbtcp.reload(_lbtcp_config([a, b], global_extra='log_format = "json"'))
    record = json.loads(line)
    assert record["kind"] == "reload"
    assert record["summary"] == "listeners +0 -0 ~0, servers +1 -0 ~0"
    assert record["servers_added"] == 1
    # Back to text: the next lines are text at once.
    line = lbtcp.reload(_lbtcp_config([a, b]))
    assert line.split()[1] == "reload"
    assert 'summary="listeners +0 -0 ~0, servers +0 -0 ~0"' in line


def test_reload_turns_proxy_headers_on_for_the_listener_that_stays(
    backends: Backends, start_lbtcp: Callable[..., Lbtcp]
) -> None:
    """The listener's socket stays; the next client is read as PROXY v1 at once."""
    a = backends.echo()
    lbtcp = start_lbtcp(_lbtcp_config([a]))
    address = lbtcp.address()
    header = b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 80\r\n"
    # Off: the header is just bytes, echoed back.
    assert roundtrip(address, header + b"data") == header + b"data"
    text = _lbtcp_config([a]).replace(
        'pool = "app"',
        'pool = "app"\nproxy_protocol = "v1"\nproxy_protocol_from = ["127.0.0.1/32"]',
    )
    assert "listeners +0 -0 ~1" in lbtcp.reload(text)
    assert lbtcp.address() == address
    assert roundtrip(address, header + b"data") == b"data"
    lbtcp.wait_line(r"access .*client=192.0.2.7:40001 ")
    # And off again.
    assert "listeners +0 -0 ~1" in lbtcp.reload(_lbtcp_config([a]))
    assert roundtrip(address, header + b"data") == header + b"data"
