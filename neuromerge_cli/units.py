"""Human-readable sizes and durations for the terminal, logs and reports."""

from __future__ import annotations

import math


def format_bytes(n: float) -> str:
    """1536 → '1.5 KiB', 1023.5 KiB → '1024 KiB'; binary units, three significant digits (never an exponent)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{n:.0f} B"
            digits = 2 if abs(n) < 10 else 1 if abs(n) < 100 else 0
            text = f"{n:.{digits}f}"
            return (text.rstrip("0").rstrip(".") if "." in text else text) + f" {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """75 → '1:15', 3725 → '1:02:05'; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
