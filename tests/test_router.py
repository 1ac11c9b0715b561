"""`wattops-router` in front of real agents serving the test model, through real HTTP and the
official `openai` client: placement follows the live figures, bounds exclude with their
reason, failures fall back, the circuit breaker opens and closes, every answer says where it
went and why."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Agent, wait_for
from tests.cutting_link import CuttingLink
from tests.routers import CHAT, ROUTER_BIN, RouterProc


def _candidate(router: RouterProc, key: str, route: str = "chat") -> dict[str, Any]:
    return next(c for c in router.route(route)["candidates"] if c["key"] == key)


def _served_by(response: httpx.Response) -> str:
    return response.headers["X-Wattops-Served-By"].split("@")[0]


def test_cheapest_follows_the_live_prices(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    edge, cloud = two_nodes
    router = make_router([edge, cloud], [CHAT])

    def figure(key: str) -> Any:
        return _candidate(router, key)["usd_per_1m_tokens"]

    # The reference serves once (addressed directly) so its $/token, the counterfactual of
    # every saving, is known.
    assert _served_by(router.ask(model="cloud/tiny")) == "cloud/tiny"
    wait_for(lambda: figure("cloud/tiny"), 30, "the router to learn the cloud's $/1M tokens")
    served = Counter(_served_by(router.ask()) for _ in range(4))
    assert served == {"edge/tiny": 4}
    wait_for(lambda: figure("edge/tiny"), 30, "the router to learn the edge's $/1M tokens")
    assert figure("edge/tiny") < figure("cloud/tiny") / 10
    view = router.route("chat")
    # Four answers at the edge's price instead of the cloud's: the saving is their difference.
    assert view["requests"] == 4 and view["saving"] is not None and view["saving"] > 0.5
    answer = router.ask()
    assert answer.headers["X-Wattops-Route"] == "chat"
    assert answer.headers["X-Wattops-Served-By"] == "edge/tiny@q8_0"
    assert answer.headers["X-Wattops-Decision"].startswith("cheapest: ")
    # The edge node's price goes up 10,000-fold (a new price in its hardware profile): once
    # its agent reports it, the traffic follows to the cloud node.
    edge.stop()
    config = edge.config_path.read_text()
    edge.config_path.write_text(config + "\n[hardware.price]\ncloud_usd_per_hour = 3570.0\n")
    edge.start()
    wait_for(lambda: _candidate(router, "edge/tiny")["live"], 30, "router to see edge again")

    def moved() -> bool:
        return _served_by(router.ask()) == "cloud/tiny"

    # The edge's recent window may still hold answers at its old price for a few seconds
    # (5 s windows here): the traffic moves once the router's figure for it is the dearer.
    wait_for(lambda: figure("edge/tiny") > figure("cloud/tiny"), 60, "the edge's new price")
    wait_for(moved, 30, "traffic to move to the cloud node")
    assert Counter(_served_by(router.ask()) for _ in range(3)) == {"cloud/tiny": 3}
    view = router.route("chat")
    assert view["requests"] >= 8 and view["tokens"] > 0
    split = {c["key"]: c["requests"] for c in view["candidates"]}
    assert split["edge/tiny"] >= 4 and split["cloud/tiny"] >= 3
    metrics = router.client.get("/metrics").text
    assert 'wattops_route_requests_total{candidate="edge/tiny",route="chat"}' in metrics


def test_bounds_exclude_candidates_with_the_reason_in_the_503(
    make_agent: Callable[..., Agent], make_router: Callable[..., RouterProc]
) -> None:
    edge = make_agent(precision="q4_0", agent_extra={"node": "edge", "profile": "cpu-generic"})
    cloud = make_agent(agent_extra={"node": "cloud", "profile": "a100-80gb"})
    strict = {**CHAT, "min_quality": 0.99}
    router = make_router([edge, cloud], [strict])
    # No quality table of the test model has been measured: the q4_0 edge node's quality is
    # unknown, so the floor leaves it out however cheap it is.
    assert {_served_by(router.ask()) for _ in range(3)} == {"cloud/tiny"}
    excluded = {c["key"]: c["excluded"] for c in router.route("chat")["candidates"]}
    assert "quality unknown (no quality table of test.gguf (set router.models_dir): run " in str(
        excluded["edge/tiny"]
    )
    # A latency bound nothing can meet: 503 in OpenAI's shape, naming each candidate's reason.
    # (Once the router has the cloud's latency: a candidate without one is not held to a bound.)
    wait_for(lambda: _candidate(router, "cloud/tiny")["p95_ms"], 30, "the cloud's latency")
    refused = router.ask(headers={"X-Wattops-Max-Latency-Ms": "0.001"})
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "no_candidate"
    assert "edge/tiny: quality unknown" in error["message"]
    assert "cloud/tiny: p95 would be" in error["message"] and "> 0ms" in error["message"]
    with pytest.raises(openai.APIStatusError) as info:
        router.openai().chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
            extra_headers={"X-Wattops-Max-Latency-Ms": "0.001"},
        )  # fmt: skip
    assert info.value.status_code == 503
    assert router.route("chat")["refusals"] == 2
    # Bad header values are the client's fault, named.
    bad = router.ask(headers={"X-Wattops-Policy": "random"})
    assert bad.status_code == 400 and "allowed: cheapest, greenest, fastest, cascade" in bad.text
    bad = router.ask(headers={"X-Wattops-Priority": "urgent"})
    assert bad.status_code == 400 and "X-Wattops-Priority: 'urgent'" in bad.text


def test_the_openai_client_works_unchanged(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    router = make_router(list(two_nodes), [CHAT])
    client = router.openai()
    listed = [m.id for m in client.models.list()]
    assert listed[0] == "chat" and {"edge/tiny", "cloud/tiny"} <= set(listed)
    raw = client.chat.completions.with_raw_response.create(
        model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6
    )
    chat = raw.parse()
    assert chat.choices[0].message.content and chat.usage and chat.usage.completion_tokens > 0
    assert raw.headers["X-Wattops-Served-By"] == "edge/tiny@q8_0"
    stream = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    completion = client.completions.create(model="chat", prompt="Once upon", max_tokens=5)
    assert completion.choices[0].text
    # One deployment addressed directly, as node/deployment.
    direct = client.chat.completions.with_raw_response.create(
        model="cloud/tiny", messages=[{"role": "user", "content": "Say hi"}], max_tokens=3
    )
    assert direct.headers["X-Wattops-Served-By"] == "cloud/tiny@q8_0"
    assert direct.headers["X-Wattops-Decision"] == "addressed directly"
    with pytest.raises(openai.NotFoundError, match="neither a route nor a node/deployment"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    # The streamed answer's usage was counted too.
    view = router.route("chat")
    assert view["requests"] == 3 and view["tokens"] > 0


def test_an_agent_killed_mid_load_loses_no_request_that_had_not_started(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    """Unstreamed answers start only when they are whole, so a request in flight at an agent
    killed with SIGKILL (decoding or queued there) has not started answering: the router must
    retry it on the next candidate, and every one of them is answered."""
    edge, cloud = two_nodes
    router = make_router([edge, cloud], [CHAT])
    assert _served_by(router.ask()) == "edge/tiny"
    assert edge.proc is not None
    body = {"model": "chat", "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": 48, "temperature": 0.7}  # fmt: skip

    stop = threading.Event()
    answers: list[httpx.Response] = []
    failed: list[str] = []

    def client() -> None:
        with httpx.Client(base_url=router.url, timeout=120) as http:
            while not stop.is_set():
                try:
                    answers.append(http.post("/v1/chat/completions", json=body))
                except httpx.HTTPError as exc:  # the router itself failed the request
                    failed.append(repr(exc))

    # Four clients in a loop, all to the edge (the cheapest): at any moment some of their
    # requests are decoding or queued there.
    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        wait_for(lambda: _candidate(router, "edge/tiny")["in_flight"] >= 2, 30,
                 "requests in flight at the edge")  # fmt: skip
        edge.proc.kill()  # SIGKILL: no goodbye; its connections are reset, new ones refused
        edge.proc.wait()
        wait_for(lambda: sum(_served_by(a) == "cloud/tiny" for a in answers if a.is_success) >= 8,
                 60, "the load to go on at the cloud")  # fmt: skip
    finally:
        stop.set()
        for t in clients:
            t.join(120)
    assert failed == [] and [a.text for a in answers if a.status_code != 200] == []
    # (The edge may have finished none: the kill can come before its first answer.)
    assert "cloud/tiny" in {_served_by(a) for a in answers}
    # Those in flight at the edge were retried on the cloud: their decision says so.
    retried = [a for a in answers if "after edge/tiny" in a.headers["X-Wattops-Decision"]]
    assert retried, [a.headers["X-Wattops-Decision"] for a in answers]
    assert all(_served_by(a) == "cloud/tiny" for a in retried)
    assert router.route("chat")["fallbacks"] >= len(retried)
    wait_for(lambda: not _candidate(router, "edge/tiny")["live"], 20, "edge to be offline")
    wait_for(lambda: _candidate(router, "cloud/tiny")["p95_ms"], 30, "the cloud's latency")
    # The 503 names why the edge is left out: offline, or its breaker opened by the failures.
    refused = router.ask(headers={"X-Wattops-Max-Latency-Ms": "0.001"}).text
    assert "edge/tiny: agent not live" in refused or "edge/tiny: circuit open" in refused, refused


def test_an_answer_broken_off_after_its_headers_is_answered_by_the_next_candidate(
    two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    """An unstreamed answer whose headers came but whose body did not (the agent died
    mid-write: a link that cuts the connection there stands in for the moment) has sent the
    client nothing yet: the next candidate answers it."""
    edge, cloud = two_nodes
    link = CuttingLink(int(edge.url.rsplit(":", 1)[1])).start()
    router = RouterProc(tmp_path, [link.url, cloud.url], [CHAT],
                        {"breaker_failures": 2, "breaker_open_s": 30.0}).start()  # fmt: skip
    try:
        assert _served_by(router.ask()) == "edge/tiny"
        link.cut_next = 1
        answer = router.ask()
        assert link.cut == 1
        assert answer.status_code == 200, answer.text
        assert _served_by(answer) == "cloud/tiny"
        assert "after edge/tiny (broke off its answer" in answer.headers["X-Wattops-Decision"]
        assert router.route("chat")["fallbacks"] == 1
        assert _served_by(router.ask()) == "edge/tiny"  # the link is whole again
        # A broken-off answer is a failure to its circuit breaker like a refused connection:
        # two in a row open it, and the edge is skipped without being asked.
        link.cut_next = 2
        assert _served_by(router.ask()) == "cloud/tiny"
        assert _served_by(router.ask()) == "cloud/tiny"
        assert link.cut == 3 and _candidate(router, "edge/tiny")["breaker"] == "opened"
        asked = link.asked
        assert _served_by(router.ask()) == "cloud/tiny"
        assert link.cut == 3 and link.asked == asked  # not even asked: the breaker left it out
    finally:
        router.stop()
        link.stop()


def test_the_circuit_breaker_opens_after_failures_and_a_probe_closes_it(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    edge, cloud = two_nodes
    router = make_router([edge, cloud], [CHAT], breaker_failures=2, breaker_open_s=2.0)
    assert router.ask(model="edge/tiny").status_code == 200
    edge.stop(signal.SIGKILL)
    # Addressed directly there is no other candidate: each attempt fails, two open the breaker.
    for _ in range(2):
        failed = router.ask(model="edge/tiny")
        assert failed.status_code == 502 and "edge/tiny (" in failed.json()["error"]["message"]
    opened = router.ask(model="edge/tiny")
    assert opened.status_code == 502 and "circuit open" in opened.json()["error"]["message"]
    assert _candidate(router, "edge/tiny")["breaker"] == "opened"
    edge.start()
    time.sleep(2.1)  # the breaker's open time: then one probe goes through and closes it
    assert router.ask(model="edge/tiny").status_code == 200
    assert _candidate(router, "edge/tiny")["breaker"] == "closed"


def test_a_route_change_applies_at_once_and_survives_a_restart(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    router = make_router(list(two_nodes), [CHAT], token="route-admin")
    assert router.client.patch("/v1/routes/chat", json={"policy": "fastest"}).status_code == 401
    auth = {"Authorization": "Bearer route-admin"}
    bad = router.client.patch("/v1/routes/chat", json={"policy": "random"}, headers=auth)
    assert bad.status_code == 422 and "policy" in bad.text
    changed = router.client.patch(
        "/v1/routes/chat", json={"policy": "fastest", "max_p95_ms": 5000}, headers=auth
    )
    assert changed.status_code == 200 and changed.json()["policy"] == "fastest"
    assert router.ask().headers["X-Wattops-Decision"].startswith("fastest: ")
    router.stop()
    again = RouterProc(router.folder, router.agents, router.routes, {"token": "route-admin"},
                       port=router.port).start()  # fmt: skip
    try:
        bounds = again.route("chat")["bounds"]
        assert bounds["policy"] == "fastest" and bounds["max_p95_ms"] == 5000
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[routes]]\nname = 'chat'\ncandidates = ['edge/*']\nreference = 'x/tiny'\n",
         "routes.0: Value error, reference 'x/tiny' matches none of the candidates"),
        ("[[routes]]\nname = 'chat'\ncandidates = ['tiny']\nreference = 'a/tiny'\n",
         "routes.0.candidates: Value error, 'tiny' must be node/deployment"),
        ("[router]\nlisten = 'nowhere'\n[[routes]]\nname = 'c'\ncandidates = ['a/b']\n"
         "reference = 'a/b'\n", "router.listen: Value error, must be host:port"),
        ("[[routes]]\nname = 'chat'\ncandidates = ['a/b']\nreference = 'a/b'\npolicy = 'x'\n",
         "routes.0.policy: Input should be 'cheapest', 'greenest', 'fastest' or 'cascade'"),
    ],
)  # fmt: skip
def test_a_bad_config_fails_with_its_message(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "router.toml"
    config.write_text("[[agents]]\nurl = 'http://127.0.0.1:9'\n" + text)
    done = subprocess.run([str(ROUTER_BIN), "--config", str(config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert f"{config}: invalid configuration" in done.stderr
    assert message.replace("Value error, ", "") in done.stderr


def test_prefix_affinity_keeps_a_shared_prefix_on_one_node(
    make_agent: Callable[..., Agent], make_router: Callable[..., RouterProc]
) -> None:
    twins = [make_agent(prefix_cache=True, agent_extra={"node": f"twin{i}", "sensor": "estimate"})
             for i in range(2)]  # fmt: skip
    # Twins: the same price by construction, but their measured $/1M can part by more than the
    # default 20% tier on a busy machine (one twin busier); the tier is widened so that the
    # test is about affinity, not about how alike two estimates are.
    sticky = {"name": "sticky", "candidates": ["twin*/tiny"], "reference": "twin0/tiny",
              "equivalent_within": 2.0}  # fmt: skip
    spread = {**sticky, "name": "spread", "affinity": False}
    router = make_router(twins, [sticky, spread])
    systems = [f"You are assistant number {n}. " + "Answer briefly and politely. " * 8
               for n in range(3)]  # fmt: skip

    def counters() -> tuple[int, int, int]:
        deps = [a.deployment()["counters"] for a in twins]
        return (sum(c["cached_prompt_tokens_total"] for c in deps),
                sum(c["prompt_tokens_total"] for c in deps),
                sum(c["requests_total"] for c in deps))  # fmt: skip

    def idle(route: str) -> bool:
        return all(c["in_flight"] == 0 for c in router.route(route)["candidates"])

    def run(route: str) -> tuple[float, dict[str, set[str]]]:
        homes: dict[str, set[str]] = {}
        cached0, prompt0, requests0 = counters()
        for n, system in enumerate(systems):
            for turn in range(3):
                # Idle between requests as the router sees it: an agent's snapshot can still
                # show the last answer in flight for up to a second, and a node that looks busy
                # is not a tie (the spread route would then send everything to the other one).
                wait_for(lambda: idle(route), 10, "the twins idle")
                answer = router.ask(model=route, messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": f"question {turn} of group {n}"},
                ])  # fmt: skip
                assert answer.status_code == 200
                homes.setdefault(system, set()).add(_served_by(answer))
        # The agents read their engines' token counters once a second: wait until every
        # answer is counted and one more reading changes nothing (a reading taken mid-run
        # misses the later requests' cached tokens: 0% reuse, seen once in a full run).
        seen: list[tuple[int, int, int]] = []

        def settled() -> bool:
            seen.append(counters())
            return (seen[-1][2] >= requests0 + 9 and seen[-1][1] > prompt0
                    and len(seen) > 1 and seen[-1] == seen[-2])  # fmt: skip

        wait_for(lambda: settled() or time.sleep(1.2), 30, "the agents to count the answers")
        cached1, prompt1, _ = seen[-1]
        return (cached1 - cached0) / (prompt1 - prompt0), homes

    with_affinity, homes = run("sticky")
    assert all(len(nodes) == 1 for nodes in homes.values()), homes
    assert "prefix affinity among 2" in router.ask(model="sticky", messages=[
        {"role": "system", "content": systems[0]}, {"role": "user", "content": "x"}
    ]).headers["X-Wattops-Decision"]  # fmt: skip
    without, spread_homes = run("spread")
    assert any(len(nodes) == 2 for nodes in spread_homes.values()), spread_homes
    print(f"prefix reuse: {with_affinity:.1%} with affinity, {without:.1%} without")
    assert with_affinity > without


def test_the_cascade_escalates_answers_of_low_confidence(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    edge, cloud = two_nodes
    # The random-weight test model is never sure of anything: its mean token log-probability
    # is far below -0.01, and far above -1000.
    strict = {**CHAT, "name": "strict", "policy": "cascade", "cascade_min_logprob": -0.01}
    lax = {**CHAT, "name": "lax", "policy": "cascade", "cascade_min_logprob": -1000.0}
    router = make_router([edge, cloud], [strict, lax])
    kept = router.ask(model="lax")
    assert _served_by(kept) == "edge/tiny" and "escalated" not in kept.headers["X-Wattops-Decision"]
    assert float(kept.headers["X-Wattops-Confidence"]) < -0.01
    assert kept.json()["choices"][0]["logprobs"] is None  # not asked for: taken out again
    escalated = router.ask(model="strict")
    assert escalated.status_code == 200 and _served_by(escalated) == "cloud/tiny"
    decision = escalated.headers["X-Wattops-Decision"]
    assert "escalated from edge/tiny (confidence -" in decision and "< -0.01)" in decision
    view = router.route("strict")
    assert view["escalations"] == 1 and view["escalated_tokens"] > 0
    assert view["requests"] == 1  # one answer went back; the set-aside one is counted apart
    # Asked for, the log-probabilities stay in the answer.
    asked = router.ask(model="lax", logprobs=True)
    assert asked.json()["choices"][0]["logprobs"]["content"]
    # A stream cannot be taken back: it goes to the cheapest candidate, no cascade.
    client = router.openai()
    with client.chat.completions.with_streaming_response.create(
        model="strict", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    ) as streamed:
        assert streamed.headers["X-Wattops-Served-By"].startswith("edge/tiny")
        assert "X-Wattops-Confidence" not in streamed.headers
    metrics = router.client.get("/metrics").text
    assert 'wattops_route_escalations_total{candidate="edge/tiny",route="strict"} 1.0' in metrics


def test_a_cascade_keeps_the_answer_it_set_aside_when_the_surer_candidate_fails(
    two_nodes: tuple[Agent, Agent], make_router: Callable[..., RouterProc]
) -> None:
    edge, cloud = two_nodes
    strict = {**CHAT, "name": "strict", "policy": "cascade", "cascade_min_logprob": -0.01}
    router = make_router([edge, cloud], [strict], request_timeout_s=2.0)
    assert _served_by(router.ask(model="strict")) == "cloud/tiny"  # both up: escalated
    assert cloud.proc is not None
    cloud.proc.send_signal(signal.SIGSTOP)  # frozen: accepts connections, answers nothing
    try:
        kept = router.ask(model="strict")
    finally:
        cloud.proc.send_signal(signal.SIGCONT)
    assert kept.status_code == 200 and _served_by(kept) == "edge/tiny"
    decision = kept.headers["X-Wattops-Decision"]
    assert "escalated from edge/tiny" in decision and "after cloud/tiny (" in decision
    assert decision.endswith("kept: every surer candidate failed")


def test_with_kubernetes_the_router_follows_agent_pods_as_they_come_and_go(
    two_nodes: tuple[Agent, Agent], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    make_router: Callable[..., RouterProc],
) -> None:  # fmt: skip
    """Discovery through the real kubernetes client against tests/kube_apiserver.py (the
    stand-in API server; no kube-apiserver runs here), as `kubernetes = true` does outside a
    pod (the kubeconfig); the agents are real, on loopback, named by their pods' ports."""
    from tests.kube_apiserver import VIEWER_TOKEN, KubeApiServer

    edge, cloud = two_nodes
    labels = {"app.kubernetes.io/name": "wattops-agent"}

    def pod_of(agent: Agent) -> list[dict[str, Any]]:
        return [{"name": "agent", "image": "wattops",
                 "ports": [{"name": "http", "containerPort": agent.port}]}]  # fmt: skip

    with KubeApiServer(nodes=("edge", "cloud")) as api:
        api.add_pod("wattops", "agent-edge", labels, "edge", "127.0.0.1", containers=pod_of(edge))
        config = tmp_path / "kubeconfig"
        config.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
            "users": [{"name": "viewer", "user": {"token": VIEWER_TOKEN}}],
            "contexts": [{"name": "c", "context": {"cluster": "standin", "user": "viewer"}}],
            "current-context": "c",
        }))  # fmt: skip
        monkeypatch.setenv("KUBECONFIG", str(config))
        router = make_router([], [CHAT], start=False, discovery_interval_s=0.5, kubernetes=True)
        router.start(live=1)
        assert {c["key"] for c in router.route("chat")["candidates"]} == {"edge/tiny"}
        api.add_pod("wattops", "agent-cloud", labels, "cloud", "127.0.0.1",
                    containers=pod_of(cloud))  # fmt: skip
        wait_for(lambda: router.view()["agents_live"] == 2, 30, "the new agent pod followed")
        api.delete_pod("wattops", "agent-edge")
        wait_for(lambda: router.view()["agents"] == 1, 30, "the deleted pod's agent dropped")
        assert {c["key"] for c in router.route("chat")["candidates"]} == {"cloud/tiny"}
        assert _served_by(router.ask()) == "cloud/tiny"
