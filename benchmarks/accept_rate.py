#!/usr/bin/env python3
"""New connections per second through lbtcp: this tree against a baseline commit, same run.

    .venv/bin/python benchmarks/accept_rate.py [--baseline REV] [--repeats 5] [--duration 3]

The baseline (default: the merge base with ``main``, i.e. lbtcp before this branch) is
exported with ``git archive`` into a temporary directory; both versions serve the same
config (``proxy_protocol = "off"``, no rate limit: the plain accept path) in front of one
``lbtcp echo``, and ``lbtcp bench --mode connect`` measures sessions/s. Runs alternate
between the two versions (ABBA order) so that a change in machine load hits both alike; the
report gives every run and the medians. With ``taskset`` the proxy is pinned to core 0 and the
load generator to core 1. Bounded: repeats x 2 x (duration + warm-up + start-up) seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CONFIG = """
[global]
access_log = false
[listeners.bench]
bind = "127.0.0.1:0"
pool = "echo"
{listener_extra}
[pools.echo]
[[pools.echo.servers]]
address = "127.0.0.1:{port}"
"""


def pinned(cpu: int, command: list[str]) -> list[str]:
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu), *command] if taskset else command


def wait_for_line(proc: subprocess.Popen[str], pattern: str, timeout: float = 15.0) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        if re.search(pattern, line):
            return line
    raise RuntimeError(f"no line matching {pattern!r} from {proc.args}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()


def run_once(
    source: Path, config_path: Path, args: argparse.Namespace, env: dict[str, str]
) -> float:
    proxy = subprocess.Popen(
        pinned(0, [sys.executable, "-m", "lbtcp", "serve", str(config_path)]),
        cwd=source,
        env=dict(env, PYTHONPATH=str(source)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = wait_for_line(proxy, r"\blistening\b")
        match = re.search(r"address=(\S+)", line)
        assert match, line
        target = match.group(1)
        wait_for_line(proxy, r"\bstart\b")
        bench = subprocess.run(
            pinned(
                1,
                [
                    sys.executable,
                    "-m",
                    "lbtcp",
                    "bench",
                    target,
                    "--mode",
                    "connect",
                    "-c",
                    str(args.connections),
                    "-d",
                    f"{args.duration}s",
                    "--warmup",
                    f"{args.warmup}s",
                    "-s",
                    "64",
                    "-q",
                    "--json",
                    "-",
                ],
            ),
            cwd=REPO,
            env=dict(env, PYTHONPATH=str(REPO)),
            capture_output=True,
            text=True,
            timeout=args.duration + args.warmup + 30,
            check=True,
        )
        report = json.loads(bench.stdout[bench.stdout.index("{") :])
        if report["errors_total"]:
            raise RuntimeError(f"errors during the run: {report['errors']}")
        return float(report["sessions_per_s"])
    finally:
        stop(proxy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="", help="git revision (default: merge base)")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--listener-extra", default="", help="extra listener keys (TOML)")
    args = parser.parse_args()
    baseline = (
        args.baseline
        or subprocess.run(
            ["git", "merge-base", "HEAD", "main"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory(prefix="lbtcp-accept-") as tmp:
        old = Path(tmp) / "baseline"
        old.mkdir()
        archive = subprocess.run(
            ["git", "archive", baseline, "lbtcp"], cwd=REPO, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        echo = subprocess.Popen(
            pinned(1, [sys.executable, "-m", "lbtcp", "echo", "0"]),
            cwd=REPO,
            env=dict(env, PYTHONPATH=str(REPO)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            match = re.search(r":(\d+)\s*$", wait_for_line(echo, r"listening on"))
            assert match
            config_path = Path(tmp) / "lbtcp.toml"
            config_path.write_text(
                CONFIG.format(port=match.group(1), listener_extra=args.listener_extra)
            )
            results: dict[str, list[float]] = {"baseline": [], "this tree": []}
            versions = {"baseline": old, "this tree": REPO}
            for repeat in range(args.repeats):
                order = ["baseline", "this tree"]
                if repeat % 2:
                    order.reverse()
                for name in order:
                    rate = run_once(versions[name], config_path, args, env)
                    results[name].append(rate)
                    print(f"  {name:9}  run {repeat + 1}: {rate:8.0f} connections/s", flush=True)
        finally:
            stop(echo)
    base = statistics.median(results["baseline"])
    new = statistics.median(results["this tree"])
    print(f"baseline {baseline[:10]}: median {base:.0f}/s; this tree: median {new:.0f}/s; ")
    print(f"change {100.0 * (new - base) / base:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
