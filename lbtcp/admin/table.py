"""The ``lbtcp status`` table: the /status document (see README "Admin API") rendered with rich.

Theory of operation: ``render_status(doc, now)`` turns one document into a rich renderable (a
header line, one summary line per listener, then one table row per server, grouped by pool).
It is pure: the wall-clock ``now`` is passed in, so that ages ("3m ago") are testable, and it
never raises on a document it does not fully understand (an older or newer lbtcp, a field
missing or of another type): an unreadable value shows as ``?``, never as a traceback.

Colour is the console's business: on a terminal the states are coloured, and when stdout is
not a terminal rich drops the styles, so that the words alone carry the meaning (the state is
always a word, never only a colour).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from lbtcp.admin.client import printable

# A state's colour on a terminal. In service: green (healthy) or yellow (failing: still serving,
# but losing probes). Out of service: red for the health layer's verdicts, other hues for the
# states an operator chose (draining, disabled) so that they are not mistaken for an outage.
STATE_STYLES: dict[str, str] = {
    "healthy": "bold green",
    "failing": "bold yellow",
    "rising": "cyan",
    "unknown": "dim",
    "unhealthy": "bold red",
    "ejected": "bold magenta",
    "draining": "bold blue",
    "disabled": "dim blue",
}

VERDICT_STYLES: dict[str, str] = {
    "ok": "green",
    "degraded": "yellow",
    "backup": "yellow",
    "panic": "bold red",
    "empty": "bold red reverse",
}

UNREADABLE = "?"
NONE = "-"

# rich's own fallback for a console that is not a terminal is 80 columns, which would wrap
# the table into several lines per server; piped output is read by grep and by people
# scrolling a log, so it gets one line per server however wide that makes it.
PLAIN_WIDTH = 400


def format_duration(seconds: float) -> str:
    """A short human duration, one unit below an hour: ``42s``, ``3m``, ``2h 5m``, ``3d 4h``.

    Rounded down, so that a duration never reads as more than it is; negative and non-finite
    values (clock skew between two machines, a broken document) read as ``0s``.
    """
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0.0
    total = int(seconds)
    if total < 60:
        return f"{total}s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h" if hours else f"{days}d"


def format_age(at: float, now: float) -> str:
    """How long ago the wall-clock time ``at`` was, as ``3m ago``."""
    return f"{format_duration(now - at)} ago"


def _number(value: object) -> float | None:
    # bool is an int subclass, but True is not a count.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond a float's range: no real count is that large
        return None
    return number if math.isfinite(number) else None


def _int_text(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = _number(value)
    if number is None:
        return UNREADABLE
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _str(value: object, default: str = UNREADABLE) -> str:
    return printable(value) if isinstance(value, str) else default


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _items(value: object) -> Sequence[Mapping[str, Any]]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, Mapping)]


def _weight_text(server: Mapping[str, Any]) -> str:
    """The configured weight, and the effective one when slow start or an admin action makes
    it differ (a weight of 10 that is at 1.5 right now reads ``10 (eff 1.5)``)."""
    weight = _number(server.get("weight"))
    if weight is None:
        return UNREADABLE
    text = _int_text(weight)
    effective = _number(server.get("effective_weight"))
    if effective is not None and abs(effective - weight) > 1e-9:
        text += f" (eff {effective:.3g})"
    return text


def _failures_text(server: Mapping[str, Any]) -> str:
    """Connect failures by kind (only the kinds that happened) and passive ejections."""
    kinds = _mapping(server.get("connect_failures"))
    counts = [(printable(str(kind)), _number(count)) for kind, count in kinds.items()]
    total = sum(int(count) for _, count in counts if count is not None)
    parts = [f"{kind} {int(count)}" for kind, count in counts if count]
    text = str(total)
    if parts:
        text += f" ({', '.join(parts)})"
    ejections = _number(server.get("ejections"))
    if ejections:
        text += f", ejected {int(ejections)}x"
    return text


def _state_text(server: Mapping[str, Any]) -> Text:
    state = _str(server.get("state"))
    text = Text(state, style=STATE_STYLES.get(state, ""))
    # A drained server is still probed: say when its health underneath is not good, since
    # "enable" would then put it back as that, not as healthy.
    health = _str(server.get("health"), "")
    if state == "draining" and health and health not in ("healthy", state):
        text.append(f" ({health})", style=STATE_STYLES.get(health, ""))
    return text


def _change_cells(server: Mapping[str, Any], now: float) -> tuple[str, str]:
    change = server.get("last_change")
    if not isinstance(change, Mapping):
        return NONE, NONE
    at = _number(change.get("at"))
    age = format_age(at, now) if at is not None else UNREADABLE
    reason = _str(change.get("reason"), "")
    before = _str(change.get("from"), "")
    if before:
        reason = f"{reason} (was {before})" if reason else f"was {before}"
    return age, reason or NONE


def _pool_cell(pool: Mapping[str, Any]) -> Text:
    text = Text(_str(pool.get("name")), style="bold")
    verdict = _str(pool.get("verdict"))
    text.append(" ")
    text.append(verdict, style=VERDICT_STYLES.get(verdict, ""))
    in_service = _number(pool.get("in_service"))
    total = _number(pool.get("servers_total"))
    if in_service is not None and total is not None:
        text.append(f" {int(in_service)}/{int(total)}")
    return text


def _server_cell(server: Mapping[str, Any]) -> Text:
    text = Text(_str(server.get("name")))
    if server.get("backup") is True:
        text.append(" (backup)", style="dim")
    return text


def _listener_line(listener: Mapping[str, Any]) -> Text:
    addresses = listener.get("addresses")
    where = (
        ", ".join(_str(a) for a in addresses) if isinstance(addresses, list) and addresses else NONE
    )
    line = Text("listener ")
    line.append(_str(listener.get("name")), style="bold")
    line.append(f" on {where} -> pool {_str(listener.get('pool'))}: ")
    line.append(f"{_int_text(listener.get('active'))} active")
    limit = _number(listener.get("max_connections"))
    if limit:
        line.append(f" (max {int(limit)})")
    line.append(f", {_int_text(listener.get('total'))} total, refused ")
    refused = _mapping(listener.get("refused"))
    reasons = [(printable(str(reason)), _number(count)) for reason, count in refused.items()]
    total = sum(int(count) for _, count in reasons if count is not None)
    nonzero = [f"{reason} {int(count)}" for reason, count in reasons if count]
    line.append(str(total), style="bold red" if total else "")
    if nonzero:
        line.append(f" ({', '.join(nonzero)})")
    return line


def _header_line(doc: Mapping[str, Any]) -> Text:
    line = Text()
    line.append(f"lbtcp {_str(doc.get('version'))}", style="bold")
    line.append(f" pid {_int_text(doc.get('pid'))}")
    uptime = _number(doc.get("uptime_s"))
    line.append(f", up {format_duration(uptime) if uptime is not None else UNREADABLE}")
    config = _str(doc.get("config"), "")
    if config:
        line.append(f", config {config}")
    if doc.get("draining") is True:
        line.append(", ")
        line.append("DRAINING (shutting down)", style="bold red")
    return line


def _workers_line(workers: Sequence[Mapping[str, Any]]) -> Text:
    """workers > 1: each worker's pid, live sessions, and state when not plainly serving."""
    line = Text()
    line.append(f"workers {len(workers)}:", style="bold")
    for worker in workers:
        state = _str(worker.get("state"))
        line.append(f" {_int_text(worker.get('pid'))} ({_int_text(worker.get('active'))} active")
        line.append(f", {state})" if state != "serving" else ")")
    return line


def status_table(doc: Mapping[str, Any], now: float) -> Table:
    """One row per server, pools in config order, the pool named on its first row only."""
    # One space between columns and none at the edges: the table has ten columns and should
    # fit a 120-column terminal; the reason (the longest cell) wraps when it does not.
    table = Table(box=None, padding=(0, 1, 0, 0), header_style="bold", show_edge=False)
    for title in ("POOL", "SERVER", "STATE", "WEIGHT"):
        table.add_column(title, no_wrap=True)
    for title in ("ACTIVE", "TOTAL"):
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("FAILURES", no_wrap=True)
    table.add_column("CHANGED", no_wrap=True)
    table.add_column("REASON", min_width=16)
    pools = _items(doc.get("pools"))
    for index, pool in enumerate(pools):
        servers = _items(pool.get("servers"))
        last_pool = index == len(pools) - 1
        if not servers:
            table.add_row(
                _pool_cell(pool), NONE, Text("(no servers)", style="dim"), end_section=not last_pool
            )
            continue
        for row, server in enumerate(servers):
            age, reason = _change_cells(server, now)
            table.add_row(
                _pool_cell(pool) if row == 0 else "",
                _server_cell(server),
                _state_text(server),
                _weight_text(server),
                _int_text(server.get("active")),
                _int_text(server.get("total")),
                _failures_text(server),
                age,
                reason,
                end_section=row == len(servers) - 1 and not last_pool,
            )
    return table


def render_status(doc: Mapping[str, Any], now: float) -> RenderableType:
    """The whole ``lbtcp status`` screen for one document, as of wall-clock ``now``."""
    lines: list[RenderableType] = [_header_line(doc)]
    if "workers" in doc:
        lines.append(_workers_line(_items(doc.get("workers"))))
    lines.extend(_listener_line(listener) for listener in _items(doc.get("listeners")))
    lines.append(Text(""))
    lines.append(status_table(doc, now))
    return Group(*lines)


def status_text(doc: Mapping[str, Any], now: float, *, width: int = PLAIN_WIDTH) -> str:
    """The screen as plain text (no colour), as ``lbtcp status`` prints it into a pipe."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(render_status(doc, now))
    # rich pads every cell to its column's width; trailing blanks only get in grep's way.
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def watch(
    fetch: Callable[[], Mapping[str, Any]],
    console: Console,
    *,
    interval: float = 1.0,
    errors: tuple[type[Exception], ...] = (),
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    frames: int | None = None,
) -> None:
    """Fetch and redraw every ``interval`` seconds until KeyboardInterrupt (the caller turns
    it into exit 0) or, for tests, after ``frames`` frames.

    The first fetch's error propagates: a wrong address should fail at once, not show an
    empty screen. A later one (one of ``errors``, e.g. while lbtcp restarts) is shown above
    the last good table, and the watch goes on trying, as ``watch(1)`` would.

    On a terminal the screen is redrawn in place (rich Live, one redraw per fetch, no
    background refresh thread); into a pipe or a file each frame is printed after the
    previous one in plain text, so that a log of it stays readable.
    """
    deadline = clock()
    document = fetch()
    problem = ""
    live: Live | None = None
    if console.is_terminal:
        live = Live(console=console, auto_refresh=False)
        live.start()
    try:
        shown = 0
        while True:
            now = clock()
            if live is not None:
                screen = render_status(document, now)
                if problem:
                    screen = Group(Text(problem, style="bold red"), screen)
                live.update(screen, refresh=True)
            else:
                text = f"{problem}\n" if problem else status_text(document, now)
                console.file.write(text + "\n")
                console.file.flush()
            shown += 1
            if frames is not None and shown >= frames:
                return
            # A fixed schedule, so that the time a fetch takes does not add up into drift;
            # after a fetch slower than the interval the next one starts at once.
            deadline = max(deadline + interval, clock())
            sleep(max(0.0, deadline - clock()))
            try:
                document = fetch()
                problem = ""
            except errors as exc:
                when = time.strftime("%H:%M:%S", time.localtime(clock()))
                problem = f"{when}: {exc} (showing the last answer; retrying)"
    finally:
        if live is not None:
            live.stop()
