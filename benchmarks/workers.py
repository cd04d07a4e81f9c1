"""workers = 2 against workers = 1, HAProxy ``nbthread 2`` and nginx ``worker_processes 2``.

    .venv/bin/python benchmarks/workers.py [--duration S] [--rounds N] [--json FILE]

Issue 10's benchmark. Unpinned (every process may use both cores; the load generator needs
one too), interleaved: each round runs every scenario against every target in turn, so drift
on a shared machine hits all of them alike; the report shows medians over rounds. Scenarios
(``lbtcp bench`` against the echo backend, 64-byte messages): ``connect`` (32 workers each
open, exchange one message, close: new connections/s) and ``rr`` (64 kept-open connections:
requests/s). For each run the CPU time of the proxy's whole process tree (the lbtcp parent
and its workers; HAProxy's threads; nginx's master and workers) is read from
``/proc/PID/task/*/schedstat`` before and after, giving work per proxy CPU-second.

Reuses benchmarks/run.py's process handling, backends and proxy configs by import. Bounded:
rounds x 2 scenarios x 4 targets runs of ``--duration`` s, each killed past duration + 60 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # beside this file, not a package
    BENCH_SLACK,
    CONNECT_WORKERS,
    RR_CONNECTIONS,
    RR_SIZE,
    Backends,
    Children,
    HaproxyProxy,
    LbtcpProxy,
    NginxProxy,
    Proxy,
    children_of,
    cpu_ns,
    lbtcp_binary,
    raise_nofile_limit,
    start_backends,
)


class LbtcpWorkers(LbtcpProxy):
    def __init__(self, workdir: Path, nofile: int, lbtcp: str, workers: int) -> None:
        super().__init__(workdir, nofile, lbtcp)
        self.workers = workers
        self.name = f"lbtcp-w{workers}"
        self.label = f"lbtcp workers={workers}"

    def config(self, backends: Backends) -> str:
        return super().config(backends).replace("workers = 1", f"workers = {self.workers}")


class Haproxy2(HaproxyProxy):
    name = "haproxy-t2"
    label = "HAProxy nbthread 2"

    def config(self, backends: Backends) -> str:
        return super().config(backends).replace("nbthread 1", "nbthread 2")


class Nginx2(NginxProxy):
    name = "nginx-w2"
    label = "nginx worker_processes 2"

    def config(self, backends: Backends) -> str:
        return super().config(backends).replace("worker_processes 1;", "worker_processes 2;")


def tree(pid: int) -> list[int]:
    out = [pid]
    for child in children_of(pid):
        out += tree(child)
    return out


def cpu_by_pid(pids: list[int]) -> dict[int, int]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # gone between the listing and the read
            out[pid] = cpu_ns(pid)
    return out


def socket_fds(pid: int) -> int:
    """Sockets open in ``pid`` (listening, IPC and one per client or server connection)."""
    count = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def echo_backend_pid() -> int:
    """The ``lbtcp echo`` child that start_backends started (found by its command line)."""
    for pid in children_of(os.getpid()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"echo" in argv[:4]:  # [python,] lbtcp echo 0
                return pid
    raise SystemExit("workers.py: the echo backend is not among this script's children")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(
    children: Children,
    lbtcp: str,
    proxy: Proxy,
    mode: str,
    duration: float,
    echo_pid: int,
) -> dict[str, Any]:
    """One ``lbtcp bench`` run against ``proxy``, with where the CPU went: the proxy's root
    process and its other processes (lbtcp's workers, nginx's workers), the load generator
    (its rusage once reaped) and the echo backend; and, halfway through, how the sessions
    were spread over the proxy's processes (socket fds beyond those open before the run, two
    per session: client and server)."""
    assert proxy.child is not None
    root = proxy.child.proc.pid
    members = tree(root)
    out = children.logdir / f"bench-{proxy.name}-{mode}-{time.monotonic_ns()}.json"
    argv = [lbtcp, "bench", f"127.0.0.1:{proxy.ports['echo']}", "--mode", mode]
    argv += ["--connections", str(CONNECT_WORKERS if mode == "connect" else RR_CONNECTIONS)]
    argv += ["--size", str(RR_SIZE), "--duration", f"{duration:g}s", "--warmup", "0s"]
    argv += ["--quiet", "--json", str(out)]
    idle_sockets = {pid: socket_fds(pid) for pid in members}
    load = os.getloadavg()[0]
    before = cpu_by_pid([*members, echo_pid])
    reaped_before = children_cpu_s()
    child = children.spawn(f"bench-{proxy.name}-{mode}", argv, cpu=None)
    try:
        time.sleep(duration / 2)
        sessions = {pid: (socket_fds(pid) - idle_sockets[pid]) / 2 for pid in members}
        child.proc.wait(timeout=duration / 2 + BENCH_SLACK)
    except Exception:
        Children.stop(child.proc)
        raise
    bench_cpu_s = children_cpu_s() - reaped_before
    after = cpu_by_pid([*members, echo_pid])
    spent = {pid: (after[pid] - before[pid]) / 1e9 for pid in after if pid in before}
    cpu_s = sum(v for pid, v in spent.items() if pid != echo_pid)
    report: dict[str, Any] = json.loads(out.read_text())
    requests = report["requests"]
    workers = [pid for pid in members[1:] if pid in spent and spent[pid] > 0.001]
    return {
        "rate": report["requests_per_s"],
        "requests": requests,
        "errors": report["errors_total"],
        "cpu_s": cpu_s,
        "per_cpu_s": requests / cpu_s if cpu_s > 0 else 0.0,
        "processes": len(members),
        "loadavg_1m": load,
        "cpu_root_s": spent.get(root, 0.0),
        "cpu_workers_s": [spent[pid] for pid in workers],
        "cpu_bench_s": bench_cpu_s,
        "cpu_echo_s": spent.get(echo_pid, 0.0),
        "sessions_midway": [sessions.get(pid, 0.0) for pid in workers] or [sessions[root]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    nofile = raise_nofile_limit()
    lbtcp = lbtcp_binary()
    with tempfile.TemporaryDirectory(prefix="lbtcp-workers-bench-") as tmp:
        workdir = Path(tmp)
        children = Children(workdir)
        try:
            backends = start_backends(children, lbtcp, None)
            backends.ports = {"echo": backends.ports["echo"]}
            echo_pid = echo_backend_pid()
            proxies: list[Proxy] = [
                LbtcpWorkers(workdir, nofile, lbtcp, 1),
                LbtcpWorkers(workdir, nofile, lbtcp, 2),
                Haproxy2(workdir, nofile),
                Nginx2(workdir, nofile),
            ]
            running = []
            versions: dict[str, str] = {}
            for proxy in proxies:
                missing = proxy.missing()
                if missing:
                    print(f"skipped: {missing}", flush=True)
                    continue
                proxy.start(children, backends, None)
                running.append(proxy)
                with contextlib.suppress(Exception):  # a version string is only a label
                    versions[proxy.label] = proxy.version()
            load_before = os.getloadavg()
            rows: list[dict[str, Any]] = []
            for round_ in range(args.rounds):
                for mode in ("connect", "rr"):
                    for proxy in running:
                        result = bench(children, lbtcp, proxy, mode, args.duration, echo_pid)
                        result.update(round=round_, mode=mode, target=proxy.label)
                        rows.append(result)
                        spread = "/".join(f"{n:g}" for n in result["sessions_midway"])
                        print(
                            f"round {round_} {mode:7s} {proxy.label:26s} "
                            f"{result['rate']:9.0f}/s  cpu {result['cpu_s']:.2f}s  "
                            f"{result['per_cpu_s']:8.0f}/cpu-s  errors {result['errors']}  "
                            f"root {result['cpu_root_s']:.3f}s  bench "
                            f"{result['cpu_bench_s']:.2f}s  echo {result['cpu_echo_s']:.2f}s  "
                            f"sessions {spread}  load {result['loadavg_1m']:.2f}",
                            flush=True,
                        )
            load_after = os.getloadavg()
        finally:
            children.close_all()
    summary = summarize(rows)
    print()
    for line in table(summary):
        print(line)
    print()
    for line in time_table(summary):
        print(line)
    print(f"\nload average before {load_before}, after {load_after}; cpus {os.cpu_count()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "versions": versions,
                    "rows": rows,
                    "summary": summary,
                    "loadavg": [load_before, load_after],
                },
                indent=1,
            )
        )
    return 0


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": os.uname().release,
        "python": sys.version.split()[0],
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Medians over rounds, per scenario and target: the rate, work per proxy CPU-second,
    and the CPU per operation (us) of the proxy's root process, of its other processes, of
    the load generator and of the echo backend, the share of both cores they used, and the
    busiest process's share of the sessions halfway through (one process: 1.0)."""
    per: dict[tuple[str, str], dict[str, list[float]]] = {}
    for row in rows:
        ops = max(row["requests"], 1)
        seconds = ops / row["rate"] if row["rate"] else 0.0
        sessions = row["sessions_midway"]
        values = {
            "rate": row["rate"],
            "per_cpu_s": row["per_cpu_s"],
            "us_root": row["cpu_root_s"] / ops * 1e6,
            "us_workers": sum(row["cpu_workers_s"]) / ops * 1e6,
            "us_bench": row["cpu_bench_s"] / ops * 1e6,
            "us_echo": row["cpu_echo_s"] / ops * 1e6,
            "cores_used": (row["cpu_s"] + row["cpu_bench_s"] + row["cpu_echo_s"]) / seconds
            if seconds
            else 0.0,
            "busiest_share": max(sessions) / sum(sessions) if sum(sessions) > 0 else 1.0,
        }
        entry = per.setdefault((row["mode"], row["target"]), {})
        for key, value in values.items():
            entry.setdefault(key, []).append(value)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (mode, target), entry in per.items():
        out.setdefault(mode, {})[target] = {k: statistics.median(v) for k, v in entry.items()}
    return out


def table(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        "| scenario | target | rate (/s) | work per proxy CPU-s | vs workers=1 (per CPU-s) |"
        " vs HAProxy (rate) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, targets in summary.items():
        one = targets.get("lbtcp workers=1", {}).get("per_cpu_s")
        haproxy = targets.get("HAProxy nbthread 2", {}).get("rate")
        for target, entry in targets.items():
            vs_one = f"{entry['per_cpu_s'] / one:.2f}x" if one else "-"
            vs_ha = f"{entry['rate'] / haproxy:.2f}x" if haproxy else "-"
            lines.append(
                f"| {mode} | {target} | {entry['rate']:.0f} | {entry['per_cpu_s']:.0f} | "
                f"{vs_one} | {vs_ha} |"
            )
    return lines


def time_table(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Where the CPU went, in microseconds per operation (medians over rounds)."""
    lines = [
        "| scenario | target | proxy root process | proxy's other processes |"
        " load generator | echo backend | cores busy (of 2) | busiest process's sessions |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, targets in summary.items():
        for target, e in targets.items():
            lines.append(
                f"| {mode} | {target} | {e['us_root']:.1f} | {e['us_workers']:.1f} | "
                f"{e['us_bench']:.1f} | {e['us_echo']:.1f} | {e['cores_used']:.2f} | "
                f"{e['busiest_share']:.0%} |"
            )
    return lines


if __name__ == "__main__":
    sys.exit(main())
