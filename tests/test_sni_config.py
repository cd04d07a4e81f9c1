"""Config keys of SNI routing (``routes``, ``inspect_timeout``): what ``lbtcp check`` accepts
and the clear errors it gives for everything else."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.config import ConfigError, RouteConfig, parse_config


def minimal(listener: dict[str, Any] | None = None) -> Any:
    server = [{"address": "127.0.0.1:9000"}]
    return {
        "listeners": {"web": {"bind": "127.0.0.1:8443", "pool": "app", **(listener or {})}},
        "pools": {"app": {"servers": server}, "api": {"servers": server}},
    }


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


def test_defaults_without_routes() -> None:
    listener = parse_config(minimal()).listeners["web"]
    assert listener.routes == ()
    assert listener.inspect_timeout == 3.0


def test_routes_are_normalized_and_kept_in_order() -> None:
    listener = parse_config(
        minimal(
            {
                "routes": [
                    {"sni": "API.Example.com.", "pool": "api"},
                    {"sni": "*.Example.com", "pool": "app"},
                ],
                "inspect_timeout": "500ms",
            }
        )
    ).listeners["web"]
    assert listener.routes == (
        RouteConfig("api.example.com", "api"),
        RouteConfig("*.example.com", "app"),
    )
    assert listener.inspect_timeout == 0.5


@pytest.mark.parametrize(
    ("routes", "path", "message"),
    [
        ([{"sni": "a.example", "pool": "nope"}], "routes[0].pool", "no pool named 'nope'"),
        (
            [{"sni": "a.example", "pool": "api"}, {"sni": "A.EXAMPLE.", "pool": "app"}],
            "routes[1].sni",
            "same name as listeners.web.routes[0]",
        ),
        ([{"sni": "a.*.example", "pool": "api"}], "routes[0].sni", "whole first label"),
        ([{"sni": "bad name", "pool": "api"}], "routes[0].sni", "not a host name"),
        ([{"sni": "a.example", "pool": "api", "port": 1}], "routes[0]", "unknown key(s) 'port'"),
        ([{"pool": "api"}], "routes[0].sni", "is required"),
        ([{"sni": "a.example"}], "routes[0].pool", "is required"),
        ([{"sni": 5, "pool": "api"}], "routes[0].sni", "is required"),
        (["a.example"], "routes[0]", "expected a table"),
        ({"sni": "a.example"}, "routes", "expected a list"),
    ],
)
def test_bad_routes_are_refused_with_their_path(routes: Any, path: str, message: str) -> None:
    errors = errors_of(minimal({"routes": routes}))
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"listeners.web.{path}: "), errors
    assert message in errors[0]


@pytest.mark.parametrize("value", ["0s", "-1s", "soon", 0])
def test_bad_inspect_timeouts_are_refused(value: object) -> None:
    errors = errors_of(minimal({"inspect_timeout": value}))
    assert len(errors) == 1
    assert errors[0].startswith("listeners.web.inspect_timeout: ")


@settings(max_examples=200)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"sni": st.text(max_size=20), "pool": st.sampled_from(["app", "api", "x"])},
            optional={"extra": st.integers()},
        ),
        max_size=5,
    )
)
def test_any_routes_value_is_accepted_or_a_clear_error(routes: list[dict[str, Any]]) -> None:
    try:
        listener = parse_config(minimal({"routes": routes})).listeners["web"]
    except ConfigError as exc:
        assert exc.errors
        assert all(error.startswith("listeners.web.routes[") for error in exc.errors)
    else:
        names = [route.sni for route in listener.routes]
        assert len(set(names)) == len(names) == len(routes)
        assert all(route.pool in ("app", "api") for route in listener.routes)


def test_lbtcp_check_names_the_missing_pool(tmp_path: Path) -> None:
    path = tmp_path / "sni.toml"
    path.write_text(
        "[listeners.tls]\n"
        'bind = "127.0.0.1:8443"\n'
        'pool = "app"\n'
        'routes = [{sni = "api.example.com", pool = "api"},'
        ' {sni = "API.example.com", pool = "app"}]\n'
        "[pools.app]\n"
        '[[pools.app.servers]]\naddress = "127.0.0.1:9000"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "lbtcp", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "listeners.tls.routes[0].pool: no pool named 'api'" in output
    assert "listeners.tls.routes[1].sni" in output
