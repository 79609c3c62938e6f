"""Mesos units: what the flags and manifests accept, and that every refusal is a short ValueError."""

from __future__ import annotations

import math
from typing import Any

import pytest

from reconciler.units import (
    OutOfRange,
    format_bytes,
    parse_bytes,
    parse_duration,
    parse_megabytes,
    quoted,
)

HUGE_INT = 10 ** 309          # past a float: float() of it is an OverflowError


# Durations and megabytes: the manifests' grammar, unchanged -------------------------------------

@pytest.mark.parametrize("given, seconds", [
    ("500ms", 0.5), ("15secs", 15.0), ("1mins", 60.0), ("2hrs", 7200.0), ("1.5s", 1.5), (" 10secs ", 10.0),
    (10, 10.0), (0.25, 0.25),
])
def test_durations_keep_their_grammar(given: Any, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given, mb", [
    ("128", 128.0), (128, 128.0), (0.5, 0.5), ("128Mi", 128.0), ("1Gi", 1024.0), ("512Ki", 0.5), ("1Ti", 1048576.0),
])
def test_megabytes_keep_their_grammar(given: Any, mb: float) -> None:
    assert parse_megabytes(given) == mb


@pytest.mark.parametrize("given", [
    HUGE_INT, "9" * 400 + "secs", "9" * 306 + "weeks", math.inf, math.nan, -math.inf, None, [10], {"s": 1}, True,
    "10 parsecs", "٣secs", "1_000secs",
])
def test_a_duration_is_a_finite_number_of_seconds_or_a_value_error(given: Any) -> None:
    with pytest.raises(ValueError) as refused:
        parse_duration(given)
    assert type(refused.value) in (ValueError, OutOfRange)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


@pytest.mark.parametrize("given", [
    HUGE_INT, "9" * 400, "9" * 306 + "Ti", math.inf, math.nan, None, ["1Gi"], True, "٣", "1_000",
])
def test_a_quantity_is_a_finite_number_of_megabytes_or_a_value_error(given: Any) -> None:
    with pytest.raises(ValueError) as refused:
        parse_megabytes(given)
    assert type(refused.value) in (ValueError, OutOfRange)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200


def test_a_number_past_a_float_is_out_of_range_which_callers_that_bound_numbers_map_to_too_large() -> None:
    # models.py turns an OverflowError into its own "too large: at most ..." message.
    for parse, given in ((parse_duration, HUGE_INT), (parse_duration, "9" * 400 + "secs"),
                         (parse_megabytes, HUGE_INT), (parse_megabytes, "9" * 400 + "Gi")):
        with pytest.raises(OverflowError):
            parse(given)
    with pytest.raises(ValueError, match="^duration out of range \\(not a finite number\\): a number of about 310 digits$"):
        parse_duration(HUGE_INT)


def test_messages_quote_at_most_40_characters_with_control_characters_escaped() -> None:
    with pytest.raises(ValueError) as refused:
        parse_duration("\x1b[2J" + "x" * 100_000)
    message = str(refused.value)
    assert message == ("invalid duration '\\x1b[2Jxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (100004 characters): "
                       "expected a number and a unit, e.g. 500ms, 15secs, 1mins, 2hrs")


def test_quoted_shows_undecodable_bytes_as_typed_and_strings_as_repr_does() -> None:
    assert quoted("rack:\udcff") == "'rack:\\xff'"      # argv's b'rack:\xff'
    assert quoted("a\nb\u2028c") == "'a\\nb\\u2028c'"
    assert quoted("it's") == repr("it's") and quoted("back\\slash") == repr("back\\slash")
    assert quoted(HUGE_INT) == "a number of about 310 digits"
    assert quoted(-1) == "-1" and quoted(None) == "None" and quoted([1, 2]) == "a list"


# Sizes: stout's Bytes -----------------------------------------------------------------------------

@pytest.mark.parametrize("given, size", [
    ("10MB", 10 << 20), ("10mb", 10 << 20), ("512KB", 512 << 10), ("4096B", 4096), ("20GB", 20 << 30),
    ("1TB", 1 << 40), ("0B", 0), ("0MB", 0),
])
def test_sizes_are_mesos_bytes_with_binary_units(given: str, size: int) -> None:
    assert parse_bytes(given) == size


@pytest.mark.parametrize("given, words", [
    ("10", "give a unit, e.g. 10MB"),
    ("1.5MB", "Mesos sizes are whole numbers; use a smaller unit (1536KB, not 1.5MB)"),
    ("1Gi", "Mesos spells it 1GB"),
    ("10MiB", "Mesos spells it 10MB"),
    ("10 MB", "expected a number with a unit, e.g. 10MB, 512KB, 4096B"),
    ("-1MB", "expected a number with a unit"),
    ("+1MB", "expected a number with a unit"),
    ("10XB", "expected a number with a unit"),
    ("MB", "expected a number with a unit"),
    ("", "expected a number with a unit"),
    ("٣MB", "expected a number with a unit"),
    ("1_000B", "expected a number with a unit"),
    ("10MB\n", "expected a number with a unit"),
    (10, "give a unit"),
    (1.5, "not a size: 1.5"),
    (None, "not a size: None"),
    (True, "not a size: True"),
])
def test_sizes_mesos_refuses_are_refused(given: Any, words: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_bytes(given)
    assert words in str(refused.value)


def test_a_bare_number_counts_the_unit_its_flag_documents() -> None:
    assert parse_bytes("10", bare_unit=1 << 20) == parse_bytes(10, bare_unit=1 << 20) == 10 << 20
    assert parse_bytes("4096", bare_unit=1) == 4096
    with pytest.raises(ValueError, match="^invalid size '12parsecs': expected MB or a number with a unit"):
        parse_bytes("12parsecs", bare_unit=1 << 20)
    with pytest.raises(ValueError, match="^size must not be negative: -1$"):
        parse_bytes(-1, bare_unit=1)


@pytest.mark.parametrize("given", ["9" * 30 + "TB", "8388608TB", "9223372036854775808B", 1 << 63, HUGE_INT])
def test_a_size_is_less_than_2_to_the_63(given: Any) -> None:
    with pytest.raises(OutOfRange, match=r"^size too large \(a size is less than 8388608TB, 2\^63 bytes\): "):
        parse_bytes(given, bare_unit=1)
    assert parse_bytes("8388607TB") == 8388607 << 40


@pytest.mark.parametrize("size, text", [(0, "0B"), (1000, "1000B"), (1536, "1536B"), (10 << 20, "10MB"),
                                        (20 << 30, "20GB"), (3 << 40, "3TB"), (1536 << 10, "1536KB")])
def test_format_bytes_is_the_largest_exact_mesos_unit_and_reads_back(size: int, text: str) -> None:
    assert format_bytes(size) == text and parse_bytes(text) == size
