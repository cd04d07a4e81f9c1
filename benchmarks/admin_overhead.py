"""What the admin API costs the data plane: lbtcp with ``[admin]`` and /metrics scraped every
second, against the same lbtcp without ``[admin]``.

    .venv/bin/python benchmarks/admin_overhead.py [--repeats N] [--duration S] [--out DIR]

Theory of operation. This reuses benchmarks/run.py (imported, not copied): its process
handling (``Children``: own process groups, stopped by id), the pinning (proxies on core 0,
load and backends on core 1, ``taskset``), ``LbtcpProxy``'s config and ``Runner``, which runs
``lbtcp bench`` and samples the proxy's CPU from /proc. Two lbtcp processes run side by side
over one ``lbtcp echo``: ``plain`` (the benchmark suite's config) and ``admin`` (the same plus
an ``[admin]`` table). Each repeat runs both, in ABBA order across repeats so that steady drift
cancels, for ``rr`` (64 kept-open connections, 64-byte echo) and ``connect`` (32 workers
opening, exchanging 64 bytes, closing). While, and only while, ``admin`` is under load a thread
here scrapes its /metrics once a second, as Prometheus would; the idle instance is never
scraped, so the scrapes cannot slow the other side's runs on the shared core.

Reported: medians of throughput, p99 and the proxy's CPU per operation for each, their
ratios, the per-repeat ratios' spread (the noise floor), and the scrape times seen under load.
Then the scrape time of a 1,000-server pool (a third lbtcp, no load): 30 GETs of /metrics,
and benchmarks/metrics_render.py's in-process render figure when that script exists.

The run is bounded: no new bench run starts once ``--budget`` seconds (150 by default) have
passed, so the whole script stays within 3 minutes; the report says how many repeats ran.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as suite  # noqa: E402  (benchmarks/ is not a package: the suite's helpers by path)

SCENARIOS = ("rr", "connect")
SCRAPE_EVERY = 1.0
BIG_POOL = 1000
BIG_SCRAPES = 30
TARGET_PCT = 3.0
# Proxy core busier than the proxy by more than this (points): someone else ran there.
NOISY_POINTS = 30.0


def get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def wait_http(url: str, child: suite.Child, timeout: float = suite.START_TIMEOUT) -> None:
    """Poll ``url`` until it answers 200; fail if the child dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if child.proc.poll() is not None:
            raise suite.StartError(f"{child.name} exited:\n{child.log_tail()}")
        with contextlib.suppress(OSError):
            if get(url, timeout=1.0)[0] == 200:
                return
        if time.monotonic() > deadline:
            raise suite.StartError(f"{child.name}: {url} not answering")
        time.sleep(0.05)


class AdminLbtcp(suite.LbtcpProxy):
    """The suite's lbtcp config plus ``[admin]`` on a loopback port."""

    name = "admin"
    label = "lbtcp, [admin] + /metrics every 1 s"

    def __init__(self, workdir: Path, nofile: int, lbtcp: str) -> None:
        super().__init__(workdir, nofile, lbtcp)
        self.admin_port = suite.free_port()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/metrics"

    def config(self, backends: suite.Backends) -> str:
        return super().config(backends) + f'\n[admin]\nlisten = "127.0.0.1:{self.admin_port}"\n'

    def start(self, children: suite.Children, backends: suite.Backends, cpu: int | None) -> None:
        super().start(children, backends, cpu)
        assert self.child is not None
        wait_http(f"http://127.0.0.1:{self.admin_port}/healthz", self.child)


class PlainLbtcp(suite.LbtcpProxy):
    name = "plain"
    label = "lbtcp, no [admin]"


class Scraper:
    """Scrapes a /metrics URL every ``SCRAPE_EVERY`` s on a thread while in a ``with``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seconds: list[float] = []
        self.sizes: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status, body = get(self.url)
                if status != 200:
                    self.errors.append(f"status {status}")
                self.seconds.append(time.monotonic() - started)
                self.sizes.append(len(body))
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            next_at += SCRAPE_EVERY
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        self._stop.clear()
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self._stop.set()
            thread.join(10)


def start_echo(children: suite.Children, lbtcp: str, cpu: int | None) -> suite.Backends:
    child = children.spawn("echo", [lbtcp, "echo", "0"], cpu=cpu)
    found = child.wait_for_text(r"echo listening on 127\.0\.0\.1:(\d+)")
    return suite.Backends(ports={"echo": int(found.group(1))})


def big_pool_scrapes(
    children: suite.Children, lbtcp: str, workdir: Path, cpu: int | None
) -> dict[str, Any]:
    """Scrape times of /metrics for one pool of ``BIG_POOL`` servers (probed, rarely)."""
    admin_port = suite.free_port()
    listen_port = suite.free_port()
    lines = [
        "[global]",
        "access_log = false",
        "[admin]",
        f'listen = "127.0.0.1:{admin_port}"',
        "[listeners.web]",
        f'bind = "127.0.0.1:{listen_port}"',
        'pool = "big"',
        "[pools.big]",
        # Probed, so that every server has its health_checks series too; an hour's interval
        # keeps the probes (spread over it) from doing anything during the scrapes.
        "[pools.big.health]",
        'interval = "1h"',
        'initial = "healthy"',
    ]
    for i in range(BIG_POOL):
        lines += ["[[pools.big.servers]]", f'address = "127.0.0.{1 + i // 250}:{20000 + i}"']
    path = workdir / "big.toml"
    path.write_text("\n".join(lines) + "\n")
    child = children.spawn("big", [lbtcp, "serve", str(path)], cpu=cpu)
    url = f"http://127.0.0.1:{admin_port}/metrics"
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/healthz", child)
        get(url)  # the first scrape builds the registry; time the steady state
        times = []
        size = samples = 0
        for _ in range(BIG_SCRAPES):
            started = time.monotonic()
            status, body = get(url)
            times.append(time.monotonic() - started)
            if status != 200:
                raise RuntimeError(f"/metrics answered {status}")
            size = len(body)
            samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    finally:
        suite.Children.stop(child.proc, signal.SIGINT)
    times.sort()
    return {
        "servers": BIG_POOL,
        "scrapes": len(times),
        "median_ms": statistics.median(times) * 1000,
        "p90_ms": times[int(0.9 * (len(times) - 1))] * 1000,
        "max_ms": times[-1] * 1000,
        "bytes": size,
        "samples": samples,
    }


def render_script() -> dict[str, Any] | None:
    """benchmarks/metrics_render.py's output, if that script exists."""
    script = HERE / "metrics_render.py"
    if not script.exists():
        return None
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    # Its stdout is the figures; its stderr is the log of the lbtcp it runs, wanted only when
    # it failed.
    output = done.stdout if done.returncode == 0 else done.stdout + done.stderr
    return {"returncode": done.returncode, "output": output.strip()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="pairs per scenario [7]")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per run [3]")
    parser.add_argument("--warmup", type=float, default=1.0, help="uncounted seconds [1]")
    parser.add_argument("--budget", type=float, default=150.0, help="no new run after [150] s")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma list of rr,connect [both]"
    )
    parser.add_argument(
        "--no-scrape", action="store_true", help="[admin] on but never scraped (to tell apart)"
    )
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    return parser.parse_args(argv)


def pct(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else (a / b - 1) * 100


def summarise(results: list[dict[str, Any]], scenarios: Sequence[str]) -> dict[str, Any]:
    """Medians per scenario and target, and the per-repeat ratios admin / plain."""
    out: dict[str, Any] = {}
    for scenario in scenarios:
        rows = [r for r in results if r["scenario"] == scenario and not r["error"]]
        entry: dict[str, Any] = {}
        for target in ("plain", "admin"):
            mine = [r["metrics"] for r in rows if r["target"] == target]
            entry[target] = {
                key: statistics.median(m[key] for m in mine)
                for key in ("rate", "p99_ms", "cpu_us_per_op", "cpu_pct", "proxy_core_pct")
                if mine and all(key in m for m in mine)
            }
            entry[target]["runs"] = len(mine)
        pairs = []
        for repeat in sorted({r["repeat"] for r in rows}):
            by = {r["target"]: r["metrics"] for r in rows if r["repeat"] == repeat}
            if "plain" in by and "admin" in by and by["plain"].get("rate"):
                pairs.append(by["admin"]["rate"] / by["plain"]["rate"])
        entry["pair_ratios"] = pairs
        entry["rate_diff_pct"] = pct(entry["admin"].get("rate"), entry["plain"].get("rate"))
        entry["cpu_per_op_diff_pct"] = pct(
            entry["admin"].get("cpu_us_per_op"), entry["plain"].get("cpu_us_per_op")
        )
        out[scenario] = entry
    return out


def fmt(value: float | None, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+,.{digits}f}" if sign else f"{value:,.{digits}f}"


def write_report(out_dir: Path, data: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "admin_overhead.json").write_text(json.dumps(data, indent=2) + "\n")
    summary = data["summary"]
    md = [
        "# The admin API's overhead on the data plane",
        "",
        f"Run {data['started']}, {data['elapsed_s']:.0f} s. Reproduce with:",
        "",
        "```sh",
        data["command"],
        "```",
        "",
        "## Machine",
        "",
        *(f"- {k}: {v}" for k, v in data["machine"].items()),
        f"- pinning: {data['pinning']}",
        "",
        "## Set-up",
        "",
        "Two `lbtcp serve` processes over one `lbtcp echo`, both pinned to the proxy core: "
        "`plain` is benchmarks/run.py's lbtcp config, `admin` the same plus `[admin]`, "
        + (
            "its `/metrics` scraped once a second while (and only while) it is under load. "
            if data["scraped"]
            else "**never scraped** (`--no-scrape`: the admin server's presence alone). "
        )
        + "Load: "
        f"`lbtcp bench`, {data['settings']['duration']:g} s runs after "
        f"{data['settings']['warmup']:g} s of warm-up; `rr` = 64 kept-open connections, 64-byte "
        "echo; `connect` = 32 workers opening, exchanging 64 bytes, closing. Each repeat runs "
        "both targets, in ABBA order across repeats. Medians over the repeats.",
        "",
        "## Results",
        "",
        "| scenario | metric | no [admin] | "
        + ("[admin] + scrapes" if data["scraped"] else "[admin], not scraped")
        + " | difference |",
        "|---|---|---|---|---|",
    ]
    for scenario in data["scenarios"]:
        entry = summary[scenario]
        plain, admin = entry["plain"], entry["admin"]
        unit = "req/s" if scenario == "rr" else "conn/s"
        for key, label, digits in (
            ("rate", f"throughput ({unit})", 0),
            ("p99_ms", "p99 latency (ms)", 2),
            ("cpu_us_per_op", "proxy CPU per operation (µs)", 2),
            ("cpu_pct", "proxy process busy (% of a core)", 0),
            ("proxy_core_pct", "proxy core busy, all processes (%)", 0),
        ):
            md.append(
                f"| {scenario} | {label} | {fmt(plain.get(key), digits)} | "
                f"{fmt(admin.get(key), digits)} | "
                f"{fmt(pct(admin.get(key), plain.get(key)), 1, sign=True)} % |"
            )
    md.append("")
    verdicts = []
    for scenario in data["scenarios"]:
        entry = summary[scenario]
        ratios = entry["pair_ratios"]
        diff = entry["rate_diff_pct"]
        spread = (
            f"per-repeat ratios admin/plain: median {statistics.median(ratios):.3f}, "
            f"{min(ratios):.3f} to {max(ratios):.3f} ({len(ratios)} pairs)"
            if ratios
            else "no complete pair"
        )
        if ratios and (max(ratios) - min(ratios)) * 100 > 2 * TARGET_PCT:
            # The pairs disagree by more than the effect looked for: the machine's noise, not
            # the admin API, sets the difference of the medians.
            verdict = (
                f"not resolved by this run: the pairs spread wider than ±{TARGET_PCT:g} %, so "
                f"the difference of the medians is noise as much as overhead"
            )
        else:
            within = diff is not None and abs(diff) <= TARGET_PCT
            verdict = f"{'within' if within else 'NOT within'} the {TARGET_PCT:g} % target"
        verdicts.append(
            f"- {scenario}: throughput {fmt(diff, 1, sign=True)} % with [admin] ({verdict}); "
            f"{spread}."
        )
    md += verdicts
    # The proxy core holds only the lbtcp under load (the other one idles): what else kept it
    # busy was the loopback's softirq work and other processes of this shared machine.
    others = [
        r["metrics"]["proxy_core_pct"] - r["metrics"]["cpu_pct"]
        for r in data["runs"]
        if "proxy_core_pct" in r["metrics"] and "cpu_pct" in r["metrics"]
    ]
    if others:
        busy = statistics.median(others)
        md.append(
            f"- Quietness: the proxy core was {busy:.0f} points busier than the lbtcp under load "
            "(median over the runs; softirq work of the loopback and other processes)"
            + (
                "."
                if busy <= NOISY_POINTS
                else ": **other processes shared the core**, so absolute rates are low and "
                "noisy; the interleaved ratios and CPU per operation hold up better."
            )
        )
    scr = data["scrapes_under_load"]
    if scr["count"]:
        md += [
            f"- Scrapes under load: {scr['count']}, median {scr['median_ms']:.2f} ms, max "
            f"{scr['max_ms']:.2f} ms, {scr['bytes']:,} bytes each, {scr['errors']} errors.",
        ]
    big = data["big_pool"]
    md += ["", f"## /metrics of a {BIG_POOL:,}-server pool", ""]
    if "error" in big:
        md.append(f"Not measured: {big['error']}")
    else:
        md.append(
            f"One pool of {big['servers']:,} servers (probed), no load: {big['scrapes']} "
            f"scrapes of {big['bytes']:,} bytes ({big['samples']:,} samples), median "
            f"{big['median_ms']:.1f} ms, p90 {big['p90_ms']:.1f} ms, max {big['max_ms']:.1f} ms "
            "(request to the last byte, over loopback)."
        )
    render = data.get("render_script")
    if render is not None:
        md += [
            "",
            "benchmarks/metrics_render.py (in-process render):",
            "",
            "```",
            render["output"],
            "```",
        ]
    md.append("")
    path = out_dir / "admin_overhead.md"
    path.write_text("\n".join(md))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    begun = time.monotonic()
    nofile = suite.raise_nofile_limit()
    proxy_cpu, load_cpu, pin_text = suite.pinning(args)
    if load_cpu is not None:
        os.sched_setaffinity(0, {load_cpu})  # the scraper thread belongs with the load
    lbtcp = suite.lbtcp_binary()
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if not scenarios or set(scenarios) - set(SCENARIOS):
        raise SystemExit(f"admin_overhead.py: scenarios are {', '.join(SCENARIOS)}")
    settings = suite.Settings(
        duration=args.duration,
        warmup=args.warmup,
        repeats=max(1, args.repeats),
        idle_sessions=0,
        c2000_connections=0,
        c2000_rate=0.0,
        crosscheck_duration=0.0,
    )
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python", "benchmarks/admin_overhead.py", *sys.argv[1:]])
    tmp = Path(tempfile.mkdtemp(prefix="lbtcp-admin-bench-"))
    children = suite.Children(tmp)
    plain = PlainLbtcp(tmp, nofile, lbtcp)
    admin = AdminLbtcp(tmp, nofile, lbtcp)
    scraper = Scraper(admin.metrics_url)
    stopped_early = False
    try:
        with suite.terminate_as_exit():
            backends = start_echo(children, lbtcp, load_cpu)
            for proxy in (plain, admin):
                proxy.start(children, backends, proxy_cpu)
            targets = {p.name: suite.Target(p.name, p.label, p, p.ports) for p in (plain, admin)}
            runner = suite.Runner(children, lbtcp, settings, load_cpu, proxy_cpu, backends, print)
            for repeat in range(settings.repeats):
                order = ("plain", "admin") if repeat % 2 == 0 else ("admin", "plain")
                for scenario in scenarios:
                    for name in order:
                        if time.monotonic() - begun > args.budget:
                            stopped_early = True
                            break
                        if name == "admin" and not args.no_scrape:
                            with scraper.running():
                                runner.scenario(scenario, targets[name], repeat)
                        else:
                            runner.scenario(scenario, targets[name], repeat)
            plain.stop()
            admin.stop()
            try:
                big: dict[str, Any] = big_pool_scrapes(children, lbtcp, tmp, proxy_cpu)
            except (OSError, RuntimeError, suite.StartError) as exc:
                big = {"error": f"{type(exc).__name__}: {exc}"}
            render = render_script()
            times = sorted(scraper.seconds)
            data = {
                "started": started,
                "elapsed_s": time.monotonic() - begun,
                "command": command,
                "machine": suite.machine_info([plain]),
                "pinning": pin_text,
                "settings": settings.__dict__,
                "stopped_early_at_budget": stopped_early,
                "scenarios": scenarios,
                "scraped": not args.no_scrape,
                "summary": summarise(runner.results, scenarios),
                "scrapes_under_load": {
                    "count": len(times),
                    "median_ms": statistics.median(times) * 1000 if times else None,
                    "max_ms": times[-1] * 1000 if times else None,
                    "bytes": max(scraper.sizes, default=0),
                    "errors": len(scraper.errors),
                    "error_samples": scraper.errors[:5],
                },
                "big_pool": big,
                "render_script": render,
                "runs": runner.results,
            }
            path = write_report(args.out, data)
            print(path.read_text())
    except suite.StartError as exc:
        print(f"admin_overhead.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for proxy in (plain, admin):
            with contextlib.suppress(Exception):
                proxy.stop()
        children.close_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
