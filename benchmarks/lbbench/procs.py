"""Child processes (own process groups, stopped by id), readiness, /proc readings, pinning."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lbbench.common import CPU_WINDOW, START_TIMEOUT, STOP_TIMEOUT


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
