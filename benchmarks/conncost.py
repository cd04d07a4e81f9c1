"""What each connection costs: lbtcp vs HAProxy vs nginx vs bare uvloop relays (issue 12).

    .venv/bin/python benchmarks/conncost.py [--rounds 5]
        [--scenarios conn,syscalls,idle_mem,c2000,insn]
        [--proxies lbtcp,haproxy,nginx,bare,raw] [--before CMD] [--out DIR]

Figures that a shared, noisy machine disturbs least, each with the load average at the time:

- ``conn``: wrk ``-t1 -c64 -H "Connection: close"`` (a new connection per request) through the
  proxy to ``httpd.py``; new connections/s, the proxy's CPU-seconds (utime + stime from
  /proc/PID/stat) and **connections per proxy CPU-second**.
- ``syscalls``: the same load with ``strace -c -f`` attached to the proxy: system calls per
  session (per accept4), by call. strace slows the proxy; the counts per session stay exact.
- ``idle_mem``: a fresh proxy, N sessions opened and proven spliced by a one-byte echo, left
  idle: proxy RSS growth / N.
- ``insn`` (not in the default list: valgrind is slow): each lbtcp command under callgrind,
  200 sequential 64-byte echo connections after 200 of warm-up: user-space instructions per
  connection, a count the machine's load does not move.
- ``c2000``: wrk ``-t1 -c2000 --timeout 2s --latency`` kept-open requests for 6 s after a 1 s
  warm-up run: requests/s, p50, p90 and p99, wrk timeouts and errors, and the proxy's user and
  system CPU-seconds over the 6 s divided by the requests completed (CPU microseconds per
  request), every round.

``bare`` is ``benchmarks/bare_relay.py``: accept, connect, relay, close on uvloop's transports
and nothing else, the floor lbtcp cannot go under without leaving uvloop. ``raw`` is
``benchmarks/raw_relay.py``: the same on the same uvloop loop without transports (non-blocking
sockets driven with add_reader/add_writer, with flow control), the floor under the transports
themselves. Neither holds session state worth a memory figure, so ``idle_mem`` skips both.

``--before CMD`` adds another lbtcp command (an older checkout) as ``lbtcp-before``: its own
venv's ``lbtcp``, or a script running ``python -P -m lbtcp`` with PYTHONPATH set to it
(without ``-P``, ``python -m`` started from this repository imports the working tree's lbtcp,
not the older one). Every round runs each proxy in turn, so drift in the machine's load hits
them alike. Writes
``results/conncost.md`` and ``.json``. It reuses run.py's process handling and proxy configs;
it never installs anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # the sibling module, found through the path set just above

HERE = Path(__file__).resolve().parent
CONN_SECONDS = 4
C2000_SECONDS = 6


class BareProxy(run.Proxy):
    """benchmarks/bare_relay.py: the uvloop floor."""

    name = "bare"
    label = "bare uvloop relay"
    binary = sys.executable
    package = "uvloop"
    script = "bare_relay.py"

    def __init__(self, workdir: Path, nofile: int) -> None:
        super().__init__(workdir, nofile)
        self._argv: list[str] = []

    def config(self, backends: run.Backends) -> str:
        (kind, port), *_ = self.ports.items()
        self._argv = [
            sys.executable,
            str(HERE / self.script),
            str(port),
            str(backends.ports[kind]),
        ]
        return ""

    def argv(self, config: Path) -> list[str]:
        return self._argv

    def version(self) -> str:
        return "uvloop " + run.pkg_version("uvloop")


class RawProxy(BareProxy):
    """benchmarks/raw_relay.py: the floor under uvloop's transports."""

    name = "raw"
    label = "raw-socket relay, no transports"
    script = "raw_relay.py"


class Backends:
    """What run.Proxy.config reads: the backend port per kind."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """The process's user and system CPU-seconds (utime, stime of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu_seconds(pid: int) -> float:
    return sum(proc_cpu_times(pid))


def wrk_percentile_ms(text: str, percent: int) -> float | None:
    """One line of wrk --latency's distribution (50, 75, 90 or 99), in ms."""
    found = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m)\b", text, re.MULTILINE)
    return None if found is None else float(found.group(1)) * run._WRK_UNITS[found.group(2)]


def wrk_requests(text: str) -> int:
    """The requests wrk completed ("N requests in ..."), 0 if it printed none."""
    found = re.search(r"(\d+) requests in", text)
    return int(found.group(1)) if found else 0


def wrk(url: str, *args: str, load_cpu: int) -> str:
    argv = ["taskset", "-c", str(load_cpu), "wrk", "-t1", *args, url]
    return subprocess.run(argv, capture_output=True, text=True, check=False).stdout


def started(proxy: run.Proxy, children: run.Children, ports: dict[str, int], cpu: int) -> int:
    proxy.ports = {}
    proxy.start(children, Backends(ports), cpu)  # type: ignore[arg-type]
    return proxy.measured_pid()


def conn_round(proxy: run.Proxy, pid: int, load_cpu: int, strace: bool) -> dict[str, Any]:
    port = proxy.ports["http"]
    url = f"http://127.0.0.1:{port}" + run.wrk_request_path(port, 64, close=True)
    tracer = None
    trace_out = proxy.workdir / f"{proxy.name}.strace"
    if strace:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", str(trace_out), "-p", str(pid)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # strace attaches to every thread before the load starts
    load = os.getloadavg()[0]
    cpu0 = proc_cpu_seconds(pid)
    text = wrk(url, "-c64", f"-d{CONN_SECONDS}s", "-H", "Connection: close", load_cpu=load_cpu)
    cpu1 = proc_cpu_seconds(pid)
    requests = wrk_requests(text)
    parsed = run.parse_wrk(text)
    result: dict[str, Any] = {"load": load, "errors": parsed["errors"]}
    if tracer is None:
        cpu = cpu1 - cpu0
        result |= {
            "conn_per_s": parsed["rate"],
            "cpu_s": cpu,
            "conn_per_cpu_s": requests / cpu if cpu > 0 else None,
        }
        return result
    tracer.send_signal(signal.SIGINT)
    tracer.wait(timeout=30)
    calls: dict[str, int] = {}
    for line in trace_out.read_text().splitlines():
        row = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if row and row.group(2) != "total":
            calls[row.group(2)] = int(row.group(1))
    sessions = calls.get("accept4", 0) or calls.get("accept", 0)
    result["sessions"] = sessions
    result["per_session"] = {k: v / sessions for k, v in calls.items()} if sessions else {}
    result["syscalls_per_session"] = sum(calls.values()) / sessions if sessions else None
    return result


def idle_mem_round(proxy: run.Proxy, pid: int, count: int) -> dict[str, Any]:
    time.sleep(0.3)  # the fresh process finishes its start-up allocations
    before = run.rss_kib(pid)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 60
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", proxy.ports["echo"]), timeout=5)
            socks.append(sock)
            sock.sendall(b"x")
            if sock.recv(1) != b"x":
                raise RuntimeError("idle_mem: the echo did not come back")
            if time.monotonic() > deadline:
                raise RuntimeError(f"idle_mem: only {len(socks)} sessions within 60 s")
        time.sleep(0.5)
        after = run.rss_kib(pid)
    finally:
        for sock in socks:
            sock.close()
    return {"load": os.getloadavg()[0], "bytes_per_session": (after - before) * 1024 / count}


def c2000_round(proxy: run.Proxy, pid: int, load_cpu: int) -> dict[str, Any]:
    port = proxy.ports["http"]
    url = f"http://127.0.0.1:{port}" + run.wrk_request_path(port, 64, close=False)
    wrk(url, "-c2000", "-d1s", "--timeout", "2s", load_cpu=load_cpu)  # warm-up
    load = os.getloadavg()[0]
    user0, sys0 = proc_cpu_times(pid)
    text = wrk(
        url, "-c2000", f"-d{C2000_SECONDS}s", "--timeout", "2s", "--latency", load_cpu=load_cpu
    )
    user1, sys1 = proc_cpu_times(pid)
    parsed = run.parse_wrk(text)
    timeouts = re.search(r"timeout (\d+)", text)
    requests = wrk_requests(text)
    # The 2,000 connections wrk opens at the start (and closes at the end) count in this CPU
    # too: per request it is the cost of a kept-open request plus 2,000 connections' share.
    user, system = user1 - user0, sys1 - sys0
    return {
        "load": load,
        "rate": parsed["rate"],
        "p99_ms": parsed["p99_ms"],
        "errors": parsed["errors"],
        "timeouts": int(timeouts.group(1)) if timeouts else 0,
        "p50_ms": wrk_percentile_ms(text, 50),
        "p90_ms": wrk_percentile_ms(text, 90),
        "requests": requests,
        "user_s": user,
        "sys_s": system,
        "user_us_per_req": user * 1e6 / requests if requests else None,
        "sys_us_per_req": system * 1e6 / requests if requests else None,
    }


def _sequential_echoes(port: int, count: int) -> None:
    """``count`` connections one after another: 64 bytes each way, then close."""
    payload = b"x" * 64
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(payload)
            got = b""
            while len(got) < len(payload):
                chunk = sock.recv(len(payload) - len(got))
                assert chunk, "the echo closed early"
                got += chunk


def insn_count(command: str, echo_port: int, workdir: Path, count: int) -> dict[str, Any]:
    """User-space instructions an lbtcp ``command`` executes per connection: ``serve`` under
    callgrind, ``count`` warm-up connections, counters zeroed, ``count`` more, dumped. The
    machine's load does not move this count, so it shows what a change to the connection
    path saves where CPU seconds on a shared machine cannot (the kernel's share is not in
    it: see the perf split in README "Per connection")."""
    port = run.free_port()
    config = workdir / f"insn-{port}.toml"
    config.write_text(
        "[global]\naccess_log = false\n[listeners.web]\n"
        f'bind = "127.0.0.1:{port}"\npool = "app"\n[pools.app]\n'
        f'[[pools.app.servers]]\naddress = "127.0.0.1:{echo_port}"\n'
    )
    out = workdir / f"callgrind-{port}.out"
    proxy = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",  # COMMAND may be a script that execs Python
            f"--callgrind-out-file={out}",
            command,
            "serve",
            str(config),
        ],
        env=dict(os.environ, PYTHONMALLOC="malloc"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180  # valgrind starts Python slowly
        while True:
            assert proxy.poll() is None, f"{command} serve exited under valgrind"
            assert time.monotonic() < deadline, f"{command} did not listen under valgrind"
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        _sequential_echoes(port, count)
        control = ["callgrind_control", str(proxy.pid)]
        subprocess.run([*control, "--zero"], check=True, capture_output=True, timeout=120)
        _sequential_echoes(port, count)
        subprocess.run([*control, "--dump"], check=True, capture_output=True, timeout=120)
        dumps = sorted(workdir.glob(f"{out.name}*"), key=lambda path: path.stat().st_mtime)
        assert dumps, "callgrind wrote no dump"
        totals = re.search(r"^(?:totals|summary):\s*(\d+)", dumps[-1].read_text(), re.M)
        assert totals, "no totals line in the callgrind dump"
        return {
            "load": os.getloadavg()[0],
            "connections": count,
            "instructions_per_connection": int(totals.group(1)) / count,
        }
    finally:
        proxy.terminate()
        try:
            proxy.wait(60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def report(results: dict[str, dict[str, list[dict[str, Any]]]], info: dict[str, Any]) -> str:
    lines = ["# Connection cost: lbtcp vs HAProxy vs nginx vs bare uvloop relays", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines.append("")

    def fmt(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    names = list(results)
    haproxy = results.get("haproxy", {})
    if any("conn" in r for r in results.values()):
        lines += [
            "## New connections per proxy CPU-second (wrk Connection: close, 64 connections)",
            "",
            "| proxy | conn/s | conn per CPU-s (median) | vs HAProxy | rounds | wrk errors "
            "| load avg | conn/s rounds |",
            "| --- | ---: | ---: | ---: | --- | --- | --- | --- |",
        ]
        ref = median(haproxy.get("conn", []), "conn_per_cpu_s")
        for name in names:
            rows = results[name].get("conn", [])
            if not rows:
                continue
            mid = median(rows, "conn_per_cpu_s")
            ratio = f"{mid / ref:.2f}" if mid and ref else "-"
            each = ", ".join(fmt(r["conn_per_cpu_s"]) for r in rows)
            loads = ", ".join(f"{r['load']:.1f}" for r in rows)
            errors = ", ".join(str(r["errors"]) for r in rows)
            rates = ", ".join(fmt(r["conn_per_s"]) for r in rows)
            lines.append(
                f"| {name} | {fmt(median(rows, 'conn_per_s'))} | {fmt(mid)} | {ratio} "
                f"| {each} | {errors} | {loads} | {rates} |"
            )
        lines.append("")
    if any("syscalls" in r for r in results.values()):
        lines += ["## System calls per session (strace -c -f, same wrk load)", ""]
        for name in names:
            rows = results[name].get("syscalls", [])
            if not rows:
                continue
            row = rows[-1]
            calls = sorted(row["per_session"].items(), key=lambda kv: -kv[1])
            shown = ", ".join(f"{k} {v:.2f}" for k, v in calls if v >= 0.05)
            lines.append(
                f"- **{name}**: {fmt(row['syscalls_per_session'], 1)} per session over "
                f"{row['sessions']} sessions (load {row['load']:.1f}): {shown}"
            )
        lines.append("")
    if any("idle_mem" in r for r in results.values()):
        lines += [
            "## Memory per idle spliced session (proxy RSS growth / sessions)",
            "",
            "| proxy | bytes per session (median) | vs HAProxy | rounds | load avg |",
            "| --- | ---: | ---: | --- | --- |",
        ]
        ref = median(haproxy.get("idle_mem", []), "bytes_per_session")
        for name in names:
            rows = results[name].get("idle_mem", [])
            if not rows:
                continue
            mid = median(rows, "bytes_per_session")
            ratio = f"{mid / ref:.2f}" if mid and ref else "-"
            each = ", ".join(fmt(r["bytes_per_session"]) for r in rows)
            loads = ", ".join(f"{r['load']:.1f}" for r in rows)
            lines.append(f"| {name} | {fmt(mid)} | {ratio} | {each} | {loads} |")
        lines.append("")
    if any("insn" in r for r in results.values()):
        lines += [
            "## User-space instructions per connection (callgrind, lbtcp only)",
            "",
            "| proxy | instructions per connection | connections counted |",
            "| --- | ---: | ---: |",
        ]
        for name in names:
            for r in results[name].get("insn", []):
                lines.append(
                    f"| {name} | {fmt(r['instructions_per_connection'])} | {r['connections']} |"
                )
        lines.append("")
    if any("c2000" in r for r in results.values()):
        lines += [
            "## 2,000 kept-open connections (wrk -c2000 --timeout 2s, 6 s after a 1 s warm-up)",
            "",
            "| round | proxy | req/s | p50 ms | p90 ms | p99 ms | wrk timeouts | errors "
            "| requests | proxy CPU µs/req user | sys | load avg |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        rounds = max(len(r.get("c2000", [])) for r in results.values())
        for index in range(rounds):
            for name in names:
                rows = results[name].get("c2000", [])
                if index < len(rows):
                    r = rows[index]
                    lines.append(
                        f"| {index + 1} | {name} | {fmt(r['rate'])} "
                        f"| {fmt(r.get('p50_ms'), 1)} | {fmt(r.get('p90_ms'), 1)} "
                        f"| {fmt(r['p99_ms'], 1)} | {r['timeouts']} | {r['errors']} "
                        f"| {fmt(r.get('requests'))} | {fmt(r.get('user_us_per_req'), 1)} "
                        f"| {fmt(r.get('sys_us_per_req'), 1)} | {r['load']:.1f} |"
                    )
        lines += ["", "Medians over the rounds:", ""]
        lines += [
            "| proxy | req/s | p50 ms | p90 ms | p99 ms | proxy CPU µs/req user | sys "
            "| user + sys |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in names:
            rows = results[name].get("c2000", [])
            if not rows:
                continue
            user = median(rows, "user_us_per_req")
            system = median(rows, "sys_us_per_req")
            totals = [
                r["user_us_per_req"] + r["sys_us_per_req"]
                for r in rows
                if r.get("user_us_per_req") is not None
            ]
            both = statistics.median(totals) if totals else None
            lines.append(
                f"| {name} | {fmt(median(rows, 'rate'))} | {fmt(median(rows, 'p50_ms'), 1)} "
                f"| {fmt(median(rows, 'p90_ms'), 1)} | {fmt(median(rows, 'p99_ms'), 1)} "
                f"| {fmt(user, 1)} | {fmt(system, 1)} | {fmt(both, 1)} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scenarios", default="conn,syscalls,idle_mem,c2000")
    parser.add_argument("--proxies", default="lbtcp,haproxy,nginx,bare,raw")
    parser.add_argument("--before", help="another lbtcp command, shown as lbtcp-before")
    parser.add_argument("--idle-sessions", type=int, default=5000)
    parser.add_argument("--insn-connections", type=int, default=200)
    parser.add_argument("--proxy-cpu", type=int, default=0)
    parser.add_argument("--load-cpu", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    tools = ("wrk", "taskset") + (("strace",) if "syscalls" in args.scenarios else ())
    tools += ("valgrind", "callgrind_control") if "insn" in args.scenarios else ()
    for tool in tools:
        if shutil.which(tool) is None:
            print(f"conncost: {tool} not found (benchmarks/install-tools)", file=sys.stderr)
            return 2
    nofile = run.raise_nofile_limit()
    workdir = Path(tempfile.mkdtemp(prefix="lbtcp-conncost-"))
    children = run.Children(workdir)
    lbtcp = run.lbtcp_binary()
    every: dict[str, run.Proxy] = {
        "lbtcp": run.LbtcpProxy(workdir, nofile, lbtcp),
        "haproxy": run.HaproxyProxy(workdir, nofile),
        "nginx": run.NginxProxy(workdir, nofile),
        "bare": BareProxy(workdir, nofile),
        "raw": RawProxy(workdir, nofile),
    }
    if args.before:
        before = run.LbtcpProxy(workdir, nofile, args.before)
        before.name = "lbtcp-before"
        every = {"lbtcp-before": before, **every}
    names = [n for n in every if n == "lbtcp-before" or n in args.proxies.split(",")]
    for name in list(names):
        why = every[name].missing()
        if why:
            print(f"conncost: skipping {why}", file=sys.stderr)
            names.remove(name)
    scenarios = args.scenarios.split(",")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    try:
        http = run.free_port()
        echo = run.free_port()
        httpd = children.spawn(
            "httpd", [sys.executable, str(HERE / "httpd.py"), str(http)], cpu=args.load_cpu
        )
        httpd.wait_for_text("listening")
        echod = children.spawn("echo", [lbtcp, "echo", str(echo)], cpu=args.load_cpu)
        echod.wait_for_text("listening")
        for scenario in scenarios:
            if scenario == "insn":  # once per lbtcp command: the count does not vary
                for name in names:
                    if name.startswith("lbtcp"):
                        command = every[name].binary
                        row = insn_count(command, echo, workdir, args.insn_connections)
                        results[name].setdefault("insn", []).append(row)
                        print(f"insn {name}: {row}", flush=True)
                continue
            ports = {"echo": echo} if scenario == "idle_mem" else {"http": http}
            rounds = 1 if scenario == "syscalls" else args.rounds
            for index in range(rounds):
                for name in names:
                    proxy = every[name]
                    if scenario == "idle_mem" and name in ("bare", "raw"):
                        continue  # the bare relays hold no session state worth comparing
                    pid = started(proxy, children, ports, args.proxy_cpu)
                    try:
                        if scenario == "conn":
                            row = conn_round(proxy, pid, args.load_cpu, strace=False)
                        elif scenario == "syscalls":
                            row = conn_round(proxy, pid, args.load_cpu, strace=True)
                        elif scenario == "idle_mem":
                            row = idle_mem_round(proxy, pid, args.idle_sessions)
                        else:
                            row = c2000_round(proxy, pid, args.load_cpu)
                    finally:
                        proxy.stop()
                    results[name].setdefault(scenario, []).append(row)
                    shown = {k: v for k, v in row.items() if k != "per_session"}
                    print(f"{scenario} round {index + 1} {name}: {shown}", flush=True)
    finally:
        children.close_all()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": f"proxy on core {args.proxy_cpu}, wrk and backends on core {args.load_cpu}",
        "versions": "; ".join(f"{n}: {every[n].version()}" for n in names),
        "note": "load averages are the machine's (shared); rounds interleave the proxies",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conncost.json").write_text(json.dumps({"info": info, "results": results}))
    (args.out / "conncost.md").write_text(report(results, info) + "\n")
    print(f"conncost: wrote {args.out / 'conncost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
