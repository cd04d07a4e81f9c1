"""Config parsing: every malformed input gives a clear ConfigError naming its key path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.addresses import AddressError, parse_cidr, parse_endpoint
from lbtcp.config import ConfigError, load_config, parse_config, parse_duration

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples").glob("*.toml"))


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listeners": {"web": {"bind": "127.0.0.1:8080", "pool": "app"}},
        "pools": {"app": {"servers": [{"address": "127.0.0.1:9000"}]}},
    }
    data.update(overrides)
    return data


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_minimal_config_gets_documented_defaults() -> None:
    config = parse_config(minimal())
    listener = config.listeners["web"]
    pool = config.pools["app"]
    assert listener.bind == ("127.0.0.1:8080",)
    assert (listener.no_healthy, listener.idle_timeout, listener.backlog) == ("close", 3600.0, 4096)
    assert (pool.balance, pool.retries, pool.connect_timeout, pool.retry_budget) == (
        "round_robin",
        2,
        2.0,
        5.0,
    )
    assert config.global_.drain_timeout == 30.0
    assert pool.servers[0].display_name == "127.0.0.1:9000"


def test_the_issue_example_message() -> None:
    data = minimal()
    data["pools"]["app"]["servers"] = [{"address": "127.0.0.1:1"}, {"address": "10.0.0.1"}]
    assert errors_of(data) == ["pools.app.servers[1].address: '10.0.0.1' has no port"]


def test_every_error_is_listed_at_once() -> None:
    data = minimal(global_={})
    data["global"] = {"workerz": 2, "log_format": "xml"}
    data["listeners"]["web"]["pool"] = "missing"
    data["listeners"]["web"]["deny"] = ["10.0.0.0/33"]
    data["pools"]["app"]["servers"].append({"address": "127.0.0.1:9001", "weight": -1})
    data["pools"]["app"]["retriez"] = 1
    data.pop("global_")
    errors = errors_of(data)
    assert "global.workerz: unknown key" in errors
    assert any(e.startswith("global.log_format: 'xml' is not one of") for e in errors)
    assert any(e.startswith("listeners.web.pool: no pool named 'missing'") for e in errors)
    assert any(e.startswith("listeners.web.deny[0]: '10.0.0.0/33'") for e in errors)
    assert any(e.startswith("pools.app.servers[1].weight: -1 is out of range") for e in errors)
    assert "pools.app.retriez: unknown key" in errors
    assert len(errors) == 6


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("workers", 257, "257 is out of range (1..256)"),
        ("workers", 0, "0 is out of range (1..256)"),
        ("workers", "many", "is neither a number of workers (1..256) nor 'auto'"),
        ("drain_timeout", "5 parsecs", "is not a duration"),
        ("access_log", "yes", "expected true or false"),
    ],
)
def test_global_values(key: str, value: object, message: str) -> None:
    errors = errors_of(minimal(**{"global": {key: value}}))
    assert len(errors) == 1
    assert errors[0].startswith(f"global.{key}: ")
    assert message in errors[0]


def test_workers_count_and_auto() -> None:
    assert parse_config(minimal(**{"global": {"workers": 4}})).global_.workers == 4
    auto = parse_config(minimal(**{"global": {"workers": "auto"}})).global_.workers
    assert auto == min(256, len(os.sched_getaffinity(0)))


def test_duplicate_server_names_and_banner_without_text() -> None:
    data = minimal()
    data["pools"]["app"]["servers"] = [
        {"address": "127.0.0.1:1", "name": "a"},
        {"address": "127.0.0.1:2", "name": "a"},
    ]
    data["listeners"]["web"]["no_healthy"] = "banner"
    errors = errors_of(data)
    assert any("pools.app.servers[1]: the name 'a' is already used" in e for e in errors)
    assert "listeners.web.no_healthy_banner: is empty but no_healthy = 'banner'" in errors


def test_banner_bytes_keep_crlf() -> None:
    data = minimal()
    data["listeners"]["web"].update(no_healthy="banner", no_healthy_banner="503\r\n\u00ff")
    assert parse_config(data).listeners["web"].no_healthy_banner == b"503\r\n\xff"


@given(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from(["ms", "s", "m", "h", ""]),
)
def test_duration_units(number: float, unit: str) -> None:
    text = f"{number:.3f}{unit}"
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "": 1}[unit]
    assert parse_duration(text) == pytest.approx(float(f"{number:.3f}") * scale)


@given(st.text(max_size=30))
def test_endpoint_parser_never_crashes(text: str) -> None:
    try:
        endpoint = parse_endpoint(text)
    except AddressError as exc:
        assert str(exc)
    else:
        assert 0 <= endpoint.port <= 65535
        assert parse_endpoint(str(endpoint)) == endpoint  # round trip


@given(st.text(max_size=30))
def test_cidr_parser_never_crashes(text: str) -> None:
    try:
        parse_cidr(text)
    except AddressError as exc:
        assert str(exc)


# Arbitrary TOML-shaped values, dropped anywhere in an otherwise valid config.
toml_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["1s", "10.0.0.1:80", "[::1]:1", "round_robin", "0"]),
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEY_PATHS = [
    ("global",),
    ("admin",),
    ("resolver",),
    ("listeners", "web"),
    ("pools", "app"),
    ("pools", "app", "servers", 0),
    ("pools", "app", "health"),
    ("pools", "app", "ejection"),
]
KNOWN_KEYS = [
    "workers",
    "bind",
    "pool",
    "allow",
    "deny",
    "address",
    "weight",
    "balance",
    "retries",
    "idle_timeout",
    "no_healthy",
    "max_connections",
    "backlog",
    "name",
    "connect_timeout",
    "interval",
    "listen",
    "nameservers",
    "servers",
]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KEY_PATHS), st.sampled_from(KNOWN_KEYS) | st.text(max_size=10), toml_values)
def test_malformed_input_is_always_a_clear_config_error(
    path: tuple[Any, ...], key: str, value: object
) -> None:
    data = minimal()
    table: Any = data
    for part in path:
        table = table[part] if isinstance(part, int) else table.setdefault(part, {})
    if isinstance(table, dict):
        table[key] = value
    try:
        parse_config(data)
    except ConfigError as exc:
        assert exc.errors
        for error in exc.errors:
            where, _, message = error.partition(": ")
            assert where and message, error
            assert where.split(".")[0].split("[")[0] in {
                "global",
                "admin",
                "resolver",
                "listeners",
                "pools",
                "(top level)",
                key,
            }, error


@given(st.binary(max_size=200))
def test_any_file_content_is_a_config_error_or_a_config(tmp_path_factory: Any, blob: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.toml"
    path.write_bytes(blob)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.errors and str(path) in str(exc)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_lbtcp_check_accepts_every_example(path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lbtcp", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "OK:" in result.stdout


def test_lbtcp_check_reports_every_error_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[listeners.web]\nbind = "127.0.0.1"\npool = "nope"\n[global]\nfoo = 1\n')
    result = subprocess.run(
        [sys.executable, "-m", "lbtcp", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "listeners.web.bind[0]: '127.0.0.1' has no port" in result.stderr
    assert "listeners.web.pool: no pool named 'nope'" in result.stderr
    assert "global.foo: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("resolver", "message"),
    [
        ({"nameservers": ["dns.example:53"]}, "resolver.nameservers: 'dns.example:53'"),
        ({"nameservers": "127.0.0.1"}, "resolver.nameservers: expected a list"),
        ({"nameservers": ["127.0.0.1:0"]}, "port 0 is not a nameserver port"),
        ({"timeout": "0s"}, "resolver.timeout: must be more than 0"),
        ({"min_ttl": "10m", "max_ttl": "5m"}, "min_ttl (600.0s) is above max_ttl (300.0s)"),
        ({"family": "ipv5"}, "resolver.family: 'ipv5' is not one of"),
        ({"stale_for": -1}, "resolver.stale_for: -1 must be a finite, non-negative duration"),
    ],
)
def test_resolver_errors(resolver: dict[str, Any], message: str) -> None:
    errors = errors_of(minimal(resolver=resolver))
    assert len(errors) == 1
    assert message in errors[0]


def test_resolver_accepts_nameservers_with_and_without_ports() -> None:
    config = parse_config(
        minimal(resolver={"nameservers": ["10.0.0.2", "10.0.0.3:5353", "[::1]:53"]})
    )
    assert config.resolver.nameservers == ("10.0.0.2", "10.0.0.3:5353", "[::1]:53")


@pytest.mark.parametrize(
    ("server", "message"),
    [
        ({"srv": "_app._tcp.example.internal", "address": "10.0.0.1:1"}, "has both"),
        ({"srv": "app.example.internal"}, "is not an SRV name"),
        ({"srv": "_app._tcp.example.internal", "weight": 3}, "taken from the SRV records"),
        ({"address": "db..internal:5432"}, "has a bad host name"),
    ],
)
def test_dns_server_entry_errors(server: dict[str, Any], message: str) -> None:
    data = minimal()
    data["pools"]["app"]["servers"] = [server]
    errors = errors_of(data)
    assert len(errors) == 1
    assert errors[0].startswith("pools.app.servers[0]")
    assert message in errors[0]


def test_names_and_srv_are_dynamic_servers() -> None:
    data = minimal()
    data["pools"]["app"]["servers"] = [
        {"address": "db.internal:5432"},
        {"srv": "_pg._tcp.db.internal", "backup": True},
        {"address": "10.0.0.1:5432"},
    ]
    servers = parse_config(data).pools["app"].servers
    assert [s.is_dynamic for s in servers] == [True, True, False]


def test_fleet_with_more_than_one_worker_is_not_supported_yet() -> None:
    data = minimal(fleet={"etcd": ["http://127.0.0.1:2379"]}, **{"global": {"workers": 2}})
    errors = errors_of(data)
    assert errors == ["fleet: [fleet] with workers > 1 is not supported yet; use workers = 1"]
