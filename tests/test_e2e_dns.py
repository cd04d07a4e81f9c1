"""End-to-end DNS: ``lbtcp serve`` resolving server names against a real dnsmasq.

The backends listen on different loopback addresses (127.0.0.11, .12, ...) with the same port,
so that a name's A records map to distinct servers, as they would in a real fleet.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.dns_server import DOMAIN, Dnsmasq
from tests.support import Lbtcp, roundtrip, wait_until

StartLbtcp = Callable[..., Lbtcp]
DnsFactory = Callable[..., Dnsmasq]


class LoopbackEchoes:
    """Echo servers on 127.0.0.X:PORT that answer with their own address, counting sessions."""

    def __init__(self) -> None:
        self.port = 0
        self.sockets: dict[str, socket.socket] = {}
        self.sessions: dict[str, int] = {}
        self.lock = threading.Lock()
        self.closing = False
        self.threads: list[threading.Thread] = []

    def start(self, ip: str) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ip, self.port))
        if not self.port:
            self.port = sock.getsockname()[1]
        sock.listen(64)
        sock.settimeout(0.2)
        self.sockets[ip] = sock
        self.sessions.setdefault(ip, 0)
        thread = threading.Thread(target=self._serve, args=(ip, sock), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _serve(self, ip: str, sock: socket.socket) -> None:
        while not self.closing and ip in self.sockets:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.sessions[ip] += 1
            threading.Thread(target=self._echo, args=(ip, conn), daemon=True).start()

    @staticmethod
    def _echo(ip: str, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    conn.sendall(ip.encode() + b" " + data)
            except OSError:
                pass

    def close(self) -> None:
        self.closing = True
        for sock in self.sockets.values():
            sock.close()
        for thread in self.threads:
            thread.join(2)


@pytest.fixture
def echoes() -> Iterator[LoopbackEchoes]:
    servers = LoopbackEchoes()
    yield servers
    servers.close()


def ask(address: tuple[str, int], payload: bytes = b"hi") -> bytes:
    """One session: the reply (the echoing server's address first), or b"" if refused."""
    return roundtrip(address, payload)


def dns_config(
    nameserver: str, servers: str, resolver_extra: str = "", pool_extra: str = ""
) -> str:
    return f"""
[resolver]
nameservers = ["{nameserver}"]
timeout = "500ms"
{resolver_extra}

[listeners.web]
bind = "127.0.0.1:0"
pool = "app"

[pools.app]
retries = 2
connect_timeout = "500ms"
{pool_extra}

{servers}
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_three_a_records_become_three_servers_and_follow_changes(
    start_lbtcp: StartLbtcp,
    dns_servers: DnsFactory,
    echoes: LoopbackEchoes,
    workers: int,
) -> None:
    ips = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"]
    for ip in ips:
        echoes.start(ip)
    dns = dns_servers(hosts={f"app.{DOMAIN}": ips[:3]}, local_ttl=1)
    lb = start_lbtcp(
        dns_config(
            dns.nameserver,
            f'[[pools.app.servers]]\naddress = "app.{DOMAIN}:{echoes.port}"\n',
            resolver_extra='min_ttl = "1s"',
        )
        # With workers = 2 the parent resolves; both workers must follow its membership.
        + f"[global]\nworkers = {workers}\n"
    )
    address = lb.address()
    seen = {ask(address).split()[0].decode() for _ in range(9 * workers)}
    assert seen == set(ips[:3])

    # A session opened before the change keeps flowing after it.
    live = socket.create_connection(address, timeout=5)
    live.sendall(b"before")
    first = live.recv(100)
    assert first.endswith(b"before")

    changed_at = time.monotonic()
    dns.set_hosts({f"app.{DOMAIN}": [ips[0], ips[3]]})  # .12 and .13 leave, .14 joins

    def follows() -> bool:
        wanted = {ips[0], ips[3]}
        return {ask(address).split()[0].decode() for _ in range(6 * workers)} == wanted

    wait_until(follows, 10, "lbtcp to follow the new record set")
    assert time.monotonic() - changed_at < 1 + 1 + 1.5  # TTL + 1 s, plus the sampling
    lb.wait_line(r"dns_change .*added=127\.0\.0\.14")
    lb.wait_line(r'server_state msg="dns: no longer in the answer" .*#127\.0\.0\.12 ')

    live.sendall(b"after")
    assert live.recv(100) == first.split()[0] + b" after"
    live.close()


def test_min_ttl_clamps_requery_rate(
    start_lbtcp: StartLbtcp,
    dns_servers: DnsFactory,
    echoes: LoopbackEchoes,
) -> None:
    echoes.start("127.0.0.21")
    # A 2 s TTL clamped up to 3 s: no second query for 2 s after the first (1 s to spare,
    # more than the TTL itself would allow), then one.
    dns = dns_servers(host_records=[f"ttl.{DOMAIN},127.0.0.21,2"])
    lb = start_lbtcp(
        dns_config(
            dns.nameserver,
            f'[[pools.app.servers]]\naddress = "ttl.{DOMAIN}:{echoes.port}"\n',
            resolver_extra='min_ttl = "3s"\nfamily = "ipv4"',
        )
    )
    assert ask(lb.address()).startswith(b"127.0.0.21")
    wait_until(lambda: dns.queries(f"ttl.{DOMAIN}", "A") >= 1, 5, "the first query")
    started = time.monotonic()
    time.sleep(2.0)
    assert dns.queries(f"ttl.{DOMAIN}", "A") == 1, "re-queried before min_ttl (3 s)"
    wait_until(lambda: dns.queries(f"ttl.{DOMAIN}", "A") >= 2, 5, "the refresh after 3 s")
    assert time.monotonic() - started >= 0.5


def test_dns_outage_keeps_servers_and_logs_once(
    start_lbtcp: StartLbtcp,
    dns_servers: DnsFactory,
    echoes: LoopbackEchoes,
) -> None:
    echoes.start("127.0.0.31")
    dns = dns_servers(hosts={f"db.{DOMAIN}": ["127.0.0.31"]}, local_ttl=1)
    lb = start_lbtcp(
        dns_config(
            dns.nameserver,
            f'[[pools.app.servers]]\naddress = "db.{DOMAIN}:{echoes.port}"\n',
            # max_ttl also caps the retry backoff (1 s doubling): retries every 2 s at most,
            # so the 4 s below still see several, and the recovery comes within 2 s.
            resolver_extra='stale_for = "1h"\nmax_ttl = "2s"\nfamily = "ipv4"',
        )
    )
    address = lb.address()
    live = socket.create_connection(address, timeout=5)
    live.sendall(b"x")
    assert live.recv(100).endswith(b"x")
    dns.pause()
    try:
        lb.wait_line(r"dns_failure", 10)
        # Several TTLs and retries later: traffic uninterrupted, one failure line.
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            assert ask(address).startswith(b"127.0.0.31")
            live.sendall(b"y")
            assert live.recv(100).endswith(b"y")
            time.sleep(0.2)
        assert len(lb.matching(r"dns_failure")) == 1
    finally:
        dns.resume()
    lb.wait_line(r"dns_recovered", 15)
    live.close()


def test_srv_priorities_lower_is_primary(
    start_lbtcp: StartLbtcp,
    dns_servers: DnsFactory,
    echoes: LoopbackEchoes,
) -> None:
    for ip in ("127.0.0.41", "127.0.0.42"):
        echoes.start(ip)
    port = echoes.port
    dns = dns_servers(
        host_records=[f"p1.{DOMAIN},127.0.0.41,1", f"p2.{DOMAIN},127.0.0.42,1"],
        srv_hosts=[
            f"_app._tcp.{DOMAIN},p1.{DOMAIN},{port},10,5",
            f"_app._tcp.{DOMAIN},p2.{DOMAIN},{port},20,5",
        ],
    )
    lb = start_lbtcp(
        dns_config(
            dns.nameserver,
            f'[[pools.app.servers]]\nsrv = "_app._tcp.{DOMAIN}"\n',
            resolver_extra='family = "ipv4"',
            pool_extra='[pools.app.health]\ninterval = "200ms"\nfast_interval = "100ms"\n'
            'down_interval = "200ms"\ntimeout = "100ms"\nrise = 1\nfall = 1\ninitial = "healthy"',
        )
    )
    address = lb.address()
    assert {ask(address).split()[0] for _ in range(6)} == {b"127.0.0.41"}
    # The primary (priority 10) goes down: only then does priority 20 take traffic.
    echoes.sockets.pop("127.0.0.41").close()
    lb.wait_line(r"server_state .*127\.0\.0\.41 .*new=unhealthy", 10)
    assert {ask(address).split()[0] for _ in range(6)} == {b"127.0.0.42"}


def test_dns_down_at_start_refuses_then_serves(
    start_lbtcp: StartLbtcp,
    dns_servers: DnsFactory,
    echoes: LoopbackEchoes,
) -> None:
    echoes.start("127.0.0.51")
    dns = dns_servers(hosts={f"late.{DOMAIN}": ["127.0.0.51"]}, local_ttl=1, start=False)
    lb = start_lbtcp(
        dns_config(
            dns.nameserver,
            f'[[pools.app.servers]]\naddress = "late.{DOMAIN}:{echoes.port}"\n',
            resolver_extra='family = "ipv4"',
        )
    )
    address = lb.address()
    lb.wait_line(r"dns_failure", 10)
    assert ask(address) == b""  # refused: no server known yet
    lb.wait_line(r"term=NH", 5)
    dns.start()
    wait_until(lambda: ask(address).startswith(b"127.0.0.51"), 15, "service once DNS answers")
