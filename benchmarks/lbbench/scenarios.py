"""The scenarios (bulk, rr, connect, c2000, idle_mem) and the cross-check against wrk/iperf3."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lbbench.common import (
    AGREEMENT,
    BENCH_SLACK,
    BULK_WRITE,
    CONNECT_WORKERS,
    CPU_SAMPLE_INTERVAL,
    RR_CONNECTIONS,
    RR_SIZE,
)
from lbbench.procs import Child, Children, CpuSampler, rss_kib
from lbbench.proxies import Backends, Proxy


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


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
