"""The `llamacpp-server` engine: real `llama-server` replicas (built by `make llama-server` from
the llama.cpp the bindings vendor) on the test model, behind a real agent.

Batching is checked as a ratio within one run (tokens/s of four concurrent clients against one
client's on the same replica), never against a wall-clock threshold.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import AGENT_BIN, ROOT, Agent, replica_pids, wait_for
from wattops.agents.batching import SlotTuner, Window

SERVER = {"engine": "llamacpp-server", "parallel": 4}


def _ask(agent: Agent, n: int, max_tokens: int = 32) -> dict[str, Any]:
    body = {
        "model": "tiny",
        "max_tokens": max_tokens,
        "temperature": 0.8,  # sampled: never a response-cache hit
        "seed": n,
        "messages": [{"role": "user", "content": f"request {n}: tell me about watts"}],
    }
    resp = httpx.post(agent.url + "/v1/chat/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _tokens_per_s(agent: Agent, clients: int, requests: int, first: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(lambda n: _ask(agent, n), range(first, first + requests)))
    seconds = time.perf_counter() - started
    return sum(a["usage"]["completion_tokens"] for a in answers) / seconds


def _replica_metrics(agent: Agent) -> dict[str, float]:
    url = agent.deployment()["replicas"][0]["url"]
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_concurrent_requests_are_decoded_together(make_agent: Callable[..., Agent]) -> None:
    # SmolLM2 rather than the test model: on the tiny random model a decode step costs so little
    # that HTTP and sampling dominate, and batching has little to amortise.
    smollm2 = ROOT / "models" / "smollm2-135m-instruct.f16.gguf"
    agent = make_agent(**SERVER, model=str(smollm2), precision="f16", context=256)
    dep = agent.deployment()
    assert dep["engine"] == "llamacpp-server"
    assert dep["batching"] == {
        "parallel": 4,
        "slots": 4,
        "adaptive": False,
        "reason": None,
        "changed_at": None,
        "tokens_per_s_per_replica": None,
        "waited": 0,
    }
    _ask(agent, 0, max_tokens=4)  # warm: the first request pays for loading pages
    one = _tokens_per_s(agent, clients=1, requests=4, first=100)
    four = _tokens_per_s(agent, clients=4, requests=12, first=200)
    # One replica on one thread decodes the four sequences together: the replica's own count
    # of sequences per decode step says so directly (a serial engine decodes one a step).
    metrics = _replica_metrics(agent)
    busy = metrics["llamacpp:n_busy_slots_per_decode"]
    assert busy > 1.5, f"{busy:.2f} sequences per decode step"
    # What that buys in tokens/s depends on the processor: 1.67-2.09x where a decode step was
    # bound by memory (the VMs of 2026-11), 1.09-1.28x on 2026-12-07's AMD EPYC with AVX-512,
    # where one sequence already keeps the core busy. So only: never slower than one client
    # (0.9 leaves room for a noisy neighbour). docs/benchmarks.md has the measured figures.
    assert four > 0.9 * one, f"4 clients {four:.1f} tokens/s vs 1 client {one:.1f}"


def test_streaming_and_usage_as_the_other_engines(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(**SERVER)
    client = openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "stream please"}]
    whole = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=6,
        temperature=0,  # type: ignore[arg-type]
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2, "the answer was not streamed chunk by chunk"
    assert text == whole.choices[0].message.content
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == 6
    # No max_tokens: 256, as on the worker (llama-server alone would fill the context).
    unbounded = client.chat.completions.create(model="tiny", messages=messages, temperature=0)  # type: ignore[arg-type]
    assert unbounded.usage is not None and unbounded.usage.completion_tokens == 256
    # Text completions, too.
    done = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4)
    assert done.usage is not None and 0 < done.usage.completion_tokens <= 4


def _tokens(usages: list[dict[str, Any]]) -> tuple[int, int]:
    return sum(u["prompt_tokens"] for u in usages), sum(u["completion_tokens"] for u in usages)


def _counted(agent: Agent, at_least: int) -> dict[str, Any]:
    """The deployment's counters once they hold `at_least` completion tokens."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (c := agent.deployment()["counters"])["completion_tokens_total"] >= at_least and c,
        15,
        "the replica's counters in the snapshot",
    )


def test_tokens_and_prefix_reuse_are_accounted(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(**SERVER)
    prefix = "You are a terse assistant for an on-call engineer. " * 4
    usages = []
    for question in ("First question?", "Second question?", "Third question?"):
        body = {
            "model": "tiny",
            "max_tokens": 5,
            "temperature": 0.7,
            "messages": [{"role": "user", "content": prefix + question}],
        }
        resp = agent.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
        usages.append(resp.json()["usage"])
    # The slot keeps the previous prompt's KV: the shared system text is not evaluated again.
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 20
    prompt, completion = _tokens(usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    counters = _counted(agent, completion)
    # llama-server counts evaluated and reused prompt tokens apart; the agent adds them up.
    assert counters["prompt_tokens_total"] == prompt
    assert counters["completion_tokens_total"] == completion
    assert counters["cached_prompt_tokens_total"] == cached
    # Busy time (a slot in use) drew energy, attributed to the deployment.
    wait_for(
        lambda: agent.deployment()["accounting"]["totals"]["active_energy_j_total"] > 0,
        15,
        "energy attributed to the deployment",
    )


def test_precision_switch_under_load_drops_no_request(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(**SERVER)
    old_pids = {r["pid"] for r in agent.deployment()["replicas"]}
    stop = threading.Event()
    results: list[int] = []
    errors: list[str] = []

    def client(n: int) -> None:
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

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 6, 60, "load to start")
        resp = agent.control("/v1/deployments/tiny/precision", {"precision": "q4_k_m"})
        assert resp.status_code == 202, resp.text
        wait_for(lambda: agent.deployment()["precision"] == "q4_k_m", 120, "the switch")
        dep = agent.wait_converged("tiny", timeout=120)
        served_after = len(results)
        wait_for(lambda: len(results) >= served_after + 6, 60, "requests after the switch")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert errors == []
    assert {r["pid"] for r in dep["replicas"]}.isdisjoint(old_pids)
    assert all(pid not in replica_pids(agent.state_dir) for pid in old_pids)


def test_kill_9_of_a_server_replica_is_healed(make_agent: Callable[..., Agent]) -> None:
    """The replacement replica's llama-server counts from zero again; the deployment's
    counters keep what the killed one served and add the new one's, nothing twice."""
    agent = make_agent(**SERVER)
    before = _tokens([_ask(agent, n, max_tokens=5)["usage"] for n in range(3)])
    counters = _counted(agent, before[1])
    assert (counters["prompt_tokens_total"], counters["completion_tokens_total"]) == before
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
    assert dep["counters"]["completion_tokens_total"] == before[1]  # not reset by the kill
    after = _tokens([_ask(agent, 10 + n, max_tokens=3)["usage"] for n in range(2)])
    assert after[1] == 6
    counters = _counted(agent, before[1] + after[1])
    assert counters["prompt_tokens_total"] == before[0] + after[0]
    assert counters["completion_tokens_total"] == before[1] + after[1]


def test_adaptive_slots_grow_while_requests_queue(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(**SERVER, adaptive_parallel=True, adapt_window_s=1.0)
    assert agent.deployment()["batching"]["slots"] == 1
    stop = threading.Event()

    def client(n: int) -> None:
        while not stop.is_set():
            _ask(agent, n, max_tokens=24)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        batching = wait_for(
            lambda: (b := agent.deployment()["batching"])["slots"] >= 2 and b,
            60,
            "the agent to use more slots",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert batching["adaptive"] is True
    assert "waited for a slot" in batching["reason"] or "did not raise" in batching["reason"]
    assert batching["slots"] <= 4
    assert "slots per replica 1 -> 2" in agent.log_tail()


def test_a_missing_server_binary_is_named(make_agent: Callable[..., Agent], tmp_path: Any) -> None:
    agent = make_agent(**SERVER, server=str(tmp_path / "no-such-llama-server"), start=False)
    agent.start(wait_ready=False)
    dep = wait_for(lambda: (d := agent.deployment())["last_error"] and d, 30, "the start error")
    assert "no-such-llama-server" in dep["last_error"]


# -- the tuner alone --------------------------------------------------------------------------


def _window(tokens: int, waited: int, p95_s: float | None = 1.0) -> Window:
    return Window(seconds=10.0, tokens=tokens, replicas=1, waited=waited, p95_s=p95_s)


def test_tuner_doubles_while_requests_queue_and_throughput_rises() -> None:
    tuner = SlotTuner(parallel=8, slo_p95_s=5.0)
    assert tuner.slots == 1
    assert tuner.observe(_window(1000, waited=5))
    assert tuner.slots == 2 and "5 request(s) waited" in tuner.reason
    assert tuner.observe(_window(1800, waited=5))  # +80%: keep going
    assert tuner.slots == 4
    assert tuner.observe(_window(3000, waited=5))
    assert tuner.slots == 8
    assert not tuner.observe(_window(4000, waited=5))  # parallel reached
    assert tuner.slots == 8


def test_tuner_goes_back_when_more_slots_do_not_pay() -> None:
    tuner = SlotTuner(parallel=8, slo_p95_s=None, hold_windows=3)
    tuner.observe(_window(1000, waited=3))
    assert tuner.slots == 2
    assert tuner.observe(_window(1010, waited=3))  # +1%: not worth it
    assert tuner.slots == 1 and "did not raise" in tuner.reason
    # The size that did not pay is not tried again for hold_windows windows.
    assert not tuner.observe(_window(1000, waited=3))
    assert not tuner.observe(_window(1000, waited=3))
    assert tuner.observe(_window(1000, waited=3))
    assert tuner.slots == 2


def test_tuner_halves_past_the_latency_slo_and_holds_without_a_queue() -> None:
    tuner = SlotTuner(parallel=8, slo_p95_s=2.0, slots=8)
    assert not tuner.observe(_window(1000, waited=0, p95_s=1.0))  # nothing queued: hold
    assert tuner.observe(_window(1000, waited=9, p95_s=2.5))
    assert tuner.slots == 4 and "above the SLO 2000 ms" in tuner.reason
    assert tuner.observe(_window(1000, waited=9, p95_s=2.5))
    assert tuner.observe(_window(1000, waited=9, p95_s=2.5))
    assert tuner.slots == 1
    assert not tuner.observe(_window(1000, waited=9, p95_s=2.5))  # one slot is the floor


@pytest.mark.parametrize("parallel", [0, 65])
def test_bad_parallel_is_refused_naming_the_range(
    make_agent: Callable[..., Agent], parallel: int
) -> None:
    agent = make_agent(**{**SERVER, "parallel": parallel}, start=False)
    done = subprocess.run([str(AGENT_BIN), "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "deployments.tiny.parallel" in done.stderr or "parallel" in done.stderr
    assert ("64" if parallel > 64 else "1") in done.stderr
