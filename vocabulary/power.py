"""Where a watt figure comes from: the name of the sensor that gave it.

Sensors are found through a registry (`wattops.sensors` entry points), so a source is a plain
name; these are the built-in ones. Only `estimate` is not a measurement, and every figure
formed from it says so.
"""

from __future__ import annotations

from typing import TypeAlias

#: A sensor's name as it appears on every watt figure (`nvml`, `rapl`, ..., `estimate`).
PowerSource: TypeAlias = str

#: The one source that is no measurement: watts modelled from utilisation.
ESTIMATE: PowerSource = "estimate"

#: The sensors wattops ships, measured first (auto detection tries them in this order).
BUILTIN_SOURCES: tuple[PowerSource, ...] = ("nvml", "jetson", "rapl", ESTIMATE)
