"""A real etcd (Debian's etcd-server) for the fleet tests: free 127.0.0.1 ports, a temporary
data dir, stopped (by its PID) at the end. ``kill``/``start`` again keep the ports and data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ETCD = shutil.which("etcd")
ETCDCTL = shutil.which("etcdctl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_certs(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (openssl)."""
    folder.mkdir(exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    out = {name: folder / name for name in ("ca.pem", "ca.key", "server.pem", "server.key")}
    out |= {"client.pem": folder / "client.pem", "client.key": folder / "client.key"}
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        str(out["ca.key"]),
        "-out",
        str(out["ca.pem"]),
    )
    for who, extra in (
        ("server", "subjectAltName=IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        csr = folder / f"{who}.csr"
        ext = folder / f"{who}.ext"
        ext.write_text(extra + "\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={who}",
            "-keyout",
            str(out[f"{who}.key"]),
            "-out",
            str(csr),
        )
        run(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(out["ca.pem"]),
            "-CAkey",
            str(out["ca.key"]),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(out[f"{who}.pem"]),
        )
    return out


class Etcd:
    def __init__(self, data_dir: Path, certs: dict[str, Path] | None = None) -> None:
        self.data_dir = data_dir
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.certs = certs
        scheme = "https" if certs else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir.parent / "etcd.log"

    def start(self) -> None:
        assert ETCD is not None
        peer = f"http://127.0.0.1:{self.peer_port}"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    ETCD,
                    "--name=t",
                    f"--data-dir={self.data_dir}",
                    f"--listen-client-urls={self.url}",
                    f"--advertise-client-urls={self.url}",
                    f"--listen-peer-urls={peer}",
                    f"--initial-advertise-peer-urls={peer}",
                    f"--initial-cluster=t={peer}",
                    *self._tls_flags(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(self.url + "/health", timeout=1, **self._httpx_tls())
                if answer.json().get("health") == "true":
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("etcd did not start: " + self.log.read_text()[-2000:])
            time.sleep(0.05)

    def _tls_flags(self) -> list[str]:
        if not self.certs:
            return []
        return [
            f"--cert-file={self.certs['server.pem']}",
            f"--key-file={self.certs['server.key']}",
            f"--trusted-ca-file={self.certs['ca.pem']}",
            "--client-cert-auth",
        ]

    def _httpx_tls(self) -> dict[str, object]:
        if not self.certs:
            return {}
        import ssl

        context = ssl.create_default_context(cafile=str(self.certs["ca.pem"]))
        context.load_cert_chain(str(self.certs["client.pem"]), str(self.certs["client.key"]))
        return {"verify": context}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def ctl(self, *args: str) -> str:
        assert ETCDCTL is not None
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={self.url}", *self._ctl_tls(), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=dict(os.environ, ETCDCTL_API="3"),
            check=True,
        )
        return done.stdout

    def _ctl_tls(self) -> list[str]:
        if not self.certs:
            return []
        return [
            f"--cacert={self.certs['ca.pem']}",
            f"--cert={self.certs['client.pem']}",
            f"--key={self.certs['client.key']}",
        ]

    def get_prefix(self, prefix: str, *options: str) -> dict[str, str]:
        lines = self.ctl(*options, "get", "--prefix", prefix).splitlines()
        return dict(zip(lines[::2], lines[1::2], strict=True))


@contextlib.contextmanager
def running_etcd(tmp_path: Path) -> Iterator[Etcd]:
    if ETCD is None or ETCDCTL is None:  # a failure, not a skip: the suite must not shrink
        pytest.fail("etcd-server and etcd-client are needed: run scripts/install-test-deps")
    etcd = Etcd(tmp_path / "etcd-data")
    etcd.start()
    try:
        yield etcd
    finally:
        etcd.kill()


class CuttableProxy:
    """A TCP proxy in front of etcd that a test can cut (every connection closed, new ones
    refused) and restore on the same port: one node loses etcd while the test still reaches
    it directly (to change keys and compact while that node is away)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = _free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener was closed
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 5)
            except OSError:
                client.close()
                continue
            with self._lock:
                cut = self._listener is not listener  # cut while this one was connecting
                if not cut:
                    self._sockets += [client, upstream]
            if cut:
                client.close()
                upstream.close()
                return
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the accept() blocked in the thread (close() alone does not).
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        self.cut()
