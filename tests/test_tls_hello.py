"""The ClientHello parser and the SNI route table (pure): real ClientHellos from Python's ssl
(through ssl.MemoryBIO), their truncations and mutations, arbitrary bytes, and the matcher
against a naive reference."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.tls_hello import (
    MAX_INSPECT,
    NEED_MORE,
    NOT_TLS,
    Hello,
    Invalid,
    Router,
    normalize_route,
    parse,
)


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real TLS client (Python's ssl / OpenSSL)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


SAMPLES = [
    ("api.example.com", ["h2", "http/1.1"]),
    ("WWW.Example.COM", None),
    ("a.b.c.deep.example.org", ["http/1.1"]),
    (None, ["h2"]),
    ("x" * 63 + "." + "y" * 63 + ".example", None),
]
HELLOS = [(name, alpn, client_hello(name, alpn)) for name, alpn in SAMPLES]
VERDICT_TYPES = (Hello, Invalid, type(NEED_MORE), type(NOT_TLS))


@pytest.mark.parametrize(("name", "alpn", "hello"), HELLOS)
def test_real_client_hellos_give_their_name_and_alpn(
    name: str | None, alpn: list[str] | None, hello: bytes
) -> None:
    verdict = parse(hello)
    assert verdict == Hello(name.lower() if name else None, tuple(alpn or ()), len(hello))


@pytest.mark.parametrize(("name", "alpn", "hello"), HELLOS)
def test_every_truncation_of_a_real_hello_needs_more(
    name: str | None, alpn: list[str] | None, hello: bytes
) -> None:
    for cut in range(len(hello)):
        assert parse(hello[:cut]) is NEED_MORE, cut


@pytest.mark.parametrize(("name", "alpn", "hello"), HELLOS)
def test_byte_at_a_time_is_the_same_as_whole(
    name: str | None, alpn: list[str] | None, hello: bytes
) -> None:
    """As the reader feeds it: the buffer so far, one byte more each time; the first
    verdict that is not "need more" is the verdict on the whole hello."""
    buffer = b""
    for byte in hello + b"trailing application data":
        buffer += bytes([byte])
        verdict = parse(buffer)
        if verdict is not NEED_MORE:
            break
    assert verdict == parse(hello)
    assert len(buffer) == len(hello)


@settings(max_examples=400)
@given(st.data())
def test_single_byte_mutations_of_real_hellos_never_raise(data: st.DataObject) -> None:
    hello = data.draw(st.sampled_from(HELLOS))[2]
    index = data.draw(st.integers(0, len(hello) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = hello[:index] + bytes([value]) + hello[index + 1 :]
    verdict = parse(mutated)
    assert isinstance(verdict, VERDICT_TYPES)
    if isinstance(verdict, Hello):
        assert verdict.length <= len(mutated)
    # A verdict on a prefix is final: the reader may stop at it.
    cut = data.draw(st.integers(0, len(mutated)))
    early = parse(mutated[:cut])
    assert early is NEED_MORE or early == verdict


@settings(max_examples=500)
@given(st.binary(max_size=600), st.integers(0, 600))
def test_arbitrary_bytes_never_raise_and_prefix_verdicts_are_final(data: bytes, cut: int) -> None:
    verdict = parse(data)
    assert isinstance(verdict, VERDICT_TYPES)
    early = parse(data[:cut])
    assert early is NEED_MORE or early == verdict


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_handshake_shaped_garbage_never_raises(body: bytes) -> None:
    """Bytes behind a valid record and handshake header reach the deep parsing code."""
    record = b"\x01" + len(body).to_bytes(3, "big") + body
    data = b"\x16\x03\x01" + len(record).to_bytes(2, "big") + record
    verdict = parse(data)
    assert isinstance(verdict, Hello | Invalid)


def test_first_bytes_that_cannot_start_a_handshake_record_are_not_tls_at_once() -> None:
    assert parse(b"G") is NOT_TLS
    assert parse(b"GET / HTTP/1.1\r\n") is NOT_TLS
    assert parse(b"\x17\x03\x03") is NOT_TLS  # application data, not a handshake
    assert parse(b"\x16\x01") is NOT_TLS  # not version 3.x
    assert parse(b"") is NEED_MORE
    assert parse(b"\x16") is NEED_MORE


def _hello_with(extensions: bytes, *, suites: bytes = b"\x13\x01") -> bytes:
    body = (
        b"\x03\x03"
        + bytes(32)
        + b"\x00"
        + len(suites).to_bytes(2, "big")
        + suites
        + b"\x01\x00"
        + len(extensions).to_bytes(2, "big")
        + extensions
    )
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


def _sni(name: bytes) -> bytes:
    entry = b"\x00" + len(name).to_bytes(2, "big") + name
    body = len(entry).to_bytes(2, "big") + entry
    return b"\x00\x00" + len(body).to_bytes(2, "big") + body


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x16\x03\x01\x40\x01", "record length 16385"),
        (b"\x16\x03\x01\x00\x00", "record length 0"),
        (b"\x16\x03\x01\x00\x10\x02", "not a ClientHello"),
        (b"\x16\x03\x01\x00\x10\x01\x00\x00\x20", "does not fit in the first record"),
        (_hello_with(_sni(b"a.example") + _sni(b"b.example")), "appears twice"),
        (_hello_with(_sni(b"bad name.example")), "not a DNS name"),
        (_hello_with(_sni(b"a.example\n")), "not a DNS name"),  # no newline into the log
        (_hello_with(_sni(b"caf\xc3\xa9.example")), "not ASCII"),
        (_hello_with(b"\x00\x10\x00\x03\x00\x01\x00"), "ALPN protocol name is empty"),
        (_hello_with(b"\x00\x00\x00\x09"), "runs past"),
        (_hello_with(b"", suites=b"\x13"), "cipher suites of 1 bytes"),
    ],
)
def test_malformed_hellos_say_why(data: bytes, why: str) -> None:
    verdict = parse(data)
    assert isinstance(verdict, Invalid), verdict
    assert why in verdict.why


def test_hand_built_hello_with_trailing_dot_and_upper_case_name() -> None:
    hello = _hello_with(_sni(b"API.Example.com."))
    assert parse(hello) == Hello("api.example.com", (), len(hello))
    assert parse(hello + b"more") == Hello("api.example.com", (), len(hello))


def test_the_size_bound_is_one_record() -> None:
    """A ClientHello filling a whole 16 KiB record is read; nothing more is ever needed."""
    padding = b"\x00\x15" + (16384 - 4 - 200).to_bytes(2, "big")
    filler = bytes(16384 - 4 - 200)
    first = _hello_with(_sni(b"big.example") + padding + filler)
    # Grow or shrink the padding so that the handshake fills the record exactly.
    excess = len(first) - MAX_INSPECT
    size = 16384 - 4 - 200 - excess
    hello = _hello_with(_sni(b"big.example") + b"\x00\x15" + size.to_bytes(2, "big") + bytes(size))
    assert len(hello) == MAX_INSPECT
    assert parse(hello) == Hello("big.example", (), MAX_INSPECT)


# --- routes --------------------------------------------------------------------------------

LABELS = st.sampled_from(["a", "b", "api", "www", "example", "com", "x-y", "_s"])
NAMES = st.lists(LABELS, min_size=1, max_size=5).map(".".join)
PATTERNS = st.one_of(NAMES, NAMES.map(lambda name: "*." + name))


def reference(routes: dict[str, int], name: str) -> int | None:
    """The rule as DESIGN.md says it, by brute force over every route."""
    name = name.lower().removesuffix(".")
    best: tuple[int, int] | None = None
    for pattern, target in routes.items():
        if pattern.startswith("*."):
            suffix = pattern[1:]
            matches = name.endswith(suffix) and len(name) > len(suffix)
            length = len(suffix)
        else:
            matches = name == pattern
            length = len(name) + 1  # an exact name is longer than any wildcard that matches
        if matches and (best is None or length > best[0]):
            best = (length, target)
    return None if best is None else best[1]


@settings(max_examples=400)
@given(
    st.lists(PATTERNS, max_size=12, unique=True),
    NAMES,
    st.booleans(),
    st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_router_matches_the_naive_reference(
    patterns: list[str], name: str, trailing_dot: bool, upper: list[bool]
) -> None:
    routes = {pattern: index for index, pattern in enumerate(patterns)}
    router = Router(routes.items())
    cased = "".join(c.upper() if upper[i % 40] else c for i, c in enumerate(name))
    asked = cased + ("." if trailing_dot else "")
    assert router.match(asked) == reference(routes, name)


def test_router_examples() -> None:
    router = Router(
        [
            ("api.example.com", "api"),
            ("*.example.com", "web"),
            ("*.deep.example.com", "deep"),
        ]
    )
    assert router.match("api.example.com") == "api"
    assert router.match("API.EXAMPLE.COM.") == "api"
    assert router.match("www.example.com") == "web"
    assert router.match("a.b.example.com") == "web"
    assert router.match("x.deep.example.com") == "deep"
    assert router.match("deep.example.com") == "web"
    assert router.match("example.com") is None
    assert router.match("notexample.com") is None
    assert router.match("") is None


@pytest.mark.parametrize(
    ("sni", "normal"),
    [("API.example.com", "api.example.com"), ("*.Example.COM.", "*.example.com"), ("a_b", "a_b")],
)
def test_route_names_are_normalized(sni: str, normal: str) -> None:
    assert normalize_route(sni) == normal


@pytest.mark.parametrize(
    ("sni", "message"),
    [
        ("*", "whole first label"),
        ("a.*.example.com", "whole first label"),
        ("*example.com", "whole first label"),
        ("**.example.com", "whole first label"),
        ("a..b", "not a host name"),
        (".a", "not a host name"),
        ("a b", "not a host name"),
        ("x" * 64 + ".com", "not a host name"),
        ("é.com", "not a host name"),
    ],
)
def test_malformed_route_names_are_refused(sni: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_route(sni)
