"""Typed method parameters: name, default, meaning and a checker that names what is allowed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

Checker = Callable[[Any], Any]


@dataclass(frozen=True)
class Param:
    """One method parameter. ``check`` returns the normalised value or raises ValueError."""

    name: str
    default: Any
    help: str
    check: Checker
    kind: str  # shown by `neuromerge methods`


def as_number(value: Any) -> float:
    """A finite number from a recipe value, or ValueError saying what was found."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {value!r:.40}")
    return x


def number(name: str, default: Any, help: str, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False) -> Param:
    """A float parameter in [lo, hi] (or (lo, hi] when ``lo_open``)."""

    def check(value: Any) -> float:
        x = as_number(value)
        if lo is not None and (x < lo or (lo_open and x == lo)):
            raise ValueError(f"must be {'>' if lo_open else '>='} {lo:g}, got {x:g}")
        if hi is not None and x > hi:
            raise ValueError(f"must be <= {hi:g}, got {x:g}")
        return x

    bounds = f"{'(' if lo_open else '['}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
    return Param(name, default, help, check, f"number in {bounds}")


def number_or_auto(name: str, help: str, lo: float = 0.0) -> Param:
    """``auto`` or a number >= lo."""
    inner = number(name, "auto", help, lo)

    def check(value: Any) -> float | str:
        return "auto" if value == "auto" else inner.check(value)

    return Param(name, "auto", help, check, f"auto | {inner.kind}")


def integer(name: str, default: int, help: str, lo: int = 0) -> Param:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if value < lo:
            raise ValueError(f"must be >= {lo}, got {value}")
        return value

    return Param(name, default, help, check, f"integer >= {lo}")


def choice(name: str, default: str, help: str, options: tuple[str, ...]) -> Param:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}; got {value!r}")
        return value

    return Param(name, default, help, check, " | ".join(options))


def boolean(name: str, default: bool, help: str) -> Param:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value

    return Param(name, default, help, check, "true | false")


def text(name: str, default: str | None, help: str) -> Param:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a non-empty string, got {value!r}")
        return value

    return Param(name, default, help, check, "string")


def mapping(name: str, help: str) -> Param:
    """A nested mapping (e.g. another method's parameters); absent means empty."""

    def check(value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping of key: value, got {value!r}")
        return dict(value)

    return Param(name, None, help, check, "mapping")
