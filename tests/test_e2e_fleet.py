"""The fleet against a real etcd: three ``lbtcp serve`` nodes sharing one prefix (issue 14)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_support import CuttableProxy, Etcd, make_certs, running_etcd
from tests.support import Backends, Lbtcp, closed_port, open_session, roundtrip, wait_until


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    with running_etcd(tmp_path) as server:
        yield server


def node_config(
    etcd_url: str,
    node: str,
    servers: dict[str, int],
    *,
    balance: str = "round_robin",
    health: bool = False,
    lease_ttl: str = "10s",
) -> str:
    lines = [
        "[global]",
        "[admin]",
        'listen = "127.0.0.1:0"',
        "[fleet]",
        f'etcd = ["{etcd_url}"]',
        f'node = "{node}"',
        'timeout = "1s"',
        f'lease_ttl = "{lease_ttl}"',
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        "[pools.app]",
        f'balance = "{balance}"',
    ]
    if health:
        lines += [
            "[pools.app.health]",
            'interval = "200ms"',
            'fast_interval = "100ms"',
            'down_interval = "200ms"',
            'timeout = "200ms"',
            "rise = 1",
            "fall = 1",
            'initial = "healthy"',
        ]
    for name, port in servers.items():
        lines += ["[[pools.app.servers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"']
    return "\n".join(lines) + "\n"


def start_nodes(tmp_path: Path, configs: dict[str, str], started: list[Lbtcp]) -> dict[str, Lbtcp]:
    nodes = {}
    for name, text in configs.items():
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        node = Lbtcp(text, folder)
        started.append(node)
        nodes[name] = node
    return nodes


@pytest.fixture
def started() -> Iterator[list[Lbtcp]]:
    procs: list[Lbtcp] = []
    yield procs
    for proc in procs:
        proc.stop()


def lbtcp_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lbtcp", *args], capture_output=True, text=True, timeout=30
    )


def served_by(node: Lbtcp, count: int) -> list[str]:
    """Open ``count`` sessions through ``node``; the server each went to (from its access log
    lines, which name the server)."""
    before = len(node.matching(r"\baccess\b"))
    address = node.address()
    for index in range(count):
        payload = f"probe {index}".encode()
        assert roundtrip(address, payload) == payload
    wait_until(lambda: len(node.matching(r"\baccess\b")) >= before + count, 5, "access lines")
    lines = node.matching(r"\baccess\b")[before : before + count]
    return [re.search(r"\bserver=(\S+)", line).group(1) for line in lines]  # type: ignore[union-attr]


def test_drain_and_enable_fleet_reach_every_node_within_1s(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    configs = {n: node_config(etcd.url, n, servers) for n in ("a", "b", "c")}
    nodes = start_nodes(tmp_path, configs, started)
    for node in nodes.values():
        node.wait_line("fleet_connected")
        assert sorted(set(served_by(node, 4))) == ["s1", "s2"]
    # A live session on s1 through every node (round robin: one of two lands there).
    live: list[socket.socket] = []
    for node in nodes.values():
        live += [open_session(node.address()) for _ in range(2)]
    marks = {name: len(node.lines) for name, node in nodes.items()}
    done = lbtcp_cli("drain", "app", "s1", "--fleet", "-c", str(tmp_path / "a" / "lbtcp.toml"))
    returned = time.monotonic()
    assert done.returncode == 0, done.stderr
    assert re.search(r"etcd revision \d+", done.stdout), done.stdout
    for name, node in nodes.items():
        node.wait_line(r"server_state.*server=s1.*draining", 1.0, start=marks[name])
    assert time.monotonic() - returned < 1.0
    for node in nodes.values():
        assert set(served_by(node, 6)) == {"s2"}
    # The sessions opened before the drain still carry bytes both ways, byte exact.
    for sock in live:
        payload = bytes(range(256)) * 64
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        assert got == payload
        sock.close()
    marks = {name: len(node.lines) for name, node in nodes.items()}
    done = lbtcp_cli("enable", "app", "s1", "--fleet", "-c", str(tmp_path / "b" / "lbtcp.toml"))
    assert done.returncode == 0, done.stderr
    returned = time.monotonic()
    for name, node in nodes.items():
        node.wait_line(r"server_state.*server=s1", 1.0, start=marks[name])
    assert time.monotonic() - returned < 1.0
    for node in nodes.values():
        assert sorted(set(served_by(node, 4))) == ["s1", "s2"]


def roundtrip_from(source_ip: str, address: tuple[str, int], payload: bytes) -> bytes:
    """A round trip from a chosen loopback address (127.0.0.0/8 is all local on Linux), so
    that ``source_hash`` sees distinct clients."""
    with socket.create_connection(address, timeout=5, source_address=(source_ip, 0)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


CLIENT_IPS = [f"127.0.{i}.{j}" for i in (1, 2) for j in range(2, 14)]


def mapping(node: Lbtcp) -> dict[str, str]:
    """client IP -> the server that ``node`` sends it to (from the access log)."""
    before = len(node.matching(r"\baccess\b"))
    for ip in CLIENT_IPS:
        assert roundtrip_from(ip, node.address(), ip.encode()) == ip.encode()
    want = before + len(CLIENT_IPS)
    wait_until(lambda: len(node.matching(r"\baccess\b")) >= want, 5, "access lines")
    out = {}
    for line in node.matching(r"\baccess\b")[before:want]:
        client = re.search(r"\bclient=\[?([0-9.]+)", line)
        server = re.search(r"\bserver=(\S+)", line)
        assert client and server, line
        out[client.group(1)] = server.group(1)
    assert sorted(out) == sorted(CLIENT_IPS)
    return out


def test_server_added_with_etcdctl_joins_every_node_and_source_hash_agrees(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    configs = {n: node_config(etcd.url, n, servers, balance="source_hash") for n in "abc"}
    nodes = start_nodes(tmp_path, configs, started)
    for node in nodes.values():
        node.wait_line("fleet_connected")
    before = [mapping(node) for node in nodes.values()]
    assert before[0] == before[1] == before[2]
    assert set(before[0].values()) == {"s1", "s2"}
    marks = {name: len(node.lines) for name, node in nodes.items()}
    extra = backends.echo()
    etcd.ctl("put", "/lbtcp/pools/app/servers/s3", json.dumps({"address": f"127.0.0.1:{extra}"}))
    returned = time.monotonic()
    for name, node in nodes.items():
        node.wait_line(r"fleet_update.*servers/s3", 1.0, start=marks[name])
    assert time.monotonic() - returned < 1.0
    after = [mapping(node) for node in nodes.values()]
    assert after[0] == after[1] == after[2]
    assert set(after[0].values()) == {"s1", "s2", "s3"}
    # A live session on s3, then s3 leaves etcd: it drains out, the session goes on.
    s3_client = next(ip for ip, server in after[0].items() if server == "s3")
    live = socket.create_connection(nodes["a"].address(), timeout=5, source_address=(s3_client, 0))
    live.sendall(b"hello")
    assert live.recv(5) == b"hello"
    marks = {name: len(node.lines) for name, node in nodes.items()}
    etcd.ctl("del", "/lbtcp/pools/app/servers/s3")
    for name, node in nodes.items():
        node.wait_line(r"server_state.*server=s3.*removed", 1.0, start=marks[name])
    final = [mapping(node) for node in nodes.values()]
    assert final[0] == final[1] == final[2] == before[0]
    live.sendall(b"still there")
    assert live.recv(11) == b"still there"
    live.close()


def metric(node: Lbtcp, name: str) -> float:
    admin = node.wait_line(r"admin_listening")
    match = re.search(r"address=(\S+)", admin)
    assert match, admin
    host, port = match.group(1).rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := sock.recv(65536):
            body += chunk
    for line in body.decode().splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


def test_garbage_under_the_prefix_is_logged_with_its_key_and_ignored(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    etcd.ctl("put", "/lbtcp/overrides/app/s1", '{"admin": "drain"}')
    node = start_nodes(tmp_path, {"a": node_config(etcd.url, "a", servers)}, started)["a"]
    node.wait_line("fleet_connected")
    assert set(served_by(node, 4)) == {"s2"}  # the valid override applied at the listing
    garbage = {
        "/lbtcp/overrides/app/s1": "{not json",  # over a valid value: the valid one stays
        "/lbtcp/overrides/app/s2": '{"weight": 9000}',
        "/lbtcp/pools/app/servers/s9": '{"address": "127.0.0.1:1", "colour": "red"}',
        "/lbtcp/whatever": '{"a": 1}',
    }
    mark = len(node.lines)
    for key, value in garbage.items():
        etcd.ctl("put", key, value)
    for key in garbage:
        node.wait_line(rf"fleet_invalid.*key={re.escape(key)}$", 2.0, start=mark)
    extra = backends.echo()
    etcd.ctl("put", "/lbtcp/pools/app/servers/s3", json.dumps({"address": f"127.0.0.1:{extra}"}))
    node.wait_line(r"fleet_update.*servers/s3", 1.0, start=mark)
    assert set(served_by(node, 6)) == {"s2", "s3"}  # s1 still drained, s9 never joined
    assert metric(node, 'lbtcp_fleet_updates_total{result="invalid"}') == 4
    assert metric(node, "lbtcp_fleet_connected") == 1
    # The revision of the last desired-state change (not of the registry's own writes).
    answer = json.loads(etcd.ctl("get", "/lbtcp/pools/app/servers/s3", "-w", "json"))
    assert metric(node, "lbtcp_fleet_revision") == int(answer["kvs"][0]["mod_revision"])


def test_status_fleet_names_the_disagreeing_node_and_dead_nodes_leave_the_registry(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    good = {"s1": backends.echo(), "s2": backends.echo()}
    # Node c's own config sends s1 to a closed port: s1 is down from c only.
    blocked = {"s1": closed_port(), "s2": good["s2"]}
    configs = {
        "a": node_config(etcd.url, "a", good, health=True, lease_ttl="3s"),
        "b": node_config(etcd.url, "b", good, health=True, lease_ttl="3s"),
        "c": node_config(etcd.url, "c", blocked, health=True, lease_ttl="3s"),
    }
    nodes = start_nodes(tmp_path, configs, started)
    nodes["c"].wait_line(r"server_state.*server=s1.*unhealthy")
    config_path = str(tmp_path / "a" / "lbtcp.toml")

    def status() -> dict[str, object]:
        done = lbtcp_cli("status", "--fleet", "--json", "-c", config_path)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)  # type: ignore[no-any-return]

    wait_until(lambda: len(status()["disagreements"]) == 1, 5, "c's verdict in the registry")
    document = status()
    assert sorted(document["nodes"]) == ["a", "b", "c"]  # type: ignore[call-overload]
    (item,) = document["disagreements"]  # type: ignore[misc]
    assert (item["pool"], item["server"]) == ("app", "s1")
    assert item["summary"] == "down from node c only"
    text = lbtcp_cli("status", "--fleet", "-c", config_path)
    assert "app/s1: down from node c only" in text.stdout

    # Updated on change, not per probe: over 5 probe intervals with no verdict changing,
    # no node rewrites its entry.
    def mod_revisions() -> dict[str, int]:
        answer = json.loads(etcd.ctl("get", "--prefix", "/lbtcp/nodes/", "-w", "json"))
        return {kv["key"]: kv["mod_revision"] for kv in answer["kvs"]}

    before = mod_revisions()
    time.sleep(1.0)  # the time window observed, not a wait for something to start
    assert mod_revisions() == before
    # Nodes do not watch each other's registry entries (only desired state): a's revision
    # is still that of its listing, from before b and c wrote theirs.
    current = int(json.loads(etcd.ctl("get", "/x", "-w", "json"))["header"]["revision"])
    newest_entry = max(before.values())
    assert metric(nodes["a"], "lbtcp_fleet_revision") < int(newest_entry) <= current
    # kill -9: the entry stays until its lease (3 s) expires, then goes.
    nodes["c"].proc.kill()
    killed = time.monotonic()
    assert "/lbtcp/nodes/c" in etcd.get_prefix("/lbtcp/nodes/")
    wait_until(lambda: "/lbtcp/nodes/c" not in etcd.get_prefix("/lbtcp/nodes/"), 6, "expiry")
    assert time.monotonic() - killed <= 3 + 1.5  # the TTL, plus etcd's expiry sweep
    # SIGTERM revokes the lease: gone at once.
    nodes["b"].signal(15)
    assert nodes["b"].wait(15) == 0
    assert "/lbtcp/nodes/b" not in etcd.get_prefix("/lbtcp/nodes/")
    assert sorted(status()["nodes"]) == ["a"]  # type: ignore[call-overload]


def test_etcd_down_for_10s_under_load_fails_no_session_and_says_so_once(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    etcd.ctl("put", "/lbtcp/overrides/app/s2", '{"weight": 3}')
    configs = {n: node_config(etcd.url, n, servers) for n in "abc"}
    nodes = start_nodes(tmp_path, configs, started)
    for node in nodes.values():
        node.wait_line("fleet_connected")
    failures: list[str] = []
    done_sessions = [0]
    stop = threading.Event()

    def load() -> None:
        addresses = [node.address() for node in nodes.values()]
        deadline = time.monotonic() + 40  # bounded in time and in count
        for index in range(200_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            payload = f"session {index}".encode()
            try:
                got = roundtrip(addresses[index % 3], payload)
            except OSError as exc:
                failures.append(repr(exc))
                continue
            if got != payload:
                failures.append(f"session {index}: {got!r}")
            done_sessions[0] += 1
            time.sleep(0.005)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        etcd.kill()
        for node in nodes.values():
            node.wait_line("fleet_unreachable.*keeping the last desired state", 5)
        # While etcd is away a new node starts: it serves its file.
        folder = tmp_path / "d"
        folder.mkdir()
        late = Lbtcp(node_config(etcd.url, "d", servers), folder)
        started.append(late)
        late.wait_line("fleet_unreachable.*unreachable at start: serving the config file")
        payload = b"from the file"
        assert roundtrip(late.address(), payload) == payload
        time.sleep(10)  # the outage itself: what is measured is the time etcd stays away
        etcd.start()
        for node in [*nodes.values(), late]:
            node.wait_line("fleet_connected.*reachable again", 5)
    finally:
        stop.set()
        worker.join(30)
    assert failures == []
    assert done_sessions[0] > 100
    for node in [*nodes.values(), late]:
        assert len(node.matching("fleet_unreachable")) == 1
        assert len(node.matching("reachable again")) == 1
    # Resynchronised: the fleet's weight kept throughout; a new change reaches every node.
    marks = {name: len(node.lines) for name, node in nodes.items()}
    etcd.ctl("put", "/lbtcp/overrides/app/s1", '{"admin": "drain"}')
    for name, node in nodes.items():
        node.wait_line(r"server_state.*server=s1.*draining", 1.0, start=marks[name])
    late.wait_line(r"server_state.*server=s1.*draining", 1.0)


def test_a_node_cut_off_from_etcd_resumes_its_watch_or_lists_again_after_compaction(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    proxy = CuttableProxy(etcd.client_port)
    try:
        node = start_nodes(tmp_path, {"a": node_config(proxy.url, "a", servers)}, started)["a"]
        node.wait_line("fleet_connected")
        # Cut, change, restore: the watch resumes from the last revision it saw.
        proxy.cut()
        node.wait_line("fleet_unreachable.*keeping the last desired state", 5)
        etcd.ctl("put", "/lbtcp/overrides/app/s1", '{"admin": "drain"}')
        assert set(served_by(node, 4)) == {"s1", "s2"}  # nothing reached it yet
        mark = len(node.lines)
        proxy.restore()
        node.wait_line('reachable again.*how="?watch resumed', 5, start=mark)
        node.wait_line(r"server_state.*server=s1.*draining", 2, start=mark)
        assert set(served_by(node, 4)) == {"s2"}
        assert not node.matching("fleet_relist")
        # Cut again; meanwhile the override is deleted and etcd compacts past it: the watch
        # cannot resume, the node lists again and sees the deletion.
        proxy.cut()
        node.wait_line("fleet_unreachable", 5, start=mark)
        etcd.ctl("del", "/lbtcp/overrides/app/s1")
        etcd.ctl("put", "/lbtcp/unrelated/x", "1")  # (invalid, logged: another revision)
        revision = int(json.loads(etcd.ctl("get", "/x", "-w", "json"))["header"]["revision"])
        etcd.ctl("compaction", str(revision))
        mark = len(node.lines)
        proxy.restore()
        node.wait_line("fleet_relist", 5, start=mark)
        node.wait_line("reachable again", 5, start=mark)
        node.wait_line(r"server_state.*server=s1", 2, start=mark)
        assert sorted(set(served_by(node, 4))) == ["s1", "s2"]
        assert len(node.matching("fleet_unreachable")) == 2  # once per outage
    finally:
        proxy.close()


def test_local_and_fleet_precedence_stricter_admin_local_weight_wins(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    node = start_nodes(tmp_path, {"a": node_config(etcd.url, "a", servers)}, started)["a"]
    node.wait_line("fleet_connected")
    config_path = str(tmp_path / "a" / "lbtcp.toml")
    admin = re.search(r"address=(\S+)", node.wait_line("admin_listening")).group(1)  # type: ignore[union-attr]

    def view() -> dict[str, tuple[str, int]]:
        done = lbtcp_cli("status", "--json", "--admin", admin)
        assert done.returncode == 0, done.stderr
        pools = json.loads(done.stdout)["pools"]
        pool = pools["app"] if isinstance(pools, dict) else pools[0]
        return {s["name"]: (s["state"], s["weight"]) for s in pool["servers"]}

    def fleet(*args: str) -> None:
        done = lbtcp_cli(*args, "--fleet", "-c", config_path)
        assert done.returncode == 0, done.stderr

    # Local drain, fleet enable: the stricter (draining) stays.
    assert lbtcp_cli("drain", "app", "s1", "--admin", admin).returncode == 0
    mark = len(node.lines)
    fleet("enable", "app", "s1")
    node.wait_line("fleet_update.*overrides/app/s1", 2, start=mark)
    assert view()["s1"][0] == "draining"
    # Fleet disable, local enable: still disabled.
    mark = len(node.lines)
    fleet("disable", "app", "s2")
    node.wait_line("fleet_update.*overrides/app/s2", 2, start=mark)
    assert lbtcp_cli("enable", "app", "s2", "--admin", admin).returncode == 0
    assert view()["s2"][0] == "disabled"
    # Weight: the fleet's beats the file's; a local runtime weight beats the fleet's.
    mark = len(node.lines)
    fleet("weight", "app", "s1", "7")
    node.wait_line("fleet_update.*overrides/app/s1", 2, start=mark)
    assert view()["s1"] == ("draining", 7)  # the weight joined the drain, not replaced it
    assert lbtcp_cli("weight", "app", "s1", "2", "--admin", admin).returncode == 0
    mark = len(node.lines)
    fleet("weight", "app", "s1", "9")
    node.wait_line("fleet_update.*overrides/app/s1", 2, start=mark)
    assert view()["s1"][1] == 2
    assert json.loads(etcd.get_prefix("/lbtcp/overrides/")["/lbtcp/overrides/app/s1"]) == {
        "admin": "enable",
        "weight": 9,
    }
    # /status tells where the node stands with the fleet.
    document = json.loads(lbtcp_cli("status", "--json", "--admin", admin).stdout)
    assert document["fleet"]["node"] == "a"
    assert document["fleet"]["connected"] is True
    assert {"pool": "app", "server": "s1", "admin": "enabled", "weight": 9} in document["fleet"][
        "overrides"
    ]
    assert {"pool": "app", "server": "s2", "admin": "disabled", "weight": None} in document[
        "fleet"
    ]["overrides"]


def test_etcd_with_authentication(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    etcd.ctl("user", "add", "root:rootpw")
    etcd.ctl("auth", "enable")
    (tmp_path / "pw").write_text("rootpw\n")
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    text = node_config(etcd.url, "a", servers).replace(
        'timeout = "1s"', f'timeout = "1s"\nusername = "root"\npassword_file = "{tmp_path}/pw"'
    )
    node = start_nodes(tmp_path, {"a": text}, started)["a"]
    node.wait_line("fleet_connected.*listed from etcd")
    mark = len(node.lines)
    etcd.ctl("--user=root:rootpw", "put", "/lbtcp/overrides/app/s1", '{"admin": "disable"}')
    node.wait_line(r"server_state.*server=s1.*disabled", 2, start=mark)
    assert set(served_by(node, 4)) == {"s2"}
    wait_until(
        lambda: "/lbtcp/nodes/a" in etcd.get_prefix("/lbtcp/nodes/", "--user=root:rootpw"),
        5,
        "the registry entry, written with the token",
    )
    # The wrong password: a clear line, the file's config served, no crash.
    (tmp_path / "b").mkdir()
    (tmp_path / "bad").write_text("nope\n")
    wrong = Lbtcp(text.replace('node = "a"', 'node = "b"').replace("/pw", "/bad"), tmp_path / "b")
    started.append(wrong)
    line = wrong.wait_line("fleet_unreachable")
    assert "authentication failed" in line
    payload = b"still serving"
    assert roundtrip(wrong.address(), payload) == payload


def test_etcd_over_tls_with_a_client_certificate(
    tmp_path: Path, backends: Backends, started: list[Lbtcp]
) -> None:
    certs = make_certs(tmp_path / "certs")
    etcd = Etcd(tmp_path / "etcd-tls", certs)
    etcd.start()
    try:
        servers = {"s1": backends.echo(), "s2": backends.echo()}
        text = node_config(etcd.url, "a", servers).replace(
            'timeout = "1s"',
            f'timeout = "1s"\nca_file = "{certs["ca.pem"]}"\ncert_file = "{certs["client.pem"]}"'
            f'\nkey_file = "{certs["client.key"]}"',
        )
        node = start_nodes(tmp_path, {"a": text}, started)["a"]
        node.wait_line("fleet_connected.*listed from etcd")
        mark = len(node.lines)
        done = lbtcp_cli("drain", "app", "s1", "--fleet", "-c", str(tmp_path / "a" / "lbtcp.toml"))
        assert done.returncode == 0, done.stderr
        node.wait_line(r"server_state.*server=s1.*draining", 2, start=mark)
        assert set(served_by(node, 4)) == {"s2"}
        # Without the client certificate etcd refuses: one line, the file is served.
        (tmp_path / "b").mkdir()
        bare = text.replace('node = "a"', 'node = "b"')
        bare = re.sub(r"cert_file = .*\n|key_file = .*\n", "", bare)
        refused = Lbtcp(bare, tmp_path / "b")
        started.append(refused)
        refused.wait_line("fleet_unreachable.*at start")
        assert roundtrip(refused.address(), b"file") == b"file"
    finally:
        etcd.kill()


def test_etcd_made_anew_with_older_revisions_makes_the_node_list_again(
    tmp_path: Path, etcd: Etcd, backends: Backends, started: list[Lbtcp]
) -> None:
    servers = {"s1": backends.echo(), "s2": backends.echo()}
    for index in range(5):  # revisions the new store will not have
        etcd.ctl("put", f"/elsewhere/{index}", "x")
    etcd.ctl("put", "/lbtcp/overrides/app/s1", '{"admin": "drain"}')
    node = start_nodes(tmp_path, {"a": node_config(etcd.url, "a", servers)}, started)["a"]
    node.wait_line("fleet_connected")
    assert set(served_by(node, 4)) == {"s2"}
    etcd.kill()
    node.wait_line("fleet_unreachable")
    shutil.rmtree(etcd.data_dir)
    mark = len(node.lines)
    etcd.start()  # same address, an empty store at revision 1
    node.wait_line("fleet_relist.*went back", 5, start=mark)
    # The new store has no override: the drain is gone with it.
    node.wait_line(r"server_state.*server=s1", 2, start=mark)
    assert sorted(set(served_by(node, 4))) == ["s1", "s2"]
    etcd.ctl("put", "/lbtcp/overrides/app/s2", '{"admin": "disable"}')
    node.wait_line(r"server_state.*server=s2.*disabled", 1, start=mark)


def test_fleet_commands_fail_with_one_clear_line(tmp_path: Path) -> None:
    without = tmp_path / "plain.toml"
    without.write_text(
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n[pools.app]\n'
        '[[pools.app.servers]]\naddress = "127.0.0.1:9"\n'
    )
    done = lbtcp_cli("drain", "app", "s1", "--fleet")
    assert done.returncode == 2 and "--fleet needs -c CONFIG" in done.stderr
    done = lbtcp_cli("drain", "app", "s1", "--fleet", "-c", str(without))
    assert done.returncode == 1
    assert done.stderr.strip() == f"lbtcp: {without} has no [fleet] table"
    down = tmp_path / "down.toml"
    down.write_text(node_config(f"http://127.0.0.1:{closed_port()}", "a", {"s1": 9}))
    for args in (("weight", "app", "s1", "3"), ("status",)):
        done = lbtcp_cli(*args, "--fleet", "-c", str(down))
        assert done.returncode == 1, done
        assert done.stderr.startswith("lbtcp: etcd: ") and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    done = lbtcp_cli("status", "--fleet", "--watch", "-c", str(down))
    assert done.returncode == 2 and "do not go together" in done.stderr
