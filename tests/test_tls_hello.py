"""The ClientHello parser and the SNI route table (pure): real ClientHellos from Python's ssl
(through ssl.MemoryBIO), their truncations and mutations, arbitrary bytes, and the matcher
against a naive reference."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbtcp.tls_hello import (
    _LAYOUTS,
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


# --- against a straightforward reference --------------------------------------------------


class _Short(Exception):
    """The reference ran out of bytes inside a length-prefixed field."""


def reference_parse(data: bytes) -> tuple[object, Hello | None]:
    """The parse as the module doc states it, read the plain way (every length sliced and
    checked, every extension walked to the end): (the verdict of a full walk, the Hello as
    it stands once both server_name and ALPN are read, or None when they never both are)."""
    if not data:
        return NEED_MORE, None
    if data[0] != 22:
        return NOT_TLS, None
    if len(data) < 2:
        return NEED_MORE, None
    if data[1] != 3:
        return NOT_TLS, None
    if len(data) < 5:
        return NEED_MORE, None
    record = int.from_bytes(data[3:5], "big")
    if not 1 <= record <= 16384:
        return Invalid("record length"), None
    if len(data) < 6:
        return NEED_MORE, None
    if data[5] != 1:
        return Invalid("handshake type"), None
    if len(data) < 9:
        return NEED_MORE, None
    length = int.from_bytes(data[6:9], "big")
    if length + 4 > record:
        return Invalid("record"), None
    end = 9 + length
    if len(data) < end:
        return NEED_MORE, None
    body = data[9:end]
    cursor = [34]  # legacy_version and random

    def vector(width: int, within: bytes = body, at: list[int] = cursor) -> bytes:
        start = at[0] + width
        if start > len(within):
            raise _Short
        stop = start + int.from_bytes(within[at[0] : start], "big")
        if stop > len(within):
            raise _Short
        at[0] = stop
        return within[start:stop]

    name: str | None = None
    protocols: tuple[str, ...] = ()
    early: Hello | None = None
    try:
        if len(body) < 34 or len(vector(1)) > 32:
            return Invalid("session id"), None
        suites = vector(2)
        if len(suites) < 2 or len(suites) % 2:
            return Invalid("suites"), None
        if not vector(1):
            return Invalid("methods"), None
        if cursor[0] == len(body):
            return Hello(None, (), end), None
        extensions = vector(2)
        if cursor[0] != len(body):
            return Invalid("extensions length"), None
        seen: set[int] = set()
        walk = [0]
        while walk[0] < len(extensions):
            kind = int.from_bytes(extensions[walk[0] : walk[0] + 2], "big")
            if walk[0] + 4 > len(extensions):
                raise _Short
            walk[0] += 2
            content = vector(2, extensions, walk)
            if kind not in (0, 16):
                continue
            if kind in seen:
                return Invalid("twice"), early
            seen.add(kind)
            inner = [0]
            if kind == 0 and content:
                entries = vector(2, content, inner)
                if inner[0] != len(content):
                    return Invalid("server_name list"), early
                entry = [0]
                while entry[0] < len(entries):
                    name_type = entries[entry[0]]
                    entry[0] += 1
                    host = vector(2, entries, entry)
                    if name_type != 0:
                        continue
                    if name is not None:
                        return Invalid("two names"), early
                    text = host.decode("latin-1")
                    labels = text.removesuffix(".").split(".")
                    if not (
                        host.isascii()
                        and len(host) <= 254
                        and all(
                            1 <= len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
                            for label in labels
                        )
                    ):
                        return Invalid("host name"), early
                    name = text.lower().removesuffix(".")
            elif kind == 16:
                listed = vector(2, content, inner)
                if inner[0] != len(content):
                    return Invalid("ALPN list"), early
                names = []
                entry = [0]
                while entry[0] < len(listed):
                    raw = vector(1, listed, entry)
                    if not raw:
                        return Invalid("empty ALPN name"), early
                    names.append(
                        "".join(
                            chr(b) if 0x21 <= b <= 0x7E and chr(b) not in ',=\\"' else f"\\x{b:02x}"
                            for b in raw
                        )
                    )
                protocols = tuple(names)
            if early is None and seen == {0, 16}:
                early = Hello(name, protocols, end)
    except _Short:
        return Invalid("runs past"), early
    return Hello(name, protocols, end), early


def expected(data: bytes) -> object:
    """What ``parse`` must answer: the reference's verdict, except that the walk stops once
    server_name and ALPN are both read (what follows is the TLS server's to validate)."""
    verdict, early = reference_parse(data)
    return early if early is not None else verdict


def same_verdict(got: object, want: object) -> bool:
    """Equal verdicts; two Invalid verdicts are the same whatever their reasons."""
    if isinstance(want, Invalid):
        return isinstance(got, Invalid)
    return got == want


def _extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(body).to_bytes(2, "big") + body


def _alpn_ext(names: list[bytes]) -> bytes:
    listed = b"".join(len(name).to_bytes(1, "big") + name for name in names)
    return _extension(16, len(listed).to_bytes(2, "big") + listed)


HOSTS = st.sampled_from(
    [b"a.example", b"API.Example.com.", b"x" * 63 + b".com", b"x" * 64, b"bad name", b"", b"\xff"]
)
EXTENSIONS = st.one_of(
    HOSTS.map(_sni),
    st.lists(st.sampled_from([b"h2", b"http/1.1", b"", b"a,b", b"\x00\x7f"]), max_size=3).map(
        _alpn_ext
    ),
    st.tuples(st.sampled_from([10, 11, 13, 21, 43, 51, 0xFAFA]), st.binary(max_size=12)).map(
        lambda pair: _extension(*pair)
    ),
    st.binary(max_size=8),  # not an extension: a bad length, a header cut short
)


@settings(max_examples=600)
@given(st.lists(EXTENSIONS, max_size=6), st.data())
def test_hand_built_hellos_agree_with_the_reference(
    extensions: list[bytes], data: st.DataObject
) -> None:
    """Extension lists in any order: ours malformed, repeated, before and after the
    others, garbage between them; the verdict whole, and on every prefix, is the
    reference's (a prefix: NEED_MORE, or the same final verdict)."""
    hello = _hello_with(b"".join(extensions))
    want = expected(hello)
    got = parse(hello)
    assert same_verdict(got, want), (got, want, hello)
    cut = data.draw(st.integers(0, len(hello)))
    early = parse(hello[:cut])
    assert early is NEED_MORE or early == got


@settings(max_examples=400)
@given(st.data())
def test_mutated_and_arbitrary_bytes_agree_with_the_reference(data: st.DataObject) -> None:
    hello = data.draw(st.sampled_from(HELLOS))[2]
    index = data.draw(st.integers(0, len(hello) - 1))
    mutated = hello[:index] + bytes([data.draw(st.integers(0, 255))]) + hello[index + 1 :]
    for sample in (mutated, mutated[: data.draw(st.integers(0, len(mutated)))]):
        assert same_verdict(parse(sample), expected(sample)), sample
    garbage = data.draw(st.binary(max_size=300))
    assert same_verdict(parse(garbage), expected(garbage)), garbage


def test_the_walk_stops_once_server_name_and_alpn_are_read() -> None:
    """A malformed or repeated extension after both of ours is the TLS server's to refuse:
    the route is known. Before them (or without ALPN) it is still Invalid."""
    ours = _sni(b"api.example.com") + _alpn_ext([b"h2"])
    bad_after = b"\x00\x0a\xff\xff"  # an extension running past the ClientHello
    for tail in (bad_after, _sni(b"other.example"), _alpn_ext([b""])):
        hello = _hello_with(ours + tail)
        assert parse(hello) == Hello("api.example.com", ("h2",), len(hello))
    assert isinstance(parse(_hello_with(bad_after + ours)), Invalid)
    assert isinstance(parse(_hello_with(_sni(b"api.example.com") + bad_after)), Invalid)
    assert isinstance(parse(_hello_with(_sni(b"a.example") + _sni(b"b.example") + ours)), Invalid)


@pytest.mark.parametrize(("name", "alpn", "hello"), HELLOS)
def test_a_remembered_layout_answers_only_for_its_own_bytes(
    name: str | None, alpn: list[str] | None, hello: bytes
) -> None:
    """After a real hello was parsed (its layout remembered), the same hello with any one
    byte changed gets the reference's verdict: the remembered one where only the random or
    the session id differ, its own otherwise."""
    _LAYOUTS.clear()
    learned = parse(hello)
    for _ in range(8):  # one early-stopping walk in eight learns its layout
        assert parse(hello) == learned
    # Only a walk that stopped early is learned (a full one read the key share, which
    # changes with every connection).
    assert (hello[:9] in _LAYOUTS) == bool(name and alpn)
    for index in range(len(hello)):
        changed = hello[:index] + bytes([hello[index] ^ 0x41]) + hello[index + 1 :]
        assert same_verdict(parse(changed), expected(changed)), index
        assert parse(hello) == learned, index
    fresh = hello[:11] + bytes(range(32)) + hello[43:]  # another random, same layout
    assert parse(fresh) == learned


def test_repeated_names_and_alpn_lists_give_the_same_verdicts() -> None:
    """The bodies' verdicts are remembered by their bytes: asking again, and asking after
    more distinct names than are kept, answers the same."""
    hello = _hello_with(_sni(b"Keep.Example") + _alpn_ext([b"h2"]))
    first = parse(hello)
    for index in range(3000):
        name = f"n{index}.example".encode()
        assert parse(_hello_with(_sni(name))) == Hello(
            name.decode(), (), len(_hello_with(_sni(name)))
        )
    assert parse(hello) == first == Hello("keep.example", ("h2",), len(hello))
    bad = _hello_with(_sni(b"bad name"))
    assert isinstance(parse(bad), Invalid)
    assert isinstance(parse(bad), Invalid)


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
    # Asked again, the answer is the remembered one, and the same.
    assert router.match(asked) == reference(routes, name)
    assert router.lookup(asked) == reference(routes, name)


def test_router_answers_the_same_after_more_names_than_it_remembers() -> None:
    router = Router([("api.example.com", "api"), ("*.example.com", "web")])
    assert router.match("api.example.com") == "api"
    for index in range(3000):
        assert router.match(f"n{index}.example.com") == "web"
        assert router.match(f"n{index}.example.org") is None
    assert len(router.seen) <= 1024
    assert router.match("API.example.com") == "api"
    assert router.match("www.example.com.") == "web"


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
