"""What every power sensor returns: one sample of node power with its source, and per-device
readings (GPUs, INA3221 rails, RAPL zones)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

#: Where a watt figure comes from. Only `estimate` is not a measurement.
PowerSource = Literal["nvml", "jetson", "rapl", "estimate"]
SOURCES: tuple[PowerSource, ...] = ("nvml", "jetson", "rapl", "estimate")


class SensorError(Exception):
    """A sensor cannot be read (absent, unsupported, permission denied, device lost).

    The message names the sensor and the path or call that failed, and what to check.
    """


@dataclass(frozen=True)
class DeviceReading:
    """One measured device: a GPU, a Jetson rail or a RAPL zone."""

    name: str
    watts: float
    #: Cumulative energy in joules from the device's own counter, wrap-around already
    #: counted; None when the device has no counter (its energy is integrated from watts).
    energy_j: float | None = None
    utilisation: float | None = None  # 0..1
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_limit_watts: float | None = None
    volts: float | None = None
    amps: float | None = None
    #: Counted in the node total (False for e.g. Jetson rails already inside VDD_IN).
    in_total: bool = True


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


class Sensor(ABC):
    """A power sensor. `read()` is called from the agent's sampling thread, ~10 times a second,
    so it must be cheap and must not block for long."""

    #: The `source` its samples carry.
    source: ClassVar[PowerSource]

    @abstractmethod
    def read(self) -> PowerSample:
        """One sample now. Raises SensorError if the sensor cannot be read at all."""

    def describe(self) -> str:
        """A one-line description for logs and the node view (what is measured, where)."""
        return self.source

    def close(self) -> None:  # noqa: B027 - optional: most sensors hold nothing open
        """Release what the sensor holds (NVML handles, open files)."""
