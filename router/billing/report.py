"""Chargeback and forecast from the ledger: `GET /v1/report` and `wattops report`.

Per key, team or route: requests, tokens, cost, energy and carbon as the ledger charged them
(each request at its server's rates), what response-cache hits saved (their tokens at the
server's rates: charged nothing) and what routing saved (the tokens at the route's reference's
rates minus at the server's). The groups add up to the total exactly, requests without a key
(or route) being a group of their own, `(none)`.

Against the fleet: the router samples, every minute, the totals the agents attribute to every
deployment it follows (cost, energy, carbon). Between the first and the last sample within the
period, the fleet's attributed totals minus the ledger's requests in the same span are the
unattributed remainder — held and idle hardware that no request was charged for, and traffic
that did not come through this router — shown as its own line, so the report adds up to what the
fleet cost. Where the ledger charged more than the agents attributed (requests are charged at
rates the agents learned over their recent windows, which a busier or cheaper span undercuts),
the remainder is 0 and the excess is shown as `overcharged`, never as a negative cost.

Forecast, per budget: its spend per second over a lookback (the last 7 days of its window, or
since the window began, at least a minute), extrapolated linearly to the window's end; and the
moment the limit is reached at that rate, if before the window ends. A linear fit of recent
spend: it does not know weekends or launches, and says so by giving its lookback.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from wattops.router.api import BudgetForecast, FleetSpan, Report, ReportGroup
from wattops.router.billing.admission import Book
from wattops.router.billing.money import from_units

__all__ = ["LOOKBACK_S", "build_report", "forecast"]

#: The forecast's lookback: at most a week of the window.
LOOKBACK_S = 7 * 86400.0
#: The ledger's sums per group (integers: counts, tokens, nano-USD, mJ, ugCO2e).
_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cost_nusd", "energy_mj",
         "carbon_ug", "cache_hits", "cache_saving_nusd", "degraded", "routing_saving_nusd",
         "errors")  # fmt: skip


def _group(name: str, sums: Mapping[str, Any]) -> ReportGroup:
    """A report line from the ledger's integer sums, with the figures people read beside."""
    n = {field: int(sums[field] or 0) for field in _SUMS}
    return ReportGroup(
        group=name, requests=n["requests"], prompt_tokens=n["prompt_tokens"],
        completion_tokens=n["completion_tokens"], cost_usd=from_units(n["cost_nusd"], "usd"),
        energy_kwh=from_units(n["energy_mj"], "kwh"),
        carbon_kg=from_units(n["carbon_ug"], "kgco2e"), cost_nusd=n["cost_nusd"],
        energy_mj=n["energy_mj"], carbon_ug=n["carbon_ug"], cache_hits=n["cache_hits"],
        cache_saving_usd=from_units(n["cache_saving_nusd"], "usd"), degraded=n["degraded"],
        routing_saving_usd=from_units(n["routing_saving_nusd"], "usd"), errors=n["errors"],
    )  # fmt: skip


def _total(rows: Iterable[Mapping[str, Any]], name: str = "total") -> ReportGroup:
    rows = list(rows)
    return _group(name, {field: sum(int(r[field] or 0) for r in rows) for field in _SUMS})


def forecast(book: Book, now: float | None = None) -> list[BudgetForecast]:
    """Each budget's spend projected to the end of its window (see the module docstring)."""
    now = book.clock() if now is None else now
    out = []
    for s in book.standings():
        b = s.budget
        start = max(s.window_start, now - LOOKBACK_S)
        lookback = max(60.0, now - start)
        recent = book.ledger.spent(b, start)
        rate = recent / lookback  # units per second
        projected = s.spent + rate * max(0.0, s.resets_at - now)
        runs_out = None
        if s.spent >= s.limit:
            runs_out = now  # spent already: it runs out now, not at some past moment
        elif rate > 0:
            at = now + (s.limit - s.spent) / rate
            runs_out = at if at < s.resets_at else None
        out.append(BudgetForecast(
            budget=b.name, unit=b.unit, window=b.window, limit=b.limit,
            spent=from_units(s.spent, b.unit), spent_units=s.spent,
            rate_per_day=from_units(rate * 86400, b.unit), lookback_s=lookback,
            projected=from_units(projected, b.unit),
            runs_out_at=runs_out, resets_at=s.resets_at,
        ))  # fmt: skip
    return out


def build_report(book: Book, by: str, since: float, until: float | None = None) -> Report:
    """The report for `by` (key | team | route) over [since, until), from `book`'s ledger."""
    ledger = book.ledger
    until = time.time() if until is None else until
    rows = ledger.groups(by, since, until)
    groups = [_group(str(g["group"]), g) for g in rows]
    fleet = None
    span = ledger.fleet_span(since, until)
    if span is not None:
        start, end, (cost, mj, ug, parked) = span
        inside = _total(ledger.groups(by, start, end))
        c, e, g = inside.cost_nusd, inside.energy_mj, inside.carbon_ug
        fleet = FleetSpan(
            start=start, end=end, cost_usd=from_units(cost, "usd"),
            energy_kwh=from_units(mj, "kwh"), carbon_kg=from_units(ug, "kgco2e"),
            ledger_cost_usd=inside.cost_usd, ledger_energy_kwh=inside.energy_kwh,
            ledger_carbon_kg=inside.carbon_kg,
            unattributed_cost_usd=from_units(max(0, cost - c), "usd"),
            unattributed_energy_kwh=from_units(max(0, mj - e), "kwh"),
            unattributed_carbon_kg=from_units(max(0, ug - g), "kgco2e"),
            overcharged_cost_usd=from_units(max(0, c - cost), "usd"),
            overcharged_energy_kwh=from_units(max(0, e - mj), "kwh"),
            overcharged_carbon_kg=from_units(max(0, g - ug), "kgco2e"),
            parking_saving_usd=from_units(parked, "usd"),
        )  # fmt: skip
    return Report(by=by, since=since, until=until, groups=groups, total=_total(rows),
                  fleet=fleet, forecasts=forecast(book))  # fmt: skip
