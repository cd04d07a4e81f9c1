"""The admin HTTP server: status codes, limits, keep-alive, pipelining and hostile input.

The pure pieces of ``lbtcp.admin.routes`` (matching, auth, the weight body) are tested
directly; everything that speaks HTTP is tested against a real ``lbtcp serve`` over 127.0.0.1,
with answers parsed by h11 on the client side, as a real HTTP client would parse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import random
import re
import resource
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbtcp.addresses import Endpoint
from lbtcp.admin import server as admin_server
from lbtcp.admin.routes import (
    Request,
    Response,
    Route,
    Router,
    authorize,
    match,
    parse_weight,
)
from lbtcp.config import AdminConfig, PoolConfig, parse_config
from lbtcp.log import Log
from lbtcp.pool import Pool, Server
from lbtcp.runtime import Runtime
from tests.inprocess import run as run_in_process
from tests.inprocess import running
from tests.support import EchoProcess, Lbtcp, open_session

TOKEN = "t0ken-for-tests"

# --- a small HTTP client on h11 ------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    keep_alive: bool = True

    def json(self) -> dict[str, object]:
        assert self.headers.get("content-type") == "application/json", self.headers
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document

    @property
    def error(self) -> str:
        document = self.json()
        assert set(document) == {"error"}, document
        message = document["error"]
        assert isinstance(message, str) and message
        return message


def admin_address(proc: Lbtcp) -> tuple[str, int]:
    line = proc.wait_line(r"\badmin_listening\b")
    match_ = re.search(r'address(?:=|": ")(\[[0-9a-f:]+\]|[0-9.]+):(\d+)', line)
    assert match_, line
    return match_.group(1).strip("[]"), int(match_.group(2))


class Http:
    """One client connection; requests and replies framed and parsed by h11."""

    def __init__(self, address: tuple[str, int], timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self.host = f"{address[0]}:{address[1]}"

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Http:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> bytes:
        fields = [("Host", self.host), *(headers or {}).items()]
        if body or method == "POST":
            fields.append(("Content-Length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=path, headers=fields))
        if body:
            data += self.conn.send(h11.Data(data=body))
        return data + self.conn.send(h11.EndOfMessage())

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> Reply:
        self.sock.sendall(self.encode(method, path, headers, body))
        return self.reply()

    def reply(self) -> Reply:
        """The next answer on this connection (h11 raises on anything malformed)."""
        response: h11.Response | None = None
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                self.conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected {event!r}")
        assert response is not None
        headers = {k.decode().lower(): v.decode() for k, v in response.headers}
        keep_alive = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        if keep_alive:
            self.conn.start_next_cycle()
        return Reply(response.status_code, headers, bytes(body), keep_alive)


def get(address: tuple[str, int], path: str, headers: dict[str, str] | None = None) -> Reply:
    with Http(address) as http:
        return http.request("GET", path, headers)


def post(
    address: tuple[str, int],
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> Reply:
    with Http(address) as http:
        return http.request("POST", path, headers, body)


def parse_raw_reply(data: bytes, method: str = "GET") -> Reply:
    """Parse bytes the server sent in answer to raw (possibly malformed) bytes."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response: h11.Response | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        elif not isinstance(event, h11.InformationalResponse):
            raise AssertionError(f"unexpected {event!r} in {data!r}")
    assert response is not None
    headers = {k.decode().lower(): v.decode() for k, v in response.headers}
    return Reply(response.status_code, headers, bytes(body))


def read_all(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything until the server closes; True if it ended with a reset."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        return b"".join(chunks), True
    return b"".join(chunks), False


def raw(address: tuple[str, int], data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)[0]


# --- the pure pieces -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expect"),
    [
        ("GET", "/status", "status"),
        ("HEAD", "/metrics", "metrics"),
        ("GET", "/healthz", "healthz"),
        ("GET", "/", "page"),
        ("POST", "/pools/app/servers/a/drain", "server_action"),
        ("POST", "/pools/app/servers/127.0.0.1%3A9000/weight", "server_action"),
        ("POST", "/status", 405),
        ("GET", "/pools/app/servers/a/enable", 405),
        ("POST", "/pools/app/servers/a/explode", 404),
        ("POST", "/pools//servers/a/drain", 404),
        ("POST", "/reload", "reload"),
        ("GET", "/reload", 405),
        ("GET", "/status/", 404),
        ("GET", "/nope", 404),
    ],
)
def test_match(method: str, path: str, expect: str | int) -> None:
    result = match(method, path)
    if isinstance(expect, int):
        assert isinstance(result, Response) and result.status == expect
        if expect == 405:
            assert dict(result.headers)["Allow"] in ("GET, HEAD", "POST")
    else:
        assert isinstance(result, Route) and result.endpoint.value == expect


def test_match_decodes_each_name_on_its_own() -> None:
    route = match("POST", "/pools/a%2Fb/servers/127.0.0.1%3A9000/disable")
    assert isinstance(route, Route)
    assert route.params == ("a/b", "127.0.0.1:9000", "disable")


def test_reload_is_a_write_that_needs_the_token() -> None:
    route = match("POST", "/reload")
    assert isinstance(route, Route)
    assert route.is_write


def _auth(token: str, auth_reads: bool, header: bytes | None, write: bool) -> int | None:
    config = AdminConfig(Endpoint("127.0.0.1", 0), token=token, auth_reads=auth_reads)
    path = "/pools/p/servers/s/drain" if write else "/status"
    route = match("POST" if write else "GET", path)
    assert isinstance(route, Route)
    headers = ((b"authorization", header),) if header is not None else ()
    denied = authorize(Request("POST" if write else "GET", path, headers), route, config)
    return None if denied is None else denied.status


def test_authorize_rules() -> None:
    good = f"Bearer {TOKEN}".encode()
    assert _auth("", False, None, write=True) is None  # no token: open (loopback only)
    assert _auth(TOKEN, False, None, write=True) == 401
    assert _auth(TOKEN, False, b"Bearer nope", write=True) == 401
    assert _auth(TOKEN, False, b"Basic " + TOKEN.encode(), write=True) == 401
    assert _auth(TOKEN, False, good, write=True) is None
    assert _auth(TOKEN, False, b"bearer  " + TOKEN.encode(), write=True) is None
    assert _auth(TOKEN, False, None, write=False) is None  # reads open without auth_reads
    assert _auth(TOKEN, True, None, write=False) == 401
    assert _auth(TOKEN, True, good, write=False) is None


@given(st.binary(max_size=300))
def test_authorize_never_lets_a_wrong_header_in(header: bytes) -> None:
    allowed = _auth(TOKEN, True, header, write=True) is None
    scheme, _, credentials = header.strip().partition(b" ")
    assert allowed == (scheme.lower() == b"bearer" and credentials.strip() == TOKEN.encode())


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b'{"weight": 3}', 3),
        (b'{"weight": 0}', 0),
        (b'{"weight": 256}', 256),
        (b'{"weight": 4.0}', 4),
        (b'{"weight": 257}', "weight 257 is out of range (0..256)"),
        (b'{"weight": -1}', "weight -1 is out of range (0..256)"),
        (b'{"weight": 2.5}', "weight must be a whole number in 0..256"),
        (b'{"weight": true}', "weight must be a whole number in 0..256"),
        (b'{"weight": "3"}', "weight must be a whole number in 0..256"),
        (b'{"weight": 3, "x": 1}', "unknown key 'x' in the body"),
        (b"{}", 'the body has no "weight"'),
        (b"[3]", "the body must be a JSON object"),
        (b"", "the body is empty"),
        (b"weight=3", "the body is not JSON"),
        (b"[" * 50000, "the body is not JSON"),
        (b'{"weight": 1e999}', "weight must be a whole number"),
        (b"\xff\xfe\x00", "the body is not JSON"),
    ],
)
def test_parse_weight(body: bytes, expect: int | str) -> None:
    result = parse_weight(body)
    if isinstance(expect, int):
        assert result == expect
    else:
        assert isinstance(result, str) and result.startswith(expect), result


@given(st.binary(max_size=200) | st.text(max_size=100).map(str.encode))
def test_parse_weight_is_a_weight_in_range_or_a_message(body: bytes) -> None:
    result = parse_weight(body)
    assert isinstance(result, str) or 0 <= result <= 256


def test_a_handler_bug_is_a_500_and_reported_never_raised() -> None:
    class Broken:
        """A runtime missing what the /status document reads."""

        draining = False

    reported: list[tuple[str, BaseException]] = []
    config = AdminConfig(Endpoint("127.0.0.1", 0))
    router = Router(Broken(), config, lambda what, exc: reported.append((what, exc)))  # type: ignore[arg-type]
    reply = router.handle(Request("GET", "/status"))  # status_document() fails on this object
    assert reply.status == 500 and json.loads(reply.body)["error"].startswith("internal error")
    assert reported and reported[0][0] == "GET /status"
    assert router.handle(Request("GET", "/healthz")).status == 200  # and it goes on


def test_pool_set_weight_feeds_the_balancer() -> None:
    pool_config = PoolConfig("app", servers=())
    pool = Pool(pool_config, [Server("a", "127.0.0.1", 1), Server("b", "127.0.0.1", 2)])
    client = pool.client("127.0.0.1", 5)
    assert pool.set_weight("a", 3, 0.0) == 1
    picks = [pool.choose(client) for _ in range(40)]
    assert [s.name for s in picks if s is not None].count("a") == 30
    assert pool.set_weight("a", 0, 0.0) == 3
    assert {s.name for s in (pool.choose(client) for _ in range(5)) if s is not None} == {"b"}
    with pytest.raises(KeyError):
        pool.set_weight("zz", 1, 0.0)
    with pytest.raises(ValueError, match="out of range"):
        pool.set_weight("a", 257, 0.0)
    assert pool.servers["a"].weight == 0


# --- a live lbtcp ----------------------------------------------------------------------------

# The data plane's pool has a name the fuzzer never produces, so the fuzzer's control requests
# can only ever reach the decoy pool "app".
DATA_POOL = "dataplane-7f3a"


def live_config(echo_port: int, decoy_port: int, admin: str = "") -> str:
    return f"""\
[global]
access_log = false
[admin]
listen = "127.0.0.1:0"
{admin}
[listeners.web]
bind = "127.0.0.1:0"
pool = "{DATA_POOL}"
[pools.{DATA_POOL}]
[[pools.{DATA_POOL}.servers]]
address = "127.0.0.1:{echo_port}"
name = "echo"
[pools.app]
[[pools.app.servers]]
address = "127.0.0.1:{decoy_port}"
name = "a"
[[pools.app.servers]]
address = "127.0.0.1:{decoy_port}"
name = "b"
"""


@dataclass
class Live:
    proc: Lbtcp
    admin: tuple[str, int]
    data: tuple[str, int]
    echo: EchoProcess
    tmp: Path = field(default_factory=Path)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    echo = EchoProcess(2)
    tmp = tmp_path_factory.mktemp("admin")
    proc = Lbtcp(live_config(echo.ports[0], echo.ports[1]), tmp)
    try:
        yield Live(proc, admin_address(proc), proc.address(), echo, tmp)
    finally:
        proc.stop()
        echo.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """An instance with a token and auth_reads."""
    echo = EchoProcess(2)
    tmp = tmp_path_factory.mktemp("guarded")
    text = live_config(echo.ports[0], echo.ports[1], f'token = "{TOKEN}"\nauth_reads = true')
    proc = Lbtcp(text, tmp)
    try:
        yield Live(proc, admin_address(proc), proc.address(), echo, tmp)
    finally:
        proc.stop()
        echo.stop()


def assert_error(reply: Reply, status: int, contains: str = "") -> None:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert contains in reply.error


def test_healthz_status_metrics_and_page(live: Live) -> None:
    reply = get(live.admin, "/healthz")
    assert (reply.status, reply.body, reply.headers["content-type"]) == (
        200,
        b"ok\n",
        "text/plain; charset=utf-8",
    )
    status = get(live.admin, "/status")
    assert status.status == 200
    document = status.json()
    assert [pool["name"] for pool in document["pools"]] == [DATA_POOL, "app"]  # type: ignore[union-attr, index]
    metrics = get(live.admin, "/metrics")
    assert metrics.status == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert b"lbtcp_" in metrics.body
    page = get(live.admin, "/")
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    # The page is another helper's file: when it is there it is served, else a JSON 404.
    if page.status == 404:
        assert "status page is not installed" in page.error
    else:
        assert page.status == 200 and b"<html" in page.body.lower()


def test_head_gives_the_headers_without_the_body(live: Live) -> None:
    with Http(live.admin) as http:
        reply = http.request("HEAD", "/healthz")
        assert (reply.status, reply.body, reply.headers["content-length"]) == (200, b"", "3")
        assert http.request("GET", "/healthz").body == b"ok\n"


def test_400_for_a_malformed_request(live: Live) -> None:
    reply = parse_raw_reply(raw(live.admin, b"THIS IS NOT HTTP\r\n\r\n"))
    assert_error(reply, 400, "malformed HTTP request")
    assert reply.headers["connection"] == "close"
    reply = parse_raw_reply(
        raw(live.admin, b"GET http://elsewhere/status HTTP/1.1\r\nHost: x\r\n\r\n")
    )
    assert_error(reply, 400, "must be a path")


def test_400_for_a_bad_weight_body_names_the_problem(live: Live) -> None:
    path = "/pools/app/servers/a/weight"
    assert_error(post(live.admin, path, b'{"weight": 999}'), 400, "weight 999 is out of range")
    assert_error(post(live.admin, path, b"nope"), 400, "the body is not JSON")
    assert_error(post(live.admin, path, b'{"wieght": 1}'), 400, "unknown key 'wieght'")


def test_404_names_the_unknown_pool_or_server(live: Live) -> None:
    assert_error(get(live.admin, "/nothing"), 404, "no such path '/nothing'")
    assert_error(post(live.admin, "/pools/zz/servers/a/drain"), 404, "no pool named 'zz'")
    assert_error(
        post(live.admin, "/pools/app/servers/zz/drain"), 404, "pool 'app' has no server named 'zz'"
    )


def test_405_has_allow(live: Live) -> None:
    reply = post(live.admin, "/status")
    assert_error(reply, 405, "POST is not allowed on /status")
    assert reply.headers["allow"] == "GET, HEAD"
    reply = get(live.admin, "/pools/app/servers/a/drain")
    assert_error(reply, 405)
    assert reply.headers["allow"] == "POST"


def test_413_for_a_declared_or_a_chunked_body_over_64_kib(live: Live) -> None:
    head = b"POST /pools/app/servers/a/weight HTTP/1.1\r\nHost: x\r\nContent-Length: 65537\r\n\r\n"
    # Answered from the headers alone, before any body byte is sent.
    with socket.create_connection(live.admin, timeout=5) as sock:
        sock.sendall(head)
        reply = parse_raw_reply(read_all(sock)[0])
    assert_error(reply, 413, "the body exceeds 65536 bytes")
    assert reply.headers["connection"] == "close"
    chunk = b"%x\r\n%s\r\n" % (40000, b"x" * 40000)
    chunked = (
        b"POST /pools/app/servers/a/weight HTTP/1.1\r\nHost: x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 2 + b"0\r\n\r\n"
    )
    assert_error(parse_raw_reply(raw(live.admin, chunked)), 413, "the body exceeds")


def test_a_body_of_exactly_64_kib_is_read(live: Live) -> None:
    body = b'{"weight": 1}' + b" " * (65536 - 13)
    reply = post(live.admin, "/pools/app/servers/a/weight", body)
    assert reply.status == 200, reply.body


def test_431_for_headers_over_16_kib_in_one_read_or_many(live: Live) -> None:
    big = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
    for data in (big, big[:-4]):  # whole, and a head that has not ended at 16 KiB
        reply = parse_raw_reply(raw(live.admin, data))
        assert_error(reply, 431, "exceed 16384 bytes")
    many = b"GET /status HTTP/1.1\r\nHost: x\r\n" + b"X-H: 0123456789\r\n" * 1100 + b"\r\n"
    assert_error(parse_raw_reply(raw(live.admin, many)), 431)
    # Just under the limit is fine.
    fine = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n"
    assert parse_raw_reply(raw(live.admin, fine)).status == 200


def test_401_with_www_authenticate_and_the_json_body(guarded: Live) -> None:
    reply = get(guarded.admin, "/status")
    assert_error(reply, 401, "Authorization: Bearer")
    assert reply.headers["www-authenticate"] == 'Bearer realm="lbtcp"'
    reply = get(guarded.admin, "/status", {"Authorization": "Bearer wrong"})
    assert_error(reply, 401, "wrong token")
    assert reply.headers["www-authenticate"] == 'Bearer realm="lbtcp", error="invalid_token"'
    ok = get(guarded.admin, "/status", {"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200


def test_keep_alive_two_requests_on_one_connection(live: Live) -> None:
    with Http(live.admin) as http:
        first = http.request("GET", "/healthz")
        assert first.keep_alive and first.status == 200
        second = http.request("GET", "/status")
        assert second.status == 200 and second.json()["pools"]
        # An error that leaves the framing intact keeps the connection too.
        assert http.request("GET", "/nope").status == 404
        assert http.request("GET", "/healthz").status == 200


def test_pipelined_requests_are_answered_in_order(live: Live) -> None:
    requests = [
        ("GET", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("GET", b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("HEAD", b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "POST",
            b"POST /pools/zz/servers/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ),
        ("GET", b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"),
    ]
    with Http(live.admin) as http:
        http.sock.sendall(b"".join(data for _, data in requests))  # all in one segment
        replies = []
        for method, _ in requests:
            # The client-side parser needs to know each request's method (HEAD framing).
            http.conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            http.conn.send(h11.EndOfMessage())
            replies.append(http.reply())
    assert [r.status for r in replies] == [200, 404, 200, 404, 200]
    assert replies[0].body == b"ok\n" and replies[2].body == b""
    assert "no pool named 'zz'" in replies[3].error and replies[4].json()["pools"]


def test_lingering_close_delivers_every_answer_despite_unread_bytes(live: Live) -> None:
    # A client that reads slowly has answers queued in lbtcp's socket when a 413 ends the
    # connection while its body is still arriving. A plain close() with unread bytes makes
    # the kernel send an RST and throw those queued answers away; the lingering close
    # (answer, FIN, drop what arrives) delivers all of them.
    count = 60
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(live.admin)
        sock.sendall(
            b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n" * count
            + b"POST /pools/app/servers/a/weight HTTP/1.1\r\nHost: x\r\n"
            + b"Content-Length: 900000\r\n\r\n"
        )
        time.sleep(0.3)  # lbtcp answers and ends the connection; the answers still queue
        with contextlib.suppress(OSError):
            sock.sendall(b"x" * 20_000)  # the body goes on arriving
        data, _ = read_all(sock)
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(data)
    statuses = []
    for _ in range(count + 1):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            assert event is not h11.NEED_DATA, f"answers lost after {len(statuses)}"
            if isinstance(event, h11.Response):
                statuses.append(event.status_code)
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    assert statuses == [200] * count + [413]


# --- hostile input while the data plane carries bytes ------------------------------------


class Transfer(threading.Thread):
    """Byte-counted sessions through the data plane, each checked by SHA-256, until stopped."""

    def __init__(self, address: tuple[str, int], size: int = 1 << 20) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.size = size
        self.stop = threading.Event()
        self.sessions = 0
        self.bytes = 0
        self.failures: list[str] = []

    def run(self) -> None:
        rng = random.Random(8)
        while not self.stop.is_set() and not self.failures:
            payload = rng.randbytes(self.size)
            try:
                echoed = self._session(payload)
            except OSError as exc:
                self.failures.append(f"session {self.sessions}: {exc!r}")
                return
            if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
                self.failures.append(f"session {self.sessions}: {len(echoed)} bytes, bad digest")
                return
            self.sessions += 1
            self.bytes += len(echoed)

    def _session(self, payload: bytes) -> bytes:
        with socket.create_connection(self.address, timeout=10) as sock:
            sender = threading.Thread(target=self._send, args=(sock, payload), daemon=True)
            sender.start()
            chunks = []
            received = 0
            while received < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
            sender.join(10)
            return b"".join(chunks)

    @staticmethod
    def _send(sock: socket.socket, payload: bytes) -> None:
        with contextlib.suppress(OSError):
            for start in range(0, len(payload), 32768):
                sock.sendall(payload[start : start + 32768])
            sock.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def transfer(live: Live) -> Iterator[Transfer]:
    worker = Transfer(live.data)
    worker.start()
    yield worker
    worker.stop.set()
    worker.join(30)


TOKENS = st.sampled_from(
    ["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "G\x00T", "", "GETT"]
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "/",
            "/status",
            "/metrics",
            "/healthz",
            "/reload",
            "/pools/app/servers/a/drain",
            "/pools/app/servers/b/enable",
            "/pools/app/servers/a/disable",
            "/pools/app/servers/b/weight",
            "/pools/app/servers/%ff%fe/weight",
            "/pools/%2e%2e/servers/a/drain",
            "*",
            "http://x/status",
            "/status?x=1#y",
            "//",
            "/pools/app/servers/a/drain/",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=60).map(
        lambda t: "/" + t
    ),
    st.builds(
        lambda p, s, a: f"/pools/{p}/servers/{s}/{a}",
        st.sampled_from(["app", "x", "", "%00"]),
        st.sampled_from(["a", "b", "zz", "", "%41"]),
        st.sampled_from(["drain", "enable", "disable", "weight", "x"]),
    ),
)
HEADER_NAMES = st.sampled_from(
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Authorization",
        "Expect",
        "Connection",
        "Accept",
        "X-Junk",
        "Bad Name",
        "",
    ]
)
HEADER_VALUES = st.one_of(
    st.sampled_from(
        [
            "chunked",
            "close",
            "100-continue",
            "Bearer x",
            "0",
            "5",
            "-1",
            "99999999999999999999",
            "application/openmetrics-text",
            "",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=40),
)
BODIES = st.one_of(
    st.just(b""),
    st.sampled_from([b'{"weight": 1}', b'{"weight": 300}', b"[" * 3000, b"0\r\n\r\n"]),
    st.binary(max_size=300),
    st.integers(60_000, 70_000).map(lambda n: b"z" * n),
)


@st.composite
def hostile_requests(draw: st.DrawFn) -> tuple[bytes, str, bool]:
    """(bytes to send, the method, whether to half-close afterwards)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=500)), "GET", True
    method = draw(TOKENS)
    path = draw(PATHS)
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTP/1", ""]))
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=6))
    body = draw(BODIES)
    if draw(st.booleans()):
        headers.append(("Content-Length", str(len(body))))
    if draw(st.integers(0, 7)) == 0:
        headers.append(("X-Huge", "h" * draw(st.integers(15_000, 20_000))))
    lines = [f"{method} {path} {version}".rstrip(), *(f"{n}: {v}" for n, v in headers)]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    cut = draw(st.none() | st.integers(0, len(data)))
    if cut is not None:
        data = data[:cut]  # half-sent
    return data, method, True


def _check_answer(data: bytes, method: str, reset: bool) -> None:
    if not data:
        return  # nothing complete arrived before the EOF (or a reset): closed, no answer due
    reply = parse_raw_reply(data, "HEAD" if method == "HEAD" else "GET")
    assert 200 <= reply.status < 300 or 400 <= reply.status < 500, (reply.status, reply.body)
    if reply.status < 300:
        assert method in ("GET", "HEAD", "POST"), (method, reply.status)
    if method != "HEAD" and reply.status >= 400:
        assert reply.error
    if reply.status == 405:
        assert reply.headers["allow"] in ("GET, HEAD", "POST")
    if reply.status == 401:
        assert reply.headers["www-authenticate"].startswith("Bearer")


# Transfer sessions completed when the first and the last fuzz example ran: the transfer must
# have moved bytes *while* the hostile requests arrived, not only before or after them.
DURING_FUZZ: dict[str, int] = {}


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=hostile_requests())
def test_hostile_requests_get_well_formed_answers_and_the_data_plane_goes_on(
    live: Live, transfer: Transfer, request: tuple[bytes, str, bool]
) -> None:
    data, method, _ = request
    DURING_FUZZ.setdefault("first", transfer.sessions)
    with socket.create_connection(live.admin, timeout=5) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        answer, reset = read_all(sock, timeout=8)
    # Several pipelined answers can come back for one blob: the first must be well formed.
    _check_answer(answer, method, reset)
    DURING_FUZZ["last"] = transfer.sessions
    assert live.proc.proc.poll() is None
    assert not transfer.failures, transfer.failures


def test_after_the_fuzz_the_process_serves_and_the_transfer_was_intact(
    live: Live, transfer: Transfer
) -> None:
    # Runs after the property test (file order): the transfer ran throughout it.
    overlap = DURING_FUZZ["last"] - DURING_FUZZ["first"]
    assert overlap >= 3, f"only {overlap} transfer sessions completed during the fuzz"
    transfer.stop.set()
    transfer.join(30)
    assert not transfer.failures, transfer.failures
    assert transfer.sessions >= 3 and transfer.bytes == transfer.sessions * transfer.size
    assert get(live.admin, "/healthz").status == 200
    assert not live.proc.matching(r"admin_error|Traceback")
    with open_session(live.data, b"still here") as sock:
        sock.sendall(b"!")
        assert sock.recv(1) == b"!"


def test_a_client_that_never_reads_is_not_read_either(live: Live) -> None:
    # Pipelined /status requests from a client that reads nothing: lbtcp stops reading once
    # its write buffer is full rather than buffering answers without bound.
    request = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(live.admin, timeout=5) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and sent < 64 * 1024 * 1024:
            _, writable, _ = select.select([], [sock], [], 1.0)
            if not writable:
                break  # lbtcp stopped reading: our send buffer stays full
            try:
                sent += sock.send(request * 256)
            except BlockingIOError:
                continue
        # Kernel buffers on both sides hold a few MiB; lbtcp itself about one read.
        assert time.monotonic() < deadline and sent < 32 * 1024 * 1024, sent
        rss = live.proc.rss_bytes()
        assert get(live.admin, "/healthz").status == 200
    assert rss < 200 * 1024 * 1024


# --- the limits in time and count ------------------------------------------------------------


# The admin server's time bound, shortened for the test that waits it out: the same
# AdminServer and Router as ``lbtcp serve`` runs, in this process, with ``request_timeout`` set.
# Long enough that the 1,000 connects and the three later connections are all made well
# within it even on a loaded machine (they take well under 0.5 s), so that only the last ones
# held can time out.
SHORT_TIMEOUT = 2.0


def _watched_runtime(
    loop: asyncio.AbstractEventLoop,
) -> tuple[Runtime, AdminConfig, list[dict[str, object]]]:
    """A one-listener Runtime with an admin API (not built yet), its ``[admin]``, and the list
    that collects whatever reaches ``loop``'s exception handler."""
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    config = parse_config(
        {
            "admin": {"listen": "127.0.0.1:0"},
            "listeners": {"web": {"bind": "127.0.0.1:0", "pool": "app"}},
            "pools": {"app": {"servers": [{"address": "127.0.0.1:9", "name": "a"}]}},
        }
    )
    assert config.admin is not None
    return Runtime(config, Log(stream=io.StringIO())), config.admin, errors


@contextlib.contextmanager
def admin_in_a_thread(request_timeout: float) -> Iterator[tuple[str, int]]:
    """The admin API of a built ``Runtime`` on its own uvloop in a thread, bounded by
    ``request_timeout``; the loop's exception handler must never be called."""
    loop = uvloop.new_event_loop()
    runtime, admin, errors = _watched_runtime(loop)
    runtime.build(loop)
    server = admin_server.AdminServer(
        "127.0.0.1:0",
        Router(runtime, admin).handle,
        runtime.log,
        loop,
        request_timeout=request_timeout,
    )

    async def serve() -> None:
        await server.start()
        started.set()
        try:
            await stop.wait()
        finally:
            server.close()
            await asyncio.sleep(0.05)  # let the closes run

    started, stop = threading.Event(), asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        assert started.wait(10), "the admin server did not start"
        host, port = server.address.rsplit(":", 1)
        yield host, int(port)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        assert not thread.is_alive()
        loop.close()
    assert not errors, errors


def test_lbtcp_runs_its_admin_api_with_the_documented_limits() -> None:
    """The server ``lbtcp serve`` builds keeps the module's defaults: 10 s, 64 connections
    (the test below waits out a shorter bound on the same code)."""
    assert admin_server.REQUEST_TIMEOUT == 10.0 and admin_server.MAX_CONNECTIONS == 64

    async def main() -> None:
        async with running(
            '[admin]\nlisten = "127.0.0.1:0"\n[listeners.web]\nbind = "127.0.0.1:0"\n'
            'pool = "app"\n[pools.app]\n[[pools.app.servers]]\naddress = "127.0.0.1:9"\n'
        ) as (runtime, _log):
            assert runtime.admin is not None
            assert runtime.admin.request_timeout == 10.0
            assert runtime.admin.max_connections == 64

    run_in_process(main())


def test_1000_silent_connections_are_cut_at_the_limits_while_healthz_answers() -> None:
    # One wait of the request timeout covers every timeout case: the silent connections
    # (408), a request that stalls half-way (408), and a kept-alive connection that sends
    # nothing more (closed without an answer).
    with admin_in_a_thread(SHORT_TIMEOUT) as address:
        _silent_connections_are_cut(address, SHORT_TIMEOUT)


def ready(socks: Iterable[socket.socket], events: int, timeout: float) -> list[socket.socket]:
    """Those of ``socks`` ready for ``events`` (or in error) within ``timeout``: poll(), since
    select() takes no descriptor above 1,023 and both ends of 1,000 connections are here."""
    poller = select.poll()
    by_fd = {sock.fileno(): sock for sock in socks}
    for fd in by_fd:
        poller.register(fd, events)
    return [by_fd[fd] for fd, _ in poller.poll(timeout * 1000)]


def _silent_connections_are_cut(admin: tuple[str, int], timeout: float) -> None:
    # Both ends of 1,000 connections in this process: a fresh machine's soft limit may be 1,024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        if hard != resource.RLIM_INFINITY and hard < 4096:
            pytest.fail(f"RLIMIT_NOFILE hard limit {hard} is below the 4,096 this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    # Every client socket is closed however the test ends: a connection left open would
    # hang the server loop's close instead of reporting the failure.
    socks: list[socket.socket] = []
    try:
        started = time.monotonic()
        for _ in range(1000):
            sock = socket.socket()
            sock.setblocking(False)
            assert sock.connect_ex(admin) in (0, errno.EINPROGRESS)
            socks.append(sock)
        pending = set(socks)
        deadline = time.monotonic() + 30
        while pending and time.monotonic() < deadline:
            pending -= set(ready(pending, select.POLLOUT, 1.0))
        assert not pending, f"{len(pending)} connects did not complete"

        # The 64-connection cap must not lock /healthz out: it answers at once, not after the
        # timeout.
        asked = time.monotonic()
        assert get(admin, "/healthz").status == 200
        healthz_time = time.monotonic() - asked
        assert healthz_time < 1.0, healthz_time
        stalled = socket.create_connection(admin, timeout=15)
        socks.append(stalled)
        stalled.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
        idle = Http(admin, timeout=15)
        socks.append(idle.sock)
        assert idle.request("GET", "/healthz").status == 200
        stalled_at = time.monotonic()

        outcomes: dict[str, int] = {"503": 0, "408": 0, "reset": 0, "eof": 0}
        late_408 = []
        open_socks = {sock: bytearray() for sock in socks[:1000]}
        deadline = started + timeout + 10
        while open_socks and time.monotonic() < deadline:
            for sock in ready(open_socks, select.POLLIN, 0.5):
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = None
                if chunk:
                    open_socks[sock] += chunk
                    continue
                data = open_socks.pop(sock)
                if data:
                    reply = parse_raw_reply(bytes(data))
                    outcomes[str(reply.status)] += 1
                    if reply.status == 408:
                        late_408.append(time.monotonic() - started)
                        assert f"did not arrive within {timeout:g} s" in reply.error
                    else:
                        assert "too many admin connections" in reply.error
                else:
                    outcomes["reset" if chunk is None else "eof"] += 1
                sock.close()
        for sock in open_socks:
            sock.close()
        assert not open_socks, f"{len(open_socks)} connections were never cut; {outcomes}"
        # Every connection was cut with an answer: by the cap (503: the longest-waiting one makes
        # room for each newcomer) or, for the last ones held, by the request timeout, not before
        # it. The three later connections took up to three of the 64 places.
        assert outcomes["reset"] == outcomes["eof"] == 0, outcomes
        assert outcomes["503"] + outcomes["408"] == 1000, outcomes
        assert 61 <= outcomes["408"] <= 64, outcomes
        assert min(late_408) >= timeout - 0.5, late_408

        with stalled, idle:
            data, _ = read_all(stalled, timeout=15)
            waited = time.monotonic() - stalled_at
            assert_error(parse_raw_reply(data), 408, f"did not arrive within {timeout:g} s")
            assert timeout - 0.5 <= waited <= timeout + 3
            # The kept-alive connection that sent nothing more is closed without an answer.
            assert read_all(idle.sock, timeout=15) == (b"", False)
        assert get(admin, "/healthz").status == 200
    finally:
        for sock in socks:
            sock.close()


# --- in process, on both event loops ---------------------------------------------------------


async def _replies(reader: asyncio.StreamReader, methods: list[str]) -> list[h11.Response]:
    """Read one answer per method from ``reader`` (h11 parses them)."""
    conn = h11.Connection(h11.CLIENT)
    answers: list[h11.Response] = []
    for method in methods:
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                answers.append(event)
            elif isinstance(event, h11.EndOfMessage):
                break
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
    return answers


async def _exercise(runtime: Runtime, server: admin_server.AdminServer) -> None:
    await server.start()
    host, port = server.address.rsplit(":", 1)
    # Keep-alive and pipelining, a control action among them.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /pools/app/servers/a/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answers = await _replies(reader, ["GET", "POST", "HEAD"])
    assert [a.status_code for a in answers] == [200, 200, 404]
    writer.close()
    # A 413 while the body is still coming: lingering close, the answer arrives.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n" + b"y" * 5000)
    data = await reader.read()  # until lbtcp's FIN
    assert parse_raw_reply(data).status == 413
    writer.close()
    # The cap (4 here): the longest-waiting connection makes room for a newcomer.
    silent = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
    newcomer = await asyncio.open_connection(host, int(port))
    evicted = await asyncio.wait_for(silent[0][0].read(), 5)
    assert parse_raw_reply(evicted).status == 503
    newcomer[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [a.status_code for a in await _replies(newcomer[0], ["GET"])] == [200]
    for _, w in [*silent, newcomer]:
        w.close()
    # Garbage, then an abrupt reset mid-request: nothing reaches the loop's handler.
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
    assert parse_raw_reply(await reader.read()).status == 400
    writer.close()
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /pools/app/servers/a/weight HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n")
    await writer.drain()
    writer.transport.abort()
    await asyncio.sleep(0.05)
    assert runtime.draining is False
    server.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_in_process_on_both_loops_without_loop_errors(loop_kind: str) -> None:
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    runtime, admin, errors = _watched_runtime(loop)
    try:
        runtime.build(loop)
        router = Router(runtime, admin)
        server = admin_server.AdminServer(
            "127.0.0.1:0", router.handle, runtime.log, loop, max_connections=4
        )
        loop.run_until_complete(asyncio.wait_for(_exercise(runtime, server), 20))
        loop.run_until_complete(asyncio.sleep(0.05))  # let the closes run
    finally:
        loop.close()
    assert not errors, errors
    assert runtime.pools["app"].health.state("a").value == "draining"
