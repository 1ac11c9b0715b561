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

from wattops.router.admission import Book
from wattops.router.api import BudgetForecast, FleetSpan, Report, ReportGroup

__all__ = ["LOOKBACK_S", "build_report", "forecast"]

#: The forecast's lookback: at most a week of the window.
LOOKBACK_S = 7 * 86400.0
_NUMBERS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "energy_kwh",
            "carbon_kg", "cache_hits", "cache_saving_usd", "degraded", "routing_saving_usd",
            "errors")  # fmt: skip


def _total(groups: list[ReportGroup], name: str = "total") -> ReportGroup:
    sums = {field: sum(getattr(g, field) for g in groups) for field in _NUMBERS}
    return ReportGroup(group=name, **sums)


def forecast(book: Book, now: float | None = None) -> list[BudgetForecast]:
    """Each budget's spend projected to the end of its window (see the module docstring)."""
    now = book.clock() if now is None else now
    out = []
    for s in book.standings():
        b = s.budget
        start = max(s.window_start, now - LOOKBACK_S)
        lookback = max(60.0, now - start)
        recent = book.ledger.spent(b, start)
        rate = recent / lookback
        projected = s.spent + rate * max(0.0, s.resets_at - now)
        runs_out = None
        if s.spent >= b.limit:
            runs_out = now  # spent already: it runs out now, not at some past moment
        elif rate > 0:
            at = now + (b.limit - s.spent) / rate
            runs_out = at if at < s.resets_at else None
        out.append(BudgetForecast(
            budget=b.name, unit=b.unit, window=b.window, limit=b.limit, spent=s.spent,
            rate_per_day=rate * 86400, lookback_s=lookback, projected=projected,
            runs_out_at=runs_out, resets_at=s.resets_at,
        ))  # fmt: skip
    return out


def build_report(book: Book, by: str, since: float, until: float | None = None) -> Report:
    """The report for `by` (key | team | route) over [since, until), from `book`'s ledger."""
    ledger = book.ledger
    until = time.time() if until is None else until
    groups = [ReportGroup.model_validate(g) for g in ledger.groups(by, since, until)]
    fleet = None
    span = ledger.fleet_span(since, until)
    if span is not None:
        start, end, (cost, kwh, kg, parked) = span
        inside = _total([ReportGroup.model_validate(g) for g in ledger.groups(by, start, end)])
        fleet = FleetSpan(
            start=start, end=end, cost_usd=cost, energy_kwh=kwh, carbon_kg=kg,
            ledger_cost_usd=inside.cost_usd, ledger_energy_kwh=inside.energy_kwh,
            ledger_carbon_kg=inside.carbon_kg,
            unattributed_cost_usd=max(0.0, cost - inside.cost_usd),
            unattributed_energy_kwh=max(0.0, kwh - inside.energy_kwh),
            unattributed_carbon_kg=max(0.0, kg - inside.carbon_kg),
            overcharged_cost_usd=max(0.0, inside.cost_usd - cost),
            overcharged_energy_kwh=max(0.0, inside.energy_kwh - kwh),
            overcharged_carbon_kg=max(0.0, inside.carbon_kg - kg), parking_saving_usd=parked,
        )  # fmt: skip
    return Report(by=by, since=since, until=until, groups=groups, total=_total(groups),
                  fleet=fleet, forecasts=forecast(book))  # fmt: skip
