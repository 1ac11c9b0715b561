"""Money, energy and carbon as integers: what budgets, reservations and the ledger count in.

| budget unit | counted in                  | per budget unit |
|-------------|-----------------------------|-----------------|
| `usd`       | nano-dollars (1e-9 USD)     | 1,000,000,000   |
| `kwh`       | millijoules                 | 3,600,000,000   |
| `kgco2e`    | micrograms CO2e             | 1,000,000,000   |

Every store (SQLite `INTEGER` columns, Redis `INCRBY` counters) adds the same integers, so two
stores given the same requests hold the same standings and reach the same verdicts, to the
unit; a sum of ten $0.10 charges is $1 exactly, where floats made it 0.9999999999999999.

Rates are turned into integers per token once: femto-dollars (1e-15 USD) from $/1M tokens,
microjoules from J/token, nanograms from gCO2e/1M tokens (each rounded to the nearest, far
below anything a price means). A request's cost is its tokens times those, exact, then rounded
**up** once to the counting unit: a request is never charged less than its tokens cost at the
rates, and at most one unit more (1e-9 USD, 1 mJ, 1 ugCO2e per request and unit).

Bounds: a budget window counts at most 2**53-1 units (`UNITS_MAX`: Redis' scripts compare in
Lua's doubles, exact to there), 9.0 M USD, 2.5 GWh or 9,007 tCO2e; a budget's limit above it is
refused when it is set. The ledger's sums over all time are int64 (9.2 G USD).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from wattops.router.api import COUNTED_IN, UNIT_LABELS, UNIT_SCALE, UNITS_MAX

__all__ = [
    "COUNTED_IN",
    "UNITS_MAX",
    "UNIT_SCALE",
    "Amounts",
    "Rates",
    "charge",
    "from_units",
    "show",
    "to_units",
]

#: Femto-dollars per token in one $/1M tokens; microjoules per token in one J/token;
#: nanograms per token in one gCO2e/1M tokens.
_F_PER_USD_PER_1M = 10**9
_UJ_PER_J = 10**6
_NG_PER_G_PER_1M = 10**3
#: From those per-token integers to the counting units (nano-USD, mJ, ug).
_F_PER_NUSD = 10**6
_UJ_PER_MJ = 10**3
_NG_PER_UG = 10**3


def to_units(value: float, unit: str) -> int:
    """`value` of a budget unit (`usd`, `kwh`, `kgco2e`) in its integers, to the nearest."""
    return round(value * UNIT_SCALE[unit])


def from_units(units: float, unit: str) -> float:
    """An amount in a budget unit's integers as the unit (for people; not for sums)."""
    return units / UNIT_SCALE[unit]


def show(units: int, unit: str) -> str:
    """`0.07 USD (70000000 nano-USD)`: how a message names an exact amount."""
    return f"{from_units(units, unit):.9g} {UNIT_LABELS[unit]} ({units} {COUNTED_IN[unit]})"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Amounts:
    """What a request costs (or may cost), in each budget unit's integers."""

    nusd: int = 0
    mj: int = 0
    ug: int = 0

    @classmethod
    def of_units(cls, usd: float = 0.0, kwh: float = 0.0, kgco2e: float = 0.0) -> Amounts:
        """From dollars, kWh and kgCO2e (each to the nearest unit)."""
        return cls(to_units(usd, "usd"), to_units(kwh, "kwh"), to_units(kgco2e, "kgco2e"))

    def of(self, unit: str) -> int:
        """The amount counted by a budget in `unit` (`usd`, `kwh`, `kgco2e`)."""
        if unit == "usd":
            return self.nusd
        if unit == "kwh":
            return self.mj
        return self.ug

    def __add__(self, other: Amounts) -> Amounts:
        return Amounts(self.nusd + other.nusd, self.mj + other.mj, self.ug + other.ug)

    @staticmethod
    def total(parts: Iterable[Amounts]) -> Amounts:
        out = Amounts()
        for part in parts:
            out = out + part
        return out


@dataclass(frozen=True)
class Rates:
    """A deployment's per-token rates as integers (None: not known). Input and output tokens
    may be priced apart; energy and carbon are per token, whichever kind."""

    fusd_in: int | None
    fusd_out: int | None
    uj: int | None
    ng: int | None

    @classmethod
    def of(cls, usd_per_1m_input: float | None, usd_per_1m_output: float | None,
           j_per_token: float | None, gco2e_per_1m: float | None) -> Rates:  # fmt: skip
        def q(value: float | None, scale: int) -> int | None:
            return None if value is None else max(0, round(value * scale))

        return cls(q(usd_per_1m_input, _F_PER_USD_PER_1M), q(usd_per_1m_output, _F_PER_USD_PER_1M),
                   q(j_per_token, _UJ_PER_J), q(gco2e_per_1m, _NG_PER_G_PER_1M))  # fmt: skip

    @property
    def known(self) -> bool:
        return None not in (self.fusd_in, self.fusd_out, self.uj, self.ng)

    def highest(self, other: Rates) -> Rates:
        """Each rate the higher of the two (an unknown one gives way to a known one)."""

        def hi(a: int | None, b: int | None) -> int | None:
            return b if a is None else a if b is None else max(a, b)

        return Rates(hi(self.fusd_in, other.fusd_in), hi(self.fusd_out, other.fusd_out),
                     hi(self.uj, other.uj), hi(self.ng, other.ng))  # fmt: skip

    def or_else(self, other: Rates) -> Rates:
        """Each rate as known here, else `other`'s."""

        def pick(a: int | None, b: int | None) -> int | None:
            return b if a is None else a

        return Rates(pick(self.fusd_in, other.fusd_in), pick(self.fusd_out, other.fusd_out),
                     pick(self.uj, other.uj), pick(self.ng, other.ng))  # fmt: skip

    def usd_per_1m(self, prompt: int, completion: int) -> float | None:
        """The blended $/1M tokens of this mix (None if a rate is unknown)."""
        if self.fusd_in is None or self.fusd_out is None or prompt + completion == 0:
            return None
        return (prompt * self.fusd_in + completion * self.fusd_out) / (prompt + completion) / 1e9


UNKNOWN = Rates(None, None, None, None)


def charge(prompt: int, completion: int, rates: Rates) -> Amounts:
    """What `prompt` + `completion` tokens cost at `rates`: exact, then rounded up once to the
    counting unit (an unknown rate counts 0: the caller decides what stands in for one)."""
    tokens = prompt + completion
    fusd = prompt * (rates.fusd_in or 0) + completion * (rates.fusd_out or 0)
    return Amounts(
        nusd=_ceil_div(fusd, _F_PER_NUSD),
        mj=_ceil_div(tokens * (rates.uj or 0), _UJ_PER_MJ),
        ug=_ceil_div(tokens * (rates.ng or 0), _NG_PER_UG),
    )
