"""The power meter: samples the node's sensor at a fixed rate and turns samples into energy.

Energy comes from the hardware's own counter where the sensor has one (NVML's total energy,
RAPL's energy_uj), and is integrated from watts (trapezoid rule) where it has not. When the
sensor fails, the sample comes from the profile estimate instead, is labelled `estimate`, and
the failure is kept for the alerts, so counters never stall and never pass an estimate off as
a measurement.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from wattops.agents.sensors.base import PowerSample, Sensor, SensorError

log = logging.getLogger("wattops.agent")

#: Time constant of the smoothed watts figure.
SMOOTHING_S = 5.0


@dataclass(frozen=True)
class EnergyInterval:
    """Energy used between two samples."""

    sample: PowerSample
    joules: float
    seconds: float
    #: True when the energy is (partly) estimated rather than measured.
    estimated: bool


class PowerMeter:
    """Samples `sensor` every 1/hz seconds on a worker thread; reports each interval."""

    def __init__(self, sensor: Sensor, fallback: Sensor | None, hz: float) -> None:
        self.sensor = sensor
        self.fallback = fallback
        self.hz = hz
        self.latest: PowerSample | None = None
        self.watts_smoothed = 0.0
        self.error: str | None = None
        self.error_since: float | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="power")

    def read(self) -> tuple[PowerSample, bool]:
        """One sample (blocking): the sensor's, or the fallback's if the sensor fails."""
        try:
            sample = self.sensor.read()
        except SensorError as exc:
            if self.error is None:
                log.warning("power sensor %s failed: %s", self.sensor.source, exc)
                self.error_since = time.time()
            self.error = str(exc)
            if self.fallback is None:
                raise
            return self.fallback.read(), True
        if self.error is not None:
            log.info("power sensor %s is back", self.sensor.source)
        self.error = None
        self.error_since = None
        return sample, sample.source == "estimate"

    def interval(self, previous: PowerSample, current: PowerSample) -> float:
        """Joules between two samples: from counters when both have them, else integrated."""
        seconds = max(0.0, current.monotonic - previous.monotonic)
        if (
            current.energy_j is not None
            and previous.energy_j is not None
            and current.source == previous.source
            and current.energy_j >= previous.energy_j
        ):
            return current.energy_j - previous.energy_j
        return (previous.watts + current.watts) / 2.0 * seconds

    def _smooth(self, watts: float, seconds: float) -> None:
        if self.latest is None:
            self.watts_smoothed = watts
            return
        alpha = 1.0 - math.exp(-seconds / SMOOTHING_S)
        self.watts_smoothed += alpha * (watts - self.watts_smoothed)

    async def run(self, on_interval: Callable[[EnergyInterval], None]) -> None:
        """Sample forever, calling `on_interval` on the event loop after each sample."""
        loop = asyncio.get_running_loop()
        period = 1.0 / self.hz
        next_at = time.monotonic()
        while True:
            try:
                sample, estimated = await loop.run_in_executor(self._executor, self.read)
            except SensorError:
                await asyncio.sleep(period)
                continue
            previous = self.latest
            if previous is not None:
                joules = self.interval(previous, sample)
                seconds = max(0.0, sample.monotonic - previous.monotonic)
                self._smooth(sample.watts, seconds)
                self.latest = sample
                on_interval(EnergyInterval(sample, joules, seconds, estimated))
            else:
                self._smooth(sample.watts, 0.0)
                self.latest = sample
            # Fixed-rate schedule: a slow read shortens the next sleep instead of drifting.
            next_at += period
            delay = next_at - time.monotonic()
            if delay < -period:
                next_at = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    def close(self) -> None:
        """Release the sensor and the sampling thread."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.sensor.close()
        if self.fallback is not None:
            self.fallback.close()
