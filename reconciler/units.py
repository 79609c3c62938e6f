"""Mesos units: durations ("500ms", "15secs", "1mins", "2hrs"), sizes ("10MB", "512KB": stout's Bytes)
and the megabyte quantities of manifests ("128", "128Mi", "1Gi").

Every parser here raises ValueError and nothing else, whatever it is given, and its message quotes
the input briefly (control characters and undecodable bytes escaped), so a caller can put it in a
one-line error as it is.
"""

from __future__ import annotations

import math
import re
from typing import Any

MAX_QUOTED = 40    # characters of an input a message quotes


class OutOfRange(ValueError, OverflowError):
    """A number past what a float or a 64-bit byte count holds.

    A ValueError like every other refusal here; also an OverflowError, which a caller that bounds
    the number itself (models.py: "too large: at most ...") maps to its own message."""


def quoted(value: Any, limit: int = MAX_QUOTED) -> str:
    """A value as a message shows it: repr-like, on one line, at most `limit` characters of a string.

    Bytes that were not UTF-8 (surrogate escapes from argv or the environment) show as \\xNN, as
    the operator typed them; a string cut short says how long it was."""
    if isinstance(value, str):
        shown = _escaped(value[:limit])
        return shown if len(value) <= limit else f"{shown}... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    kind = "list" if isinstance(value, (list, tuple)) else type(value).__name__
    return f"a {kind}"


def _escaped(text: str) -> str:
    quote = '"' if "'" in text and '"' not in text else "'"
    return quote + "".join(_escape_char(ch, quote) for ch in text) + quote


def _escape_char(ch: str, quote: str) -> str:
    if ch in ("\\", quote):
        return "\\" + ch
    if ch.isprintable():
        return ch
    if 0xDC80 <= ord(ch) <= 0xDCFF:       # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{ord(ch) - 0xDC00:02x}"
    return repr(ch)[1:-1]


def _finite(number: float, value: Any, what: str) -> float:
    if math.isnan(number):
        raise ValueError(f"{what} is not a number: {quoted(value)}")
    if math.isinf(number):
        raise OutOfRange(f"{what} out of range (not a finite number): {quoted(value)}")
    return number


def _as_float(value: int | float, what: str) -> float:
    try:
        return _finite(float(value), value, what)
    except OverflowError:                 # an int past a float's range; OutOfRange is one too
        raise OutOfRange(f"{what} out of range (not a finite number): {quoted(value)}") from None


# Durations -------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9, "nanoseconds": 1e-9,
    "us": 1e-6, "microseconds": 1e-6,
    "ms": 1e-3, "millisecs": 1e-3, "milliseconds": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hours": 3600.0,
    "d": 86400.0, "days": 86400.0,
    "w": 604800.0, "weeks": 604800.0,
}
_DURATION_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*")


def parse_duration(value: str | int | float) -> float:
    """Seconds from a Mesos duration string. A bare number is seconds (as Mesos flags accept)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a duration: {quoted(value)}")
    if not isinstance(value, str):
        if value < 0:
            raise ValueError(f"duration must not be negative: {quoted(value)}")
        return _as_float(value, "duration")
    m = _DURATION_RE.fullmatch(value)
    if not m or m.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(
            f"invalid duration {quoted(value)}: expected a number and a unit, e.g. 500ms, 15secs, 1mins, 2hrs"
        )
    return _finite(float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()], value, "duration")


def format_duration(seconds: float) -> str:
    """The shortest Mesos spelling that round-trips (10.0 -> '10secs', 0.5 -> '500ms')."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}hrs"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}mins"
    if seconds == int(seconds):
        return f"{int(seconds)}secs"
    return f"{round(seconds * 1000, 3):g}ms"


# Sizes (flags): Mesos's Bytes ------------------------------------------------------------------

KB, MB, GB, TB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_BYTES_UNITS = {"B": 1, "KB": KB, "MB": MB, "GB": GB, "TB": TB}
MAX_BYTES = (1 << 63) - 1         # a file size is a signed 64-bit off_t
_BYTES_RE = re.compile(r"([0-9]+)([A-Za-z]*)")                 # ASCII only: no '٣', no '1_000'
_FRACTION_RE = re.compile(r"[0-9]*\.[0-9]+[A-Za-z]*|[0-9]+\.[0-9]*[A-Za-z]*")
_OTHER_UNITS = {"K": "KB", "M": "MB", "G": "GB", "T": "TB", "KI": "KB", "MI": "MB", "GI": "GB", "TI": "TB",
                "KIB": "KB", "MIB": "MB", "GIB": "GB", "TIB": "TB"}
_UNIT_WORDS = {1: "bytes", KB: "KB", MB: "MB", GB: "GB", TB: "TB"}


def parse_bytes(value: str | int, bare_unit: int | None = None) -> int:
    """Bytes from a Mesos size: a whole number of ASCII digits and a unit B, KB, MB, GB or TB, in any
    case, binary multiples (1KB = 1024 bytes), no sign, no fraction, no space (stout's Bytes::parse).

    Mesos refuses a bare number; `bare_unit` (a multiple of bytes) accepts one, for flags that
    took one before. An integer (from YAML) is a bare number."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"not a size: {quoted(value)}")
    if isinstance(value, int):
        return _bare_size(value, value, bare_unit)
    m = _BYTES_RE.fullmatch(value)
    if m is None:
        raise ValueError(_size_syntax_error(value, bare_unit))
    number, unit = int(m.group(1)), m.group(2).upper()
    if not unit:
        return _bare_size(number, value, bare_unit)
    if unit in _OTHER_UNITS:
        raise ValueError(f"invalid size {quoted(value)}: Mesos spells it {m.group(1)[:20]}{_OTHER_UNITS[unit]} "
                         "(units B, KB, MB, GB, TB, binary multiples)")
    if unit not in _BYTES_UNITS:
        raise ValueError(_size_syntax_error(value, bare_unit))
    return _within_range(number * _BYTES_UNITS[unit], value)


def _bare_size(number: int, value: str | int, bare_unit: int | None) -> int:
    if bare_unit is None:
        raise ValueError(f"invalid size {quoted(value)}: give a unit, e.g. 10MB (B, KB, MB, GB or TB)")
    if number < 0:
        raise ValueError(f"size must not be negative: {quoted(value)}")
    return _within_range(number * bare_unit, value)


def _within_range(size: int, value: str | int) -> int:
    if size > MAX_BYTES:
        raise OutOfRange(f"size too large (a size is less than 8388608TB, 2^63 bytes): {quoted(value)}")
    return size


def _size_syntax_error(value: str, bare_unit: int | None) -> str:
    if _FRACTION_RE.fullmatch(value):
        return (f"invalid size {quoted(value)}: Mesos sizes are whole numbers; use a smaller unit "
                "(1536KB, not 1.5MB)")
    bare = f"{_UNIT_WORDS.get(bare_unit, 'bytes')} or " if bare_unit is not None else ""
    return f"invalid size {quoted(value)}: expected {bare}a number with a unit, e.g. 10MB, 512KB, 4096B"


def format_bytes(size: int) -> str:
    """Mesos's spelling: the largest unit that loses nothing (10485760 -> '10MB', 1000 -> '1000B')."""
    for unit in ("TB", "GB", "MB", "KB"):
        if size and size % _BYTES_UNITS[unit] == 0:
            return f"{size // _BYTES_UNITS[unit]}{unit}"
    return f"{size}B"


def format_bytes_approx(size: int) -> str:
    """A size for reading, not for parsing back: one decimal in the largest unit it reaches, in Mesos's unit
    names (1431854 -> '1.4MB', 512 -> '512B'), as `images list` and a pull's progress show them."""
    for unit in ("TB", "GB", "MB", "KB"):
        if size >= _BYTES_UNITS[unit]:
            return f"{size / _BYTES_UNITS[unit]:.1f}{unit}"
    return f"{size}B"


# Quantities (manifests): megabytes -------------------------------------------------------------

_BINARY_SUFFIX_MB = {"ki": 1 / 1024, "mi": 1.0, "gi": 1024.0, "ti": 1024.0 * 1024.0}
_QUANTITY_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]{0,2})\s*")


def parse_megabytes(value: str | int | float) -> float:
    """Megabytes (Mesos units) from a number of MB or a binary-suffixed string ("128Mi", "1Gi")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"not a quantity: {quoted(value)}")
    if isinstance(value, str):
        mb = _megabytes_from_text(value)
    elif value < 0:
        raise ValueError(f"quantity must not be negative: {quoted(value)}")
    else:
        mb = _as_float(value, "quantity")
    return mb


def _megabytes_from_text(value: str) -> float:
    m = _QUANTITY_RE.fullmatch(value)
    if not m:
        raise ValueError(f"invalid quantity {quoted(value)}: expected MB as a number, or a string like 128Mi or 1Gi")
    number, suffix = float(m.group(1)), m.group(2).lower()
    if suffix and suffix not in _BINARY_SUFFIX_MB:
        raise ValueError(f"invalid quantity {quoted(value)}: unit {quoted(m.group(2))} is not one of Ki, Mi, Gi, Ti")
    return _finite(number * _BINARY_SUFFIX_MB.get(suffix, 1.0), value, "quantity")


def megabytes_to_bytes(mb: float) -> int:
    return int(round(mb * 1024 * 1024))
