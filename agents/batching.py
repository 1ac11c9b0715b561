"""Adaptive batching: how many of a replica's slots the agent lets decode at once.

A `llamacpp-server` replica is started with `parallel` slots; the gateway lets at most
`slots` requests into each replica at a time (the rest wait at the gateway for a free slot).
`SlotTuner` moves `slots` between 1 and `parallel`, one window of measurements at a time:

- p95 latency of the window above `latency_slo_p95_ms`: halve (batching makes each token
  slower; past the SLO, throughput is not worth it);
- requests did not fill the slots (no request waited for one): hold; more slots would not be
  used, fewer would only add waiting;
- the last change doubled the slots and tokens/s per replica did not rise by `min_gain`: go
  back, and do not try that size again for `hold_windows` windows;
- otherwise, while there is room below `parallel`: double.

Each change carries its reason, written in the deployment's status and the agent's log, so the
operator sees what the agent did and why. Doubling matches how batched decode scales on CPUs
(one weight read per step for every sequence in the batch) and reaches any size in a few steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Window:
    """What one replica set did over one tuning window."""

    seconds: float
    #: Tokens decoded (prompt evaluated plus generated), all ready replicas together.
    tokens: int
    replicas: int
    #: Requests that had to wait for a free slot at the gateway.
    waited: int
    #: p95 latency of the requests finished in the window (None: none finished).
    p95_s: float | None

    @property
    def tokens_per_s_per_replica(self) -> float:
        if self.seconds <= 0 or self.replicas <= 0:
            return 0.0
        return self.tokens / self.seconds / self.replicas


@dataclass
class SlotTuner:
    """Picks the slots in use per replica from measured windows (see the module docstring)."""

    parallel: int
    slo_p95_s: float | None = None
    window_s: float = 30.0
    #: Relative rise in tokens/s per replica a doubling must bring to be kept.
    min_gain: float = 0.05
    #: Windows to wait before trying again a size that did not pay.
    hold_windows: int = 10
    slots: int = 1
    reason: str = "starting with one slot; more once requests queue for one"
    changed_at: float = field(default_factory=time.time)
    #: Tokens/s per replica measured at the size before the last doubling (None: no doubling
    #: pending judgement).
    _before_doubling: float | None = None
    _ceiling: int | None = None
    _ceiling_windows: int = 0
    last: Window | None = None

    def __post_init__(self) -> None:
        self.slots = max(1, min(self.slots, self.parallel))

    def observe(self, window: Window) -> bool:
        """Take one window's measurements; True when `slots` changed (see `reason`)."""
        self.last = window
        rate = window.tokens_per_s_per_replica
        if self._ceiling is not None:
            self._ceiling_windows -= 1
            if self._ceiling_windows <= 0:
                self._ceiling = None
        if (
            self.slo_p95_s is not None
            and window.p95_s is not None
            and window.p95_s > self.slo_p95_s
        ):
            # Past the SLO: never more slots; fewer while there are any to give back (at one
            # slot, batching is not what makes the answers slow).
            self._before_doubling = None
            return self._set(
                self.slots // 2,
                f"p95 {window.p95_s * 1000:.0f} ms above the SLO "
                f"{self.slo_p95_s * 1000:.0f} ms with {self.slots} slots",
            )
        if self._before_doubling is not None:
            before, self._before_doubling = self._before_doubling, None
            if window.waited and rate < before * (1 + self.min_gain):
                self._ceiling, self._ceiling_windows = self.slots, self.hold_windows
                return self._set(
                    self.slots // 2,
                    f"{self.slots} slots did not raise tokens/s per replica "
                    f"({before:.1f} -> {rate:.1f})",
                )
        if not window.waited:
            return False
        bigger = min(self.parallel, self.slots * 2)
        if bigger == self.slots or (self._ceiling is not None and bigger >= self._ceiling):
            return False
        p95 = f", p95 {window.p95_s * 1000:.0f} ms" if window.p95_s is not None else ""
        self._before_doubling = rate
        return self._set(
            bigger,
            f"{window.waited} request(s) waited for a slot at {self.slots} "
            f"({rate:.1f} tokens/s per replica{p95})",
        )

    def _set(self, slots: int, reason: str) -> bool:
        slots = max(1, min(self.parallel, slots))
        if slots == self.slots:
            return False
        self.slots = slots
        self.reason = reason
        self.changed_at = time.time()
        return True
