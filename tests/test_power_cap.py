"""The GPU power-limit lever (agents/power_cap.py) against the stand-in for NVML the sensor
tests use (tests/test_sensors.py: pynvml's own error codes and constants; setting a limit is
root-only and bounded by the card's constraints, in milliwatts, as the driver does): the
policy's plan, the limits set within bounds, restored on exit, on lifting, and after a kill."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.test_policy import view
from tests.test_sensors import FakeGpu, FakeNvml
from wattops.agents.config import parse_config
from wattops.agents.node import NodeAgent
from wattops.agents.policy import plan
from wattops.agents.power_cap import PowerCap, PowerView
from wattops.agents.sensors.base import PowerLimit, SensorError
from wattops.agents.sensors.nvml import NvmlSensor


def limit(device: str, watts: float, low: float = 100.0, high: float = 400.0) -> PowerLimit:
    return PowerLimit(device=device, name=f"{device} NVIDIA A100-SXM4-80GB", min_watts=low,
                      max_watts=high, default_watts=high, watts=watts)  # fmt: skip


def planned(power: PowerView | None, watts: float, max_watts: float = 600.0,
            views: list[Any] | None = None) -> list[tuple[str, str, object]]:  # fmt: skip
    _, steps = plan(views or [], 0.0, watts, None, max_watts, 0.05, 600, 300, True, power)
    return [(s.deployment, s.action, s.limits or s.target) for s in steps]


def test_the_policy_lowers_each_gpu_by_its_share_of_the_draw_within_its_bounds() -> None:
    # 700 W on a node with 600 W allowed; the GPUs draw 350 W and 250 W of it.
    power = PowerView((limit("gpu0", 400), limit("gpu1", 400)),
                      {"gpu0": 350.0, "gpu1": 250.0}, {}, None)  # fmt: skip
    busy = view("chat", replicas=2, utilisation=0.2)  # could lose a replica, but need not
    steps = planned(power, 700.0, views=[busy])
    # 100 W off, split 7:5 by draw: 350 - 58.3 and 250 - 41.7, in whole watts.
    assert steps == [("*", "power_limit", {"gpu0": 291.0, "gpu1": 208.0})]
    # Cards near their minimum give what they can; the rest is met by the other steps.
    low = PowerView((limit("gpu0", 400, low=330), limit("gpu1", 400, low=240)),
                    {"gpu0": 350.0, "gpu1": 250.0}, {}, None)  # fmt: skip
    steps = planned(low, 700.0, views=[busy])
    assert steps[0] == ("*", "power_limit", {"gpu0": 330.0, "gpu1": 240.0})
    assert ("chat", "scale", 1) in steps
    # At their minimum already, or moved within the dwell time: no power step.
    floor = PowerView((limit("gpu0", 100),), {"gpu0": 100.0}, {"gpu0": 400.0}, None)
    assert [s[1] for s in planned(floor, 700.0)] == []
    recent = PowerView(power.limits, power.draws, {}, 30.0)
    assert planned(recent, 700.0) == []
    # No lever (RAPL, Jetson, the estimate): the other steps only.
    assert [s[1] for s in planned(None, 700.0, views=[busy])] == ["scale"]


def test_the_cap_is_lifted_only_when_the_node_is_under_and_no_gpu_is_held_back() -> None:
    capped = (limit("gpu0", 291), limit("gpu1", 208))
    originals = {"gpu0": 400.0, "gpu1": 400.0}
    quiet = PowerView(capped, {"gpu0": 120.0, "gpu1": 90.0}, originals, 600.0)
    assert planned(quiet, 450.0) == [("*", "power_restore", originals)]
    held = PowerView(capped, {"gpu0": 285.0, "gpu1": 90.0}, originals, 600.0)  # at 98% of cap
    assert planned(held, 450.0) == []
    near = PowerView(capped, quiet.draws, originals, 600.0)  # under, but not by the hysteresis
    assert planned(near, 590.0) == []
    soon = PowerView(capped, quiet.draws, originals, 60.0)  # within the dwell time
    assert planned(soon, 450.0) == []


def test_limits_are_set_within_bounds_recorded_and_restored(tmp_path: Path) -> None:
    gpus = [FakeGpu(), FakeGpu(min_limit_mw=150_000)]
    sensor = NvmlSensor(FakeNvml(gpus))
    record = tmp_path / "power-limits.json"
    cap = PowerCap(sensor, record)
    assert [(x.device, x.min_watts, x.max_watts, x.watts) for x in cap.limits()] == [
        ("gpu0", 100.0, 400.0, 400.0), ("gpu1", 150.0, 400.0, 400.0)]  # fmt: skip
    done = cap.apply({"gpu0": 291.0, "gpu1": 120.0})  # gpu1's minimum is 150 W
    assert done == ["gpu0 400 -> 291 W", "gpu1 400 -> 150 W"]
    assert (gpus[0].limit_mw, gpus[1].limit_mw) == (291_000, 150_000)
    # The limits found first are on disk before anything changed, and a second step keeps them.
    assert json.loads(record.read_text())["originals"] == {"gpu0": 400.0, "gpu1": 400.0}
    cap.apply({"gpu0": 250.0})
    assert cap.originals == {"gpu0": 400.0, "gpu1": 400.0}
    assert cap.restore() == ["gpu0 -> 400 W", "gpu1 -> 400 W"]
    assert (gpus[0].limit_mw, gpus[1].limit_mw) == (400_000, 400_000)
    assert not record.exists()
    sensor.close()


def test_limits_a_killed_agent_left_lowered_are_restored_on_the_next_start(tmp_path: Path) -> None:
    gpus = [FakeGpu()]
    fake = FakeNvml(gpus)
    record = tmp_path / "power-limits.json"
    PowerCap(NvmlSensor(fake), record).apply({"gpu0": 250.0})  # ... and the agent is killed
    assert gpus[0].limit_mw == 250_000
    restarted = PowerCap(NvmlSensor(fake), record)
    assert restarted.restore_left_over() == ["gpu0 -> 400 W"]
    assert gpus[0].limit_mw == 400_000 and not record.exists()
    assert PowerCap(NvmlSensor(fake), record).restore_left_over() == []


def test_without_root_the_lever_says_so_and_changes_nothing(tmp_path: Path) -> None:
    gpus = [FakeGpu(root=False)]
    cap = PowerCap(NvmlSensor(FakeNvml(gpus)), tmp_path / "power-limits.json")
    with pytest.raises(SensorError, match=r"needs root \(or CAP_SYS_ADMIN\).*Insufficient Perm"):
        cap.apply({"gpu0": 250.0})
    assert gpus[0].limit_mw == 400_000
    assert cap.originals == {} and not cap.path.exists()  # nothing to put back at exit


def test_an_acting_policy_caps_the_gpus_and_the_agent_restores_them_at_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole agent (in this process, no deployments) on a two-GPU node through the NVML
    stand-in: over max_watts, its policy lowers the limits; stopping it puts them back."""
    gpus = [FakeGpu(milliwatts=350_000), FakeGpu(milliwatts=250_000)]
    fake = FakeNvml(gpus)
    monkeypatch.setattr("wattops.agents.sensors.nvml._import_pynvml", lambda: fake)
    config = parse_config({
        "agent": {"node": "gpu-box", "profile": "a100-80gb", "sensor": "nvml",
                  "state_dir": str(tmp_path / "state")},
        "policy": {"mode": "act", "max_watts": 500, "interval_s": 3600, "dwell_s": 0},
    })  # fmt: skip

    async def run() -> tuple[list[int], list[str], list[int]]:
        agent = NodeAgent(config)
        await agent.start()
        try:
            for _ in range(100):  # the sampling thread's first reading
                if agent.meter is not None and agent.meter.latest is not None:
                    break
                await asyncio.sleep(0.05)
            agent._policy_step()
            lowered = [g.limit_mw for g in gpus]
            actions = [f"{a.action}: {a.outcome}" for a in agent.policy_actions]
        finally:
            await agent.stop()
        return lowered, actions, [g.limit_mw for g in gpus]

    lowered, actions, after = asyncio.run(run())
    # 600 W drawn, 500 allowed: 100 W off, 7:5 by draw.
    assert lowered == [291_000, 208_000]
    assert actions == ["power_limit: accepted"]
    assert after == [400_000, 400_000]
    assert not (tmp_path / "state" / "power-limits.json").exists()
