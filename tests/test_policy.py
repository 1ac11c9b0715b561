"""Policies that keep a node inside its limits (agents/policy.py): the plan's arithmetic on its
own, then a real agent (llama.cpp on the test model) advising without changing anything,
acting, pausable, and steady under steady load."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Agent, wait_for
from wattops.agents.policy import DeploymentView, plan

WATTOPS = Path(sys.executable).with_name("wattops")


def view(name: str = "chat", **over: Any) -> DeploymentView:
    base: dict[str, Any] = dict(
        name=name, replicas=2, idle_s=5.0, utilisation=0.5, p95_s=0.5, slo_p95_s=None,
        usd_per_hour=1.0, precision="q8_0", smaller=("q5_k_m", "q4_k_m"), busy=False,
        since_action_s=None,
    )  # fmt: skip
    base.update(over)
    return DeploymentView(**base)


def steps_of(views: list[DeploymentView], burn: float, limit: float = 1.0,
             **kw: Any) -> tuple[list[str], list[tuple[str, str, object]]]:  # fmt: skip
    args: dict[str, Any] = dict(watts=None, max_usd_per_hour=limit, max_watts=None,
                                hysteresis=0.05, park_idle_s=600, dwell_s=300,
                                switch_precision=True)  # fmt: skip
    args.update(kw)
    over, steps = plan(views, burn, **args)
    return over, [(s.deployment, s.action, s.target) for s in steps]


def test_nothing_is_planned_inside_the_limits_or_within_the_hysteresis() -> None:
    assert steps_of([view(idle_s=9999)], burn=0.9) == ([], [])
    assert steps_of([view(idle_s=9999)], burn=1.04) == ([], [])  # +4% < 5%
    over, steps = steps_of([view(idle_s=9999)], burn=1.5)
    assert over == ["burn $1.5000/h > max_usd_per_hour $1.0000/h (+50%)"]
    assert steps == [("chat", "park", 0)]


def test_the_cheapest_steps_first_and_only_as_many_as_needed() -> None:
    idle = view("idle", idle_s=3600, usd_per_hour=0.3)
    quiet = view("quiet", replicas=3, utilisation=0.2, usd_per_hour=0.9)
    busy = view("busy", replicas=2, utilisation=0.4, usd_per_hour=0.8)
    # 0.3 over: parking the idle one covers it; nothing else is touched.
    assert steps_of([busy, quiet, idle], burn=1.3)[1] == [("idle", "park", 0)]
    # 0.6 over: then one replica of `quiet` (3 at 20%: 2 would be 30% busy), saving 0.3.
    # `busy` stays: 2 at 40% would be 1 at 80%, over half busy.
    assert steps_of([busy, quiet, idle], burn=1.6)[1] == [("idle", "park", 0),
                                                          ("quiet", "scale", 2)]  # fmt: skip
    # 2.0 over: still not covered, so a smaller precision is tried (one canary, the dearest).
    assert steps_of([busy, quiet, idle], burn=3.0)[1] == [
        ("idle", "park", 0), ("quiet", "scale", 2), ("busy", "canary", "q5_k_m")
    ]  # fmt: skip
    assert ("busy", "canary", "q5_k_m") not in steps_of(
        [busy, quiet, idle], burn=3.0, switch_precision=False)[1]  # fmt: skip


def test_a_deployment_acted_on_is_left_alone_for_the_dwell_time() -> None:
    recent = view(idle_s=3600, since_action_s=60)
    assert steps_of([recent], burn=2.0)[1] == []
    assert steps_of([view(idle_s=3600, since_action_s=301)], burn=2.0)[1] == [("chat", "park", 0)]
    # A latency SLO blocks a scale-down while p95 is above half of it.
    slow = view(replicas=3, utilisation=0.1, p95_s=0.8, slo_p95_s=1.0, smaller=())
    assert steps_of([slow], burn=2.0)[1] == []


@contextmanager
def steady(agent: Agent, pause_s: float) -> Iterator[None]:
    """A light steady load while the block runs: one short request, a pause, again."""
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=agent.url, timeout=60) as c:
            while not stop.is_set():
                body = {"model": "tiny", "max_tokens": 2, "temperature": 0.5,
                        "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
                c.post("/v1/chat/completions", json=body)
                time.sleep(pause_s)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join(60)


def policy_agent(make_agent: Callable[..., Agent], mode: str, **policy: Any) -> Agent:
    settings = {"mode": mode, "max_usd_per_hour": 1e-6, "park_idle_s": 1.0, "interval_s": 0.5,
                "dwell_s": 2.0, "switch_precision": False, **policy}  # fmt: skip
    return make_agent(tables={"policy": settings})


def test_advise_says_what_it_would_do_and_changes_nothing(make_agent: Callable[..., Agent]) -> None:
    agent = policy_agent(make_agent, "advise")
    node = wait_for(lambda: (n := agent.node())["policy"]["plan"] and n, 30, "a plan")
    p = node["policy"]
    assert p["mode"] == "advise" and p["over"][0].startswith("burn $")
    step = p["plan"][0]
    assert step["action"] == "park" and step["deployment"] == "tiny"
    assert "idle" in step["reason"] and "a request wakes it" in step["reason"]
    time.sleep(2.0)
    dep = agent.deployment()
    assert dep["desired_replicas"] == 1 and dep["ready_replicas"] == 1
    assert agent.node()["policy"]["actions"] == []


def test_act_parks_within_its_bounds_and_can_be_paused(make_agent: Callable[..., Agent]) -> None:
    agent = policy_agent(make_agent, "act")
    wait_for(lambda: agent.deployment()["state"] == "parked", 30, "the policy to park it")
    actions = agent.node()["policy"]["actions"]
    assert [(a["action"], a["deployment"], a["outcome"]) for a in actions] == [
        ("park", "tiny", "accepted")
    ]
    audit = (agent.state_dir / "audit.jsonl").read_text()
    assert '"who":"policy"' in audit and '"action":"park"' in audit
    # Paused, it keeps saying what it would do and does nothing.
    paused = agent.control("/v1/policy", {"paused": True})
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert agent.chat("wake up", temperature=0.5).status_code == 200  # a request wakes it
    time.sleep(4.0)  # past park_idle_s and the dwell time, several looks
    node = agent.node()
    assert node["deployments"][0]["desired_replicas"] == 1
    assert len(node["policy"]["actions"]) == 1 and node["policy"]["plan"]
    assert agent.control("/v1/policy", {"paused": "yes"}).status_code == 422  # strict body
    # The CLI shows it and resumes it.
    shown = subprocess.run([str(WATTOPS), "status", "--agent", agent.url], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert "policy (act, paused) on test-node-0: burn $" in shown.stdout
    assert "would park tiny -> 0: idle" in shown.stdout and "last: park tiny -> 0 (accepted)" in (
        shown.stdout
    )
    resumed = subprocess.run([str(WATTOPS), "policy", "resume", "--agent", agent.url],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert resumed.returncode == 0 and "policy (act) acting" in resumed.stdout
    wait_for(lambda: agent.deployment()["state"] == "parked", 30, "parked again once resumed")


def test_steady_load_gets_one_step_not_a_flap(make_agent: Callable[..., Agent]) -> None:
    agent = policy_agent(make_agent, "act", park_idle_s=3600.0)
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 2}).status_code == 202
    wait_for(lambda: agent.deployment()["ready_replicas"] == 2, 60, "two replicas")
    with steady(agent, 0.3):
        wait_for(lambda: agent.deployment()["desired_replicas"] == 1, 30, "one replica fewer")
        time.sleep(6.0)  # three dwell times, a dozen looks, the same steady load
        actions = agent.node()["policy"]["actions"]
    assert [(a["action"], a["target"]) for a in actions] == [("scale", 1)]
    assert "would be" in actions[0]["reason"] and "at most 50%" in actions[0]["reason"]
    assert agent.deployment()["desired_replicas"] == 1


def test_act_switches_precision_through_a_canary_when_parking_and_scaling_cannot(
    make_agent: Callable[..., Agent],
) -> None:
    """One busy replica, far over its limit: nothing to park or scale down, so the policy tries
    the next smaller precision as a canary with the policy's accuracy guard."""
    agent = policy_agent(make_agent, "act", park_idle_s=3600.0, switch_precision=True,
                         max_accuracy_drop=4.0)  # fmt: skip
    with steady(agent, 0.2):
        canary = wait_for(lambda: agent.deployment()["canary"], 60, "the policy's canary")
        actions = agent.node()["policy"]["actions"]
        assert [(a["action"], a["outcome"]) for a in actions] == [("canary", "accepted")]
        assert canary["precision"] == actions[0]["target"] != "q8_0"
        assert canary["guards"]["max_accuracy_drop"] == 4.0  # the policy's floor
        assert "as a canary" in actions[0]["reason"]
        assert agent.client.delete("/v1/deployments/tiny/canary").status_code == 202
        wait_for(lambda: agent.deployment()["canary"]["state"] == "rolled_back", 60,
                 "the canary rolled back")  # fmt: skip
    assert agent.deployment()["precision"] == "q8_0"


async def test_the_console_pauses_and_resumes_a_policy(make_agent: Callable[..., Agent]) -> None:
    """`x` in the node view pauses the node's policy and resumes it; a read-only console does
    not offer the key and sends nothing."""
    from tests.test_console import SIZE, serving, until
    from wattops.console.app import make_app
    from wattops.console.screens.node import NodeScreen

    agent = policy_agent(make_agent, "advise", max_usd_per_hour=1000.0)  # advise: changes nothing

    def paused() -> bool:
        return bool(agent.node()["policy"]["paused"])

    for read_only in (True, False):
        app = make_app([agent.url], read_only=read_only, refresh_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda app=app: serving(app), 30, "the first snapshot")
            await pilot.press("enter")
            await until(pilot, lambda app=app: isinstance(app.screen, NodeScreen), 10,
                        "the node view")  # fmt: skip
            offered = app.screen.check_action("toggle_policy", ())
            await pilot.press("x")
            await pilot.pause(1.0)
            if read_only:
                assert offered is False and not paused()
                continue
            assert offered is True
            await until(pilot, paused, 10, "the policy paused")
            audit = (agent.state_dir / "audit.jsonl").read_text()
            assert '"path":"/v1/policy"' in audit and '"paused":true' in audit
            await pilot.press("x")
            await until(pilot, lambda: not paused(), 10, "the policy acting again")


def test_a_deployment_that_opts_out_is_left_alone(make_agent: Callable[..., Agent],
                                                 test_model: Path) -> None:  # fmt: skip
    """Two idle deployments far over the node's limit: only the one without `policy = false`
    is parked; the other keeps running and its cost still counts in the burn."""
    base = {"engine": "llamacpp", "model": str(test_model), "precision": "q8_0", "replicas": 1,
            "max_replicas": 1, "threads": 1, "context": 512}  # fmt: skip
    agent = make_agent(
        deployments=[{**base, "name": "tiny"}, {**base, "name": "kept", "policy": False}],
        tables={"policy": {"mode": "act", "max_usd_per_hour": 1e-6, "park_idle_s": 1.0,
                           "interval_s": 0.5, "dwell_s": 2.0, "switch_precision": False}},
    )  # fmt: skip
    wait_for(lambda: agent.deployment("tiny")["state"] == "parked", 30, "tiny parked")
    time.sleep(2.0)  # several more looks, still over the limit
    assert agent.deployment("kept")["desired_replicas"] == 1
    acted = {a["deployment"] for a in agent.node()["policy"]["actions"]}
    assert acted == {"tiny"}


def test_the_cli_says_why_a_node_without_a_policy_cannot_be_paused(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent()  # no [policy]
    refused = subprocess.run([str(WATTOPS), "policy", "pause", "--agent", agent.url],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1
    assert "answered 409: this node has no [policy] (mode = off)" in refused.stderr
