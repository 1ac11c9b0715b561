"""Power sampling overhead: CPU the agent spends reading its sensor and accounting the energy.

Usage: .venv/bin/python benchmarks/sampling.py [--seconds 60] [--hz 10] [--sensors rapl,...]

Runs the agent's own PowerMeter and Accounting (with three deployments of two replicas each)
in an asyncio loop for `--seconds`, once per sensor: the RAPL sensor on a copy of the
two-socket fixture tree whose counters advance as the kernel's would, the Jetson sensor on the
AGX Orin fixture tree, and the profile estimate driven by /proc/stat (`estimate`) or by the
`/proc/<pid>/stat` of this process and six sleeping child processes standing in for the
replicas, found as the agent finds them (`estimate-agent`, `estimate_basis = "agent"`).
Reports the process CPU time used per second of wall time (percent of one core), minus a
baseline run of the same loop with no meter, so only the sampling and accounting cost
remains. On a real board each sysfs read also waits on the driver (an I2C transaction on
Jetson); that is waiting, not CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from wattops.agents.accounting import Accounting, CostModel
from wattops.agents.api import DeploymentCounters, ReplicaState, Totals
from wattops.agents.config import AgentSection, DeploymentConfig
from wattops.agents.power import PowerMeter
from wattops.agents.sensors.base import Sensor
from wattops.agents.sensors.estimate import (
    EstimateSensor,
    HostCpuUtilisation,
    ProcessCpuUtilisation,
)
from wattops.agents.sensors.jetson import JetsonSensor
from wattops.agents.sensors.rapl import RaplSensor
from wattops.agents.state import DesiredState
from wattops.agents.supervisor import Deployment, LiveReplica
from wattops.engines.base import Replica
from wattops.engines.openai_server import OpenAIServerEngine

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "sysfs"


def deployments() -> dict[str, Deployment]:
    found = {}
    for n in range(3):
        name = f"d{n}"
        engine = OpenAIServerEngine(
            None,  # type: ignore[arg-type]
            name=name, model=None, precision="f16", precisions=["f16"],
            url="http://127.0.0.1:9", command=None, owner=Path("/tmp"), log_dir=Path("/tmp"),
        )  # fmt: skip
        dep = Deployment(
            DeploymentConfig(name=name, engine="openai", url="http://127.0.0.1:9"), engine,
            DesiredState(precision="f16", replicas=2), DeploymentCounters(), Totals(),
            AgentSection(), lambda: None, lambda: None,
        )  # fmt: skip
        for r in range(2):
            replica = Replica(id=f"{name}-{r}", precision="f16", url="", memory_bytes=2**30,
                              threads=1)  # fmt: skip
            dep.replicas.append(LiveReplica(replica, state=ReplicaState.READY))
        found[name] = dep
    return found


async def run(sensor: Sensor | None, seconds: float, hz: float) -> float:
    """CPU seconds per wall second while sampling `sensor` (None: the bare loop)."""
    cost = CostModel(
        profile="bench", kind="cpu", node_usd_per_hour=0.4, owned=True, price_basis="bench",
        electricity_usd_per_kwh=0.12, pue=1.5, grid_gco2e_per_kwh=390, idle_watts=20,
        max_watts=100, accelerators=1, memory_bytes=16 * 2**30, cpu_cores=8,
    )  # fmt: skip
    accounting = Accounting(cost, Totals(), deployments(), 1.0, 3.0, 300)
    tasks = []
    if sensor is not None:
        meter = PowerMeter(sensor, None, hz)
        tasks.append(asyncio.create_task(meter.run(accounting.on_interval)))

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            accounting.tick(time.time())

    tasks.append(asyncio.create_task(tick()))
    await asyncio.sleep(1.0)  # warm up
    cpu0, wall0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    used = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    for task in tasks:
        task.cancel()
    return used


async def advance(root: Path, stop: asyncio.Event) -> None:
    # Runs in another process in reality (the kernel); here its cost is measured separately
    # by the baseline below being run with it too.
    zones = sorted((root / "sys/class/powercap").glob("intel-rapl:*"))
    while not stop.is_set():
        for zone in zones:
            path = zone / "energy_uj"
            tmp = zone / ".energy_uj.tmp"  # replaced whole: sysfs never shows half a number
            tmp.write_text(str(int(path.read_text()) + 2_500_000))
            os.replace(tmp, path)
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hz", type=float, default=10.0)
    parser.add_argument("--sensors", default="rapl,jetson,estimate,estimate-agent",
                        help="which to measure, comma-separated (default: all)")  # fmt: skip
    args = parser.parse_args()
    wanted = set(args.sensors.split(","))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rapl_root = Path(tmp) / "rapl"
        shutil.copytree(FIXTURES / "rapl-xeon-2s", rapl_root)

        async def measure(sensor: Sensor | None, with_kernel: bool) -> float:
            stop = asyncio.Event()
            kernel = asyncio.create_task(advance(rapl_root, stop)) if with_kernel else None
            try:
                return await run(sensor, args.seconds, args.hz)
            finally:
                stop.set()
                if kernel:
                    await kernel

        figures: dict[str, float] = {}
        baseline = asyncio.run(measure(None, False))
        if "rapl" in wanted:
            baseline_kernel = asyncio.run(measure(None, True))
            figures["rapl (2 sockets, 4 zones)"] = (
                asyncio.run(measure(RaplSensor(rapl_root), True)) - baseline_kernel
            )
        if "jetson" in wanted:
            figures["jetson (AGX Orin, 6 rails)"] = (
                asyncio.run(measure(JetsonSensor(FIXTURES / "agx-orin-jp5"), False)) - baseline
            )
        if "estimate" in wanted:
            estimate = EstimateSensor(20, 100, HostCpuUtilisation(Path("/")), "bench")
            figures["estimate (/proc/stat)"] = asyncio.run(measure(estimate, False)) - baseline
        if "estimate-agent" in wanted:
            sleep = [sys.executable, "-c", "import time; time.sleep(3600)"]
            replicas = [subprocess.Popen(sleep) for _ in range(6)]
            roots = [os.getpid(), *(r.pid for r in replicas)]  # as the agent passes them
            try:
                estimate = EstimateSensor(20, 100, ProcessCpuUtilisation(lambda: roots), "bench")
                figures["estimate, agent basis (this process and 6 children)"] = (
                    asyncio.run(measure(estimate, False)) - baseline
                )
            finally:
                for replica in replicas:
                    replica.kill()
                    replica.wait()
    results = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"Python {platform.python_version()}",
        "seconds": args.seconds,
        "hz": args.hz,
        "percent_of_one_core": {name: round(f * 100, 3) for name, f in figures.items()},
        "baseline_loop_percent": round(baseline * 100, 3),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
