"""Command line: parse, pin, start everything, run, report, stop everything."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lbbench.common import HERE
from lbbench.procs import Children, StartError, pinning, raise_nofile_limit
from lbbench.proxies import (
    HaproxyProxy,
    LbtcpProxy,
    NginxProxy,
    Proxy,
    lbtcp_binary,
    start_backends,
)
from lbbench.report import SCENARIOS, machine_info, write_report
from lbbench.scenarios import Runner, Settings, Target, crosscheck


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
