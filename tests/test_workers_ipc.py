"""The parent/worker frame codec (lbtcp.workers.ipc): round trips, and bad input of every
kind dropped with a reason, never a crash and never an allocation of an oversized frame."""

from __future__ import annotations

import contextlib
import itertools
import json
import struct
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lbtcp.workers.ipc import (
    HEADER,
    MAX_PAYLOAD,
    VERSION,
    FrameDecoder,
    IpcError,
    Kind,
    check_results,
    check_stats,
    decode_json,
    encode,
    encode_raw,
    merge_result,
    merge_stats,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
messages = st.tuples(st.sampled_from(list(Kind)), json_values)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def feed_all(decoder: FrameDecoder, pieces: list[bytes]) -> tuple[list[Any], list[str]]:
    frames: list[Any] = []
    errors: list[str] = []
    for piece in pieces:
        got, bad = decoder.feed(piece)
        frames += got
        errors += bad
    return frames, errors


@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_round_trip_whatever_the_split(sent: list[tuple[Kind, Any]], cuts: list[int]) -> None:
    stream = b"".join(encode(kind, message) for kind, message in sent)
    frames, errors = feed_all(FrameDecoder(), split(stream, cuts))
    assert errors == []
    assert [(f.kind, decode_json(f)) for f in frames] == sent


@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=8))
@settings(max_examples=300)
def test_random_bytes_never_crash_the_decoder(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_payload=512)
    frames, errors = feed_all(decoder, split(data, cuts))
    for frame in frames:
        assert frame.kind in set(Kind)
        assert len(frame.payload) <= 512
        with contextlib.suppress(IpcError):  # bytes that are a frame but not JSON
            decode_json(frame)
    assert decoder.errors_total == len(errors)


@given(st.lists(messages, min_size=1, max_size=5), st.integers(1, 200))
# A cut exactly on a frame boundary (found by hypothesis): nothing is pending then.
@example(
    sent=[(Kind.READY, {"pid": 1}), (Kind.READY, {"pid": 2})],
    cut=len(encode(Kind.READY, {"pid": 2})),
)
def test_a_truncated_stream_yields_only_whole_frames(
    sent: list[tuple[Kind, Any]], cut: int
) -> None:
    encoded = [encode(kind, message) for kind, message in sent]
    stream = b"".join(encoded)
    cut = min(cut, len(stream) - 1)
    kept = len(stream) - cut
    # Where whole frames end: a cut that lands exactly on one leaves nothing pending.
    ends = list(itertools.accumulate(len(frame) for frame in encoded))
    whole = sum(1 for end in ends if end <= kept)
    decoder = FrameDecoder()
    frames, errors = decoder.feed(stream[:kept])
    assert errors == []
    assert [(f.kind, decode_json(f)) for f in frames] == sent[:whole]
    assert len(frames) < len(sent)
    if kept in ends:
        assert decoder.pending == 0
    else:
        assert decoder.pending > 0  # the channel reports "went away in the middle of a message"


def test_oversized_frame_is_refused_from_its_header_and_the_stream_stays_in_step() -> None:
    decoder = FrameDecoder(max_payload=1000)
    huge = HEADER.pack(10_000, VERSION, int(Kind.STATS))
    frames, errors = decoder.feed(huge + b"x" * 3000)
    assert frames == []
    assert errors == ["frame of 10000 bytes refused (over 1000)"]
    # Nothing of it is held: the rest is counted off as it arrives.
    assert len(decoder._buffer) == 0
    frames, errors = decoder.feed(b"y" * 7000 + encode(Kind.READY, {"pid": 7}))
    assert errors == []
    assert [(f.kind, decode_json(f)) for f in frames] == [(Kind.READY, {"pid": 7})]


def test_a_length_of_four_gigabytes_allocates_nothing() -> None:
    decoder = FrameDecoder()
    frames, errors = decoder.feed(HEADER.pack(2**32 - 1, VERSION, int(Kind.STATS)) + b"ab")
    assert frames == []
    assert "refused" in errors[0]
    assert len(decoder._buffer) == 0


def test_unknown_version_and_type_are_dropped_whole() -> None:
    decoder = FrameDecoder()
    bad_version = struct.pack("!IBB", 2, VERSION + 1, int(Kind.STATS)) + b"{}"
    bad_type = struct.pack("!IBB", 2, VERSION, 99) + b"{}"
    frames, errors = decoder.feed(bad_version + bad_type + encode(Kind.STATS, {}))
    assert [f.kind for f in frames] == [Kind.STATS]
    assert errors == [
        f"frame of version {VERSION + 1} dropped (expected {VERSION})",
        "frame of unknown type 99 dropped",
    ]


def test_encode_refuses_an_oversized_payload() -> None:
    with pytest.raises(IpcError):
        encode_raw(Kind.STATS, b"x" * (MAX_PAYLOAD + 1))


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(["s1", "s2"]),
            st.booleans(),
            st.sampled_from(["refused", "timeout", "other"]),
        ),
        max_size=40,
    )
)
def test_merged_results_replay_to_the_same_sequence(
    results: list[tuple[str, str, bool, str]],
) -> None:
    batch: list[list[Any]] = []
    for pool, server, ok, kind in results:
        merge_result(batch, pool, server, ok, "" if ok else kind)
    replay = [
        (pool, server, ok, kind or "")
        for pool, server, ok, kind, count in check_results(json.loads(json.dumps(batch)))
        for _ in range(count)
    ]
    assert replay == [(p, s, ok, "" if ok else k) for p, s, ok, k in results]


@pytest.mark.parametrize(
    "payload",
    [
        {},
        [["a", "b", True, "", 0]],
        [["a", "b", "yes", "", 1]],
        [["a", "b", False, "exploded", 1]],
        [["a", "b", False, "refused"]],
        [["a", 1, False, "refused", 1]],
        [["a", "b", False, "refused", True]],
    ],
)
def test_bad_results_are_refused(payload: Any) -> None:
    with pytest.raises(IpcError):
        check_results(payload)


@given(json_values)
def test_check_stats_accepts_only_lists_of_numbers(value: Any) -> None:
    try:
        stats = check_stats(value)
    except IpcError:
        return
    assert isinstance(stats, dict)
    total: dict[str, list[float]] = {}
    merge_stats(total, stats)
    merge_stats(total, stats)
    assert all(total[k] == [2 * v for v in stats[k]] for k in stats)


def test_an_exited_workers_gauges_are_left_out_and_its_counters_kept() -> None:
    total: dict[str, list[float]] = {}
    merge_stats(total, {"L\x1fweb": [10, 3, 0], "S\x1fapp\x1fs": [2, 7, 100]})
    merge_stats(total, {"L\x1fweb": [5, 4, 1], "S\x1fapp\x1fs": [4, 5, 50]}, live=False)
    assert total == {"L\x1fweb": [15, 3, 1], "S\x1fapp\x1fs": [2, 12, 150]}
    merge_stats(total, {"L\x1fweb": [1, 2]})  # another layout: skipped, not a crash
    assert total["L\x1fweb"] == [15, 3, 1]
