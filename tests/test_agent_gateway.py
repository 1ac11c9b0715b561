"""The gateway against real llama.cpp replicas: answers, usage, streaming, response cache."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import TOKEN, Agent, free_port, wait_for


def test_chat_completion_answers_with_usage(agent: Agent) -> None:
    resp = agent.chat("Say something about watts.", temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "tiny"
    assert body["choices"][0]["message"]["role"] == "assistant"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "cached_tokens" in usage["prompt_tokens_details"]


def test_shared_prefix_is_reported_as_cached_prompt_tokens(agent: Agent) -> None:
    prefix = "You are a terse assistant for an on-call engineer. " * 4
    first = agent.chat(prefix + "First question?", temperature=0.7).json()["usage"]
    second = agent.chat(prefix + "Second question?", temperature=0.7).json()["usage"]
    # The second prompt shares the system text, so llama.cpp reuses that part of its KV cache.
    assert second["prompt_tokens_details"]["cached_tokens"] > 20
    assert second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
    assert (
        first["prompt_tokens_details"]["cached_tokens"]
        < second["prompt_tokens_details"]["cached_tokens"]
    )
    wait_for(
        lambda: agent.deployment()["counters"]["cached_prompt_tokens_total"] > 20,
        10,
        "cached prompt tokens in the snapshot",
    )


def test_text_completion_answers(agent: Agent) -> None:
    resp = agent.client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "Once upon", "max_tokens": 4}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["usage"]["completion_tokens"] <= 4


def test_streaming_chat_relays_chunks_then_done(agent: Agent) -> None:
    body = {
        "model": "tiny",
        "max_tokens": 6,
        "temperature": 0,
        "messages": [{"role": "user", "content": "stream please"}],
    }
    whole = agent.client.post("/v1/chat/completions", json=body).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    events = []
    with agent.client.stream("POST", "/v1/chat/completions", json=streamed) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) > 2, "the answer was not streamed chunk by chunk"
    # Greedy decoding: the streamed answer and its usage equal the non-streamed one's.
    assert text == whole["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] == 6


def test_repeated_deterministic_request_is_a_cache_hit(agent: Agent) -> None:
    first = agent.chat("cache me", temperature=0)
    second = agent.chat("cache me", temperature=0)
    assert first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "hit"
    assert second.json() == first.json()
    # Sampling requests are never served from the cache.
    sampled = agent.chat("cache me", temperature=0.8)
    assert sampled.headers["x-cache"] == "miss"
    counters = agent.deployment()["counters"]
    assert counters["cache_hits_total"] == 1
    assert counters["cache_misses_total"] == 1
    assert counters["requests_total"] == 3


def test_streamed_answers_are_cached_and_replayed(agent: Agent) -> None:
    body = {
        "model": "tiny",
        "stream": True,
        "max_tokens": 5,
        "temperature": 0,
        "messages": [{"role": "user", "content": "replay"}],
    }
    first = agent.client.post("/v1/chat/completions", json=body)
    second = agent.client.post("/v1/chat/completions", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
    assert second.text == first.text
    assert second.text.rstrip().endswith("data: [DONE]")


def test_a_stream_the_client_leaves_right_after_done_is_answered_not_failed(
    make_agent: Callable[..., Agent],
) -> None:
    """A client that closes the connection the moment it reads `data: [DONE]` (the SDKs do)
    got a whole answer, even from an engine that ends its response a second later
    (tests/lingering_engine.py): it is counted as answered, not as the deployment's error."""
    port = free_port()
    engine = subprocess.Popen([sys.executable, str(Path(__file__).with_name("lingering_engine.py")),
                               "--port", str(port), "--linger", "1.0"])  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, 30, "the stand-in")
        attached = {"name": "remote", "engine": "openai", "url": url, "precision": "f16",
                    "replicas": 1, "max_replicas": 1}  # fmt: skip
        agent = make_agent(deployments=[attached])
        body = {"model": "remote", "stream": True, "max_tokens": 4,
                "messages": [{"role": "user", "content": "stream please"}]}  # fmt: skip
        for _ in range(3):
            with (
                httpx.Client(base_url=agent.url, timeout=60) as client,
                client.stream("POST", "/v1/chat/completions", json=body) as resp,
            ):
                assert resp.status_code == 200
                seen = []
                for line in resp.iter_lines():
                    seen.append(line)
                    if line == "data: [DONE]":
                        break  # and leave at once: the stand-in keeps the response 1 s more
                assert seen[-1] == "data: [DONE]"
        counters = wait_for(
            lambda: (c := agent.deployment("remote")["counters"])["requests_total"] >= 3 and c,
            15, "the requests counted",
        )  # fmt: skip
        assert counters["errors_total"] == 0, counters
    finally:
        engine.terminate()
        engine.wait(10)


def test_models_lists_deployments(agent: Agent) -> None:
    data = agent.client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"]


def test_unknown_model_is_404_naming_what_is_served(agent: Agent) -> None:
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    resp = agent.client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 404
    assert "tiny" in resp.json()["error"]["message"]


def test_malformed_inference_body_is_400(agent: Agent) -> None:
    resp = agent.client.post(
        "/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 400
    assert "JSON" in resp.json()["error"]["message"]
    bad = agent.client.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert bad.status_code == 400
    assert "messages" in bad.json()["error"]["message"]


def test_events_stream_pushes_snapshots(agent: Agent) -> None:
    with (
        httpx.Client(base_url=agent.url, timeout=30) as client,
        client.stream("GET", "/v1/events") as resp,
    ):
        assert resp.status_code == 200
        lines = resp.iter_lines()
        snapshot = None
        for line in lines:
            if line.startswith("data: "):
                snapshot = json.loads(line.removeprefix("data: "))
                break
        assert snapshot is not None
        assert snapshot["deployments"][0]["name"] == "tiny"
        # A change (a request) produces a newer snapshot on the same stream.
        agent.chat("tick", temperature=0.3)
        for line in lines:
            if line.startswith("data: "):
                newer = json.loads(line.removeprefix("data: "))
                if newer["version"] > snapshot["version"]:
                    break
        assert newer["deployments"][0]["counters"]["requests_total"] >= 1


def test_openapi_documents_control_and_inference(agent: Agent) -> None:
    paths = agent.client.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/node",
        "/v1/events",
        "/v1/deployments/{name}/scale",
        "/v1/deployments/{name}/precision",
        "/v1/chat/completions",
        "/healthz",
    ):
        assert path in paths


def test_a_client_leaving_mid_stream_frees_its_replica_slot(
    make_agent: Callable[..., Agent],
) -> None:
    # A generation long enough that only a cancelled one frees the slot in time: the one
    # replica is measured making the whole answer first, streamed to the end.
    agent = make_agent(context=4096)
    body = {"model": "tiny", "stream": True, "max_tokens": 3500, "temperature": 0.5, "seed": 1,
            "messages": [{"role": "user", "content": "a long answer please"}]}  # fmt: skip
    started = time.perf_counter()
    full = agent.client.post("/v1/chat/completions", json=body)
    whole_answer_s = time.perf_counter() - started
    assert full.status_code == 200 and full.text.count("data: ") > 1000
    with agent.client.stream("POST", "/v1/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    hung_up = time.perf_counter()
    # The next request gets the replica once the abandoned generation stops (at its next
    # token), not when it would have finished.
    assert agent.chat("next", temperature=0.3, max_tokens=4).status_code == 200
    assert time.perf_counter() - hung_up < whole_answer_s / 4
    wait_for(lambda: agent.deployment()["replicas"][0]["in_flight"] == 0, 30,
             "the slot to be freed")  # fmt: skip


def test_a_long_streamed_answer_is_as_fast_as_the_same_answer_unstreamed(
    make_agent: Callable[..., Agent],
) -> None:
    # llama-cpp-python's streaming loop re-detokenized pending tokens on every step while they
    # were not whole UTF-8 characters (the test model's byte tokens rarely are): 600 tokens
    # took ~40 s streamed against 0.4 s unstreamed. The worker streams on its own now.
    agent = make_agent(context=2048)
    body = {"model": "tiny", "max_tokens": 600, "temperature": 0.7, "seed": 5,
            "messages": [{"role": "user", "content": "go on"}]}  # fmt: skip
    started = time.perf_counter()
    plain = agent.client.post("/v1/chat/completions", json=body).json()
    unstreamed_s = time.perf_counter() - started
    assert plain["usage"]["completion_tokens"] == 600
    started = time.perf_counter()
    streamed = agent.client.post("/v1/chat/completions", json={**body, "stream": True})
    streamed_s = time.perf_counter() - started
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in streamed.text.splitlines()
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == plain["choices"][0]["message"]["content"]  # the same answer
    assert streamed_s < 3 * unstreamed_s


def test_stream_options_are_part_of_the_cache_key(agent: Agent) -> None:
    body = {"model": "tiny", "stream": True, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "usage or not"}]}  # fmt: skip
    plain = agent.client.post("/v1/chat/completions", json=body)
    with_usage = agent.client.post(
        "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}
    )
    # A client that asked for usage must not get a replay without it, nor the other way round.
    assert (plain.headers["x-cache"], with_usage.headers["x-cache"]) == ("miss", "miss")
    assert '"usage"' in with_usage.text and '"usage"' not in plain.text.replace('"usage":null', "")


def test_prefix_cache_off_evaluates_every_prompt_in_full(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(prefix_cache=False)
    prefix = "You are a terse assistant for an on-call engineer. " * 4
    for question in ("First question?", "Second question?"):
        usage = agent.chat(prefix + question, temperature=0.7).json()["usage"]
        assert usage["prompt_tokens"] > 20
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_the_first_answer_after_a_wake_carries_its_estimates(
    make_agent: Callable[..., Agent],
) -> None:
    # A window with no tokens (parked, idle) used to drop the per-token figures, so the
    # answer that woke the deployment had no X-Wattops-Est-* headers.
    agent = make_agent(token=TOKEN, tables={"accounting": {"window_s": 2}})
    first = wait_for(lambda: (r := agent.chat("warm up", temperature=0.5)).headers.get(
        "x-wattops-est-energy-j") and r, 30, "answers with estimates")  # fmt: skip
    assert float(first.headers["x-wattops-est-cost-usd"]) > 0
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 0}).status_code == 202
    wait_for(lambda: agent.deployment()["state"] == "parked", 30, "parked")
    wait_for(lambda: agent.deployment()["accounting"]["figures"]["j_per_token"] is None, 30,
             "a window without tokens")  # fmt: skip
    woken = agent.chat("wake up", temperature=0.5)
    assert woken.status_code == 200
    assert float(woken.headers["x-wattops-est-energy-j"]) > 0


async def test_the_disk_tier_stays_within_its_cap_written_from_many_threads(tmp_path: Path) -> None:
    """The fault soak found the folder at 1.8 MB for a 256 KiB cap (and a fill from the thread
    pool, as the gateway writes, reached 25 MB): SQLite's write-ahead log is outside diskcache's
    size accounting. Filled far past its cap, the whole folder now stays within ~1.15x."""
    import asyncio

    from wattops.agents.response_cache import CachedAnswer, ResponseCache

    cap = 256 * 1024
    cache = ResponseCache(tmp_path / "cache", 0, cap)
    for i in range(3000):  # ~1 MB of answers, each written off the event loop as the gateway does
        cache.put(f"k{i}", CachedAnswer("application/json", b"x" * 300))
        if i % 50 == 0:
            await asyncio.sleep(0)
    await cache.close()
    total = sum(p.stat().st_size for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert total <= cap * 1.15 + 64 * 1024, total
    again = ResponseCache(tmp_path / "cache", 0, cap)
    assert again.get("k2999") is not None  # the newest answers are kept
    await again.close()
