"""Runtime control end to end: ``lbtcp serve`` as a subprocess, steered through its admin API.

Which server a session reached is counted at the servers (``Backends.accepted``); probe
connections are counted there too, which is how "a disabled server is not probed" is seen.
Every test takes ``backends`` before ``start_lbtcp`` so that lbtcp stops first.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import Backends, Lbtcp, config, open_session, wait_until
from tests.test_admin_server import TOKEN, Reply, admin_address, get, post

StartLbtcp = Callable[..., Lbtcp]

ADMIN = '[admin]\nlisten = "127.0.0.1:0"\n'


def with_admin(text: str, admin: str = ADMIN) -> str:
    return admin + text


def named_config(ports: list[int], **kwargs: str) -> str:
    """The ``config()`` text with its servers named a, b, c... (by position)."""
    text = config([], **kwargs)
    for name, port in zip("abcdefgh", ports, strict=False):
        text += f'[[pools.app.servers]]\naddress = "127.0.0.1:{port}"\nname = "{name}"\n'
        text += kwargs.get("server_extra", "") + "\n"
    return text


def server_of(backends: Backends, before: dict[int, int], ports: list[int]) -> int:
    """The one port whose accepted count grew since ``before``."""
    grown = [port for port in ports if backends.accepted[port] > before.get(port, 0)]
    assert len(grown) == 1, (before, dict(backends.accepted))
    return grown[0]


def sessions_per_server(
    backends: Backends, address: tuple[str, int], ports: list[int], count: int
) -> dict[int, int]:
    """Open ``count`` sessions one after another; how many reached each server."""
    before = {port: backends.accepted[port] for port in ports}
    for index in range(count):
        with open_session(address, b"n%d" % index):
            pass
    return {port: backends.accepted[port] - before[port] for port in ports}


def status_server(
    admin: tuple[str, int], name: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    document = get(admin, "/status", headers).json()
    pools = document["pools"]
    assert isinstance(pools, list)
    for server in pools[0]["servers"]:
        if server["name"] == name:
            assert isinstance(server, dict)
            return server
    raise AssertionError(f"no server {name} in {document}")


def echo_bytes(sock: socket.socket, size: int, seed: int) -> None:
    """Push ``size`` random bytes through a live session and check the echo byte for byte."""
    payload = random.Random(seed).randbytes(size)
    received = bytearray()
    for start in range(0, size, 65536):
        sock.sendall(payload[start : start + 65536])
        while len(received) < min(size, start + 65536):
            chunk = sock.recv(65536)
            assert chunk, "the live session was closed"
            received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def assert_action(reply: Reply, server: str, state: str, weight: int) -> None:
    assert reply.status == 200, reply.body
    assert reply.json() == {"pool": "app", "server": server, "state": state, "weight": weight}


def test_drain_keeps_the_live_session_sends_no_new_one_and_enable_puts_it_back(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo(), backends.echo()]
    lbtcp = start_lbtcp(with_admin(named_config(ports)))
    address, admin = lbtcp.address(), admin_address(lbtcp)
    before = {port: backends.accepted[port] for port in ports}
    live = open_session(address, b"first")
    drained_port = server_of(backends, before, ports)
    drained = "ab"[ports.index(drained_port)]
    other_port = ports[1 - ports.index(drained_port)]
    with live:
        lines = len(lbtcp.lines)
        assert_action(post(admin, f"/pools/app/servers/{drained}/drain"), drained, "draining", 1)
        line = lbtcp.wait_line(r"\bserver_state\b", start=lines)
        assert f"server={drained}" in line and "new=draining" in line and "reason=admin" in line
        assert status_server(admin, drained)["state"] == "draining"
        # Draining it again changes nothing (and logs nothing: see the count below).
        assert_action(post(admin, f"/pools/app/servers/{drained}/drain"), drained, "draining", 1)
        # No new session goes to it...
        assert sessions_per_server(backends, address, ports, 10) == {
            drained_port: 0,
            other_port: 10,
        }
        # ...while the live one keeps flowing, byte for byte.
        echo_bytes(live, 2 * 1024 * 1024, seed=1)
        assert_action(post(admin, f"/pools/app/servers/{drained}/enable"), drained, "healthy", 1)
        echo_bytes(live, 256 * 1024, seed=2)
    # Back in rotation: round robin shares again.
    assert sessions_per_server(backends, address, ports, 10) == {drained_port: 5, other_port: 5}
    states = lbtcp.matching(r"\bserver_state\b.*reason=admin")
    assert len(states) == 2, states  # one line per action that changed something
    assert "new=healthy" in states[1]


def test_disable_stops_the_probes_and_enable_restarts_them(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo(), backends.echo()]
    health = (
        '[pools.app.health]\ninterval = "100ms"\nfast_interval = "50ms"\n'
        'down_interval = "100ms"\ntimeout = "500ms"\nrise = 1\nfall = 2\njitter = 0\n'
    )
    lbtcp = start_lbtcp(with_admin(named_config(ports) + health))
    admin = admin_address(lbtcp)
    wait_until(lambda: len(lbtcp.matching(r"server_state.*new=healthy")) == 2, 10, "healthy")

    def probes_during(seconds: float) -> int:
        start = backends.accepted[ports[0]]
        time.sleep(seconds)  # counting probes over a window: the window is the measurement
        return backends.accepted[ports[0]] - start

    assert probes_during(1.0) >= 5
    assert_action(post(admin, "/pools/app/servers/a/disable"), "a", "disabled", 1)
    time.sleep(0.6)  # a probe already in flight when the command came may still land
    assert probes_during(1.5) == 0
    assert status_server(admin, "a")["state"] == "disabled"
    # The disabled server takes no sessions either.
    assert sessions_per_server(backends, lbtcp.address(), ports, 4) == {ports[0]: 0, ports[1]: 4}
    reply = post(admin, "/pools/app/servers/a/enable")
    assert reply.status == 200 and reply.json()["state"] in ("unknown", "rising", "healthy")
    wait_until(lambda: status_server(admin, "a")["state"] == "healthy", 5, "a healthy again")
    assert probes_during(1.0) >= 5


def test_weight_changes_the_share_of_new_sessions(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo(), backends.echo()]
    lbtcp = start_lbtcp(with_admin(named_config(ports)))
    address, admin = lbtcp.address(), admin_address(lbtcp)
    assert sessions_per_server(backends, address, ports, 8) == {ports[0]: 4, ports[1]: 4}
    assert_action(
        post(admin, "/pools/app/servers/a/weight", json.dumps({"weight": 3}).encode()),
        "a",
        "healthy",
        3,
    )
    line = lbtcp.wait_line(r"\bserver_weight\b")
    assert "server=a" in line and "old=1" in line and "new=3" in line and "reason=admin" in line
    # Smooth weighted round robin: every window of 4 picks is exactly 3 a, 1 b.
    assert sessions_per_server(backends, address, ports, 40) == {ports[0]: 30, ports[1]: 10}
    assert status_server(admin, "a")["weight"] == 3
    # Weight 0: no new sessions at all, the server stays healthy.
    assert_action(post(admin, "/pools/app/servers/a/weight", b'{"weight": 0}'), "a", "healthy", 0)
    assert sessions_per_server(backends, address, ports, 6) == {ports[0]: 0, ports[1]: 6}
    # The same weight again changes nothing and logs nothing.
    assert_action(post(admin, "/pools/app/servers/a/weight", b'{"weight": 0}'), "a", "healthy", 0)
    assert len(lbtcp.matching(r"\bserver_weight\b")) == 2


def test_with_a_token_every_post_without_it_is_401_and_changes_nothing(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo(), backends.echo()]
    admin_table = ADMIN + f'token = "{TOKEN}"\n'
    lbtcp = start_lbtcp(with_admin(named_config(ports), admin_table))
    address, admin = lbtcp.address(), admin_address(lbtcp)
    attempts = [
        ("drain", b""),
        ("disable", b""),
        ("weight", b'{"weight": 9}'),
        ("enable", b""),
    ]
    for headers in (None, {"Authorization": "Bearer not-the-token"}, {"Authorization": TOKEN}):
        for action, body in attempts:
            reply = post(admin, f"/pools/app/servers/a/{action}", body, headers)
            assert reply.status == 401, (action, headers, reply.body)
            assert reply.headers["www-authenticate"].startswith('Bearer realm="lbtcp"')
            # The token is checked before any lookup: an unknown name is 401 too, not 404.
            assert post(admin, f"/pools/nope/servers/x/{action}", body, headers).status == 401
    # Nothing changed: reads are open (auth_reads = false) and show it.
    server = status_server(admin, "a")
    assert (server["state"], server["admin"], server["weight"]) == ("healthy", "enabled", 1)
    assert sessions_per_server(backends, address, ports, 4) == {ports[0]: 2, ports[1]: 2}
    assert not lbtcp.matching(r"server_state|server_weight")
    # With the token it works.
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert_action(post(admin, "/pools/app/servers/a/drain", b"", good), "a", "draining", 1)


def test_auth_reads_guards_status_and_metrics_but_not_with_the_token(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo()]
    admin_table = ADMIN + f'token = "{TOKEN}"\nauth_reads = true\n'
    lbtcp = start_lbtcp(with_admin(named_config(ports), admin_table))
    admin = admin_address(lbtcp)
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/status", "/metrics", "/healthz"):
        assert get(admin, path).status == 401, path
        assert get(admin, path, good).status == 200, path
    # The page holds no data and a browser cannot send the header: it is served without the
    # token and reads /status with the one from its URL fragment.
    page = get(admin, "/")
    assert page.status == 200
    assert b"<html" in page.body.lower()
    assert status_server(admin, "a", good)["state"] == "healthy"


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_admin_listens_on_ipv4_or_ipv6_loopback(
    backends: Backends, start_lbtcp: StartLbtcp, listen: str
) -> None:
    if listen.startswith("[") and not socket.has_ipv6:
        pytest.fail("IPv6 is needed for this test")
    lbtcp = start_lbtcp(
        with_admin(named_config([backends.echo()]), f'[admin]\nlisten = "{listen}"\n')
    )
    host, port = admin_address(lbtcp)
    assert host == listen.rsplit(":", 1)[0].strip("[]")
    assert get((host, port), "/healthz").body == b"ok\n"


def test_healthz_is_503_during_a_sigterm_drain_while_a_session_is_live(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    ports = [backends.echo()]
    lbtcp = start_lbtcp(with_admin(named_config(ports, global_extra='drain_timeout = "20s"')))
    address, admin = lbtcp.address(), admin_address(lbtcp)
    assert get(admin, "/healthz").status == 200
    with open_session(address, b"live") as live:
        lbtcp.signal(signal.SIGTERM)
        lbtcp.wait_line(r"\bdrain\b")
        reply = get(admin, "/healthz")
        assert (reply.status, reply.body) == (503, b"draining\n")
        assert get(admin, "/status").json()["draining"] is True
        # The listener no longer accepts, the live session still flows, the admin API answers.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=2).close()
        echo_bytes(live, 512 * 1024, seed=3)
        assert get(admin, "/healthz").status == 503
    assert lbtcp.wait(20) == 0
    # The admin API closed last, with the process.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(admin, timeout=2).close()


def test_a_port_in_use_for_admin_is_a_runtime_failure(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        lbtcp = start_lbtcp(
            with_admin(named_config([backends.echo()]), f'[admin]\nlisten = "127.0.0.1:{port}"\n'),
            wait=False,
        )
        assert lbtcp.wait(15) == 1
        assert lbtcp.matching(r"\berror\b.*cannot listen")
        assert not lbtcp.matching("Traceback")
    finally:
        taken.close()
