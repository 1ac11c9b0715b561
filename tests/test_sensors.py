"""The power sensors against copied sysfs trees and a stand-in for NVML that raises pynvml's own
exceptions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pynvml
import pytest

from wattops.agents.accounting import Accounting, CostModel
from wattops.agents.api import Totals
from wattops.agents.config import ConfigError, parse_config
from wattops.agents.node import NodeAgent
from wattops.agents.power import EnergyInterval, PowerMeter
from wattops.agents.sensors import rapl
from wattops.agents.sensors.base import PowerSample, Sensor, SensorContext, SensorError
from wattops.agents.sensors.detect import detect_sensor
from wattops.agents.sensors.estimate import (
    EstimateSensor,
    HostCpuUtilisation,
    ProcessCpuUtilisation,
)
from wattops.agents.sensors.jetson import JetsonSensor
from wattops.agents.sensors.nvml import NvmlSensor
from wattops.agents.sensors.rapl import RaplSensor
from wattops.profiles import hardware_profile, site_profile

SYSFS = Path(__file__).resolve().parent / "fixtures" / "sysfs"
AGX_ORIN = SYSFS / "agx-orin-jp5"
ORIN_NANO = SYSFS / "orin-nano-jp6"
NANO_JP4 = SYSFS / "nano-jp4"
XEON = SYSFS / "rapl-xeon-2s"
LAPTOP = SYSFS / "rapl-laptop"
GIB = 1024**3


def by_name(sample: PowerSample) -> dict[str, Any]:
    return {device.name: device for device in sample.devices}


# -- NVML ------------------------------------------------------------------------------------


@dataclass
class FakeGpu:
    name: str = "NVIDIA A100-SXM4-80GB"
    milliwatts: int = 250_000
    #: None: the energy counter is NotSupported on this GPU.
    energy_mj: int | None = 1_000_000
    utilisation: int | None = 35
    memory_used: int = 20 * GIB
    memory_total: int = 80 * GIB
    limit_mw: int = 400_000
    min_limit_mw: int = 100_000
    max_limit_mw: int = 400_000
    default_limit_mw: int = 400_000
    #: NVML lets only root (CAP_SYS_ADMIN) set a power limit: NoPermission otherwise.
    root: bool = True
    lost: bool = False

    def check(self) -> None:
        if self.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)


class FakeNvml:
    """The pynvml functions the sensor calls, over FakeGpus. Errors are raised the way pynvml's
    `_nvmlCheckReturn` does, `NVMLError(code)`, which pynvml turns into the code's subclass;
    constants and exception classes are pynvml's own."""

    def __init__(
        self,
        gpus: list[FakeGpu],
        init_error: int | None = None,
        count_error: int | None = None,
        handle_errors: dict[int, int] | None = None,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        #: nvmlDeviceGetCount fails with this code (a driver in a bad state).
        self.count_error = count_error
        #: nvmlDeviceGetHandleByIndex fails for these indexes with these codes.
        self.handle_errors = handle_errors or {}
        self.init_calls = 0
        self.shutdown_calls = 0
        #: NVML counts nvmlInit calls; device calls outside init..shutdown are Uninitialized.
        self.initialised = 0

    def __getattr__(self, name: str) -> Any:
        if name.startswith("NVML"):
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _require_init(self) -> None:
        if self.initialised <= 0:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self._require_init()
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._require_init()
        if self.count_error is not None:
            raise pynvml.NVMLError(self.count_error)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._require_init()
        if index in self.handle_errors:
            raise pynvml.NVMLError(self.handle_errors[index])
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> str:
        self._require_init()
        gpu.check()
        return gpu.name

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        self._require_init()
        gpu.check()
        return gpu.milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, gpu: FakeGpu) -> int:
        gpu.check()
        if gpu.energy_mj is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        gpu.check()
        if gpu.utilisation is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return pynvml.c_nvmlUtilization_t(gpu=gpu.utilisation, memory=10)

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        gpu.check()
        free = gpu.memory_total - gpu.memory_used
        return pynvml.c_nvmlMemory_t(total=gpu.memory_total, free=free, used=gpu.memory_used)

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu: FakeGpu) -> int:
        gpu.check()
        return gpu.limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, gpu: FakeGpu) -> int:
        gpu.check()
        return gpu.limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, gpu: FakeGpu) -> int:
        gpu.check()
        return gpu.default_limit_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, gpu: FakeGpu) -> list[int]:
        gpu.check()
        return [gpu.min_limit_mw, gpu.max_limit_mw]

    def nvmlDeviceSetPowerManagementLimit(self, gpu: FakeGpu, limit: int) -> None:
        """As the driver: root only, within the card's constraints, milliwatts."""
        self._require_init()
        gpu.check()
        if not gpu.root:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        if not gpu.min_limit_mw <= limit <= gpu.max_limit_mw:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        gpu.limit_mw = int(limit)


@pytest.fixture
def nvml_sensors() -> Iterator[list[Sensor]]:
    """Sensors a test opened, closed afterwards."""
    opened: list[Sensor] = []
    yield opened
    for sensor in opened:
        sensor.close()


def test_fake_nvml_raises_what_pynvml_raises() -> None:
    # pynvml's NVMLError.__new__ maps a code to its subclass; the sensor relies on `.value`.
    with pytest.raises(pynvml.NVMLError_GpuIsLost) as lost:
        FakeGpu(lost=True).check()
    assert lost.value.value == pynvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(pynvml.NVMLError_NotSupported):
        FakeNvml([]).nvmlDeviceGetTotalEnergyConsumption(FakeGpu(energy_mj=None))


def test_nvml_two_gpus_with_energy_counters() -> None:
    gpus = [FakeGpu(), FakeGpu(milliwatts=150_500, energy_mj=5_000_000, utilisation=80)]
    fake = FakeNvml(gpus)
    sensor = NvmlSensor(fake)
    gpus[0].energy_mj = 1_000_000 + 25_000  # +25 J since start
    gpus[1].energy_mj = 5_000_000 + 15_000  # +15 J
    sample = sensor.read()
    assert sample.source == "nvml"
    assert sample.watts == pytest.approx(400.5)
    assert sample.total_from == "sum of 2 GPUs"
    assert sample.energy_j == pytest.approx(40.0)
    assert sample.warnings == ()
    first, second = sample.devices
    assert first.name == "gpu0 NVIDIA A100-SXM4-80GB"
    assert first.watts == pytest.approx(250.0)
    assert first.energy_j == pytest.approx(25.0)
    assert first.utilisation == pytest.approx(0.35)
    assert first.memory_used_bytes == 20 * GIB
    assert first.memory_total_bytes == 80 * GIB
    assert first.power_limit_watts == pytest.approx(400.0)
    assert second.utilisation == pytest.approx(0.8)
    assert all(device.in_total for device in sample.devices)
    sensor.close()
    sensor.close()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)


def test_nvml_counter_not_supported_gives_no_energy_but_watts() -> None:
    gpus = [FakeGpu(), FakeGpu(name="Tesla P100-PCIE-16GB", energy_mj=None, utilisation=None)]
    sensor = NvmlSensor(FakeNvml(gpus))
    sample = sensor.read()
    devices = sample.devices
    assert devices[0].energy_j == pytest.approx(0.0)
    assert devices[1].energy_j is None
    assert devices[1].watts == pytest.approx(250.0)
    assert devices[1].utilisation is None
    assert devices[1].memory_total_bytes == 80 * GIB
    # One GPU without a counter: the node energy is integrated from watts instead.
    assert sample.energy_j is None
    assert sample.watts == pytest.approx(500.0)
    assert "nvml: 2 GPU(s)" in sensor.describe()
    sensor.close()


def test_nvml_counter_restart_is_not_negative_energy() -> None:
    gpu = FakeGpu(energy_mj=9_000_000)
    sensor = NvmlSensor(FakeNvml([gpu]))
    gpu.energy_mj = 9_010_000
    assert sensor.read().energy_j == pytest.approx(10.0)
    gpu.energy_mj = 4_000  # driver reloaded: the counter starts again from 0
    sample = sensor.read()
    assert sample.energy_j == pytest.approx(14.0)
    assert sample.total_from == "sum of 1 GPU"
    sensor.close()


def test_nvml_gpu_lost_mid_run_is_skipped_with_a_warning() -> None:
    gpus = [FakeGpu(), FakeGpu(name="NVIDIA H100 80GB HBM3", milliwatts=300_000)]
    sensor = NvmlSensor(FakeNvml(gpus))
    gpus[1].energy_mj = 1_000_000 + 30_000
    before = sensor.read()
    assert before.energy_j == pytest.approx(30.0)
    gpus[1].lost = True
    gpus[0].energy_mj = 1_000_000 + 5_000
    sample = sensor.read()
    assert [device.name for device in sample.devices] == ["gpu0 NVIDIA A100-SXM4-80GB"]
    assert sample.watts == pytest.approx(250.0)
    assert sample.total_from == "sum of 1 of 2 GPUs"
    (warning,) = sample.warnings
    assert "GPU 1" in warning and "H100" in warning and "GPU is lost" in warning
    # The lost GPU keeps what it counted: the node energy never goes backwards.
    assert sample.energy_j == pytest.approx(35.0)
    sensor.close()


def test_nvml_all_gpus_lost_is_an_error() -> None:
    gpus = [FakeGpu(), FakeGpu()]
    sensor = NvmlSensor(FakeNvml(gpus))
    for gpu in gpus:
        gpu.lost = True
    with pytest.raises(SensorError, match=r"nvml: no GPU could be read.*GPU is lost"):
        sensor.read()
    sensor.close()


def test_nvml_power_not_supported_skips_that_gpu() -> None:
    class NoPower(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
            if gpu.name == "Orin (nvgpu)":
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return super().nvmlDeviceGetPowerUsage(gpu)

    sensor = NvmlSensor(NoPower([FakeGpu(name="Orin (nvgpu)")]))
    with pytest.raises(SensorError, match="does not report power draw"):
        sensor.read()
    sensor.close()


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "nvml: NVML library not found"),
        (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "nvml: NVIDIA driver not loaded"),
        (pynvml.NVML_ERROR_NO_PERMISSION, "nvml: no permission"),
    ],
)
def test_nvml_absent_at_construction_is_an_error(code: int, message: str) -> None:
    fake = FakeNvml([FakeGpu()], init_error=code)
    with pytest.raises(SensorError, match=message):
        NvmlSensor(fake)
    assert fake.shutdown_calls == 0


def test_nvml_module_not_installed_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    with pytest.raises(SensorError, match="pip install nvidia-ml-py"):
        NvmlSensor()


def test_nvml_no_gpus_is_an_error() -> None:
    fake = FakeNvml([])
    with pytest.raises(SensorError, match="no GPU"):
        NvmlSensor(fake)
    assert fake.shutdown_calls == 1


# -- Jetson ----------------------------------------------------------------------------------


def test_jetson_agx_orin_jp5_sums_module_rails_and_skips_nc_and_shunt_sum() -> None:
    sample = JetsonSensor(AGX_ORIN).read()
    assert sample.source == "jetson"
    rails = by_name(sample)
    assert list(rails) == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    expected = (19136 * 312 + 19136 * 104 + 4984 * 640 + 4984 * 80) / 1e6
    assert sample.watts == pytest.approx(expected)
    assert sample.total_from == "sum of module rails"
    assert all(rail.in_total for rail in rails.values())
    assert rails["VDD_GPU_SOC"].volts == pytest.approx(19.136)
    assert rails["VDD_GPU_SOC"].amps == pytest.approx(0.312)
    assert sample.energy_j is None
    assert sample.warnings == ()


def test_jetson_orin_nano_jp6_total_is_vdd_in() -> None:
    sensor = JetsonSensor(ORIN_NANO)
    sample = sensor.read()
    rails = by_name(sample)
    assert list(rails) == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]
    assert sample.watts == pytest.approx(5016 * 1104 / 1e6)
    assert sample.total_from == "VDD_IN"
    assert rails["VDD_IN"].in_total
    assert not rails["VDD_CPU_GPU_CV"].in_total
    assert not rails["VDD_SOC"].in_total
    assert "total: VDD_IN" in sensor.describe()


def test_jetson_nano_jp4_total_is_pom_5v_in() -> None:
    sample = JetsonSensor(NANO_JP4).read()
    rails = by_name(sample)
    assert list(rails) == ["POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU"]
    assert sample.total_from == "POM_5V_IN"
    assert sample.watts == pytest.approx(2.483)  # in_power0_input, mW
    assert rails["POM_5V_CPU"].watts == pytest.approx(0.479)
    assert [rail.in_total for rail in rails.values()] == [True, False, False]


def test_jetson_reads_new_values_each_time(tmp_path: Path) -> None:
    root = tmp_path / "board"
    shutil.copytree(ORIN_NANO, root)
    sensor = JetsonSensor(root)
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    (hwmon / "curr1_input").write_text("2000\n")
    assert sensor.read().watts == pytest.approx(5016 * 2000 / 1e6)


def test_jetson_unreadable_rail(tmp_path: Path) -> None:
    root = tmp_path / "board"
    shutil.copytree(ORIN_NANO, root)
    hwmon = root / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1"
    sensor = JetsonSensor(root)
    (hwmon / "curr3_input").unlink()
    sample = sensor.read()
    assert "VDD_SOC" not in by_name(sample)
    assert sample.watts == pytest.approx(5016 * 1104 / 1e6)
    assert any("VDD_SOC" in warning for warning in sample.warnings)
    (hwmon / "in1_input").unlink()
    with pytest.raises(SensorError, match=r"jetson: cannot read rail VDD_IN in .*hwmon1"):
        sensor.read()


def test_jetson_absent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match=r"jetson: no INA3221 power monitor under .*ina3221"):
        JetsonSensor(tmp_path)


# -- RAPL ------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def set_energy(root: Path, zone: str, microjoules: int) -> None:
    (root / "sys/class/powercap" / zone / "energy_uj").write_text(f"{microjoules}\n")


def test_rapl_counts_packages_and_dram_with_wrap_around(tmp_path: Path) -> None:
    root = tmp_path / "host"
    shutil.copytree(XEON, root)
    clock = Clock()
    sensor = RaplSensor(root, clock=clock)
    first = sensor.read()  # straight after construction: no window yet
    assert first.watts == 0.0
    assert first.energy_j == 0.0
    assert first.source == "rapl"

    clock.now += 1.0
    set_energy(root, "intel-rapl:0", 123456789012 + 150_000_000)  # 150 J
    set_energy(root, "intel-rapl:0:0", 23456789012 + 20_000_000)
    set_energy(root, "intel-rapl:1", 98765432109 + 120_000_000)
    set_energy(root, "intel-rapl:1:0", 21098765432 + 18_000_000)
    sample = sensor.read()
    zones = by_name(sample)
    assert list(zones) == ["package-0", "package-0/dram", "package-1", "package-1/dram"]
    assert zones["package-0"].watts == pytest.approx(150.0)
    assert zones["package-1/dram"].watts == pytest.approx(18.0)
    assert sample.watts == pytest.approx(308.0)
    assert sample.energy_j == pytest.approx(308.0)

    # package-0 wraps: from 60 J below the top of its range to 40 J past zero.
    max_range = 262143328850
    set_energy(root, "intel-rapl:0", max_range - 60_000_000)
    clock.now += 0.5
    sensor.read()
    package_0_before = max_range - 60_000_000 - 123456789012
    clock.now += 0.5
    set_energy(root, "intel-rapl:0", 40_000_000)
    sample = sensor.read()
    zones = by_name(sample)
    assert zones["package-0"].watts == pytest.approx(100.0 / 0.5)
    assert zones["package-0"].energy_j == pytest.approx(package_0_before / 1e6 + 100.0)
    assert zones["package-1"].watts == 0.0
    assert sample.energy_j == pytest.approx(sum(zone.energy_j or 0.0 for zone in sample.devices))


def test_rapl_skips_core_uncore_psys_and_mmio() -> None:
    sensor = RaplSensor(LAPTOP)
    zones = by_name(sensor.read())
    assert list(zones) == ["package-0", "package-0/dram"]
    assert "intel-rapl:0:2" in sensor.describe()


def test_rapl_permission_denied_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "host"
    shutil.copytree(XEON, root)
    blocked = root / "sys/class/powercap/intel-rapl:0/energy_uj"
    blocked.chmod(0o000)
    if os.access(blocked, os.R_OK):  # root ignores the mode: refuse the open as the kernel would
        real_open = os.open

        def refuse(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if str(path) == str(blocked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(rapl.os, "open", refuse)
    with pytest.raises(SensorError) as err:
        RaplSensor(root)
    message = str(err.value)
    assert message.startswith(f"rapl: cannot read {blocked}")
    assert "root" in message and "chmod" in message and "udev" in message


def test_rapl_absent_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match=r"rapl: no RAPL package zone under .*powercap"):
        RaplSensor(tmp_path)


# -- Estimate --------------------------------------------------------------------------------


def test_estimate_is_linear_in_clamped_utilisation() -> None:
    share = [0.35]
    sensor = EstimateSensor(60, 400, lambda: share[0], "a100-80gb")
    sample = sensor.read()
    assert sample.source == "estimate"
    assert sample.watts == pytest.approx(60 + 340 * 0.35)
    assert sample.total_from == (
        "estimate: a100-80gb profile idle 60 W .. max 400 W at 35% utilisation"
    )
    assert sample.energy_j is None
    for raw, watts in [(1.7, 400.0), (-0.2, 60.0), (float("nan"), 60.0), (1.0, 400.0)]:
        share[0] = raw
        assert sensor.read().watts == pytest.approx(watts)


def test_estimate_rejects_idle_above_max() -> None:
    with pytest.raises(SensorError, match="idle_watts <= max_watts"):
        EstimateSensor(500, 400, lambda: 0.0, "bad")


def test_host_cpu_utilisation_from_two_proc_stat_snapshots(tmp_path: Path) -> None:
    stat = tmp_path / "proc" / "stat"
    stat.parent.mkdir()
    shutil.copy(SYSFS / "proc-stat" / "stat.1", stat)
    utilisation = HostCpuUtilisation(tmp_path)
    shutil.copy(SYSFS / "proc-stat" / "stat.2", stat)
    # 1000 ticks between the snapshots, 300 of them idle and 100 iowait.
    assert utilisation() == pytest.approx(0.6)
    assert utilisation() == pytest.approx(0.6)  # no tick since: the last figure again


def test_host_cpu_utilisation_missing_proc_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match=r"estimate: cannot read .*proc/stat"):
        HostCpuUtilisation(tmp_path)


def _proc_stat(root: Path, pid: int, start: int, utime: int, stime: int,
               comm: str = "llama-server") -> None:  # fmt: skip
    """A /proc/<pid>/stat line in the kernel's layout (52 fields; the ones read: utime 14,
    stime 15, starttime 22)."""
    fields = [str(pid), f"({comm})", "S"] + ["0"] * 49
    fields[13], fields[14], fields[21] = str(utime), str(stime), str(start)
    path = root / "proc" / str(pid) / "stat"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(fields) + "\n")


def test_process_cpu_utilisation_counts_only_the_agents_processes(tmp_path: Path) -> None:
    """Ticks of the roots and their descendants over (elapsed x CPUs): what runs already
    counts from construction, a process found later from its start, a reused pid as a new
    process, a process that ended not at all (and never negatively), a burst found at once
    carried into the next calls."""
    tick = os.sysconf("SC_CLK_TCK")
    now = [0.0]
    roots = [10, 11]
    _proc_stat(tmp_path, 10, start=5, utime=4 * tick, stime=tick)  # the agent: 5 s so far
    _proc_stat(tmp_path, 11, start=7, utime=2 * tick, stime=0, comm="a (b) c")
    _proc_stat(tmp_path, 99, start=1, utime=0, stime=0)  # not ours: never read
    share = ProcessCpuUtilisation(lambda: roots, tmp_path, cpus=2, clock=lambda: now[0])
    now[0] = 10.0
    _proc_stat(tmp_path, 10, start=5, utime=6 * tick, stime=2 * tick)  # +3 s
    _proc_stat(tmp_path, 11, start=7, utime=4 * tick, stime=tick, comm="a (b) c")  # +3 s
    _proc_stat(tmp_path, 99, start=1, utime=500 * tick, stime=0)  # busy, but not ours
    assert share() == pytest.approx(6 / (10 * 2))
    now[0] = 20.0
    roots[:] = [10, 12, 11]  # a new replica, 4 s of CPU since it started (loading weights)
    _proc_stat(tmp_path, 12, start=900, utime=3 * tick, stime=tick)
    (tmp_path / "proc" / "11" / "stat").unlink()  # and one ended: its last seconds are lost
    assert share() == pytest.approx(4 / 20)  # the agent used nothing more
    now[0] = 30.0
    _proc_stat(tmp_path, 12, start=950, utime=tick, stime=0)  # pid 12 reused by a new process
    assert share() == pytest.approx(1 / 20)
    assert share() == pytest.approx(1 / 20)  # no time since: the last figure again
    # A child of the agent's (a quantization, say) is found through the kernel's list of
    # children of each of its threads, with 30 s of CPU already: more than 10 s x 2 CPUs hold.
    children = tmp_path / "proc" / "10" / "task" / "10" / "children"
    children.parent.mkdir(parents=True)
    children.write_text("13 ")
    _proc_stat(tmp_path, 13, start=990, utime=30 * tick, stime=0, comm="llama-quantize")
    now[0] = 40.0
    assert share() == pytest.approx(1.0)  # 20 of the 30 s now ...
    now[0] = 50.0
    assert share() == pytest.approx(10 / 20)  # ... and the other 10 in the next call


def test_process_cpu_utilisation_follows_real_processes_not_the_host(tmp_path: Path) -> None:
    """Real processes: a busy one named as the agent's shows, a sleeping one does not, and a
    busy process the agent did not start moves the host's figure but not the agent's."""
    spin = [
        sys.executable,
        "-c",
        "import time\nend = time.time() + 30\nwhile time.time() < end: pass",
    ]
    ours = subprocess.Popen(spin)
    other = subprocess.Popen(spin)
    idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy_share = ProcessCpuUtilisation(lambda: [ours.pid])
        idle_share = ProcessCpuUtilisation(lambda: [idle.pid])
        host = HostCpuUtilisation(Path("/"))
        time.sleep(1.5)
        busy, quiet, everything = busy_share(), idle_share(), host()
    finally:
        for proc in (ours, other, idle):
            proc.kill()
            proc.wait()
    assert busy > 0 and quiet < busy / 5
    # Two spinning processes on the host, one of them ours: the host's figure is above ours.
    assert everything > busy


def test_process_cpu_utilisation_unreadable_stat_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "proc" / "10").mkdir(parents=True)
    (tmp_path / "proc" / "10" / "stat").write_text("10 (x) S 1\n")
    with pytest.raises(SensorError, match="not in the kernel's format"):
        ProcessCpuUtilisation(lambda: [10], tmp_path)


# -- detect_sensor ---------------------------------------------------------------------------


def fallback() -> Sensor:
    return EstimateSensor(10, 20, lambda: 0.5, "test")


def not_called() -> Sensor:
    raise AssertionError("the estimate must not be built")


NO_NVML = FakeNvml([], init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)


def test_detect_auto_prefers_nvml(nvml_sensors: list[Sensor]) -> None:
    sensor, notes = detect_sensor(
        "auto", SensorContext(ORIN_NANO, estimate=not_called, nvml=FakeNvml([FakeGpu()]))
    )
    nvml_sensors.append(sensor)
    assert isinstance(sensor, NvmlSensor)
    assert notes == []


@pytest.mark.parametrize(
    ("root", "expected", "skipped"),
    [
        (ORIN_NANO, JetsonSensor, ["nvml"]),
        (NANO_JP4, JetsonSensor, ["nvml"]),
        (XEON, RaplSensor, ["nvml", "jetson"]),
    ],
)
def test_detect_auto_order(root: Path, expected: type, skipped: list[str]) -> None:
    sensor, notes = detect_sensor("auto", SensorContext(root, estimate=not_called, nvml=NO_NVML))
    assert isinstance(sensor, expected)
    assert [note.split(":")[0] for note in notes] == skipped
    assert notes[0].startswith("nvml: NVML library not found")


def test_detect_auto_falls_back_to_the_estimate(tmp_path: Path) -> None:
    sensor, notes = detect_sensor("auto", SensorContext(tmp_path, estimate=fallback, nvml=NO_NVML))
    assert isinstance(sensor, EstimateSensor)
    assert [note.split(":")[0] for note in notes] == ["nvml", "jetson", "rapl"]


def test_detect_auto_needs_a_successful_read(tmp_path: Path) -> None:
    class LostAtOnce(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    fake = LostAtOnce([FakeGpu()])
    sensor, notes = detect_sensor("auto", SensorContext(ORIN_NANO, estimate=not_called, nvml=fake))
    assert isinstance(sensor, JetsonSensor)
    assert notes[0].startswith("nvml: no GPU could be read")
    assert fake.shutdown_calls == 1  # the NVML sensor that failed was closed


@pytest.mark.parametrize(
    ("kind", "root", "message"),
    [
        ("nvml", ORIN_NANO, "nvml: NVML library not found"),
        ("jetson", XEON, "jetson: no INA3221 power monitor"),
        ("rapl", ORIN_NANO, "rapl: no RAPL package zone"),
    ],
)
def test_detect_explicit_kind_that_fails_raises(kind: str, root: Path, message: str) -> None:
    with pytest.raises(SensorError, match=message):
        detect_sensor(kind, SensorContext(root, estimate=not_called, nvml=NO_NVML))


@pytest.mark.parametrize(
    ("kind", "root", "expected"),
    [
        ("jetson", AGX_ORIN, JetsonSensor),
        ("rapl", LAPTOP, RaplSensor),
        ("estimate", AGX_ORIN, EstimateSensor),
    ],
)
def test_detect_explicit_kind(kind: str, root: Path, expected: type) -> None:
    estimate: Callable[[], Sensor] = fallback if kind == "estimate" else not_called
    sensor, notes = detect_sensor(kind, SensorContext(root, estimate=estimate, nvml=NO_NVML))
    assert isinstance(sensor, expected)
    assert notes == []


def test_detect_unknown_kind() -> None:
    with pytest.raises(SensorError, match="unknown sensor kind 'ina'"):
        detect_sensor("ina", SensorContext(SYSFS, estimate=not_called))


def test_rapl_counter_resets_are_not_read_as_wrap_arounds(tmp_path: Path) -> None:
    # A zone drawing 30 W whose counter is reset to zero (driver reload, suspend) four times
    # in five seconds: read as wrap-arounds, each reset added a whole range (~262 kJ).
    root = tmp_path / "host"
    shutil.copytree(LAPTOP, root)
    clock = Clock()
    sensor = RaplSensor(root, clock=clock)
    counter = int((root / "sys/class/powercap/intel-rapl:0/energy_uj").read_text())
    start = sensor.read().energy_j or 0.0
    for step in range(1, 51):  # 5 s at 10 Hz
        clock.now += 0.1
        counter = 0 if step in (10, 22, 35, 47) else counter + 3_000_000  # 3 J per 0.1 s
        set_energy(root, "intel-rapl:0", counter)
        sample = sensor.read()
    package = by_name(sample)["package-0"]
    # 46 steps counted 3 J each; the 4 resets count what the counter gathered since: 0 J.
    assert (package.energy_j or 0.0) - start == pytest.approx(46 * 3.0)
    assert package.watts == pytest.approx(30.0)


# -- the power meter's steps -----------------------------------------------------------------


def test_a_step_back_from_the_estimate_is_labelled_estimated() -> None:
    estimate = PowerSample(monotonic=10.0, source="estimate", watts=100.0)
    measured = PowerSample(monotonic=11.0, source="nvml", watts=50.0, energy_j=500.0)
    later = PowerSample(monotonic=12.0, source="nvml", watts=60.0, energy_j=555.0)
    # Across the change of source the step is integrated: half of it is estimate watts.
    assert PowerMeter.step(estimate, measured) == (pytest.approx(75.0), pytest.approx(75.0))
    fell_back = PowerSample(monotonic=12.0, source="estimate", watts=100.0)
    assert PowerMeter.step(measured, fell_back) == (pytest.approx(75.0), pytest.approx(75.0))
    # Measured at both ends: from the counter, and measured.
    assert PowerMeter.step(measured, later) == (pytest.approx(55.0), 0.0)
    mixed = EnergyInterval(later, joules=130.0, seconds=2.0, estimated_joules=75.0)
    assert mixed.source == "estimate"
    assert EnergyInterval(later, joules=55.0, seconds=1.0).source == "nvml"


# -- a whole multi-GPU box against a one-GPU profile -----------------------------------------


def node_for(hardware: dict[str, Any] | None = None) -> NodeAgent:
    config = parse_config({"agent": {"profile": "a100-80gb"}, "hardware": hardware or {}})
    return NodeAgent(config)


@pytest.mark.parametrize("gpus", [1, 8])
def test_the_profile_is_scaled_to_the_gpus_nvml_measures(
    gpus: int, nvml_sensors: list[Sensor]
) -> None:
    # NVML sums every GPU it sees: the bundled a100-80gb profile describes one GPU at 1/8 of
    # a p4de.24xlarge ($5.12/h, 60 W idle).
    sensor = NvmlSensor(FakeNvml([FakeGpu() for _ in range(gpus)]))
    nvml_sensors.append(sensor)
    assert sensor.accelerators() == gpus
    node = node_for()
    bundled = hardware_profile("a100-80gb")
    fitted = node._fit_profile(bundled, sensor)
    cost = CostModel.from_profiles(fitted, site_profile())
    assert cost.node_usd_per_hour == pytest.approx(5.12 * gpus)  # $40.96/h for the whole box
    assert (cost.idle_watts, cost.max_watts) == (pytest.approx(60.0 * gpus), 400.0 * gpus)
    assert cost.accelerators == gpus
    assert bool(node.sensor_notes) == (gpus != 1)
    # An 8-GPU box idling at 480 W is all idle, not 60 W idle and 420 W "active".
    accounting = Accounting(cost, Totals(), {}, 1, 3, 300)
    sample = PowerSample(monotonic=1.0, source="nvml", watts=60.0 * gpus)
    accounting.on_interval(EnergyInterval(sample, joules=60.0 * gpus, seconds=1.0))
    assert accounting.node.idle_energy_j_total == pytest.approx(60.0 * gpus)
    assert accounting.node.active_energy_j_total == pytest.approx(0.0)


def test_a_pinned_device_count_that_disagrees_is_refused(nvml_sensors: list[Sensor]) -> None:
    sensor = NvmlSensor(FakeNvml([FakeGpu() for _ in range(8)]))
    nvml_sensors.append(sensor)
    node = node_for({"accelerators": 4})
    with pytest.raises(ConfigError, match=r"accelerators = 4, but nvml measures 8.*set "
                                          r"accelerators = 8"):  # fmt: skip
        node._fit_profile(hardware_profile("a100-80gb", {"accelerators": 4}), sensor)
    pinned = node_for({"accelerators": 8})
    fitted = pinned._fit_profile(hardware_profile("a100-80gb", {"accelerators": 8}), sensor)
    assert fitted.accelerators == 8 and pinned.sensor_notes == []


# -- NVML start-up failures -------------------------------------------------------------------


def test_nvml_that_cannot_count_its_gpus_is_an_error_and_is_shut_down() -> None:
    fake = FakeNvml([FakeGpu()], count_error=pynvml.NVML_ERROR_UNKNOWN)
    with pytest.raises(
        SensorError, match=r"nvml: cannot list GPUs \(nvmlDeviceGetCount: .*nvidia-smi"
    ):
        NvmlSensor(fake)
    assert (fake.init_calls, fake.shutdown_calls, fake.initialised) == (1, 1, 0)


def test_a_gpu_without_a_handle_is_left_out_with_a_warning(nvml_sensors: list[Sensor]) -> None:
    fake = FakeNvml([FakeGpu(), FakeGpu(milliwatts=100_000)],
                    handle_errors={0: pynvml.NVML_ERROR_GPU_IS_LOST})  # fmt: skip
    sensor = NvmlSensor(fake)
    nvml_sensors.append(sensor)
    sample = sensor.read()
    assert sample.watts == pytest.approx(100.0)
    assert sensor.accelerators() == 1
    assert any("GPU 0 left out at start-up" in w for w in sample.warnings)


def test_no_usable_gpu_at_start_is_an_error_and_is_shut_down() -> None:
    fake = FakeNvml([FakeGpu()], handle_errors={0: pynvml.NVML_ERROR_NO_PERMISSION})
    with pytest.raises(SensorError, match=r"no GPU can be used \(nvml: GPU 0 left out"):
        NvmlSensor(fake)
    assert fake.initialised == 0
    # Closing once more (the agent's shutdown) does not call NVML after its shutdown.
    assert fake.shutdown_calls == 1
