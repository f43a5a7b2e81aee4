"""Report figures of one tensor that add up over the blocks of rows the engine merges it in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _add(a: float | tuple[float, ...], b: float | tuple[float, ...]) -> float | tuple[float, ...]:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return tuple(x + y for x, y in zip(a, b))
    assert not isinstance(a, tuple) and not isinstance(b, tuple), "mixed figure shapes"
    return a + b


@dataclass(frozen=True)
class Ratio:
    """num / den (0 where den is 0), elementwise for tuples; blocks add numerators and denominators."""

    num: float | tuple[float, ...]
    den: float | tuple[float, ...]

    def __add__(self, other: "Ratio") -> "Ratio":
        return Ratio(_add(self.num, other.num), _add(self.den, other.den))

    def value(self) -> float | list[float]:
        if isinstance(self.num, tuple) and isinstance(self.den, tuple):
            return [float(n / d) if d > 0 else 0.0 for n, d in zip(self.num, self.den)]
        assert not isinstance(self.num, tuple) and not isinstance(self.den, tuple)
        return float(self.num / self.den) if self.den > 0 else 0.0


@dataclass(frozen=True)
class Norm:
    """A Euclidean norm kept as its square: blocks of rows add squares."""

    square: float

    def __add__(self, other: "Norm") -> "Norm":
        return Norm(self.square + other.square)

    def value(self) -> float:
        return float(self.square) ** 0.5


Figure = Ratio | Norm


def figure_values(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with every Ratio / Norm replaced by its value (what the report shows)."""
    return {k: v.value() if isinstance(v, (Ratio, Norm)) else v for k, v in stats.items()}
