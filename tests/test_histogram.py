"""The bench histogram: percentile accuracy, exact merge, serialisation, bounded memory."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.bench.histogram import MAX_VALUE, RELATIVE_ERROR, Histogram, bucket_bounds, bucket_key

# Latency-like values in nanoseconds up to ~10 days, plus the small exact range.
values = st.integers(min_value=0, max_value=10**15)
samples = st.lists(values, min_size=1, max_size=300)
quantiles = st.one_of(
    st.sampled_from([0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0]),
    st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
)


def exact_percentile(data: list[int], q: float) -> int:
    """Nearest rank, computed independently of the module under test."""
    ordered = sorted(data)
    rank = math.ceil(Fraction(q) * len(ordered) / 100)
    return ordered[max(rank, 1) - 1]


def build(data: list[int]) -> Histogram:
    hist = Histogram()
    for value in data:
        hist.record(value)
    return hist


def test_stated_error_is_below_one_percent() -> None:
    assert RELATIVE_ERROR <= 0.01


@settings(max_examples=300, deadline=None)
@given(data=samples, q=quantiles)
def test_percentile_within_stated_relative_error(data: list[int], q: float) -> None:
    hist = build(data)
    exact = exact_percentile(data, q)
    got = hist.percentile(q)
    assert abs(got - exact) <= RELATIVE_ERROR * exact, (got, exact)
    if exact < 256:
        assert got == exact


@settings(max_examples=200, deadline=None)
@given(data=samples)
def test_exact_statistics(data: list[int]) -> None:
    hist = build(data)
    assert hist.count == len(data)
    assert hist.sum == sum(data)
    assert hist.min == min(data)
    assert hist.max == max(data)
    assert hist.mean == pytest.approx(sum(data) / len(data))
    assert hist.percentile(100) == max(data)
    assert hist.percentile(0) == min(data)


@settings(max_examples=200, deadline=None)
@given(a=st.lists(values, max_size=150), b=st.lists(values, max_size=150))
def test_merge_equals_histogram_of_union(a: list[int], b: list[int]) -> None:
    merged = build(a).merge(build(b))
    assert merged == build(a + b)
    # Merging the other way round gives the same histogram.
    assert build(b).merge(build(a)) == merged


@settings(max_examples=200, deadline=None)
@given(data=st.lists(values, max_size=200))
def test_dict_round_trip_through_json(data: list[int]) -> None:
    hist = build(data)
    again = Histogram.from_dict(json.loads(json.dumps(hist.to_dict())))
    assert again == hist
    if data:
        assert again.percentile(99.9) == hist.percentile(99.9)


@given(value=st.integers(min_value=0, max_value=MAX_VALUE))
def test_every_value_lies_in_its_bucket(value: int) -> None:
    low, high = bucket_bounds(bucket_key(value))
    assert low <= value <= high
    # A bucket is never wider than 1/128 of its smallest value, which is what bounds the error.
    assert high - low + 1 <= max(1, low * 2 * RELATIVE_ERROR)


def test_memory_is_bounded_whatever_is_recorded() -> None:
    hist = Histogram()
    # One value in every possible bucket: 0..255, then 128 buckets per power of two.
    for value in range(256):
        hist.record(value)
    for shift in range(1, 57):
        for top in range(128, 256):
            hist.record(top << shift)
    assert len(hist) == 256 + 56 * 128
    # Anything else lands in an existing bucket.
    for value in (MAX_VALUE, 10**18 + 7, 123_456_789, 2**40 + 1):
        hist.record(value)
    assert len(hist) == 256 + 56 * 128


def test_empty_histogram() -> None:
    hist = Histogram()
    assert hist.count == 0
    assert hist.mean == 0.0
    with pytest.raises(ValueError, match="empty"):
        hist.percentile(50)
    assert Histogram.from_dict(hist.to_dict()) == hist
    assert build([5]).merge(hist) == build([5])
    assert hist.merge(build([5])) == build([5])


@pytest.mark.parametrize("value", [-1, MAX_VALUE + 1])
def test_out_of_range_values_are_rejected(value: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Histogram().record(value)


def test_out_of_range_percentile_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        build([1]).percentile(100.5)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(version=99),
        lambda d: d.update(sub_bucket_bits=7),
        lambda d: d.update(count=d["count"] + 1),
        lambda d: d["buckets"].append([1, 0]),
        lambda d: d.update(min=0),
    ],
)
def test_inconsistent_dicts_are_rejected(mutate: object) -> None:
    data = build([300, 5000, 70000]).to_dict()
    assert callable(mutate)
    mutate(data)
    with pytest.raises(ValueError, match="histogram"):
        Histogram.from_dict(data)
