"""What OpenAI's API refuses, the agent refuses, with OpenAI's error shape and the field named;
control bodies are taken strictly; the OpenAPI spec documents every answer. Against a real
agent serving the test model, through the official `openai` client where it applies."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import TOKEN, Agent

CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture
def client(agent: Agent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"temperature": -1}, "temperature", "between 0 and 2"),
        ({"top_p": 5}, "top_p", "between 0 and 1"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "'wizard'"),
        ({"max_tokens": 100_000_000}, "max_tokens", "max_tokens is too large"),
        ({"max_tokens": 0}, "max_tokens", "at least 1"),
        ({"logprobs": 3}, "logprobs", "logprobs must be a boolean"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ],
)
def test_what_openai_refuses_is_refused_with_the_field_named(
    client: openai.OpenAI, agent: Agent, extra: dict[str, Any], param: str, words: str
) -> None:
    body: dict[str, Any] = {"model": "tiny", "messages": CHAT, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    error = info.value.body
    assert isinstance(error, dict)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert words in error["message"]
    # Streamed, the same refusal comes before any byte of the stream.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**body, stream=True)
    counters = agent.deployment()["counters"]
    if param == "max_tokens" and "too large" in words:
        # Only the engine knows its context and the prompt's length: it refuses, generating
        # nothing (OpenAI's "max_tokens is too large"), rather than running to the context's end.
        assert counters["completion_tokens_total"] == 0
    else:
        assert counters["requests_total"] == 0  # refused at the gateway: no engine ran


def test_a_body_without_a_model_is_a_400_not_a_404(agent: Agent) -> None:
    resp = agent.client.post("/v1/chat/completions", json={"messages": CHAT})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["param"], error["message"]) == ("model", "you must provide a model parameter")
    unknown = agent.client.post("/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_control_bodies_are_strict_and_errors_are_plain(make_agent: Any) -> None:
    agent: Agent = make_agent(token=TOKEN)
    refused = agent.control("/v1/deployments/tiny/scale", {"replicas": "2"})
    assert refused.status_code == 422
    assert "replicas" in refused.json()["message"]
    assert agent.deployment()["desired_replicas"] == 1  # nothing changed
    broken = agent.client.post(
        "/v1/deployments/tiny/scale", content=b'{"replicas": 2,,}',
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert broken.status_code == 400
    assert broken.json()["message"].startswith("the body is not valid JSON (at character")
    # Precision names are llama.cpp's, read case-insensitively.
    upper = agent.control("/v1/deployments/tiny/precision", {"precision": "Q4_0"})
    assert upper.status_code == 202 and upper.json()["desired_precision"] == "q4_0"


def test_a_wrong_method_says_which_are_allowed(agent: Agent) -> None:
    resp = agent.client.get("/v1/deployments/tiny/scale")
    assert resp.status_code == 405
    assert resp.headers["allow"] == "POST"
    assert resp.json()["error"] == "method_not_allowed"


def test_the_openapi_spec_documents_every_answer(agent: Agent) -> None:
    spec = httpx.get(agent.url + "/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            answers = set(operation["responses"])
            if method == "post":
                assert {"400", "404"} <= answers, (path, method, sorted(answers))
            if "{name}" in path:
                assert "422" in answers and "405" in answers, (path, method)
