"""What a bench run counted, and the report made from it (pure).

A ``Tally`` is the set of counters one event loop keeps while it runs; the load generator's
processes each keep one and the parent merges them (``Tally.merge``, ``to_dict``/``from_dict``).
``build_report`` turns the merged tally into the report, ``format_report`` into text and
``format_progress`` into the live progress line.

JSON report fields (``lbtcp bench --json FILE``; stable, add but never rename):

==================  ======================================================================
``mode``            ``"rr"``, ``"connect"`` or ``"stream"``
``target``          the target as given, e.g. ``"127.0.0.1:8080"``
``address``         the address connected to, after name resolution
``connections``     concurrent connections (rr, stream) or session workers (connect)
``processes``       worker processes
``size_bytes``      message size (rr, connect) or write size (stream)
``rate``            open-loop target rate in requests/s, or ``null`` for closed loop
``warmup_s``        seconds at the start that were not counted
``duration_s``      the measured (counted) window in seconds
``requests``        completed exchanges: echoed round trips (rr), full sessions (connect);
                    0 in stream mode
``requests_per_s``  ``requests / duration_s``
``sessions``        connections established during the window
``sessions_per_s``  ``sessions / duration_s`` (the connection rate in connect mode)
``bytes_sent``      payload bytes written (stream: less what was still unsent at the end)
``bytes_received``  payload bytes read back (verified echo bytes)
``throughput_gbps`` ``(bytes_sent + bytes_received) * 8 / duration_s / 1e9``
``sent_gbps``       the same for bytes_sent alone
``received_gbps``   the same for bytes_received alone
``errors``          counts by kind: ``refused`` (ECONNREFUSED), ``reset`` (ECONNRESET, EPIPE),
                    ``timeout`` (no connection or no full reply within ``--timeout``),
                    ``short_read`` (the server closed before the full echo, or closed a kept-open
                    connection), ``mismatch`` (echoed bytes differ from those sent, or bytes
                    nobody asked for), ``other`` (any other socket error)
``errors_total``    the sum of ``errors``
``latency_ms``      ``p50``, ``p90``, ``p99``, ``p99_9``, ``max``, ``min``, ``mean`` in
                    milliseconds (``null`` when nothing completed, e.g. in stream mode), and
                    ``count``, the number of samples. rr: per round trip, from the intended send
                    time under ``--rate`` (no coordinated omission); connect: connect plus
                    exchange.
==================  ======================================================================

Only the counted window contributes: nothing that happens during ``--warmup`` or after the end
is counted, errors included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lbtcp.bench.histogram import Histogram
from lbtcp.bench.sizes import format_bytes

ERROR_KINDS = ("refused", "reset", "timeout", "short_read", "mismatch", "other")
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))
NS_PER_MS = 1_000_000

REPORT_FIELDS = (
    "mode",
    "target",
    "address",
    "connections",
    "processes",
    "size_bytes",
    "rate",
    "warmup_s",
    "duration_s",
    "requests",
    "requests_per_s",
    "sessions",
    "sessions_per_s",
    "bytes_sent",
    "bytes_received",
    "throughput_gbps",
    "sent_gbps",
    "received_gbps",
    "errors",
    "errors_total",
    "latency_ms",
)
LATENCY_FIELDS = ("p50", "p90", "p99", "p99_9", "max", "min", "mean", "count")


def _zero_errors() -> dict[str, int]:
    return dict.fromkeys(ERROR_KINDS, 0)


@dataclass(slots=True)
class Tally:
    """Counters of one run (or the merge of several); latency in nanoseconds."""

    requests: int = 0
    sessions: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    window_s: float = 0.0
    errors: dict[str, int] = field(default_factory=_zero_errors)
    latency_ns: Histogram = field(default_factory=Histogram)

    @property
    def errors_total(self) -> int:
        """All errors of every kind."""
        return sum(self.errors.values())

    def merge(self, other: Tally) -> Tally:
        """Add ``other`` into this tally; the window is the longest of the two. Returns self."""
        self.requests += other.requests
        self.sessions += other.sessions
        self.bytes_sent += other.bytes_sent
        self.bytes_received += other.bytes_received
        # Processes count over (nearly) the same wall-clock window, so windows do not add up.
        self.window_s = max(self.window_s, other.window_s)
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n
        self.latency_ns.merge(other.latency_ns)
        return self

    def copy(self) -> Tally:
        """An independent copy (the live tally keeps changing)."""
        return Tally.from_dict(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        """A pickle/JSON-friendly form for sending between processes."""
        return {
            "requests": self.requests,
            "sessions": self.sessions,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "window_s": self.window_s,
            "errors": dict(self.errors),
            "latency_ns": self.latency_ns.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tally:
        """Reverse ``to_dict``."""
        errors = _zero_errors()
        errors.update({str(k): int(v) for k, v in data["errors"].items()})
        return cls(
            requests=int(data["requests"]),
            sessions=int(data["sessions"]),
            bytes_sent=int(data["bytes_sent"]),
            bytes_received=int(data["bytes_received"]),
            window_s=float(data["window_s"]),
            errors=errors,
            latency_ns=Histogram.from_dict(data["latency_ns"]),
        )


def _per_s(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def latency_summary_ms(hist: Histogram) -> dict[str, float | int | None]:
    """The ``latency_ms`` object of the report."""
    out: dict[str, float | int | None] = {}
    empty = hist.count == 0
    for name, q in PERCENTILES:
        out[name] = None if empty else hist.percentile(q) / NS_PER_MS
    out["max"] = None if empty else hist.max / NS_PER_MS
    out["min"] = None if empty else hist.min / NS_PER_MS
    out["mean"] = None if empty else hist.mean / NS_PER_MS
    out["count"] = hist.count
    return out


def build_report(
    tally: Tally,
    *,
    mode: str,
    target: str,
    address: str,
    connections: int,
    processes: int,
    size: int,
    rate: float | None,
    warmup_s: float,
) -> dict[str, Any]:
    """The report as a JSON-ready dict with exactly the fields in ``REPORT_FIELDS``."""
    window = tally.window_s
    bits = 8 / 1e9
    return {
        "mode": mode,
        "target": target,
        "address": address,
        "connections": connections,
        "processes": processes,
        "size_bytes": size,
        "rate": rate,
        "warmup_s": warmup_s,
        "duration_s": window,
        "requests": tally.requests,
        "requests_per_s": _per_s(tally.requests, window),
        "sessions": tally.sessions,
        "sessions_per_s": _per_s(tally.sessions, window),
        "bytes_sent": tally.bytes_sent,
        "bytes_received": tally.bytes_received,
        "throughput_gbps": _per_s((tally.bytes_sent + tally.bytes_received) * bits, window),
        "sent_gbps": _per_s(tally.bytes_sent * bits, window),
        "received_gbps": _per_s(tally.bytes_received * bits, window),
        "errors": {kind: tally.errors.get(kind, 0) for kind in ERROR_KINDS},
        "errors_total": tally.errors_total,
        "latency_ms": latency_summary_ms(tally.latency_ns),
    }


def _ms(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable final report (several lines, no trailing newline)."""
    errors = report["errors"]
    latency = report["latency_ms"]
    rate = "closed loop" if report["rate"] is None else f"open loop at {report['rate']:g}/s"
    procs = report["processes"]
    target = report["target"]
    if report["address"] != target:
        target += f" ({report['address']})"
    lines = [
        f"lbtcp bench: {report['mode']} to {target}, "
        f"{report['connections']} connections, {procs} process{'es' if procs != 1 else ''}, "
        f"{rate}, size {report['size_bytes']} B",
        f"  duration     {report['duration_s']:.2f} s counted (warmup {report['warmup_s']:g} s)",
        f"  requests     {report['requests']} total, {report['requests_per_s']:.1f}/s",
        f"  sessions     {report['sessions']} opened, {report['sessions_per_s']:.1f}/s",
        f"  throughput   {report['throughput_gbps']:.3f} Gbit/s "
        f"(sent {format_bytes(report['bytes_sent'])}, "
        f"received {format_bytes(report['bytes_received'])})",
        f"  errors       {report['errors_total']} ("
        + ", ".join(f"{kind} {errors[kind]}" for kind in ERROR_KINDS)
        + ")",
        f"  latency ms   p50 {_ms(latency['p50'])}  p90 {_ms(latency['p90'])}  "
        f"p99 {_ms(latency['p99'])}  p99.9 {_ms(latency['p99_9'])}  max {_ms(latency['max'])}  "
        f"mean {_ms(latency['mean'])}  ({latency['count']} samples)",
    ]
    return "\n".join(lines)


def format_progress(
    *, elapsed: float, warming_up: bool, current: Tally, previous: Tally, interval: float
) -> str:
    """One progress line: elapsed time, rates over the last ``interval``, errors, p99 so far."""
    if warming_up:
        return f"[{elapsed:6.1f}s] warming up"
    rate = _per_s(current.requests - previous.requests, interval)
    sessions = _per_s(current.sessions - previous.sessions, interval)
    moved = (current.bytes_sent + current.bytes_received) - (
        previous.bytes_sent + previous.bytes_received
    )
    gbps = _per_s(moved * 8 / 1e9, interval)
    hist = current.latency_ns
    p99 = _ms(hist.percentile(99.0) / NS_PER_MS) if hist.count else "-"
    return (
        f"[{elapsed:6.1f}s] {rate:10.1f} req/s {sessions:9.1f} conn/s {gbps:8.3f} Gbit/s  "
        f"errors {current.errors_total}  p99 {p99} ms"
    )
