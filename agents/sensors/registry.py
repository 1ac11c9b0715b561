"""Power sensors by name: the `wattops.sensors` entry-point group.

The built-in ones (nvml, jetson, rapl, estimate) are declared in pyproject.toml like any
third-party sensor; `register_sensor` adds one at run time.
"""

from __future__ import annotations

from wattops.agents.sensors.base import Sensor
from wattops.vocabulary.plugins import Registry

SENSORS: Registry[type[Sensor]] = Registry("wattops.sensors", "sensor")


def register_sensor(cls: type[Sensor]) -> type[Sensor]:
    """Make `cls` available as `sensor = "<cls.source>"` (usable as a class decorator)."""
    return SENSORS.register(cls.source, cls)


def sensor_names() -> list[str]:
    """Every sensor kind the config accepts: `auto` and the registered sensors."""
    return ["auto", *SENSORS.names()]


def auto_order() -> list[type[Sensor]]:
    """The sensors `auto` tries, in order (GPUs first: they draw most of a node's power)."""
    found = [SENSORS.get(name) for name in SENSORS.names()]
    tried = [cls for cls in found if cls.auto_order is not None]
    return sorted(tried, key=lambda cls: (cls.auto_order, cls.source))
