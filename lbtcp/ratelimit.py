"""New connections per second per client IP, over a sliding one-second window (pure).

Theory of operation. Each tracked source keeps two counts: connections in the current
one-second period and in the one before, as HAProxy's ``freq_ctr`` does. The rate at time
``now`` is ``current + previous * (the share of the previous period still inside the window
[now - 1 s, now])``: a sliding window in O(1) memory per source, without a list of times.
Every connection attempt counts, admitted or refused (HAProxy's ``conn_rate``), so a client
that keeps hammering stays refused rather than getting a slot each time the window slides.

Memory is bounded twice over. Sources are kept in least-recently-seen order (a dict moved to
the end on each connection); entries untouched for two periods count nothing any more and are
dropped from the front as new ones arrive (expiry); and at most ``max_sources`` are kept: a
flood of distinct addresses evicts the least recently seen source first (its count restarts
at zero if it comes back, the price of a hard bound). Each entry is a key string and a
three-item list, about 250 bytes with the dict slot, so the default cap of 65,536 sources
bounds the tracker near 16 MiB however many addresses are seen.
"""

from __future__ import annotations

PERIOD = 1.0
MAX_SOURCES = 65536

# How many stale entries one call may drop from the front: amortised, never a long pause.
_EXPIRE_STEP = 4


class RateLimiter:
    """``admit(ip, now)`` -> whether one more connection from ``ip`` stays within the limit."""

    __slots__ = ("limit", "max_sources", "sources")

    def __init__(self, limit: int, max_sources: int = MAX_SOURCES) -> None:
        if limit < 1 or max_sources < 1:
            raise ValueError("limit and max_sources must be at least 1")
        self.limit = limit
        self.max_sources = max_sources
        # ip -> [period_start, count_in_current_period, count_in_previous_period]
        self.sources: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self.sources)

    def rate(self, ip: str, now: float) -> float:
        """The sliding-window rate of ``ip`` at ``now`` (connections in the last second)."""
        entry = self.sources.get(ip)
        if entry is None:
            return 0.0
        start, current, previous = entry
        elapsed = now - start
        if elapsed >= 2 * PERIOD:
            return 0.0
        if elapsed >= PERIOD:
            previous, current, elapsed = current, 0.0, elapsed - PERIOD
        return current + previous * max(0.0, PERIOD - elapsed) / PERIOD

    def admit(self, ip: str, now: float) -> bool:
        """Count one new connection from ``ip`` at ``now``; False if it is over the limit.

        ``now`` must not go backwards by more than rounding (it comes from ``loop.time()``).
        """
        sources = self.sources
        entry = sources.pop(ip, None)
        if entry is None:
            self._make_room(now)
            entry = [now, 0.0, 0.0]
        else:
            elapsed = now - entry[0]
            if elapsed >= 2 * PERIOD:
                entry[0], entry[1], entry[2] = now, 0.0, 0.0
            elif elapsed >= PERIOD:
                # One period on: the current count becomes the previous one. Periods start
                # on a grid from the first sight of the source, so the weights stay exact.
                entry[0], entry[1], entry[2] = entry[0] + PERIOD, 0.0, entry[1]
        sources[ip] = entry  # re-inserted: the dict's order is least recently seen first
        entry[1] += 1.0
        start, current, previous = entry
        weight = max(0.0, PERIOD - (now - start)) / PERIOD
        return current + previous * weight <= self.limit

    def _make_room(self, now: float) -> None:
        sources = self.sources
        for _ in range(_EXPIRE_STEP):
            if not sources:
                return
            oldest = next(iter(sources))
            if now - sources[oldest][0] < 2 * PERIOD and len(sources) < self.max_sources:
                return
            del sources[oldest]  # expired, or evicted to keep the bound
