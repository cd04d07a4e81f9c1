"""The backends and the proxies under test: HAProxy, nginx and lbtcp, configs generated."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lbbench.common import HERE, NGINX_STREAM_MODULE, RR_SIZE
from lbbench.procs import Child, Children, children_of, free_port, wait_accepting


@dataclass
class Backends:
    """The shared backends: port per listener kind (``iperf`` may be missing)."""

    ports: dict[str, int] = field(default_factory=dict)


def lbtcp_binary() -> str:
    """The ``lbtcp`` script beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "lbtcp"
    if beside.exists():
        return str(beside)
    found = shutil.which("lbtcp")
    if found is None:
        raise SystemExit("run.py: no lbtcp found: install the project (scripts/setup-venv)")
    return found


def start_backends(children: Children, lbtcp: str, load_cpu: int | None) -> Backends:
    """Start echo, sink, the HTTP responder and (if installed) iperf3 -s on the load core."""
    backends = Backends()
    for kind in ("echo", "sink"):
        child = children.spawn(kind, [lbtcp, kind, "0"], cpu=load_cpu)
        found = child.wait_for_text(rf"{kind} listening on 127\.0\.0\.1:(\d+)")
        backends.ports[kind] = int(found.group(1))
    httpd = children.spawn(
        "httpd",
        [sys.executable, str(HERE / "httpd.py"), "0", "--size", str(RR_SIZE)],
        cpu=load_cpu,
    )
    backends.ports["http"] = int(httpd.wait_for_text(r"httpd listening on [\d.]+:(\d+)").group(1))
    if shutil.which("iperf3"):
        port = free_port()
        iperf = children.spawn(
            "iperf3-server",
            ["iperf3", "-s", "-p", str(port), "-B", "127.0.0.1", "--forceflush"],
            cpu=load_cpu,
        )
        iperf.wait_for_text(r"Server listening on")
        backends.ports["iperf"] = port
    return backends


# ---------------------------------------------------------------------------- proxies


class Proxy:
    """One proxy under test: how to find it, configure it, start it and measure it."""

    name = ""
    label = ""
    binary = ""
    package = ""

    def __init__(self, workdir: Path, nofile: int) -> None:
        self.workdir = workdir
        self.nofile = nofile
        self.ports: dict[str, int] = {}
        self.child: Child | None = None

    def missing(self) -> str | None:
        """Why this proxy cannot run here, or None."""
        if shutil.which(self.binary) is None:
            return (
                f"{self.label}: `{self.binary}` not found; install the Debian package "
                f"{self.package} (benchmarks/install-tools does)"
            )
        return None

    def config(self, backends: Backends) -> str:
        """The config text for listeners in ``self.ports`` over ``backends``."""
        raise NotImplementedError

    def argv(self, config: Path) -> list[str]:
        """The command that runs the proxy in the foreground with ``config``."""
        raise NotImplementedError

    def version(self) -> str:
        """One line naming the version."""
        raise NotImplementedError

    stop_signal = signal.SIGTERM

    def measured_pid(self) -> int:
        """The process whose CPU and memory count (the worker, for nginx)."""
        assert self.child is not None
        return self.child.proc.pid

    def start(self, children: Children, backends: Backends, cpu: int | None) -> None:
        """Write the config and start; return once every listener accepts."""
        if not self.ports:
            self.ports = {kind: free_port() for kind in backends.ports}
        path = self.workdir / f"{self.name}.conf"
        path.write_text(self.config(backends))
        self.child = children.spawn(self.name, self.argv(path), cpu=cpu)
        for port in self.ports.values():
            wait_accepting(self.child, port)

    def stop(self) -> None:
        """Stop the proxy (its whole process group)."""
        if self.child is not None:
            Children.stop(self.child.proc, self.stop_signal)
            self.child = None


class LbtcpProxy(Proxy):
    """lbtcp serve, one process, no access log."""

    name = "lbtcp"
    label = "lbtcp"
    package = "lbtcp (scripts/setup-venv)"
    # SIGTERM would drain; SIGINT closes at once, which is what a benchmark restart wants.
    stop_signal = signal.SIGINT

    def __init__(self, workdir: Path, nofile: int, lbtcp: str) -> None:
        super().__init__(workdir, nofile)
        self.binary = lbtcp

    def config(self, backends: Backends) -> str:
        lines = [
            "[global]",
            "workers = 1",
            "access_log = false",
            'drain_timeout = "1s"',
        ]
        for kind, port in self.ports.items():
            lines += [
                "",
                f"[listeners.{kind}]",
                f'bind = "127.0.0.1:{port}"',
                f'pool = "{kind}"',
                "backlog = 4096",
                "",
                f"[pools.{kind}]",
                "",
                f"[[pools.{kind}.servers]]",
                f'address = "127.0.0.1:{backends.ports[kind]}"',
            ]
        return "\n".join(lines) + "\n"

    def argv(self, config: Path) -> list[str]:
        return [self.binary, "serve", str(config)]

    def version(self) -> str:
        return run_text([self.binary, "--version"])


class HaproxyProxy(Proxy):
    """HAProxy, ``mode tcp``, one thread."""

    name = "haproxy"
    label = "HAProxy"
    binary = "haproxy"
    package = "haproxy"

    def config(self, backends: Backends) -> str:
        # HAProxy sizes its fd limit from maxconn (about 2 per connection); stay under ours.
        maxconn = max(1000, min(50_000, (self.nofile - 200) // 2))
        lines = [
            "global",
            "    nbthread 1",
            f"    maxconn {maxconn}",
            "",
            "defaults",
            "    mode tcp",
            f"    maxconn {maxconn}",
            "    timeout connect 5s",
            "    timeout client 1h",
            "    timeout server 1h",
        ]
        for kind, port in self.ports.items():
            lines += [
                "",
                f"listen {kind}",
                f"    bind 127.0.0.1:{port}",
                "    backlog 4096",
                f"    server {kind}1 127.0.0.1:{backends.ports[kind]}",
            ]
        return "\n".join(lines) + "\n"

    def argv(self, config: Path) -> list[str]:
        return [self.binary, "-db", "-f", str(config)]

    def version(self) -> str:
        return run_text([self.binary, "-v"]).splitlines()[0]


class NginxProxy(Proxy):
    """nginx ``stream``, one worker process (plus its master, which idles)."""

    name = "nginx"
    label = "nginx"
    binary = "nginx"
    package = "nginx and libnginx-mod-stream"

    def _stream_static(self) -> bool:
        return "--with-stream " in run_text([self.binary, "-V"]) + " "

    def missing(self) -> str | None:
        absent = super().missing()
        if absent is not None:
            return absent
        if not NGINX_STREAM_MODULE.exists() and not self._stream_static():
            return (
                "nginx: no stream module; install the Debian package libnginx-mod-stream "
                "(benchmarks/install-tools does)"
            )
        return None

    def config(self, backends: Backends) -> str:
        lines = []
        if NGINX_STREAM_MODULE.exists():
            lines.append(f"load_module {NGINX_STREAM_MODULE};")
        lines += [
            "worker_processes 1;",
            f"worker_rlimit_nofile {self.nofile};",
            "daemon off;",
            f"pid {self.workdir / 'nginx.pid'};",
            "error_log stderr warn;",
            # Each proxied session takes two of these (client and upstream side).
            f"events {{ worker_connections {max(1024, self.nofile - 200)}; }}",
            "stream {",
        ]
        for kind, port in self.ports.items():
            lines += [
                "    server {",
                f"        listen 127.0.0.1:{port} backlog=4096;",
                f"        proxy_pass 127.0.0.1:{backends.ports[kind]};",
                "        proxy_timeout 1h;",
                "    }",
            ]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def argv(self, config: Path) -> list[str]:
        return [self.binary, "-e", "stderr", "-p", str(self.workdir), "-c", str(config)]

    def version(self) -> str:
        return run_text([self.binary, "-v"]).strip()

    def measured_pid(self) -> int:
        assert self.child is not None
        workers = children_of(self.child.proc.pid)
        if len(workers) != 1:
            raise RuntimeError(f"nginx: expected one worker, found {workers}")
        return workers[0]


def run_text(argv: Sequence[str]) -> str:
    """stdout+stderr of a short command (versions), or '' if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


# ---------------------------------------------------------------------------- scenarios
