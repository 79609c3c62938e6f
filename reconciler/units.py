"""Mesos units: durations ("500ms", "15secs", "1mins", "2hrs") and megabyte quantities ("128", "128Mi", "1Gi")."""

from __future__ import annotations

import re

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
_DURATION_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]+)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Seconds from a Mesos duration string. A bare number is seconds (as Mesos flags accept)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative: {value!r}")
        return float(value)
    m = _DURATION_RE.match(value.lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(
            f"invalid duration {value!r}: expected a number and a unit, e.g. 500ms, 15secs, 1mins, 2hrs"
        )
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def format_duration(seconds: float) -> str:
    """The shortest Mesos spelling that round-trips (10.0 -> '10secs', 0.5 -> '500ms')."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}hrs"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}mins"
    if seconds == int(seconds):
        return f"{int(seconds)}secs"
    return f"{round(seconds * 1000, 3):g}ms"


_BINARY_SUFFIX_MB = {"ki": 1 / 1024, "mi": 1.0, "gi": 1024.0, "ti": 1024.0 * 1024.0}
_QUANTITY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]{0,2})\s*$")


def parse_megabytes(value: str | int | float) -> float:
    """Megabytes (Mesos units) from a number of MB or a binary-suffixed string ("128Mi", "1Gi")."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, (int, float)):
        mb = float(value)
    else:
        m = _QUANTITY_RE.match(value)
        if not m:
            raise ValueError(f"invalid quantity {value!r}: expected MB as a number, or a string like 128Mi or 1Gi")
        number, suffix = float(m.group(1)), m.group(2).lower()
        if suffix == "":
            mb = number
        elif suffix in _BINARY_SUFFIX_MB:
            mb = number * _BINARY_SUFFIX_MB[suffix]
        else:
            raise ValueError(f"invalid quantity {value!r}: unit {m.group(2)!r} is not one of Ki, Mi, Gi, Ti")
    if mb < 0:
        raise ValueError(f"quantity must not be negative: {value!r}")
    return mb


def megabytes_to_bytes(mb: float) -> int:
    return int(round(mb * 1024 * 1024))
