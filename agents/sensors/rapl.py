"""CPU power from the RAPL energy counters in the powercap sysfs tree (Intel, and AMD Zen through
the same `intel-rapl` zones): package and DRAM zones, wrap-around counted."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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

POWERCAP = "sys/class/powercap"
#: Zones counted in the node total. `core` and `uncore` are parts of their package, and `psys`
#: (laptops) covers the package too, so counting any of them would count watts twice.
COUNTED = ("package", "dram")
#: Watts are formed over at least this long: RAPL counters tick about every millisecond in
#: ~61 uJ steps, so a shorter window gives noise rather than a figure.
MIN_WINDOW_S = 0.05
#: More than any one RAPL zone draws (server packages peak at a few hundred watts): a
#: backwards step that would mean more than this since the last read is a reset, not a wrap.
PLAUSIBLE_MAX_W = 2000.0

PERMISSION_FIX = (
    "energy_uj is readable by root only since the 2020 fix for CVE-2020-8694 (Platypus): run "
    "the agent as root, or make the counters readable, e.g. "
    "`sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj` (until reboot) or a udev rule "
    '`ACTION=="add", SUBSYSTEM=="powercap", RUN+="/bin/chmod o+r /sys%p/energy_uj"`'
)


@dataclass
class _Zone:
    #: The powercap zone, e.g. "intel-rapl:0:0".
    zone: str
    #: What is reported, e.g. "package-0" or "package-0/dram".
    name: str
    energy_path: str
    #: The counter wraps back to 0 past this value.
    max_range_uj: int
    last_uj: int
    #: Microjoules counted since the sensor started, wraps included.
    total_uj: int = 0
    #: `total_uj` when the current watts window began.
    window_uj: int = 0
    watts: float = 0.0
    #: Clock time of the last read of `last_uj`.
    last_read: float = 0.0


class RaplSensor(Sensor):
    """Package and DRAM RAPL zones. Zones are found once; each read reads one small file per zone.

    Watts are the energy delta over the time since the previous read. A read less than
    MIN_WINDOW_S after the previous one (the first read straight after construction, say)
    repeats the last figure, 0.0 W at first, and keeps counting energy."""

    source: ClassVar[PowerSource] = "rapl"
    auto_order: ClassVar[int | None] = 30

    @classmethod
    def open(cls, context: SensorContext) -> RaplSensor:
        return cls(context.sysfs_root)

    def __init__(
        self, sysfs_root: Path = Path("/"), clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._root = sysfs_root
        self._clock = clock
        self._zones = _discover(sysfs_root / POWERCAP)
        self._window_start = clock()
        for zone in self._zones:
            zone.last_read = self._window_start

    def read(self) -> PowerSample:
        now = self._clock()
        for zone in self._zones:
            value = _read_energy(zone)
            if value >= zone.last_uj:
                zone.total_uj += value - zone.last_uj
            else:
                # Backwards: a wrap past max_energy_range_uj, or a reset to zero (driver reload,
                # suspend, a firmware update). Read as a wrap, a reset from 2 J to 1 J would add
                # a whole range (262 kJ: a 262 kW "reading"); a step no zone could draw in the
                # time since the last read is a reset, and counts what was gathered since.
                wrapped = value + zone.max_range_uj - zone.last_uj
                seconds = max(now - zone.last_read, MIN_WINDOW_S)
                zone.total_uj += value if wrapped / 1e6 / seconds > PLAUSIBLE_MAX_W else wrapped
            zone.last_uj = value
            zone.last_read = now
        elapsed = now - self._window_start
        if elapsed >= MIN_WINDOW_S:
            for zone in self._zones:
                zone.watts = (zone.total_uj - zone.window_uj) / 1e6 / elapsed
                zone.window_uj = zone.total_uj
            self._window_start = now
        devices = tuple(
            DeviceReading(name=zone.name, watts=zone.watts, energy_j=zone.total_uj / 1e6)
            for zone in self._zones
        )
        return PowerSample(
            monotonic=now,
            source=self.source,
            watts=sum(device.watts for device in devices),
            energy_j=sum(zone.total_uj for zone in self._zones) / 1e6,
            devices=devices,
            total_from="sum of RAPL " + ", ".join(zone.name for zone in self._zones),
        )

    def counters(self) -> dict[str, tuple[float, float | None]]:
        return {z.zone: (z.last_uj / 1e6, z.max_range_uj / 1e6) for z in self._zones}

    def describe(self) -> str:
        zones = ", ".join(f"{zone.name} ({zone.zone})" for zone in self._zones)
        return f"rapl: {zones} in {self._root / POWERCAP}"


def _discover(powercap: Path) -> list[_Zone]:
    # The class folder lists every zone flat (links into /sys/devices/virtual/powercap, where
    # sub-zones are nested); the nested pattern only matters for a tree copied without the
    # flat links. `intel-rapl-mmio:*` is left out on purpose: on client CPUs it is a second
    # view of package-0 and would double it.
    folders: dict[str, Path] = {}
    for folder in [*powercap.glob("intel-rapl:*"), *powercap.glob("intel-rapl:*/intel-rapl:*")]:
        folders.setdefault(folder.name, folder)
    zones: list[_Zone] = []
    for zone_id in sorted(folders, key=_zone_order):
        folder = folders[zone_id]
        kind = _read_text(folder / "name")
        if not kind.startswith(COUNTED):
            continue
        name = kind
        if not kind.startswith("package"):
            # "dram" alone is ambiguous on a two-socket host: name it after its package.
            parent = folders.get(zone_id.rsplit(":", 1)[0])
            if parent is not None and zone_id.count(":") == 2:
                name = f"{_read_text(parent / 'name')}/{kind}"
        zone = _Zone(
            zone=zone_id,
            name=name,
            energy_path=str(folder / "energy_uj"),
            max_range_uj=int(_read_text(folder / "max_energy_range_uj")),
            last_uj=0,
        )
        zone.last_uj = _read_energy(zone)
        zones.append(zone)
    if not any(zone.name.startswith("package") for zone in zones):
        raise SensorError(
            f"rapl: no RAPL package zone under {powercap}; not an x86 host with RAPL, or the "
            "intel_rapl_msr module is not loaded (`sudo modprobe intel_rapl_msr`)"
        )
    return zones


def _read_energy(zone: _Zone) -> int:
    """The zone's counter, microjoules (raw os calls: this runs 10 times a second per zone)."""
    try:
        fd = os.open(zone.energy_path, os.O_RDONLY)
        try:
            raw = os.read(fd, 32)
        finally:
            os.close(fd)
        return int(raw)
    except PermissionError as err:
        raise SensorError(f"rapl: cannot read {zone.energy_path}: {PERMISSION_FIX}") from err
    except OSError as err:
        raise SensorError(f"rapl: cannot read {zone.energy_path}: {err.strerror}") from err
    except ValueError as err:
        raise SensorError(f"rapl: {zone.energy_path} does not hold a number: {err}") from err


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise SensorError(f"rapl: cannot read {path}: {err.strerror}") from err


def _zone_order(zone_id: str) -> tuple[int, ...]:
    return tuple(int(part) for part in zone_id.split(":")[1:] if part.isdigit())
