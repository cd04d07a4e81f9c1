"""Config keys of the PROXY protocol and the per-source rate limit, and the rate limiter."""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import ConfigError, parse_config
from lbtcp.ratelimit import MAX_SOURCES, PERIOD, RateLimiter


def minimal(listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None) -> Any:
    return {
        "listeners": {"web": {"bind": "127.0.0.1:8080", "pool": "app", **(listener or {})}},
        "pools": {"app": {"servers": [{"address": "127.0.0.1:9000"}], **(pool or {})}},
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_defaults() -> None:
    config = parse_config(minimal(pool={"health": {}}))
    listener = config.listeners["web"]
    assert listener.proxy_protocol == "off"
    assert listener.proxy_protocol_from == ()
    assert listener.proxy_protocol_timeout == 3.0
    assert listener.max_rate_per_source == 0
    assert config.pools["app"].proxy_protocol == "off"
    health = config.pools["app"].health
    assert health is not None and health.send_proxy is False


def test_accepted_values() -> None:
    config = parse_config(
        minimal(
            {
                "proxy_protocol": "any",
                "proxy_protocol_from": ["10.0.0.0/8", "::1"],
                "proxy_protocol_timeout": "250ms",
                "max_rate_per_source": 50,
            },
            {"proxy_protocol": "v2", "health": {"send_proxy": True}},
        )
    )
    listener = config.listeners["web"]
    assert (listener.proxy_protocol, listener.proxy_protocol_timeout) == ("any", 0.25)
    assert [str(n) for n in listener.proxy_protocol_from] == ["10.0.0.0/8", "::1/128"]
    assert listener.max_rate_per_source == 50
    assert config.pools["app"].proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("listener", "pool", "message"),
    [
        ({"proxy_protocol": "v1"}, {}, "listeners.web.proxy_protocol_from: is required"),
        ({"proxy_protocol": "v3"}, {}, "listeners.web.proxy_protocol: 'v3' is not one of"),
        (
            {"proxy_protocol": "v2", "proxy_protocol_from": ["10.0.0.300/8"]},
            {},
            "listeners.web.proxy_protocol_from[0]: '10.0.0.300/8' is not a CIDR",
        ),
        (
            {"proxy_protocol_timeout": "0s"},
            {},
            "listeners.web.proxy_protocol_timeout: must be more than 0",
        ),
        (
            {"proxy_protocol_timeout": "soon"},
            {},
            "listeners.web.proxy_protocol_timeout: 'soon' is not a dur",
        ),
        ({"max_rate_per_source": -1}, {}, "listeners.web.max_rate_per_source: -1 is out of range"),
        (
            {"max_rate_per_source": 1.5},
            {},
            "listeners.web.max_rate_per_source: expected a whole number",
        ),
        ({}, {"proxy_protocol": "any"}, "pools.app.proxy_protocol: 'any' is not one of"),
        ({}, {"health": {"send_proxy": True}}, "pools.app.health.send_proxy: needs the pool's"),
        ({}, {"health": {"send_proxy": "yes"}}, "pools.app.health.send_proxy: expected true"),
    ],
)
def test_errors_name_their_key(
    listener: dict[str, Any], pool: dict[str, Any], message: str
) -> None:
    errors = errors_of(minimal(listener, pool))
    assert any(error.startswith(message) for error in errors), errors


# --- the rate limiter (pure, virtual time) -----------------------------------------------


def test_fifty_per_second_of_two_hundred() -> None:
    limiter = RateLimiter(50)
    admitted = sum(limiter.admit("10.0.0.1", i / 200) for i in range(200))
    assert admitted == 50
    # Another source at the same moments is unaffected.
    assert all(limiter.admit("10.0.0.2", 0.99) for _ in range(50))
    assert not limiter.admit("10.0.0.2", 0.99)


def test_refused_attempts_count_and_the_window_slides() -> None:
    limiter = RateLimiter(10)
    assert sum(limiter.admit("a", 0.0) for _ in range(30)) == 10
    # Half a period on, half of the 30 attempts are still inside the window: refused.
    assert not limiter.admit("a", 1.5)
    # Two periods after the burst, nothing of it is left.
    assert sum(limiter.admit("a", 3.0) for _ in range(12)) == 10


@settings(max_examples=200, deadline=None)
@given(
    limit=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 0.5, allow_nan=False), min_size=1, max_size=200),
)
def test_admitted_within_any_one_second_window_is_bounded(limit: int, gaps: list[float]) -> None:
    # The sliding window admits at most limit + (what the previous period's weight lets
    # through) in any one-second span: never more than twice the limit, and the rate it
    # reports never exceeds the limit right after an admission.
    limiter = RateLimiter(limit)
    now = 0.0
    admitted: list[float] = []
    for gap in gaps:
        now += gap
        if limiter.admit("x", now):
            admitted.append(now)
            assert limiter.rate("x", now) <= limit + 1e-9
    for index, start in enumerate(admitted):
        inside = [t for t in admitted[index:] if t < start + PERIOD]
        assert len(inside) <= 2 * limit


def test_memory_is_bounded_for_a_flood_of_distinct_sources() -> None:
    limiter = RateLimiter(5)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(100_000):
            # 10^5 distinct addresses within 0.1 s: none expires, the cap must hold.
            ip = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
            limiter.admit(ip, i * 1e-6)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(limiter) <= MAX_SOURCES
    # The documented bound: about 250 bytes per tracked source, 16 MiB at the cap.
    assert used <= 16 * 1024 * 1024, used
    # The newest sources are the ones kept (the oldest were evicted first).
    assert "10.1.134.159" in limiter.sources  # i = 99_999
    assert "10.0.0.0" not in limiter.sources


def test_expired_sources_are_dropped() -> None:
    limiter = RateLimiter(5)
    for i in range(1000):
        limiter.admit(f"192.0.2.{i % 250}.{i}", 0.0)
    for i in range(1000):
        limiter.admit(f"198.51.100.{i}", 10.0 + i * 1e-4)
    # Each new source dropped up to a few expired ones: the old thousand are gone.
    assert len(limiter) == 1000
    assert all(key.startswith("198.51.100.") for key in limiter.sources)
