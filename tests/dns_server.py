"""A real DNS server for tests: dnsmasq on 127.0.0.1, speaking DNS over UDP and TCP.

``Dnsmasq`` runs ``dnsmasq --no-daemon`` as a subprocess on a free port, answering for the
``test`` domain only (``--local=/test/``: unknown names there are NXDOMAIN, nothing is ever
forwarded). Records come from:

- ``hosts``: ``{name: [ip, ...]}`` written to an ``--addn-hosts`` file, served with
  ``local_ttl``. ``set_hosts()`` rewrites the file and sends SIGHUP, so tests can change the
  record set of a running server.
- ``host_records``: ``--host-record`` values (``"name,ip[,ip6][,ttl]"``): a TTL per name.
- ``srv_hosts``: ``--srv-host`` values (``"_svc._tcp.name,target,port,priority,weight"``).

``pause()``/``resume()`` (SIGSTOP/SIGCONT) make it stop answering without closing its port
(clients time out); ``stop()`` closes it (clients get ICMP port unreachable). Queries are
counted from its ``--log-queries`` output. The ``dns_servers`` fixture makes servers and stops
every one of them at teardown; import it into a test module with
``from tests.dns_server import dns_servers``.

dnsmasq comes from Debian (``dnsmasq-base``, installed by ``scripts/install-test-deps``). A
missing binary fails the test with that instruction: skipping would hide untested code.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

DOMAIN = "test"
START_TIMEOUT = 10.0


def dnsmasq_binary() -> str:
    """The dnsmasq executable, or fail the test with how to install it."""
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None:
        pytest.fail(
            "dnsmasq is not installed; the DNS tests need a real DNS server. "
            "Run scripts/install-test-deps (it installs the Debian package dnsmasq-base).",
            pytrace=False,
        )
    return found


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS uses both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def encode_query(name: str, qtype: int = 1, query_id: int = 0x4C42) -> bytes:
    """A minimal DNS query packet (RFC 1035 section 4): recursion desired, one question."""
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    labels = b"".join(
        bytes([len(part)]) + part.encode("ascii") for part in name.rstrip(".").split(".")
    )
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


def probe(port: int, name: str = f"probe.{DOMAIN}", timeout: float = 0.2) -> int | None:
    """Send one UDP query; return the answer's RCODE, or None when nothing answers."""
    query = encode_query(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, ("127.0.0.1", port))
            reply, _ = sock.recvfrom(4096)
        except OSError:  # timeout or ICMP port unreachable
            return None
    if len(reply) < 12 or reply[:2] != query[:2]:
        return None
    return reply[3] & 0x0F


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


_QUERY_LINE = re.compile(r"query\[(?P<qtype>[A-Z0-9]+)\] (?P<name>\S+) from ")


class Dnsmasq:
    """One dnsmasq process; see the module docstring."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        local_ttl: int = 1,
        hosts: Mapping[str, Sequence[str]] | None = None,
        host_records: Sequence[str] = (),
        srv_hosts: Sequence[str] = (),
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.local_ttl = local_ttl
        self.hosts_file = workdir / "hosts"
        self.log_file = workdir / "dnsmasq.log"
        self.host_records = tuple(host_records)
        self.srv_hosts = tuple(srv_hosts)
        self.extra_args = tuple(extra_args)
        self._write_hosts(hosts or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._paused = False

    @property
    def nameserver(self) -> str:
        """The ``IP:PORT`` string for ``ResolverConfig.nameservers``."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The process id of the running dnsmasq."""
        assert self.process is not None, "dnsmasq is not running"
        return self.process.pid

    def command(self) -> list[str]:
        """The dnsmasq command line."""
        try:
            import pwd

            user = pwd.getpwuid(os.geteuid()).pw_name
        except (ImportError, KeyError):  # pragma: no cover - no passwd entry
            user = "nobody"
        args = [
            dnsmasq_binary(),
            "--no-daemon",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--log-queries",
            "--log-facility=-",
            f"--local=/{DOMAIN}/",
            f"--addn-hosts={self.hosts_file}",
            f"--local-ttl={self.local_ttl}",
            # Stay this user: the files live in pytest's private (0700) temp directory.
            f"--user={user}",
            f"--pid-file={self.workdir / 'dnsmasq.pid'}",
        ]
        args += [f"--host-record={record}" for record in self.host_records]
        args += [f"--srv-host={record}" for record in self.srv_hosts]
        args += list(self.extra_args)
        return args

    def start(self) -> Dnsmasq:
        """Start dnsmasq and wait until it answers a query."""
        if self.process is not None:
            raise RuntimeError("dnsmasq is already running")
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + START_TIMEOUT
        while probe(self.port) is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"dnsmasq did not start:\n{self.log_text()}", pytrace=False)
            time.sleep(0.02)
        return self

    def _write_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        lines = [f"{ip} {name}\n" for name, ips in hosts.items() for ip in ips]
        tmp = self.hosts_file.with_suffix(".tmp")
        tmp.write_text("".join(lines))
        tmp.replace(self.hosts_file)  # never let dnsmasq read a half-written file

    def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        """Replace the ``--addn-hosts`` records and make dnsmasq reload them (SIGHUP)."""
        reads_before = self.log_text().count(f"read {self.hosts_file}")
        self._write_hosts(hosts)
        os.kill(self.pid, signal.SIGHUP)
        wait_until(
            lambda: self.log_text().count(f"read {self.hosts_file}") > reads_before,
            5.0,
            "dnsmasq to re-read its hosts file",
        )

    def pause(self) -> None:
        """Stop answering (SIGSTOP): queries time out, the port stays bound."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Answer again (SIGCONT)."""
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """Terminate dnsmasq (idempotent); its port then refuses queries."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            if self._paused:
                process.send_signal(signal.SIGCONT)
                self._paused = False
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def log_text(self) -> str:
        """Everything dnsmasq has logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def queries(self, name: str | None = None, qtype: str | None = None) -> int:
        """How many queries dnsmasq has received, optionally only for ``name``/``qtype``."""
        count = 0
        for match in _QUERY_LINE.finditer(self.log_text()):
            if name is not None and match["name"].rstrip(".").lower() != name.lower():
                continue
            if qtype is not None and match["qtype"] != qtype:
                continue
            count += 1
        return count


DnsServerFactory = Callable[..., Dnsmasq]


@pytest.fixture
def dns_servers(tmp_path: Path) -> Iterator[DnsServerFactory]:
    """Make dnsmasq servers: ``dns_servers(hosts=..., start=True, **Dnsmasq kwargs)``.

    Every server made is stopped at teardown, also when the test fails.
    """
    made: list[Dnsmasq] = []
    dnsmasq_binary()  # fail early and clearly when the binary is missing

    def make(*, start: bool = True, **kwargs: object) -> Dnsmasq:
        server = Dnsmasq(tmp_path / f"dns{len(made)}", **kwargs)  # type: ignore[arg-type]
        made.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.stop()
