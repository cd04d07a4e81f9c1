"""The pure parts of the load generator: sizes, tallies, the report, progress, specs."""

from __future__ import annotations

import errno
import io
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.bench import report as report_module
from lbtcp.bench.commands import ProgressPrinter
from lbtcp.bench.histogram import Histogram
from lbtcp.bench.loadgen import BenchSpec, classify, resolve_target
from lbtcp.bench.report import Tally, build_report, format_progress, format_report
from lbtcp.bench.sizes import format_bytes, parse_size

# --- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64", 64),
        ("64B", 64),
        ("1k", 1024),
        ("1K", 1024),
        ("1KiB", 1024),
        ("16KiB", 16384),
        ("1kB", 1000),
        ("1MiB", 1048576),
        ("1M", 1048576),
        ("2MB", 2_000_000),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        (" 8 KiB ", 8192),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "KiB", "1x", "-1", "1.3B", "1 2", "0x10"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|unit|whole"):
        parse_size(text)


@given(st.integers(min_value=0, max_value=2**40))
def test_parse_size_of_plain_numbers(n: int) -> None:
    assert parse_size(str(n)) == n


def test_format_bytes() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 1024**3) == "3.00 GiB"


# --- tallies and the report -------------------------------------------------------------------

tallies = st.builds(
    lambda req, ses, sent, recv, window, errs, lat: Tally(
        requests=req,
        sessions=ses,
        bytes_sent=sent,
        bytes_received=recv,
        window_s=window,
        errors=dict(zip(report_module.ERROR_KINDS, errs, strict=True)),
        latency_ns=_hist(lat),
    ),
    st.integers(0, 10**9),
    st.integers(0, 10**6),
    st.integers(0, 10**12),
    st.integers(0, 10**12),
    st.floats(0, 100, allow_nan=False),
    st.lists(st.integers(0, 1000), min_size=6, max_size=6),
    st.lists(st.integers(0, 10**10), max_size=50),
)


def _hist(values: list[int]) -> Histogram:
    hist = Histogram()
    for value in values:
        hist.record(value)
    return hist


@settings(max_examples=100, deadline=None)
@given(tally=tallies)
def test_tally_round_trip(tally: Tally) -> None:
    assert Tally.from_dict(json.loads(json.dumps(tally.to_dict()))) == tally
    assert tally.copy() == tally
    assert tally.copy() is not tally


@settings(max_examples=100, deadline=None)
@given(a=tallies, b=tallies)
def test_tally_merge_adds_counts(a: Tally, b: Tally) -> None:
    merged = a.copy().merge(b)
    assert merged.requests == a.requests + b.requests
    assert merged.bytes_sent == a.bytes_sent + b.bytes_sent
    assert merged.errors_total == a.errors_total + b.errors_total
    assert merged.latency_ns.count == a.latency_ns.count + b.latency_ns.count
    # Processes run side by side: their windows overlap instead of adding up.
    assert merged.window_s == max(a.window_s, b.window_s)


def _report(tally: Tally, **overrides: object) -> dict[str, object]:
    args: dict[str, object] = {
        "mode": "rr",
        "target": "127.0.0.1:9",
        "address": "127.0.0.1:9",
        "connections": 4,
        "processes": 1,
        "size": 1024,
        "rate": None,
        "warmup_s": 0.0,
    }
    args.update(overrides)
    return build_report(tally, **args)  # type: ignore[arg-type]


def test_report_numbers() -> None:
    tally = Tally(requests=1000, sessions=4, bytes_sent=1_000_000, bytes_received=250_000)
    tally.window_s = 2.0
    tally.errors["refused"] = 3
    tally.errors["mismatch"] = 2
    for ms in range(1, 101):
        tally.latency_ns.record(ms * 1_000_000)
    report = _report(tally)
    assert report["requests_per_s"] == 500.0
    assert report["sessions_per_s"] == 2.0
    assert report["throughput_gbps"] == pytest.approx(1_250_000 * 8 / 2 / 1e9)
    assert report["sent_gbps"] == pytest.approx(1_000_000 * 8 / 2 / 1e9)
    assert report["errors"] == {
        "refused": 3,
        "reset": 0,
        "timeout": 0,
        "short_read": 0,
        "mismatch": 2,
        "other": 0,
    }
    assert report["errors_total"] == 5
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert latency["p50"] == pytest.approx(50, rel=0.004)
    assert latency["p99"] == pytest.approx(99, rel=0.004)
    assert latency["p99_9"] == pytest.approx(100, rel=0.004)
    assert latency["max"] == 100.0
    assert latency["min"] == 1.0
    assert latency["mean"] == pytest.approx(50.5)
    assert latency["count"] == 100
    text = format_report(report)
    for needle in ("rr to 127.0.0.1:9", "500.0/s", "refused 3", "mismatch 2", "p99.9 100."):
        assert needle in text


def test_report_of_nothing_has_no_fake_numbers() -> None:
    report = _report(Tally(), mode="stream")
    assert report["requests_per_s"] == 0.0
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    assert latency["p99"] is None
    assert latency["count"] == 0
    assert "p99 -" in format_report(report)
    json.dumps(report)


def test_every_report_field_is_documented() -> None:
    report = _report(Tally())
    assert tuple(report) == report_module.REPORT_FIELDS
    doc = report_module.__doc__ or ""
    for name in report:
        assert f"``{name}``" in doc, name
    latency = report["latency_ms"]
    assert isinstance(latency, dict)
    for name in latency:
        assert f"``{name}``" in doc, name
    for kind in report_module.ERROR_KINDS:
        assert f"``{kind}``" in doc, kind


def test_progress_line() -> None:
    previous = Tally(requests=100, bytes_sent=1000)
    current = Tally(requests=1100, bytes_sent=1000 + 125_000_000)
    current.errors["timeout"] = 2
    current.latency_ns.record(2_000_000)
    line = format_progress(
        elapsed=3.0, warming_up=False, current=current, previous=previous, interval=1.0
    )
    assert "[   3.0s]" in line
    assert "1000.0 req/s" in line
    assert "1.000 Gbit/s" in line
    assert "errors 2" in line
    assert "p99 2.000 ms" in line
    assert "warming up" in format_progress(
        elapsed=0.5, warming_up=True, current=current, previous=previous, interval=1.0
    )


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_rewrites_one_line() -> None:
    out = _FakeTerminal()
    printer = ProgressPrinter(out, 1.0)
    tally = Tally()
    for second in range(1, 4):
        tally.requests += 500
        printer(float(second), False, tally)
    printer.finish()
    text = out.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 4
    assert text.count("500.0 req/s") == 3  # the rate of each second, not the running total
    assert text.endswith("\r\x1b[K")


def test_progress_off_a_terminal_is_plain_and_sparse() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out, 1.0)
    tally = Tally()
    for second in range(1, 11):
        tally.requests += 10
        printer(float(second), False, tally)
    printer.finish()
    lines = out.getvalue().splitlines()
    assert 1 <= len(lines) <= 2
    assert "\r" not in out.getvalue()


# --- specs ------------------------------------------------------------------------------------


def _spec(**overrides: object) -> BenchSpec:
    args: dict[str, object] = {
        "mode": "rr",
        "target": "127.0.0.1:9",
        "host": "127.0.0.1",
        "port": 9,
        "connections": 10,
        "duration": 1.0,
        "size": 64,
    }
    args.update(overrides)
    return BenchSpec(**args)  # type: ignore[arg-type]


def test_split_shares_connections_and_rate() -> None:
    parts = _spec(connections=10, processes=3, rate=1000.0).split()
    assert [p.connections for p in parts] == [4, 3, 3]
    assert sum(p.rate or 0 for p in parts) == pytest.approx(1000.0)
    assert all(p.processes == 1 for p in parts)
    # Never more processes than connections.
    assert len(_spec(connections=2, processes=8).split()) == 2


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "udp"},
        {"connections": 0},
        {"duration": 0.0},
        {"timeout": 0.0},
        {"size": 0},
        {"rate": 0.0},
        {"mode": "stream", "rate": 10.0},
        {"loop": "tokio"},
    ],
)
def test_bad_specs_are_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"must|apply"):
        _spec(**overrides)


def test_resolve_target() -> None:
    assert resolve_target("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert resolve_target("[::1]:8080") == ("::1", 8080)
    assert resolve_target("localhost:80")[1] == 80
    for bad in ("127.0.0.1", "127.0.0.1:0", "[::1]", "host:port", "1.2.3:4"):
        with pytest.raises(ValueError):  # noqa: PT011 - the messages are parse_endpoint's
            resolve_target(bad)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionRefusedError(), "refused"),
        (ConnectionResetError(), "reset"),
        (BrokenPipeError(), "reset"),
        (TimeoutError(), "timeout"),
        (OSError(errno.ECONNREFUSED, "x"), "refused"),
        (OSError(errno.EPIPE, "x"), "reset"),
        (OSError(errno.ETIMEDOUT, "x"), "timeout"),
        (OSError(errno.EHOSTUNREACH, "x"), "other"),
        (RuntimeError("x"), "other"),
    ],
)
def test_classify(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind
