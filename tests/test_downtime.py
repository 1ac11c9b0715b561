"""The energy of a gap while the agent was down, from counters that kept counting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.test_sensors import LAPTOP, Clock, set_energy
from wattops.agents.downtime import boot_id, measure
from wattops.agents.sensors.estimate import EstimateSensor
from wattops.agents.sensors.rapl import RaplSensor
from wattops.agents.state import Meter

RANGE_J = 262143.328850  # the laptop fixture's max_energy_range_uj


def rapl(tmp_path: Path) -> tuple[RaplSensor, Path]:
    root = tmp_path / "host"
    shutil.copytree(LAPTOP, root)
    return RaplSensor(root, clock=Clock()), root


def saved(sensor: RaplSensor, boot: str = "boot-1") -> Meter:
    return Meter(source="rapl", boot_id=boot, counters=sensor.counters())


def test_the_gap_is_what_the_counters_gathered_including_one_wrap(tmp_path: Path) -> None:
    before, root = rapl(tmp_path)
    meter = saved(before)
    start = meter.counters["intel-rapl:0"][0]
    set_energy(root, "intel-rapl:0", int((start + 600.0) * 1e6))  # 600 J while down
    after = RaplSensor(root)
    gap = measure(meter, after, "boot-1", seconds=60.0, max_watts=100.0)
    assert gap.joules == pytest.approx(600.0, abs=1.0)
    # A wrap: from 100 J below the top of the range to 50 J past zero = 150 J.
    set_energy(root, "intel-rapl:0", int((RANGE_J - 100.0) * 1e6))
    meter = saved(RaplSensor(root))
    set_energy(root, "intel-rapl:0", 50_000_000)
    gap = measure(meter, RaplSensor(root), "boot-1", seconds=10.0, max_watts=100.0)
    assert gap.joules == pytest.approx(150.0, abs=1.0)


@pytest.mark.parametrize(
    ("boot", "seconds", "why"),
    [
        ("boot-2", 60.0, "rebooted"),
        ("boot-1", 3000.0, "wrapped more than once"),  # 3000 s x 100 W > the 262 kJ range
    ],
)
def test_counters_that_cannot_be_trusted_leave_the_energy_unknown(
    tmp_path: Path, boot: str, seconds: float, why: str
) -> None:
    sensor, _ = rapl(tmp_path)
    gap = measure(saved(sensor), sensor, boot, seconds=seconds, max_watts=100.0)
    assert gap.joules is None and why in gap.why_unknown and gap.seconds == seconds


def test_the_estimate_has_no_counter_to_measure_a_gap(tmp_path: Path) -> None:
    estimate = EstimateSensor(10, 20, lambda: 0.5, "test")
    assert estimate.counters() == {}
    gap = measure(Meter(source="estimate", boot_id="b", counters={}), estimate, "b", 5.0, 20.0)
    assert gap.joules is None and "no hardware energy counter" in gap.why_unknown
    sensor, _ = rapl(tmp_path)
    gap = measure(Meter(source="nvml", boot_id="b", counters={}), sensor, "b", 5.0, 20.0)
    assert gap.joules is None and "sensor changed (nvml -> rapl)" in gap.why_unknown
    assert measure(None, sensor, "b", 5.0, 20.0).joules is None


def test_boot_id_reads_the_kernels() -> None:
    assert boot_id() != "" and boot_id(Path("/nonexistent")) == "unknown"
