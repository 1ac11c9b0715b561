"""The limits in front of the agent's API (vocabulary/hardening.py), on a real agent over real
HTTP where the network can show them (headers, bodies, event streams per client), and on the
middleware itself for a client that stops sending its body."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import ExitStack
from typing import Any

import httpx

from tests.conftest import Agent
from wattops.vocabulary.hardening import MAX_BODY_BYTES, MAX_STREAMS_PER_CLIENT, Guard


def test_oversized_headers_and_bodies_are_refused_naming_the_limit(agent: Agent) -> None:
    big = {f"x-filler-{n}": "a" * 8000 for n in range(5)}  # 40 KB of headers
    refused = agent.client.get("/v1/node", headers=big)
    assert refused.status_code == 431
    assert "headers are" in refused.json()["message"] and "at most 32768" in refused.text
    body = b'{"replicas": 1, "pad": "' + b"x" * (MAX_BODY_BYTES + 10) + b'"}'
    too_big = agent.client.post("/v1/deployments/tiny/scale", content=body,
                                headers={"content-type": "application/json"})  # fmt: skip
    assert too_big.status_code == 413 and "at most 1048576 bytes" in too_big.text
    assert agent.deployment()["desired_replicas"] == 1  # nothing changed
    # The ordinary ones pass untouched.
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 1}).status_code == 202


def test_event_streams_are_capped_per_client_address(agent: Agent) -> None:
    with ExitStack() as stack:
        clients = [stack.enter_context(httpx.Client(base_url=agent.url, timeout=30))
                   for _ in range(MAX_STREAMS_PER_CLIENT + 1)]  # fmt: skip
        opened = [stack.enter_context(c.stream("GET", "/v1/events"))
                  for c in clients[:MAX_STREAMS_PER_CLIENT]]  # fmt: skip
        assert all(r.status_code == 200 for r in opened)
        extra = clients[-1].get("/v1/events")
        assert extra.status_code == 429 and extra.headers["retry-after"] == "5"
        assert f"at most {MAX_STREAMS_PER_CLIENT} per client address" in extra.text
        opened[0].close()  # one closed: room for another, once the agent has seen it go
        deadline = time.monotonic() + 10
        while clients[-1].head("/v1/events").status_code == 429:
            assert time.monotonic() < deadline, "the closed stream was never let go"
            time.sleep(0.1)
        with clients[-1].stream("GET", "/v1/events") as again:
            assert again.status_code == 200
            lines = again.iter_lines()
            assert "event: snapshot" in [next(lines) for _ in range(3)]


def test_a_body_that_never_arrives_is_timed_out() -> None:
    sent: list[dict[str, Any]] = []
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def stalled() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/deployments/tiny/scale",
             "headers": [(b"content-length", b"100")], "client": ("127.0.0.1", 5)}  # fmt: skip
    asyncio.run(Guard(app, body_timeout_s=0.2)(scope, stalled, send))
    assert reached == []  # the API never saw it
    assert sent[0]["status"] == 408
    assert json.loads(sent[1]["body"])["message"] == "the body did not arrive within 0.2 s"
