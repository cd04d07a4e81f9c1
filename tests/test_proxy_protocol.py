"""The PROXY protocol parser and encoders (pure): examples from the spec, and properties."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbtcp.proxy_protocol import (
    MAX_HEADER_LENGTH,
    NEED_MORE,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Done,
    Invalid,
    crc32c,
    encode_v1,
    encode_v2,
    parse,
)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
v4_pair = st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports))
v6_pair = st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports))
mixed_pair = st.tuples(st.tuples(ipv4 | ipv6, ports), st.tuples(ipv4 | ipv6, ports))
tlv_list = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != 0x03), st.binary(max_size=40)),
    max_size=5,
).map(tuple)


def same_address(got: tuple[str, int] | None, want: tuple[str, int]) -> bool:
    """Equal as addresses, IPv4 and its IPv4-mapped IPv6 form being the same host."""
    assert got is not None
    a, b = ipaddress.ip_address(got[0]), ipaddress.ip_address(want[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b and got[1] == want[1]


def feed_bytewise(data: bytes, mode: str = "any") -> Done | Invalid | None:
    """Feed one byte more each time, as a stream split into 1-byte segments would."""
    for end in range(1, len(data) + 1):
        verdict = parse(data[:end], mode)
        if verdict is not NEED_MORE:
            assert isinstance(verdict, Done | Invalid)
            return verdict
    return None


# --- examples ----------------------------------------------------------------------------


def test_crc32c_check_value() -> None:
    # The standard check value of CRC-32C (RFC 3720 B.4 / "123456789").
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_v1_spec_examples() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == Done(
        len(line), 1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443)
    )
    line6 = b"PROXY TCP6 2001:DB8::1 2001:db8::11 1 65535\r\n"
    verdict = parse(line6)
    assert isinstance(verdict, Done)
    assert verdict.source == ("2001:db8::1", 1)
    assert verdict.destination == ("2001:db8::11", 65535)
    unknown = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse(unknown) == Done(len(unknown), 1, "PROXY", None, None)
    assert parse(b"PROXY UNKNOWN\r\n") == Done(15, 1, "PROXY", None, None)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.256 1 2\r\n", "bad destination address"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "bad source address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "bad source address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "bad source address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad source port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "bad destination port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n", "bad source port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "6 fields"),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "6 fields"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "6 fields"),
        (b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n", "protocol"),
        (b"PROXY tcp4 1.2.3.4 1.2.3.4 1 2\r\n", "protocol"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", "LF without CR"),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY"),
        (b"PROXY\tTCP4 1.2.3.4 1.2.3.4 1 2\r\n", "not a PROXY"),
        (b"PROXY " + b"UNKNOWN " + b"x" * 100, "no CRLF within 107"),
        (b"GET / HTTP/1.1\r\n", "not a PROXY"),
        (b"\x16\x03\x01\x02\x00", "not a PROXY"),
    ],
)
def test_v1_rejects(line: bytes, why: str) -> None:
    verdict = parse(line)
    assert isinstance(verdict, Invalid), verdict
    assert why in verdict.why


def test_v1_length_limit_is_107_bytes_with_the_crlf() -> None:
    base = b"PROXY UNKNOWN "
    longest = base + b"x" * (107 - len(base) - 2) + b"\r\n"
    assert len(longest) == 107
    assert isinstance(parse(longest), Done)
    too_long = base + b"x" * (108 - len(base) - 2) + b"\r\n"
    assert isinstance(parse(too_long), Invalid)
    # And an incomplete line is refused as soon as 107 bytes hold no CRLF, not later.
    assert isinstance(parse(too_long[:107]), Invalid)
    assert parse(too_long[:106]) is NEED_MORE


def test_modes() -> None:
    v1 = encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2))
    v2 = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))
    assert isinstance(parse(v1, "v1"), Done)
    assert isinstance(parse(v2, "v2"), Done)
    assert isinstance(parse(v1, "any"), Done)
    assert isinstance(parse(v2, "any"), Done)
    assert parse(v2, "v1") == Invalid("a v2 header where v1 is expected")
    assert parse(v1, "v2") == Invalid("a v1 header where v2 is expected")
    with pytest.raises(ValueError, match="mode"):
        parse(v1, "v3")


def v2_header(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, size) + body


def test_v2_local_and_other_families_use_the_connection_address() -> None:
    assert parse(encode_v2(None, None)) == Done(16, 2, "LOCAL", None, None)
    # LOCAL with a body: the whole block is discarded (spec 2.2).
    assert parse(v2_header(0x20, 0x11, b"\xff" * 12)) == Done(28, 2, "LOCAL", None, None)
    unix = v2_header(0x21, 0x31, b"\x00" * 216)
    assert parse(unix) == Done(16 + 216, 2, "PROXY", None, None)
    udp = v2_header(0x21, 0x12, bytes(12))
    assert parse(udp) == Done(28, 2, "PROXY", None, None)
    unspec = v2_header(0x21, 0x00, b"")
    assert parse(unspec) == Done(16, 2, "PROXY", None, None)


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (v2_header(0x11, 0x11, bytes(12)), "version 1 is not 2"),
        (v2_header(0x22, 0x11, bytes(12)), "command 2"),
        (v2_header(0x21, 0x41, bytes(12)), "address family 4"),
        (v2_header(0x21, 0x13, bytes(12)), "transport protocol 3"),
        (v2_header(0x21, 0x11, bytes(11)), "too short"),
        (v2_header(0x21, 0x21, bytes(35)), "too short"),
        (v2_header(0x21, 0x11, bytes(12) + b"\x01\x00"), "truncated TLV"),
        (v2_header(0x21, 0x11, bytes(12) + b"\x01\x00\x05abc"), "runs past"),
        (v2_header(0x21, 0x11, bytes(12) + b"\x03\x00\x02ab"), "CRC32C TLV is not 4"),
        (v2_header(0x21, 0x11, b"", length=V2_MAX_LENGTH + 1), "above the limit"),
        (b"\r\n\r\n\x00\r\nQUIX\n", "bad signature"),
    ],
)
def test_v2_rejects(header: bytes, why: str) -> None:
    verdict = parse(header)
    assert isinstance(verdict, Invalid), verdict
    assert why in verdict.why


def test_v2_crc32c_is_verified() -> None:
    header = encode_v2(("10.1.2.3", 4000), ("10.0.0.1", 443), ((0x01, b"h2"),), crc=True)
    assert isinstance(parse(header), Done)
    broken = bytearray(header)
    broken[-1] ^= 0x01
    assert parse(bytes(broken)) == Invalid("v2: CRC32C mismatch")
    # A flipped port is caught by the CRC too (it covers the whole header).
    broken = bytearray(header)
    broken[16 + 8] ^= 0x80
    assert parse(bytes(broken)) == Invalid("v2: CRC32C mismatch")


def test_v2_bad_version_is_refused_before_the_rest_arrives() -> None:
    # A stalled peer with a wrong version byte is refused now, not at the timeout.
    assert isinstance(parse(V2_SIGNATURE + b"\x31"), Invalid)
    assert isinstance(parse(V2_SIGNATURE + b"\x21\x51"), Invalid)
    assert parse(V2_SIGNATURE + b"\x21\x11") is NEED_MORE
    # A too-long announced length is refused with only the 16 fixed bytes.
    assert isinstance(parse(v2_header(0x21, 0x11, b"", length=65535)), Invalid)


def test_v2_largest_allowed_header() -> None:
    tlv = (0xE0, b"x" * (V2_MAX_LENGTH - 12 - 3))
    header = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), (tlv,))
    assert len(header) == MAX_HEADER_LENGTH
    verdict = parse(header)
    assert isinstance(verdict, Done)
    assert verdict.tlvs == (tlv,)
    with pytest.raises(ValueError, match="exceed"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), ((0xE0, tlv[1] + b"x"),))


def test_encoders_refuse_bad_addresses() -> None:
    with pytest.raises(ValueError, match="not an IP"):
        encode_v1(("example.com", 1), ("1.2.3.4", 2))
    with pytest.raises(ValueError, match="port"):
        encode_v2(("1.2.3.4", 70000), ("1.2.3.4", 2))
    assert encode_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"


# --- properties --------------------------------------------------------------------------


@given(pair=v4_pair | v6_pair | mixed_pair)
def test_v1_round_trip(pair: tuple[tuple[str, int], tuple[str, int]]) -> None:
    source, destination = pair
    header = encode_v1(source, destination)
    assert len(header) <= 107
    verdict = parse(header + b"payload", "v1")
    assert isinstance(verdict, Done), (header, verdict)
    assert verdict.header_length == len(header)
    assert same_address(verdict.source, source)
    assert same_address(verdict.destination, destination)


@given(pair=v4_pair | v6_pair | mixed_pair, tlvs=tlv_list, crc=st.booleans())
def test_v2_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: tuple[tuple[int, bytes], ...],
    crc: bool,
) -> None:
    source, destination = pair
    header = encode_v2(source, destination, tlvs, crc=crc)
    verdict = parse(header + b"\r\n\r\npayload", "v2")
    assert isinstance(verdict, Done), verdict
    assert verdict.header_length == len(header)
    assert verdict.command == "PROXY"
    assert same_address(verdict.source, source)
    assert same_address(verdict.destination, destination)
    assert verdict.tlvs[: len(tlvs)] == tlvs
    assert len(verdict.tlvs) == len(tlvs) + crc


def valid_headers() -> st.SearchStrategy[bytes]:
    v1 = (v4_pair | v6_pair).map(lambda p: encode_v1(*p))
    v2 = st.builds(
        lambda p, t, c: encode_v2(*p, t, crc=c), v4_pair | v6_pair, tlv_list, st.booleans()
    )
    return v1 | v2 | st.just(encode_v2(None, None)) | st.just(b"PROXY UNKNOWN\r\n")


@given(data=st.binary(max_size=3000), mode=st.sampled_from(["v1", "v2", "any"]))
def test_arbitrary_bytes_never_raise(data: bytes, mode: str) -> None:
    verdict = parse(data, mode)
    assert verdict is NEED_MORE or isinstance(verdict, Done | Invalid)
    if isinstance(verdict, Done):
        assert 0 < verdict.header_length <= min(len(data), MAX_HEADER_LENGTH)


@given(data=st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b))
def test_arbitrary_v2_bodies_never_raise(data: bytes) -> None:
    verdict = parse(data)
    assert verdict is NEED_MORE or isinstance(verdict, Done | Invalid)


@given(data=st.text(alphabet="PROXYTCUNKW46 .:0123456789abcdef\r\n", max_size=120))
def test_v1_like_text_never_raises(data: str) -> None:
    verdict = parse(b"PROXY " + data.encode())
    assert verdict is NEED_MORE or isinstance(verdict, Done | Invalid)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(header=valid_headers())
def test_every_truncation_needs_more(header: bytes) -> None:
    # Every proper prefix of a valid header is "need more", never a verdict or a crash.
    for end in range(len(header)):
        assert parse(header[:end]) is NEED_MORE, (header, end)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(header=valid_headers(), data=st.data())
def test_single_byte_mutations_never_raise(header: bytes, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(header) - 1))
    value = data.draw(st.integers(0, 255))
    mutated = header[:index] + bytes([value]) + header[index + 1 :]
    verdict = parse(mutated + b"tail")
    assert verdict is NEED_MORE or isinstance(verdict, Done | Invalid)
    # Fed a byte at a time, the mutated header gets the same verdict as fed whole.
    assert feed_bytewise(mutated + b"tail") == (None if verdict is NEED_MORE else verdict)


@given(
    data=valid_headers().flatmap(lambda h: st.binary(max_size=30).map(lambda tail: h + tail))
    | st.binary(max_size=300)
)
def test_byte_at_a_time_equals_whole(data: bytes) -> None:
    whole = parse(data)
    bytewise = feed_bytewise(data)
    assert bytewise == (None if whole is NEED_MORE else whole)


@given(header=valid_headers(), extra=st.binary(max_size=64))
def test_bytes_after_the_header_are_not_consumed(header: bytes, extra: bytes) -> None:
    verdict = parse(header + extra)
    assert isinstance(verdict, Done)
    assert verdict.header_length == len(header)
