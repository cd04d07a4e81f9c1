"""The [admin] table: listen, token, token_file, auth_reads, and the protected-mode rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.addresses import Endpoint
from lbtcp.config import ConfigError, load_config, parse_config

LISTENER = '[listeners.web]\nbind = "127.0.0.1:0"\npool = "app"\n'
POOL = '[pools.app]\n[[pools.app.servers]]\naddress = "127.0.0.1:9000"\n'


def with_admin(admin: dict[str, Any]) -> dict[str, Any]:
    return {
        "admin": admin,
        "listeners": {"web": {"bind": "127.0.0.1:8080", "pool": "app"}},
        "pools": {"app": {"servers": [{"address": "127.0.0.1:9000"}]}},
    }


def errors_of(admin: dict[str, Any], source: str = "") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(with_admin(admin), source)
    return info.value.errors


def check(tmp_path: Path, admin_toml: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "lbtcp.toml"
    path.write_text(LISTENER + POOL + "[admin]\n" + admin_toml)
    return subprocess.run(
        [sys.executable, "-m", "lbtcp", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_defaults() -> None:
    admin = parse_config(with_admin({})).admin
    assert admin is not None
    assert (admin.listen, admin.token, admin.token_file, admin.auth_reads) == (
        Endpoint("127.0.0.1", 9900),
        "",
        "",
        False,
    )


def test_no_admin_table_means_no_admin_server() -> None:
    data = with_admin({})
    del data["admin"]
    assert parse_config(data).admin is None


def test_design_defaults_written_out_are_accepted() -> None:
    # DESIGN.md §2 spells the table out with empty strings: that must mean "no token".
    admin = parse_config(
        with_admin({"listen": "127.0.0.1:9900", "token": "", "token_file": "", "auth_reads": False})
    ).admin
    assert admin is not None and admin.token == ""


@pytest.mark.parametrize("listen", ["[::1]:9900", "127.0.0.2:0", "[::1]:0"])
def test_loopback_listen_without_token_is_accepted(listen: str) -> None:
    admin = parse_config(with_admin({"listen": listen})).admin
    assert admin is not None and admin.listen.is_ip


@pytest.mark.parametrize("listen", ["0.0.0.0:9900", "[::]:9900", "10.1.2.3:9900"])
def test_non_loopback_listen_without_token_names_the_risk(listen: str) -> None:
    errors = errors_of({"listen": listen})
    assert len(errors) == 1
    assert errors[0].startswith(f"admin.listen: {listen} is not a loopback address")
    assert "no token" in errors[0] and "drain, disable or reweight" in errors[0]


def test_non_loopback_listen_with_token_is_accepted() -> None:
    admin = parse_config(with_admin({"listen": "[::]:9900", "token": "s3cret"})).admin
    assert admin is not None
    assert (admin.listen, admin.token) == (Endpoint("::", 9900), "s3cret")


def test_token_file_first_line_is_the_token(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("from-the-file\nsecond line is ignored\n")
    admin = parse_config(with_admin({"token_file": str(secret), "listen": "0.0.0.0:1"})).admin
    assert admin is not None
    assert (admin.token, admin.token_file) == ("from-the-file", str(secret))


def test_relative_token_file_is_read_beside_the_config(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("beside\n")
    admin = parse_config(with_admin({"token_file": "token"}), str(tmp_path / "x.toml")).admin
    assert admin is not None and admin.token == "beside"


def test_unreadable_token_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    errors = errors_of({"token_file": str(missing)})
    assert errors == [f"admin.token_file: cannot read {str(missing)!r}: No such file or directory"]


def test_empty_token_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert errors_of({"token_file": str(empty)}) == [
        f"admin.token_file: {str(empty)!r} holds no token on its first line"
    ]


def test_token_and_token_file_together_is_an_error(tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("x\n")
    errors = errors_of({"token": "y", "token_file": str(secret)})
    assert errors == ["admin: 'token' and 'token_file' are both set; give one"]


@pytest.mark.parametrize("token", ["has space", "tab\there", "caf\u00e9"])
def test_token_must_fit_in_a_header(token: str) -> None:
    errors = errors_of({"token": token})
    assert errors == ["admin.token: the token may hold only visible ASCII characters, no spaces"]


def test_auth_reads_needs_a_token() -> None:
    assert errors_of({"auth_reads": True}) == [
        "admin.auth_reads: auth_reads = true needs a token (token or token_file)"
    ]
    admin = parse_config(with_admin({"auth_reads": True, "token": "t"})).admin
    assert admin is not None and admin.auth_reads


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ({"listen": "localhost:9900"}, "admin.listen: 'localhost:9900': 'localhost' is not an IP"),
        ({"listen": "127.0.0.1"}, "admin.listen: '127.0.0.1' has no port"),
        ({"listen": 9900}, "admin.listen: expected a string"),
        ({"token": 5}, "admin.token: expected a string"),
        ({"auth_reads": "yes"}, "admin.auth_reads: expected true or false"),
        ({"tokn": "x"}, "admin.tokn: unknown key"),
    ],
)
def test_bad_values(admin: dict[str, Any], message: str) -> None:
    errors = errors_of(admin)
    assert any(error.startswith(message) for error in errors), errors


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["listen", "token", "token_file", "auth_reads"]) | st.text(max_size=6),
        st.none()
        | st.booleans()
        | st.integers()
        | st.text(max_size=30)
        | st.sampled_from(["0.0.0.0:1", "[::1]:2", "127.0.0.1:0", "x y", "/nonexistent"]),
        max_size=4,
    ).map(lambda d: {k: v for k, v in d.items() if v is not None})
)
def test_any_admin_table_is_a_config_or_a_clear_error(admin: dict[str, Any]) -> None:
    try:
        config = parse_config(with_admin(admin))
    except ConfigError as exc:
        assert exc.errors
        assert all(error.startswith("admin") for error in exc.errors), exc.errors
        return
    result = config.admin
    assert result is not None
    # Whatever was accepted respects the protected-mode rule.
    assert (
        result.token
        or result.listen.host in ("127.0.0.1", "::1")
        or (result.listen.host.startswith("127."))
    )


def test_lbtcp_check_refuses_a_non_loopback_listen_without_token(tmp_path: Path) -> None:
    result = check(tmp_path, 'listen = "0.0.0.0:9900"\n')
    assert result.returncode == 2
    assert "admin.listen: 0.0.0.0:9900 is not a loopback address and no token" in result.stderr
    assert "Traceback" not in result.stderr


def test_lbtcp_check_accepts_loopback_and_token_file(tmp_path: Path) -> None:
    assert check(tmp_path, 'listen = "[::1]:9900"\n').returncode == 0
    (tmp_path / "secret").write_text("t0ken\n")
    result = check(tmp_path, 'listen = "0.0.0.0:9900"\ntoken_file = "secret"\n')
    assert result.returncode == 0, result.stderr
    assert load_config(tmp_path / "lbtcp.toml").admin.token == "t0ken"  # type: ignore[union-attr]


def test_lbtcp_check_names_an_unreadable_token_file(tmp_path: Path) -> None:
    result = check(tmp_path, 'token_file = "/nonexistent/lbtcp-token"\n')
    assert result.returncode == 2
    assert "admin.token_file: cannot read '/nonexistent/lbtcp-token'" in result.stderr
