"""Budgets: a limit on what a key, a team, a route or the whole fleet may spend in a window,
in dollars, kilowatt-hours or kilograms of CO2e.

Windows are UTC: `hour` (from :00), `day` (from 00:00) and `month` (the calendar month, from
the 1st at 00:00). A budget is **over at its limit** (`spent >= limit`: at exactly the limit,
the next request is over), counting what requests in flight have reserved. Before that, at
`degrade_at` (a fraction of the limit, optional), its requests are **degraded**: sent to the
cheapest candidate that meets the budget's own `degrade_min_quality`, so a team that runs low
gets cheaper answers before it gets none. Warnings fire at each of `warn_at` (fractions of the
limit), once per threshold per window. The models (`Budget`, `BudgetPatch`) are part of the
HTTP schema (`api.py`); this module holds the window arithmetic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from wattops.router.api import UNIT_LABELS, WINDOWS, Budget, BudgetPatch

__all__ = ["UNIT_LABELS", "Budget", "BudgetPatch", "utc_moment", "window_end", "window_start"]


def utc_moment(ts: float) -> str:
    """`ts` (unix seconds) as the UTC time a window resets at: `2026-11-29T00:00:00Z`."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def window_start(window: str, now: datetime) -> datetime:
    """The start (UTC) of the `window` that contains `now`."""
    now = now.astimezone(UTC)
    if window == "hour":
        return now.replace(minute=0, second=0, microsecond=0)
    if window == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    raise ValueError(f"unknown window {window!r}; allowed: {', '.join(WINDOWS)}")


def window_end(window: str, now: datetime) -> datetime:
    """When the `window` that contains `now` ends: its budget starts again from zero."""
    start = window_start(window, now)
    if window == "hour":
        return start + timedelta(hours=1)
    if window == "day":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)
