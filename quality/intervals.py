"""Confidence intervals for the quality figures: one accuracy, and the paired difference of
two precisions answering the same items.

- `accuracy`: the Wilson score interval (Wilson 1927), which stays inside 0..1 and keeps its
  coverage near 0% and 100% where the textbook Wald interval collapses.
- `paired_drop`: the reference's accuracy minus the candidate's on the *same* items, from the
  2x2 table of paired outcomes. Only the discordant items (right on one side only) carry
  information about the difference; the interval is Agresti and Min's (2005, "Simple improved
  confidence intervals for comparing matched proportions", Statistics in Medicine 24:729):
  the Wald interval for a difference of matched proportions after adding 0.5 to every cell.
  It needs no resampling (deterministic, instant) and, unlike plain Wald, does not shrink to
  zero width when no item differs.

Sizing. For a drop near zero with a share `d` of discordant items, the interval's half-width
is about z * sqrt(d / n). To show non-inferiority at a margin `m` (the whole interval below
`m`) an n of about (z / m)^2 * d items is needed: with d = 10% discordant and m = 1.5 points,
n = (1.96 / 0.015)^2 * 0.10 = 1,707 items; m = 3 points needs 427; m = 5 needs 154.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Z95", "Interval", "PairedDrop", "items_for_margin", "paired_drop", "wilson"]

#: The two-sided 95% normal quantile.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% confidence interval (same unit as the estimate)."""

    estimate: float
    low: float
    high: float

    def scaled(self, factor: float) -> Interval:
        return Interval(self.estimate * factor, self.low * factor, self.high * factor)

    def describe(self, unit: str = "", digits: int = 1) -> str:
        return (f"{self.estimate:.{digits}f}{unit} [{self.low:.{digits}f}, "
                f"{self.high:.{digits}f}]")  # fmt: skip


def wilson(right: int, n: int, z: float = Z95) -> Interval:
    """The share right out of `n`, with its Wilson score interval."""
    if n <= 0 or not 0 <= right <= n:
        raise ValueError(f"need 0 <= right <= n and n >= 1, got right={right}, n={n}")
    p = right / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


@dataclass(frozen=True)
class PairedDrop:
    """Paired outcomes of a reference and a candidate on the same `items`."""

    items: int
    both_right: int
    reference_only: int
    candidate_only: int
    both_wrong: int
    drop: Interval  # reference accuracy minus candidate accuracy, a share (0.02: 2 points)

    @property
    def discordant(self) -> int:
        return self.reference_only + self.candidate_only

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": asdict(self.drop)}


def paired_drop(reference: Sequence[bool], candidate: Sequence[bool], z: float = Z95) -> PairedDrop:
    """The accuracy the candidate loses against the reference on the same items (positive: it
    answers fewer right), with the Agresti-Min interval (see the module docstring)."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(
            f"need one candidate outcome per reference outcome, at least one; got "
            f"{len(candidate)} for {len(reference)}"
        )
    pairs = list(zip(reference, candidate, strict=True))
    a = sum(r and c for r, c in pairs)
    b = sum(r and not c for r, c in pairs)
    c_ = sum(c and not r for r, c in pairs)
    n = len(pairs)
    bb, cc, nn = b + 0.5, c_ + 0.5, n + 2.0
    diff = (bb - cc) / nn
    half = z * math.sqrt(max(0.0, (bb + cc) - (bb - cc) ** 2 / nn)) / nn
    return PairedDrop(
        items=n, both_right=a, reference_only=b, candidate_only=c_, both_wrong=n - a - b - c_,
        drop=Interval((b - c_) / n, max(-1.0, diff - half), min(1.0, diff + half)),
    )  # fmt: skip


def items_for_margin(margin: float, discordant: float, z: float = Z95) -> int:
    """Items needed for the drop's interval to fit under `margin` (a share) when the true drop
    is zero and a share `discordant` of the items differ (see the module docstring)."""
    if margin <= 0 or not 0 < discordant <= 1:
        raise ValueError("need margin > 0 and 0 < discordant <= 1")
    return math.ceil((z / margin) ** 2 * discordant)
