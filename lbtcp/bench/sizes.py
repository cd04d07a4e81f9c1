"""Byte sizes as operators type them, and back (pure).

The suffixes follow GNU coreutils (``dd``, ``head -c``), which network engineers already know:
``K``/``k``, ``M``, ``G`` and ``KiB``, ``MiB``, ``GiB`` are powers of 1024; ``KB``/``kB``,
``MB``, ``GB`` are powers of 1000; ``B`` or no suffix is bytes. So ``64``, ``1k`` (1024),
``1KiB`` (1024), ``16KiB``, ``1MiB`` (1048576) and ``1MB`` (1000000) are all valid.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}


def parse_size(text: str) -> int:
    """``"1KiB"`` -> 1024 and so on (see the module docstring); ValueError if malformed."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size such as '64', '1KiB' or '1MiB'")
    number, suffix = match.groups()
    unit = _SUFFIXES.get(suffix.lower())
    if unit is None:
        raise ValueError(f"{text!r} has an unknown unit {suffix!r} (use B, KiB, MiB, GiB, k, M, G)")
    value = float(number) * unit if "." in number else int(number) * unit
    if value != int(value):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


def format_bytes(count: float) -> str:
    """A byte count for humans in binary units: ``1536`` -> ``"1.50 KiB"``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
