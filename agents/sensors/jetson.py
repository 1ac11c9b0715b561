"""Jetson board power from the INA3221 monitors in sysfs: per-rail watts and the node total, on
JetPack 5/6 (hwmon `ina3221` driver) and JetPack 4 (IIO `ina3221x` driver)."""

from __future__ import annotations

import os
import time
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

#: JetPack 5/6: `<chip>/hwmon/hwmonN/in*_label`, `in*_input` (mV), `curr*_input` (mA).
HWMON_DRIVER = "sys/bus/i2c/drivers/ina3221"
#: JetPack 4: `<chip>/iio:deviceN/rail_name_N`, `in_powerN_input` (mW).
IIO_DRIVER = "sys/bus/i2c/drivers/ina3221x"
#: Rails that measure the whole module input, in order of preference; where a board has one,
#: every other rail is a part of it.
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN")
#: The mainline driver's in7: the sum of the three shunt voltages (uV), not a rail.
SHUNT_SUM_LABEL = "sum of shunt voltages"
#: Channels wired to nothing (AGX Orin's second monitor) carry this label.
NOT_CONNECTED = "NC"


@dataclass(frozen=True)
class _Rail:
    name: str
    #: The monitor's I2C device, e.g. "1-0040".
    chip: str
    #: The sysfs folder the rail's files are in, for messages.
    folder: str
    #: hwmon: (millivolts, milliamps) files; iio: (milliwatts,).
    files: tuple[str, ...]
    in_total: bool = True

    def read(self) -> DeviceReading:
        if len(self.files) == 1:
            # JetPack 4: only the power file is read. Each read of an ina3221x file makes the
            # driver run an I2C conversion, so volts and amps too would triple the bus time.
            return DeviceReading(
                name=self.name, watts=_read_int(self.files[0]) / 1000.0, in_total=self.in_total
            )
        millivolts = _read_int(self.files[0])
        milliamps = _read_int(self.files[1])
        return DeviceReading(
            name=self.name,
            watts=millivolts * milliamps / 1e6,
            volts=millivolts / 1000.0,
            amps=milliamps / 1000.0,
            in_total=self.in_total,
        )


class JetsonSensor(Sensor):
    """The INA3221 rails of a Jetson module. Paths are found once; each read opens and reads two
    small files per rail (one on JetPack 4)."""

    source: ClassVar[PowerSource] = "jetson"
    auto_order: ClassVar[int | None] = 20

    @classmethod
    def open(cls, context: SensorContext) -> JetsonSensor:
        return cls(context.sysfs_root)

    def __init__(self, sysfs_root: Path = Path("/")) -> None:
        self._root = sysfs_root
        rails = _hwmon_rails(sysfs_root) + _iio_rails(sysfs_root)
        if not rails:
            raise SensorError(
                f"jetson: no INA3221 power monitor under {sysfs_root / HWMON_DRIVER} or "
                f"{sysfs_root / IIO_DRIVER}; not a Jetson with on-module monitors "
                "(the Jetson Nano 2GB has none)"
            )
        names = {rail.name for rail in rails}
        self._total_rail = next((name for name in TOTAL_RAILS if name in names), None)
        if self._total_rail is not None:
            rails = [
                _Rail(
                    rail.name,
                    rail.chip,
                    rail.folder,
                    rail.files,
                    in_total=rail.name == self._total_rail,
                )
                for rail in rails
            ]
        self._rails = tuple(rails)

    def read(self) -> PowerSample:
        now = time.monotonic()
        devices: list[DeviceReading] = []
        warnings: list[str] = []
        total: DeviceReading | None = None
        for rail in self._rails:
            try:
                reading = rail.read()
            except (OSError, ValueError) as err:
                problem = f"cannot read rail {rail.name} in {rail.folder}: {_reason(err)}"
                if rail.name == self._total_rail:
                    raise SensorError(
                        f"jetson: {problem}; check that the file is readable by this user"
                    ) from err
                warnings.append(f"jetson: {problem}; left out")
                continue
            devices.append(reading)
            if rail.name == self._total_rail:
                total = reading
        if total is not None:
            watts, total_from = total.watts, total.name
        elif devices:
            watts = sum(device.watts for device in devices)
            total_from = "sum of module rails"
            if len(devices) < len(self._rails):
                total_from += f" ({len(devices)} of {len(self._rails)} read)"
        else:
            raise SensorError("jetson: no rail could be read: " + "; ".join(warnings))
        return PowerSample(
            monotonic=now,
            source=self.source,
            watts=watts,
            devices=tuple(devices),
            total_from=total_from,
            warnings=tuple(warnings),
        )

    def describe(self) -> str:
        total = self._total_rail or "sum of module rails"
        rails = ", ".join(rail.name for rail in self._rails)
        folders = sorted({rail.folder for rail in self._rails})
        return f"jetson: INA3221 rails {rails} (total: {total}) in {', '.join(folders)}"


def _hwmon_rails(root: Path) -> list[_Rail]:
    """JetPack 5/6. Only channels 1-3 are rails: 4-6 are the raw shunt voltages (no label), 7
    is the shunt sum, and channels labelled NC are wired to nothing."""
    rails: list[_Rail] = []
    labels = (root / HWMON_DRIVER).glob("*/hwmon/hwmon*/in*_label")
    for label_path in sorted(labels, key=_channel_order):
        channel = label_path.name.removeprefix("in").removesuffix("_label")
        if not channel.isdigit():
            continue
        label = _read_label(label_path)
        if label in (SHUNT_SUM_LABEL, NOT_CONNECTED):
            continue
        folder = label_path.parent
        milliamps = folder / f"curr{channel}_input"
        if not milliamps.exists():
            # A labelled channel with no current is a voltage-only input: no watts to be had.
            continue
        millivolts = folder / f"in{channel}_input"
        chip = folder.parent.parent.name
        rails.append(_Rail(label, chip, str(folder), (str(millivolts), str(milliamps))))
    return _unique(rails)


def _iio_rails(root: Path) -> list[_Rail]:
    """JetPack 4: `rail_name_N` names channel N; `in_powerN_input` is its power in mW."""
    rails: list[_Rail] = []
    names = (root / IIO_DRIVER).glob("*/iio:device*/rail_name_*")
    for name_path in sorted(names, key=_channel_order):
        channel = name_path.name.removeprefix("rail_name_")
        if not channel.isdigit():
            continue
        label = _read_label(name_path)
        if label == NOT_CONNECTED:
            continue
        folder = name_path.parent
        chip = folder.parent.name
        rails.append(_Rail(label, chip, str(folder), (str(folder / f"in_power{channel}_input"),)))
    return _unique(rails)


def _unique(rails: list[_Rail]) -> list[_Rail]:
    # Two monitors with the same label would make one rail look like two readings of another.
    seen: dict[str, int] = {}
    for rail in rails:
        seen[rail.name] = seen.get(rail.name, 0) + 1
    return [
        rail
        if seen[rail.name] == 1
        else _Rail(f"{rail.name}@{rail.chip}", rail.chip, rail.folder, rail.files)
        for rail in rails
    ]


def _channel_order(path: Path) -> tuple[str, int]:
    digits = "".join(char for char in path.name if char.isdigit())
    return (str(path.parent), int(digits) if digits else 0)


def _read_label(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError as err:
        raise SensorError(f"jetson: cannot read rail label {path}: {_reason(err)}") from err


def _read_int(path: str) -> int:
    """The integer at the start of a small sysfs file (raw os calls: this runs 10 times a second
    for every rail)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.read(fd, 64)
    finally:
        os.close(fd)
    fields = raw.split()
    if not fields:
        raise ValueError(f"{path} is empty")
    return int(fields[0])


def _reason(err: Exception) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)
