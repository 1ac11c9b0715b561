"""A power estimate for hosts with no usable meter: a linear model between a profile's idle and
maximum watts, driven by utilisation (host CPU from /proc/stat, or any callable)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from wattops.agents.sensors.base import (
    DeviceReading,
    PowerSample,
    PowerSource,
    Sensor,
    SensorContext,
    SensorError,
)


class EstimateSensor(Sensor):
    """watts = idle + (max - idle) * utilisation, utilisation clamped to 0..1. Not a measurement:
    its samples say so in `source` and spell out the model in `total_from`."""

    source: ClassVar[PowerSource] = "estimate"

    @classmethod
    def open(cls, context: SensorContext) -> Sensor:
        """The node's own estimate, built from its hardware profile."""
        if context.estimate is None:
            raise SensorError("estimate: no hardware profile to estimate from")
        return context.estimate()

    def __init__(
        self,
        idle_watts: float,
        max_watts: float,
        utilisation: Callable[[], float],
        label: str,
    ) -> None:
        if not 0 <= idle_watts <= max_watts:
            raise SensorError(
                f"estimate {label!r}: need 0 <= idle_watts <= max_watts, "
                f"got idle {idle_watts} W, max {max_watts} W"
            )
        self.idle_watts = float(idle_watts)
        self.max_watts = float(max_watts)
        self.label = label
        self._utilisation = utilisation

    def read(self) -> PowerSample:
        now = time.monotonic()
        try:
            raw = float(self._utilisation())
        except SensorError:
            raise
        except (OSError, ValueError, TypeError) as err:
            raise SensorError(f"estimate: cannot get utilisation for {self.label}: {err}") from err
        # NaN would pass through min/max unchanged and poison the energy total.
        share = min(max(raw, 0.0), 1.0) if math.isfinite(raw) else 0.0
        watts = self.idle_watts + (self.max_watts - self.idle_watts) * share
        return PowerSample(
            monotonic=now,
            source=self.source,
            watts=watts,
            devices=(DeviceReading(name=self.label, watts=watts, utilisation=share),),
            total_from=(
                f"estimate: {self.label} profile idle {self.idle_watts:g} W .. "
                f"max {self.max_watts:g} W at {share * 100:.0f}% utilisation"
            ),
        )

    def describe(self) -> str:
        return (
            f"estimate: {self.label} profile, idle {self.idle_watts:g} W .. "
            f"max {self.max_watts:g} W by utilisation (not measured)"
        )


class HostCpuUtilisation:
    """Host CPU utilisation (0..1) since the previous call, from the aggregate `cpu` line of
    `<proc_root>/proc/stat`. The first call covers the time since construction."""

    def __init__(self, proc_root: Path = Path("/")) -> None:
        self._path = proc_root / "proc" / "stat"
        self._busy, self._total = self._snapshot()
        self._last = 0.0

    def __call__(self) -> float:
        busy, total = self._snapshot()
        if total <= self._total:
            # No tick since the last call (two calls within one jiffy): nothing new to say.
            return self._last
        self._last = min(max((busy - self._busy) / (total - self._total), 0.0), 1.0)
        self._busy, self._total = busy, total
        return self._last

    def _snapshot(self) -> tuple[int, int]:
        try:
            with open(self._path, "rb") as stat:
                line = stat.readline()
        except OSError as err:
            raise SensorError(f"estimate: cannot read {self._path}: {err.strerror}") from err
        fields = line.split()
        if not fields or fields[0] != b"cpu" or len(fields) < 5:
            raise SensorError(f"estimate: {self._path} does not start with the aggregate cpu line")
        # user nice system idle iowait irq softirq steal; guest and guest_nice are already
        # inside user and nice, so they are not added again.
        ticks = [int(field) for field in fields[1:9]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total = sum(ticks)
        return total - idle, total
