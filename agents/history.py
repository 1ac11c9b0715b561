"""The in-memory history: one point per second for the last hour, and figures over windows.

The embedded default when no Prometheus server keeps the history; `GET /v1/history` serves
it, and the per-token figures in the snapshot are computed from it.
"""

from __future__ import annotations

from collections import deque

from wattops.agents.api import Figures, HistoryPoint

#: One hour at one point per second.
CAPACITY = 3600


class HistoryRing:
    """A bounded ring of HistoryPoints, oldest first."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.points: deque[HistoryPoint] = deque(maxlen=capacity)

    def append(self, point: HistoryPoint) -> None:
        """Add the newest point (the oldest falls off when full)."""
        self.points.append(point)

    def since(self, seconds: float) -> list[HistoryPoint]:
        """Points from the last `seconds`, oldest first."""
        if not self.points:
            return []
        start = self.points[-1].t - seconds
        return [p for p in self.points if p.t > start]

    def window(self, seconds: float) -> tuple[HistoryPoint, HistoryPoint] | None:
        """The oldest point within `seconds` of the newest, and the newest; None if < 2."""
        if len(self.points) < 2:
            return None
        newest = self.points[-1]
        oldest = newest
        for point in reversed(self.points):
            if newest.t - point.t > seconds:
                break
            oldest = point
        if oldest is newest:
            oldest = self.points[-2]
        return oldest, newest


def figures(
    old: HistoryPoint,
    new: HistoryPoint,
    deployment: str | None,
    input_weight: float,
    output_weight: float,
) -> Figures:
    """Rates and per-token figures between two points, for a deployment or (None) the node."""
    seconds = new.t - old.t
    if deployment is None:
        names = [n for n in new.deployments if n in old.deployments]
        energy = new.energy_j_total - old.energy_j_total
        cost = new.cost_usd_total - old.cost_usd_total
        carbon = new.carbon_g_total - old.carbon_g_total
    else:
        if deployment not in old.deployments or deployment not in new.deployments:
            return Figures(window_s=seconds)
        names = [deployment]
        a, b = old.deployments[deployment], new.deployments[deployment]
        energy = b.energy_j_total - a.energy_j_total
        cost = b.cost_usd_total - a.cost_usd_total
        carbon = b.carbon_g_total - a.carbon_g_total

    def delta(field: str) -> float:
        return float(
            sum(
                getattr(new.deployments[n], field) - getattr(old.deployments[n], field)
                for n in names
            )
        )

    prompt = delta("prompt_tokens_total")
    completion = delta("completion_tokens_total")
    tokens = prompt + completion
    hits, misses = delta("cache_hits_total"), delta("cache_misses_total")
    weighted = input_weight * prompt + output_weight * completion
    per_unit = cost / weighted if weighted > 0 else None
    return Figures(
        window_s=seconds,
        watts=energy / seconds if seconds > 0 else None,
        tokens_per_s=tokens / seconds if seconds > 0 else None,
        requests_per_s=delta("requests_total") / seconds if seconds > 0 else None,
        cost_usd_per_hour=cost / seconds * 3600 if seconds > 0 else None,
        j_per_token=energy / tokens if tokens > 0 else None,
        usd_per_1m_tokens=cost / tokens * 1e6 if tokens > 0 else None,
        usd_per_1m_input_tokens=per_unit * input_weight * 1e6 if per_unit is not None else None,
        usd_per_1m_output_tokens=per_unit * output_weight * 1e6 if per_unit is not None else None,
        gco2e_per_1m_tokens=carbon / tokens * 1e6 if tokens > 0 else None,
        response_cache_hit_rate=hits / (hits + misses) if hits + misses > 0 else None,
        prefix_cache_hit_rate=delta("cached_prompt_tokens_total") / prompt if prompt > 0 else None,
    )
