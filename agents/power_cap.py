"""The GPU power-limit lever: what the node policy turns to keep a node under `max_watts`.

As Zeus does, the lever lowers the GPUs' power limits (NVML's nvmlDeviceSetPowerManagementLimit,
the call behind `nvidia-smi -pl`) rather than refusing work: a capped GPU lowers its clocks, so
it draws less and serves more slowly. Each card stays within its own min..max. The limits found
before the first change are written to `state_dir/power-limits.json` (atomically) before any is
changed, and put back:

- when the agent stops;
- when the policy lifts the cap (the node is back under its limit with the caps not binding:
  each capped GPU draws under 90% of its cap; after the dwell time, so no flapping);
- on the next start, when the agent was killed with a cap in place (a lowered limit outlives
  the process that set it, up to a driver reload).

A node whose sensor has no lever (RAPL, Jetson, the estimate) has none of this; the policy
meets a watt limit there with parking, scaling and precision alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from wattops.agents.sensors.base import PowerLimit, Sensor, SensorError
from wattops.vocabulary import atomic_write

__all__ = ["BINDING", "PowerCap", "PowerView"]

log = logging.getLogger("wattops.agent")

#: A capped GPU drawing at least this share of its cap is held back by it.
BINDING = 0.9


@dataclass(frozen=True)
class PowerView:
    """What the policy needs of the lever, now."""

    limits: tuple[PowerLimit, ...]
    #: Watts each device draws now (by `device`).
    draws: dict[str, float]
    #: The limits found before the cap; empty: no cap in place.
    originals: dict[str, float]
    #: Seconds since the lever last moved (None: never).
    since_change_s: float | None


class PowerCap:
    """Sets and restores GPU power limits through the power sensor."""

    def __init__(self, sensor: Sensor, path: Path) -> None:
        self.sensor = sensor
        self.path = path
        self.originals: dict[str, float] = {}
        self._changed_at: float | None = None

    def limits(self) -> list[PowerLimit]:
        return self.sensor.power_limits()

    def view(self, draws: dict[str, float]) -> PowerView | None:
        """None: no lever on this node."""
        limits = self.limits()
        if not limits:
            return None
        since = None if self._changed_at is None else time.monotonic() - self._changed_at
        return PowerView(tuple(limits), draws, dict(self.originals), since)

    def restore_left_over(self) -> list[str]:
        """At start: put back the limits a killed agent left lowered. Returns what was done."""
        try:
            saved = json.loads(self.path.read_bytes())
            self.originals = {str(k): float(v) for k, v in saved["originals"].items()}
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("%s is unreadable (%s): GPU power limits not restored; check them with "
                      "`nvidia-smi -q -d POWER`", self.path, exc)  # fmt: skip
            return []
        done = self.restore()
        if done:
            log.warning("a previous agent left GPU power limits lowered: restored (%s)",
                        ", ".join(done))  # fmt: skip
        return done

    def apply(self, targets: dict[str, float]) -> list[str]:
        """Set these limits (clamped to each card's bounds), keeping the originals first.
        Returns what was set; SensorError if a card refused (what was set stays recorded)."""
        bounds = {limit.device: limit for limit in self.limits()}
        unknown = sorted(set(targets) - set(bounds))
        if unknown:
            raise SensorError(f"{', '.join(unknown)}: no settable power limit on this node")
        before = dict(self.originals)
        for device in targets:
            self.originals.setdefault(device, bounds[device].watts)
        self._save()  # on disk before any limit moves: a kill from here on is undone at start
        done = []
        try:
            for device, watts in targets.items():
                limit = bounds[device]
                watts = min(limit.max_watts, max(limit.min_watts, watts))
                self.sensor.set_power_limit(device, watts)
                done.append(f"{device} {limit.watts:.0f} -> {watts:.0f} W")
        finally:
            if not done:  # nothing moved: nothing more to put back than before
                self.originals = before
                if before:
                    self._save()
                else:
                    self.path.unlink(missing_ok=True)
            self._changed_at = time.monotonic()
        return done

    def restore(self) -> list[str]:
        """Put the original limits back; the record goes once all are back."""
        if not self.originals:
            return []
        done, failed = [], []
        for device, watts in self.originals.items():
            try:
                self.sensor.set_power_limit(device, watts)
                done.append(f"{device} -> {watts:.0f} W")
            except SensorError as exc:
                failed.append(device)
                log.error("could not restore %s's power limit: %s", device, exc)
        if not failed:
            self.originals = {}
            self.path.unlink(missing_ok=True)
        self._changed_at = time.monotonic()
        return done

    def _save(self) -> None:
        atomic_write(self.path, json.dumps({"originals": self.originals, "at": time.time()},
                                           indent=2).encode())  # fmt: skip
