"""The TLS ClientHello's server name and ALPN list, and the SNI route table (pure).

Theory of operation. ``parse`` is fed everything a client has sent so far and answers:
``NEED_MORE``, ``Hello(server_name, alpn)``, ``NOT_TLS`` or ``Invalid(why)``. It keeps no
state of a connection (only the remembered verdicts below, which never change an answer):
the caller buffers and calls again with more bytes. Every verdict other than
``NEED_MORE`` is final: it depends only on bytes that a longer input shares, so feeding a
hello byte by byte gives the same verdict as feeding it whole.

What is read: the TLS record header (content type 22 = handshake, version 3.x, a length of
1..16,384), the handshake header (type 1 = ClientHello, a 24-bit length), the ClientHello's
fixed fields, and its extensions, with a bounds check before every read; ``server_name``
(type 0, name type 0 = host_name) and ALPN (type 16) are kept. The verdict waits for the
whole ClientHello, but the extension walk stops as soon as both ``server_name`` and ALPN are
read: the extensions after them (half of a common hello) are the TLS server's to validate,
so a malformed or repeated extension after both gives a ``Hello``, not ``Invalid`` (the
server then fails the handshake; the route was already known). Before that point, or in a
hello without ALPN, any malformed extension is ``Invalid`` as before. The verdict on each
of the two bodies is remembered by its bytes (``_NAMES``, ``_PROTOCOLS``: bounded, cleared
when full), since a listener sees the same few names and ALPN lists again and again; so is
the layout of a whole hello (``_LAYOUTS``): a hello whose header bytes, session id length
and bytes from the cipher suites to the end of the later of the two extensions are those
of one seen before (the random and the session id aside, which the walk does not read)
gets that one's verdict after one lookup and one compare. A remembered verdict is the one
the checks gave on the same bytes, so this changes the cost, never the answer. A client
that shuffles its extensions (Chrome and Firefox do) rarely repeats a layout and pays the
walk.

Only the first record is read: ``MAX_INSPECT`` = 5 + 16,384 bytes, one record's maximum, is
all a client can make lbtcp hold. A ClientHello longer than its record (a handshake message
fragmented over several records, which RFC 8446 allows but no common client sends for
hellos under 16 KiB) is answered ``Invalid`` and the listener uses its default pool, as for
any hello it cannot read.

The first byte decides "not TLS" at once (anything but 22), as does a second byte other than
3: such a client goes to the default pool without any wait.

``Router`` is the route table of one listener, built once: a dict of exact names and a dict
of wildcard suffixes. ``match`` looks the name up, then each of its suffixes from the longest
(one dict lookup per dot), so the longest match wins and its cost does not grow with the
number of routes; its answers are remembered by name (bounded), so a name asked again costs
one lookup.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

RECORD_HANDSHAKE = 22
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
MAX_RECORD = 16384
MAX_INSPECT = 5 + MAX_RECORD

# What a host name in SNI may hold (RFC 6066: a DNS host name, ASCII, no trailing dot; we
# accept one and '_' too, as resolvers do). Anything else is refused as malformed rather than
# matched, so that odd bytes never reach a log line or a route.
_HOST_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?$")
# ALPN names as they are logged unchanged: visible ASCII but for the log's own separators.
_LOG_SAFE = bytes(b for b in range(0x21, 0x7F) if b not in b',=\\"')
# The same, for fullmatch() on the hello's bytes in place (no anchors: with a start
# position '^' would not match there).
_HOST_BYTES_RE = re.compile(rb"[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?")
_HEADER = struct.Struct("!HH").unpack_from
_U16 = struct.Struct("!H").unpack_from  # an extension's type and length, one C call
# The record header (type, major, minor, length) and the handshake header (type, 24-bit
# length as 8 + 16 bits): one C call instead of nine indexings (the parse runs once per
# routed connection; callgrind: the fixed fields cost more than any one extension).
_FIXED = struct.Struct("!BBBHBBH").unpack_from
# A server_name body of one entry, the only shape clients send: list length, name type,
# name length.
_SNI_ENTRY = struct.Struct("!HBH").unpack_from
T = TypeVar("T")
_ROUTE_RE = re.compile(r"^(\*\.)?[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*$")


class NeedMore:
    """Not enough bytes yet for a verdict."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


class NotTls:
    """The first bytes cannot start a TLS handshake record."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NOT_TLS"


NEED_MORE = NeedMore()
NOT_TLS = NotTls()


class Hello(NamedTuple):
    """A complete ClientHello: its host name (lower case, no trailing dot; None without
    SNI) and its ALPN protocol names (printable ASCII, other bytes as ``\\xNN``).

    A NamedTuple rather than a frozen dataclass: it is built once per routed connection,
    and a frozen dataclass's ``__init__`` (``object.__setattr__`` per field) cost about
    6,000 instructions of a parse's 59,000 (callgrind)."""

    server_name: str | None
    alpn: tuple[str, ...]
    length: int  # bytes of the record header, handshake header and hello


# A Hello built without the NamedTuple's own ``__new__`` (a Python function): one C call.
_new_hello = tuple.__new__


@dataclass(frozen=True, slots=True)
class Invalid:
    """A TLS handshake record that is not a ClientHello lbtcp can read."""

    why: str


Verdict = NeedMore | NotTls | Hello | Invalid


def parse(data: bytes) -> Verdict:
    """The verdict on a connection's first bytes ``data`` (see the module doc)."""
    # A hello laid out as one seen before gets that one's verdict: the same 9 header bytes
    # (so the same length), the same session id length, and the same bytes from the cipher
    # suites to where the walk stopped (the end of the later of server_name and ALPN); the
    # random and the session id, which nothing below reads, may differ. One lookup and one
    # compare in place instead of the checks and the walk.
    layout = _LAYOUTS.get(data[:9])
    if layout is not None:
        end, session_id, known, verdict = layout
        if len(data) >= end and data[43] == session_id and data.startswith(known, 44 + session_id):
            return verdict
    size = len(data)
    if size < 9:
        return _header(data, size)
    # Every header field at once (one C call), all checked in one test; which check failed,
    # if one did, ``_header`` says (it reads the fields one by one, as they come, so that a
    # prefix of fewer than 9 bytes gets the same verdict).
    first, major, _, record_length, kind, high, low = _FIXED(data)
    end = 9 + ((high << 16) | low)
    if (
        first != RECORD_HANDSHAKE
        or major != 3
        or kind != HANDSHAKE_CLIENT_HELLO
        or not 0 < record_length <= MAX_RECORD
        or end - 5 > record_length  # the hello and its 4-byte header, past the record
    ):
        return _header(data, 9)
    if size < end:
        return NEED_MORE
    hello = data if size == end else data[:end]
    # The ClientHello's fixed fields: legacy_version (2) and random (32) from offset 9, then
    # the session id, cipher suites and compression methods, each length-prefixed, and the
    # extensions' length. Read optimistically from the hello alone (a read past its end
    # raises); anything amiss goes to ``_fixed_fields``, which checks them one by one for
    # the verdict and its reason.
    try:
        session_id = hello[43]
        at = 44 + session_id
        (suites,) = _U16(hello, at)
        at += 2 + suites
        methods = hello[at]
        at += 1 + methods
        (extensions,) = _U16(hello, at)
        fine = (
            session_id <= 32
            and suites >= 2
            and not suites & 1
            and methods > 0
            and at + 2 + extensions == end
        )
    except (IndexError, struct.error):
        fine = False
    if fine:
        at += 2
    else:
        start = _fixed_fields(hello, end)
        if not isinstance(start, int):
            return start
        at = start
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    # Only the two extensions we read are checked for repeats (RFC 8446 §4.2 forbids any):
    # two server_name extensions would make the route ambiguous.
    seen_name = seen_alpn = False
    # The walk, the parse's inner loop, stops once both of ours are read: what follows
    # them (half a dozen extensions in a common hello) is the TLS server's to validate,
    # and that server refuses a malformed or repeated one. Reading from the hello alone
    # lets struct's own bound check stand for "header past the end"; a skipped body past
    # the end is caught once, after the walk.
    kind = 0
    while at < end:
        try:
            kind, length = _HEADER(hello, at)
        except struct.error:
            return Invalid("an extension header runs past the ClientHello")
        at += 4 + length
        if kind == 0:  # server_name
            if at > end:
                return Invalid("extension 0 runs past the ClientHello")
            if seen_name:
                return Invalid("extension 0 appears twice")
            seen_name = True
            body = hello[at - length : at]
            try:
                name = _NAMES[body]
            except KeyError:
                name = _learn(_NAMES, 1024, body, _server_name(body))
            if name.__class__ is Invalid:
                return name
            server_name = name  # type: ignore[assignment]
            if seen_alpn:
                break
        elif kind == 16:  # ALPN
            if at > end:
                return Invalid("extension 16 runs past the ClientHello")
            if seen_alpn:
                return Invalid("extension 16 appears twice")
            seen_alpn = True
            body = hello[at - length : at]
            try:
                protocols = _PROTOCOLS[body]
            except KeyError:
                protocols = _learn(_PROTOCOLS, 256, body, _alpn(body))
            if protocols.__class__ is Invalid:
                return protocols
            alpn = protocols  # type: ignore[assignment]
            if seen_name:
                break
    else:
        if at > end:
            return Invalid(f"extension {kind} runs past the ClientHello")
        return _new_hello(Hello, (server_name, alpn, end))
    # Stopped once both were read: the verdict depends on the bytes up to here only. Learn
    # this layout on every eighth such walk: a client whose layouts repeat is learned within
    # a few connections, and one whose layouts never repeat (shuffled extensions) does not
    # pay for learning each of them (~2,000 instructions).
    found = _new_hello(Hello, (server_name, alpn, end))
    _walks[0] += 1
    if not _walks[0] & 7:
        _learn_layout(hello, at, found)
    return found


def _header(data: bytes, size: int) -> NeedMore | NotTls | Invalid:
    """The verdict on the first ``size`` (at most 9) bytes: the record and handshake
    headers, field by field; NEED_MORE when they are fine so far."""
    if size == 0:
        return NEED_MORE
    if data[0] != RECORD_HANDSHAKE:
        return NOT_TLS
    if size < 2:
        return NEED_MORE
    if data[1] != 3:
        return NOT_TLS
    if size < 5:
        return NEED_MORE
    record_length = (data[3] << 8) | data[4]
    if record_length == 0 or record_length > MAX_RECORD:
        return Invalid(f"record length {record_length} is not 1..{MAX_RECORD}")
    if size < 6:
        return NEED_MORE
    if data[5] != HANDSHAKE_CLIENT_HELLO:
        return Invalid(f"handshake type {data[5]} is not a ClientHello")
    if size < 9:
        return NEED_MORE
    if ((data[6] << 16) | (data[7] << 8) | data[8]) + 4 > record_length:
        return Invalid("the ClientHello does not fit in the first record")
    return NEED_MORE


def _fixed_fields(hello: bytes, end: int) -> int | Hello | Invalid:
    """The ClientHello's fixed fields checked one by one: where its extensions start, or
    the verdict (a Hello without extensions, or why it is malformed)."""
    if end < 44:
        return Invalid("ClientHello shorter than its fixed fields")
    session_id = hello[43]
    if session_id > 32:
        return Invalid(f"session id of {session_id} bytes (at most 32)")
    at = 44 + session_id
    if at + 2 > end:
        return Invalid("ClientHello ends before its cipher suites")
    suites = (hello[at] << 8) | hello[at + 1]
    if suites < 2 or suites % 2:
        return Invalid(f"cipher suites of {suites} bytes")
    at += 2 + suites
    if at + 1 > end:
        return Invalid("ClientHello ends before its compression methods")
    methods = hello[at]
    if methods < 1:
        return Invalid("no compression method")
    at += 1 + methods
    if at > end:
        return Invalid("ClientHello ends inside its compression methods")
    if at == end:
        return _new_hello(Hello, (None, (), end))  # no extensions at all (SSL 3.0 style)
    if at + 2 > end:
        return Invalid("ClientHello ends inside its extensions length")
    if at + 2 + ((hello[at] << 8) | hello[at + 1]) != end:
        return Invalid("extensions length does not match the ClientHello")
    return at + 2


# What the two extensions' bodies said, by their bytes: a listener sees the same few names
# (its routes') and ALPN lists again and again, and a lookup costs a fraction of checking a
# name again. Bodies of at most _CACHED bytes only; a full cache starts afresh, so a client
# sending new names each time costs one dict insert more, never memory.
_NAMES: dict[bytes, str | Invalid | None] = {}
_PROTOCOLS: dict[bytes, tuple[str, ...] | Invalid] = {}
_CACHED = 300


# Hellos by their 9 header bytes: (the hello's end, its session id length, its bytes from
# the cipher suites to where the walk stopped, the verdict). One layout per header, the
# last one learned; bounded, cleared when full. Clients that shuffle their extensions
# (Chrome, Firefox) or send GREASE values rarely repeat a layout and take the walk.
_LAYOUTS: dict[bytes, tuple[int, int, bytes, Hello]] = {}
_walks = [0]  # walks that stopped early (a list: changed in place, no ``global``)


def _learn_layout(hello: bytes, stop: int, verdict: Hello) -> None:
    """Remember the layout of ``hello`` (the whole ClientHello, nothing after it), whose
    walk stopped at ``stop`` with ``verdict``."""
    session_id = hello[43]
    start = 44 + session_id
    if stop - start <= _CACHED_LAYOUT:
        if len(_LAYOUTS) >= 256:
            _LAYOUTS.clear()
        _LAYOUTS[hello[:9]] = (len(hello), session_id, hello[start:stop], verdict)


_CACHED_LAYOUT = 2048


def _learn(cache: dict[bytes, T], size: int, body: bytes, verdict: T) -> T:
    """``verdict`` on ``body``, kept in ``cache`` (of at most ``size`` entries)."""
    if len(body) <= _CACHED:
        if len(cache) >= size:
            cache.clear()
        cache[body] = verdict
    return verdict


def _server_name(body: bytes) -> str | Invalid | None:
    """The host_name of a server_name extension ``body`` (RFC 6066 §3)."""
    end = len(body)
    if end == 0:
        return None  # an empty body: how a server acknowledges it; odd, but harmless
    if end >= 5:
        # The common shape, one host_name entry filling the list: check the name on the
        # body's bytes where they lie (no slice until it is known good).
        listed, name_type, name_length = _SNI_ENTRY(body)
        if (
            name_type == 0
            and listed == end - 2
            and name_length == listed - 3
            and name_length <= 254
            and _HOST_BYTES_RE.fullmatch(body, 5)
        ):
            name = body[5:].decode("ascii").lower()
            return name[:-1] if name[-1] == "." else name
    if end < 2 or 2 + ((body[0] << 8) | body[1]) != end:
        return Invalid("server_name list length does not match its extension")
    at = 2
    host: str | None = None
    while at < end:
        if at + 3 > end:
            return Invalid("server_name entry header runs past its list")
        name_type = body[at]
        name_end = at + 3 + ((body[at + 1] << 8) | body[at + 2])
        if name_end > end:
            return Invalid("server_name entry runs past its list")
        if name_type == 0:
            if host is not None:
                return Invalid("two host names in server_name")
            raw = body[at + 3 : name_end]
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                return Invalid("server_name host name is not ASCII")
            # fullmatch: '$' alone would let a name end in '\n' (into the access log).
            if not _HOST_RE.fullmatch(text) or len(text) > 254:
                return Invalid("server_name host name is not a DNS name")
            host = text.lower().removesuffix(".")
        at = name_end
    return host


def _alpn(body: bytes) -> tuple[str, ...] | Invalid:
    """The protocol names of an ALPN extension ``body`` (RFC 7301 §3.1)."""
    end = len(body)
    if end < 2 or 2 + ((body[0] << 8) | body[1]) != end:
        return Invalid("ALPN list length does not match its extension")
    at = 2
    names: list[str] = []
    while at < end:
        name_end = at + 1 + body[at]
        if name_end == at + 1 or name_end > end:
            return Invalid("an ALPN protocol name is empty or runs past its list")
        names.append(printable(body[at + 1 : name_end]))
        at = name_end
    return tuple(names)


def printable(raw: bytes) -> str:
    """Bytes as log-safe text: visible ASCII as is, anything else (space, ',', '=' and '\\'
    included, which would split or confuse a log field) as ``\\xNN``."""
    if not raw.translate(None, _LOG_SAFE):  # nothing left once the safe bytes are gone
        return raw.decode("ascii")  # the common case ("h2", "http/1.1"): no loop per byte
    return "".join(
        chr(b) if 0x21 <= b <= 0x7E and b not in b',=\\"' else f"\\x{b:02x}" for b in raw
    )


# --- routes --------------------------------------------------------------------------------


def normalize_route(sni: str) -> str:
    """A route's ``sni`` as it is compared: lower case, without a trailing dot. Raises
    ValueError (with the reason) for anything that is not a host name or ``*.suffix``."""
    name = sni.lower()
    if name.endswith(".") and not name.endswith(".."):
        name = name[:-1]
    if len(name) > 253 or not _ROUTE_RE.match(name):
        if "*" in name and not name.startswith("*."):
            raise ValueError(
                f"{sni!r}: a wildcard must be the whole first label, as '*.example.com'"
            )
        raise ValueError(
            f"{sni!r} is not a host name or '*.suffix' (labels of 1-63 letters, digits, '-', '_')"
        )
    return name


class Router(Generic[T]):
    """The routes of one listener: ``match(name)`` gives the target of the longest route
    matching ``name`` (exact names first, then ``*.suffix`` from the longest suffix), or
    None. Routes must be normalized and distinct (config.py checks both)."""

    __slots__ = ("exact", "seen", "suffixes")

    def __init__(self, routes: Iterable[tuple[str, T]]) -> None:
        self.exact: dict[str, T] = {}
        # "*.example.com" is kept as ".example.com": a name matches when it ends with it and
        # has something before it.
        self.suffixes: dict[str, T] = {}
        for sni, target in routes:
            if sni.startswith("*."):
                self.suffixes[sni[1:]] = target
            else:
                self.exact[sni] = target
        # Answers already given, by the name as asked: clients ask for the same few names,
        # and the parser hands out the same str for the same name (its hash computed once),
        # so a repeat costs one dict lookup instead of a lower(), slices and their hashes
        # (callgrind: about 12,000 instructions down to a few hundred). Bounded, cleared
        # when full; a reload builds a new Router, so the answers never outlive the routes.
        self.seen: dict[str, T | None] = {}

    def match(self, name: str) -> T | None:
        """``name`` from a ClientHello (any case, a trailing dot allowed)."""
        try:
            return self.seen[name]
        except KeyError:
            pass
        target = self.lookup(name)
        seen = self.seen
        if len(seen) >= _SEEN_NAMES:
            seen.clear()
        seen[name] = target
        return target

    def lookup(self, name: str) -> T | None:
        """``match`` without the remembered answers."""
        name = name.lower()
        if name.endswith("."):
            name = name[:-1]
        target = self.exact.get(name)
        if target is not None:
            return target
        suffixes = self.suffixes
        if not suffixes:
            return None
        dot = name.find(".", 1)
        while dot > 0:
            target = suffixes.get(name[dot:])
            if target is not None:
                return target
            dot = name.find(".", dot + 1)
        return None


_SEEN_NAMES = 1024
