"""A power estimate for hosts with no usable meter: a linear model between a profile's idle and
maximum watts, driven by utilisation (the host's CPU from /proc/stat, the CPU of the agent's own
processes from /proc/<pid>/stat, or any callable)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
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


class EstimateSensor(Sensor):
    """watts = idle + (max - idle) * utilisation, utilisation clamped to 0..1. Not a measurement:
    its samples say so in `source` and spell out the model in `total_from`."""

    source: ClassVar[PowerSource] = "estimate"

    @classmethod
    def open(cls, context: SensorContext) -> Sensor:
        """The node's own estimate, built from its hardware profile."""
        if context.estimate is None:
            raise SensorError("estimate: no hardware profile to estimate from")
        return context.estimate()

    def __init__(
        self,
        idle_watts: float,
        max_watts: float,
        utilisation: Callable[[], float],
        label: str,
    ) -> None:
        if not 0 <= idle_watts <= max_watts:
            raise SensorError(
                f"estimate {label!r}: need 0 <= idle_watts <= max_watts, "
                f"got idle {idle_watts} W, max {max_watts} W"
            )
        self.idle_watts = float(idle_watts)
        self.max_watts = float(max_watts)
        self.label = label
        self._utilisation = utilisation

    def read(self) -> PowerSample:
        now = time.monotonic()
        try:
            raw = float(self._utilisation())
        except SensorError:
            raise
        except (OSError, ValueError, TypeError) as err:
            raise SensorError(f"estimate: cannot get utilisation for {self.label}: {err}") from err
        # NaN would pass through min/max unchanged and poison the energy total.
        share = min(max(raw, 0.0), 1.0) if math.isfinite(raw) else 0.0
        watts = self.idle_watts + (self.max_watts - self.idle_watts) * share
        return PowerSample(
            monotonic=now,
            source=self.source,
            watts=watts,
            devices=(DeviceReading(name=self.label, watts=watts, utilisation=share),),
            total_from=(
                f"estimate: {self.label} profile idle {self.idle_watts:g} W .. "
                f"max {self.max_watts:g} W at {share * 100:.0f}% utilisation"
            ),
        )

    def describe(self) -> str:
        return (
            f"estimate: {self.label} profile, idle {self.idle_watts:g} W .. "
            f"max {self.max_watts:g} W by utilisation (not measured)"
        )


class HostCpuUtilisation:
    """Host CPU utilisation (0..1) since the previous call, from the aggregate `cpu` line of
    `<proc_root>/proc/stat`. The first call covers the time since construction."""

    def __init__(self, proc_root: Path = Path("/")) -> None:
        self._path = proc_root / "proc" / "stat"
        self._busy, self._total = self._snapshot()
        self._last = 0.0

    def __call__(self) -> float:
        busy, total = self._snapshot()
        if total <= self._total:
            # No tick since the last call (two calls within one jiffy): nothing new to say.
            return self._last
        self._last = min(max((busy - self._busy) / (total - self._total), 0.0), 1.0)
        self._busy, self._total = busy, total
        return self._last

    def _snapshot(self) -> tuple[int, int]:
        try:
            with open(self._path, "rb") as stat:
                line = stat.readline()
        except OSError as err:
            raise SensorError(f"estimate: cannot read {self._path}: {err.strerror}") from err
        fields = line.split()
        if not fields or fields[0] != b"cpu" or len(fields) < 5:
            raise SensorError(f"estimate: {self._path} does not start with the aggregate cpu line")
        # user nice system idle iowait irq softirq steal; guest and guest_nice are already
        # inside user and nice, so they are not added again.
        ticks = [int(field) for field in fields[1:9]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total = sum(ticks)
        return total - idle, total


class ProcessCpuUtilisation:
    """The CPU used by a tree of processes (the agent and what it started: `roots()` names the
    agent and its replicas; their descendants are found through `/proc/<pid>/task/*/children`),
    as a share (0..1) of the host's CPUs since the previous call, from `/proc/<pid>/stat`: what
    the agent's own work uses, leaving out whatever else runs on a shared host.

    The tree is listed again at most once a second (`relist_s`; each listing reads a file per
    thread), the processes' times at every call. A process first seen after construction
    counts from its start, so a replica or a quantization found a moment after it was spawned
    brings all its CPU so far. A share above
    1 is carried into the following calls rather than dropped, so a burst of CPU found at once
    is spread over the next samples, never lost. A process that ended loses at most the CPU it
    used since the previous call (reaped children's time, `cutime`, is not read: the agent's
    would count its replicas twice). The first call covers the time since construction."""

    def __init__(
        self,
        roots: Callable[[], Iterable[int]],
        proc_root: Path = Path("/"),
        cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        relist_s: float = 1.0,
    ) -> None:
        self._roots = roots
        self._relist_s = relist_s
        self._listed: set[int] = set()
        self._listed_at = -math.inf
        self._proc = proc_root / "proc"
        self._cpus = cpus or os.cpu_count() or 1
        self._tick = float(os.sysconf("SC_CLK_TCK"))
        self._clock = clock
        # (pid, start time in ticks): CPU ticks at the previous call. The start time tells a
        # reused pid from the process that had it.
        self._seen: dict[tuple[int, int], int] = {}
        self._carry = 0.0  # CPU-seconds found but not yet reported (above a share of 1)
        self._time = clock()
        self._used_since_last(first=True)  # what is already running counts from now on
        self._last = 0.0

    def __call__(self) -> float:
        now = self._clock()
        elapsed = now - self._time
        if elapsed <= 0:
            return self._last  # no time since the last call: nothing new to say
        self._carry += self._used_since_last() / self._tick
        self._time = now
        capacity = elapsed * self._cpus
        reported = min(self._carry, capacity)
        self._carry -= reported
        self._last = reported / capacity
        return self._last

    def pids(self) -> set[int]:
        """The roots and every live descendant of theirs."""
        found: set[int] = set()
        todo = list(self._roots())
        while todo:
            pid = todo.pop()
            if pid in found:
                continue
            found.add(pid)
            todo.extend(self._children(pid))
        return found

    def _children(self, pid: int) -> list[int]:
        children: list[int] = []
        try:
            tasks = os.listdir(self._proc / str(pid) / "task")
        except OSError:
            return children  # gone, or not a process
        for tid in tasks:
            try:
                with open(self._proc / str(pid) / "task" / tid / "children", "rb") as f:
                    children.extend(int(child) for child in f.read().split())
            except (OSError, ValueError):
                continue  # the thread ended, or a kernel without CONFIG_PROC_CHILDREN
        return children

    def _used_since_last(self, first: bool = False) -> int:
        """CPU ticks used since the previous call by the processes alive now (`first`: none;
        this call only takes note of them)."""
        used = 0
        seen: dict[tuple[int, int], int] = {}
        now = self._clock()
        if now - self._listed_at >= self._relist_s:
            self._listed, self._listed_at = self.pids(), now
        for pid in self._listed:
            read = self._read(pid)
            if read is None:
                continue  # gone between the listing and the read
            key, ticks = (pid, read[0]), read[1]
            seen[key] = ticks
            # New since the previous call: all of its time is new (none at construction).
            used += ticks - self._seen.get(key, ticks if first else 0)
        self._seen = seen
        return used

    def _read(self, pid: int) -> tuple[int, int] | None:
        """(start time, utime + stime) of `pid` in ticks; None if it is not there."""
        try:
            with open(self._proc / str(pid) / "stat", "rb") as stat:
                line = stat.read()
        except (FileNotFoundError, ProcessLookupError):
            return None
        except OSError as err:
            raise SensorError(f"estimate: cannot read /proc/{pid}/stat: {err.strerror}") from err
        # The command name (field 2) is in parentheses and may hold spaces or ')': the fields
        # after the last ')' start at field 3 (state). utime, stime: 14, 15; starttime: 22.
        fields = line[line.rfind(b")") + 2 :].split()
        try:
            return int(fields[19]), int(fields[11]) + int(fields[12])
        except (IndexError, ValueError):
            raise SensorError(f"estimate: /proc/{pid}/stat is not in the kernel's format") from None
