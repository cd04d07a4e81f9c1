"""A real etcd (Debian's etcd-server) for the fleet tests: free 127.0.0.1 ports, a temporary
data dir, stopped (by its PID) at the end. ``kill``/``start`` again keep the ports and data."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
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


class Etcd:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.url = f"http://127.0.0.1:{self.client_port}"
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
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).json().get("health") == "true":
                    return
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("etcd did not start: " + self.log.read_text()[-2000:])
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def ctl(self, *args: str) -> str:
        assert ETCDCTL is not None
        done = subprocess.run(
            [ETCDCTL, f"--endpoints={self.url}", *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=dict(os.environ, ETCDCTL_API="3"),
            check=True,
        )
        return done.stdout

    def get_prefix(self, prefix: str) -> dict[str, str]:
        lines = self.ctl("get", "--prefix", prefix).splitlines()
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
