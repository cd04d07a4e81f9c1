#!/usr/bin/env python3
"""The cost of SNI routing: new connections/s and proxy CPU per connection on a listener with
10 routes against one without, same run, interleaved.

    .venv/bin/python benchmarks/sni_rate.py [--repeats 4] [--duration 3] [--connections 16]
        [--rounds 6] [--rate-fraction 0.7 | --rate R] [--instructions 200]
        [--callgrind-dir DIR]

Both listeners sit in front of one ``lbtcp echo``; every client sends the same real
ClientHello (made once with ssl.MemoryBIO, name ``www.svc7.example.com``, which the routed
listener matches with a wildcard, a suffix walk rather than the exact-name lookup), reads it
back and closes: one new connection per ClientHello. The proxy's CPU time (the kernel's
``/proc/PID/task/*/schedstat``, nanoseconds; ``/proc/PID/stat`` ticks where it is missing) is
read at the start and the end of each measured window. Runs alternate (ABBA, as
benchmarks/accept_rate.py does) so that a change in machine load hits both alike. With
``taskset`` the proxy runs on core 0 and the clients and the echo server on core 1.

Three measures, in this order:

1. **Closed loop** (``--repeats`` ABBA runs of ``--connections`` clients, each opening the
   next connection when the last one closed): connections/s, and CPU per connection at that
   rate. Unfair to the routed listener: its server connect waits for the hello, so it runs
   at a lower rate, its loop batches fewer events per wake-up, and every connection costs
   more CPU for that reason alone.
2. **Fixed rate** (``--rounds`` ABBA pairs): the same offered rate to both listeners, new
   connections started on a schedule whatever the proxy does, at ``--rate`` or
   ``--rate-fraction`` of the plain listener's closed-loop median (below what either
   reaches; a run that falls behind the schedule is flagged). CPU per connection at that
   rate, per pair and as medians: the measure of the issue's bound.
3. ``--instructions N``: the proxy runs under ``valgrind --tool=callgrind``, N warm-up
   connections go through it, the counters are zeroed (``callgrind_control --zero``), N more
   go through one at a time, and the counters are dumped: user-space instructions per
   connection, routed against plain (a count the machine's load does not move).
   ``--callgrind-dir`` keeps the dumps for ``callgrind_annotate``.

Bounded: every run has a fixed client count or connection count and a time limit; the whole
is repeats x 2 x (duration + warm-up + start-up) + rounds x 2 x the same, plus the valgrind
start-up (at most 120 s) and 2 x N connections per listener.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import uvloop

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


def shuffled(hello: bytes, count: int) -> list[bytes]:
    """``count`` distinct variants of ``hello`` with its extensions in other orders, as
    Chrome and Firefox send theirs (a layout that does not repeat from one connection to the
    next; the same length, name and ALPN)."""
    at = 43
    at += 1 + hello[at]  # session id
    at += 2 + int.from_bytes(hello[at : at + 2], "big")  # cipher suites
    at += 1 + hello[at]  # compression methods
    head = hello[: at + 2]  # up to and with the extensions' length
    extensions = []
    at += 2
    while at < len(hello):
        length = int.from_bytes(hello[at + 2 : at + 4], "big")
        extensions.append(hello[at : at + 4 + length])
        at += 4 + length
    shuffler = random.Random(13)
    variants: dict[bytes, None] = {}
    while len(variants) < count:
        shuffler.shuffle(extensions)
        variants[head + b"".join(extensions)] = None
    return list(variants)


class Hellos:
    """The ClientHellos the clients send, one after another (all of one length), each with
    a random of its own, as a real client's (the parser must not take one hello's verdict
    for another's because their bytes are all the same)."""

    def __init__(self, hellos: list[bytes]) -> None:
        self.hellos = hellos
        self.size = len(hellos[0])
        self.turn = 0

    def next(self) -> bytes:
        self.turn = (self.turn + 1) % len(self.hellos)
        hello = self.hellos[self.turn]
        return hello[:11] + os.urandom(32) + hello[43:]


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
    """The CPU time of every thread of ``pid``, user and system."""
    try:
        # The first field of schedstat: nanoseconds on a CPU (10 ms ticks in /proc/PID/stat
        # would be 1-2 % of a window's figure).
        return (
            sum(
                int(path.read_text().split()[0])
                for path in Path(f"/proc/{pid}/task").glob("*/schedstat")
            )
            / 1e9
        )
    except OSError:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14, 15)


async def clients(
    host: str, port: int, payload: Hellos, count: int, stop_at: float, done: list[int]
) -> None:
    async def one() -> None:
        while time.monotonic() < stop_at:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload.next())
            await reader.readexactly(payload.size)
            writer.close()
            await writer.wait_closed()
            done[0] += 1

    await asyncio.gather(*(one() for _ in range(count)))


def start_proxy(config_path: Path) -> tuple[subprocess.Popen[str], str, int]:
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
        wait_for_line(proxy, r"\bstart\b")
    except BaseException:
        stop(proxy)
        raise
    return proxy, match.group(1), int(match.group(2))


def run_once(config_path: Path, payload: Hellos, args: argparse.Namespace) -> tuple[float, float]:
    """Closed loop: (connections/s, proxy CPU microseconds per connection) over the
    measured window."""
    proxy, host, port = start_proxy(config_path)
    try:

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


MAX_IN_FLIGHT = 256  # fixed rate: a connection due while this many are open is skipped


class Probe(asyncio.Protocol):
    """One scheduled connection: send the hello, read the echo, close. A protocol on uvloop
    rather than asyncio streams: the load core (shared with the echo server) must keep up
    with the schedule, and streams cost it about twice as much per connection."""

    def __init__(self, hello: bytes, ended: Callable[[bool], None]) -> None:
        self.hello = hello
        self.ended = ended
        self.received = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.hello)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= len(self.hello) and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended(self.received >= len(self.hello))


async def scheduled(
    host: str, port: int, payload: Hellos, rate: float, count: int, counts: dict[str, int]
) -> None:
    """``count`` connections started ``1 / rate`` s apart on a fixed schedule (late ones
    start at once, so the offered rate holds unless the client itself falls behind)."""
    loop = asyncio.get_running_loop()
    idle = asyncio.Event()
    in_flight = [0]

    def ended(ok: bool) -> None:
        counts["done" if ok else "failed"] += 1
        in_flight[0] -= 1
        if not in_flight[0]:
            idle.set()

    def connected(future: asyncio.Future[object]) -> None:
        if future.cancelled() or future.exception() is not None:
            ended(False)  # no connection, so no connection_lost

    start = loop.time()
    for index in range(count):
        delay = start + index / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        if in_flight[0] >= MAX_IN_FLIGHT:
            counts["skipped"] += 1
            continue
        in_flight[0] += 1
        probe = Probe(payload.next(), ended)
        future = asyncio.ensure_future(loop.create_connection(lambda p=probe: p, host, port))
        future.add_done_callback(connected)
    if in_flight[0]:
        idle.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle.wait(), 10)


def fixed_rate_once(
    config_path: Path, payload: Hellos, rate: float, args: argparse.Namespace
) -> tuple[float, float, int]:
    """Fixed rate: (connections/s completed, proxy CPU microseconds per connection, failed
    or skipped connections) over the measured window."""
    proxy, host, port = start_proxy(config_path)
    try:

        async def measure() -> tuple[float, float, int]:
            counts = {"done": 0, "failed": 0, "skipped": 0}
            total = int(rate * (args.warmup + args.duration))
            task = asyncio.ensure_future(scheduled(host, port, payload, rate, total, counts))
            await asyncio.sleep(args.warmup)
            done0, cpu0, t0 = counts["done"], cpu_seconds(proxy.pid), time.monotonic()
            await asyncio.sleep(args.duration)
            done1, cpu1, t1 = counts["done"], cpu_seconds(proxy.pid), time.monotonic()
            await asyncio.wait_for(task, 30)
            connections = done1 - done0
            lost = counts["failed"] + counts["skipped"]
            return connections / (t1 - t0), 1e6 * (cpu1 - cpu0) / connections, lost

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(measure())
    finally:
        stop(proxy)


async def sequential(host: str, port: int, payload: Hellos, count: int) -> None:
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(payload.next())
        await reader.readexactly(payload.size)
        writer.close()
        await writer.wait_closed()


def instructions_once(config_path: Path, payload: Hellos, count: int, tmp: Path) -> float:
    """Instructions the proxy executes per connection, over ``count`` sequential ones."""
    for old in tmp.glob(f"callgrind.{config_path.stem}.out*"):
        old.unlink()
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


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percent(base: float, other: float) -> str:
    return f"{100.0 * (other - base) / base:+.1f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="closed-loop ABBA runs")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=16, help="closed-loop clients")
    parser.add_argument("--rounds", type=int, default=6, help="fixed-rate ABBA pairs")
    parser.add_argument(
        "--rate-fraction",
        type=float,
        default=0.7,
        help="fixed rate: this fraction of the plain listener's closed-loop median",
    )
    parser.add_argument("--rate", type=float, default=0.0, help="fixed rate, connections/s")
    parser.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="N",
        help="also count the proxy's instructions per connection under callgrind, over N",
    )
    parser.add_argument(
        "--hellos",
        type=int,
        default=1,
        metavar="N",
        help="send N variants of the hello (extensions shuffled, as browsers do) in turn",
    )
    parser.add_argument(
        "--callgrind-dir", type=Path, help="keep the callgrind dumps here (callgrind_annotate)"
    )
    args = parser.parse_args()
    if args.instructions and not shutil.which("valgrind"):
        parser.error("--instructions needs valgrind (callgrind)")
    if not args.rate and args.rounds and not args.repeats:
        parser.error("--rounds without --repeats needs --rate")
    if len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {1})  # the clients share core 1 with the echo server
    hello = client_hello(NAME)
    payload = Hellos(shuffled(hello, args.hellos) if args.hellos > 1 else [hello])
    print(
        f"ClientHello of {len(hello)} bytes, SNI {NAME}"
        f"{f', {args.hellos} extension orders in turn' if args.hellos > 1 else ''}; "
        f"load average {load_average()}"
    )
    instructions: dict[str, float] = {}
    closed: dict[str, list[tuple[float, float]]] = {}
    fixed: dict[str, list[tuple[float, float, int]]] = {}
    rate = args.rate
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
            closed = {name: [] for name in paths}
            fixed = {name: [] for name in paths}
            for repeat in range(args.repeats):
                order = list(paths) if repeat % 2 == 0 else list(reversed(paths))
                for name in order:
                    run_rate, cpu = run_once(paths[name], payload, args)
                    closed[name].append((run_rate, cpu))
                    print(
                        f"  closed loop  {name:9}  run {repeat + 1}: {run_rate:7.0f} "
                        f"connections/s, {cpu:6.1f} us proxy CPU per connection",
                        flush=True,
                    )
            if not rate and args.rounds:
                rate = args.rate_fraction * statistics.median(r for r, _ in closed["no routes"])
            for round_ in range(args.rounds):
                order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
                for name in order:
                    done_rate, cpu, lost = fixed_rate_once(paths[name], payload, rate, args)
                    fixed[name].append((done_rate, cpu, lost))
                    behind = "  BEHIND THE SCHEDULE" if done_rate < 0.97 * rate or lost else ""
                    print(
                        f"  fixed rate   {name:9}  round {round_ + 1}: {done_rate:7.0f} "
                        f"connections/s, {cpu:6.1f} us proxy CPU per connection, "
                        f"{lost} lost{behind}",
                        flush=True,
                    )
            if args.instructions:
                dumps = args.callgrind_dir or Path(tmp)
                dumps.mkdir(parents=True, exist_ok=True)
                for name, path in paths.items():
                    instructions[name] = instructions_once(path, payload, args.instructions, dumps)
                    print(
                        f"  callgrind    {name:9}  {instructions[name]:9.0f} instructions per "
                        f"connection ({args.instructions} sequential connections)",
                        flush=True,
                    )
        finally:
            stop(echo)
    print(f"load average at the end {load_average()}")
    if args.repeats:
        (base_rate, base_cpu), (routed_rate, routed_cpu) = (
            (
                statistics.median(r for r, _ in closed[name]),
                statistics.median(c for _, c in closed[name]),
            )
            for name in ("no routes", "10 routes")
        )
        print(f"closed loop, medians of {args.repeats}:")
        print(f"  no routes: {base_rate:.0f}/s, {base_cpu:.1f} us CPU per connection")
        print(f"  10 routes: {routed_rate:.0f}/s, {routed_cpu:.1f} us CPU per connection")
        print(f"  CPU per connection {percent(base_cpu, routed_cpu)}")
    if args.rounds:
        base_cpu = statistics.median(c for _, c, _ in fixed["no routes"])
        routed_cpu = statistics.median(c for _, c, _ in fixed["10 routes"])
        pairs = [
            100.0 * (routed[1] - plain[1]) / plain[1]
            for plain, routed in zip(fixed["no routes"], fixed["10 routes"], strict=True)
        ]
        print(f"fixed rate {rate:.0f}/s offered, medians of {args.rounds} ABBA pairs:")
        print(f"  no routes: {base_cpu:.1f} us CPU per connection")
        print(f"  10 routes: {routed_cpu:.1f} us CPU per connection")
        print(
            f"  CPU per connection {percent(base_cpu, routed_cpu)} (of the medians); "
            f"per pair {', '.join(f'{pair:+.1f}' for pair in pairs)} %, "
            f"median {statistics.median(pairs):+.1f} %"
        )
    if instructions:
        base, routed = instructions["no routes"], instructions["10 routes"]
        print(
            f"callgrind instructions per connection: no routes {base:.0f}, 10 routes "
            f"{routed:.0f}, {percent(base, routed)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
