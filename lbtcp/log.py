"""Event lines and the access log, as text or JSON lines on stderr.

Event lines (start, stop, state changes, ...) are written at once. Access-log lines, one per
finished session, are batched and written by a timer at most every 50 ms so that a busy
listener does not make one ``write`` system call per session.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import IO, Any

ACCESS_FLUSH_DELAY = 0.05
ACCESS_BATCH_MAX = 256


def _timestamp(now: float) -> str:
    seconds = int(now)
    millis = int((now - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _text_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class Log:
    """Formats and writes log lines. ``schedule`` (``loop.call_later``) enables batching."""

    def __init__(
        self,
        log_format: str = "text",
        access_log: bool = True,
        stream: IO[str] | None = None,
    ) -> None:
        self.json = log_format == "json"
        self.access_enabled = access_log
        self.stream = stream if stream is not None else sys.stderr
        self._pending: list[str] = []
        self._schedule: Callable[[float, Callable[[], None]], Any] | None = None
        self._flush_scheduled = False

    def use_timer(self, schedule: Callable[[float, Callable[[], None]], Any] | None) -> None:
        """Batch access lines with this ``call_later``; None writes each line at once."""
        self.flush()
        self._schedule = schedule

    def _format(self, kind: str, fields: dict[str, object]) -> str:
        now = time.time()
        if self.json:
            record: dict[str, object] = {"time": _timestamp(now), "kind": kind}
            record.update(fields)
            return json.dumps(record, default=str) + "\n"
        parts = [_timestamp(now), kind]
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        return " ".join(parts) + "\n"

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            # A closed or broken stderr must never take the data plane down.
            pass

    def event(self, kind: str, message: str = "", **fields: object) -> None:
        """An event line such as ``start``, ``stop`` or ``server_state``."""
        if message:
            fields = {"msg": message, **fields}
        self.flush()
        self._write(self._format(kind, fields))

    def access(self, **fields: object) -> None:
        """One finished session (see DESIGN.md §6 for the fields)."""
        if not self.access_enabled:
            return
        self._pending.append(self._format("access", fields))
        if self._schedule is None or len(self._pending) >= ACCESS_BATCH_MAX:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._schedule(ACCESS_FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._write(text)
