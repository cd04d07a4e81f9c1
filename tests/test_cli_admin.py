"""The admin command line: ``lbtcp status|drain|enable|disable|weight``.

Three layers. The table (``lbtcp.admin.table``) is pure: it is rendered from sample and random
/status documents. The client (``lbtcp.admin.client``) is checked against small HTTP peers that
misbehave on purpose (a 500, a body that is not JSON, a peer that never answers), which the
real admin API cannot be made to do. The commands are run as subprocesses
(``sys.executable -m lbtcp ...``) against a real ``lbtcp serve`` with an ``[admin]`` table,
with real sessions through it to echo servers: a drained server's live session keeps flowing
byte-exact and new sessions go elsewhere, a disabled server's probes stop (counted at the
server), and every failure is one line on stderr and exit 1, never a traceback.

Every test takes ``backends`` before ``start_lbtcp``: fixtures are torn down in reverse order,
so lbtcp and its probes stop before the servers' event loop is closed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.server
import io
import json
import os
import pty
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from lbtcp import cli
from lbtcp.addresses import Endpoint
from lbtcp.admin import table
from lbtcp.admin.client import (
    DEFAULT_ADMIN,
    AdminClient,
    AdminError,
    choose_target,
    describe_change,
    printable,
)
from lbtcp.admin.routes import Endpoint as RouteEndpoint
from lbtcp.admin.routes import Route, match
from lbtcp.config import AdminConfig
from tests.support import (
    REPO,
    Backends,
    Lbtcp,
    blackhole,
    closed_port,
    open_session,
    roundtrip,
    wait_until,
)

StartLbtcp = Callable[..., Lbtcp]

NOW = 1764619400.0

SERVER_A: dict[str, Any] = {
    "name": "a",
    "address": "127.0.0.1:9001",
    "backup": False,
    "state": "healthy",
    "health": "healthy",
    "admin": "enabled",
    "weight": 1,
    "effective_weight": 1.0,
    "max_connections": 0,
    "active": 2,
    "total": 5,
    "connect_failures": {"refused": 0, "timeout": 0, "other": 0},
    "ejections": 0,
    "bytes_sent": 100,
    "bytes_received": 100,
    "last_probe": {"result": "ok", "detail": "", "duration_ms": 1.2, "at": NOW - 1},
    "last_change": {
        "at": NOW - 200,
        "from": "unknown",
        "to": "healthy",
        "reason": "probe: 2 consecutive successes",
    },
}


def sample_document() -> dict[str, Any]:
    """A document as the README's "Admin API" section describes it: one pool of three
    servers (one draining with bad health underneath, one a backup that never changed
    state), one empty pool."""
    drained = dict(
        SERVER_A,
        name="b",
        address="127.0.0.1:9002",
        state="draining",
        health="unhealthy",
        admin="draining",
        weight=10,
        effective_weight=1.5,
        active=1,
        connect_failures={"refused": 3, "timeout": 1, "other": 0},
        ejections=1,
        last_change={"at": NOW - 5, "from": "healthy", "to": "draining", "reason": "admin"},
    )
    backup = dict(
        SERVER_A,
        name="c",
        address="127.0.0.1:9003",
        backup=True,
        state="unhealthy",
        health="unhealthy",
        active=0,
        total=0,
        last_probe=None,
        last_change=None,
    )
    return {
        "version": "0.1.0",
        "pid": 1234,
        "config": "/etc/lbtcp/lbtcp.toml",
        "started_at": NOW - 7300,
        "uptime_s": 7300.0,
        "draining": False,
        "listeners": [
            {
                "name": "web",
                "pool": "app",
                "addresses": ["127.0.0.1:8080", "[::1]:8080"],
                "active": 3,
                "total": 10,
                "max_connections": 100,
                "refused": {"no_healthy": 2, "acl": 0, "limit": 1, "proxy_protocol": 0},
            }
        ],
        "pools": [
            {
                "name": "app",
                "balance": "round_robin",
                "verdict": "degraded",
                "servers_total": 3,
                "in_service": 1,
                "servers": [dict(SERVER_A), drained, backup],
            },
            {
                "name": "spare",
                "balance": "least_conn",
                "verdict": "empty",
                "servers_total": 0,
                "in_service": 0,
                "servers": [],
            },
        ],
    }


def row(text: str, server: str) -> str:
    """The table line of ``server`` (its name as a whole word in the SERVER column)."""
    for line in text.splitlines():
        cells = line.split()
        if server in cells[:5]:
            return line
    raise AssertionError(f"no row for {server!r} in:\n{text}")


# --- durations and ages ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.99, "0s"),
        (59.9, "59s"),
        (60, "1m"),
        (3 * 60 + 59, "3m"),
        (59 * 60 + 59, "59m"),
        (3600, "1h"),
        (2 * 3600 + 5 * 60 + 30, "2h 5m"),
        (24 * 3600, "1d"),
        (3 * 86400 + 4 * 3600 + 59 * 60, "3d 4h"),
        (-5, "0s"),
        (float("nan"), "0s"),
        (float("inf"), "0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert table.format_duration(seconds) == text


def test_format_age() -> None:
    assert table.format_age(NOW - 180, NOW) == "3m ago"
    assert table.format_age(NOW - 3, NOW) == "3s ago"
    # A change stamped slightly in the future (the clocks of two machines) is "just now".
    assert table.format_age(NOW + 2, NOW) == "0s ago"


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration_text(text: str) -> int:
    return sum(int(part[:-1]) * _UNITS[part[-1]] for part in text.split())


@given(st.floats(min_value=0, max_value=10 * 365 * 86400))
def test_duration_never_reads_longer_and_keeps_the_leading_unit(seconds: float) -> None:
    """Rounded down, never up; and wrong by less than the smallest unit shown."""
    text = table.format_duration(seconds)
    shown = _parse_duration_text(text)
    assert shown <= seconds
    smallest = _UNITS[text.split()[-1][-1]]
    assert seconds - shown < smallest


@given(st.floats(min_value=0, max_value=1e7), st.floats(min_value=0, max_value=1e7))
def test_duration_is_monotonic(a: float, b: float) -> None:
    low, high = sorted((a, b))
    parse = _parse_duration_text
    assert parse(table.format_duration(low)) <= parse(table.format_duration(high))


# --- the table -------------------------------------------------------------------------------


def test_table_plain_text_says_everything_in_words() -> None:
    text = table.status_text(sample_document(), NOW)
    assert "\x1b" not in text  # not a terminal: no colour codes
    lines = text.splitlines()
    assert lines[0] == "lbtcp 0.1.0 pid 1234, up 2h 1m, config /etc/lbtcp/lbtcp.toml"
    assert lines[1] == (
        "listener web on 127.0.0.1:8080, [::1]:8080 -> pool app: 3 active (max 100), "
        "10 total, refused 3 (no_healthy 2, limit 1)"
    )
    header = next(line for line in lines if line.startswith("POOL"))
    assert header.split() == [
        "POOL", "SERVER", "STATE", "WEIGHT", "ACTIVE", "TOTAL", "FAILURES", "CHANGED", "REASON",
    ]  # fmt: skip

    a = row(text, "a")
    assert a.startswith("app degraded 1/3 ")
    assert re.search(r"\ba +healthy +1 +2 +5 +0 +3m ago +probe: 2 consecutive successes", a)
    assert a.endswith("(was unknown)")

    b = row(text, "b")
    assert not b.startswith("app")  # the pool is named on its first row only
    # The drained server's health underneath, its effective weight, failures by kind, age.
    assert "draining (unhealthy)" in b
    assert "10 (eff 1.5)" in b
    assert "4 (refused 3, timeout 1), ejected 1x" in b
    assert re.search(r"5s ago +admin \(was healthy\)$", b)

    c = row(text, "c")
    assert "c (backup)" in c
    assert re.search(r"unhealthy +1 +0 +0 +0 +- +-$", c)

    spare = next(line for line in lines if line.startswith("spare"))
    assert re.fullmatch(r"spare empty 0/0 +- +\(no servers\)", spare)
    # One line per server and per empty pool, nothing wrapped.
    assert len(lines) == lines.index(header) + 1 + 3 + 1


def test_table_on_a_terminal_colours_the_states() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, color_system="standard", width=200)
    console.print(table.render_status(sample_document(), NOW))
    out = buffer.getvalue()
    green, red = "\x1b[1;32m", "\x1b[1;31m"
    assert f"{green}healthy" in out
    assert f"{red}unhealthy" in out
    assert "draining" in out and out.index("draining") > 0
    # The words stay when the colours go (NO_COLOR, a monochrome terminal).
    assert re.search(r"\x1b\[[0-9;]*mdraining", out)


def test_table_shows_shutdown_and_keeps_hostile_text_on_one_line() -> None:
    doc = sample_document()
    doc["draining"] = True
    server = doc["pools"][0]["servers"][0]
    server["last_change"]["reason"] = "probe: evil\n\x1b[2Jreason"
    server["name"] = "a\x1b]0;pwned\x07"
    text = table.status_text(doc, NOW)
    assert "DRAINING (shutting down)" in text.splitlines()[0]
    assert "\x1b" not in text and "\x07" not in text
    assert "probe: evil??[2Jreason" in text
    assert "a?]0;pwned?" in text


def test_table_survives_a_document_it_does_not_understand() -> None:
    """An older or newer lbtcp, or a broken one: unreadable values read ``?``."""
    doc: dict[str, Any] = {
        "version": 7,
        "uptime_s": "long",
        "listeners": [{"name": "web", "refused": None, "addresses": "x"}, "junk"],
        "pools": [
            {"name": "app", "servers": [{"name": "x", "weight": None, "active": True}]},
            {"servers": "none"},
            None,
        ],
    }
    text = table.status_text(doc, NOW)
    x = row(text, "x")
    assert x.split()[:6] == ["app", "?", "x", "?", "?", "?"]
    assert table.status_text({}, NOW).startswith("lbtcp ? pid ?, up ?")


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=24)
STATES = st.sampled_from(
    ["unknown", "healthy", "failing", "unhealthy", "rising", "ejected", "draining", "disabled"]
)
COUNTS = st.integers(min_value=0, max_value=2**63)
TIMES = st.floats(min_value=0, max_value=4e9)
PRINTABLE = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]))


@st.composite
def servers(draw: st.DrawFn, name: str) -> dict[str, Any]:
    state = draw(STATES)
    change = draw(
        st.none()
        | st.fixed_dictionaries(
            {"at": TIMES, "from": STATES, "to": st.just(state), "reason": PRINTABLE}
        )
    )
    probe = draw(
        st.none()
        | st.fixed_dictionaries(
            {
                "result": st.sampled_from(["ok", "fail", "timeout"]),
                "detail": PRINTABLE,
                "duration_ms": st.floats(min_value=0, max_value=1e6),
                "at": TIMES,
            }
        )
    )
    return {
        "name": name,
        "address": draw(st.sampled_from(["127.0.0.1:9001", "[::1]:80", "10.0.0.5:65535"])),
        "backup": draw(st.booleans()),
        "state": state,
        "health": draw(STATES),
        "admin": draw(st.sampled_from(["enabled", "draining", "disabled"])),
        "weight": draw(st.integers(min_value=0, max_value=256)),
        "effective_weight": draw(st.floats(min_value=0, max_value=256)),
        "max_connections": draw(COUNTS),
        "active": draw(COUNTS),
        "total": draw(COUNTS),
        "connect_failures": {k: draw(COUNTS) for k in ("refused", "timeout", "other")},
        "ejections": draw(COUNTS),
        "bytes_sent": draw(COUNTS),
        "bytes_received": draw(COUNTS),
        "last_probe": probe,
        "last_change": change,
    }


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    pool_names = draw(st.lists(NAMES, max_size=4, unique=True))
    pools = []
    for pool_name in pool_names:
        names = draw(st.lists(NAMES, max_size=6, unique=True))
        members = [draw(servers(name)) for name in names]
        pools.append(
            {
                "name": pool_name,
                "balance": draw(st.sampled_from(["round_robin", "least_conn", "source_hash"])),
                "verdict": draw(st.sampled_from(["ok", "degraded", "panic", "backup", "empty"])),
                "servers_total": len(members),
                "in_service": draw(st.integers(min_value=0, max_value=len(members))),
                "servers": members,
            }
        )
    listeners = [
        {
            "name": draw(NAMES),
            "pool": draw(NAMES),
            "addresses": draw(st.lists(st.just("127.0.0.1:8080"), max_size=2)),
            "active": draw(COUNTS),
            "total": draw(COUNTS),
            "max_connections": draw(COUNTS),
            "refused": {k: draw(COUNTS) for k in ("no_healthy", "acl", "limit", "proxy_protocol")},
        }
        for _ in range(draw(st.integers(min_value=0, max_value=3)))
    ]
    return {
        "version": "0.1.0",
        "pid": draw(st.integers(min_value=1, max_value=2**22)),
        "config": draw(PRINTABLE),
        "started_at": draw(TIMES),
        "uptime_s": draw(st.floats(min_value=0, max_value=1e9)),
        "draining": draw(st.booleans()),
        "listeners": listeners,
        "pools": pools,
    }


@settings(max_examples=150, deadline=None)
@given(documents(), TIMES)
def test_random_documents_render_every_server_on_its_own_line(
    doc: dict[str, Any], now: float
) -> None:
    text = table.status_text(doc, now)
    lines = text.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("POOL ")))
    rows = lines[header + 1 :]
    expected = [
        (pool["name"], server["name"]) for pool in doc["pools"] for server in pool["servers"]
    ] + [(pool["name"], "-") for pool in doc["pools"] if not pool["servers"]]
    # One line per server (and per empty pool): nothing wrapped, nothing lost.
    assert len(rows) == len(expected)
    for _, server_name in expected:
        assert any(line.split()[:5].count(server_name) for line in rows), server_name
    for pool in doc["pools"]:
        assert any(line.startswith(pool["name"] + " " + pool["verdict"]) for line in rows)
    # On a terminal of a usual size the table may wrap, but never fails.
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, width=80).print(table.render_status(doc, now))
    assert buffer.getvalue()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(documents(), st.data())
def test_documents_with_fields_of_the_wrong_type_never_crash(
    doc: dict[str, Any], data: st.DataObject
) -> None:
    """Any field of a valid document replaced by any JSON value: still rendered."""
    targets: list[dict[str, Any]] = [doc, *doc["listeners"], *doc["pools"]]
    targets += [server for pool in doc["pools"] for server in pool["servers"]]
    for _ in range(data.draw(st.integers(min_value=1, max_value=5))):
        target = data.draw(st.sampled_from(targets))
        key = data.draw(st.sampled_from(sorted(target) or ["x"]))
        target[key] = data.draw(JSON_VALUES)
    assert table.status_text(doc, NOW).startswith("lbtcp ")


# --- watch -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_watch_into_a_pipe_prints_every_frame_and_survives_a_failed_fetch() -> None:
    clock = FakeClock()
    answers: list[Any] = [
        sample_document(),
        dict(sample_document(), uptime_s=7301.0),
        AdminError("cannot reach the admin API at 127.0.0.1:9900: connection refused"),
        dict(sample_document(), uptime_s=7363.0),
    ]

    def fetch() -> Mapping[str, Any]:
        clock.now += 0.25  # each fetch takes a while: the schedule must not drift
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=False)
    table.watch(fetch, console, errors=(AdminError,), clock=clock.time, sleep=clock.sleep, frames=4)
    out = buffer.getvalue()
    headers = re.findall(r"^lbtcp 0\.1\.0 pid 1234, up (\S+)", out, re.MULTILINE)
    assert headers == ["2h", "2h", "2h"]  # three good frames
    assert re.search(r"connection refused \(showing the last answer; retrying\)", out)
    # Fetch, sleep to the next whole interval, fetch: 0.75 s sleeps, no drift.
    assert clock.sleeps == pytest.approx([0.75, 0.75, 0.75])
    assert "\x1b" not in out


def test_watch_fails_at_once_when_the_first_fetch_fails() -> None:
    def fetch() -> Mapping[str, Any]:
        raise AdminError("cannot reach the admin API at 127.0.0.1:1: connection refused")

    with pytest.raises(AdminError, match="connection refused"):
        table.watch(fetch, Console(file=io.StringIO()), errors=(AdminError,), frames=3)


def test_watch_on_a_terminal_redraws_in_place() -> None:
    clock = FakeClock()
    uptimes = iter([10.0, 11.0, 12.0])

    def fetch() -> Mapping[str, Any]:
        return dict(sample_document(), uptime_s=next(uptimes))

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, height=40)
    table.watch(fetch, console, clock=clock.time, sleep=clock.sleep, frames=3)
    out = buffer.getvalue()
    assert re.findall(r"up (\d+s)", out)[:3] == ["10s", "11s", "12s"]
    assert "\x1b[2K" in out  # rich Live erased the previous frame's lines


# --- target and token ------------------------------------------------------------------------


def test_target_precedence() -> None:
    settings_ = AdminConfig(listen=Endpoint("::", 9911), token="from-config")
    given_ = Endpoint("127.0.0.2", 9000)
    env = {"LBTCP_ADMIN_TOKEN": "from-env"}
    assert choose_target(None, None, None, {}) == (DEFAULT_ADMIN, "")
    assert choose_target(None, settings_, None, {}) == (Endpoint("::1", 9911), "from-config")
    assert choose_target(given_, settings_, None, env) == (given_, "from-env")
    assert choose_target(given_, settings_, "given", env) == (given_, "given")
    # An empty variable is an unset one; an empty --token means "no token".
    assert choose_target(None, settings_, None, {"LBTCP_ADMIN_TOKEN": ""})[1] == "from-config"
    assert choose_target(None, settings_, "", env)[1] == ""
    wildcard = AdminConfig(listen=Endpoint("0.0.0.0", 1))
    assert choose_target(None, wildcard, None, {})[0] == Endpoint("127.0.0.1", 1)
    with pytest.raises(AdminError, match="port 0"):
        choose_target(None, AdminConfig(listen=Endpoint("127.0.0.1", 0)), None, {})
    with pytest.raises(AdminError, match="cannot go in an HTTP header"):
        choose_target(None, None, "two words", {})
    assert choose_target(None, None, " padded\n", {})[1] == "padded"


def test_describe_change() -> None:
    before = dict(SERVER_A, active=3)
    drained = {"pool": "app", "server": "a", "state": "draining", "weight": 1}
    assert describe_change("app", "a", "drain", before, drained) == (
        "app/a: draining (was healthy): no new sessions, live ones go on, probes go on;"
        " 3 live sessions now"
    )
    assert describe_change("app", "a", "drain", dict(before, state="draining"), drained) == (
        "app/a: already draining, unchanged"
    )
    enabled = dict(drained, state="unknown")
    assert describe_change("app", "a", "enable", dict(before, state="disabled"), enabled) == (
        "app/a: unknown (was disabled): back in rotation as its health allows"
    )
    weighted = dict(drained, state="healthy", weight=5)
    assert describe_change("app", "a", "weight", before, weighted) == (
        "app/a: weight 1 -> 5 (state healthy)"
    )
    assert (
        describe_change("app", "a", "weight", None, weighted) == "app/a: weight 5 (state healthy)"
    )
    assert describe_change("app", "a", "disable", None, None) == "app/a: disable done"


@pytest.mark.parametrize("server", ["s1", "127.0.0.1:9001", "[::1]:9001", "a/b", "x y%2F"])
def test_server_names_travel_as_one_path_segment(server: str) -> None:
    """Names default to the address; the admin API's router must get the name back whole."""
    path = AdminClient._server_path("app.v2", server, "drain")
    assert match("POST", path) == Route(RouteEndpoint.SERVER_ACTION, ("app.v2", server, "drain"))


# --- the client against peers that misbehave -------------------------------------------------


class Peer(http.server.BaseHTTPRequestHandler):
    """Answers as ``self.server.script`` says: (status, headers, body) per path."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server: PeerServer = self.server  # type: ignore[assignment]
        server.requests.append((self.command, self.path, dict(self.headers), body))
        status, headers, payload = server.script(self.path)
        if status == 0:  # hang up without an answer
            self.close_connection = True
            return
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class PeerServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, script: Callable[[str], tuple[int, dict[str, str], bytes]]) -> None:
        super().__init__(("127.0.0.1", 0), Peer)
        self.script = script
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, Any]:
        self.connections += 1
        return super().get_request()


@contextlib.contextmanager
def peer(
    script: Callable[[str], tuple[int, dict[str, str], bytes]],
) -> Iterator[PeerServer]:
    server = PeerServer(script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _json(status: int, document: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(document).encode()


def _client(server: PeerServer, token: str = "", timeout: float = 5.0) -> AdminClient:
    return AdminClient(Endpoint("127.0.0.1", server.server_address[1]), token, timeout)


def test_client_keeps_one_connection_and_sends_the_token() -> None:
    doc = sample_document()
    with peer(lambda path: _json(200, doc)) as server, _client(server, "t0ken") as client:
        assert client.status() == doc
        assert client.status() == doc
        assert client.set_weight("app", "a", 7) == doc
        assert server.connections == 1  # keep-alive
        methods = [(method, path) for method, path, _, _ in server.requests]
        assert methods == [
            ("GET", "/status"),
            ("GET", "/status"),
            ("POST", "/pools/app/servers/a/weight"),
        ]
        _, _, headers, body = server.requests[2]
        assert headers["Authorization"] == "Bearer t0ken"
        assert json.loads(body) == {"weight": 7}


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            _json(401, {"error": "wrong token"}, **{"WWW-Authenticate": "Bearer"}),
            r"refused POST /pools/app/servers/a/drain: the token was refused \(401\): "
            r"wrong token$",
        ),
        (
            _json(404, {"error": "pool 'app' has no server named 'a'"}),
            r"^pool 'app' has no server named 'a' \(404\)$",
        ),
        (
            _json(500, {"error": "internal error: KeyError"}),
            r"answered POST /pools/app/servers/a/drain with 500 Internal Server Error: "
            r"internal error: KeyError$",
        ),
        ((503, {}, b"<html>\n<h1>busy</h1>"), r"with 503 Service Unavailable: <html>$"),
        ((200, {}, b"SSH-2.0-OpenSSH"), r"body that is not JSON"),
        ((200, {}, b"[" * 100_000), r"body that is not JSON"),
        ((500, {}, b"[" * 100_000), r"with 500 Internal Server Error: \[{200}$"),
        ((0, {}, b""), r"cannot reach .*: the connection was closed before an answer came$"),
    ],
)
def test_client_errors_are_one_line(
    answer: tuple[int, dict[str, str], bytes], message: str
) -> None:
    with peer(lambda path: answer) as server, _client(server, "s3cret") as client:
        with pytest.raises(AdminError, match=message) as caught:
            client.server_action("app", "a", "drain")
        assert "\n" not in str(caught.value)


def test_client_without_token_says_how_to_give_one() -> None:
    answer = _json(401, {"error": "this endpoint needs 'Authorization: Bearer <token>'"})
    with peer(lambda path: answer) as server, _client(server) as client:
        with pytest.raises(AdminError, match=r"a token is needed \(401\).*--token") as caught:
            client.server_action("app", "a", "drain")
        assert caught.value.status == 401


def test_client_reconnects_after_the_server_closed_an_idle_connection() -> None:
    doc = sample_document()
    with peer(lambda path: _json(200, doc)) as server, _client(server) as client:
        assert client.status() == doc
        assert client._conn is not None and client._conn.sock is not None
        # What the admin server's idle timeout does to a kept-alive connection.
        client._conn.sock.shutdown(socket.SHUT_RDWR)
        assert client.status() == doc
        assert server.connections == 2


def test_client_times_out_on_a_peer_that_never_answers() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = AdminClient(Endpoint("127.0.0.1", port), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(AdminError, match=r"no answer within 0\.3s$"):
            client.status()
        assert time.monotonic() - started < 2


def test_printable() -> None:
    assert printable("plain: text") == "plain: text"
    assert printable("a\nb\x1b[0m\tc\x00") == "a?b?[0m?c?"


# --- the commands as subprocesses ------------------------------------------------------------


def lbtcp(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("LBTCP_ADMIN_TOKEN", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "lbtcp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=REPO,
        check=False,
    )


def assert_one_line_failure(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.stdout == ""


def test_unreachable_admin_is_one_line_and_exit_1() -> None:
    port = closed_port()
    result = lbtcp("status", "--admin", f"127.0.0.1:{port}")
    assert_one_line_failure(
        result, rf"^lbtcp: cannot reach the admin API at 127\.0\.0\.1:{port}: connection refused"
    )
    result = lbtcp("drain", "app", "s1", "--admin", f"127.0.0.1:{port}")
    assert_one_line_failure(result, r"connection refused")


def test_admin_that_hangs_times_out_with_one_line() -> None:
    with blackhole() as port:
        started = time.monotonic()
        result = lbtcp("status", "--admin", f"127.0.0.1:{port}", "--timeout", "0.5")
        assert time.monotonic() - started < 10
    assert_one_line_failure(result, r"no answer within 0\.5s$")


def test_default_timeout_is_five_seconds() -> None:
    # The default every admin command takes, as the command line states it ...
    for command in (cli.status, cli.drain, cli.enable, cli.disable, cli.weight):
        option = next(param for param in command.params if param.name == "timeout")
        assert option.default == 5.0, command.name
    usage = lbtcp("weight", "--help").stdout
    assert re.search(r"--timeout SECONDS +Seconds to wait [^[]*\[default: 5\.0\b", usage), usage


def test_one_timeout_bounds_the_whole_command() -> None:
    """The ``--timeout`` (5 s unless given, see above) bounds the whole command: one timeout,
    not one for the /status read and another for the POST. Run in this process (the same
    click command as ``lbtcp weight``), so the measured time is the command's own, without
    an interpreter start-up, and with 1 s so that the test does not wait out 5 s."""
    with blackhole() as port:
        started = time.monotonic()
        result = CliRunner().invoke(
            cli.main, ["weight", "app", "s1", "3", "--admin", f"127.0.0.1:{port}", "--timeout", "1"]
        )
        elapsed = time.monotonic() - started
    # As assert_one_line_failure checks of a subprocess: exit 1, one line, nothing on stdout.
    assert result.exit_code == 1, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(r"^lbtcp: .*no answer within 1s$", lines[0]), lines[0]
    assert 1 <= elapsed < 1.8, elapsed


def test_server_errors_reach_the_operator_as_one_line() -> None:
    answer = _json(500, {"error": "internal error: KeyError"})
    with peer(lambda path: answer) as server:
        result = lbtcp("enable", "app", "s1", "--admin", f"127.0.0.1:{server.server_address[1]}")
    assert_one_line_failure(result, r"with 500 Internal Server Error: internal error: KeyError$")


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    port = closed_port()
    result = lbtcp("weight", "app", "s1", "257", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert "257 is not in the range 0<=x<=256" in result.stderr
    assert "cannot reach" not in result.stderr  # refused before anything was sent
    result = lbtcp("status", "--admin", "localhost")
    assert result.returncode == 2
    assert "'localhost' has no port" in result.stderr


def test_config_errors_exit_2_as_check_does(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[admin]\nlisten = "127.0.0.1"\n[globl]\n')
    result = lbtcp("status", "-c", str(bad))
    check = lbtcp("check", str(bad))
    assert result.returncode == check.returncode == 2
    assert result.stderr == check.stderr
    assert "admin.listen" in result.stderr and "globl" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_without_admin_table_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "lbtcp.toml"
    path.write_text(
        '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
        '[pools.app]\n[[pools.app.servers]]\naddress = "127.0.0.1:9"\n'
    )
    result = lbtcp("drain", "app", "s1", "-c", str(path))
    assert_one_line_failure(result, r"has no \[admin\] table")


# --- against a real lbtcp serve --------------------------------------------------------------

FAST_HEALTH = """\
[pools.app.health]
interval = "100ms"
fast_interval = "100ms"
down_interval = "100ms"
timeout = "100ms"
rise = 1
fall = 1
jitter = 0
"""


ANSI_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def admin_config(
    s1: int,
    s2: int,
    *,
    admin_port: int = 0,
    admin_host: str = "127.0.0.1",
    admin_extra: str = "",
    extra: str = "",
) -> str:
    return f"""\
[admin]
listen = "{admin_host}:{admin_port}"
{admin_extra}
[listeners.web]
bind = "127.0.0.1:0"
pool = "app"
[pools.app]
[[pools.app.servers]]
name = "s1"
address = "127.0.0.1:{s1}"
[[pools.app.servers]]
name = "s2"
address = "127.0.0.1:{s2}"
{extra}
"""


def admin_address(proc: Lbtcp) -> str:
    line = proc.wait_line(r"\badmin_listening\b")
    match_ = re.search(r"address=(127\.0\.0\.1:\d+|\[::1\]:\d+)", line)
    assert match_, line
    return match_.group(1)


def status_json(admin: str) -> dict[str, Any]:
    result = lbtcp("status", "--json", "--admin", admin)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def server_entry(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    (pool,) = document["pools"]
    (entry,) = [server for server in pool["servers"] if server["name"] == name]
    return entry


def session_on(backends: Backends, port: int, address: tuple[str, int]) -> socket.socket:
    """A live session through lbtcp that landed on the server at ``port`` (round robin over
    two servers: one of two sessions does); the other one is closed."""
    for _ in range(2):
        before = backends.accepted[port]
        sock = open_session(address)
        if backends.accepted[port] > before:
            return sock
        sock.close()
    raise AssertionError(f"no session reached the server on port {port}")


def sessions_by_server(
    backends: Backends, ports: tuple[int, ...], count: int, address: tuple[str, int]
) -> list[int]:
    before = [backends.accepted[port] for port in ports]
    for index in range(count):
        payload = f"session {index}".encode()
        assert roundtrip(address, payload) == payload
    return [backends.accepted[port] - was for port, was in zip(ports, before, strict=True)]


def test_drain_keeps_the_live_session_and_sends_new_ones_elsewhere(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2))
    admin, address = admin_address(proc), proc.address()
    live = session_on(backends, s1, address)
    try:
        result = lbtcp("drain", "app", "s1", "--admin", admin)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            "app/s1: draining (was healthy): no new sessions, live ones go on, probes go on;"
            " 1 live session now\n"
        )
        proc.wait_line(r"server_state .*server=s1 old=healthy new=draining reason=admin")

        # The live session on s1 keeps flowing, byte-exact, both ways at once.
        payload = os.urandom(4 * 1024 * 1024)
        sender = threading.Thread(target=live.sendall, args=(payload,))
        sender.start()
        digest, received = hashlib.sha256(), 0
        while received < len(payload):
            chunk = live.recv(256 * 1024)
            assert chunk, f"the drained server's session ended after {received} bytes"
            digest.update(chunk)
            received += len(chunk)
        sender.join(10)
        assert digest.digest() == hashlib.sha256(payload).digest()

        # No new session goes to s1: counted at the servers and in the access log.
        mark = len(proc.lines)
        assert sessions_by_server(backends, (s1, s2), 20, address) == [0, 20]
        wait_until(
            lambda: len([line for line in proc.lines[mark:] if " access " in line]) >= 20,
            what="20 access lines",
        )
        servers = [
            re.search(r"server=(\S+)", line).group(1)  # type: ignore[union-attr]
            for line in proc.lines[mark:]
            if " access " in line
        ]
        assert servers == ["s2"] * 20

        # lbtcp status shows it, in plain words since stdout is not a terminal.
        result = lbtcp("status", "--admin", admin)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout
        assert re.search(r"^app degraded 1/2 +s1 +draining ", result.stdout, re.MULTILINE)
        assert re.search(
            r"\bs1 +draining +1 +1 +1 +0 +\d+s ago +admin: drain \(was healthy\)$",
            row(result.stdout, "s1"),
        )
        assert re.search(r"\bs2 +healthy +1 +0 +20 +0 +- +-$", row(result.stdout, "s2"))
        document = status_json(admin)
        entry = server_entry(document, "s1")
        assert (entry["state"], entry["admin"], entry["active"]) == ("draining", "draining", 1)
        assert document["pools"][0]["verdict"] == "degraded"

        # enable puts it back.
        result = lbtcp("enable", "app", "s1", "--admin", admin)
        assert result.returncode == 0, result.stderr
        assert result.stdout == (
            "app/s1: healthy (was draining): back in rotation as its health allows\n"
        )
        assert sessions_by_server(backends, (s1, s2), 4, address) == [2, 2]
        assert re.search(r"\bs1 +healthy ", row(lbtcp("status", "--admin", admin).stdout, "s1"))
        # The live session outlived it all.
        live.sendall(b"still here")
        assert live.recv(64) == b"still here"
    finally:
        live.close()


def test_weight_changes_the_weight_shown_and_the_share(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2))
    admin, address = admin_address(proc), proc.address()
    result = lbtcp("weight", "app", "s1", "5", "--admin", admin)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "app/s1: weight 1 -> 5 (state healthy)\n"
    proc.wait_line(r"server_weight .*server=s1")
    assert re.search(
        r"\bs1 +healthy +5 +0 +0 ", row(lbtcp("status", "--admin", admin).stdout, "s1")
    )
    assert server_entry(status_json(admin), "s1")["weight"] == 5
    # Smooth weighted round robin at 5:1 gives s1 10 of 12 (give or take the transient of
    # the change); at the old 1:1 it would be 6.
    to_s1, to_s2 = sessions_by_server(backends, (s1, s2), 12, address)
    assert 9 <= to_s1 <= 11 and to_s1 + to_s2 == 12
    # Weight 0: no new sessions at all.
    result = lbtcp("weight", "app", "s1", "0", "--admin", admin)
    assert result.stdout == "app/s1: weight 5 -> 0 (state healthy)\n"
    assert sessions_by_server(backends, (s1, s2), 6, address) == [0, 6]
    result = lbtcp("weight", "app", "s1", "0", "--admin", admin)
    assert result.stdout == "app/s1: weight already 0, unchanged\n"


def test_disable_stops_the_probes(backends: Backends, start_lbtcp: StartLbtcp) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2, extra=FAST_HEALTH))
    admin = admin_address(proc)
    proc.wait_line(r"server_state .*server=s1 .*new=healthy")
    proc.wait_line(r"server_state .*server=s2 .*new=healthy")
    result = lbtcp("disable", "app", "s1", "--admin", admin)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "app/s1: disabled (was healthy): out of rotation and not probed, live sessions go on\n"
    )
    # Probes are connections at the servers (they send nothing). s2 goes on being probed
    # every 100 ms; s1 gets none, but for one that was already on its way.
    probes_s1, probes_s2 = backends.accepted[s1], backends.accepted[s2]
    wait_until(lambda: backends.accepted[s2] >= probes_s2 + 8, what="8 more probes of s2")
    assert backends.accepted[s1] <= probes_s1 + 1
    assert re.search(r"\bs1 +disabled ", row(lbtcp("status", "--admin", admin).stdout, "s1"))
    # enable starts them again.
    result = lbtcp("enable", "app", "s1", "--admin", admin)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: backends.accepted[s1] >= probes_s1 + 4, what="s1 probed again")
    proc.wait_line(r"server_state .*server=s1 .*new=healthy", start=0)


def test_token_from_config_env_and_option(
    backends: Backends, start_lbtcp: StartLbtcp, tmp_path: Path
) -> None:
    s1, s2 = backends.echo(), backends.echo()
    port = closed_port()
    proc = start_lbtcp(admin_config(s1, s2, admin_port=port, admin_extra='token = "s3cret-t0ken"'))
    admin = admin_address(proc)
    assert admin == f"127.0.0.1:{port}"
    config = str(proc.config_path)

    result = lbtcp("drain", "app", "s1", "--admin", admin)
    assert_one_line_failure(
        result, r"refused POST /pools/app/servers/s1/drain: a token is needed \(401\).*--token"
    )
    result = lbtcp("drain", "app", "s1", "--admin", admin, "--token", "guess")
    assert_one_line_failure(result, r"the token was refused \(401\): wrong token$")
    result = lbtcp("drain", "app", "s1", "--admin", admin, env={"LBTCP_ADMIN_TOKEN": "guess"})
    assert_one_line_failure(result, r"the token was refused \(401\)")
    # Nothing changed.
    assert server_entry(status_json(admin), "s1")["admin"] == "enabled"

    # -c: the address and the token from the config.
    result = lbtcp("drain", "app", "s1", "-c", config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("app/s1: draining (was healthy)")
    result = lbtcp("status", "-c", config)
    assert re.search(r"\bs1 +draining ", row(result.stdout, "s1"))
    # The environment variable wins over the config's token; --token over both.
    result = lbtcp("enable", "app", "s1", "-c", config, env={"LBTCP_ADMIN_TOKEN": "guess"})
    assert_one_line_failure(result, r"the token was refused")
    result = lbtcp(
        "enable", "app", "s1", "--admin", admin, env={"LBTCP_ADMIN_TOKEN": "s3cret-t0ken"}
    )
    assert result.returncode == 0, result.stderr
    result = lbtcp(
        "disable",
        "app",
        "s2",
        "-c",
        config,
        "--token",
        "s3cret-t0ken",
        env={"LBTCP_ADMIN_TOKEN": "guess"},
    )
    assert result.returncode == 0, result.stderr
    states = {name: server_entry(status_json(admin), name)["admin"] for name in ("s1", "s2")}
    assert states == {"s1": "enabled", "s2": "disabled"}


def test_unknown_pool_or_server_is_the_servers_message(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2))
    admin = admin_address(proc)
    result = lbtcp("drain", "app", "s9", "--admin", admin)
    assert_one_line_failure(result, r"^lbtcp: pool 'app' has no server named 's9' \(404\)$")
    result = lbtcp("weight", "web", "s1", "3", "--admin", admin)
    assert_one_line_failure(result, r"^lbtcp: no pool named 'web' \(pools: app\) \(404\)$")


def test_watch_redraws_every_second_until_ctrl_c(
    backends: Backends, start_lbtcp: StartLbtcp
) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2))
    admin = admin_address(proc)
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    env = dict(os.environ, TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "lbtcp", "status", "--watch", "--admin", admin],
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    os.close(terminal)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's last user is gone
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:

        def plain() -> str:
            return ANSI_STYLE.sub("", screen.decode(errors="replace"))

        def uptimes() -> list[str]:
            return re.findall(r"lbtcp 0\.1\.0 pid \d+, up (\d+s)", plain())

        # Three frames with three different uptimes: two redraws with fresh data.
        wait_until(lambda: len(set(uptimes())) >= 3, timeout=10, what="three frames")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
        assert watcher.stderr is not None
        errors = watcher.stderr.read().decode()
        assert "Traceback" not in errors and "Aborted" not in errors, errors
        text = screen.decode(errors="replace")
        assert "\x1b[" in text  # a terminal: redrawn in place, in colour
        assert re.search(r"\bs1 +healthy ", plain())
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait(5)
        if watcher.stderr is not None:
            watcher.stderr.close()
        reader.join(5)
        os.close(controller)


def test_admin_on_ipv6_loopback(backends: Backends, start_lbtcp: StartLbtcp) -> None:
    s1, s2 = backends.echo(), backends.echo()
    proc = start_lbtcp(admin_config(s1, s2, admin_host="[::1]"))
    admin = admin_address(proc)
    assert admin.startswith("[::1]:")
    result = lbtcp("disable", "app", "s2", "--admin", admin)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\bs2 +disabled ", row(lbtcp("status", "--admin", admin).stdout, "s2"))


@pytest.mark.parametrize("args", [(), ("--json",), ("--watch",)])
def test_status_into_a_pipe_that_closes_early(args: tuple[str, ...]) -> None:
    """``lbtcp status | head -1`` with a large document: exit 0, no traceback."""
    doc = sample_document()
    # 1,500 rows: about 180 KB of text, the smallest of the three outputs, well over the 64 KiB
    # of a pipe, so the writer is still writing when the reader leaves.
    doc["pools"][0]["servers"] = [dict(SERVER_A, name=f"s{i}") for i in range(1500)]
    with peer(lambda path: _json(200, doc)) as server:
        admin = f"127.0.0.1:{server.server_address[1]}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbtcp", "status", "--admin", admin, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline()
        proc.stdout.close()
        try:
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        errors = proc.stderr.read().decode()
        proc.stderr.close()
    assert errors == ""
