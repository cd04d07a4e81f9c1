"""The framed message format between the parent (control plane) and its workers (pure).

Theory of operation. Each direction of a worker's socketpair carries frames::

    +----------------+---------+------+-------------------+
    | length: u32 BE | version | type | payload (length)  |
    +----------------+---------+------+-------------------+

``length`` counts the payload only. A frame whose version or type is unknown is skipped whole
(its length is known, so the stream stays in step) and reported; a frame longer than
``MAX_PAYLOAD`` is refused from its header alone: its bytes are counted off as they arrive and
never buffered, so a bad length cannot make either side allocate it. Payloads are UTF-8 JSON,
except ``HELLO`` (parent to worker only: the validated ``Config`` as a pickle, because the
worker must run exactly what the parent validated and planned, not re-read a file that may have
changed since; a worker only ever reads it from the socketpair its own parent made).

Nothing here does I/O: ``FrameDecoder.feed`` takes bytes and returns frames and errors, and
``encode`` returns bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
from typing import Any

VERSION = 1
HEADER = struct.Struct("!IBB")
# Far above any real message (a verdict snapshot of a 1,000-server pool is ~100 KB), far below
# anything that would hurt to hold.
MAX_PAYLOAD = 16 * 1024 * 1024


class Kind(enum.IntEnum):
    """Message types. Parent to worker below 16, worker to parent from 16."""

    HELLO = 1  # pickle: config, slot, generation, the listening sockets' fd numbers
    VERDICTS = 2  # {pool: [[server, host, port, weight, backup, max_conn, eligible, ...]]}
    CLOSE_SERVER = 3  # {"pool", "server"}: on_server_down = "close" fired
    RETIRE = 4  # {}: a reload replaced this worker: stop accepting, exit once sessions end
    STATS_REQUEST = 5  # {}: send STATS now (before a scrape)
    READY = 16  # {"pid"}: listening
    RESULTS = 17  # [[pool, server, ok, kind, count], ...]: real connect results, in order
    STATS = 18  # counters snapshot (absolute values)
    DRAINING = 19  # {"sessions"}: stopped accepting (SIGTERM or RETIRE), draining these


KINDS = frozenset(int(k) for k in Kind)


class IpcError(ValueError):
    """A frame or payload that cannot be used (logged and dropped by the caller)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    payload: bytes


def encode_raw(kind: Kind, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise IpcError(f"{kind.name} payload of {len(payload)} bytes is over {MAX_PAYLOAD}")
    return HEADER.pack(len(payload), VERSION, int(kind)) + payload


def encode(kind: Kind, message: Any) -> bytes:
    """One frame with ``message`` as compact JSON."""
    return encode_raw(kind, json.dumps(message, separators=(",", ":")).encode())


def decode_json(frame: Frame) -> Any:
    """The JSON payload of ``frame``; IpcError if it is not UTF-8 JSON."""
    try:
        return json.loads(frame.payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise IpcError(f"{frame.kind.name}: payload is not JSON: {exc}") from None


class FrameDecoder:
    """Reassembles frames from a byte stream fed in pieces of any size."""

    __slots__ = ("_buffer", "_skip", "errors_total", "max_payload")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buffer = bytearray()
        self._skip = 0  # bytes of a refused (oversized) frame still to discard
        self.max_payload = max_payload
        self.errors_total = 0

    def feed(self, data: bytes) -> tuple[list[Frame], list[str]]:
        """The whole frames ``data`` completes, and a description of each frame dropped."""
        frames: list[Frame] = []
        errors: list[str] = []
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            view = view[taken:]
        buffer = self._buffer
        while view:
            buffer += view
            view = memoryview(b"")
            while len(buffer) >= HEADER.size:
                length, version, kind = HEADER.unpack_from(buffer)
                if length > self.max_payload:
                    errors.append(f"frame of {length} bytes refused (over {self.max_payload})")
                    available = len(buffer) - HEADER.size
                    taken = min(length, available)
                    del buffer[: HEADER.size + taken]
                    self._skip = length - taken
                    if self._skip:
                        break
                    continue
                end = HEADER.size + length
                if len(buffer) < end:
                    break
                payload = bytes(buffer[HEADER.size : end])
                del buffer[:end]
                if version != VERSION:
                    errors.append(f"frame of version {version} dropped (expected {VERSION})")
                elif kind not in KINDS:
                    errors.append(f"frame of unknown type {kind} dropped")
                else:
                    frames.append(Frame(Kind(kind), payload))
            if self._skip:
                # An oversized frame ate the rest of the buffer; what follows in ``data`` was
                # already handled: nothing is left in view.
                break
        self.errors_total += len(errors)
        return frames, errors

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a stream that ends here ended mid-frame)."""
        return len(self._buffer) + self._skip


def merge_result(batch: list[list[Any]], pool: str, server: str, ok: bool, kind: str) -> None:
    """Append one connect result to ``batch``, folding it into the last entry when that is the
    same result for the same server (order matters for consecutive failures; a run of equal
    results does not), so that a busy worker's batch stays a few entries long."""
    if batch:
        last = batch[-1]
        if last[0] == pool and last[1] == server and last[2] is ok and last[3] == kind:
            last[4] += 1
            return
    batch.append([pool, server, ok, kind, 1])


def check_results(message: Any) -> list[tuple[str, str, bool, str, int]]:
    """A RESULTS payload, validated: IpcError on any entry of the wrong shape."""
    if not isinstance(message, list):
        raise IpcError("RESULTS: not a list")
    out = []
    for entry in message:
        if (
            not isinstance(entry, list)
            or len(entry) != 5
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], str)
            or not isinstance(entry[2], bool)
            or entry[3] not in ("", "refused", "timeout", "other")
            or not isinstance(entry[4], int)
            or isinstance(entry[4], bool)
            or not 1 <= entry[4] <= 1_000_000
        ):
            raise IpcError(f"RESULTS: bad entry {entry!r:.80}")
        out.append((entry[0], entry[1], entry[2], entry[3], entry[4]))
    return out


# STATS layout: key -> list of numbers, summed position by position over workers. Keys (parts
# joined by U+001F): ("L", listener) -> [connections, active, refused by REFUSAL_REASONS...,
# session seconds sum, session histogram counts...]; ("C", pool) -> [connect seconds sum,
# counts...]; ("S", pool, server) -> [active, total, bytes sent, bytes received, refused,
# timeouts, other, failures]; "W" -> [connect results dropped]. Positions that are gauges
# (live sessions) are listed in ACTIVE_POSITIONS: a worker that exited contributes 0 there.
ACTIVE_POSITIONS = {"L": (1,), "S": (0,)}


def check_stats(message: Any) -> dict[str, list[float]]:
    """A STATS payload, validated: IpcError unless it is {str: [numbers]}."""
    if not isinstance(message, dict):
        raise IpcError("STATS: not an object")
    for key, values in message.items():
        if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise IpcError(f"STATS: bad value for {key!r:.60}")
    return message


def merge_stats(
    total: dict[str, list[float]], snapshot: dict[str, list[float]], *, live: bool = True
) -> None:
    """Add ``snapshot`` into ``total`` (in place). ``live=False`` (a worker that exited)
    leaves its gauges out. A key whose length differs from the total's is skipped (a worker
    of another version; never a crash)."""
    for key, values in snapshot.items():
        into = total.get(key)
        if into is None:
            into = total[key] = [0] * len(values)
        elif len(into) != len(values):
            continue
        gauges = () if live else ACTIVE_POSITIONS.get(key.partition("\x1f")[0], ())
        for index, value in enumerate(values):
            if index not in gauges:
                into[index] += value
