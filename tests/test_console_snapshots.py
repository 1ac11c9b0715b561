"""Snapshot tests of what the console draws: the fleet view, the node view, the action modals.

The fleet is filled with fixed snapshots (built from the API models) instead of live agents,
so every figure on screen is the same on every run; the pilot tests in test_console.py drive
the same screens against real agents.
"""

from __future__ import annotations

from typing import Any

import pytest
from textual.pilot import Pilot

from wattops.agents.api import (
    Alert,
    DeploymentAccounting,
    DeploymentCounters,
    DeploymentState,
    DeploymentStatus,
    DeviceReading,
    Figures,
    LatencySummary,
    NodeCost,
    NodePower,
    NodeSnapshot,
    ReplicaState,
    ReplicaStatus,
    Totals,
)
from wattops.console.app import WattopsConsole, make_app
from wattops.console.screens.modals import DetailModal

SIZE = (200, 42)
# Port 9 (discard) on loopback refuses connections: the node view's history says so.
NODES = {
    "http://127.0.0.1:9/a": ("gpu-a1", "a100-80gb", "q8_0", 212.0, "nvml", 5.12),
    "http://127.0.0.1:9/b": ("orin-7", "jetson-agx-orin-64gb", "q4_k_m", 31.0, "jetson", 0.046),
    "http://127.0.0.1:9/c": ("cpu-3", "cpu-generic", "f16", 24.0, "estimate", 0.357),
}
PRECISIONS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]


def snapshot(node: str, profile: str, precision: str, watts: float, source: str, price: float,
             t: int) -> NodeSnapshot:  # fmt: skip
    w = watts * (0.8 + 0.05 * (t % 5))
    fig = Figures(window_s=60, watts=w, tokens_per_s=30.0 + t % 7, j_per_token=w / 35.0,
                  usd_per_1m_tokens=price / 3600 / 35.0 * 1e6, cost_usd_per_hour=price,
                  response_cache_hit_rate=0.31, prefix_cache_hit_rate=0.62)  # fmt: skip
    replicas = [ReplicaStatus(id=f"tiny-{precision}-0a1b2c", precision=precision,
                              state=ReplicaState.READY, url="http://127.0.0.1:40001", pid=4242,
                              in_flight=1, restarts=0, started_at=0.0)]  # fmt: skip
    dep = DeploymentStatus(
        name="tiny", engine="llamacpp", model="demo.gguf", precision=precision,
        desired_precision=precision, available_precisions=PRECISIONS, desired_replicas=1,
        ready_replicas=1, max_replicas=3, state=DeploymentState.SERVING, replicas=replicas,
        counters=DeploymentCounters(requests_total=100 + t, prompt_tokens_total=5000,
                                    completion_tokens_total=3000, cache_hits_total=31,
                                    cache_misses_total=69),
        latency=LatencySummary(p50_s=0.84, p95_s=2.1, window=100),
        accounting=DeploymentAccounting(share=0.5, cost_usd_per_hour=price / 2,
                                        energy_source=source, totals=Totals(),
                                        figures=fig),
    )  # fmt: skip
    devices = [DeviceReading(name="GPU 0 NVIDIA A100-SXM4-80GB", watts=w, utilisation=0.41,
                            memory_used_bytes=21 * 2**30, memory_total_bytes=80 * 2**30,
                            power_limit_watts=400.0)] if source == "nvml" else [
        DeviceReading(name=f"{profile} profile", watts=w, utilisation=0.3)]  # fmt: skip
    alerts = [Alert(id="budget:cpu-3:hour", kind="budget_exceeded", severity="critical",
                    subject="cpu-3", message="cpu-3 burns $0.36/h, over its $0.30/h budget",
                    detail="burn now = $0.3570/h > budget $0.3000/h", since=0.0)] \
        if node == "cpu-3" else []  # fmt: skip
    return NodeSnapshot(
        node=node, agent_version="0.1.0", started_at=0.0, time=float(t), version=t,
        deployments=[dep],
        power=NodePower(source=source, sensor=f"{source} sensor", total_from="sum of 1 GPU",
                        watts=w, watts_smoothed=w, sample_hz=10, devices=devices),
        cost=NodeCost(profile=profile, price_usd_per_hour=price, price_basis="list price",
                      owned=False, electricity_usd_per_kwh=0.1274, pue=1.56,
                      grid_gco2e_per_kwh=390, burn_usd_per_hour=price,
                      unallocated_usd_per_hour=price / 2),
        totals=Totals(energy_j_total=360000.0, idle_energy_j_total=200000.0,
                              active_energy_j_total=160000.0, cost_usd_total=1.23,
                              carbon_g_total=61.0),
        figures=fig, alerts=alerts,
    )  # fmt: skip


def fleet_app() -> WattopsConsole:
    return make_app(list(NODES), connect=False, refresh_s=60)


async def fill(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, WattopsConsole)
    for url, (node, profile, precision, watts, source, price) in NODES.items():
        link = app.fleet.links[url]
        for t in range(12):
            link.accept(snapshot(node, profile, precision, watts, source, price, t))
        link.connected = True
    app.fleet_screen.refresh_fleet()
    await pilot.pause()


def test_fleet_view(snap_compare: Any) -> None:
    assert snap_compare(fleet_app(), terminal_size=SIZE, run_before=fill)


@pytest.mark.parametrize("columns", [80, 100, 160, 200])
def test_fleet_view_keeps_the_figures_that_matter_on_narrow_terminals(
    snap_compare: Any, columns: int
) -> None:
    # Columns are sized to their content and kept by priority: on 80 columns NODE,
    # DEPLOYMENT, STATE, REPLICAS, $/H, POWER, ALERTS and PRECISION stay; the trend
    # sparklines go first. The header marks the sort column.
    async def sorted_by_cost(pilot: Pilot[Any]) -> None:
        await fill(pilot)
        app = pilot.app
        assert isinstance(app, WattopsConsole)
        screen = app.fleet_screen
        screen.sort_key, screen.sort_reverse = "usd_per_hour", True
        screen.refresh_fleet()
        await pilot.pause()

    assert snap_compare(fleet_app(), terminal_size=(columns, 24), run_before=sorted_by_cost)


def test_node_view(snap_compare: Any) -> None:
    async def open_node(pilot: Pilot[Any]) -> None:
        await fill(pilot)
        await pilot.press("enter")
        # The hour of history is asked of an agent that is not there: wait for that answer
        # (its note), not for a fixed time, so a busy machine draws the same screen.
        for _ in range(200):
            notes = pilot.app.screen.query("#history-note")
            if notes and str(notes.first().render()):
                break
            await pilot.pause(0.05)
        else:
            raise AssertionError("the node view never said what became of its history")
        await pilot.pause()

    assert snap_compare(fleet_app(), terminal_size=SIZE, run_before=open_node)


def test_precision_modal(snap_compare: Any) -> None:
    async def open_modal(pilot: Pilot[Any]) -> None:
        await fill(pilot)
        await pilot.press("p")

    assert snap_compare(fleet_app(), terminal_size=SIZE, run_before=open_modal)


def test_scale_modal(snap_compare: Any) -> None:
    async def open_modal(pilot: Pilot[Any]) -> None:
        await fill(pilot)
        await pilot.press("s")

    assert snap_compare(fleet_app(), terminal_size=SIZE, run_before=open_modal)


def test_park_confirmation(snap_compare: Any) -> None:
    async def open_modal(pilot: Pilot[Any]) -> None:
        await fill(pilot)
        await pilot.press("down", "down", "z")

    assert snap_compare(fleet_app(), terminal_size=SIZE, run_before=open_modal)


async def test_an_empty_filter_says_so_and_escape_clears_it() -> None:
    app = fleet_app()
    notes: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        await fill(pilot)
        original = app.notify
        app.notify = lambda message, **kw: (notes.append(message),  # type: ignore[method-assign]
                                            original(message, **kw))[1]  # fmt: skip
        await pilot.press("slash", "z", "z", "z", "enter")
        await pilot.pause()
        screen = app.fleet_screen
        assert screen.last_rows == []
        assert any("no row matches 'zzz'" in n for n in notes)
        await pilot.press("escape")
        await pilot.pause()
        assert screen.filter_text == "" and len(screen.last_rows) == 3


async def test_help_explains_every_key_and_column() -> None:
    app = fleet_app()
    async with app.run_test(size=SIZE) as pilot:
        await fill(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, DetailModal)
        text = app.screen.body
        for needed in ("enter", "Open the node view", "tab", "POWER TREND", "TOK/S TREND",
                       "est.: from the estimate", "the deployment's share"):  # fmt: skip
            assert needed in text, needed
