"""The PROXY protocol, versions 1 and 2: encoders and an incremental parser (pure).

Theory of operation. ``parse(data, mode)`` looks at the first bytes a client sent and answers
``NEED_MORE``, ``Done`` (the header's length, command, addresses and TLVs) or ``Invalid``
(why). It keeps no state: the caller buffers what arrived and calls it again when more comes.
The verdict is a function of the prefix alone and never changes once it is not ``NEED_MORE``
(the parser only reads bytes up to the header's end), so feeding a header one byte at a time
gives the same answer as feeding it whole. Re-parsing is cheap: a v1 line is at most 107
bytes, and a v2 header is only decoded once its announced length has arrived.

Version 1 is one ASCII line: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n`` or
``PROXY UNKNOWN ...\\r\\n``, at most 107 bytes with the CRLF. Fields are separated by exactly
one space; addresses must be in canonical literal form for their family (no leading zeros in
IPv4 octets, no IPv6 zone, no IPv4 address under TCP6 unless written as an IPv6 literal);
ports are decimal 0..65535 without leading zeros.

Version 2 is binary: a 12-byte signature, version/command, family/protocol, a 16-bit length,
then the addresses and TLVs. PROXY over AF_INET or AF_INET6 with STREAM gives addresses; any
other family or protocol, and LOCAL, give none (the caller uses the connection's own). TLVs are
walked with bounds checks; a CRC32C TLV is verified. The announced length is capped at
``V2_MAX_LENGTH`` (2048) bytes, not the 65535 the format allows: the largest headers seen
from real senders (AWS/GCP/Azure link ids, HAProxy's SSL TLVs with a client certificate's CN)
are a few hundred bytes, and the cap bounds what one trusted but broken or hostile peer makes
lbtcp buffer per connection, times the thousands of connections that may be waiting.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

Address = tuple[str, int]

V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH = 16
V2_MAX_LENGTH = 2048  # the announced length after the 16 fixed bytes (see module doc)
MAX_HEADER_LENGTH = V2_FIXED_LENGTH + V2_MAX_LENGTH

V1_PREFIX = b"PROXY "
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

COMMAND_LOCAL = "LOCAL"
COMMAND_PROXY = "PROXY"

# v2 family/protocol nibbles and TLV types used here.
AF_UNSPEC, AF_INET, AF_INET6, AF_UNIX = 0, 1, 2, 3
PROTO_UNSPEC, PROTO_STREAM, PROTO_DGRAM = 0, 1, 2
TLV_CRC32C = 0x03
_V2_ADDRESS_LENGTH = {AF_UNSPEC: 0, AF_INET: 12, AF_INET6: 36, AF_UNIX: 216}

MODES = ("v1", "v2", "any")


@dataclass(frozen=True, slots=True)
class NeedMore:
    """Not enough bytes yet to decide."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class Done:
    """A complete, valid header of ``header_length`` bytes. ``source``/``destination`` are
    None when the header says "use the connection's own addresses" (LOCAL, UNKNOWN, or a
    family other than TCP over IPv4/IPv6)."""

    header_length: int
    version: int
    command: str
    source: Address | None
    destination: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Invalid:
    """Not a valid header; ``why`` is a short reason for the log."""

    why: str


Verdict = NeedMore | Done | Invalid


# --- CRC32C (Castagnoli), table-driven, for the v2 CRC32C TLV ----------------------------


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (RFC 3720 B.4). Pure Python: headers are at most 2 KiB and only
    checked when a sender includes the TLV, so no dependency is worth it."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- parsing -----------------------------------------------------------------------------


def parse(data: bytes, mode: str = "any") -> Verdict:
    """The verdict on the first bytes of a connection (see the module doc).

    ``mode`` is ``"v1"``, ``"v2"`` or ``"any"`` (detected from the first byte). Never raises
    on any input; an unknown mode is a programming error (ValueError).
    """
    if mode not in MODES:
        raise ValueError(f"unknown PROXY protocol mode {mode!r}")
    if not data:
        return NEED_MORE
    first = data[0]
    if first == 0x0D:  # '\r': only v2 starts so
        if mode == "v1":
            return Invalid("a v2 header where v1 is expected")
        return _parse_v2(data)
    if first == 0x50:  # 'P'
        if mode == "v2":
            return Invalid("a v1 header where v2 is expected")
        return _parse_v1(data)
    return Invalid("not a PROXY protocol header")


def _parse_v1(data: bytes) -> Verdict:
    head = data[: len(V1_PREFIX)]
    if head != V1_PREFIX[: len(head)]:
        return Invalid("not a PROXY protocol header")
    end = data.find(b"\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH:
            return Invalid(f"v1: no CRLF within {V1_MAX_LENGTH} bytes")
        return NEED_MORE
    if data[end - 1] != 0x0D:
        return Invalid("v1: line ends in LF without CR")
    line = data[: end - 1]
    length = end + 1
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # The spec: the receiver ignores the rest of the line and uses the real addresses.
        if b"\r" in line:
            return Invalid("v1: CR inside the line")
        return Done(length, 1, COMMAND_PROXY, None, None)
    if protocol == b"TCP4":
        family = socket.AF_INET
    elif protocol == b"TCP6":
        family = socket.AF_INET6
    else:
        return Invalid("v1: protocol is not TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        return Invalid("v1: expected 6 fields separated by single spaces")
    source_ip = _v1_address(fields[2], family)
    destination_ip = _v1_address(fields[3], family)
    if source_ip is None:
        return Invalid("v1: bad source address")
    if destination_ip is None:
        return Invalid("v1: bad destination address")
    source_port = _v1_port(fields[4])
    destination_port = _v1_port(fields[5])
    if source_port < 0:
        return Invalid("v1: bad source port")
    if destination_port < 0:
        return Invalid("v1: bad destination port")
    return Done(
        length, 1, COMMAND_PROXY, (source_ip, source_port), (destination_ip, destination_port)
    )


_IPV4_CHARS = frozenset(b"0123456789.")
_IPV6_CHARS = frozenset(b"0123456789abcdefABCDEF:.")


def _v1_address(field: bytes, family: int) -> str | None:
    """The canonical text of an address literal of ``family``, or None if it is not one."""
    if family == socket.AF_INET:
        if not 7 <= len(field) <= 15 or not _IPV4_CHARS.issuperset(field):
            return None
        parts = field.split(b".")
        if len(parts) != 4:
            return None
        for part in parts:
            # Leading zeros are refused: "010" is octal to some parsers, decimal to others.
            if not part or len(part) > 3 or (len(part) > 1 and part[0] == 0x30):
                return None
            if int(part) > 255:
                return None
        return field.decode("ascii")
    if not 2 <= len(field) <= 45 or not _IPV6_CHARS.issuperset(field):
        return None
    try:
        packed = socket.inet_pton(socket.AF_INET6, field.decode("ascii"))
    except (OSError, ValueError):
        return None
    return socket.inet_ntop(socket.AF_INET6, packed)


def _v1_port(field: bytes) -> int:
    """The port, or -1 if ``field`` is not a decimal 0..65535 without leading zeros."""
    if not 1 <= len(field) <= 5 or not field.isdigit():
        return -1
    if len(field) > 1 and field[0] == 0x30:
        return -1
    port = int(field)
    return port if port <= 65535 else -1


def _parse_v2(data: bytes) -> Verdict:
    head = data[: len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[: len(head)]:
        return Invalid("v2: bad signature")
    if len(data) < V2_FIXED_LENGTH:
        # Check what has arrived of the version/command and family bytes early: a stalled
        # peer with a wrong version is refused now, not at the timeout.
        if len(data) > 12:
            why = _v2_check_version(data[12])
            if why:
                return Invalid(why)
        if len(data) > 13:
            why = _v2_check_family(data[13])
            if why:
                return Invalid(why)
        return NEED_MORE
    ver_cmd, fam_proto, length = data[12], data[13], (data[14] << 8) | data[15]
    why = _v2_check_version(ver_cmd) or _v2_check_family(fam_proto)
    if why:
        return Invalid(why)
    if length > V2_MAX_LENGTH:
        return Invalid(f"v2: header length {length} is above the limit of {V2_MAX_LENGTH}")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return NEED_MORE
    command = COMMAND_LOCAL if ver_cmd & 0x0F == 0 else COMMAND_PROXY
    if command == COMMAND_LOCAL:
        # The spec: the receiver discards the whole block, family included.
        return Done(total, 2, COMMAND_LOCAL, None, None)
    family, protocol = fam_proto >> 4, fam_proto & 0x0F
    address_length = _V2_ADDRESS_LENGTH[family]
    if length < address_length:
        return Invalid(f"v2: length {length} is too short for its addresses")
    block = data[V2_FIXED_LENGTH:total]
    source: Address | None = None
    destination: Address | None = None
    if protocol == PROTO_STREAM and family == AF_INET:
        source_port, destination_port = struct.unpack_from("!HH", block, 8)
        source = (socket.inet_ntop(socket.AF_INET, block[0:4]), source_port)
        destination = (socket.inet_ntop(socket.AF_INET, block[4:8]), destination_port)
    elif protocol == PROTO_STREAM and family == AF_INET6:
        source_port, destination_port = struct.unpack_from("!HH", block, 32)
        source = (socket.inet_ntop(socket.AF_INET6, block[0:16]), source_port)
        destination = (socket.inet_ntop(socket.AF_INET6, block[16:32]), destination_port)
    tlvs: list[tuple[int, bytes]] = []
    offset = address_length
    while offset < length:
        if length - offset < 3:
            return Invalid("v2: truncated TLV")
        kind = block[offset]
        size = (block[offset + 1] << 8) | block[offset + 2]
        start = offset + 3
        if start + size > length:
            return Invalid(f"v2: TLV 0x{kind:02x} runs past the header")
        value = block[start : start + size]
        if kind == TLV_CRC32C:
            if size != 4:
                return Invalid("v2: CRC32C TLV is not 4 bytes")
            at = V2_FIXED_LENGTH + start
            zeroed = data[:at] + b"\x00\x00\x00\x00" + data[at + 4 : total]
            if crc32c(zeroed) != int.from_bytes(value, "big"):
                return Invalid("v2: CRC32C mismatch")
        tlvs.append((kind, value))
        offset = start + size
    return Done(total, 2, COMMAND_PROXY, source, destination, tuple(tlvs))


def _v2_check_version(ver_cmd: int) -> str:
    if ver_cmd >> 4 != 2:
        return f"v2: version {ver_cmd >> 4} is not 2"
    if ver_cmd & 0x0F > 1:
        return f"v2: command {ver_cmd & 0x0F} is neither LOCAL nor PROXY"
    return ""


def _v2_check_family(fam_proto: int) -> str:
    if fam_proto >> 4 > AF_UNIX:
        return f"v2: unknown address family {fam_proto >> 4}"
    if fam_proto & 0x0F > PROTO_DGRAM:
        return f"v2: unknown transport protocol {fam_proto & 0x0F}"
    return ""


# --- encoding ----------------------------------------------------------------------------


def _packed(ip: str) -> bytes:
    """The 4 or 16 bytes of an IP literal (ValueError for anything else)."""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in ip else socket.AF_INET, ip)
    except OSError:
        raise ValueError(f"{ip!r} is not an IP address literal") from None


def _same_family(source: Address, destination: Address) -> tuple[bytes, bytes]:
    """Both addresses packed in one family: an IPv4 one beside an IPv6 one becomes
    IPv4-mapped IPv6 (as HAProxy does), since a header carries a single family."""
    src, dst = _packed(source[0]), _packed(destination[0])
    if len(src) != len(dst):
        mapped = b"\x00" * 10 + b"\xff\xff"
        src = mapped + src if len(src) == 4 else src
        dst = mapped + dst if len(dst) == 4 else dst
    return src, dst


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return port


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """A v1 line; ``None`` for either address gives ``PROXY UNKNOWN``."""
    if source is None or destination is None:
        return V1_UNKNOWN
    src, dst = _same_family(source, destination)
    family = socket.AF_INET if len(src) == 4 else socket.AF_INET6
    name = "TCP4" if family == socket.AF_INET else "TCP6"
    line = (
        f"PROXY {name} {socket.inet_ntop(family, src)} {socket.inet_ntop(family, dst)} "
        f"{_check_port(source[1])} {_check_port(destination[1])}\r\n"
    )
    return line.encode("ascii")


def encode_v2(
    source: Address | None,
    destination: Address | None,
    tlvs: tuple[tuple[int, bytes], ...] = (),
    *,
    crc: bool = False,
) -> bytes:
    """A v2 header: PROXY over TCP with the addresses, or LOCAL when either is None.

    ``crc`` appends a CRC32C TLV computed over the whole header.
    """
    if source is None or destination is None:
        ver_cmd, fam_proto, block = 0x20, 0x00, b""
    else:
        src, dst = _same_family(source, destination)
        ver_cmd = 0x21
        fam_proto = (AF_INET if len(src) == 4 else AF_INET6) << 4 | PROTO_STREAM
        block = src + dst + struct.pack("!HH", _check_port(source[1]), _check_port(destination[1]))
    parts = [block]
    for kind, value in tlvs:
        if not 0 <= kind <= 255 or len(value) > 0xFFFF:
            raise ValueError("a TLV type is one byte and its value at most 65535 bytes")
        parts.append(struct.pack("!BH", kind, len(value)) + value)
    if crc:
        parts.append(struct.pack("!BH", TLV_CRC32C, 4) + b"\x00\x00\x00\x00")
    body = b"".join(parts)
    if len(body) > V2_MAX_LENGTH:
        raise ValueError(f"the header would exceed {V2_MAX_LENGTH} bytes")
    header = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam_proto, len(body)) + body
    if crc:
        header = header[:-4] + crc32c(header).to_bytes(4, "big")
    return header


def encode(version: str, source: Address | None, destination: Address | None) -> bytes:
    """``encode_v1`` or ``encode_v2`` by name (``"v1"`` / ``"v2"``), as the config says."""
    if version == "v1":
        return encode_v1(source, destination)
    if version == "v2":
        return encode_v2(source, destination)
    raise ValueError(f"unknown PROXY protocol version {version!r}")
