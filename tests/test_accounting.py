"""The allocation arithmetic: shares held, energy by busy time and share, cost, carbon,
per-token figures, and the alerts built on them (README: "How cost and energy are counted")."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from wattops.agents.accounting import Accounting, CostModel
from wattops.agents.alerts import AlertBook, budget_alerts, parkable_alert
from wattops.agents.api import (
    DeploymentCounters,
    DeploymentHistory,
    Figures,
    HistoryPoint,
    ReplicaState,
    Totals,
)
from wattops.agents.config import AgentSection, DeploymentConfig
from wattops.agents.history import figures
from wattops.agents.power import EnergyInterval
from wattops.agents.sensors.base import PowerSample
from wattops.agents.state import DesiredState
from wattops.agents.supervisor import Deployment, LiveReplica
from wattops.engines.base import Replica
from wattops.engines.openai_server import OpenAIServerEngine

GIB = 2**30


def cost_model(**overrides: Any) -> CostModel:
    values: dict[str, Any] = dict(
        profile="test", kind="cpu", node_usd_per_hour=0.40, owned=False, price_basis="test",
        electricity_usd_per_kwh=0.10, pue=1.5, grid_gco2e_per_kwh=400.0, idle_watts=20.0,
        max_watts=100.0, accelerators=1, memory_bytes=16 * GIB, cpu_cores=8,
    )  # fmt: skip
    values.update(overrides)
    return CostModel(**values)


def deployment(name: str, replicas: list[tuple[int, int, float]]) -> Deployment:
    """A deployment with READY replicas given as (memory bytes, threads, busy seconds)."""
    engine = OpenAIServerEngine(
        None,  # type: ignore[arg-type]  # arithmetic only: no HTTP
        name=name, model=None, precision="f16", precisions=["f16"], url="http://127.0.0.1:9",
        command=None, owner=Path("/tmp"), log_dir=Path("/tmp"),
    )  # fmt: skip
    config = DeploymentConfig(name=name, engine="openai", url="http://127.0.0.1:9")
    dep = Deployment(
        config, engine, DesiredState(precision="f16", replicas=len(replicas)),
        DeploymentCounters(), Totals(), AgentSection(), lambda: None, lambda: None,
    )  # fmt: skip
    for i, (memory, threads, busy) in enumerate(replicas):
        replica = Replica(id=f"{name}-{i}", precision="f16", url="", memory_bytes=memory,
                          threads=threads)  # fmt: skip
        dep.replicas.append(LiveReplica(replica, state=ReplicaState.READY, busy_s=busy))
    return dep


def interval(joules: float, seconds: float, estimated: bool = False) -> EnergyInterval:
    sample = PowerSample(monotonic=time.monotonic(), source="rapl", watts=joules / seconds)
    return EnergyInterval(sample, joules, seconds, joules if estimated else 0.0)


def test_share_held_is_the_larger_of_memory_and_compute() -> None:
    cost = cost_model()
    small = deployment("small", [(1 * GIB, 2, 0.0)])  # compute 2/8 beats memory 1/16
    big = deployment("big", [(8 * GIB, 1, 0.0)])  # memory 8/16 beats compute 1/8
    acc = Accounting(cost, Totals(), {"small": small, "big": big}, 1, 3, 300)
    assert acc.held_shares() == {"small": pytest.approx(0.25), "big": pytest.approx(0.5)}


def test_a_parked_deployment_holds_nothing_and_is_charged_nothing() -> None:
    cost = cost_model()
    serving = deployment("serving", [(1 * GIB, 2, 4.0), (1 * GIB, 2, 2.0)])
    parked = deployment("parked", [])
    node = Totals()
    acc = Accounting(cost, node, {"serving": serving, "parked": parked}, 1, 3, 300)
    acc.on_interval(interval(joules=500.0, seconds=10.0))
    # idle = 20 W x 10 s = 200 J, active = 300 J.
    assert node.energy_j_total == pytest.approx(500.0)
    assert (node.idle_energy_j_total, node.active_energy_j_total) == (200.0, 300.0)
    # All active energy to the only busy deployment; idle energy by share held (0.5).
    assert serving.totals.active_energy_j_total == pytest.approx(300.0)
    assert serving.totals.idle_energy_j_total == pytest.approx(100.0)
    assert parked.totals.energy_j_total == 0.0
    assert parked.totals.cost_usd_total == 0.0
    # Cloud price: hardware only (electricity is in the rental), split by share held.
    assert node.cost_usd_total == pytest.approx(0.40 * 10 / 3600)
    assert serving.totals.cost_usd_total == pytest.approx(0.40 * 10 / 3600 * 0.5)
    # Carbon: kWh x PUE x grid intensity.
    assert node.carbon_g_total == pytest.approx(500 / 3.6e6 * 1.5 * 400)


def test_parking_counts_the_share_it_stopped_holding() -> None:
    cost = cost_model()
    dep = deployment("chat", [(1 * GIB, 2, 0.0)])  # holds 2/8 of the node
    acc = Accounting(cost, Totals(), {"chat": dep}, 1, 3, 300)
    acc.on_interval(interval(joules=300.0, seconds=10.0))
    assert dep.totals.parked_s_total == 0.0
    charged = dep.totals.cost_usd_total
    dep.replicas.clear()
    dep.desired = DesiredState(precision="f16", replicas=0)  # parked
    acc.on_interval(interval(joules=200.0, seconds=30.0))
    assert dep.totals.cost_usd_total == charged  # it held nothing...
    assert dep.totals.parked_s_total == 30.0
    # ...and avoided its last share of the node's price for those 30 s.
    assert dep.totals.parked_usd_avoided_total == pytest.approx(0.40 * 0.25 * 30 / 3600)
    never = deployment("new", [])
    acc2 = Accounting(cost, Totals(), {"new": never}, 1, 3, 300)
    acc2.on_interval(interval(joules=200.0, seconds=10.0))
    assert never.totals.parked_s_total == 10.0  # parked, never seen running: seconds only
    assert never.totals.parked_usd_avoided_total == 0.0


def test_active_energy_follows_busy_time_weighted_by_compute() -> None:
    cost = cost_model()
    a = deployment("a", [(GIB, 4, 3.0)])  # 3 s busy x 4/8 of the cores = 1.5
    b = deployment("b", [(GIB, 1, 4.0)])  # 4 s busy x 1/8 = 0.5
    acc = Accounting(cost, Totals(), {"a": a, "b": b}, 1, 3, 300)
    acc.on_interval(interval(joules=600.0, seconds=10.0))
    active = 600.0 - 200.0
    assert a.totals.active_energy_j_total == pytest.approx(active * 1.5 / 2.0)
    assert b.totals.active_energy_j_total == pytest.approx(active * 0.5 / 2.0)
    # The next interval only counts busy time added since this one.
    a.replicas[0].busy_s += 1.0
    acc.on_interval(interval(joules=400.0, seconds=10.0))
    assert a.totals.active_energy_j_total == pytest.approx(active * 0.75 + 200.0)
    assert b.totals.active_energy_j_total == pytest.approx(active * 0.25)


def test_shares_over_the_whole_node_are_scaled_down() -> None:
    gpu = cost_model(kind="gpu", accelerators=1, memory_bytes=80 * GIB)
    one = deployment("one", [(10 * GIB, 8, 0.0)])
    two = deployment("two", [(10 * GIB, 8, 0.0)])
    acc = Accounting(gpu, Totals(), {"one": one, "two": two}, 1, 3, 300)
    # Each replica takes the node's one accelerator: together they hold the node once.
    assert acc.held_shares() == {"one": 0.5, "two": 0.5}


def test_owned_hardware_adds_electricity_at_pue() -> None:
    owned = cost_model(owned=True, node_usd_per_hour=0.05)
    dep = deployment("d", [(GIB, 8, 10.0)])  # the whole CPU, busy all the time
    node = Totals()
    acc = Accounting(owned, node, {"d": dep}, 1, 3, 300)
    acc.on_interval(interval(joules=3.6e6, seconds=3600.0, estimated=True))  # 1 kWh in 1 h
    assert node.cost_usd_total == pytest.approx(0.05 + 1.0 * 1.5 * 0.10)
    assert dep.totals.cost_usd_total == pytest.approx(0.05 + 1.0 * 1.5 * 0.10)
    assert node.estimated_energy_j_total == node.energy_j_total


def point(t: float, energy: float, cost: float, prompt: int, completion: int,
          hits: int = 0, misses: int = 0, cached: int = 0) -> HistoryPoint:  # fmt: skip
    dep = DeploymentHistory(
        watts=0, precision="q4_k_m", ready_replicas=1, requests_total=0,
        prompt_tokens_total=prompt, completion_tokens_total=completion, energy_j_total=energy,
        cost_usd_total=cost, carbon_g_total=energy / 10, cached_prompt_tokens_total=cached,
        cache_hits_total=hits, cache_misses_total=misses,
    )  # fmt: skip
    return HistoryPoint(t=t, watts=0, source="rapl", energy_j_total=energy, cost_usd_total=cost,
                        carbon_g_total=energy / 10, deployments={"d": dep})  # fmt: skip


def test_per_token_figures_split_cost_by_token_weights() -> None:
    old = point(0.0, energy=0.0, cost=0.0, prompt=0, completion=0)
    new = point(10.0, energy=1000.0, cost=0.01, prompt=1000, completion=1000, hits=1, misses=3,
                cached=250)  # fmt: skip
    fig = figures(old, new, "d", input_weight=1.0, output_weight=3.0)
    assert fig.watts == pytest.approx(100.0)
    assert fig.tokens_per_s == pytest.approx(200.0)
    assert fig.j_per_token == pytest.approx(0.5)
    assert fig.usd_per_1m_tokens == pytest.approx(0.01 / 2000 * 1e6)
    # 1,000 input x 1 + 1,000 output x 3 = 4,000 weighted units for $0.01.
    assert fig.usd_per_1m_input_tokens == pytest.approx(0.01 / 4000 * 1e6)
    assert fig.usd_per_1m_output_tokens == pytest.approx(3 * 0.01 / 4000 * 1e6)
    assert fig.cost_usd_per_hour == pytest.approx(3.6)
    assert fig.response_cache_hit_rate == pytest.approx(0.25)
    assert fig.prefix_cache_hit_rate == pytest.approx(0.25)
    empty = figures(old, old, "d", 1.0, 3.0)
    assert empty.j_per_token is None and empty.usd_per_1m_tokens is None


def test_budget_alerts_for_the_hour_and_the_projected_day() -> None:
    assert budget_alerts("n", 0.5, 1.0, 24.0, "now") == []
    alerts = budget_alerts("n", 1.5, 1.0, 24.0, "now")
    assert [a.id for a in alerts] == ["budget:n:hour", "budget:n:day"]
    assert "$1.50/h" in alerts[0].message and "$36.00/day" in alerts[1].message
    assert "x 24 h" in alerts[1].detail


def test_parking_advice_names_what_it_saves() -> None:
    alert = parkable_alert("tiny", "node-b", idle_s=900, advise_after_s=600, replicas=1,
                           share=0.25, node_usd_per_hour=3.36, figures=None)  # fmt: skip
    assert alert is not None
    assert alert.message == "park tiny on node-b: saves $0.84/h"
    assert alert.saves_usd_per_hour == pytest.approx(0.84)
    assert "0.2500 x $3.3600/h" in alert.detail
    assert parkable_alert("tiny", "n", 100, 600, 1, 0.25, 3.36, None) is None
    assert parkable_alert("tiny", "n", 900, 600, 0, 0.0, 3.36, None) is None


def test_an_ongoing_alert_keeps_the_time_it_began() -> None:
    book = AlertBook()
    first = book.update(budget_alerts("n", 2.0, 1.0, None, "now"))[0].since
    time.sleep(0.01)
    again = book.update(budget_alerts("n", 3.0, 1.0, None, "now"))[0].since
    assert again == first
    assert book.update([]) == []
    time.sleep(0.01)
    assert book.update(budget_alerts("n", 2.0, 1.0, None, "now"))[0].since > first


def test_deployments_and_unallocated_add_up_to_the_burn() -> None:
    # $4/h owned node, PUE 1.5, $0.10/kWh, 400 W over the window; two deployments holding 0.3
    # and 0.5 of it, attributed 150 W and 200 W. The 50 W nobody was charged for is
    # unallocated electricity, and the hardware nobody holds (0.2) unallocated hardware.
    cost = cost_model(node_usd_per_hour=4.0, owned=True, pue=1.5, electricity_usd_per_kwh=0.10)
    a, b = deployment("a", []), deployment("b", [])
    acc = Accounting(cost, Totals(), {"a": a, "b": b}, 1, 3, 300)
    acc.shares = {"a": 0.3, "b": 0.5}
    acc.node_figures = Figures(window_s=300, watts=400.0)
    acc.figures = {"a": Figures(window_s=300, watts=150.0), "b": Figures(window_s=300, watts=200.0)}
    burn = acc.burn_usd_per_hour()
    assert burn == pytest.approx(4.0 + 0.4 * 1.5 * 0.10)  # $4.06/h
    assert acc.deployment_usd_per_hour("a") == pytest.approx(4.0 * 0.3 + 0.15 * 1.5 * 0.10)
    assert acc.deployment_usd_per_hour("b") == pytest.approx(4.0 * 0.5 + 0.20 * 1.5 * 0.10)
    assert acc.unallocated_usd_per_hour() == pytest.approx(4.0 * 0.2 + 0.05 * 1.5 * 0.10)
    total = sum(acc.deployment_usd_per_hour(n) for n in "ab") + acc.unallocated_usd_per_hour()
    assert total == pytest.approx(burn, rel=1e-12)


def test_a_starting_replica_counts_as_busy_for_its_own_deployment() -> None:
    # Loading weights draws power with no request in flight: the deployment whose replica
    # is starting gets that active energy, not the one that served for 10 ms meanwhile.
    cost = cost_model()
    loading, serving = deployment("loading", []), deployment("serving", [(1 * GIB, 2, 0.01)])
    starting = Replica(id="loading-0", precision="f16", url="", memory_bytes=GIB, threads=2)
    live = LiveReplica(starting, starting_since=time.monotonic() - 10.0)
    loading.replicas.append(live)
    acc = Accounting(cost, Totals(), {"loading": loading, "serving": serving}, 1, 3, 300)
    acc.on_interval(interval(joules=320.0, seconds=1.0))  # 20 J idle, 300 J active
    assert loading.totals.active_energy_j_total == pytest.approx(300.0 * 10 / 10.01, rel=1e-3)
    # Once ready, its start-up stays counted: busy time never runs backwards.
    before = live.busy_seconds(time.monotonic())
    live.set_state(ReplicaState.READY)
    assert live.busy_seconds(time.monotonic()) >= before


async def test_a_quantizing_deployment_counts_as_busy() -> None:
    cost = cost_model()
    building, serving = deployment("building", []), deployment("serving", [(1 * GIB, 2, 0.01)])
    done = asyncio.Event()

    async def prepare(precision: str) -> None:  # a variant build: seconds of CPU, no replica
        await done.wait()

    building.engine.prepare = prepare  # type: ignore[method-assign]
    building.engine.threads = 2
    acc = Accounting(cost, Totals(), {"building": building, "serving": serving}, 1, 3, 300)
    task = asyncio.create_task(building._prepare("q4_0"))
    await asyncio.sleep(0.5)
    acc.on_interval(interval(joules=320.0, seconds=1.0))
    done.set()
    await task
    # 0.5 s of building against 0.01 s of serving, both at 2 threads of 8 cores.
    assert building.totals.active_energy_j_total == pytest.approx(300.0 * 0.5 / 0.51, rel=0.05)
    assert building.preparing_seconds(time.monotonic()) >= 0.5
