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


def tree_cpu_ns(pid: int) -> int:
    total = 0
    for member in tree(pid):
        with contextlib.suppress(OSError):  # gone between the listing and the read
            total += cpu_ns(member)
    return total


def bench(
    children: Children, lbtcp: str, proxy: Proxy, mode: str, duration: float
) -> dict[str, Any]:
    assert proxy.child is not None
    root = proxy.child.proc.pid
    out = children.logdir / f"bench-{proxy.name}-{mode}-{time.monotonic_ns()}.json"
    argv = [lbtcp, "bench", f"127.0.0.1:{proxy.ports['echo']}", "--mode", mode]
    argv += ["--connections", str(CONNECT_WORKERS if mode == "connect" else RR_CONNECTIONS)]
    argv += ["--size", str(RR_SIZE), "--duration", f"{duration:g}s", "--warmup", "0s"]
    argv += ["--quiet", "--json", str(out)]
    before = tree_cpu_ns(root)
    child = children.spawn(f"bench-{proxy.name}-{mode}", argv, cpu=None)
    try:
        child.proc.wait(timeout=duration + BENCH_SLACK)
    except Exception:
        Children.stop(child.proc)
        raise
    cpu_s = (tree_cpu_ns(root) - before) / 1e9
    report: dict[str, Any] = json.loads(out.read_text())
    return {
        "rate": report["requests_per_s"],
        "requests": report["requests"],
        "errors": report["errors_total"],
        "cpu_s": cpu_s,
        "per_cpu_s": report["requests"] / cpu_s if cpu_s > 0 else 0.0,
        "processes": len(tree(root)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
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
            proxies: list[Proxy] = [
                LbtcpWorkers(workdir, nofile, lbtcp, 1),
                LbtcpWorkers(workdir, nofile, lbtcp, 2),
                Haproxy2(workdir, nofile),
                Nginx2(workdir, nofile),
            ]
            running = []
            for proxy in proxies:
                missing = proxy.missing()
                if missing:
                    print(f"skipped: {missing}", flush=True)
                    continue
                proxy.start(children, backends, None)
                running.append(proxy)
            load_before = os.getloadavg()
            rows: list[dict[str, Any]] = []
            for round_ in range(args.rounds):
                for mode in ("connect", "rr"):
                    for proxy in running:
                        result = bench(children, lbtcp, proxy, mode, args.duration)
                        result.update(round=round_, mode=mode, target=proxy.label)
                        rows.append(result)
                        print(
                            f"round {round_} {mode:7s} {proxy.label:26s} "
                            f"{result['rate']:9.0f}/s  cpu {result['cpu_s']:.2f}s  "
                            f"{result['per_cpu_s']:8.0f}/cpu-s  errors {result['errors']}",
                            flush=True,
                        )
            load_after = os.getloadavg()
        finally:
            children.close_all()
    summary = summarize(rows)
    print()
    for line in table(summary):
        print(line)
    print(f"\nload average before {load_before}, after {load_after}; cpus {os.cpu_count()}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rows": rows, "summary": summary, "loadavg": [load_before, load_after]},
                indent=1,
            )
        )
    return 0


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        entry = out.setdefault(row["mode"], {}).setdefault(row["target"], {})
        for key in ("rate", "per_cpu_s"):
            entry.setdefault(f"_{key}", []).append(row[key])  # type: ignore[arg-type]
    for targets in out.values():
        for entry in targets.values():
            for key in ("rate", "per_cpu_s"):
                entry[key] = statistics.median(entry.pop(f"_{key}"))  # type: ignore[arg-type]
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


if __name__ == "__main__":
    sys.exit(main())
