"""Parsing of ``host:port``, ``[v6]:port`` and CIDR strings (pure)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressError(ValueError):
    """A malformed address; the message says what is wrong with it."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A host (IP literal or DNS name) and a port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_port(text: str, whole: str) -> int:
    if not text.isdigit():
        raise AddressError(f"{whole!r} has a bad port {text!r}")
    port = int(text)
    if not 0 <= port <= 65535:
        raise AddressError(f"{whole!r} has a port out of range (0-65535)")
    return port


def _check_hostname(host: str, whole: str) -> None:
    labels = host.rstrip(".").split(".")
    for label in labels:
        if not label or len(label) > 63:
            raise AddressError(f"{whole!r} has a bad host name")
        if not all(c.isalnum() or c in "-_" for c in label) or not label.isascii():
            raise AddressError(f"{whole!r} has a bad host name")
        if label.startswith("-") or label.endswith("-"):
            raise AddressError(f"{whole!r} has a bad host name")


def parse_endpoint(text: str, *, allow_names: bool = True) -> Endpoint:
    """Parse ``IP:PORT``, ``[IPv6]:PORT`` or ``NAME:PORT``.

    Raises AddressError with a message fit for an operator, e.g. ``'10.0.0.1' has no port``.
    """
    if not isinstance(text, str) or not text:
        raise AddressError("an empty address")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise AddressError(f"{text!r} has no closing ']'")
        host = text[1:close]
        rest = text[close + 1 :]
        if not rest.startswith(":"):
            raise AddressError(f"{text!r} has no port")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
        return Endpoint(str(ip), _parse_port(rest[1:], text))
    if text.count(":") > 1:
        raise AddressError(f"{text!r}: write IPv6 addresses as [addr]:port")
    if ":" not in text:
        raise AddressError(f"{text!r} has no port")
    host, port_text = text.rsplit(":", 1)
    port = _parse_port(port_text, text)
    if not host:
        raise AddressError(f"{text!r} has no host")
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        if not allow_names:
            raise AddressError(f"{text!r}: {host!r} is not an IP address") from None
        if all(part.isdigit() for part in host.split(".")):
            raise AddressError(f"{text!r}: {host!r} is not a valid IPv4 address") from None
        _check_hostname(host, text)
        return Endpoint(host.lower(), port)
    return Endpoint(str(ip4), port)


def parse_cidr(text: str) -> Network:
    """Parse ``10.0.0.0/8``, ``::1/128`` or a bare address (a /32 or /128)."""
    if not isinstance(text, str) or not text:
        raise AddressError("an empty CIDR")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise AddressError(f"{text!r} is not a CIDR such as '10.0.0.0/8'") from None


def format_address(host: str, port: int) -> str:
    """``host:port`` with IPv6 hosts bracketed, as operators write them."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
