"""Log-probabilities from the llama.cpp worker, as OpenAI returns them (the router's cascade
reads them as the answer's confidence): through a real agent and the official client."""

from __future__ import annotations

import math

import openai
import pytest

from tests.conftest import Agent


@pytest.fixture
def client(agent: Agent) -> openai.OpenAI:
    return openai.OpenAI(base_url=agent.url + "/v1", api_key="unused", max_retries=0)


def test_chat_logprobs_one_per_token_with_alternatives(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    tokens = choice.logprobs.content
    assert answer.usage is not None and len(tokens) == answer.usage.completion_tokens
    assert "".join(t.token for t in tokens) == choice.message.content
    for t in tokens:
        assert t.logprob <= 0 and len(t.top_logprobs) <= 3
        # Greedy decoding: the chosen token is the likeliest, so it leads its alternatives.
        assert math.isclose(t.logprob, t.top_logprobs[0].logprob, abs_tol=1e-6)
        assert all(a.logprob <= t.logprob + 1e-6 for a in t.top_logprobs)
    # The distribution is the model's, not a uniform stand-in.
    assert len({round(t.logprob, 4) for t in tokens}) > 1
    # Not asked for: none.
    plain = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_match_the_unstreamed_ones(client: openai.OpenAI) -> None:
    kwargs = dict(model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=8,
                  temperature=0, logprobs=True)  # fmt: skip
    whole = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    streamed = [
        t.logprob
        for chunk in client.chat.completions.create(**kwargs, stream=True)  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content
        for t in chunk.choices[0].logprobs.content
    ]
    expected = [t.logprob for t in whole.choices[0].logprobs.content]
    assert streamed == pytest.approx(expected, abs=1e-4)


def test_completion_logprobs(client: openai.OpenAI) -> None:
    answer = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5,
                                       temperature=0, logprobs=2)  # fmt: skip
    lp = answer.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and lp.top_logprobs
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(top) <= 2 for top in lp.top_logprobs)
