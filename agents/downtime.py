"""What the node used while its agent was down: a rented node keeps billing and a running node
keeps drawing power whether or not the agent is there to count it.

On start, the agent compares what it saved last (time, shares held, the sensor's hardware
counters and the host's boot id) with now. The gap's cost is counted at the shares held when
it saved. Its energy comes from hardware counters that kept counting (NVML's total energy and
RAPL's energy_uj survive an agent restart, not a reboot); where none did, it is unknown, and
said to be, with the gap's length: never silently zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wattops.agents.sensors.base import Sensor
from wattops.agents.state import Meter

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


def boot_id(path: Path = BOOT_ID_PATH) -> str:
    """This boot's id: another one after a reboot (hardware counters restart then)."""
    try:
        return path.read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Downtime:
    """One gap between the last save and this start."""

    seconds: float
    #: Energy the node's counters gathered over the gap; None: unknown (`why_unknown`).
    joules: float | None
    why_unknown: str = ""


def measure(
    meter: Meter | None, sensor: Sensor, current_boot: str, seconds: float, max_watts: float
) -> Downtime:
    """The gap's energy from the sensor's counters, when they can be trusted to have counted
    all of it: same boot, same sensor, same devices, and (for counters that wrap) a gap too
    short to wrap more than once even at the node's maximum power."""
    if meter is None:
        return Downtime(seconds, None, "no counter reading was saved (an older agent's state)")
    if meter.boot_id != current_boot:
        return Downtime(seconds, None, "the host rebooted: its hardware counters restarted")
    if meter.source != sensor.source:
        return Downtime(seconds, None, f"the sensor changed ({meter.source} -> {sensor.source})")
    now = sensor.counters()
    if not meter.counters or set(now) != set(meter.counters):
        return Downtime(seconds, None,
                        f"{sensor.source} has no hardware energy counter that outlives the agent"
                        if not now else "the devices measured changed")  # fmt: skip
    total = 0.0
    for device, (before, wraps_at) in meter.counters.items():
        after = now[device][0]
        if wraps_at is not None and seconds * max_watts >= wraps_at:
            return Downtime(seconds, None, f"{device}'s counter may have wrapped more than once "
                                           f"in {seconds:.0f} s")  # fmt: skip
        if after >= before:
            total += after - before
        elif wraps_at is not None:
            total += after + wraps_at - before
        else:
            return Downtime(seconds, None, f"{device}'s counter went back (driver reloaded)")
    return Downtime(seconds, total)


def describe(gap: Downtime, usd: float, source: str) -> str:
    """The gap in words, for the log and the alert."""
    length = f"{gap.seconds / 60:.0f} min" if gap.seconds >= 120 else f"{gap.seconds:.0f} s"
    energy = (
        f"{gap.joules:,.0f} J from the {source} counters"
        if gap.joules is not None
        else f"energy unknown ({gap.why_unknown}; counted in unmetered_s_total)"
    )
    return f"the agent was down {length}: ${usd:.4f} counted at the shares held; {energy}"
