"""Predictive scaling: a seasonal forecast of a deployment's request rate, so replicas are
started before a rise the traffic repeats every day instead of after it has begun.

The method, a reduced Holt-Winters (multiplicative season, no trend):

- Arrivals are counted in buckets of `bucket_s` seconds of wall-clock time; a season is
  `season_s` (a day by default), so it holds P = season_s / bucket_s buckets, and a bucket's
  phase is its place in the season (the same minutes of every day).
- When a bucket closes, its rate updates the seasonal profile at its phase as an exponentially
  weighted mean over seasons: S[p] <- alpha x rate + (1 - alpha) x S[p] (alpha = 0.5: the last
  day counts as much as all before it).
- A level factor scales the profile to today's traffic: the arrivals of the last three closed
  buckets over what the profile expected for them, clamped to 0.5..2 (a busier Monday lifts
  the whole forecast; one quiet bucket does not cancel it).
- The forecast rate at a time t is S[phase(t)] x level. There is none until every phase has
  been seen once (one whole season): the reactive rule alone scales until then.

How the agent uses it (agents/supervisor.py): the replicas a rate needs are its expected
requests in flight (Little's law: rate x the measured mean service time) over the deployment's
`autoscale_target_in_flight`, rounded up. The forecast is read over the next `lead` seconds,
the measured cold start of a replica (spawn to healthy, the mean of the last starts) plus one
bucket, and the replicas its highest rate needs are started now: warm when the rise comes.
Scaling down takes the higher of the reactive recommendation (with its stabilisation window)
and the forecast's, so replicas go only when both the live load and the forecast agree. With
`idle_scale_to_zero_s`, an idle deployment is parked only when the forecast expects less than
one request within the lead time, and a deployment parked for idleness is woken when it
expects one or more (one parked by an operator or a policy is left parked).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import Any

__all__ = ["SeasonalForecast", "history_from_prometheus", "replicas_for"]

#: Weight of the newest season in the profile.
ALPHA = 0.5
#: Closed buckets the level factor compares with the profile, and its bounds.
LEVEL_BUCKETS = 3
LEVEL_BOUNDS = (0.5, 2.0)


class SeasonalForecast:
    """A request-rate profile over one season, learned from arrivals."""

    def __init__(self, season_s: float, bucket_s: float) -> None:
        if bucket_s <= 0 or season_s < 2 * bucket_s:
            raise ValueError(f"need 0 < bucket_s and season_s >= 2 x bucket_s, not season_s "
                             f"{season_s:g}, bucket_s {bucket_s:g}")  # fmt: skip
        self.season_s = season_s
        self.bucket_s = bucket_s
        self.phases = round(season_s / bucket_s)
        #: Requests/s at each phase; None until that phase has been seen.
        self.profile: list[float | None] = [None] * self.phases
        #: The bucket counting now (absolute index: floor(time / bucket_s)) and its arrivals.
        self._bucket: int | None = None
        self._count = 0
        #: (arrivals, what the profile expected) of the last closed buckets, for the level.
        self._recent: deque[tuple[float, float]] = deque(maxlen=LEVEL_BUCKETS)

    # -- learning --------------------------------------------------------------------------

    def add(self, now: float, arrivals: int = 1) -> None:
        """`arrivals` requests arrived at wall time `now`."""
        self._advance(now)
        self._count += arrivals

    def _advance(self, now: float) -> None:
        index = math.floor(now / self.bucket_s)
        if self._bucket is None:
            self._bucket = index
            return
        # Close every bucket up to this one; buckets with no arrival close at rate 0. A gap
        # longer than a season closes one season of them.
        if index - self._bucket > self.phases:
            self._bucket, self._count = index - self.phases, 0
        while self._bucket < index:
            self._close(self._bucket, self._count)
            self._count = 0
            self._bucket += 1

    def _close(self, bucket: int, count: int) -> None:
        phase = bucket % self.phases
        rate = count / self.bucket_s
        before = self.profile[phase]
        if before is not None:
            self._recent.append((rate, before))
        self.profile[phase] = rate if before is None else ALPHA * rate + (1 - ALPHA) * before

    # -- forecasting -----------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every phase seen once: a forecast exists."""
        return all(rate is not None for rate in self.profile)

    def level(self) -> float:
        """How today's traffic compares with the profile (1: as usual)."""
        seen = sum(actual for actual, _ in self._recent)
        expected = sum(predicted for _, predicted in self._recent)
        if expected <= 0:
            return 1.0
        low, high = LEVEL_BOUNDS
        return min(high, max(low, seen / expected))

    def rate(self, at: float) -> float | None:
        """The forecast request rate (per second) at wall time `at`; None before a season."""
        if not self.ready:
            return None
        phase = math.floor(at / self.bucket_s) % self.phases
        return (self.profile[phase] or 0.0) * self.level()

    def peak(self, now: float, horizon_s: float) -> float | None:
        """The highest forecast rate from `now` to `now + horizon_s`."""
        if not self.ready:
            return None
        self._advance(now)
        steps = max(1, math.ceil(horizon_s / self.bucket_s))
        times = [now + min(k * self.bucket_s, horizon_s) for k in range(steps + 1)]
        rates = [self.rate(t) for t in times]
        return max(r for r in rates if r is not None)

    # -- kept across restarts --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"season_s": self.season_s, "bucket_s": self.bucket_s, "profile": self.profile}

    def fill(self, history: list[tuple[float, int]]) -> None:
        """Learn from past arrivals, (time, count) in time order (Prometheus' history)."""
        for at, count in history:
            self.add(at, count)

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Take a saved profile back if it was learned with the same season and buckets."""
        if not saved or saved.get("season_s") != self.season_s:
            return
        if saved.get("bucket_s") != self.bucket_s:
            return
        profile = saved.get("profile")
        if isinstance(profile, list) and len(profile) == self.phases:
            self.profile = [float(x) if isinstance(x, int | float) else None for x in profile]


def replicas_for(rate: float, service_s: float, target_in_flight: float) -> int:
    """Replicas that keep `target_in_flight` requests each at `rate` requests/s, each taking
    `service_s` seconds (Little's law: in flight = rate x time in the system)."""
    return math.ceil(rate * service_s / target_in_flight - 1e-9)


def history_from_prometheus(url: str, node: str, deployment: str, season_s: float,
                            bucket_s: float, now: float) -> list[tuple[float, int]]:  # fmt: skip
    """(time, arrivals) per bucket over the last season, from the agent's own counter as a
    Prometheus that scrapes it kept it (`wattops_deployment_requests_total`): the counter read
    at each bucket's end, differenced (a reset counts from zero, as `increase()` does, without
    its extrapolation; a stretch not scraped after the first sample counts as no arrivals).
    Blocking: call it from a thread. Raises on any failure."""
    from datetime import datetime

    from prometheus_api_client import PrometheusConnect

    prom = PrometheusConnect(url=url, disable_ssl=True)
    query = (f'max(wattops_deployment_requests_total{{node="{node}",'
             f'deployment="{deployment}"}})')  # fmt: skip
    # One bucket more than a season: differences give every phase, the last one closed.
    start = math.floor((now - season_s - bucket_s) / bucket_s) * bucket_s
    found = prom.custom_query_range(
        query, start_time=datetime.fromtimestamp(start), end_time=datetime.fromtimestamp(now),
        step=f"{bucket_s:g}s",
    )  # fmt: skip
    if not found:
        return []
    values = {round(float(t) / bucket_s): float(v) for t, v in found[0]["values"]}
    # From the first sample on, a step with no sample (the agent down, not scraped: the series
    # went stale) served nothing: the counter holds. Before the first sample nothing is known,
    # so those phases stay unseen.
    grid = range(min(values), math.floor(now / bucket_s) + 1)
    points, last = [], values[min(values)]
    for step in grid:
        last = values.get(step, last)
        points.append((step * bucket_s, last))
    out = []
    for (_, before), (t, after) in itertools.pairwise(points):
        out.append((t - bucket_s / 2, round(after - before if after >= before else after)))
    return out
