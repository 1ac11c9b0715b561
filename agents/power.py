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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from wattops.agents.sensors.base import PowerSample, Sensor, SensorError
from wattops.vocabulary import ESTIMATE

log = logging.getLogger("wattops.agent")

#: Time constant of the smoothed watts figure.
SMOOTHING_S = 5.0


@dataclass(frozen=True)
class EnergyInterval:
    """Energy used over an interval (about a second: the samples in it added up)."""

    #: The last sample of the interval.
    sample: PowerSample
    joules: float
    seconds: float
    #: The part of `joules` that was estimated rather than measured.
    estimated_joules: float = 0.0

    @property
    def source(self) -> str:
        """Where the interval's energy comes from, by its weakest part: `estimate` as soon as
        any of it was estimated, else the sensor's source."""
        return ESTIMATE if self.estimated_joules > 0 else self.sample.source


class PowerMeter:
    """Samples `sensor` every 1/hz seconds on its own thread and integrates energy there;
    hands the event loop one EnergyInterval per `report_s` (a few per second, so each 1 s
    history point has several), so the loop's cost does not grow with the sampling rate."""

    def __init__(
        self, sensor: Sensor, fallback: Sensor | None, hz: float, report_s: float = 0.25
    ) -> None:
        self.sensor = sensor
        self.fallback = fallback
        self.hz = hz
        self.report_s = report_s
        self.latest: PowerSample | None = None
        self.watts_smoothed = 0.0
        self.error: str | None = None
        self.error_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
        return sample, sample.source == ESTIMATE

    @staticmethod
    def interval(previous: PowerSample, current: PowerSample) -> float:
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

    @classmethod
    def step(cls, previous: PowerSample, current: PowerSample) -> tuple[float, float]:
        """(joules, estimated joules) between two samples. A step with an estimate at either
        end counts as estimated: integrated across a change of source, half its trapezoid is
        estimate watts, so it takes the weaker source's label, never the measured one."""
        joules = cls.interval(previous, current)
        estimated = ESTIMATE in (previous.source, current.source)
        return joules, joules if estimated else 0.0

    def _smooth(self, watts: float, seconds: float) -> None:
        if self.latest is None:
            self.watts_smoothed = watts
            return
        alpha = 1.0 - math.exp(-seconds / SMOOTHING_S)
        self.watts_smoothed += alpha * (watts - self.watts_smoothed)

    def _sample_forever(self, report: Callable[[EnergyInterval], None]) -> None:
        period = 1.0 / self.hz
        next_at = time.monotonic()
        joules = estimated = seconds = 0.0
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            # Fixed-rate schedule: a slow read shortens the next wait instead of drifting.
            next_at += period
            if next_at < time.monotonic() - period:
                next_at = time.monotonic()
            try:
                sample, _ = self.read()
            except SensorError:
                continue
            except Exception:  # a sensor bug must not stop the meter
                log.exception("power sensor %s raised", self.sensor.source)
                continue
            previous = self.latest
            if previous is not None:
                step, step_estimated = self.step(previous, sample)
                dt = max(0.0, sample.monotonic - previous.monotonic)
                self._smooth(sample.watts, dt)
                joules += step
                seconds += dt
                estimated += step_estimated
            else:
                self._smooth(sample.watts, 0.0)
            self.latest = sample
            if seconds >= self.report_s:
                report(EnergyInterval(sample, joules, seconds, estimated))
                joules = estimated = seconds = 0.0

    async def run(self, on_interval: Callable[[EnergyInterval], None]) -> None:
        """Sample until cancelled; `on_interval` runs on the event loop about once a second."""
        loop = asyncio.get_running_loop()

        def report(interval: EnergyInterval) -> None:
            loop.call_soon_threadsafe(on_interval, interval)

        self._stop.clear()
        self._thread = threading.Thread(
            target=self._sample_forever, args=(report,), name="power-meter", daemon=True
        )
        self._thread.start()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            self._stop.set()

    def close(self) -> None:
        """Stop sampling and release the sensors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sensor.close()
        if self.fallback is not None:
            self.fallback.close()
