#!/usr/bin/env python3
"""The cost of SNI routing: new connections/s and proxy CPU per connection on a listener with
10 routes against one without, same run, interleaved.

    .venv/bin/python benchmarks/sni_rate.py [--repeats 4] [--duration 3] [--connections 16]
        [--instructions 300]

Both listeners sit in front of one ``lbtcp echo``; every client sends the same real
ClientHello (made once with ssl.MemoryBIO, name ``www.svc7.example.com``, which the routed
listener matches with a wildcard, a suffix walk rather than the exact-name lookup), reads it
back and closes: one new connection per ClientHello. The proxy's CPU (utime + stime from
/proc/PID/stat) is read at the start and the end of each measured window. Runs alternate
(ABBA, as benchmarks/accept_rate.py does) so that a change in machine load hits both alike.
With ``taskset`` the proxy runs on core 0 and the clients and the echo server on core 1.
Bounded: repeats x 2 x (duration + warm-up + start-up) seconds, and a fixed client count.

CPU time on a shared 2-core machine is noisy (other work steals the core, the loop batches
differently at different rates). ``--instructions N`` adds a measure that is not: the proxy
runs under ``valgrind --tool=callgrind``, N warm-up connections go through it, the counters
are zeroed (``callgrind_control --zero``), N more go through one at a time, and the counters
are dumped: instructions per connection, routed against plain, the same ClientHello. Bounded
by the valgrind start-up (at most 120 s) plus 2 x N connections per listener.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib
import shutil

from accept_rate import pinned, stop, wait_for_line

REPO = Path(__file__).resolve().parent.parent
NAME = "www.svc7.example.com"
TICKS = os.sysconf("SC_CLK_TCK")


def client_hello(server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def make_config(port: str, routed: bool) -> str:
    lines = ["[global]", "access_log = false", "[listeners.bench]", 'bind = "127.0.0.1:0"']
    lines.append('pool = "echo"')
    pools = ["echo"]
    if routed:
        routes = []
        for index in range(10):
            sni = f"api{index}.example.com" if index % 2 else f"*.svc{index}.example.com"
            routes.append(f'{{sni = "{sni}", pool = "p{index}"}}')
            pools.append(f"p{index}")
        lines.append(f"routes = [{', '.join(routes)}]")
    for pool in pools:
        lines += [f"[pools.{pool}]", f"[[pools.{pool}.servers]]", f'address = "127.0.0.1:{port}"']
    return "\n".join(lines) + "\n"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


async def clients(
    host: str, port: int, payload: bytes, count: int, stop_at: float, done: list[int]
) -> None:
    async def one() -> None:
        while time.monotonic() < stop_at:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            await reader.readexactly(len(payload))
            writer.close()
            await writer.wait_closed()
            done[0] += 1

    await asyncio.gather(*(one() for _ in range(count)))


def run_once(config_path: Path, payload: bytes, args: argparse.Namespace) -> tuple[float, float]:
    """(connections/s, proxy CPU microseconds per connection) over the measured window."""
    proxy = subprocess.Popen(
        pinned(0, [sys.executable, "-m", "lbtcp", "serve", str(config_path)]),
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        match = re.search(r"address=(\S+):(\d+)", wait_for_line(proxy, r"\blistening\b"))
        assert match
        host, port = match.group(1), int(match.group(2))
        wait_for_line(proxy, r"\bstart\b")

        async def measure() -> tuple[float, float]:
            done = [0]
            start = time.monotonic()
            stop_at = start + args.warmup + args.duration
            task = asyncio.ensure_future(
                clients(host, port, payload, args.connections, stop_at, done)
            )
            await asyncio.sleep(args.warmup)
            count0, cpu0, t0 = done[0], cpu_seconds(proxy.pid), time.monotonic()
            await asyncio.sleep(args.duration)
            count1, cpu1, t1 = done[0], cpu_seconds(proxy.pid), time.monotonic()
            await asyncio.wait_for(task, 30)
            connections = count1 - count0
            return connections / (t1 - t0), 1e6 * (cpu1 - cpu0) / connections

        return asyncio.run(measure())
    finally:
        stop(proxy)


async def sequential(host: str, port: int, payload: bytes, count: int) -> None:
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload)
        await reader.readexactly(len(payload))
        writer.close()
        await writer.wait_closed()


def instructions_once(config_path: Path, payload: bytes, count: int, tmp: Path) -> float:
    """Instructions the proxy executes per connection, over ``count`` sequential ones."""
    out = tmp / f"callgrind.{config_path.stem}.out"
    proxy = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            "-m",
            "lbtcp",
            "serve",
            str(config_path),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", PYTHONMALLOC="malloc"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = wait_for_line(proxy, r"\blistening\b", timeout=120.0)
        match = re.search(r"address=(\S+):(\d+)", line)
        assert match
        host, port = match.group(1), int(match.group(2))
        wait_for_line(proxy, r"\bstart\b", timeout=60.0)
        asyncio.run(asyncio.wait_for(sequential(host, port, payload, count), 300))
        control = ["callgrind_control", str(proxy.pid)]
        subprocess.run([*control, "--zero"], check=True, capture_output=True, timeout=60)
        asyncio.run(asyncio.wait_for(sequential(host, port, payload, count), 300))
        subprocess.run([*control, "--dump"], check=True, capture_output=True, timeout=60)
        dumps = sorted(tmp.glob(f"{out.name}.*"), key=lambda path: path.stat().st_mtime)
        assert dumps, "callgrind wrote no dump"
        totals = re.search(r"^(?:totals|summary):\s*(\d+)", dumps[-1].read_text(), re.M)
        assert totals, "no totals line in the callgrind dump"
        return int(totals.group(1)) / count
    finally:
        stop(proxy)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="N",
        help="also count the proxy's instructions per connection under callgrind, over N",
    )
    args = parser.parse_args()
    if args.instructions and not shutil.which("valgrind"):
        parser.error("--instructions needs valgrind (callgrind)")
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the clients share core 1 with the echo server
    payload = client_hello(NAME)
    with tempfile.TemporaryDirectory(prefix="lbtcp-sni-") as tmp:
        echo = subprocess.Popen(
            pinned(1, [sys.executable, "-m", "lbtcp", "echo", "0"]),
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            match = re.search(r":(\d+)\s*$", wait_for_line(echo, r"listening on"))
            assert match
            paths = {}
            for name, routed in (("no routes", False), ("10 routes", True)):
                paths[name] = Path(tmp) / f"{'routed' if routed else 'plain'}.toml"
                paths[name].write_text(make_config(match.group(1), routed))
            instructions: dict[str, float] = {}
            if args.instructions:
                for name, path in paths.items():
                    instructions[name] = instructions_once(
                        path, payload, args.instructions, Path(tmp)
                    )
                    print(
                        f"  {name:9}  {instructions[name]:9.0f} instructions per connection "
                        f"(callgrind, {args.instructions} sequential connections)",
                        flush=True,
                    )
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
            for repeat in range(args.repeats):
                order = list(paths)
                if repeat % 2:
                    order.reverse()
                for name in order:
                    rate, cpu = run_once(paths[name], payload, args)
                    results[name].append((rate, cpu))
                    print(
                        f"  {name:9}  run {repeat + 1}: {rate:7.0f} connections/s, "
                        f"{cpu:6.1f} us proxy CPU per connection",
                        flush=True,
                    )
        finally:
            stop(echo)
    medians = {
        name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
        for name, runs in results.items()
    }
    (base_rate, base_cpu), (routed_rate, routed_cpu) = medians["no routes"], medians["10 routes"]
    print(f"ClientHello of {len(payload)} bytes, SNI {NAME}")
    print(f"no routes: median {base_rate:.0f}/s, {base_cpu:.1f} us CPU per connection")
    print(f"10 routes: median {routed_rate:.0f}/s, {routed_cpu:.1f} us CPU per connection")
    print(f"CPU per connection {100.0 * (routed_cpu - base_cpu) / base_cpu:+.1f} %")
    if instructions:
        base, routed = instructions["no routes"], instructions["10 routes"]
        print(
            f"instructions per connection: no routes {base:.0f}, 10 routes {routed:.0f}, "
            f"{100.0 * (routed - base) / base:+.1f} %"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
