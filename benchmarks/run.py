"""Compare lbtcp with HAProxy (`mode tcp`) and nginx (`stream`) on the same backends and load.

    .venv/bin/python benchmarks/run.py [--quick] [--duration S] [--repeats N] [--out DIR]

Theory of operation. The backends (``lbtcp echo``, ``lbtcp sink``, a tiny HTTP responder and
``iperf3 -s`` for the cross-check) start once, pinned to the load core. Every proxy found on
the machine starts once, pinned to the proxy core, with one generated config (in a temp dir)
that maps the same four listener kinds to the same backends; ``direct`` is the no-proxy
baseline (the load generator talks to the backends), which shows the ceiling of the load core.

Each scenario runs ``--repeats`` times, and within a repeat every target in turn (A, B, C, then
A, B, C ...), so drift on this shared machine hits all of them alike; the report shows medians.
``lbtcp bench`` (pinned to the load core) makes the load and reports JSON. While it runs, this
script samples the proxy's CPU time (``/proc/PID/task/*/schedstat``, nanoseconds) and how busy
each core was (``/proc/stat``), to report whether the proxy was the bottleneck, whether other
processes disturbed the run, and what one operation costs the proxy in CPU: a comparison of
efficiency that holds even when the load core, not the proxy, set the pace.

``idle_mem`` restarts each proxy first (a fresh process: memory freed by earlier scenarios would
otherwise be reused and hide the real cost), opens N sessions through it, each proven spliced
by a one-byte echo, and divides the RSS growth by N.

The cross-check runs ``lbtcp bench`` and an independent C tool through a proxy in ABBA order
with matched bytes: iperf3 for bulk (64 KiB writes), wrk for rr and connect through the HTTP
responder, whose requests and responses are padded to exactly the rr message size.

It never installs anything: a missing proxy or tool is skipped with the package to install
(``benchmarks/install-tools``). Every child runs in its own process group and is stopped by its
id in a ``finally``, on errors and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
BENCH_SLACK = 60.0
CPU_SAMPLE_INTERVAL = 0.1
CPU_WINDOW = 0.5
RR_SIZE = 64
BULK_WRITE = 64 * 1024
RR_CONNECTIONS = 64
CONNECT_WORKERS = 32
AGREEMENT = 0.20
# Through a proxy, a result at this share of the no-proxy ceiling says the load core, not the
# proxy, may have been the limit.
LOAD_BOUND_SHARE = 0.8
# Other processes busier than this on the proxy core (while it should idle) spoil a run.
QUIET_PCT = 10.0


# ---------------------------------------------------------------------------- child processes


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Children:
    """Every process this script starts, each the leader of its own process group.

    The own group keeps a terminal's Ctrl-C away from the children (this script stops them in
    order) and lets ``stop`` reach a child's own children (nginx's worker, forked bench
    workers) by the group id, never by name.
    """

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        self._count = 0

    def spawn(self, name: str, argv: Sequence[str], *, cpu: int | None) -> Child:
        """Start ``argv`` pinned to ``cpu`` (with taskset), output to a log file."""
        self._count += 1
        log = self.logdir / f"{self._count:03d}-{name}.log"
        full = ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)
        out = open(log, "wb")  # noqa: SIM115 - closed in close_all, after the child is gone
        self._logs.append(out)
        proc = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._procs.append(proc)
        return Child(name, proc, log, full)

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """Signal the child's process group, wait, then SIGKILL the group if it lingers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        # Members of the group may outlive the leader (a worker whose master died).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def close_all(self) -> None:
        """Stop every child still running (newest first) and close the log files."""
        for proc in reversed(self._procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for out in self._logs:
            out.close()


@dataclass
class Child:
    """A started process and its log."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    argv: list[str]

    def log_tail(self, lines: int = 15) -> str:
        """The end of the log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_for_text(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        """Poll the log until ``pattern`` (a regex) appears; fail if the child dies first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            found = regex.search(self.log.read_text(errors="replace"))
            if found:
                return found
            if self.proc.poll() is not None:
                raise StartError(f"{self.name} exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name}: no {pattern!r} within {timeout:g} s")
            time.sleep(0.05)


class StartError(Exception):
    """A backend or proxy did not come up."""


def free_port() -> int:
    """A port the kernel considers free now (the small race is acceptable on loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_accepting(child: Child, port: int, timeout: float = START_TIMEOUT) -> None:
    """Poll until 127.0.0.1:port accepts a connection; fail if the child dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if child.proc.poll() is not None:
            raise StartError(f"{child.name} exited ({child.proc.returncode}):\n{child.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise StartError(f"{child.name}: port {port} not accepting") from None
            time.sleep(0.05)


# ---------------------------------------------------------------------------- /proc readings


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of ``pid`` in nanoseconds (schedstat: finer than clock ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (scanning /proc: the children file may be absent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def core_ticks() -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, all ticks)} from /proc/stat; busy is everything but idle and iowait."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            ticks = [int(v) for v in rest.split()]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            # Guest time is already part of user time; count the first eight fields only.
            total = sum(ticks[:8])
            out[int(name[3:])] = (total - idle, total)
    return out


class CpuSampler:
    """Samples, while a load runs, the proxy's CPU time and how busy each core is.

    ``proxy``: the proxy process's share of one core. ``proxy_core`` and ``load_core``: how busy
    those cores were with anything (other processes, interrupts, the loopback's softirq work
    included); on a shared machine ``proxy_core`` well above ``proxy`` means something else ran
    on the proxy's core. Each is the median over ``CPU_WINDOW`` windows, so the load
    generator's start-up and tear-down (when the proxy idles) do not drag it down as long as
    the load fills most of the run.
    """

    def __init__(self, pid: int | None, proxy_cpu: int | None, load_cpu: int | None) -> None:
        self.pid = pid
        self.cores = {"proxy_core": proxy_cpu, "load_core": load_cpu}
        self.samples: list[tuple[float, int, dict[int, tuple[int, int]]]] = []

    def sample(self) -> None:
        """Take one sample."""
        with contextlib.suppress(OSError):
            ns = cpu_ns(self.pid) if self.pid is not None else 0
            self.samples.append((time.monotonic(), ns, core_ticks()))

    def shares(self) -> dict[str, float]:
        """Median busy shares (0..1): ``proxy`` (if a pid), ``proxy_core``, ``load_core``."""
        if len(self.samples) < 2:
            return {}
        windows = []
        start = self.samples[0]
        for sample in self.samples[1:]:
            if sample[0] - start[0] >= CPU_WINDOW:
                windows.append((start, sample))
                start = sample
        if not windows:
            windows = [(self.samples[0], self.samples[-1])]
        values: dict[str, list[float]] = {}
        for (t0, ns0, ticks0), (t1, ns1, ticks1) in windows:
            if self.pid is not None:
                values.setdefault("proxy", []).append((ns1 - ns0) / 1e9 / max(t1 - t0, 1e-9))
            for key, cpu in self.cores.items():
                if cpu is None or cpu not in ticks0 or cpu not in ticks1:
                    continue
                busy = ticks1[cpu][0] - ticks0[cpu][0]
                total = ticks1[cpu][1] - ticks0[cpu][1]
                if total > 0:
                    values.setdefault(key, []).append(busy / total)
        return {key: float(statistics.median(v)) for key, v in values.items()}


# ---------------------------------------------------------------------------- backends


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


@dataclass(frozen=True)
class Settings:
    """Durations and sizes of one run (``--quick`` shrinks them)."""

    duration: float
    warmup: float
    repeats: int
    idle_sessions: int
    c2000_connections: int
    c2000_rate: float
    crosscheck_duration: float


@dataclass
class Target:
    """What the load is aimed at: a proxy, or the backends directly (``proxy`` is None)."""

    name: str
    label: str
    proxy: Proxy | None
    ports: dict[str, int]

    def pid(self) -> int | None:
        """The process whose CPU is sampled, if any."""
        return None if self.proxy is None else self.proxy.measured_pid()


class Runner:
    """Runs load against targets and keeps every raw result."""

    def __init__(
        self,
        children: Children,
        lbtcp: str,
        settings: Settings,
        load_cpu: int | None,
        proxy_cpu: int | None,
        backends: Backends,
        say: Callable[[str], None],
    ) -> None:
        self.children = children
        self.lbtcp = lbtcp
        self.settings = settings
        self.load_cpu = load_cpu
        self.proxy_cpu = proxy_cpu
        self.backends = backends
        self.say = say
        self.results: list[dict[str, Any]] = []

    def sampled(self, child: Child, target: Target, limit: float) -> CpuSampler:
        """Wait for ``child`` (killing it past ``limit`` s) while sampling the proxy's CPU."""
        sampler = CpuSampler(target.pid(), self.proxy_cpu, self.load_cpu)
        deadline = time.monotonic() + limit
        while child.proc.poll() is None:
            sampler.sample()
            if time.monotonic() > deadline:
                Children.stop(child.proc, signal.SIGKILL)
                raise RuntimeError(f"{child.name} ran past {limit:g} s")
            time.sleep(CPU_SAMPLE_INTERVAL)
        sampler.sample()
        return sampler

    def bench(
        self,
        target: Target,
        kind: str,
        mode: str,
        *,
        connections: int,
        size: int,
        duration: float,
        warmup: float,
        rate: float | None = None,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """One ``lbtcp bench`` run: its JSON report and the CPU shares (``CpuSampler``)."""
        out = self.children.logdir / f"bench-{len(self.results)}-{time.monotonic_ns()}.json"
        argv = [
            self.lbtcp,
            "bench",
            f"127.0.0.1:{target.ports[kind]}",
            "--mode",
            mode,
            "--connections",
            str(connections),
            "--size",
            str(size),
            "--duration",
            f"{duration:g}s",
            "--warmup",
            f"{warmup:g}s",
            "--quiet",
            "--json",
            str(out),
        ]
        if rate is not None:
            argv += ["--rate", f"{rate:g}"]
        child = self.children.spawn(f"bench-{target.name}-{mode}", argv, cpu=self.load_cpu)
        sampler = self.sampled(child, target, duration + warmup + BENCH_SLACK)
        if child.proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"lbtcp bench failed ({child.proc.returncode}):\n{child.log_tail()}")
        report: dict[str, Any] = json.loads(out.read_text())
        return report, sampler.shares()

    def scenario(self, name: str, target: Target, repeat: int) -> dict[str, Any]:
        """Run one scenario once against one target; returns (and keeps) its metrics."""
        s = self.settings
        metrics: dict[str, Any]
        raw: dict[str, Any] = {}
        try:
            if name == "idle_mem":
                metrics, raw = self.idle_mem(target)
            else:
                metrics, raw = self.load_scenario(name, target)
            error = None
        except Exception as exc:  # one failed run must not end the whole comparison
            metrics, error = {}, f"{type(exc).__name__}: {exc}"
        result = {
            "scenario": name,
            "target": target.name,
            "repeat": repeat,
            "metrics": metrics,
            "error": error,
            "raw": raw,
            "duration_s": s.duration,
        }
        self.results.append(result)
        shown = ", ".join(f"{k}={fmt_number(v)}" for k, v in metrics.items() if k in SHOW_LIVE)
        self.say(f"  {name:8} {target.label:18} {shown if error is None else 'FAILED: ' + error}")
        return result

    def load_scenario(self, name: str, target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
        """bulk, rr, connect or c2000 through ``target``."""
        s = self.settings
        if name == "bulk":
            report, shares = self.bench(
                target,
                "sink",
                "stream",
                connections=1,
                size=BULK_WRITE,
                duration=s.duration,
                warmup=s.warmup,
            )
            gbps = report["sent_gbps"]
            busy = shares.get("proxy")
            metrics = {"gbps": gbps}
            if busy is not None and gbps > 0:
                # CPU seconds the proxy spends per GB moved, in milliseconds.
                metrics["cpu_ms_per_gb"] = busy / (gbps / 8) * 1000
        elif name in ("rr", "connect"):
            report, shares = self.bench(
                target,
                "echo",
                name,
                connections=RR_CONNECTIONS if name == "rr" else CONNECT_WORKERS,
                size=RR_SIZE,
                duration=s.duration,
                warmup=s.warmup,
            )
            rate = report["requests_per_s"]
            busy = shares.get("proxy")
            metrics = {"rate": rate, "p99_ms": report["latency_ms"]["p99"]}
            if busy is not None and rate > 0:
                metrics["cpu_us_per_op"] = busy / rate * 1e6
        elif name == "c2000":
            report, shares = self.bench(
                target,
                "echo",
                "rr",
                connections=s.c2000_connections,
                size=RR_SIZE,
                duration=s.duration,
                warmup=max(s.warmup, 2.0),
                rate=s.c2000_rate,
            )
            metrics = {
                "rate": report["requests_per_s"],
                "offered": s.c2000_rate,
                "p99_ms": report["latency_ms"]["p99"],
            }
        else:
            raise ValueError(f"unknown scenario {name}")
        metrics["errors"] = report["errors_total"]
        for key, share in shares.items():
            metrics["cpu_pct" if key == "proxy" else f"{key}_pct"] = share * 100
        return metrics, report

    def idle_mem(self, target: Target) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restart the proxy, open idle sessions through it, report RSS growth per session."""
        proxy = target.proxy
        if proxy is None:
            raise ValueError("idle_mem needs a proxy")
        proxy.stop()
        proxy.start(self.children, self.backends, self.proxy_cpu)
        pid = proxy.measured_pid()
        count = self.settings.idle_sessions
        time.sleep(0.3)  # let the fresh process finish its start-up allocations
        before = rss_kib(pid)
        socks: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 60
            for _ in range(count):
                sock = socket.create_connection(("127.0.0.1", target.ports["echo"]), timeout=5)
                socks.append(sock)
                # The echo proves the session is spliced through to the backend.
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    raise RuntimeError("idle_mem: the echo did not come back")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"idle_mem: only {len(socks)} sessions within 60 s")
            time.sleep(0.5)
            after = rss_kib(pid)
        finally:
            for sock in socks:
                sock.close()
        metrics = {"bytes_per_session": (after - before) * 1024 / count, "sessions": count}
        return metrics, {"rss_before_kib": before, "rss_after_kib": after}


SHOW_LIVE = (
    "gbps",
    "rate",
    "p99_ms",
    "errors",
    "cpu_pct",
    "proxy_core_pct",
    "load_core_pct",
    "bytes_per_session",
)


def fmt_number(value: Any) -> str:
    """A compact human form of a metric."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


# ---------------------------------------------------------------------------- cross-check


def wrk_request_path(port: int, size: int, *, close: bool) -> str:
    """The URL path that makes wrk's request exactly ``size`` bytes.

    wrk sends ``GET PATH HTTP/1.1\\r\\n`` + our headers + ``Host: 127.0.0.1:PORT\\r\\n\\r\\n``.
    """
    fixed = len(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
    if close:
        fixed += len("Connection: close\r\n")
    pad = size - fixed
    if pad < 0:
        raise ValueError(f"a wrk request cannot be as small as {size} bytes")
    return "/" + "p" * pad


_WRK_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, p99 (ms) and errors from wrk's text output (with --latency)."""
    rate = re.search(r"Requests/sec:\s+([\d.]+)", text)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s|m)\b", text, re.MULTILINE)
    errors = 0
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        errors += sum(int(g) for g in sock.groups())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if non2xx:
        errors += int(non2xx.group(1))
    if rate is None:
        raise RuntimeError(f"cannot read wrk's output:\n{text}")
    return {
        "rate": float(rate.group(1)),
        "p99_ms": None if p99 is None else float(p99.group(1)) * _WRK_UNITS[p99.group(2)],
        "errors": errors,
    }


@dataclass
class Pair:
    """One cross-check: a lbtcp bench run and an independent tool's run of the same load."""

    scenario: str
    metric: str
    tool: str
    note: str
    bench: Callable[[], tuple[float, float | None, int]]  # (value, p99 ms, errors)
    other: Callable[[], tuple[float, float | None, int]]


def crosscheck(runner: Runner, target: Target) -> list[dict[str, Any]]:
    """lbtcp bench vs iperf3 (bulk) and wrk (rr, connect) through ``target``.

    Each pair runs in ABBA order (bench, tool, tool, bench) and compares the means, so that a
    steady drift of the shared machine's load cancels out instead of favouring one side.
    """
    s = runner.settings
    d = s.crosscheck_duration
    pairs: list[Pair] = []

    if "iperf" in target.ports and shutil.which("iperf3"):

        def bench_bulk() -> tuple[float, float | None, int]:
            report, _ = runner.bench(
                target,
                "sink",
                "stream",
                connections=1,
                size=BULK_WRITE,
                duration=d,
                warmup=s.warmup,
            )
            return float(report["sent_gbps"]), None, int(report["errors_total"])

        def iperf_bulk() -> tuple[float, float | None, int]:
            total = d + s.warmup
            argv = ["iperf3", "-c", "127.0.0.1", "-p", str(target.ports["iperf"]), "-J"]
            argv += ["-t", f"{total:g}", "-O", f"{s.warmup:g}", "-l", str(BULK_WRITE)]
            child = runner.children.spawn(f"iperf3-{target.name}", argv, cpu=runner.load_cpu)
            runner.sampled(child, target, total + BENCH_SLACK)
            data = json.loads(child.log.read_text())
            if "error" in data:
                raise RuntimeError(f"iperf3: {data['error']}")
            return data["end"]["sum_received"]["bits_per_second"] / 1e9, None, 0

        pairs.append(
            Pair(
                "bulk",
                "Gbit/s",
                "iperf3",
                "one connection, 64 KiB writes, the first "
                f"{s.warmup:g} s not counted; receiver: lbtcp sink vs iperf3 -s",
                bench_bulk,
                iperf_bulk,
            )
        )
    if shutil.which("wrk"):
        port = target.ports["http"]
        for scenario, conns in (("rr", RR_CONNECTIONS), ("connect", CONNECT_WORKERS)):
            close = scenario == "connect"

            def bench_one(
                scenario: str = scenario, conns: int = conns
            ) -> tuple[float, float | None, int]:
                report, _ = runner.bench(
                    target,
                    "echo",
                    scenario,
                    connections=conns,
                    size=RR_SIZE,
                    duration=d,
                    warmup=s.warmup,
                )
                return (
                    float(report["requests_per_s"]),
                    report["latency_ms"]["p99"],
                    int(report["errors_total"]),
                )

            def wrk_one(
                scenario: str = scenario, conns: int = conns, close: bool = close
            ) -> tuple[float, float | None, int]:
                url = f"http://127.0.0.1:{port}{wrk_request_path(port, RR_SIZE, close=close)}"
                argv = ["wrk", "-t1", f"-c{conns}", f"-d{d:g}s", "--latency", url]
                if close:
                    argv[1:1] = ["-H", "Connection: close"]
                child = runner.children.spawn(
                    f"wrk-{target.name}-{scenario}", argv, cpu=runner.load_cpu
                )
                runner.sampled(child, target, d + BENCH_SLACK)
                wrk = parse_wrk(child.log.read_text())
                return float(wrk["rate"]), wrk["p99_ms"], int(wrk["errors"])

            how = "new connection per request" if close else "kept open"
            pairs.append(
                Pair(
                    scenario,
                    "req/s" if scenario == "rr" else "conn/s",
                    "wrk",
                    f"{conns} connections, {RR_SIZE} B each way, {how}",
                    bench_one,
                    wrk_one,
                )
            )

    rows: list[dict[str, Any]] = []
    for pair in pairs:
        try:
            runs = [pair.bench(), pair.other(), pair.other(), pair.bench()]
        except Exception as exc:
            runner.say(f"  cross-check {target.label} {pair.scenario} FAILED: {exc}")
            rows.append({"target": target.name, "scenario": pair.scenario, "error": str(exc)})
            continue
        bench = statistics.mean([runs[0][0], runs[3][0]])
        other = statistics.mean([runs[1][0], runs[2][0]])
        r = ratio(bench, other)
        note = pair.note
        if pair.scenario != "bulk":
            p99s = [run[1] for run in runs]
            note += (
                f"; p99 ms: bench {fmt_number(p99s[0])}, {fmt_number(p99s[3])}, "
                f"{pair.tool} {fmt_number(p99s[1])}, {fmt_number(p99s[2])}"
            )
        errors = [run[2] for run in runs]
        if any(errors):
            note += f"; errors: bench {errors[0] + errors[3]}, {pair.tool} {errors[1] + errors[2]}"
        rows.append(
            {
                "target": target.name,
                "scenario": pair.scenario,
                "metric": pair.metric,
                "bench": bench,
                "tool": pair.tool,
                "other": other,
                "ratio": r,
                "agree": None if r is None else abs(r - 1) <= AGREEMENT,
                "note": note,
                "runs": {"bench": [runs[0][0], runs[3][0]], "tool": [runs[1][0], runs[2][0]]},
            }
        )
        runner.say(
            f"  cross-check {target.label:18} {pair.scenario:8} lbtcp bench "
            f"{fmt_number(runs[0][0])}, {fmt_number(runs[3][0])} vs {pair.tool} "
            f"{fmt_number(runs[1][0])}, {fmt_number(runs[2][0])} {pair.metric} "
            f"(ratio of means {fmt_number(r)})"
        )
    return rows


# ---------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    scenario: str
    metric: str
    key: str
    unit: str
    better: str  # "higher" | "lower" | ""


TABLE = (
    Row("bulk", "throughput", "gbps", "Gbit/s", "higher"),
    Row("rr", "requests/s", "rate", "req/s", "higher"),
    Row("rr", "p99 latency", "p99_ms", "ms", "lower"),
    Row("connect", "connections/s", "rate", "conn/s", "higher"),
    Row("connect", "p99 latency", "p99_ms", "ms", "lower"),
    Row("c2000", "achieved rate", "rate", "req/s", "higher"),
    Row("c2000", "p99 latency", "p99_ms", "ms", "lower"),
    Row("c2000", "errors", "errors", "", "lower"),
    Row("idle_mem", "memory per idle session", "bytes_per_session", "bytes", "lower"),
)
CPU_TABLE = (
    Row("bulk", "proxy CPU per GB", "cpu_ms_per_gb", "ms", "lower"),
    Row("rr", "proxy CPU per request", "cpu_us_per_op", "µs", "lower"),
    Row("connect", "proxy CPU per connection", "cpu_us_per_op", "µs", "lower"),
    *(
        Row(scenario, what, key, "%", "")
        for scenario in ("bulk", "rr", "connect", "c2000")
        for what, key in (
            ("proxy process busy", "cpu_pct"),
            ("proxy core busy, all", "proxy_core_pct"),
            ("load core busy, all", "load_core_pct"),
        )
    ),
)
SCENARIOS = ("idle_mem", "bulk", "rr", "connect", "c2000")


def medians(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """{scenario: {target: {metric: median over the successful repeats}}}."""
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for result in results:
        for key, value in result["metrics"].items():
            if isinstance(value, int | float):
                grouped.setdefault((result["scenario"], result["target"], key), []).append(value)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (scenario, target, key), values in grouped.items():
        out.setdefault(scenario, {}).setdefault(target, {})[key] = statistics.median(values)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def markdown_table(
    rows: Sequence[Row], med: dict[str, dict[str, dict[str, float]]], targets: list[Target]
) -> str:
    """The medians with the ratios of every proxy to HAProxy."""
    names = [t.name for t in targets]
    others = [t for t in targets if t.proxy is not None and t.name != "haproxy"]
    head = ["scenario", "metric", "better"] + [t.label for t in targets]
    if "haproxy" in names:
        head += [f"{t.label} / HAProxy" for t in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        values = [med.get(row.scenario, {}).get(n, {}).get(row.key) for n in names]
        if all(v is None for v in values):
            continue
        unit = f" ({row.unit})" if row.unit else ""
        cells = [row.scenario, row.metric + unit, row.better or "-"]
        cells += [fmt_number(v) for v in values]
        if "haproxy" in names:
            base = med.get(row.scenario, {}).get("haproxy", {}).get(row.key)
            for t in others:
                r = ratio(med.get(row.scenario, {}).get(t.name, {}).get(row.key), base)
                cells.append("-" if r is None or not row.better else f"{r:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def svg_chart(med: dict[str, dict[str, dict[str, float]]], targets: list[Target]) -> str:
    """A grouped bar chart of each proxy's ratio to HAProxy per metric, on a log2 scale.

    Bars are drawn so that up always means better: for lower-is-better metrics the ratio is
    inverted (HAProxy / proxy), and the label says so.
    """
    others = [t for t in targets if t.proxy is not None and t.name != "haproxy"]
    colors = {"lbtcp": "#3b7dd8", "nginx": "#2a9d5b"}
    groups: list[tuple[str, list[tuple[Target, float | None]]]] = []
    for row in TABLE + CPU_TABLE[:3]:
        if row.better == "" or row.key == "errors":
            continue
        base = med.get(row.scenario, {}).get("haproxy", {}).get(row.key)
        bars: list[tuple[Target, float | None]] = []
        for t in others:
            r = ratio(med.get(row.scenario, {}).get(t.name, {}).get(row.key), base)
            if r is not None and row.better == "lower":
                r = 1 / r if r > 0 else None
            bars.append((t, r))
        if any(r is not None for _, r in bars):
            groups.append((f"{row.scenario}: {row.metric}", bars))
    shown = [r for _, bars in groups for _, r in bars if r]
    # The axis spans the data (at least 1/2 .. 2), clamped to 1/64 .. 64.
    lo_exp = max(-6, min(-1, math.floor(math.log2(min(shown, default=1.0)))))
    hi_exp = min(6, max(1, math.ceil(math.log2(max(shown, default=1.0)))))
    width, height = 240 + 90 * max(1, len(groups)), 300 + 30 * (hi_exp - lo_exp)
    left, top, bottom = 70, 50, 190
    plot_h = height - top - bottom

    def y_of(value: float) -> float:
        exp = min(max(math.log2(value), lo_exp), hi_exp)
        return top + (hi_exp - exp) / (hi_exp - lo_exp) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="14" font-weight="bold">Each proxy relative to '
        "HAProxy (1 = same; above 1 = better than HAProxy; log scale)</text>",
        f'<text x="{left}" y="36" fill="#555">Lower-is-better metrics (latency, memory, CPU '
        "per operation) are inverted: bar = HAProxy / proxy.</text>",
    ]
    for exp in range(lo_exp, hi_exp + 1):
        y = y_of(2.0**exp)
        label = f"{2**exp:g}" if exp >= 0 else f"1/{2**-exp}"
        stroke = "#000" if exp == 0 else "#ddd"
        out.append(
            f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="{stroke}"/>'
        )
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    base_y = y_of(1.0)
    for i, (title, bars) in enumerate(groups):
        gx = left + 20 + i * 90
        for j, (t, r) in enumerate(bars):
            x = gx + j * 26
            color = colors.get(t.name, "#888")
            if r is None:
                continue
            y = y_of(r)
            y0, y1 = min(y, base_y), max(y, base_y)
            out.append(
                f'<rect x="{x}" y="{y0:.1f}" width="22" height="{max(y1 - y0, 1):.1f}" '
                f'fill="{color}"><title>{t.label}: {r:.3g}</title></rect>'
            )
            ty = y0 - 3 if r >= 1 else y1 + 11
            out.append(
                f'<text x="{x + 11}" y="{ty:.1f}" text-anchor="middle" font-size="9">{r:.2f}</text>'
            )
        lx, ly = gx + 20, height - bottom + 12
        out.append(
            f'<text x="{lx}" y="{ly}" transform="rotate(40 {lx} {ly})">{xml_escape(title)}</text>'
        )
    for k, t in enumerate(others):
        x = width - 150
        y = 52 + k * 16
        out.append(
            f'<rect x="{x}" y="{y - 9}" width="12" height="10" '
            f'fill="{colors.get(t.name, "#888")}"/>'
        )
        out.append(f'<text x="{x + 18}" y="{y}">{t.label} / HAProxy</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def xml_escape(text: str) -> str:
    """Escape text for SVG."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def machine_info(proxies: list[Proxy]) -> dict[str, str]:
    """What the numbers were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": pkg_version("uvloop"),
        "lbtcp": pkg_version("lbtcp"),
    }
    for proxy in proxies:
        if proxy.name != "lbtcp":
            info[proxy.name] = proxy.version()
    for tool, argv in (("iperf3", ["iperf3", "--version"]), ("wrk", ["wrk", "--version"])):
        if shutil.which(tool):
            info[tool] = run_text(argv).splitlines()[0]
    with contextlib.suppress(OSError):
        info["load average at start"] = Path("/proc/loadavg").read_text().split(" ")[0]
    return info


def pkg_version(name: str) -> str:
    """An installed distribution's version, or 'not installed'."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def write_report(
    out_dir: Path,
    prefix: str,
    *,
    info: dict[str, str],
    command: str,
    settings: Settings,
    targets: list[Target],
    skipped: list[str],
    runner: Runner,
    cross: list[dict[str, Any]],
    pinning: str,
    started: str,
) -> Path:
    """Write PREFIX.md, PREFIX.svg and PREFIX.json; returns the markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    med = medians(runner.results)
    data = {
        "started": started,
        "machine": info,
        "command": command,
        "settings": settings.__dict__,
        "pinning": pinning,
        "targets": [t.name for t in targets],
        "skipped": skipped,
        "medians": med,
        "runs": runner.results,
        "crosscheck": cross,
    }
    (out_dir / f"{prefix}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / f"{prefix}.svg").write_text(svg_chart(med, targets))
    md = [
        "# lbtcp vs HAProxy vs nginx",
        "",
        f"Run {started}. Reproduce with:",
        "",
        "```sh",
        "benchmarks/install-tools   # once: haproxy, nginx + stream module, iperf3, wrk",
        command,
        "```",
        "",
        "## Machine",
        "",
    ]
    md += [f"- {k}: {v}" for k, v in info.items()]
    md += [f"- pinning: {pinning}"]
    md += [
        "",
        f"Each number is the median of {settings.repeats} run(s) of {settings.duration:g} s "
        f"(after {settings.warmup:g} s of warm-up), the targets interleaved within each "
        "repeat. `direct` is the load generator talking to the backends with no proxy: the "
        "ceiling of the load core.",
        "",
    ]
    if skipped:
        md += ["Skipped:", ""] + [f"- {s}" for s in skipped] + [""]
    md += quietness_notes(runner.results)
    md += [
        "## Results",
        "",
        markdown_table(TABLE, med, targets),
        "",
        "Ratios are proxy / HAProxy for the same metric: above 1 is better for a 'higher' "
        "metric, below 1 is better for a 'lower' one (latency, errors, memory).",
        "",
        f"![ratios to HAProxy]({prefix}.svg)",
        "",
        "## Proxy CPU",
        "",
        "Sampled from /proc while the load ran (medians of 0.5 s windows). 'Proxy process "
        "busy' is the proxy's own CPU time (nginx: its worker) as a share of one core: near "
        "100 % the proxy was the bottleneck; well below, something else was (the load core, "
        "or other processes on the proxy's core), and throughput ratios then understate the "
        "faster proxy's lead. 'Proxy core busy, all' counts everything on that core (other "
        "processes, the loopback's softirq work): far above the proxy's own share means the "
        "machine was not quiet. CPU per operation is the proxy's CPU time divided by the work "
        "done; it compares efficiency when the proxies ran at similar load (at light load, "
        "event loops batch less and every operation costs more).",
        "",
        markdown_table(CPU_TABLE, med, targets),
        "",
    ]
    md += load_bound_notes(med, targets)
    md += crosscheck_section(cross, targets)
    failed = [r for r in runner.results if r["error"]]
    with_errors = [r for r in runner.results if r["metrics"].get("errors")]
    md += ["## Failures and errors", ""]
    if not failed and not with_errors:
        md += ["None: every run completed with 0 errors.", ""]
    for r in failed:
        md.append(f"- {r['scenario']} / {r['target']} repeat {r['repeat']}: {r['error']}")
    for r in with_errors:
        errs = r["raw"].get("errors", {})
        kinds = ", ".join(f"{k} {v}" for k, v in errs.items() if v)
        md.append(
            f"- {r['scenario']} / {r['target']} repeat {r['repeat']}: "
            f"{r['metrics']['errors']} errors ({kinds})"
        )
    md.append("")
    path = out_dir / f"{prefix}.md"
    path.write_text("\n".join(md))
    return path


def quietness_notes(results: list[dict[str, Any]]) -> list[str]:
    """How busy other processes kept the proxy core, measured while nothing of ours ran there.

    During the ``direct`` runs no proxy runs on the proxy core and the loopback work is
    charged to the load core (the sender's), so whatever kept the proxy core busy then was
    someone else.
    """
    others = [
        r["metrics"]["proxy_core_pct"]
        for r in results
        if r["target"] == "direct" and "proxy_core_pct" in r["metrics"]
    ]
    if not others:
        return []
    busy = statistics.median(others)
    line = (
        f"Quietness: while `direct` ran (nothing of this benchmark on the proxy core), other "
        f"processes kept the proxy core {busy:.0f} % busy (median of {len(others)} runs; "
        f"max {max(others):.0f} %)."
    )
    if busy <= QUIET_PCT:
        return [line, ""]
    return [
        f"**Warning: the machine was not quiet.** {line} The proxies shared their core with "
        "that load (each then gets about its fair share of the core, whatever it needs), so "
        "absolute rates are low and noisy; ratios between the interleaved proxies and CPU per "
        "operation hold up better. Re-run on a quiet machine for numbers to quote.",
        "",
    ]


def load_bound_notes(
    med: dict[str, dict[str, dict[str, float]]], targets: list[Target]
) -> list[str]:
    """Flag results that reach the no-proxy ceiling (the load core was the limit)."""
    notes = []
    for scenario, key in (("bulk", "gbps"), ("rr", "rate"), ("connect", "rate")):
        ceiling = med.get(scenario, {}).get("direct", {}).get(key)
        if not ceiling:
            continue
        for t in targets:
            value = med.get(scenario, {}).get(t.name, {}).get(key)
            if t.proxy is not None and value and value >= LOAD_BOUND_SHARE * ceiling:
                notes.append(
                    f"- {scenario}: {t.label} reached {value / ceiling:.0%} of the no-proxy "
                    "ceiling: the load core was (nearly) the limit, so this proxy could do more."
                )
    if not notes:
        return []
    return ["## Where the load side was the limit", "", *notes, ""]


def crosscheck_section(cross: list[dict[str, Any]], targets: list[Target]) -> list[str]:
    """The side-by-side table of lbtcp bench and the independent tools."""
    if not cross:
        return []
    labels = {t.name: t.label for t in targets}
    lines = [
        "## Cross-check: lbtcp bench vs independent tools",
        "",
        "Through the same proxy, in ABBA order (bench, tool, tool, bench: the means are "
        "compared, so steady drift cancels), bytes matched: iperf3 with 64 KiB writes vs "
        "`lbtcp bench --mode stream --size 64KiB` into the sink; wrk with requests and "
        "responses padded to 64 bytes (HTTP responder `benchmarks/httpd.py`) vs `lbtcp bench` "
        "rr/connect with 64-byte echo messages, same connection counts. They should agree "
        f"within {AGREEMENT:.0%} when the proxy is the bottleneck.",
        "",
        "| through | scenario | lbtcp bench | independent tool | bench / tool | agree | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in cross:
        who = labels.get(row["target"], row["target"])
        if "error" in row:
            lines.append(f"| {who} | {row['scenario']} | - | - | - | - | failed: {row['error']} |")
            continue
        agree = "yes" if row["agree"] else "NO"
        lines.append(
            f"| {who} | {row['scenario']} | {fmt_number(row['bench'])} {row['metric']} | "
            f"{row['tool']} {fmt_number(row['other'])} {row['metric']} | "
            f"{fmt_number(row['ratio'])} | {agree} | {row['note']} |"
        )
    lines.append("")
    disagree = [r for r in cross if r.get("agree") is False]
    if disagree:
        direct = {
            r["scenario"]: r["ratio"] for r in cross if r["target"] == "direct" and r.get("ratio")
        }
        lines += [
            "Why they can disagree: (1) the load side. wrk and iperf3 (C) cost less per "
            "exchange on the load core than lbtcp bench with the Python echo/sink; wherever the "
            "load core, not the proxy, sets the pace, that difference shows. The `direct` row "
            "measures it with no proxy at all. (2) The exchanges differ in detail: in wrk's "
            "connect form the server closes first (`Connection: close`), in lbtcp bench's the "
            "client does, so a proxy handles the FINs in a different order; HTTP adds nothing "
            "a layer-4 proxy sees but bytes, and those are matched. (3) Noise from other "
            "processes: the per-run values show it (ABBA cancels only steady drift).",
            "",
        ]
        for row in disagree:
            who = labels.get(row["target"], row["target"])
            base = direct.get(row["scenario"])
            runs = row["runs"]
            values = (
                f"bench {', '.join(fmt_number(v) for v in runs['bench'])}; "
                f"{row['tool']} {', '.join(fmt_number(v) for v in runs['tool'])}"
            )
            if row["target"] == "direct":
                why = "the tools' own difference on the load core (no proxy in the path)"
            elif base and abs(row["ratio"] / base - 1) <= AGREEMENT:
                why = (
                    f"about the tools' own difference measured directly ({base:.2f}); "
                    f"with that taken out they agree ({row['ratio'] / base:.2f})"
                )
            else:
                why = "not the tools' own difference" + (f" (direct: {base:.2f})" if base else "")
            lines.append(
                f"- {who}, {row['scenario']}: bench / {row['tool']} = {row['ratio']:.2f}, "
                f"{why}. Per run: {values}."
            )
        lines.append("")
    return lines


# ---------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Compare lbtcp with HAProxy and nginx (stream) on the same load and cores."
    )
    parser.add_argument("--quick", action="store_true", help="1 s runs, 1 repeat: a smoke test")
    parser.add_argument("--duration", type=float, default=None, help="seconds per run [3]")
    parser.add_argument("--warmup", type=float, default=None, help="uncounted seconds [1]")
    parser.add_argument("--repeats", type=int, default=None, help="runs per scenario [3]")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--proxies", default="lbtcp,haproxy,nginx", help="comma list of lbtcp,haproxy,nginx"
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS)
    )
    parser.add_argument("--idle-sessions", type=int, default=None, help="idle_mem count [5000]")
    parser.add_argument("--c2000-rate", type=float, default=4000.0, help="c2000 offered req/s")
    parser.add_argument("--no-direct", action="store_true", help="skip the no-proxy baseline")
    parser.add_argument("--no-crosscheck", action="store_true", help="skip iperf3/wrk")
    parser.add_argument(
        "--crosscheck",
        default="lbtcp,haproxy,direct",
        help="targets of the cross-check (comma list of lbtcp,haproxy,nginx,direct)",
    )
    parser.add_argument("--proxy-cpu", type=int, default=0, help="core for the proxies [0]")
    parser.add_argument("--load-cpu", type=int, default=1, help="core for load+backends [1]")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace, nofile: int) -> Settings:
    """Settings from the options; --quick shrinks every default."""
    quick = bool(args.quick)
    duration = args.duration if args.duration is not None else (1.0 if quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    repeats = args.repeats if args.repeats is not None else (1 if quick else 3)
    idle = args.idle_sessions if args.idle_sessions is not None else (1000 if quick else 5000)
    # The proxy holds two descriptors per session and the echo backend one: stay inside.
    idle = max(10, min(idle, (nofile - 500) // 2))
    return Settings(
        duration=duration,
        warmup=warmup,
        repeats=max(1, repeats),
        idle_sessions=idle,
        c2000_connections=min(2000, (nofile - 500) // 2),
        c2000_rate=args.c2000_rate,
        crosscheck_duration=duration,
    )


def pinning(args: argparse.Namespace) -> tuple[int | None, int | None, str]:
    """(proxy core, load core, description); no pinning when there are too few cores."""
    allowed = os.sched_getaffinity(0)
    if shutil.which("taskset") is None:
        print(
            "run.py: taskset not found (Debian package util-linux; benchmarks/install-tools"
            " installs it): running unpinned",
            file=sys.stderr,
        )
        return None, None, "none (no taskset)"
    if args.proxy_cpu == args.load_cpu or not {args.proxy_cpu, args.load_cpu} <= allowed:
        print(
            f"run.py: cores {args.proxy_cpu} and {args.load_cpu} are not two allowed cores "
            f"({sorted(allowed)}): running unpinned",
            file=sys.stderr,
        )
        return None, None, "none (fewer than two usable cores)"
    return (
        args.proxy_cpu,
        args.load_cpu,
        f"proxy on core {args.proxy_cpu}; load generator, backends and this script on core "
        f"{args.load_cpu} (taskset -c)",
    )


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into SystemExit so the ``finally`` that stops children runs."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; returns the exit code."""
    args = parse_args(argv)
    nofile = raise_nofile_limit()
    settings = build_settings(args, nofile)
    proxy_cpu, load_cpu, pin_text = pinning(args)
    if load_cpu is not None:
        # This script opens the idle_mem sessions itself: it belongs with the load.
        os.sched_setaffinity(0, {load_cpu})
    lbtcp = lbtcp_binary()
    wanted = [p.strip() for p in args.proxies.split(",") if p.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    cross_targets = {t.strip() for t in args.crosscheck.split(",") if t.strip()}
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"run.py: unknown scenario(s): {', '.join(sorted(unknown))}")
    unknown = set(wanted) - {"lbtcp", "haproxy", "nginx"}
    if unknown:
        raise SystemExit(f"run.py: unknown proxy(ies): {', '.join(sorted(unknown))}")
    command = shlex.join([".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]])
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def say(text: str) -> None:
        print(text, flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="lbtcp-bench-"))
    children = Children(tmp)
    all_proxies: dict[str, Proxy] = {
        "lbtcp": LbtcpProxy(tmp, nofile, lbtcp),
        "haproxy": HaproxyProxy(tmp, nofile),
        "nginx": NginxProxy(tmp, nofile),
    }
    skipped: list[str] = []
    proxies: list[Proxy] = []
    for name in wanted:
        reason = all_proxies[name].missing()
        if reason:
            say(f"skipping {reason}")
            skipped.append(reason)
        else:
            proxies.append(all_proxies[name])
    for tool, package in (("iperf3", "iperf3"), ("wrk", "wrk")):
        if not args.no_crosscheck and shutil.which(tool) is None:
            reason = f"cross-check with {tool}: not found; install the Debian package {package}"
            say(f"skipping {reason} (benchmarks/install-tools does)")
            skipped.append(reason)
    info = machine_info(proxies)
    say(f"machine: {info['cpu']}, {info['cores']} cores; {pin_text}")
    say(f"settings: {settings}")
    cross: list[dict[str, Any]] = []
    try:
        with terminate_as_exit():
            backends = start_backends(children, lbtcp, load_cpu)
            say(f"backends: {backends.ports}")
            targets: list[Target] = []
            for proxy in proxies:
                try:
                    proxy.start(children, backends, proxy_cpu)
                except StartError as exc:
                    say(f"skipping {proxy.label}: it did not start: {exc}")
                    skipped.append(f"{proxy.label}: did not start ({exc})")
                    proxy.stop()
                    continue
                targets.append(Target(proxy.name, proxy.label, proxy, proxy.ports))
            if not args.no_direct:
                targets.append(Target("direct", "direct (no proxy)", None, backends.ports))
            runner = Runner(children, lbtcp, settings, load_cpu, proxy_cpu, backends, say)
            for scenario in scenarios:
                for repeat in range(settings.repeats):
                    say(f"{scenario} repeat {repeat + 1}/{settings.repeats}")
                    for target in targets:
                        if scenario == "idle_mem" and target.proxy is None:
                            continue
                        runner.scenario(scenario, target, repeat)
            if not args.no_crosscheck:
                say("cross-check")
                for target in targets:
                    if target.name in cross_targets:
                        cross += crosscheck(runner, target)
            prefix = "quick" if args.quick else "latest"
            path = write_report(
                args.out,
                prefix,
                info=info,
                command=command,
                settings=settings,
                targets=targets,
                skipped=skipped,
                runner=runner,
                cross=cross,
                pinning=pin_text,
                started=started,
            )
            say(f"wrote {path} (+ .svg, .json)")
            print(path.read_text())
    except StartError as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run.py: interrupted; stopping every process it started", file=sys.stderr)
        return 130
    finally:
        for proxy in proxies:
            with contextlib.suppress(Exception):
                proxy.stop()
        children.close_all()
        if args.keep_tmp:
            print(f"configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
