"""NVIDIA GPU power through NVML (`nvidia-ml-py`, imported as `pynvml`): watts, energy counters,
utilisation, memory and power limit per GPU, summed into the node figure."""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from wattops.agents.sensors.base import (
    DeviceReading,
    PowerLimit,
    PowerSample,
    PowerSource,
    Sensor,
    SensorContext,
    SensorError,
)


@dataclass
class _Gpu:
    index: int
    name: str
    handle: Any
    #: False once NVML says the energy counter is not supported on this GPU (pre-Volta, some
    #: boards): its energy is then integrated from watts by the agent.
    has_counter: bool
    #: Last raw counter value (millijoules since the driver loaded).
    counter_mj: int = 0
    #: Millijoules counted since this sensor started.
    energy_mj: int = 0


class NvmlSensor(Sensor):
    """Every GPU NVML can see; node watts are the sum of the GPUs' watts."""

    source: ClassVar[PowerSource] = "nvml"
    auto_order: ClassVar[int | None] = 10

    @classmethod
    def open(cls, context: SensorContext) -> NvmlSensor:
        return cls(context.nvml)

    def __init__(self, nvml: Any = None) -> None:
        """`nvml` is the `pynvml` module, or an object with the same functions and names (tests).

        Raises SensorError when NVML cannot be used at all: module or library missing, driver
        not loaded, no GPU.
        """
        if nvml is None:
            nvml = _import_pynvml()
        self._nvml = nvml
        self._closed = False
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            self._closed = True
            raise SensorError(_init_failure(nvml, err)) from err
        #: Problems at start-up that leave some GPUs out; repeated in every sample so they are
        #: not lost in a log line.
        self._startup_warnings: tuple[str, ...] = ()
        try:
            self._gpus = self._discover()
        except nvml.NVMLError as err:
            self.close()
            raise SensorError(
                f"nvml: cannot list GPUs (nvmlDeviceGetCount: {err}); check `nvidia-smi`"
            ) from err
        if not self._gpus:
            self.close()
            detail = "; ".join(self._startup_warnings) or "nvmlDeviceGetCount returned 0"
            raise SensorError(f"nvml: NVML is loaded but no GPU can be used ({detail})")

    def accelerators(self) -> int | None:
        return len(self._gpus)

    def counters(self) -> dict[str, tuple[float, float | None]]:
        # Millijoules since the driver loaded, 64 bits: it does not wrap in practice.
        if not all(gpu.has_counter for gpu in self._gpus):
            return {}
        return {f"gpu{gpu.index}": (gpu.counter_mj / 1000.0, None) for gpu in self._gpus}

    def _discover(self) -> list[_Gpu]:
        nvml = self._nvml
        gpus: list[_Gpu] = []
        warnings: list[str] = []
        self._count = int(nvml.nvmlDeviceGetCount())
        for index in range(self._count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                name = _text(nvml.nvmlDeviceGetName(handle))
                # A100 (GA100) reports instantaneous power from nvmlDeviceGetPowerUsage, later
                # Ampere and newer report a 1-second average, so integrating watts sampled at
                # 10 Hz misses or smears short bursts. The hardware energy counter (Volta+) has
                # none of that, so it is preferred wherever the GPU has one.
                counter = self._optional(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
            except nvml.NVMLError as err:
                warnings.append(f"nvml: GPU {index} left out at start-up: {err}")
                continue
            gpu = _Gpu(index=index, name=name, handle=handle, has_counter=counter is not None)
            if counter is not None:
                gpu.counter_mj = int(counter)
            gpus.append(gpu)
        self._startup_warnings = tuple(warnings)
        return gpus

    def read(self) -> PowerSample:
        if self._closed:
            raise SensorError("nvml: read() after close()")
        now = time.monotonic()
        devices: list[DeviceReading] = []
        warnings = list(self._startup_warnings)
        for gpu in self._gpus:
            try:
                devices.append(self._read_gpu(gpu))
            except self._nvml.NVMLError as err:
                warnings.append(f"nvml: GPU {gpu.index} ({gpu.name}) skipped: {self._why(err)}")
        if not devices:
            raise SensorError(
                "nvml: no GPU could be read: "
                + "; ".join(warnings)
                + "; check `nvidia-smi` and the kernel log (Xid errors)"
            )
        # A GPU lost mid-run keeps its last count in the node energy, so the node counter
        # never goes backwards; its watts are simply missing (and warned about).
        energy_j = (
            sum(gpu.energy_mj for gpu in self._gpus) / 1000.0
            if all(gpu.has_counter for gpu in self._gpus)
            else None
        )
        read, count = len(devices), self._count
        if read < count:
            total_from = f"sum of {read} of {count} GPUs"
        else:
            total_from = f"sum of {count} GPU" + ("" if count == 1 else "s")
        return PowerSample(
            monotonic=now,
            source=self.source,
            watts=sum(device.watts for device in devices),
            energy_j=energy_j,
            devices=tuple(devices),
            total_from=total_from,
            warnings=tuple(warnings),
        )

    def _read_gpu(self, gpu: _Gpu) -> DeviceReading:
        nvml = self._nvml
        handle = gpu.handle
        # Power itself is required: a GPU that cannot report it is skipped, not read as 0 W.
        milliwatts = nvml.nvmlDeviceGetPowerUsage(handle)
        energy_j: float | None = None
        if gpu.has_counter:
            counter = self._optional(nvml.nvmlDeviceGetTotalEnergyConsumption, handle)
            if counter is None:
                gpu.has_counter = False
            else:
                counter = int(counter)
                # The counter restarts from zero when the driver reloads (GPU reset); count
                # what it has gathered since instead of a negative step.
                step = counter - gpu.counter_mj if counter >= gpu.counter_mj else counter
                gpu.energy_mj += step
                gpu.counter_mj = counter
                energy_j = gpu.energy_mj / 1000.0
        rates = self._optional(nvml.nvmlDeviceGetUtilizationRates, handle)
        memory = self._optional(nvml.nvmlDeviceGetMemoryInfo, handle)
        limit_mw = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        return DeviceReading(
            name=f"gpu{gpu.index} {gpu.name}",
            watts=milliwatts / 1000.0,
            energy_j=energy_j,
            utilisation=rates.gpu / 100.0 if rates is not None else None,
            memory_used_bytes=int(memory.used) if memory is not None else None,
            memory_total_bytes=int(memory.total) if memory is not None else None,
            power_limit_watts=limit_mw / 1000.0 if limit_mw is not None else None,
        )

    def power_limits(self) -> list[PowerLimit]:
        """Every GPU whose limit NVML can report with its bounds (GPUs that cannot, or that
        are lost, are left out of the lever)."""
        nvml = self._nvml
        limits = []
        for gpu in self._gpus:
            try:
                low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(gpu.handle)
                now = nvml.nvmlDeviceGetPowerManagementLimit(gpu.handle)
                default = nvml.nvmlDeviceGetPowerManagementDefaultLimit(gpu.handle)
            except nvml.NVMLError:
                continue
            limits.append(PowerLimit(
                device=f"gpu{gpu.index}", name=f"gpu{gpu.index} {gpu.name}",
                min_watts=low / 1000.0, max_watts=high / 1000.0,
                default_watts=default / 1000.0, watts=now / 1000.0,
            ))  # fmt: skip
        return limits

    def set_power_limit(self, device: str, watts: float) -> None:
        """nvmlDeviceSetPowerManagementLimit, as `nvidia-smi -pl` does (root or CAP_SYS_ADMIN;
        not kept across a driver reload)."""
        nvml = self._nvml
        gpu = next((g for g in self._gpus if f"gpu{g.index}" == device), None)
        if gpu is None:
            raise SensorError(f"nvml: no {device} on this node")
        try:
            nvml.nvmlDeviceSetPowerManagementLimit(gpu.handle, round(watts * 1000))
        except nvml.NVMLError as err:
            code = _code(err)
            if code == nvml.NVML_ERROR_NO_PERMISSION:
                why = ("needs root (or CAP_SYS_ADMIN) on the agent's process; run it so, or "
                       "leave the lever off with [policy] power_limit = false")  # fmt: skip
            elif code == nvml.NVML_ERROR_NOT_SUPPORTED:
                why = "this GPU does not allow its power limit to be set"
            elif code == nvml.NVML_ERROR_INVALID_ARGUMENT:
                why = "outside the GPU's allowed range (nvidia-smi -q -d POWER shows it)"
            else:
                why = str(err)
            raise SensorError(f"nvml: setting {device}'s power limit to {watts:.0f} W: {why} "
                              f"(nvmlDeviceSetPowerManagementLimit: {err})") from err  # fmt: skip

    def _optional(self, call: Callable[[Any], Any], handle: Any) -> Any:
        """A figure some GPUs do not have: None when NVML says not supported."""
        nvml = self._nvml
        try:
            return call(handle)
        except nvml.NVMLError as err:
            # FunctionNotFound: a driver older than the binding (the energy counter needs
            # R390+); for one figure that means the same as NotSupported.
            if _code(err) in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
                return None
            raise

    def _why(self, err: Exception) -> str:
        if _code(err) == self._nvml.NVML_ERROR_NOT_SUPPORTED:
            return "NVML does not report power draw for this GPU (nvmlDeviceGetPowerUsage)"
        return str(err)

    def describe(self) -> str:
        names = ", ".join(f"gpu{gpu.index} {gpu.name}" for gpu in self._gpus)
        counters = sum(gpu.has_counter for gpu in self._gpus)
        return (
            f"nvml: {len(self._gpus)} GPU(s) ({names}); "
            f"energy counters on {counters} of {len(self._gpus)}"
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Shutting down after the driver went away fails, and there is nothing left to release.
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


def _import_pynvml() -> Any:
    try:
        # Imported by name so the agent starts (with another sensor) where it is not installed.
        return importlib.import_module("pynvml")
    except ImportError as err:
        raise SensorError(
            "nvml: the pynvml module is not installed; install it with "
            "`pip install nvidia-ml-py`, or choose another sensor"
        ) from err


def _code(err: Exception) -> Any:
    return getattr(err, "value", None)


def _text(name: Any) -> str:
    # pynvml before 11.5 returned bytes.
    return name.decode(errors="replace") if isinstance(name, bytes) else str(name)


def _init_failure(nvml: Any, err: Exception) -> str:
    code = _code(err)
    if code == nvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return (
            "nvml: NVML library not found (libnvidia-ml.so.1): no NVIDIA driver on this host; "
            "install the driver, or choose another sensor"
        )
    if code == nvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return (
            "nvml: NVIDIA driver not loaded (nvmlInit: Driver Not Loaded); "
            "check `nvidia-smi` and `lsmod | grep nvidia`"
        )
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return "nvml: no permission to open the GPUs (nvmlInit); check access to /dev/nvidia*"
    if code == nvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return (
            "nvml: NVML library and kernel driver versions differ (nvmlInit); "
            "reboot or reload the driver after a driver upgrade"
        )
    return f"nvml: nvmlInit failed: {err}; check `nvidia-smi`"
