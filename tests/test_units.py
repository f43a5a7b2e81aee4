"""Human-readable sizes and durations."""

from __future__ import annotations

import pytest

from neuromerge_cli.units import format_bytes, format_duration


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (20 * 1024, "20 KiB"),
    (1023.9 * 1024, "1024 KiB"), (5.52 * 2**20, "5.52 MiB"), (3 * 2**40, "3 TiB"), (2**50, "1024 TiB"),
])
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize("s, text", [(0, "0:00"), (75, "1:15"), (3725, "1:02:05"), (-1, "?"), (float("inf"), "?")])
def test_format_duration(s: float, text: str) -> None:
    assert format_duration(s) == text
