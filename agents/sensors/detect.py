"""Choosing the node's power sensor: an explicit kind, or the first that works of the measured
sensors (NVML, Jetson, RAPL and any installed one with an `auto_order`), falling back to the
estimate."""

from __future__ import annotations

from wattops.agents.sensors.base import Sensor, SensorContext, SensorError
from wattops.agents.sensors.registry import SENSORS, auto_order, sensor_names
from wattops.vocabulary import ESTIMATE
from wattops.vocabulary.plugins import UnknownPlugin


def detect_sensor(kind: str, context: SensorContext) -> tuple[Sensor, list[str]]:
    """The sensor to use and, for `auto`, why each measured sensor before it was skipped
    (e.g. "nvml: NVML library not found ...").

    A measured sensor counts only once it has given one successful read(). An explicit kind
    that cannot be read raises SensorError: the operator asked for that sensor, so there is no
    quiet fallback to something else.
    """
    if kind != "auto":
        try:
            cls = SENSORS.get(kind)
        except UnknownPlugin:
            raise SensorError(
                f"unknown sensor kind {kind!r}; choose one of {', '.join(sensor_names())}"
            ) from None
        if kind == ESTIMATE:
            return cls.open(context), []
        return _open(cls, context), []
    notes: list[str] = []
    for cls in auto_order():
        try:
            return _open(cls, context), notes
        except SensorError as err:
            notes.append(str(err))
    return SENSORS.get(ESTIMATE).open(context), notes


def _open(cls: type[Sensor], context: SensorContext) -> Sensor:
    """Build the sensor and read it once; SensorError (prefixed with its name) if either fails."""
    name = cls.source
    try:
        sensor = cls.open(context)
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
