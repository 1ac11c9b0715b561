"""Control actions on real replicas: scaling, parking and waking, precision switches, healing,
restarts, bad input, and the operator token."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import TOKEN, Agent, replica_pids, wait_for


def test_scale_one_two_zero_then_a_request_wakes_a_replica(agent: Agent) -> None:
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 2}).status_code == 202
    dep = agent.wait_converged("tiny")
    assert dep["ready_replicas"] == 2
    assert len({r["pid"] for r in dep["replicas"]}) == 2

    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 0}).status_code == 202
    dep = agent.wait_converged("tiny")
    assert dep["state"] == "parked"
    assert dep["replicas"] == []
    wait_for(lambda: not replica_pids(agent.state_dir), 15, "parked replicas to exit")

    # A request to a parked deployment waits for a cold start instead of failing.
    resp = agent.chat("wake up", temperature=0.2)
    assert resp.status_code == 200, resp.text
    dep = agent.deployment()
    assert dep["desired_replicas"] == 1
    assert dep["ready_replicas"] == 1


def test_idle_deployment_parks_itself(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(idle_scale_to_zero_s=1.5)
    wait_for(lambda: agent.deployment()["state"] == "parked", 30, "idle parking")
    assert agent.deployment()["desired_replicas"] == 0
    assert agent.chat("back again", temperature=0.2).status_code == 200


def test_precision_switch_under_load_drops_no_request(agent: Agent) -> None:
    old_pids = {r["pid"] for r in agent.deployment()["replicas"]}
    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []
    precisions_seen: set[str] = set()

    def client(n: int) -> None:
        import httpx

        with httpx.Client(base_url=agent.url, timeout=120) as c:
            while not stop.is_set():
                body = {
                    "model": "tiny",
                    "max_tokens": 4,
                    "temperature": 0.5,
                    "messages": [{"role": "user", "content": f"client {n} asks"}],
                }
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    results.append(resp.status_code)
                    if resp.status_code != 200:
                        errors.append(resp.text)
                except Exception as exc:  # a dropped connection is a failure too
                    errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 8, 60, "load to start")
        resp = agent.control("/v1/deployments/tiny/precision", {"precision": "q4_k_m"})
        assert resp.status_code == 202, resp.text
        wait_for(
            lambda: (
                precisions_seen.add(agent.deployment()["state"]) or "switching" in precisions_seen
            ),
            30,
            "the switch to start",
        )
        dep = agent.wait_converged("tiny", timeout=120)
        served_after = len(results)
        wait_for(lambda: len(results) >= served_after + 8, 60, "requests after the switch")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert errors == []
    assert dep["precision"] == "q4_k_m"
    assert {r["pid"] for r in dep["replicas"]}.isdisjoint(old_pids)
    assert all(pid not in replica_pids(agent.state_dir) for pid in old_pids)


def test_failed_switch_keeps_the_old_replicas_serving(
    make_agent: Callable[..., Agent], test_model: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.q4_0.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))  # a torn download: header then garbage
    agent = make_agent(files={"q4_0": str(broken)})
    pid_before = agent.deployment()["replicas"][0]["pid"]
    assert agent.control("/v1/deployments/tiny/precision", {"precision": "q4_0"}).status_code == 202
    dep = wait_for(lambda: (d := agent.deployment())["last_error"] and d, 60, "the switch to fail")
    assert "q4_0" in dep["last_error"]
    dep = agent.wait_converged("tiny")
    assert dep["precision"] == "q8_0"
    assert dep["desired_precision"] == "q8_0"
    assert dep["replicas"][0]["pid"] == pid_before
    assert agent.chat("still there?", temperature=0.3).status_code == 200


def test_kill_9_of_a_replica_is_healed(agent: Agent) -> None:
    pid = agent.deployment()["replicas"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    dep = wait_for(
        lambda: (
            (d := agent.deployment())["ready_replicas"] == 1
            and d["replicas"][0]["pid"] != pid
            and d
        ),
        60,
        "a replacement replica",
    )
    assert dep["replicas"][0]["restarts"] == 1
    assert "exited" in dep["last_error"]
    assert agent.chat("healed?", temperature=0.3).status_code == 200


def test_agent_restart_after_kill_9_restores_desired_state(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent()
    agent.control("/v1/deployments/tiny/scale", {"replicas": 2})
    agent.control("/v1/deployments/tiny/precision", {"precision": "q4_0"})
    dep = agent.wait_converged("tiny", timeout=120)
    assert (dep["precision"], dep["ready_replicas"]) == ("q4_0", 2)
    agent.chat("count me", temperature=0.3)
    requests_before = agent.deployment()["counters"]["requests_total"]
    time.sleep(5.5)  # one periodic counter save

    agent.stop(signal.SIGKILL)
    # The replicas die with their agent instead of leaking.
    wait_for(lambda: not replica_pids(agent.state_dir), 15, "replicas of the killed agent")

    agent.start()
    dep = agent.wait_converged("tiny", timeout=120)
    assert dep["desired_precision"] == "q4_0"
    assert dep["precision"] == "q4_0"
    assert dep["ready_replicas"] == 2
    assert dep["counters"]["requests_total"] == requests_before


def test_replica_left_by_a_killed_agent_is_stopped_on_start(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(start=False)
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    # A process carrying the replica marker, as a replica of a previous agent would.
    env = {**os.environ, "WATTOPS_REPLICA_OF": str(agent.state_dir.resolve())}
    orphan = subprocess.Popen(["sleep", "300"], env=env)
    try:
        agent.start()
        assert wait_for(lambda: orphan.poll() is not None, 10, "the orphan to be stopped")
        assert orphan.returncode == -signal.SIGKILL
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_bad_control_input_gets_4xx_and_changes_nothing(agent: Agent) -> None:
    before = agent.deployment()

    def unchanged() -> None:
        now = agent.deployment()
        for key in ("desired_replicas", "desired_precision", "precision", "ready_replicas"):
            assert now[key] == before[key], key

    resp = agent.control("/v1/deployments/ghost/scale", {"replicas": 1})
    assert resp.status_code == 404
    assert resp.json()["allowed"] == ["tiny"]

    resp = agent.control("/v1/deployments/tiny/scale", {"replicas": 4})
    assert resp.status_code == 422
    assert "0..3" in resp.json()["message"]

    resp = agent.control("/v1/deployments/tiny/scale", {"replicas": -1})
    assert resp.status_code == 422
    assert "replicas" in resp.json()["message"]

    resp = agent.control("/v1/deployments/tiny/scale", {"replicas": "two"})
    assert resp.status_code == 422

    resp = agent.control("/v1/deployments/tiny/precision", {"precision": "q9_9"})
    assert resp.status_code == 422
    body = resp.json()
    assert "q4_k_m" in body["allowed"] and "q8_0" in body["allowed"]
    assert "q9_9" in body["message"]

    resp = agent.control("/v1/deployments/tiny/precision", {"precison": "q4_0"})
    assert resp.status_code == 422
    assert "precision" in resp.json()["message"]

    resp = agent.client.post(
        "/v1/deployments/tiny/scale",
        content=b"{replicas: 2",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status_code == 400
    assert resp.json()["error"] == "invalid_json"
    unchanged()


def test_control_without_the_token_is_refused(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(token=TOKEN)
    resp = agent.control("/v1/deployments/tiny/scale", {"replicas": 0}, token=None)
    assert resp.status_code == 401
    assert resp.headers["www-authenticate"] == "Bearer"
    resp = agent.control("/v1/deployments/tiny/scale", {"replicas": 0}, token="wrong")
    assert resp.status_code == 403
    assert agent.deployment()["desired_replicas"] == 1
    # Reads and inference stay open.
    assert agent.client.get("/v1/node").status_code == 200
    assert agent.chat("open", temperature=0.2).status_code == 200
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 0}).status_code == 202


def test_a_request_to_a_dead_replica_is_retried_on_another(
    make_agent: Callable[..., Agent],
) -> None:
    # A slow health check, so the supervisor has not noticed the death when requests arrive.
    agent = make_agent(replicas=2, agent_extra={"health_interval_s": 30})
    victim = agent.deployment()["replicas"][0]["pid"]
    victim_id = agent.deployment()["replicas"][0]["id"]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in replica_pids(agent.state_dir), 10, "the replica to die")
    codes = [agent.chat(f"retry {i}", temperature=0.4).status_code for i in range(6)]
    assert codes == [200] * 6
    dep = agent.deployment()
    assert dep["counters"]["requests_total"] == 6  # a retried request is counted once
    assert dep["counters"]["errors_total"] == 0
    # The failed attempt made the supervisor look at once, not at its next 30 s check (it
    # reports the exit, or failed health checks if it looks before the exit is reaped).
    assert victim_id in wait_for(lambda: agent.deployment()["last_error"], 5, "the crash report")


def test_a_hung_replica_is_killed_and_replaced(agent: Agent) -> None:
    pid = agent.deployment()["replicas"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)  # alive but answering nothing, as a wedged engine would be
    try:
        dep = wait_for(
            lambda: (
                (d := agent.deployment())["ready_replicas"] == 1
                and d["replicas"][0]["pid"] != pid
                and d
            ),
            60,
            "a replacement for the hung replica",
        )
        assert "health checks" in dep["last_error"]
        # A stopped process ignores SIGTERM: only the agent's escalation to SIGKILL ends it.
        # Checked before the clean-up below, which would kill it otherwise.
        wait_for(lambda: pid not in replica_pids(agent.state_dir), 30, "the hung replica to go")
    finally:
        if pid in replica_pids(agent.state_dir):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_replicas_and_saves_the_last_counters(agent: Agent) -> None:
    assert agent.chat("count me before the shutdown").status_code == 200
    counters = agent.deployment()["counters"]
    agent.stop()  # SIGTERM at once: often sooner than the periodic save (every second)
    assert agent.proc is not None and agent.proc.returncode == 0, agent.log_tail()
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["deployments"]["tiny"]["counters"]["requests_total"] == counters["requests_total"]
    assert not replica_pids(agent.state_dir)


def test_a_busy_replica_that_makes_no_progress_is_hung(make_agent: Callable[..., Agent]) -> None:
    # Its health path answers, so health checks alone would keep it (and a scale-down, which
    # retires the least busy first, would keep it too): no token counted while a request is
    # in flight is what tells a wedged replica from a busy one.
    stand_in = str(Path(__file__).with_name("stuck_engine.py"))
    agent = make_agent(deployments=[{
        "name": "stuck", "engine": "openai", "precision": "f16",
        "command": [sys.executable, stand_in, "--port", "{port}"],
        "no_progress_timeout_s": 2.0, "startup_timeout_s": 30,
    }])  # fmt: skip
    first = agent.deployment("stuck")["replicas"][0]["id"]
    body = {"model": "stuck", "messages": [{"role": "user", "content": "hello?"}]}
    with contextlib.suppress(httpx.TimeoutException):
        agent.client.post("/v1/chat/completions", json=body, timeout=1.0)
    dep = wait_for(lambda: (d := agent.deployment("stuck"))["last_error"] and d, 30,
                   "the hung replica to be noticed")  # fmt: skip
    assert "made no progress" in dep["last_error"] and "hung" in dep["last_error"]
    wait_for(lambda: (d := agent.deployment("stuck"))["ready_replicas"] == 1
             and d["replicas"][0]["id"] != first, 60, "a replacement")  # fmt: skip


def test_a_busy_replica_that_makes_progress_is_left_alone(make_agent: Callable[..., Agent]) -> None:
    # The other side: a long answer takes many times no_progress_timeout_s, but its tokens
    # keep counting, so the replica is busy, not hung.
    agent = make_agent(context=4096, no_progress_timeout_s=0.5)
    first = agent.deployment()["replicas"][0]["id"]
    answer = agent.chat("a long one", max_tokens=3000, temperature=0.6)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3000
    dep = agent.deployment()
    assert dep["last_error"] is None and dep["replicas"][0]["id"] == first
