"""Load-based autoscaling: HPA's rule on requests in flight, then a real agent following load."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
import pytest

from tests.conftest import Agent, wait_for
from wattops.agents.autoscale import Autoscaler


def _hold(scaler: Autoscaler, level: int, start: float, end: float, step: float = 1.0) -> int:
    """Keep `level` requests in flight from `start` to `end`, ticking each `step`; return the
    last recommendation (for the replica count it recommended along the way)."""
    scaler.add(start, level)
    current = 1
    t = start
    while t < end:
        t += step
        current = scaler.recommend(t, current)
    scaler.add(end, -level)
    return current


def test_mean_in_flight_is_integrated_over_time_not_sampled() -> None:
    scaler = Autoscaler(target_in_flight=1.0, min_replicas=1, max_replicas=8, window_s=10)
    scaler.load(0.0)
    # Three requests in flight for 0.5 s between two ticks: a sampler at the ticks sees none.
    scaler.add(0.2, 3)
    scaler.add(0.7, -3)
    assert scaler.load(1.0) == pytest.approx(1.5)


def test_scales_up_at_once_to_ceil_of_load_over_target() -> None:
    scaler = Autoscaler(target_in_flight=2.0, min_replicas=1, max_replicas=8, window_s=5)
    scaler.load(0.0)
    scaler.add(0.0, 7)
    assert scaler.recommend(5.0, 1) == 4  # ceil(7 / 2)


def test_caps_at_max_replicas_and_keeps_min_replicas() -> None:
    scaler = Autoscaler(target_in_flight=1.0, min_replicas=2, max_replicas=3, window_s=5)
    scaler.load(0.0)
    scaler.add(0.0, 10)
    assert scaler.recommend(5.0, 2) == 3
    scaler.add(5.0, -10)
    idle = Autoscaler(target_in_flight=1.0, min_replicas=2, max_replicas=3, stabilization_s=0)
    idle.load(0.0)
    assert idle.recommend(20.0, 3) == 2


def test_within_tolerance_nothing_changes() -> None:
    scaler = Autoscaler(target_in_flight=1.0, min_replicas=1, max_replicas=8, window_s=10)
    scaler.load(0.0)
    scaler.add(0.0, 2)
    scaler.add(5.0, 1)  # mean 2.5 in flight on 2 replicas: ratio 1.25, scale
    assert scaler.recommend(10.0, 2) == 3
    steady = Autoscaler(target_in_flight=1.0, min_replicas=1, max_replicas=8, window_s=10)
    steady.load(0.0)
    steady.add(0.0, 2)
    steady.add(5.0, 0)
    steady.add(9.0, 1)  # 2.1 on 2 replicas: within HPA's 10% tolerance
    assert steady.recommend(10.0, 2) == 2


def test_scale_down_waits_for_the_stabilization_window() -> None:
    scaler = Autoscaler(
        target_in_flight=1.0, min_replicas=1, max_replicas=4, window_s=2, stabilization_s=10
    )
    scaler.load(0.0)
    assert _hold(scaler, 4, 0.0, 4.0) == 4
    current = 4
    seen = []
    for t in range(5, 20):
        current = scaler.recommend(float(t), current)
        seen.append((t, current))
    # The load fell at t=4; recommendations of 4 stay in the 10 s window until t=14-ish.
    assert all(c == 4 for t, c in seen if t <= 12)
    assert seen[-1][1] == 1


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="target_in_flight"):
        Autoscaler(target_in_flight=0, min_replicas=1, max_replicas=2)
    with pytest.raises(ValueError, match="min_replicas"):
        Autoscaler(target_in_flight=1, min_replicas=3, max_replicas=2)


def test_agent_scales_out_under_load_and_back_in(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(
        replicas=1,
        max_replicas=2,
        autoscale_target_in_flight=1.0,
        autoscale_stabilization_s=2.0,
    )
    assert agent.deployment()["autoscale_target_in_flight"] == 1.0
    stop = threading.Event()
    statuses: list[int] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as http:
            while not stop.is_set():
                body = {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": f"load {n} keeps coming"}],
                    "max_tokens": 32,
                    "temperature": 0.9,  # not cacheable: every request reaches a replica
                }
                statuses.append(http.post("/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: agent.deployment()["desired_replicas"] == 2, 60, "scale out to 2")
        # Not only asked for: the second replica starts and takes traffic.
        dep = wait_for(lambda: (d := agent.deployment())["ready_replicas"] == 2 and d, 60,
                       "a second ready replica")  # fmt: skip
        wait_for(lambda: all(r["in_flight"] > 0 for r in agent.deployment()["replicas"]), 30,
                 "both replicas serving")  # fmt: skip
        assert len(dep["replicas"]) == 2
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    # Scaling out and back in drops no request.
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    wait_for(lambda: agent.deployment()["desired_replicas"] == 1, 60, "scale back in to 1")
    agent.wait_converged()


def test_a_replica_still_loading_is_never_the_one_a_scale_down_stops(
    make_agent: Callable[..., Agent],
) -> None:
    """Scaled to 2 and at once back to 1, while the second replica loads: it is not stopped
    half-loaded; it comes up ready, and only then is one ready replica retired."""
    agent = make_agent(replicas=1, max_replicas=2)
    first = agent.deployment()["replicas"][0]["id"]
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 2}).status_code == 202
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 1}).status_code == 202
    seen: set[tuple[str, str]] = set()

    def settled() -> bool:
        dep = agent.deployment()
        seen.update((r["id"], r["state"]) for r in dep["replicas"])
        return (
            dep["desired_replicas"] == 1
            and len(dep["replicas"]) == 1
            and any(state == "ready" and rid != first for rid, state in seen)
        )

    wait_for(settled, 60, "the second replica up, then one replica")
    assert agent.deployment()["replicas"][0]["state"] == "ready"
