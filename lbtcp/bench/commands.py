"""The click commands ``bench``, ``echo`` and ``sink``; ``lbtcp.cli`` registers them.

``cli`` groups the three so that ``python -m lbtcp.bench`` works on its own. The JSON report
fields of ``bench --json`` are documented in ``lbtcp.bench.report``.

Exit codes: 0 when the run happened (errors against the target are part of the report, not a
failure of the tool), 2 for bad arguments (click's usage errors), 1 when the tool itself failed
(a worker process died, an internal error, a port that cannot be listened on).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import IO, Any

import click

from lbtcp.bench.loadgen import LOOPS, MODES, BenchSpec, resolve_target, run_bench
from lbtcp.bench.report import Tally, build_report, format_progress, format_report
from lbtcp.bench.servers import serve_until_signal
from lbtcp.bench.sizes import parse_size
from lbtcp.config import parse_duration

MAX_SIZE = 256 * 1024 * 1024
NON_TTY_PROGRESS_EVERY = 5.0


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if not 1 <= size <= MAX_SIZE:
        raise click.BadParameter(f"{value!r} must be between 1 byte and 256 MiB")
    return size


class ProgressPrinter:
    """Shows progress on ``stream``: one line rewritten in place on a terminal, else a plain
    line every ``NON_TTY_PROGRESS_EVERY`` seconds (logs should not fill up with progress)."""

    def __init__(self, stream: IO[str], interval: float) -> None:
        self._stream = stream
        self._interval = interval
        self._tty = stream.isatty()
        self._previous = Tally()
        self._previous_at = 0.0
        self._last_line_at = 0.0
        self._wrote_in_place = False

    def __call__(self, elapsed: float, warming_up: bool, tally: Tally) -> None:
        """The load generator's tick: ``tally`` is cumulative and may be the live object."""
        span = max(elapsed - self._previous_at, 1e-9)
        line = format_progress(
            elapsed=elapsed,
            warming_up=warming_up,
            current=tally,
            previous=self._previous,
            interval=span,
        )
        self._previous = tally.copy()
        self._previous_at = elapsed
        if self._tty:
            self._stream.write("\r" + line + "\x1b[K")
            self._wrote_in_place = True
        elif elapsed - self._last_line_at >= NON_TTY_PROGRESS_EVERY - 1e-6:
            self._stream.write(line + "\n")
            self._last_line_at = elapsed
        self._stream.flush()

    def finish(self) -> None:
        """End the in-place line before the report is printed."""
        if self._wrote_in_place:
            self._stream.write("\r\x1b[K")
            self._stream.flush()


@click.command("bench")
@click.argument("target")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    default="rr",
    show_default=True,
    help="rr: request/response on kept-open connections; connect: one exchange per "
    "connection; stream: one-way bulk to a sink.",
)
@click.option(
    "-c",
    "--connections",
    type=click.IntRange(1, 100_000),
    default=10,
    show_default=True,
    help="Concurrent connections (rr, stream) or session loops (connect).",
)
@click.option(
    "-d",
    "--duration",
    default="10s",
    show_default=True,
    callback=_duration,
    help="Counted time: 250ms, 2s, 1m or seconds.",
)
@click.option(
    "-s",
    "--size",
    default="1KiB",
    show_default=True,
    callback=_size,
    help="Message size (rr, connect) or write size (stream): 64, 1k, 16KiB, 1MiB "
    "(k, KiB = 1024; kB = 1000).",
)
@click.option(
    "-r",
    "--rate",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Open loop: total requests/s over all connections; latency counts from the "
    "intended send time.",
)
@click.option(
    "--warmup",
    default="0s",
    show_default=True,
    callback=_duration,
    help="Time at the start that is not counted.",
)
@click.option(
    "-p",
    "--processes",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes sharing the connections (one core each).",
)
@click.option(
    "--timeout",
    default="5s",
    show_default=True,
    callback=_duration,
    help="Longest wait for a connect or a full reply.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Also write the report as JSON to this file ('-' for stdout).",
)
@click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(LOOPS),
    default="uvloop",
    show_default=True,
    help="Event loop of the generator.",
)
@click.option("-q", "--quiet", is_flag=True, help="No live progress.")
def bench(
    target: str,
    mode: str,
    connections: int,
    duration: float,
    size: int,
    rate: float | None,
    warmup: float,
    processes: int,
    timeout: float,
    json_path: str | None,
    loop_kind: str,
    quiet: bool,
) -> None:
    """Load TARGET (HOST:PORT or [IPv6]:PORT) and report rates, errors and latency.

    Use it against `lbtcp echo` (rr, connect) or `lbtcp sink` (stream), directly or through
    lbtcp. Errors by kind: refused, reset, timeout, short_read, mismatch, other.
    """
    if duration <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--duration'")
    if timeout <= 0:
        raise click.BadParameter("must be more than 0", param_hint="'--timeout'")
    if rate is not None and mode == "stream":
        raise click.UsageError("--rate applies to --mode rr and connect, not stream")
    try:
        host, port = resolve_target(target)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'TARGET'") from None
    spec = BenchSpec(
        mode=mode,
        target=target,
        host=host,
        port=port,
        connections=connections,
        duration=duration,
        size=size,
        rate=rate,
        warmup=warmup,
        timeout=timeout,
        processes=processes,
        loop=loop_kind,
    )
    printer = None if quiet else ProgressPrinter(sys.stderr, spec.progress_interval)
    # Flush before forking so children do not inherit (and repeat) buffered output.
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        result = run_bench(spec, printer)
    finally:
        if printer is not None:
            printer.finish()
    report = build_report(
        result.tally,
        mode=mode,
        target=target,
        address=spec.address,
        connections=connections,
        processes=min(processes, connections),
        size=size,
        rate=rate,
        warmup_s=warmup,
    )
    click.echo(format_report(report))
    if json_path is not None:
        _write_json(json_path, report)
    if result.problems:
        for problem in result.problems:
            click.echo(f"lbtcp bench: {problem}", err=True)
        sys.exit(1)


def _write_json(path: str, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2) + "\n"
    if path == "-":
        click.echo(text, nl=False)
        return
    try:
        with open(path, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc}") from None


def _serve(kind: str, host: str, ports: tuple[int, ...], loop_kind: str) -> None:
    loop: asyncio.AbstractEventLoop
    if loop_kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(serve_until_signal(kind, host, ports))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}: {exc}") from None
    finally:
        loop.close()


_ports = click.argument("ports", nargs=-1, required=True, type=click.IntRange(0, 65535))
_host = click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (e.g. ::1)."
)
_loop = click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(LOOPS),
    default="uvloop",
    show_default=True,
    help="Event loop of the server.",
)


def _server_command(kind: str, what: str) -> click.Command:
    """The ``echo`` or ``sink`` command: run ``what`` on each PORT until a signal."""

    def command(ports: tuple[int, ...], host: str, loop_kind: str) -> None:
        _serve(kind, host, ports, loop_kind)

    # click takes the help text from the docstring.
    command.__doc__ = f"""Run {what} on each PORT (0 = a free port) until SIGINT/SIGTERM.

    Prints "{kind} listening on HOST:PORT" to stderr for each port once it listens.
    """
    return click.command(kind)(_ports(_host(_loop(command))))


echo = _server_command("echo", "echo servers")
sink = _server_command("sink", "sinks (read and discard)")


@click.group("lbtcp-bench")
def cli() -> None:
    """The lbtcp load generator and its echo/sink backends."""


cli.add_command(bench)
cli.add_command(echo)
cli.add_command(sink)
