"""The load generator: deterministic workloads, the open-loop sender, the CLI glue, and one
run against a real agent."""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web

from tests.conftest import Agent
from wattops.experiments.load import (
    LoadProfile,
    LoadReport,
    PlannedRequest,
    RequestResult,
    add_arguments,
    build_workload,
    run_from_args,
    run_load,
)

# -- workload generation ---------------------------------------------------------------------


def test_same_seed_same_workload_and_other_seed_differs() -> None:
    profile = LoadProfile(rate_rps=5, requests=300, stream_fraction=0.3, idle_every_s=20)
    first = build_workload(profile, "tiny", 42)
    assert first == build_workload(profile, "tiny", 42)
    other = build_workload(profile, "tiny", 43)
    assert [r.at_s for r in first] != [r.at_s for r in other]
    assert [r.body for r in first] != [r.body for r in other]
    # The seed argument defaults to the profile's.
    assert build_workload(LoadProfile(requests=50, seed=9), "tiny") == build_workload(
        LoadProfile(requests=50), "tiny", 9
    )


def test_repeat_fraction_close_to_target_and_repeats_are_exact() -> None:
    for target in (0.1, 0.25, 0.5):
        workload = build_workload(
            LoadProfile(rate_rps=20, requests=2000, repeat_fraction=target), "m", 1
        )
        repeats = [r for r in workload if r.repeat_of is not None]
        assert abs(len(repeats) / len(workload) - target) <= 0.05
        for r in repeats:
            assert workload[r.repeat_of].body == r.body  # type: ignore[index]
            assert workload[r.repeat_of].repeat_of is None  # type: ignore[index]
            assert workload[r.repeat_of].at_s < r.at_s  # type: ignore[index]
        # Fresh prompts are all distinct: the repeats are the only exact repeats.
        fresh = [orjson.dumps(r.body) for r in workload if r.repeat_of is None]
        assert len(set(fresh)) == len(fresh)


def test_default_repeats_never_above_thirty_percent() -> None:
    assert LoadProfile().repeat_fraction <= 0.30
    for n in (1, 2, 3, 5, 7, 10, 13, 50, 2000):
        workload = build_workload(LoadProfile(requests=n), "tiny", n)
        assert sum(r.repeat_of is not None for r in workload) / len(workload) <= 0.30


def test_repeats_are_zipf_skewed() -> None:
    workload = build_workload(LoadProfile(rate_rps=20, requests=2000), "tiny", 3)
    counts = Counter(r.repeat_of for r in workload if r.repeat_of is not None)
    top = max(counts.values())
    median = statistics.median(counts.values())
    assert top >= 10 * median
    # The most popular prompt is the oldest one (rank 1 = first to appear).
    assert counts.most_common(1)[0][0] == 0


def test_bursts_raise_density_by_burst_factor() -> None:
    profile = LoadProfile(
        rate_rps=10, duration_s=1000, burst_factor=3.0, burst_every_s=10, burst_len_s=2
    )
    workload = build_workload(profile, "tiny", 5)
    burst_time = 99 * 2.0  # windows [10k, 10k + 2) for k = 1..99
    inside = sum(profile.in_burst(r.at_s) for r in workload)
    outside = len(workload) - inside
    ratio = (inside / burst_time) / (outside / (1000 - burst_time))
    assert 2.7 <= ratio <= 3.3
    # rate_rps is the mean over the whole run, bursts included.
    assert abs(len(workload) / 1000 - 10) <= 0.5
    assert all(0 <= r.at_s < 1000 for r in workload)
    assert [r.at_s for r in workload] == sorted(r.at_s for r in workload)


def test_idle_gaps_have_no_arrivals() -> None:
    profile = LoadProfile(
        rate_rps=20, duration_s=200, idle_every_s=20, idle_len_s=5, burst_every_s=7, burst_len_s=3
    )
    workload = build_workload(profile, "tiny", 11)
    times = [r.at_s for r in workload]
    for k in range(1, 10):
        start = 20.0 * k
        assert not [t for t in times if start <= t < start + 5]
        # ...and traffic on both sides of each gap.
        assert [t for t in times if start - 2 <= t < start]
        assert [t for t in times if start + 5 <= t < start + 7]
    assert not any(profile.in_idle(t) for t in times)


def test_length_ranges_and_mix() -> None:
    profile = LoadProfile(
        rate_rps=20,
        requests=1500,
        prompt_words=(3, 20),
        max_tokens=(2, 9),
        shared_prefix_fraction=0.5,
        stream_fraction=0.4,
        temperature=0.0,
    )
    workload = build_workload(profile, "tiny", 2)
    fresh = [r for r in workload if r.repeat_of is None]
    words = [len(r.body["messages"][-1]["content"].split()) for r in workload]
    tokens = [r.body["max_tokens"] for r in workload]
    assert min(words) == 3 and max(words) == 20
    assert min(tokens) == 2 and max(tokens) == 9
    for r in workload:
        assert r.body["model"] == "tiny"
        assert r.body["temperature"] == 0
        assert r.body["messages"][-1]["role"] == "user"
        text = r.body["messages"][-1]["content"]
        assert text[0].isupper() and text[-1] in ".?"
    with_system = sum(r.body["messages"][0]["role"] == "system" for r in fresh) / len(fresh)
    assert 0.4 <= with_system <= 0.6
    streamed = sum(bool(r.body.get("stream")) for r in fresh) / len(fresh)
    assert 0.3 <= streamed <= 0.5


def test_question_prompts_are_real_distinct_and_deterministic() -> None:
    profile = LoadProfile(rate_rps=20, requests=1000, prompts="questions", repeat_fraction=0.25)
    workload = build_workload(profile, "smollm2", 5)
    assert workload == build_workload(profile, "smollm2", 5)
    fresh = [r.body["messages"][-1]["content"] for r in workload if r.repeat_of is None]
    # Enough variety that a long run's fresh requests never repeat by chance.
    assert len(set(fresh)) == len(fresh) == 750
    families = {
        "What is the capital of": 0, "Which continent": 0, "What is ": 0, "List ": 0,
        "Rewrite this sentence": 0, "What does the word": 0, "Use the word": 0, "Spell": 0,
        "Give ": 0, "Translate ": 0, "Explain ": 0, "Convert ": 0, "What language": 0,
        "Name a famous": 0,
    }  # fmt: skip
    for text in fresh:
        assert text[0].isupper() and text[-1] in ".?", text
        family = next(f for f in families if text.startswith(f))
        families[family] += 1
    assert all(families.values()), families  # every kind of question is asked
    # The arithmetic is well-formed: a division always comes out whole.
    for text in fresh:
        if " divided by " in text:
            a, b = text.removeprefix("What is ").removesuffix("?").split(" divided by ")
            assert int(a) % int(b) == 0, text


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"prompts": "poems"}, "prompts must be one of words, questions"),
        ({"rate_rps": -1}, "rate_rps"),
        ({"repeat_fraction": 1.5}, "repeat_fraction"),
        ({"prompt_words": (9, 3)}, "prompt_words"),
        ({"max_tokens": (0, 3)}, "max_tokens"),
        ({"burst_len_s": 40}, "burst_len_s"),
        ({"idle_every_s": 10, "idle_len_s": 10}, "idle_len_s"),
        ({"duration_s": None}, "duration_s or requests"),
    ],
)
def test_profile_rejects_bad_values(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        LoadProfile(**overrides)


# -- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wattops load")
    add_arguments(parser)
    return parser


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--rate", "-2"], "--rate"),
        (["--rate", "fast"], "--rate"),
        (["--repeat", "1.2"], "--repeat"),
        (["--max-tokens", "64,8"], "--max-tokens"),
        (["--prompt-words", "0,5"], "--prompt-words"),
        (["--concurrency", "0"], "--concurrency"),
        (["--duration", "5", "--requests", "3"], "--requests"),
    ],
)
def test_bad_arguments_are_argparse_errors(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(argv)
    assert exited.value.code == 2
    assert named in capsys.readouterr().err


def test_options_that_do_not_fit_together_are_argparse_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = _parser().parse_args(["--burst-every", "4", "--burst-len", "5"])
    with pytest.raises(SystemExit) as exited:
        run_from_args(args)
    assert exited.value.code == 2
    assert "--burst-len (5) must be shorter than --burst-every (4)" in capsys.readouterr().err


def test_ranges_parse() -> None:
    args = _parser().parse_args(["--max-tokens", "4", "--prompt-words", "2,30", "--requests", "9"])
    assert args.max_tokens == (4, 4)
    assert args.prompt_words == (2, 30)
    assert args.requests == 9 and args.duration is None


# -- the sender, against a stand-in engine -------------------------------------------------------

_USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}


_RELEASE = web.AppKey("release", asyncio.Event)


async def _stand_in(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    if body["max_tokens"] == 999:  # held until the stand-in shuts down
        await request.app[_RELEASE].wait()
    if body["max_tokens"] == 500:
        return web.json_response({"error": {"message": "overloaded"}}, status=503)
    if not body.get("stream"):
        return web.json_response(
            {"choices": [{"message": {"content": "hi"}}], "usage": _USAGE},
            headers={
                "X-Cache": "hit" if body["max_tokens"] == 1 else "miss",
                "X-Wattops-Est-Energy-J": "1.5",
                "X-Wattops-Est-Cost-USD": "0.25",
            },
        )
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Cache": "miss"})
    await response.prepare(request)
    chunks: list[dict[str, Any]] = [
        {"choices": [{"delta": {"role": "assistant"}}]},
        {"choices": [{"delta": {"content": "hel"}}]},
        {"choices": [{"delta": {"content": "lo"}}]},
        {"choices": [], "usage": _USAGE},
    ]
    for chunk in chunks:
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _with_stand_in(use: Callable[[str], Awaitable[LoadReport]]) -> LoadReport:
    app = web.Application()
    app[_RELEASE] = asyncio.Event()
    app.router.add_post("/v1/chat/completions", _stand_in)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        return await use(f"http://{host}:{port}/")
    finally:
        app[_RELEASE].set()  # a held request would otherwise delay shutdown by a minute
        await runner.cleanup()


def _planned(at_s: float, max_tokens: int, stream: bool = False) -> PlannedRequest:
    body: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if stream:
        body["stream"] = True
    return PlannedRequest(at_s, body, None)


def test_run_load_measures_answers_and_drops_over_the_limit() -> None:
    # Six arrivals due at once with room for four in flight: the sender does not yield
    # between them, so exactly two are dropped, whatever the speed of the machine.
    workload = [
        _planned(0.0, 1),
        _planned(0.0, 5),
        _planned(0.0, 5, stream=True),
        _planned(0.0, 500),
        _planned(0.0, 5),
        _planned(0.0, 5),
    ]
    seen: list[RequestResult] = []
    report = asyncio.run(
        _with_stand_in(
            lambda url: run_load(url, workload, concurrency_limit=4, on_result=seen.append)
        )
    )
    assert len(seen) == 6
    assert (report.planned, report.sent, report.ok, report.dropped) == (6, 4, 3, 2)
    assert report.errors == {"503": 1}
    assert report.error_count == 1
    assert [r.index for r in report.results if r.dropped] == [4, 5]
    assert (report.cache_hits, report.cache_misses) == (1, 2)
    assert report.prompt_tokens == 21 and report.completion_tokens == 9
    assert report.cached_prompt_tokens == 6
    assert report.est_energy_j == 3.0 and report.est_cost_usd == 0.5
    streamed = report.results[2]
    assert streamed.stream and streamed.ok and streamed.ttft_s is not None
    assert streamed.prompt_tokens == 7  # from the usage chunk
    assert report.streamed == 1 and report.ttft.p50 is not None
    failed = report.results[3]
    assert failed.status == 503 and failed.error == "503: overloaded"
    text = report.summary()
    assert "2 dropped because 4 requests were already in flight" in text
    assert "503: 1" in text and "1 of 3 answers were hits" in text


def test_run_load_stops_cleanly() -> None:
    workload = [_planned(0.0, 5), _planned(0.0, 999), _planned(1000.0, 5)]
    stop = asyncio.Event()

    def on_result(result: RequestResult) -> None:
        stop.set()

    async def use(url: str) -> LoadReport:
        return await run_load(url, workload, on_result=on_result, stop=stop)

    report = asyncio.run(_with_stand_in(use))
    assert report.interrupted
    assert (report.sent, report.ok, report.cancelled, report.error_count) == (2, 1, 1, 0)
    assert report.summary().startswith("Stopped early: sent 2 of 3 planned requests")


# -- end to end ----------------------------------------------------------------------------------


def test_load_against_a_real_agent(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    profile = LoadProfile(
        rate_rps=4,
        requests=30,
        repeat_fraction=0.5,
        temperature=0.0,
        max_tokens=(4, 4),
        prompt_words=(3, 12),
        burst_every_s=0,
        stream_fraction=0.3,
    )
    workload = build_workload(profile, "tiny", 7)
    assert sum(r.repeat_of is not None for r in workload) == 15
    assert any(r.body.get("stream") for r in workload)
    report = asyncio.run(run_load(agent.url, workload, concurrency_limit=16))

    assert (report.sent, report.ok, report.dropped, report.errors) == (30, 30, 0, {})
    assert report.cache_hits > 0
    counters = agent.deployment("tiny")["counters"]
    assert report.cache_hits == counters["cache_hits_total"]
    assert report.cache_hits + report.cache_misses == 30
    assert all(r.prompt_tokens > 0 for r in report.results)  # usage read, streams included
    assert report.streamed > 0
    assert report.latency.p50 is not None and report.ttfb.p50 is not None

    # The CLI glue on the same agent: exit status 0 and the summary on stdout.
    argv = ["--agent", agent.url, "--requests", "5", "--rate", "5", "--quiet"]
    args = _parser().parse_args([*argv, "--max-tokens", "2", "--prompt-words", "3,8"])
    assert run_from_args(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("Sent 5 of 5 planned requests to " + agent.url)

    # A wrong model: every request is refused alike. The run gives up after a few, says why
    # in the agent's own words, and exits 1 (it used to send for its whole duration).
    argv = ["--agent", agent.url, "--model", "nope", "--requests", "200", "--rate", "50"]
    args = _parser().parse_args([*argv, "--quiet", "--max-tokens", "2"])
    assert run_from_args(args) == 1
    out = capsys.readouterr().out
    assert "Gave up: 5 requests in a row refused with 404" in out
    assert "model 'nope' is not served here; available: tiny" in out
    assert "Sent 200 of 200" not in out
