"""Reload through the admin API (``POST /reload``, ``lbtcp reload``) and what ``/status`` and
``/metrics`` show across reloads: servers that stay keep their admin state, runtime weight and
counters; the reload counters; ``/healthz`` during the shutdown grace."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import Backends, Lbtcp, closed_port, open_session, roundtrip
from tests.test_admin_server import TOKEN, admin_address, get, post

StartLbtcp = Callable[..., Lbtcp]


def _config(
    servers: dict[str, int],
    *,
    weights: dict[str, int] | None = None,
    admin: str = '[admin]\nlisten = "127.0.0.1:0"\n',
    global_extra: str = "",
    health: str = "",
) -> str:
    weights = weights or {}
    lines = ["[global]", global_extra, admin, "[listeners.web]", 'bind = "127.0.0.1:0"']
    lines += ['pool = "app"', "[pools.app]", "retries = 0"]
    for name, port in servers.items():
        lines += ["[[pools.app.servers]]", f'name = "{name}"', f'address = "127.0.0.1:{port}"']
        if name in weights:
            lines.append(f"weight = {weights[name]}")
    if health:
        lines += ["[pools.app.health]", health]
    return "\n".join(lines) + "\n"


def _servers(admin: tuple[str, int]) -> dict[str, dict[str, Any]]:
    document = get(admin, "/status").json()
    pools: Any = document["pools"]
    return {server["name"]: server for server in pools[0]["servers"]}


def _metric(admin: tuple[str, int], name: str) -> float:
    text = get(admin, "/metrics").body.decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_post_reload_applies_and_servers_that_stay_keep_their_state(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    a, b, c = backends.echo(), backends.echo(), backends.echo()
    lbtcp = start_lbtcp(_config({"a": a, "b": b}))
    admin = admin_address(lbtcp)
    address = lbtcp.address()
    for i in range(6):
        assert roundtrip(address, b"%d" % i) == b"%d" % i
    assert post(admin, "/pools/app/servers/b/drain").status == 200
    assert post(admin, "/pools/app/servers/a/weight", b'{"weight": 7}').status == 200
    before = _servers(admin)
    assert before["b"]["state"] == "draining"
    assert before["a"]["total"] == 3
    assert before["b"]["total"] == 3

    lbtcp.config_path.write_text(_config({"a": a, "b": b, "c": c}))
    reply = post(admin, "/reload")
    assert reply.status == 200, reply.body
    document = reply.json()
    assert document["ok"] is True
    assert document["summary"] == "listeners +0 -0 ~0, servers +1 -0 ~0"
    after = _servers(admin)
    assert set(after) == {"a", "b", "c"}
    assert after["b"]["state"] == "draining"  # admin state kept
    assert after["a"]["weight"] == 7  # runtime weight kept: the file's weight did not change
    assert (after["a"]["total"], after["b"]["total"]) == (3, 3)  # counters not reset
    # b drains: new clients go to a and c only.
    for i in range(8):
        assert roundtrip(address, b"x%d" % i) == b"x%d" % i
    after = _servers(admin)
    assert after["b"]["total"] == 3
    assert after["a"]["total"] + after["c"]["total"] == 3 + 8

    # The file's weight for a changes: now it replaces the runtime weight.
    lbtcp.config_path.write_text(_config({"a": a, "b": b, "c": c}, weights={"a": 2}))
    document = post(admin, "/reload").json()
    assert document["summary"] == "listeners +0 -0 ~0, servers +0 -0 ~1"
    after = _servers(admin)
    assert after["a"]["weight"] == 2
    assert after["b"]["state"] == "draining"
    assert _metric(admin, 'lbtcp_config_reloads_total{result="success"}') == 2
    assert _metric(admin, "lbtcp_config_last_reload_successful") == 1


def test_post_reload_with_an_invalid_file_answers_400_with_every_error(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    a = backends.echo()
    lbtcp = start_lbtcp(_config({"a": a}))
    admin = admin_address(lbtcp)
    started = _metric(admin, "lbtcp_config_last_reload_success_timestamp_seconds")
    lbtcp.config_path.write_text(
        _config({"a": a}).replace("retries = 0", "retries = -1\nbogus = 1")
    )
    reply = post(admin, "/reload")
    assert reply.status == 400
    document = reply.json()
    assert document["ok"] is False
    assert len(document["errors"]) == 2
    assert any("pools.app.retries" in e for e in document["errors"])
    assert any("pools.app.bogus: unknown key" in e for e in document["errors"])
    assert "the running one is unchanged" in str(document["error"])
    assert _metric(admin, 'lbtcp_config_reloads_total{result="failure"}') == 1
    assert _metric(admin, "lbtcp_config_last_reload_successful") == 0
    # The start counts as the last successful load; a failure does not move it.
    assert _metric(admin, "lbtcp_config_last_reload_success_timestamp_seconds") == started
    assert roundtrip(lbtcp.address(), b"still serving") == b"still serving"


def test_lbtcp_reload_command(backends: Backends, start_lbtcp: StartLbtcp) -> None:
    a, b = backends.echo(), backends.echo()
    admin_table = f'[admin]\nlisten = "127.0.0.1:0"\ntoken = "{TOKEN}"\n'
    lbtcp = start_lbtcp(_config({"a": a}, admin=admin_table))
    host, port = admin_address(lbtcp)
    base = [sys.executable, "-m", "lbtcp", "reload", "--admin", f"{host}:{port}"]
    # Without the token: refused (401), exit 1, one clear line.
    done = subprocess.run(base, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "401" in done.stderr
    assert "Traceback" not in done.stderr

    lbtcp.config_path.write_text(_config({"a": a, "b": b}, admin=admin_table))
    done = subprocess.run([*base, "--token", TOKEN], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "reloaded: listeners +0 -0 ~0, servers +1 -0 ~0" in done.stdout

    lbtcp.config_path.write_text(_config({"a": a, "b": b}, admin=admin_table) + "oops\n")
    done = subprocess.run([*base, "--token", TOKEN], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "not reloaded, 1 error(s)" in done.stderr
    assert "TOML syntax error" in done.stderr
    assert "the running configuration is unchanged" in done.stderr


def test_reload_moves_the_admin_api(backends: Backends, start_lbtcp: StartLbtcp) -> None:
    a = backends.echo()
    lbtcp = start_lbtcp(_config({"a": a}))
    old = admin_address(lbtcp)
    port = closed_port()
    lbtcp.config_path.write_text(_config({"a": a}, admin=f'[admin]\nlisten = "127.0.0.1:{port}"\n'))
    reply = post(old, "/reload")  # answered on the old address, which serves a moment longer
    assert reply.status == 200, reply.body
    assert get(("127.0.0.1", port), "/healthz").status == 200
    deadline = time.monotonic() + 5
    while True:
        try:
            get(old, "/healthz")
        except OSError:
            break  # the old address is closed
        assert time.monotonic() < deadline, "the old admin address still answers"
        time.sleep(0.1)
    # A bind conflict for the admin API refuses the whole reload.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        lbtcp.config_path.write_text(
            _config({"a": a, "b": a}, admin=f'[admin]\nlisten = "127.0.0.1:{busy}"\n')
        )
        reply = post(("127.0.0.1", port), "/reload")
        assert reply.status == 400
        assert f"admin.listen: 127.0.0.1:{busy}" in str(reply.json()["errors"])
    assert set(_servers(("127.0.0.1", port))) == {"a"}


def test_healthz_is_503_during_the_shutdown_grace_while_clients_are_served(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    a = backends.echo()
    lbtcp = start_lbtcp(_config({"a": a}, global_extra='shutdown_grace = "2s"'))
    admin = admin_address(lbtcp)
    address = lbtcp.address()
    live = open_session(address, b"live")
    assert get(admin, "/healthz").status == 200
    lbtcp.signal(signal.SIGTERM)
    sent_at = time.monotonic()
    lbtcp.wait_line(r"shutdown_grace ")
    reply = get(admin, "/healthz")
    assert reply.status == 503
    assert reply.body == b"draining\n"
    while time.monotonic() - sent_at < 1.6:
        assert roundtrip(address, b"served in the grace") == b"served in the grace"
    lbtcp.wait_line(r" drain ", timeout=5)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=2).close()
    assert get(admin, "/healthz").status == 503
    live.sendall(b"draining")
    assert live.recv(100) == b"draining"
    live.close()
    assert lbtcp.wait(15) == 0


def test_a_down_server_stays_down_and_a_removed_one_is_gone_from_status(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    a, b = backends.echo(), backends.echo()
    down = closed_port()
    health = 'interval = "100ms"\nfast_interval = "50ms"\nfall = 1\ninitial = "healthy"'
    lbtcp = start_lbtcp(_config({"a": a, "b": b, "down": down}, health=health))
    admin = admin_address(lbtcp)
    lbtcp.wait_line(r"server_state .*server=down .*new=unhealthy")
    lbtcp.config_path.write_text(_config({"a": a, "down": down}, health=health))
    assert post(admin, "/reload").json()["summary"] == "listeners +0 -0 ~0, servers +0 -1 ~0"
    servers = _servers(admin)
    assert set(servers) == {"a", "down"}
    assert servers["down"]["state"] == "unhealthy"
    assert servers["a"]["state"] == "healthy"
