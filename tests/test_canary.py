"""Canary precision switches on a real agent with real llama.cpp replicas (the test model,
q8_0 serving, q4_k_m the candidate): a verdict with its figures under load, a guard that fails
rolls back with no failed request, too little traffic is inconclusive, and bad requests are
refused naming what is wrong."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Agent, wait_for
from wattops.agents.api import CanaryGuards
from wattops.agents.canary import Canary, shadow_body

WATTOPS = Path(sys.executable).with_name("wattops")
#: Guards that pass on the random test model: both sides answer the labelled probes wrong
#: (word salad), so the drop is about 0; its KL is far above a real model's.
LOOSE = {"max_accuracy_drop": 100.0, "probes": 10, "max_kl": None, "max_p95_change": None,
         "max_j_per_token_change": None}  # fmt: skip


@contextmanager
def load(agent: Agent, clients: int = 3) -> Iterator[tuple[list[int], list[str]]]:
    """`clients` threads sending sampled (never cached) chat requests until the block ends,
    the first client streamed: (status codes, failures)."""
    stop = threading.Event()
    codes: list[int] = []
    failures: list[str] = []

    def client(n: int) -> None:
        with httpx.Client(base_url=agent.url, timeout=120) as c:
            i = 0
            while not stop.is_set():
                i += 1
                ask = [{"role": "user", "content": f"client {n} question {i}"}]
                body = {"model": "tiny", "max_tokens": 6, "temperature": 0.8, "messages": ask,
                        "stream": n == 0}  # fmt: skip
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    codes.append(resp.status_code)
                    if resp.status_code != 200:
                        failures.append(resp.text)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(codes) >= clients, 60, "load to start")
        yield codes, failures
    finally:
        stop.set()
        for t in threads:
            t.join(120)


def canary(agent: Agent, precision: str = "q4_k_m", **spec: Any) -> httpx.Response:
    return agent.control("/v1/deployments/tiny/precision",
                         {"precision": precision, "canary": spec})  # fmt: skip


def ended(agent: Agent, timeout: float = 120) -> dict[str, Any]:
    """The deployment once its canary has a verdict and the fleet has settled."""
    wait_for(lambda: (c := agent.deployment()["canary"]) and c["verdict"], timeout,
             "the canary's verdict")  # fmt: skip
    return agent.wait_converged("tiny")


def test_a_canary_under_load_is_promoted_with_its_figures(agent: Agent) -> None:
    with load(agent) as (_, failures):
        resp = canary(agent, share=0.3, duration_s=10, guards={**LOOSE, "min_pairs": 3})
        assert resp.status_code == 202, resp.text
        assert resp.json()["action"] == "canary"
        running = wait_for(lambda: (c := agent.deployment()["canary"])["state"] == "running"
                           and c, 60, "the candidate to take traffic")  # fmt: skip
        assert running["precision"] == "q4_k_m" and running["share"] == 0.3
        dep = ended(agent)
    assert failures == []  # no request failed, through the canary and the promotion
    c = dep["canary"]
    assert c["state"] == "promoted" and c["verdict"].startswith("promoted: ")
    assert dep["precision"] == "q4_k_m" and dep["ready_replicas"] == 1
    # Every figure, for both sides of the same window on the same node.
    assert c["pairs"] >= 3 and 0.0 <= c["agreement"] <= 1.0 and 0.0 <= c["chrf"] <= 100.0
    for side in (c["serving"], c["candidate"]):
        assert side["requests"] > 0 and side["tokens"] > 0 and side["busy_s"] > 0
        assert side["j_per_token"] > 0 and side["usd_per_1m_tokens"] > 0
        assert side["latency_p95_s"] >= side["latency_p50_s"] > 0
        if side["streamed"]:  # time to first token, from the streamed live requests
            assert side["ttft_p95_s"] >= side["ttft_p50_s"] > 0
    assert c["serving"]["streamed"] + c["candidate"]["streamed"] > 0
    # Teacher-forced KL over the shadowed pairs' shared greedy prefixes: q4_k_m is not q8_0.
    assert c["kl_mean"] > 0
    assert "shadowed pairs" in c["verdict"]
    # The labelled probes: every one answered by both sides, scored, with the paired interval.
    assert c["probes"] == c["probes_planned"] == 10
    assert 0 <= c["accuracy_serving"] <= 1 and 0 <= c["accuracy_candidate"] <= 1
    assert c["accuracy_drop_low"] <= c["accuracy_drop"] <= c["accuracy_drop_high"]
    assert "accuracy drop " in c["verdict"] and "(10 probes: " in c["verdict"]
    assert c["kl_tokens"] >= c["pairs"] + 10  # probes add their shared prefixes to the KL
    assert (c["serving"]["precision"], c["candidate"]["precision"]) == ("q8_0", "q4_k_m")
    # About the share asked: 30% of live requests (the shadows are not live requests), and
    # about a quarter of the answered requests shadowed (the default `shadow_share`).
    answered = c["candidate"]["requests"] + c["serving"]["requests"]
    assert 0 < c["pairs"] <= 0.3 * answered, c
    share = c["candidate"]["requests"] / (c["candidate"]["requests"] + c["serving"]["requests"])
    assert 0.2 <= share <= 0.4, c
    assert c["j_per_token_change"] == pytest.approx(
        c["candidate"]["j_per_token"] / c["serving"]["j_per_token"] - 1
    )
    metrics = agent.client.get("/metrics").text.splitlines()
    pairs = next(x for x in metrics if x.startswith("wattops_canary_pairs{"))
    assert 'deployment="tiny"' in pairs and 'precision="q4_k_m"' in pairs
    assert float(pairs.split()[-1]) == c["pairs"]
    assert any(x.startswith("wattops_canary_state{") and 'state="promoted"' in x for x in metrics)


def test_a_candidate_failing_a_guard_is_rolled_back_with_no_failed_request(
    agent: Agent,
) -> None:
    pid = agent.deployment()["replicas"][0]["pid"]
    with load(agent) as (codes, failures):
        # Random weights: q4_k_m's greedy answers differ from q8_0's, so full agreement fails.
        # Through the CLI, as an operator would, following it to the verdict.
        done = subprocess.run(
            [str(WATTOPS), "precision", "tiny", "q4_k_m", "--agent", agent.url, "--canary", "30%",
             "--for", "10s", "--guard", "min_agreement=1", "--guard", "min_pairs=3",
             "--guard", "max_p95_change=none", "--guard", "max_j_per_token_change=none",
             "--guard", "probes=0", "--guard", "max_kl=none"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        dep = ended(agent)
        served = len(codes)
        wait_for(lambda: len(codes) > served + 3, 60, "requests after the rollback")
    assert failures == []
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "canary of q4_k_m on 30% of tiny's traffic for 10 s accepted" in done.stdout
    assert "canary q4_k_m 30% 0:" in done.stdout  # progress while it ran
    assert "canary q4_k_m: rolled back: agreement" in done.stderr
    c = dep["canary"]
    assert c["state"] == "rolled_back" and "agreement" in c["verdict"], c["verdict"]
    assert c["agreement"] < 1.0
    assert dep["precision"] == "q8_0" and dep["desired_precision"] == "q8_0"
    assert [r["pid"] for r in dep["replicas"]] == [pid]  # the candidate is gone, nothing else


def test_too_little_traffic_is_inconclusive_never_a_silent_promote(agent: Agent) -> None:
    # Only the guards that need traffic (a guard with evidence that fails would roll back).
    quiet = {"min_pairs": 50, "probes": 0, "max_kl": None, "max_j_per_token_change": None}
    assert canary(agent, share=0.5, duration_s=5, guards=quiet).status_code == 202
    wait_for(lambda: agent.deployment()["canary"]["state"] == "running", 60, "the canary")
    for i in range(4):
        assert agent.chat(f"a quiet moment {i}", temperature=0.5).status_code == 200
    dep = ended(agent)
    c = dep["canary"]
    assert c["state"] == "inconclusive", c["verdict"]
    assert c["verdict"].startswith(f"inconclusive: {c['pairs']} shadowed pairs, need 50")
    assert dep["precision"] == "q8_0"


def test_canary_requests_are_checked_and_a_canary_can_be_aborted(agent: Agent) -> None:
    bad = canary(agent, share=1.5)
    assert bad.status_code == 422 and "share" in bad.text
    for argv, said in ((["--canary", "150%"], "between 0 and 100%"),
                       (["--canary", "10%", "--for", "5 minutes"], "a duration such as"),
                       (["--canary", "10%", "--guard", "min_agree=1"], "NAME one of"),
                       (["--guard", "min_pairs=3"], "--guard goes with --canary")):  # fmt: skip
        cli = subprocess.run([str(WATTOPS), "precision", "tiny", "q4_k_m", "--agent", agent.url,
                              *argv], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert cli.returncode == 2 and said in cli.stderr, (argv, cli.stderr)
    typo = canary(agent, share=0.1, guards={"min_agreemnt": 0.9})
    assert typo.status_code == 422 and "min_agreemnt" in typo.text
    same = canary(agent, precision="q8_0")
    assert same.status_code == 409 and "already serves q8_0" in same.text
    assert canary(agent, share=0.2, duration_s=600).status_code == 202
    again = canary(agent, share=0.2)
    assert again.status_code == 409 and "a canary of q4_k_m is running" in again.text
    switch = agent.control("/v1/deployments/tiny/precision", {"precision": "q4_0"})
    assert switch.status_code == 409 and "canary" in switch.text
    park = agent.control("/v1/deployments/tiny/scale", {"replicas": 0})
    assert park.status_code == 409 and "before parking" in park.text
    wait_for(lambda: agent.deployment()["canary"]["state"] == "running", 60, "the canary")
    headers = {"Authorization": f"Bearer {agent.token}"} if agent.token else {}
    assert agent.client.delete("/v1/deployments/tiny/canary", headers=headers).status_code == 202
    dep = ended(agent)
    assert dep["canary"]["verdict"] == "rolled back: aborted by the operator"
    assert dep["precision"] == "q8_0" and len(dep["replicas"]) == 1
    assert agent.client.delete("/v1/deployments/tiny/canary", headers=headers).status_code == 404


def test_parked_deployments_get_no_canary(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(replicas=0)
    refused = canary(agent, share=0.1)
    assert refused.status_code == 409 and "no ready replica" in refused.text


def test_the_decision_follows_the_guards() -> None:
    """The verdict's arithmetic on its own: each guard with its figure (and interval), and
    inconclusive before any of them."""
    from wattops.agents.api import CanaryRequest, CanarySide, CanaryStatus

    def figures(**over: Any) -> CanaryStatus:
        side = {"requests": 40, "errors": 0, "tokens": 400, "busy_s": 4.0}
        base: dict[str, Any] = dict(
            precision="q4_k_m", share=0.1, duration_s=60, started_at=0, elapsed_s=60,
            guards=CanaryGuards(), state="running",
            serving=CanarySide(precision="q8_0", j_per_token=1.0, latency_p95_s=1.0, **side),
            candidate=CanarySide(precision="q4_k_m", j_per_token=0.7, latency_p95_s=1.05,
                                 **side),
            pairs=60, agreement=0.35, chrf=60.0, j_per_token_change=-0.3, p95_change=0.05,
            kl_mean=0.02, kl_tokens=900, probes=200, probes_planned=200,
            accuracy_serving=0.40, accuracy_candidate=0.395, accuracy_drop=0.5,
            accuracy_drop_low=-2.1, accuracy_drop_high=3.1,
        )  # fmt: skip
        base.update(over)
        return CanaryStatus(**base)

    c = Canary("q8_0", "q4_k_m", CanaryRequest(), None)
    assert len(c.probe_items) == 200  # the default
    # Agreement with the serving side's wording (35%) is reported, not guarded, by default.
    assert c.decide(figures()) == ("promoted", (
        "promoted: accuracy drop 0.5 [-2.1, 3.1] points <= 1.5 (200 probes: 40.0% -> 39.5%); "
        "KL 0.0200 <= 0.1 nats/token (900 tokens); p95 +5.0% <= +10.0% (1.050 s vs 1.000 s); "
        "J/token -30.0% <= +0.0% (0.7 J vs 1 J); 60 shadowed pairs; same answer 35.0% "
        "(consistency, not guarded)"))  # fmt: skip
    state, why = c.decide(figures(accuracy_drop=6.0, accuracy_drop_low=2.5,
                                  accuracy_drop_high=9.5, accuracy_candidate=0.34))  # fmt: skip
    assert state == "rolled_back"
    assert why.startswith("rolled back: accuracy drop 6.0 [2.5, 9.5] points > 1.5 (200 probes: "
                          "40.0% -> 34.0%); held: KL 0.0200 <= 0.1")  # fmt: skip
    state, why = c.decide(figures(kl_mean=0.3))
    assert state == "rolled_back" and "KL 0.3000 > 0.1 nats/token (900 tokens)" in why
    state, why = c.decide(figures(p95_change=0.2))
    assert state == "rolled_back" and "p95 +20.0% > +10.0%" in why
    state, why = c.decide(figures(j_per_token_change=0.01))
    assert state == "rolled_back" and "J/token +1.0% > +0.0%" in why
    # Non-inferiority on the interval: 3.1 is over 1.5 though the point estimate is not.
    strict = Canary("q8_0", "q4_k_m", CanaryRequest(guards=CanaryGuards(
        accuracy_verdict="bound")), None)  # fmt: skip
    state, why = strict.decide(figures())
    assert state == "rolled_back" and "3.1] points (upper bound) > 1.5" in why
    # min_agreement, when asked for, guards the wording.
    worded = Canary("q8_0", "q4_k_m", CanaryRequest(guards=CanaryGuards(min_agreement=0.9)), None)
    state, why = worded.decide(figures())
    assert state == "rolled_back" and "agreement 35.0% < 90.0% (60 pairs, chrF 60.0)" in why
    state, why = c.decide(figures(pairs=12))
    assert (state, why) == ("inconclusive", "inconclusive: 12 shadowed pairs, need 50; rolled back")
    # A guard with its evidence that fails rolls back, naming it, whatever else is missing.
    state, why = c.decide(figures(pairs=12, kl_mean=0.3))
    assert state == "rolled_back" and why.startswith("rolled back: KL 0.3000 > 0.1")
    assert why.endswith("not measured: 12 shadowed pairs, need 50")
    state, why = c.decide(figures(probes=150))
    assert (state, why) == ("inconclusive", "inconclusive: 150 of 200 labelled probes answered "
                            "by both sides (0 failed); rolled back")  # fmt: skip
    state, why = c.decide(figures(kl_mean=None, kl_tokens=0))
    assert state == "inconclusive" and "no KL measured" in why
    thin = CanarySide(precision="q4_k_m", requests=3, tokens=30, busy_s=0.3)
    state, why = c.decide(figures(candidate=thin))
    assert state == "inconclusive" and "3 answered requests on q4_k_m" in why
    # The round robin gives the candidate its share of live requests, evenly spread.
    picks = [c.takes_next() for _ in range(100)]
    assert sum(picks) == 10 and not any(picks[i] and picks[i + 1] for i in range(99))


def test_probes_with_a_clear_drop_roll_back_naming_the_guard() -> None:
    """The probes' paired outcomes as the canary records them, through its own figures and
    verdict: the candidate loses 20 of 200 items the serving side got right."""
    from wattops.agents.api import CanaryRequest

    c = Canary("f16", "q4_0", CanaryRequest(), None)
    assert c.next_probe() == c.probe_items[0]
    for i in range(200):
        serving = i < 90
        c.add_probe(serving, serving and i >= 20, [0.01])
    assert c.next_probe() is None
    drop = c.probe_drop()
    assert drop is not None and (drop.reference_only, drop.candidate_only) == (20, 0)
    assert drop.drop.estimate == pytest.approx(0.10) and drop.drop.low > 0.015  # clearly over
    c.shadowing = False
    c.pairs = [("a", "a")] * 50
    status = c.status([], 0.0)
    assert (status.probes, status.probes_planned) == (200, 200)
    assert status.accuracy_serving == pytest.approx(0.45)
    assert status.accuracy_candidate == pytest.approx(0.35)
    # Both sides as fast and as frugal: only the probes can decide.
    even = {"requests": 20, "j_per_token": 1.0, "latency_p95_s": 1.0}
    level = status.model_copy(update={"p95_change": 0.0, "j_per_token_change": 0.0,
        "serving": status.serving.model_copy(update=even),
        "candidate": status.candidate.model_copy(update=even)})  # fmt: skip
    state, why = c.decide(level)
    assert state == "rolled_back"
    assert why.startswith(f"rolled back: accuracy drop 10.0 [{status.accuracy_drop_low:.1f}, "
                          f"{status.accuracy_drop_high:.1f}] points > 1.5 (200 probes: 45.0% "
                          "-> 35.0%)")  # fmt: skip


def test_shadow_requests_are_greedy_short_and_single() -> None:
    body = {"model": "tiny", "messages": [], "stream": True, "temperature": 0.9, "n": 2,
            "max_tokens": 500, "logprobs": True}  # fmt: skip
    shadow = shadow_body(body)
    assert shadow["temperature"] == 0.0 and shadow["max_tokens"] == 48
    assert "stream" not in shadow and "n" not in shadow
    assert (shadow["logprobs"], shadow["top_logprobs"]) == (True, 10)  # for the KL
    assert shadow_body({"model": "tiny", "max_tokens": 5})["max_tokens"] == 5
    assert shadow_body({"model": "tiny", "prompt": "x"}, chat=False)["logprobs"] == 5


def test_kl_is_taken_where_both_sides_saw_the_same_context() -> None:
    import math

    from wattops.agents.canary import shared_prefix_kl

    same = {"a": math.log(0.7), "b": math.log(0.2), "c": math.log(0.1)}
    other = {"a": math.log(0.5), "b": math.log(0.4), "c": math.log(0.1)}
    # Identical distributions: 0 at every shared position.
    assert shared_prefix_kl([("a", same)] * 3, [("a", same)] * 3) == [0.0, 0.0, 0.0]
    # The answers part at the second token: that position counts (same context), none after.
    kl = shared_prefix_kl([("a", same), ("a", same), ("a", same)],
                          [("a", same), ("b", other), ("a", same)])  # fmt: skip
    expected = 0.7 * math.log(0.7 / 0.5) + 0.2 * math.log(0.2 / 0.4)
    assert kl == [0.0, pytest.approx(expected)]
    # A token one side does not list gets that side's smallest listed probability.
    only = shared_prefix_kl([("a", {"a": math.log(0.9), "z": math.log(0.05)})],
                            [("a", {"a": math.log(0.6), "y": math.log(0.3)})])  # fmt: skip
    p = {"a": 0.9 / 1.0, "z": 0.05 / 1.0, "y": 0.05 / 1.0}  # y at P's floor, 0.05
    q = {"a": 0.6 / 1.2, "y": 0.3 / 1.2, "z": 0.3 / 1.2}  # z at Q's floor, 0.3
    assert only == [pytest.approx(sum(p[t] * math.log(p[t] / q[t]) for t in p))]
    assert shared_prefix_kl([("a", {})], [("a", same)]) == []  # no logprobs: nothing to say


async def test_the_console_offers_a_canary_from_the_precision_key(agent: Agent) -> None:
    from tests.test_console import SIZE, row, serving, until
    from wattops.console.app import make_app
    from wattops.console.screens.modals import ConfirmModal, PrecisionModal

    app = make_app([agent.url], refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: serving(app), 30, "the first snapshot")
        await pilot.press("p")
        modal = await until(pilot, lambda: isinstance(app.screen, PrecisionModal) and app.screen,
                            5, "the precision modal")  # fmt: skip
        options = modal.query_one("#precisions")
        labels = [str(options.get_option_at_index(i).prompt)
                  for i in range(options.option_count)]  # fmt: skip
        steps = labels.index("q4_k_m") - labels.index("q8_0  ← current")
        await pilot.press(*["down" if steps > 0 else "up"] * abs(steps), "c")
        confirm = await until(pilot, lambda: isinstance(app.screen, ConfirmModal) and app.screen,
                              5, "the confirmation")  # fmt: skip
        assert "Try q4_k_m on 10% of tiny's traffic" in str(confirm.query_one(".title").render())
        await pilot.press("y")
        await until(pilot, lambda: row(app).state == "canary", 60, "the canary's row")
        c = agent.deployment()["canary"]
        assert c["precision"] == "q4_k_m" and c["share"] == 0.1 and c["duration_s"] == 300
        assert agent.client.delete("/v1/deployments/tiny/canary").status_code == 202
        await until(pilot, lambda: row(app).state == "serving", 60, "the rollback")
    assert agent.deployment()["canary"]["verdict"] == "rolled back: aborted by the operator"


def test_the_window_waits_for_the_probes_up_to_twice_its_length() -> None:
    import time

    from wattops.agents.api import CanaryRequest

    c = Canary("f16", "q8_0", CanaryRequest(duration_s=10, guards=CanaryGuards(probes=3)), None)
    c.state = "running"
    c.started = time.monotonic() - 11  # past its duration, with 3 probes unanswered
    assert not c.due()
    for _ in range(3):
        c.add_probe(True, True)
    assert c.due()  # every probe answered
    c.probed = []
    c.started = time.monotonic() - 21  # twice the duration: decided, probes or not
    assert c.due()
    # Without the accuracy guard, the probes are figures only: the window is its duration.
    free = Canary("f16", "q8_0", CanaryRequest(duration_s=10, guards=CanaryGuards(
        probes=3, max_accuracy_drop=None)), None)  # fmt: skip
    free.state, free.started = "running", time.monotonic() - 11
    assert free.due()
