#!/usr/bin/env python3
"""Reload under load: ``lbtcp bench`` (rr and connect) through ``lbtcp serve`` while the config
is reloaded every 250 ms, alternating two valid configs. Issue 9's acceptance figures:

- 0 failed sessions and 0 bytes lost (the bench verifies every echoed byte: a short read or
  a mismatch is an error);
- long-lived sessions opened before the first reload are still alive and byte exact at the end;
- every reload succeeded.

The two configs differ in what a reload can change: servers (one added, one removed), a weight,
the balancer, a second listener added and removed, the listener's limits. The bench's listener
keeps its bind string, so its socket stays the same.

    .venv/bin/python benchmarks/reload_under_load.py                 # 30 s, prints JSON
    .venv/bin/python benchmarks/reload_under_load.py --duration 5 --json out.json

Exit status 0 when every criterion holds, 1 otherwise. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LONG_LIVED = 8


def config_text(ports: list[int], variant: int) -> str:
    """Two valid configs; the bench's listener ``web`` is the same in both."""
    a, b, c = ports
    if variant == 0:
        servers = [(a, 1), (b, 1)]
        balance = "round_robin"
        extra_listener = ""
        limit = 0
    else:
        servers = [(b, 3), (c, 1)]
        balance = "least_connections"
        extra_listener = '[listeners.extra]\nbind = "127.0.0.1:0"\npool = "app"\n'
        limit = 100000
    lines = [
        "[global]",
        "access_log = false",
        'drain_timeout = "30s"',
        "[listeners.web]",
        'bind = "127.0.0.1:0"',
        'pool = "app"',
        f"max_connections = {limit}",
        extra_listener,
        "[pools.app]",
        f'balance = "{balance}"',
    ]
    for port, weight in servers:
        lines += ["[[pools.app.servers]]", f'address = "127.0.0.1:{port}"', f"weight = {weight}"]
    return "\n".join(lines) + "\n"


class Process:
    """A subprocess whose stderr lines are collected by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pattern: str, start: int = 0, timeout: float = 15.0) -> tuple[int, str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            index = start
            while True:
                while index < len(self.lines):
                    if regex.search(self.lines[index]):
                        return index, self.lines[index]
                    index += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.thread.is_alive()):
                    tail = "\n".join(self.lines[-20:])
                    raise RuntimeError(f"no line matching {pattern!r}; last lines:\n{tail}")
                self.cond.wait(min(left, 0.1))

    def count(self) -> int:
        with self.cond:
            return len(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self.thread.join(5)


def exchange(sock: socket.socket, payload: bytes) -> bool:
    """Send ``payload`` on a long-lived session and read the same bytes back."""
    sock.sendall(payload)
    got = bytearray()
    while len(got) < len(payload):
        chunk = sock.recv(min(65536, len(payload) - len(got)))
        if not chunk:
            return False
        got += chunk
    return bytes(got) == payload


def run(duration: float, interval: float, python: str) -> dict[str, Any]:
    lbtcp_cmd = [python, "-m", "lbtcp"]
    echo = Process([*lbtcp_cmd, "echo", "0", "0", "0"])
    ports = []
    for _ in range(3):
        _index, line = echo.wait_line(r"listening on .*:(\d+)", start=len(ports))
        match = re.search(r":(\d+)\s*$", line) or re.search(r":(\d+)", line)
        assert match
        ports.append(int(match.group(1)))
    workdir = Path(tempfile.mkdtemp(prefix="lbtcp-reload-bench-"))
    path = workdir / "lbtcp.toml"
    path.write_text(config_text(ports, 0))
    serve = Process([*lbtcp_cmd, "serve", str(path)])
    benches: list[Process] = []
    sessions: list[socket.socket] = []
    try:
        _index, line = serve.wait_line(r"listening listener=web ")
        match = re.search(r"address=127\.0\.0\.1:(\d+)", line)
        assert match, line
        target = f"127.0.0.1:{match.group(1)}"
        port = int(match.group(1))
        for i in range(LONG_LIVED):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if not exchange(sock, b"hello %d" % i):
                raise RuntimeError("a long-lived session did not echo before the first reload")
            sessions.append(sock)
        reports = {mode: workdir / f"{mode}.json" for mode in ("rr", "connect")}
        benches = [
            Process(
                [
                    *lbtcp_cmd,
                    "bench",
                    target,
                    "--mode",
                    mode,
                    "--connections",
                    str(connections),
                    "--duration",
                    f"{duration}s",
                    "--size",
                    "1KiB",
                    "--json",
                    str(reports[mode]),
                    "--quiet",
                ]
            )
            for mode, connections in (("rr", 16), ("connect", 4))
        ]
        reload_ms: list[float] = []
        outcomes = {"ok": 0, "failed": 0}
        variant = 0
        long_lived_bytes = 0
        long_lived_ok = True
        started = time.monotonic()
        next_at = started
        while any(b.proc.poll() is None for b in benches):
            next_at += interval
            variant = 1 - variant
            start = serve.count()
            path.write_text(config_text(ports, variant))
            serve.proc.send_signal(signal.SIGHUP)
            _index, line = serve.wait_line(r" reload(_failed)? msg=", start=start, timeout=10)
            if " reload msg=" in line:
                outcomes["ok"] += 1
                match = re.search(r"duration_ms=([0-9.]+)", line)
                if match:
                    reload_ms.append(float(match.group(1)))
            else:
                outcomes["failed"] += 1
            # The long-lived sessions carry bytes between reloads too.
            sock = sessions[outcomes["ok"] % LONG_LIVED]
            payload = bytes([outcomes["ok"] % 256]) * 4096
            long_lived_ok = exchange(sock, payload) and long_lived_ok
            long_lived_bytes += len(payload)
            time.sleep(max(0.0, next_at - time.monotonic()))
        elapsed = time.monotonic() - started
        for bench in benches:
            bench.proc.wait(30)
        # At the end: every long-lived session is alive and byte exact.
        alive = 0
        for i, sock in enumerate(sessions):
            payload = bytes((i + n) % 256 for n in range(65536))
            if exchange(sock, payload):
                alive += 1
                long_lived_bytes += len(payload)
        results = {mode: json.loads(reports[mode].read_text()) for mode in reports}
    finally:
        for sock in sessions:
            sock.close()
        for bench in benches:
            if bench.proc.poll() is None:
                bench.stop(signal.SIGINT)
        code = serve.stop(signal.SIGTERM)
        echo.stop(signal.SIGTERM)

    def summary(report: dict[str, Any]) -> dict[str, Any]:
        return {
            "connections": report["connections"],
            "size_bytes": report["size_bytes"],
            "requests": report["requests"],
            "requests_per_s": round(report["requests_per_s"], 1),
            "sessions": report["sessions"],
            "bytes_sent": report["bytes_sent"],
            "bytes_received": report["bytes_received"],
            "errors_total": report["errors_total"],
            "errors": report["errors"],
            "latency_ms": {k: report["latency_ms"][k] for k in ("p50", "p99", "max")},
        }

    return {
        "duration_s": round(elapsed, 2),
        "reload_interval_s": interval,
        "reloads": outcomes,
        "reload_ms": {
            "median": round(statistics.median(reload_ms), 3) if reload_ms else None,
            "max": round(max(reload_ms), 3) if reload_ms else None,
        },
        "rr": summary(results["rr"]),
        "connect": summary(results["connect"]),
        "long_lived": {
            "sessions": LONG_LIVED,
            "alive_at_end": alive,
            "byte_exact": long_lived_ok and alive == LONG_LIVED,
            "bytes_verified": long_lived_bytes,
        },
        "lbtcp_exit_code": code,
    }


def passed(result: dict[str, Any]) -> list[str]:
    """The criteria that failed (empty: all good)."""
    failures = []
    if result["reloads"]["failed"] or not result["reloads"]["ok"]:
        failures.append(f"reloads: {result['reloads']}")
    for mode in ("rr", "connect"):
        report = result[mode]
        if report["errors_total"]:
            failures.append(f"{mode}: {report['errors_total']} errors {report['errors']}")
        if not report["requests"]:
            failures.append(f"{mode}: no requests completed")
        # rr and connect echo every byte and the bench verifies each one (a short read or a
        # mismatch is an error); what is still in flight when the window closes (at most one
        # message per connection) is sent but not yet counted as received.
        in_flight = report["bytes_sent"] - report["bytes_received"]
        if not 0 <= in_flight <= report["connections"] * report["size_bytes"]:
            failures.append(
                f"{mode}: sent {report['bytes_sent']}, received {report['bytes_received']}"
            )
    if not result["long_lived"]["byte_exact"]:
        failures.append(f"long-lived sessions: {result['long_lived']}")
    if result["lbtcp_exit_code"] != 0:
        failures.append(f"lbtcp exited {result['lbtcp_exit_code']}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between reloads")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--python", default=sys.executable, help="interpreter with lbtcp")
    args = parser.parse_args()
    result = run(args.duration, args.interval, args.python)
    failures = passed(result)
    result["failures"] = failures
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
