"""Choosing the node's power sensor: an explicit kind, or the first that works of NVML, Jetson
and RAPL, falling back to the estimate."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from wattops.agents.sensors.base import Sensor, SensorError
from wattops.agents.sensors.jetson import JetsonSensor
from wattops.agents.sensors.nvml import NvmlSensor
from wattops.agents.sensors.rapl import RaplSensor

KINDS = ("auto", "nvml", "jetson", "rapl", "estimate")
#: The order `auto` tries measured sensors in: GPUs draw most of an inference node's power.
AUTO_ORDER = ("nvml", "jetson", "rapl")


def detect_sensor(
    kind: str, sysfs_root: Path, estimate: Callable[[], Sensor], nvml: Any = None
) -> tuple[Sensor, list[str]]:
    """The sensor to use and, for `auto`, why each measured sensor before it was skipped
    (e.g. "nvml: NVML library not found ...").

    A measured sensor counts only once it has given one successful read(). An explicit kind
    that cannot be read raises SensorError: the operator asked for that sensor, so there is no
    quiet fallback to something else.
    """
    if kind not in KINDS:
        raise SensorError(f"unknown sensor kind {kind!r}; choose one of {', '.join(KINDS)}")
    builders: dict[str, Callable[[], Sensor]] = {
        "nvml": lambda: NvmlSensor(nvml),
        "jetson": lambda: JetsonSensor(sysfs_root),
        "rapl": lambda: RaplSensor(sysfs_root),
    }
    if kind == "estimate":
        return estimate(), []
    if kind != "auto":
        return _open(kind, builders[kind]), []
    notes: list[str] = []
    for name in AUTO_ORDER:
        try:
            return _open(name, builders[name]), notes
        except SensorError as err:
            notes.append(str(err))
    return estimate(), notes


def _open(name: str, build: Callable[[], Sensor]) -> Sensor:
    """Build the sensor and read it once; SensorError (prefixed with its name) if either fails."""
    try:
        sensor = build()
    except SensorError:
        raise
    except (OSError, ValueError) as err:
        raise SensorError(f"{name}: {err}") from err
    try:
        sensor.read()
    except SensorError:
        sensor.close()
        raise
    except (OSError, ValueError) as err:
        sensor.close()
        raise SensorError(f"{name}: first read failed: {err}") from err
    return sensor
