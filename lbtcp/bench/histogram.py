"""A log-bucketed, mergeable latency histogram (pure: no I/O, no clocks).

Theory of operation (the HdrHistogram layout with 8 significant bits): a non-negative integer
``v`` below 256 gets a bucket of its own. A larger ``v`` with ``b = v.bit_length()`` is shifted
right by ``s = b - 8`` bits, keeping its top 8 bits ``m`` (128 <= m < 256); the bucket is
``(s, m)`` and holds the ``2**s`` values ``[m << s, (m + 1) << s)``. A bucket is therefore never
wider than 1/128 of the values in it, and reporting its midpoint is off by at most half that.

Guarantees:

* ``percentile(q)`` returns a value within ``RELATIVE_ERROR`` = 1/256 (about 0.39 %) of the
  exact nearest-rank percentile of the recorded values, relative to that exact value; values
  below 256, the smallest and the largest are reported exactly. ``min``, ``max``, ``count``,
  ``sum`` and ``mean`` are exact.
* Memory is bounded whatever is recorded: 256 buckets below 256, then 128 per power of two,
  so at most ``256 + 56 * 128`` = 7,424 buckets for values below ``2**64``, and in practice a
  few hundred (the buckets are a sparse dict).
* ``merge`` is exact: merging the histograms of two sample sets gives the histogram of their
  union, so per-process histograms can be combined; ``to_dict``/``from_dict`` round-trip
  through JSON or pickle.

The histogram is unit-agnostic; the load generator records nanoseconds, so network latencies
(microseconds and up) are always in the range where the relative bound applies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

SUB_BUCKET_BITS = 8
RELATIVE_ERROR = 2.0**-SUB_BUCKET_BITS
MAX_VALUE = 2**64 - 1
MAX_BUCKETS = 256 + (64 - SUB_BUCKET_BITS) * 128
_FORMAT_VERSION = 1
_MASK = (1 << SUB_BUCKET_BITS) - 1


def bucket_key(value: int) -> int:
    """The bucket of ``value``: the value itself below 256, else ``(s << 8) | top_8_bits``."""
    shift = value.bit_length() - SUB_BUCKET_BITS
    if shift <= 0:
        return value
    return (shift << SUB_BUCKET_BITS) | (value >> shift)


def bucket_bounds(key: int) -> tuple[int, int]:
    """The smallest and largest value (inclusive) that fall into bucket ``key``."""
    shift = key >> SUB_BUCKET_BITS
    if shift == 0:
        return key, key
    top = key & _MASK
    return top << shift, ((top + 1) << shift) - 1


def nearest_rank(q: float, count: int) -> int:
    """The 1-based nearest rank of percentile ``q`` (0..100) among ``count`` values."""
    # Fraction makes the rank exact: 99.9 * 1000 / 100 in floats can land just above 999.
    return max(1, math.ceil(Fraction(q) * count / 100))


class Histogram:
    """Counts of non-negative integers in log buckets; see the module docstring."""

    __slots__ = ("_buckets", "_count", "_max", "_min", "_sum")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._count = 0
        self._sum = 0
        self._min = 0
        self._max = 0

    def record(self, value: int) -> None:
        """Add one observation. Raises ValueError for a negative or too large value."""
        if value < 0 or value > MAX_VALUE:
            raise ValueError(f"histogram value {value} is outside 0..2**64-1")
        shift = value.bit_length() - SUB_BUCKET_BITS
        key = value if shift <= 0 else (shift << SUB_BUCKET_BITS) | (value >> shift)
        buckets = self._buckets
        buckets[key] = buckets.get(key, 0) + 1
        if self._count == 0:
            self._min = self._max = value
        elif value < self._min:
            self._min = value
        elif value > self._max:
            self._max = value
        self._count += 1
        self._sum += value

    def merge(self, other: Histogram) -> Histogram:
        """Add every observation of ``other`` to this histogram; returns ``self``."""
        if other._count == 0:
            return self
        buckets = self._buckets
        for key, n in other._buckets.items():
            buckets[key] = buckets.get(key, 0) + n
        if self._count == 0:
            self._min, self._max = other._min, other._max
        else:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)
        self._count += other._count
        self._sum += other._sum
        return self

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return self._count

    @property
    def sum(self) -> int:
        """The exact sum of the recorded values."""
        return self._sum

    @property
    def min(self) -> int:
        """The smallest recorded value (0 when empty)."""
        return self._min

    @property
    def max(self) -> int:
        """The largest recorded value (0 when empty)."""
        return self._max

    @property
    def mean(self) -> float:
        """The exact mean (0.0 when empty)."""
        return self._sum / self._count if self._count else 0.0

    def __len__(self) -> int:
        return len(self._buckets)

    def percentile(self, q: float) -> int:
        """The nearest-rank ``q``-th percentile (``q`` in 0..100), within RELATIVE_ERROR.

        Raises ValueError when the histogram is empty or ``q`` is out of range.
        """
        if not 0 <= q <= 100:
            raise ValueError(f"percentile {q} is outside 0..100")
        if self._count == 0:
            raise ValueError("percentile of an empty histogram")
        rank = nearest_rank(q, self._count)
        if rank == self._count:
            return self._max  # the extremes are known exactly
        if rank == 1:
            return self._min
        seen = 0
        for key in sorted(self._buckets):
            seen += self._buckets[key]
            if seen >= rank:
                low, high = bucket_bounds(key)
                # The midpoint halves the error; clamping to the exact extremes can only move it
                # closer to the true value, which lies in both the bucket and [min, max].
                return min(max((low + high) // 2, self._min), self._max)
        raise AssertionError("bucket counts do not add up to count")  # pragma: no cover

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Histogram):
            return NotImplemented
        return (
            self._buckets == other._buckets
            and self._count == other._count
            and self._sum == other._sum
            and self._min == other._min
            and self._max == other._max
        )

    def __repr__(self) -> str:
        return f"Histogram(count={self._count}, min={self._min}, max={self._max})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and pickle-friendly form; ``from_dict`` reverses it."""
        return {
            "version": _FORMAT_VERSION,
            "sub_bucket_bits": SUB_BUCKET_BITS,
            "count": self._count,
            "sum": self._sum,
            "min": self._min,
            "max": self._max,
            "buckets": [[key, n] for key, n in sorted(self._buckets.items())],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        """Rebuild a histogram from ``to_dict`` output; ValueError if it is inconsistent."""
        if data.get("version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported histogram format version {data.get('version')!r}")
        if data.get("sub_bucket_bits") != SUB_BUCKET_BITS:
            raise ValueError("histogram was written with a different bucket precision")
        hist = cls()
        total = 0
        for item in data["buckets"]:
            key, n = int(item[0]), int(item[1])
            if key < 0 or n <= 0 or key in hist._buckets:
                raise ValueError(f"bad histogram bucket {item!r}")
            hist._buckets[key] = n
            total += n
        hist._count = int(data["count"])
        hist._sum = int(data["sum"])
        hist._min = int(data["min"])
        hist._max = int(data["max"])
        if total != hist._count:
            raise ValueError("histogram bucket counts do not add up to its count")
        if hist._count and not (
            bucket_key(hist._min) == min(hist._buckets)
            and bucket_key(hist._max) == max(hist._buckets)
        ):
            raise ValueError("histogram min/max do not match its buckets")
        return hist
