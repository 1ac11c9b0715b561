"""Which deployment answers a request: the route's bounds first, then its policy.

A candidate is *excluded*, with the reason kept for the 503 and for `/v1/router`, when it is
failed, its agent is not live, its circuit breaker is open, its quality against the route's
reference is below `min_quality` (the share of the reference's task accuracy it keeps; or
unknown while a floor is set), its accuracy drop is above `max_accuracy_drop` points, its
price is above `max_usd_per_1m_tokens`, or — for interactive requests —
the p95 it would give now is above the latency bound. That p95 is the measured p95 plus the
queue ahead: requests in flight beyond its ready replicas, each costing the median service
time per replica, so a busy edge node overflows to the next candidate instead of queueing
past the bound. Batch requests (`X-Wattops-Priority: batch`) ignore the latency bound.

The rest are ordered by the policy, ready ones first; parked ones come after every ready one
(they are woken only when no ready candidate meets the bounds, and the agent holds the
requests until the wake is done — one wake for all of them):

- `cheapest`: lowest $/1M tokens (the agent's recent window, or the figure learned earlier).
  A deployment that has never served has no such figure; it is ranked by a prior: its held
  $/h times the median ratio of $/1M tokens to held $/h among those that have one (the same
  tokens per held dollar), or by held $/h alone when no candidate has served yet.
- `greenest`: lowest gCO2e per 1M tokens, then lowest J/token; unknown ones last.
- `fastest`: lowest p95 it would give now; one without latency figures counts as the median.

Ready candidates whose figure is within `equivalent_within` (default 20%) of the best are
equivalent: measured figures of identical deployments differ by noise, and sending everything
to the one that happens to be 1% cheaper would leave its twins idle and queue on it. Among
equivalent ones a request with a conversation prefix follows prefix affinity (`affinity.py`:
consistent hashing with bounded loads), so the engines' prefix caches keep hitting; any other
goes to the least busy, turn by turn on ties.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from wattops.router.affinity import Rings
from wattops.router.candidates import Candidate

__all__ = ["Choice", "Constraints", "NoCandidate", "QualityFigure", "Spread", "choose"]

PRIORITIES = ("interactive", "batch")


@dataclass(frozen=True)
class QualityFigure:
    """A candidate's quality against the route's reference, and where the figure comes from."""

    #: The share of the reference's task accuracy kept (declared figures: as declared).
    kept: float | None
    #: Points of task accuracy lost against the reference (measured figures only): the 95%
    #: upper bound of the paired interval when `upper_bound`, else the point estimate.
    accuracy_drop: float | None
    source: str
    upper_bound: bool = False


@dataclass(frozen=True)
class Constraints:
    """The route's bounds, tightened by the request's headers."""

    policy: str
    min_quality: float | None = None
    max_accuracy_drop: float | None = None
    max_p95_s: float | None = None
    max_usd_per_1m: float | None = None
    priority: str = "interactive"

    def describe(self) -> str:
        parts = []
        if self.min_quality is not None:
            parts.append(f"quality>={self.min_quality:g}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop<={self.max_accuracy_drop:g}")
        if self.max_p95_s is not None and self.priority == "interactive":
            parts.append(f"p95<={self.max_p95_s * 1000:.0f}ms")
        if self.max_usd_per_1m is not None:
            parts.append(f"$/1M<={self.max_usd_per_1m:g}")
        return " ".join(parts) or "no bounds"


@dataclass(frozen=True)
class Spread:
    """How a request is placed among equivalent candidates."""

    equivalent_within: float = 0.2
    #: The request's prefix-affinity key (None: no affinity).
    prefix: str | None = None
    rings: Rings | None = None
    load_factor: float = 1.25
    #: Advances per request: breaks ties among equally busy ones in turn.
    turn: int = 0


@dataclass(frozen=True)
class Choice:
    """The candidates to try, best first, why the first, and why the others were left out."""

    ordered: list[Candidate]
    reason: str
    excluded: dict[str, str] = field(default_factory=dict)


class NoCandidate(Exception):
    """No candidate meets the bounds; `reasons` says why, per candidate."""

    def __init__(self, route: str, constraints: Constraints, reasons: Mapping[str, str]) -> None:
        self.reasons = dict(reasons)
        detail = "; ".join(f"{key}: {why}" for key, why in self.reasons.items())
        super().__init__(
            f"no deployment of route {route!r} meets {constraints.describe()} now ("
            + (detail or "no candidate deployment is known yet")
            + ")"
        )


def _excluded_because(c: Candidate, q: QualityFigure, bounds: Constraints,
                      unavailable: Mapping[str, str]) -> str | None:  # fmt: skip
    if c.key in unavailable:
        return unavailable[c.key]
    if not c.live:
        return "agent not live"
    if c.failed:
        return "failed"
    if bounds.min_quality is not None:
        if q.kept is None:
            return f"quality unknown ({q.source})"
        if q.kept < bounds.min_quality:
            return f"quality {q.kept:.1%} < {bounds.min_quality:.0%}"
    if bounds.max_accuracy_drop is not None:
        if q.accuracy_drop is None:
            return f"accuracy drop unknown ({q.source})"
        if q.accuracy_drop > bounds.max_accuracy_drop:
            on = " (95% upper bound)" if q.upper_bound else ""
            return (f"accuracy drop{on} {q.accuracy_drop:.1f} > {bounds.max_accuracy_drop:g} "
                    "points")  # fmt: skip
    cap = bounds.max_usd_per_1m
    if cap is not None and c.usd_per_1m is not None and c.usd_per_1m > cap:
        return f"${c.usd_per_1m:.3g}/1M tokens > ${cap:g}"
    if bounds.max_p95_s is not None and bounds.priority == "interactive" and not c.parked:
        expected = c.expected_p95_s()
        if expected is not None and expected > bounds.max_p95_s:
            return (
                f"p95 would be {expected * 1000:.0f}ms > {bounds.max_p95_s * 1000:.0f}ms "
                f"({c.in_flight} in flight on {c.ready} ready)"
            )
    return None


def _cost_keys(cands: Sequence[Candidate]) -> dict[str, tuple[float, str]]:
    ratios = [
        c.usd_per_1m / c.usd_per_hour for c in cands if c.usd_per_1m is not None and c.usd_per_hour
    ]
    per_held_dollar = statistics.median(ratios) if ratios else None
    keys: dict[str, tuple[float, str]] = {}
    for c in cands:
        if c.usd_per_1m is not None:
            keys[c.key] = (c.usd_per_1m, f"${c.usd_per_1m:.3g}/1M tokens")
        elif c.usd_per_hour is not None and per_held_dollar is not None:
            prior = c.usd_per_hour * per_held_dollar
            keys[c.key] = (prior, f"~${prior:.3g}/1M tokens (prior from ${c.usd_per_hour:.3g}/h)")
        elif c.usd_per_hour is not None:
            keys[c.key] = (c.usd_per_hour * 1e6, f"${c.usd_per_hour:.3g}/h held (no tokens yet)")
        else:
            keys[c.key] = (math.inf, "price unknown")
    return keys


def _policy_keys(policy: str, cands: Sequence[Candidate]) -> dict[str, tuple[float, ...]]:
    if policy in ("cheapest", "cascade"):
        return {k: (v[0],) for k, v in _cost_keys(cands).items()}
    if policy == "greenest":
        return {
            c.key: (
                c.gco2e_per_1m if c.gco2e_per_1m is not None else math.inf,
                c.j_per_token if c.j_per_token is not None else math.inf,
            )
            for c in cands
        }
    known = [p for c in cands if (p := c.expected_p95_s()) is not None]
    neutral = statistics.median(known) if known else 0.0
    return {c.key: (p if (p := c.expected_p95_s()) is not None else neutral,) for c in cands}


def _figure(policy: str, c: Candidate, cands: Sequence[Candidate]) -> str:
    if policy in ("cheapest", "cascade"):
        return _cost_keys(cands)[c.key][1]
    if policy == "greenest":
        if c.gco2e_per_1m is None:
            return "carbon unknown"
        return f"{c.gco2e_per_1m:.3g} gCO2e/1M tokens"
    expected = c.expected_p95_s()
    return "no latency yet" if expected is None else f"p95 ~{expected * 1000:.0f}ms"


def _equivalent(value: float, best: float, within: float) -> bool:
    if math.isinf(best):
        return math.isinf(value)
    return value <= best * (1 + within) if best > 0 else value == best


def _spread(ordered: list[Candidate], keys: Mapping[str, tuple[float, ...]],
            spread: Spread) -> tuple[list[Candidate], str]:  # fmt: skip
    """`ordered` with the equivalent best ones first in the spread's order, and a note."""
    ready = [c for c in ordered if not (c.parked or c.ready == 0)]
    if len(ready) < 2:
        return ordered, ""
    best = keys[ready[0].key][0]
    tier = [c for c in ready if _equivalent(keys[c.key][0], best, spread.equivalent_within)]
    if len(tier) < 2:
        return ordered, ""
    within = f"{len(tier)} within {spread.equivalent_within:.0%}"
    if spread.prefix is not None and spread.rings is not None:
        loads = {c.key: c.in_flight for c in tier}
        by_key = {c.key: c for c in tier}
        order = spread.rings.order(list(by_key), spread.prefix, loads, spread.load_factor)
        first = [by_key[k] for k in order]
        note = f", prefix affinity among {within}"
    else:
        n = len(tier)
        turn = {c.key: (i - spread.turn) % n for i, c in enumerate(tier)}
        first = sorted(tier, key=lambda c: (c.in_flight, turn[c.key]))
        note = f", least busy of {within}"
    chosen = {c.key for c in first}
    return first + [c for c in ordered if c.key not in chosen], note


def choose(
    route: str,
    candidates: Sequence[Candidate],
    quality: Mapping[str, QualityFigure],
    bounds: Constraints,
    unavailable: Mapping[str, str] | None = None,
    spread: Spread | None = None,
) -> Choice:
    """The candidates to try for one request of `route`, best first (see the module)."""
    unknown = QualityFigure(None, None, "no figure")
    excluded: dict[str, str] = {}
    meeting: list[Candidate] = []
    for c in candidates:
        why = _excluded_because(c, quality.get(c.key, unknown), bounds, unavailable or {})
        if why is None:
            meeting.append(c)
        else:
            excluded[c.key] = why
    if not meeting:
        raise NoCandidate(route, bounds, excluded)
    keys = _policy_keys(bounds.policy, meeting)
    ordered = sorted(meeting, key=lambda c: (c.parked or c.ready == 0, keys[c.key], c.key))
    ordered, note = _spread(ordered, keys, spread or Spread())
    first = ordered[0]
    reason = f"{bounds.policy}: {_figure(bounds.policy, first, meeting)}{note}"
    if first.parked or first.ready == 0:
        reason += ", waking it (no ready candidate meets the bounds)"
    reason += f"; {len(meeting)} of {len(candidates)} meet {bounds.describe()}"
    return Choice(ordered, reason, excluded)
