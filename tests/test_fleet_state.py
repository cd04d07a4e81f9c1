"""The fleet's pure parts: value validation, precedence, disagreement (hypothesis)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbtcp.config import ConfigError, parse_config
from lbtcp.fleet.state import (
    ADMIN_ORDER,
    ExtraServer,
    FleetState,
    NodeInfo,
    Override,
    disagreements,
    effective_weight,
    encode,
    parse_key,
    stricter,
    validate,
)

P = "/lbtcp/"
names = st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True)
admins = st.sampled_from(sorted(ADMIN_ORDER))
weights = st.integers(0, 256)
values = st.one_of(
    st.builds(
        ExtraServer,
        st.builds(lambda a, p: f"127.0.0.{a}:{p}", st.integers(1, 254), st.integers(1, 65535)),
        weights,
        st.booleans(),
    ),
    st.builds(Override, st.one_of(st.none(), admins), st.one_of(st.none(), weights)),
)


def key_for(value: object, pool: str, name: str) -> str:
    kind = "servers" if isinstance(value, ExtraServer) else None
    return f"{P}pools/{pool}/servers/{name}" if kind else f"{P}overrides/{pool}/{name}"


@given(values, names, names)
def test_encode_then_validate_round_trips(value: object, pool: str, name: str) -> None:
    key = parse_key(P, key_for(value, pool, name))
    assert validate(key, encode(value)) == value  # type: ignore[arg-type]


@given(st.binary(max_size=200), names)
def test_garbage_never_crashes_and_never_replaces_a_valid_value(raw: bytes, name: str) -> None:
    state = FleetState(P)
    key = f"{P}overrides/app/{name}"
    assert state.apply(key, b'{"admin": "drain"}', 5).result == "applied"
    update = state.apply(key, raw, 6)
    assert update.result in {"applied", "invalid", "unchanged"}
    if update.result == "invalid":
        assert state.override("app", name) == Override("draining", None)
        assert update.message


@pytest.mark.parametrize(
    ("key", "raw", "why"),
    [
        ("overrides/app/s1", b"{not json", "not JSON"),
        ("overrides/app/s1", b'{"weight": 9000}', "out of range"),
        ("overrides/app/s1", b'{"weight": true}', "whole number"),
        ("overrides/app/s1", b'{"admin": "maintenance"}', "admin must be"),
        ("overrides/app/s1", b'{"admin": "drain", "colour": 1}', "unknown field"),
        ("pools/app/servers/x", b'{"weight": 2}', "address is required"),
        ("pools/app/servers/x", b'{"address": "db.example:80"}', "not IP:PORT"),
        ("pools/app/servers/x", b'{"address": "127.0.0.1:0"}', "port of 1..65535"),
        ("pools/app/servers/x", b'{"address": "::1:80"}', "goes in brackets"),
        ("pools/app/servers/x", b"[1, 2]", "JSON object"),
        ("pools/app/servers/x", b'{"address": "127.0.0.1:80", "weight": NaN}', "not JSON"),
        ("nodes/a", b'{"started_at": "yesterday"}', "started_at"),
        ("nodes/a", b'{"started_at": 1, "health": {"app": {"s": "great"}}}', "health"),
        ("elsewhere/x", b"{}", "not a key of the layout"),
    ],
)
def test_each_kind_of_bad_value_is_invalid_with_a_reason(key: str, raw: bytes, why: str) -> None:
    update = FleetState(P).apply(P + key, raw, 1)
    assert update.result == "invalid"
    assert why in update.message


@given(st.dictionaries(names, values, max_size=8), st.dictionaries(names, values, max_size=8))
def test_load_is_the_listing_and_deletes_what_left(
    first: dict[str, object], second: dict[str, object]
) -> None:
    state = FleetState(P)
    one = {key_for(v, "app", n): encode(v) for n, v in first.items()}  # type: ignore[arg-type]
    two = {key_for(v, "app", n): encode(v) for n, v in second.items()}  # type: ignore[arg-type]
    state.load(one.items(), 3)
    state.load(two.items(), 9)
    assert set(state.values) == set(two)
    assert state.revision == 9


@given(admins, admins)
def test_stricter_is_the_maximum_of_disabled_draining_enabled(a: str, b: str) -> None:
    result = stricter(a, b)
    assert result in (a, b)
    assert ADMIN_ORDER[result] == max(ADMIN_ORDER[a], ADMIN_ORDER[b])
    assert stricter(b, a) == result


@given(st.one_of(st.none(), weights), st.one_of(st.none(), weights), weights)
def test_weight_precedence_local_then_fleet_then_file(
    local: int | None, fleet: int | None, file: int
) -> None:
    expected = local if local is not None else fleet if fleet is not None else file
    assert effective_weight(local, fleet, file) == expected


states = st.sampled_from(["healthy", "failing", "unhealthy", "ejected", "unknown"])


@given(st.dictionaries(names, st.dictionaries(names, states, max_size=4), min_size=1, max_size=5))
def test_disagreement_iff_verdicts_differ(health: dict[str, dict[str, str]]) -> None:
    nodes = {n: NodeInfo("0", "", 0.0, {"app": servers}) for n, servers in health.items()}
    found = {d.server: d for d in disagreements(nodes)}
    verdict = {"healthy": "up", "failing": "up", "unhealthy": "down", "ejected": "down"}
    for server in {s for servers in health.values() for s in servers}:
        views = {
            verdict.get(health[n].get(server, "absent"), health[n].get(server, "absent"))
            for n in health
        }
        views = {"absent" if v == "absent" else v for v in views}
        assert (server in found) == (len(views) > 1)
        if server in found:
            held = [node for nodes_ in found[server].views.values() for node in nodes_]
            assert sorted(held) == sorted(health)  # every node in exactly one view


def test_disagreement_names_the_minority() -> None:
    up, down = {"app": {"s1": "healthy"}}, {"app": {"s1": "unhealthy"}}
    nodes = {"a": NodeInfo("0", "", 0, up), "b": NodeInfo("0", "", 0, up)}
    nodes["c"] = NodeInfo("0", "", 0, down)
    (item,) = disagreements(nodes)
    assert item.summary == "down from node c only"
    assert disagreements({"a": nodes["a"], "b": nodes["b"]}) == []


BASE = (
    '[listeners.web]\nbind = "127.0.0.1:0"\npool = "p"\n[pools.p]\n'
    '[[pools.p.servers]]\naddress = "127.0.0.1:9"\n'
)


def test_fleet_config_defaults_and_every_key(tmp_path: Path) -> None:
    import tomllib

    config = parse_config(tomllib.loads(BASE + "[fleet]\n"))
    assert config.fleet is not None
    assert config.fleet.etcd == ("http://127.0.0.1:2379",)
    assert config.fleet.prefix == "/lbtcp/"
    assert config.fleet.node  # the host name
    assert (config.fleet.timeout, config.fleet.lease_ttl) == (2.0, 10.0)
    (tmp_path / "pw").write_text("secret\n")
    for name in ("ca", "cert", "key"):
        (tmp_path / name).write_text("x")
    text = BASE + (
        '[fleet]\netcd = ["https://10.0.0.1:2379", "https://[::1]:2379"]\nprefix = "/x/"\n'
        'node = "n1"\ntimeout = "500ms"\nlease_ttl = "5s"\nusername = "u"\n'
        'password_file = "pw"\nca_file = "ca"\ncert_file = "cert"\nkey_file = "key"\n'
    )
    fleet = parse_config(tomllib.loads(text), str(tmp_path / "c.toml")).fleet
    assert fleet is not None
    assert fleet.password == "secret"
    assert fleet.cert_file == str(tmp_path / "cert")
    assert parse_config(tomllib.loads(BASE)).fleet is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('etcd = "127.0.0.1:2379"', "fleet.etcd: '127.0.0.1:2379' is not an etcd endpoint"),
        ("etcd = []", "fleet.etcd: expected an endpoint URL"),
        ('prefix = "lbtcp"', "fleet.prefix: 'lbtcp' must start and end with '/'"),
        ('node = "a b"', "fleet.node: node name 'a b'"),
        ('lease_ttl = "1s"', "fleet.lease_ttl: must be a whole number of seconds"),
        ('timeout = "0s"', "fleet.timeout: must be more than 0"),
        ('username = "u"', "fleet.username: needs 'password_file' too"),
        ('cert_file = "c"', "fleet: 'cert_file' and 'key_file' go together"),
        ('ca_file = "nope"', "fleet.ca_file: no readable file 'nope'"),
        ("colour = 1", "fleet.colour: unknown key"),
    ],
)
def test_bad_fleet_config_names_the_key(body: str, message: str) -> None:
    import tomllib

    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(BASE + "[fleet]\n" + body + "\n"))
    assert any(error.startswith(message) for error in info.value.errors), info.value.errors


def test_a_json_value_an_operator_writes_is_accepted() -> None:
    raw = json.dumps({"address": "[::1]:8080", "weight": 5, "backup": True}).encode()
    assert validate(parse_key(P, P + "pools/app/servers/v6"), raw) == ExtraServer(
        "[::1]:8080", 5, True
    )


fleet_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 100000),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.lists(st.text(max_size=30), max_size=3),
)
FLEET_KEYS = ("etcd", "prefix", "node", "timeout", "lease_ttl", "username", "ca_file", "colour")


@given(st.dictionaries(st.sampled_from(FLEET_KEYS), fleet_values, max_size=4))
def test_any_fleet_table_parses_or_names_its_bad_keys(table: dict[str, object]) -> None:
    import tomllib

    data = tomllib.loads(BASE)
    data["fleet"] = {k: v for k, v in table.items() if v is not None}
    try:
        config = parse_config(data)
    except ConfigError as exc:
        assert exc.errors
        assert all(e.startswith("fleet") for e in exc.errors), exc.errors
    else:
        assert config.fleet is not None
        assert config.fleet.prefix.startswith("/") and config.fleet.prefix.endswith("/")
        assert config.fleet.etcd
        assert 2 <= config.fleet.lease_ttl <= 3600
