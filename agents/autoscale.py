"""Load-based replica autoscaling: the Kubernetes HorizontalPodAutoscaler's rule, applied to
requests in flight.

The metric is the deployment's mean number of requests in flight (answering or queued at a
replica) over the last `window_s` seconds, integrated over time rather than sampled, so a
burst shorter than a health tick still counts. The recommendation is HPA's

    desired = ceil(current_ready x (metric per ready replica) / target) = ceil(metric / target)

skipped while the ratio metric / (current x target) is within `tolerance` of 1 (HPA's 10%
tolerance), clamped to [min_replicas, max_replicas]. Scaling up happens at once; scaling down
goes to the highest recommendation of the last `stabilization_s` seconds (HPA's scale-down
stabilization window), so a lull between bursts does not tear replicas down only to start
them again. Parking (idle scale-to-zero) stays the supervisor's business: the autoscaler never
recommends fewer than `min_replicas` and is not consulted while a deployment is parked.
"""

from __future__ import annotations

import math
from collections import deque


class Autoscaler:
    """Recommends a replica count from the requests in flight over time."""

    def __init__(
        self,
        target_in_flight: float,
        min_replicas: int,
        max_replicas: int,
        window_s: float = 10.0,
        stabilization_s: float = 30.0,
        tolerance: float = 0.1,
    ) -> None:
        if target_in_flight <= 0:
            raise ValueError(f"target_in_flight must be above 0, not {target_in_flight}")
        if not 1 <= min_replicas <= max_replicas:
            raise ValueError(
                f"need 1 <= min_replicas <= max_replicas, not {min_replicas}, {max_replicas}"
            )
        self.target = target_in_flight
        self.min_replicas = min_replicas
        self.max_replicas = max_replicas
        self.window_s = window_s
        self.stabilization_s = stabilization_s
        self.tolerance = tolerance
        self._level = 0  # requests in flight now
        self._area = 0.0  # integral of requests in flight over time, up to `_at`
        self._at: float | None = None
        self._areas: deque[tuple[float, float]] = deque()  # (time, area) at each tick
        self._recommendations: deque[tuple[float, int]] = deque()

    def add(self, now: float, delta: int) -> None:
        """Requests in flight went up (+1) or down (-1) at `now` (monotonic seconds)."""
        self._advance(now)
        self._level = max(0, self._level + delta)

    def _advance(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self._area += self._level * (now - self._at)
        self._at = now if self._at is None else max(self._at, now)

    def load(self, now: float) -> float | None:
        """Mean requests in flight over the window ending at `now`; None before a full tick."""
        self._advance(now)
        self._areas.append((now, self._area))
        while len(self._areas) > 2 and self._areas[1][0] <= now - self.window_s:
            self._areas.popleft()
        start, area = self._areas[0]
        if now - start <= 0:
            return None
        return (self._area - area) / (now - start)

    def recommend(self, now: float, current: int) -> int:
        """The replica count to run now, given `current` replicas (call once per tick)."""
        load = self.load(now)
        desired = current
        if load is not None and current > 0:
            ratio = load / (current * self.target)
            if abs(ratio - 1.0) > self.tolerance:
                desired = math.ceil(load / self.target)
        desired = min(self.max_replicas, max(self.min_replicas, desired))
        self._recommendations.append((now, desired))
        while self._recommendations[0][0] < now - self.stabilization_s:
            self._recommendations.popleft()
        if desired >= current:
            return desired
        return min(current, max(r for _, r in self._recommendations))

    def reset(self) -> None:
        """Forget the history (after parking: the next wake starts from a clean slate)."""
        self._areas.clear()
        self._recommendations.clear()
