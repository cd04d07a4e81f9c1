"""Plain counters the data plane keeps for metrics and the status document (pure).

Theory of operation. The hot path only ever adds to integers: a session that connects bumps
one bucket of a fixed-bound histogram (one ``bisect`` and two additions), a finished session
adds its byte counts to its server. Nothing here formats, allocates per observation, or knows
about Prometheus: ``lbtcp.metrics`` and ``lbtcp.admin.status`` read these numbers when asked
(a scrape, a ``GET /status``) and turn them into text or JSON then.

Histogram buckets follow Prometheus' convention: bucket ``i`` counts observations ``<=
bounds[i]`` (``bisect_left`` finds the first bound not below the value), and one more bucket
past the last bound stands for ``+Inf``. Counts are kept per bucket, not cumulative, so an
observation touches one integer; the exposition makes them cumulative.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lbtcp.pool import Server
    from lbtcp.relay import Session

__all__ = [
    "CONNECT_BUCKETS",
    "SESSION_BUCKETS",
    "Histogram",
    "ReloadStats",
    "live_bytes",
]

# Connect time from a client's accept to its server connection being up (retries included).
# On a LAN a connect takes 0.1-1 ms; the upper bounds reach past the default connect_timeout
# (2 s) and retry_budget (5 s) so that a slow, retried connect still lands in a finite bucket.
CONNECT_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

# Session duration: from a one-message exchange (milliseconds) to a kept-open connection that
# lives until the default idle_timeout (1 h) or beyond.
SESSION_BUCKETS: tuple[float, ...] = (
    0.005,
    0.025,
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    14400.0,
)


class Histogram:
    """Fixed bucket bounds and one plain-int count per bucket (the last one is ``+Inf``)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        ordered = tuple(float(b) for b in bounds)
        if not ordered or any(b <= a for a, b in pairwise(ordered)):
            raise ValueError("histogram bounds must be a non-empty, strictly increasing sequence")
        self.bounds = ordered
        self.counts = [0] * (len(ordered) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation. Called on the hot path: one bisect, two additions."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= it)`` for every bound, then ``(inf, count)``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class ReloadStats:
    """Configuration loads, for ``config_reloads_total`` and the last-reload gauges.

    Starting counts as the first successful load (so ``last_successful`` is true and
    ``last_success_at`` is the start time) but not as a reload: ``successes`` and
    ``failures`` count reloads only. The reload code calls ``succeeded``/``failed``.
    """

    __slots__ = ("failures", "last_success_at", "last_successful", "successes")

    def __init__(self, loaded_at: float) -> None:
        self.successes = 0
        self.failures = 0
        self.last_successful = True
        self.last_success_at = loaded_at  # Unix wall-clock seconds

    def succeeded(self, at: float) -> None:
        self.successes += 1
        self.last_successful = True
        self.last_success_at = at

    def failed(self) -> None:
        self.failures += 1
        self.last_successful = False


def live_bytes(sessions: Iterable[Session]) -> dict[Server, tuple[int, int]]:
    """Bytes of the live sessions per server: ``(client -> server, server -> client)``.

    A server's own counters grow when a session ends; adding what its live sessions moved so
    far makes a long transfer visible while it runs, and keeps the sum monotonic (a finishing
    session moves its bytes from here to the server, unchanged)."""
    out: dict[Server, tuple[int, int]] = {}
    for session in sessions:
        server = session.server
        if server is None:
            continue
        sent, received = out.get(server, (0, 0))
        out[server] = (sent + session.bytes_from_client, received + session.bytes_to_client)
    return out
