"""What every power sensor returns: one sample of node power with its source, and per-device
readings (GPUs, INA3221 rails, RAPL zones, the API's `DeviceReading`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from wattops.agents.api import DeviceReading
from wattops.vocabulary import PowerSource


class SensorError(Exception):
    """A sensor cannot be read (absent, unsupported, permission denied, device lost).

    The message names the sensor and the path or call that failed, and what to check.
    """


@dataclass(frozen=True)
class PowerSample:
    """One reading of the whole node."""

    #: time.monotonic() when read.
    monotonic: float
    source: PowerSource
    #: Node power now, watts.
    watts: float
    #: Cumulative node energy from hardware counters, joules; None: integrate `watts`.
    energy_j: float | None = None
    devices: tuple[DeviceReading, ...] = field(default_factory=tuple)
    #: How `watts` was formed, e.g. "VDD_IN", "sum of module rails", "sum of 2 GPUs".
    total_from: str = ""
    #: Problems that did not stop the reading (a lost GPU among several, say).
    warnings: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class SensorContext:
    """What a sensor may need to open: where the host's /sys is, and the node's estimate."""

    #: Where the host's /sys is mounted (containers, tests): sysfs paths are read under it.
    sysfs_root: Path = Path("/")
    #: Builds the node's utilisation estimate (from its hardware profile).
    estimate: Callable[[], Sensor] | None = None
    #: An NVML module to use instead of pynvml (tests pass a stand-in).
    nvml: Any = None


@dataclass(frozen=True)
class PowerLimit:
    """One device's settable power limit (a GPU's, through NVML), in watts."""

    #: The device's key in counters() and the lever: "gpu0".
    device: str
    #: As in its readings: "gpu0 NVIDIA A100-SXM4-80GB".
    name: str
    min_watts: float
    max_watts: float
    default_watts: float
    #: The limit set now.
    watts: float


class Sensor(ABC):
    """A power sensor. `read()` is called from the agent's sampling thread, ~10 times a second,
    so it must be cheap and must not block for long.

    Sensors are found by `source` in the `wattops.sensors` entry-point group (see
    agents/sensors/registry.py); a new one is a subclass in its own module plus its entry point.
    """

    #: The `source` its samples carry; also its name in the config (`sensor = "..."`).
    source: ClassVar[PowerSource]
    #: Place in `sensor = "auto"` detection, lowest first; None: used only when named.
    auto_order: ClassVar[int | None] = None

    @classmethod
    @abstractmethod
    def open(cls, context: SensorContext) -> Sensor:
        """Build the sensor for this host. Raises SensorError (or OSError/ValueError) when it
        is absent; detection then reads it once before trusting it."""

    @abstractmethod
    def read(self) -> PowerSample:
        """One sample now. Raises SensorError if the sensor cannot be read at all."""

    def describe(self) -> str:
        """A one-line description for logs and the node view (what is measured, where)."""
        return self.source

    def counters(self) -> dict[str, tuple[float, float | None]]:
        """The devices' hardware energy counters as they stand, in joules, with the value they
        wrap at (None: they do not): counters that keep counting while the agent is down, so
        a restarted agent can measure the gap. Empty when the sensor has none."""
        return {}

    def accelerators(self) -> int | None:
        """How many accelerators (GPUs, Jetson modules) the node total covers, when the sensor
        knows; None when it measures no accelerator (RAPL) or nothing at all (the estimate).
        The agent scales a profile that describes fewer to this many."""
        return None

    def power_limits(self) -> list[PowerLimit]:
        """The devices whose power limit the agent may set (the policy's power-limit lever,
        agents/power_cap.py), with their bounds; empty: this sensor has no such lever."""
        return []

    def set_power_limit(self, device: str, watts: float) -> None:
        """Set one device's power limit (within its bounds). SensorError saying why not."""
        raise SensorError(f"{self.source}: no power-limit lever on this sensor")

    def close(self) -> None:  # noqa: B027 - optional: most sensors hold nothing open
        """Release what the sensor holds (NVML handles, open files)."""


__all__ = [
    "DeviceReading",
    "PowerLimit",
    "PowerSample",
    "PowerSource",
    "Sensor",
    "SensorError",
]
