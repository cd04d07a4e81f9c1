"""SNI routing end to end: ``lbtcp serve`` in front of real TLS servers (Python's ssl, each
with its own certificate made here by openssl), real TLS clients: each name reaches its pool,
the handshake completes through lbtcp (the client sees that pool's certificate and its bytes
come back), plain clients, split and stalled ClientHellos, PROXY then SNI on one listener."""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Lbtcp

POOLS = ("app", "api", "web", "deep")
ROUTES = (
    '[{sni = "api.example.com", pool = "api"}, {sni = "*.example.com", pool = "web"}, '
    '{sni = "*.deep.example.com", pool = "deep"}]'
)


def make_certificate(directory: Path, cn: str) -> tuple[Path, Path]:
    cert, key = directory / f"{cn}.crt", directory / f"{cn}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


class TlsBackend:
    """A server speaking TLS (certificate CN = its pool's name) to clients whose first bytes
    are 22, 3, and plain text to others; both echo, the plain one after "NAME:". Each accepted
    connection is recorded with its time and first bytes."""

    def __init__(self, name: str, cert: Path, key: Path) -> None:
        self.name = name
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.context.set_alpn_protocols(["h2", "http/1.1"])
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[tuple[float, bytes]] = []
        self.alpn: list[str | None] = []
        self.stopping = False
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(10)
            first = conn.recv(5, socket.MSG_PEEK)
            self.accepted.append((time.monotonic(), first))
            if first[:2] == b"\x16\x03":
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.alpn.append(tls.selected_alpn_protocol())
                    while data := tls.recv(65536):
                        tls.sendall(data)
            else:
                conn.sendall(self.name.encode() + b":")
                while data := conn.recv(65536):
                    conn.sendall(data)

    def close(self) -> None:
        self.stopping = True
        self.acceptor.join(5)
        self.sock.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_certificate(directory, f"{name}-backend") for name in POOLS}


@pytest.fixture
def backends(certificates: dict[str, tuple[Path, Path]]) -> Iterator[dict[str, TlsBackend]]:
    started = {name: TlsBackend(name, *certificates[name]) for name in POOLS}
    yield started
    for backend in started.values():
        backend.close()


def client_context(certificates: dict[str, tuple[Path, Path]], tmp: Path) -> ssl.SSLContext:
    """Trusts every backend's certificate (and only those); host names are not checked,
    because which certificate arrives is what the tests look at."""
    bundle = tmp / "trusted.pem"
    bundle.write_bytes(b"".join(cert.read_bytes() for cert, _ in certificates.values()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(bundle)
    return context


def sni_config(backends: dict[str, TlsBackend], listener_extra: str = "") -> str:
    lines = [
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        f"routes = {ROUTES}",
        'inspect_timeout = "600ms"',
        listener_extra,
    ]
    for name, backend in backends.items():
        lines += [f"[pools.{name}]", f"[[pools.{name}.servers]]"]
        lines += [f'address = "127.0.0.1:{backend.port}"', f'name = "{name}1"']
    return "\n".join(lines) + "\n"


def peer_cn(tls: ssl.SSLSocket | ssl.SSLObject) -> str:
    cert = tls.getpeercert()
    assert cert
    subject = dict(item[0] for item in cert["subject"])
    return str(subject["commonName"])


def tls_echo(
    address: tuple[str, int],
    context: ssl.SSLContext,
    server_name: str | None,
    payload: bytes = b"hello over TLS",
) -> str:
    """One TLS session through lbtcp: the certificate's CN, after checking the echo."""
    with (
        socket.create_connection(address, timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = tls.recv(65536)
            assert chunk, "closed before the echo"
            received += chunk
        assert received == payload
        return peer_cn(tls)


def pumped_handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    server_name: str,
    *,
    prefix: bytes = b"",
    chunk: int = 0,
    pause: float = 0.0,
    stall_after: int = 0,
    stall: float = 0.0,
) -> str:
    """A TLS client over ``sock`` through a MemoryBIO, so that the ClientHello's bytes go
    out the way the test says: after ``prefix``, in ``chunk``-byte segments with ``pause``
    between them (TCP_NODELAY: each is its own segment), or ``stall_after`` bytes then a
    ``stall``. Then the handshake completes and a message is echoed; returns the CN."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if prefix:
        sock.sendall(prefix)
    if stall_after:
        sock.sendall(hello[:stall_after])
        time.sleep(stall)  # the stall is the point: lbtcp must decide without these bytes
        sock.sendall(hello[stall_after:])
    elif chunk:
        for start in range(0, len(hello), chunk):
            sock.sendall(hello[start : start + chunk])
            time.sleep(pause)  # a segment of its own, as a slow or fragmenting path sends
    else:
        sock.sendall(hello)
    deadline = time.monotonic() + 10
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            if out := outgoing.read():
                sock.sendall(out)
            assert time.monotonic() < deadline, "handshake did not complete"
            data = sock.recv(65536)
            assert data, "closed during the handshake"
            incoming.write(data)
    if out := outgoing.read():
        sock.sendall(out)
    tls.write(b"ping")
    sock.sendall(outgoing.read())
    received = b""
    while len(received) < 4:
        try:
            received += tls.read(4)
        except ssl.SSLWantReadError:
            data = sock.recv(65536)
            assert data, "closed before the echo"
            incoming.write(data)
        if out := outgoing.read():
            sock.sendall(out)  # session tickets and the like
    assert received == b"ping"
    return peer_cn(tls)


def access_lines(lbtcp: Lbtcp, count: int) -> list[str]:
    lbtcp.wait_line("access", timeout=10)
    deadline = time.monotonic() + 10
    while len(lbtcp.matching(r"\baccess\b")) < count:
        assert time.monotonic() < deadline, lbtcp.matching(r"\baccess\b")
        time.sleep(0.01)
    return lbtcp.matching(r"\baccess\b")


def field(line: str, key: str) -> str:
    match = re.search(rf"\b{key}=(\S+)", line)
    assert match, line
    return match.group(1)


@pytest.fixture(scope="module")
def routing(
    certificates: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, TlsBackend], Lbtcp, Path]]:
    """One lbtcp and its backends for every case of the routing table below: each case makes
    one session and looks only at what that session added (accepts, ALPN, access line)."""
    tmp = tmp_path_factory.mktemp("routing")
    started = {name: TlsBackend(name, *certificates[name]) for name in POOLS}
    try:
        lbtcp = Lbtcp(sni_config(started), tmp)
        try:
            yield started, lbtcp, tmp
        finally:
            lbtcp.stop()
    finally:
        for backend in started.values():
            backend.close()


@pytest.mark.parametrize(
    ("server_name", "pool"),
    [
        ("api.example.com", "api"),
        ("API.Example.COM", "api"),
        ("www.example.com", "web"),
        ("a.b.example.com", "web"),
        ("deep.example.com", "web"),
        ("x.deep.example.com", "deep"),
        ("y.x.deep.example.com", "deep"),
        ("example.com", "app"),
        ("other.org", "app"),
        (None, "app"),
    ],
)
def test_tls_clients_reach_the_pool_of_their_server_name(
    routing: tuple[dict[str, TlsBackend], Lbtcp, Path],
    certificates: dict[str, tuple[Path, Path]],
    server_name: str | None,
    pool: str,
) -> None:
    backends, lbtcp, tmp_path = routing
    accepted = {name: len(backend.accepted) for name, backend in backends.items()}
    alpn = len(backends[pool].alpn)
    logged = len(lbtcp.matching(r"\baccess\b"))
    address = lbtcp.address()
    context = client_context(certificates, tmp_path)
    context.set_alpn_protocols(["h2"])
    assert tls_echo(address, context, server_name) == f"{pool}-backend"
    assert len(backends[pool].accepted) == accepted[pool] + 1
    assert backends[pool].alpn[alpn:] == ["h2"]
    assert sum(len(b.accepted) - accepted[name] for name, b in backends.items()) == 1
    (line,) = access_lines(lbtcp, logged + 1)[logged:]
    assert field(line, "pool") == pool
    assert field(line, "server") == f"{pool}1"
    assert field(line, "sni") == (server_name.lower() if server_name else "-")
    assert field(line, "alpn") == "h2"
    assert field(line, "term") == "--"


def test_plain_tcp_clients_land_in_the_default_pool_at_once(
    tmp_path: Path, backends: dict[str, TlsBackend]
) -> None:
    lbtcp = Lbtcp(sni_config(backends), tmp_path)
    try:
        address = lbtcp.address()
        for payload in (b"GET / HTTP/1.1\r\n\r\n", b"\x16\x01not tls either", b"x"):
            started = time.monotonic()
            with socket.create_connection(address, timeout=5) as sock:
                sock.sendall(payload)
                expected = b"app:" + payload
                received = b""
                while len(received) < len(expected):
                    chunk = sock.recv(65536)
                    assert chunk
                    received += chunk
            assert received == expected
            # Far below inspect_timeout (600 ms): the first byte decided.
            assert time.monotonic() - started < 0.4
        assert len(backends["app"].accepted) == 3
        lines = access_lines(lbtcp, 3)
        assert all(field(line, "pool") == "app" and field(line, "sni") == "-" for line in lines)
    finally:
        lbtcp.stop()


def test_a_client_hello_split_over_many_segments_is_still_routed(
    tmp_path: Path, backends: dict[str, TlsBackend], certificates: dict[str, tuple[Path, Path]]
) -> None:
    lbtcp = Lbtcp(sni_config(backends), tmp_path)
    try:
        context = client_context(certificates, tmp_path)
        with socket.create_connection(lbtcp.address(), timeout=10) as sock:
            cn = pumped_handshake(sock, context, "api.example.com", chunk=7, pause=0.002)
        assert cn == "api-backend"
        (line,) = access_lines(lbtcp, 1)
        assert field(line, "pool") == "api" and field(line, "sni") == "api.example.com"
    finally:
        lbtcp.stop()


def test_a_stalled_half_hello_goes_to_the_default_pool_at_inspect_timeout(
    tmp_path: Path, backends: dict[str, TlsBackend], certificates: dict[str, tuple[Path, Path]]
) -> None:
    """The bytes read so far are relayed first: the default pool's server gets the half
    record, then the rest, and the handshake completes with its certificate."""
    lbtcp = Lbtcp(sni_config(backends), tmp_path)
    try:
        context = client_context(certificates, tmp_path)
        with socket.create_connection(lbtcp.address(), timeout=10) as sock:
            sent_at = time.monotonic()
            cn = pumped_handshake(sock, context, "api.example.com", stall_after=40, stall=1.2)
        assert cn == "app-backend"
        assert not backends["api"].accepted
        ((accepted_at, first),) = backends["app"].accepted
        assert first[:1] == b"\x16"
        assert 0.55 <= accepted_at - sent_at < 1.15, accepted_at - sent_at
        (line,) = access_lines(lbtcp, 1)
        assert field(line, "pool") == "app" and field(line, "sni") == "-"
    finally:
        lbtcp.stop()


def test_proxy_header_then_client_hello_on_one_listener(
    tmp_path: Path, backends: dict[str, TlsBackend], certificates: dict[str, tuple[Path, Path]]
) -> None:
    extra = 'proxy_protocol = "v1"\nproxy_protocol_from = ["127.0.0.1/32"]'
    lbtcp = Lbtcp(sni_config(backends, extra), tmp_path)
    try:
        context = client_context(certificates, tmp_path)
        header = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
        with socket.create_connection(lbtcp.address(), timeout=10) as sock:
            cn = pumped_handshake(sock, context, "www.example.com", prefix=header)
        assert cn == "web-backend"
        # The PROXY header is consumed; the server sees the ClientHello first.
        assert backends["web"].accepted[0][1][:1] == b"\x16"
        with socket.create_connection(lbtcp.address(), timeout=10) as sock:
            cn = pumped_handshake(sock, context, "x.deep.example.com", prefix=header, chunk=3)
        assert cn == "deep-backend"
        lines = access_lines(lbtcp, 2)
        assert [field(line, "pool") for line in lines] == ["web", "deep"]
        assert all(field(line, "client") == "192.0.2.7:40000" for line in lines)
    finally:
        lbtcp.stop()


def test_a_reload_turns_routes_on_and_off_for_the_listener_that_stays(
    tmp_path: Path, backends: dict[str, TlsBackend], certificates: dict[str, tuple[Path, Path]]
) -> None:
    routed = sni_config(backends)
    plain = routed.replace(f"routes = {ROUTES}\n", "")
    assert plain != routed
    lbtcp = Lbtcp(plain, tmp_path)
    try:
        address = lbtcp.address()
        context = client_context(certificates, tmp_path)
        assert tls_echo(address, context, "api.example.com") == "app-backend"
        assert "listeners +0 -0 ~1" in lbtcp.reload(routed)
        assert lbtcp.address() == address
        assert tls_echo(address, context, "api.example.com") == "api-backend"
        assert tls_echo(address, context, "www.example.com") == "web-backend"
        assert "listeners +0 -0 ~1" in lbtcp.reload(plain)
        assert tls_echo(address, context, "api.example.com") == "app-backend"
    finally:
        lbtcp.stop()
