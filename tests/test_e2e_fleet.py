"""The fleet against a real etcd: three ``lbtcp serve`` nodes sharing one prefix (issue 14)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.etcd_support import Etcd, running_etcd
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
