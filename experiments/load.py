"""`wattops load`: realistic OpenAI chat-completion traffic for an agent's gateway.

Two separate halves, so `wattops bench` can reuse them:

- `build_workload` turns a `LoadProfile` into a deterministic, open-loop plan: Poisson arrivals
  at a piecewise-constant rate (periodic bursts and idle gaps), prompts generated from a
  built-in word list, a share of exact repeats drawn Zipf-distributed over earlier prompts
  (so the gateway's response cache sees hits), and a shared system prompt on a share of
  requests (so llama.cpp's prefix cache sees hits). Same profile and seed, same plan.
- `run_load` sends a plan at its scheduled times with one aiohttp session and measures each
  answer into a `LoadReport`.

`add_arguments` / `run_from_args` are the CLI glue for the `wattops load` subcommand.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeAlias

import aiohttp
import numpy as np
import orjson

from wattops.experiments.questions import question
from wattops.vocabulary.net import http_connector

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "LoadProfile",
    "LoadReport",
    "Percentiles",
    "PlannedRequest",
    "RequestResult",
    "add_arguments",
    "build_workload",
    "run_from_args",
    "run_load",
]

#: The system prompt that `shared_prefix_fraction` of fresh requests start with. Long enough
#: (about 60 words) that reusing its KV in the engine's prefix cache is worth measuring.
DEFAULT_SYSTEM_PROMPT = (
    "You are the assistant of a small operations team that runs language models on its own "
    "hardware. Answer in plain English, keep answers short and concrete, and say so when you "
    "are not sure. When you describe a procedure, use numbered steps. Never invent figures: "
    "when a number is needed, explain how to measure it and which tool reports it."
)


#: The kinds of user message a workload can send (`LoadProfile.prompts`).
PROMPT_KINDS = ("words", "questions")

# -- the profile ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadProfile:
    """What traffic to generate. Invalid values raise ValueError naming the field.

    `rate_rps` is the long-run mean arrival rate over the run, bursts and idle gaps included:
    the steady rate between them is lowered to make room for the bursts (see `base_rate_rps`).
    Bursts start every `burst_every_s` seconds, the first one at `burst_every_s` (so a run
    starts at the steady rate), and last `burst_len_s`; idle gaps likewise. An idle gap wins
    over a burst. `requests`, when set, bounds the run by count instead of `duration_s`.
    """

    rate_rps: float = 2.0
    duration_s: float | None = 60.0
    requests: int | None = None
    #: Share of requests that repeat an earlier request's body exactly (the response cache
    #: can only answer byte-identical deterministic requests).
    repeat_fraction: float = 0.25
    #: Exponent of the Zipf law over earlier prompts, oldest = most popular; 0 = uniform.
    zipf_s: float = 1.1
    burst_factor: float = 3.0
    burst_every_s: float = 30.0
    burst_len_s: float = 5.0
    idle_every_s: float = 0.0
    idle_len_s: float = 10.0
    #: What the user messages are: "words" (generated sentences of `prompt_words` words, for
    #: random-weight models) or "questions" (real questions and instructions,
    #: `questions.py`, for trained models; their length is their own).
    prompts: str = "words"
    #: Inclusive (min, max) words of a "words" user message (the system prompt not counted).
    prompt_words: tuple[int, int] = (8, 64)
    #: Inclusive (min, max) `max_tokens` of a request.
    max_tokens: tuple[int, int] = (16, 128)
    #: 0 makes answers deterministic, which is what lets the response cache serve repeats.
    temperature: float = 0.0
    shared_prefix_fraction: float = 0.5
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    stream_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _problems(self) -> Iterator[str]:
        if not (math.isfinite(self.rate_rps) and self.rate_rps > 0):
            yield f"rate_rps must be a number above 0, not {self.rate_rps}"
        if self.requests is None and self.duration_s is None:
            yield "set duration_s or requests"
        if self.duration_s is not None and not (
            math.isfinite(self.duration_s) and self.duration_s > 0
        ):
            yield f"duration_s must be above 0, not {self.duration_s}"
        if self.requests is not None and self.requests < 1:
            yield f"requests must be at least 1, not {self.requests}"
        for name in ("repeat_fraction", "shared_prefix_fraction", "stream_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                yield f"{name} must be between 0 and 1, not {value}"
        if not (math.isfinite(self.zipf_s) and self.zipf_s >= 0):
            yield f"zipf_s must be 0 or more, not {self.zipf_s}"
        if not (math.isfinite(self.burst_factor) and self.burst_factor > 0):
            yield f"burst_factor must be above 0, not {self.burst_factor}"
        for kind in ("burst", "idle"):
            every, length = getattr(self, f"{kind}_every_s"), getattr(self, f"{kind}_len_s")
            if not (math.isfinite(every) and every >= 0):
                yield f"{kind}_every_s must be 0 (off) or more, not {every}"
            elif every > 0 and not 0 < length < every:
                yield (
                    f"{kind}_len_s must be above 0 and below {kind}_every_s ({every}), not {length}"
                )
        for name in ("prompt_words", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                yield f"{name} must be (min, max) with 1 <= min <= max, not ({low}, {high})"
        if self.prompts not in PROMPT_KINDS:
            yield f"prompts must be one of {', '.join(PROMPT_KINDS)}, not {self.prompts!r}"
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            yield f"temperature must be 0 or more, not {self.temperature}"

    def multiplier(self, t: float) -> float:
        """The arrival rate at `t` seconds relative to the steady rate: 0 idle, burst_factor
        in a burst, 1 otherwise."""
        if _in_window(t, self.idle_every_s, self.idle_len_s):
            return 0.0
        if _in_window(t, self.burst_every_s, self.burst_len_s):
            return self.burst_factor
        return 1.0

    def in_burst(self, t: float) -> bool:
        """True inside a burst window (and not in an idle gap)."""
        return _in_window(t, self.burst_every_s, self.burst_len_s) and not self.in_idle(t)

    def in_idle(self, t: float) -> bool:
        """True inside an idle gap."""
        return _in_window(t, self.idle_every_s, self.idle_len_s)

    def horizon_s(self) -> float:
        """The span the mean rate is held over: the duration, or the expected span of
        `requests` arrivals at `rate_rps`."""
        if self.requests is not None:
            return self.requests / self.rate_rps
        assert self.duration_s is not None
        return self.duration_s

    def base_rate_rps(self) -> float:
        """The steady rate outside bursts and gaps that makes the mean over `horizon_s()`
        equal `rate_rps`."""
        horizon = self.horizon_s()
        mass = sum(
            (end - start) * self.multiplier((start + end) / 2)
            for start, end in _segments(self, horizon)
        )
        return self.rate_rps * horizon / mass if mass > 0 else self.rate_rps


def _in_window(t: float, every: float, length: float) -> bool:
    # Windows are [k*every, k*every + length) for k >= 1: the run starts outside them.
    return every > 0 and t >= every and (t % every) < length


def _next_edge(t: float, every: float, length: float) -> float:
    if every <= 0:
        return math.inf
    start = math.floor(t / every) * every
    return next(e for e in (start + length, start + every, start + every + length) if e > t)


def _segments(profile: LoadProfile, until: float) -> Iterator[tuple[float, float]]:
    """Consecutive [start, end) spans over which the rate is constant, up to `until`."""
    t = 0.0
    while t < until:
        end = min(
            until,
            _next_edge(t, profile.burst_every_s, profile.burst_len_s),
            _next_edge(t, profile.idle_every_s, profile.idle_len_s),
        )
        yield t, end
        t = end


# -- the workload --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request of a plan: when to send it (seconds from the start) and what to send.

    `repeat_of` is the index in the plan of the request whose body this one repeats exactly,
    or None for a fresh prompt.
    """

    at_s: float
    body: dict[str, Any]
    repeat_of: int | None


class _Uniforms:
    """Uniform draws from a generator, fetched in blocks: per-value numpy calls would be the
    bulk of the time spent generating prompts. Consumption order is fixed, so it stays
    deterministic."""

    def __init__(self, rng: np.random.Generator, block: int = 4096) -> None:
        self.rng = rng
        self.block = block
        self.buffer: list[float] = []
        self.pos = 0

    def next(self) -> float:
        if self.pos >= len(self.buffer):
            self.buffer = self.rng.random(self.block).tolist()
            self.pos = 0
        value = self.buffer[self.pos]
        self.pos += 1
        return value

    def index(self, n: int) -> int:
        return min(int(self.next() * n), n - 1)

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high], both included."""
        return low + self.index(high - low + 1)

    def pick(self, options: tuple[str, ...]) -> str:
        return options[self.index(len(options))]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "server cluster request model cache token replica node budget invoice report dashboard "
    "alert metric query database backup schedule deployment network policy customer order "
    "shipment contract meeting project team release feature incident ticket outage latency "
    "battery engine garden kitchen recipe river mountain city train museum library book story "
    "letter email message document spreadsheet chart forecast price market plan strategy "
    "experiment sample dataset pipeline function program compiler kernel driver sensor camera "
    "printer laptop phone warehouse supplier holiday weekend lecture exam course interview "
    "article newsletter survey budget policy rack fan heater bill contractor neighbour"
)
_ADJECTIVES = _words(
    "quick simple detailed short long careful reliable cheap expensive small large new old busy "
    "idle slow fast quiet noisy recent daily weekly monthly public private safe risky clear vague "
    "accurate rough complete partial modern legacy local remote shared hidden important urgent "
    "friendly formal useful strange familiar"
)
_VERBS = _words(
    "explain describe compare summarize improve check measure reduce increase fix plan design "
    "test review write translate organize schedule estimate monitor restart update install "
    "configure clean sort find choose avoid prepare document simplify automate"
)
_ADVERBS = _words(
    "quickly carefully safely cheaply clearly briefly reliably quietly today properly again"
)
_PREPOSITIONS = _words("for in on with without during after before about across under near")
_NUMBERS = _words("two three four five six seven ten")
_TEMPLATES = (
    "How do I {v} a {adj} {n} {p} the {n}?",
    "Please {v} the {n} {p} our {adj} {n}.",
    "What is the best way to {v} a {n} {adv}?",
    "Explain why the {n} is {adj} {p} the {n}.",
    "Write a {adj} {n} about the {n} {p} a {adj} {n}.",
    "Can you {v} this {n} and {v} the {n}?",
    "Compare a {adj} {n} with a {adj} {n}.",
    "List {num} ways to {v} the {n} {adv}.",
    "Our {n} has been {adj} since the {adj} {n}.",
    "Give me a {adj} {n} for the {n} team.",
    "I need to {v} the {n} before the {adj} {n}.",
    "Why would a {n} {v} the {n} {adv}?",
    "Please {v} the {n}.",
    "Is the {n} {adj}?",
    "Check the {adj} {n} {adv}.",
    "Why is the {n} so {adj}?",
    "What does a {adj} {n} need?",
)
#: Endings for the last one to three words of a prompt, so no prompt stops mid-sentence.
_CLOSERS = {
    1: ("Thanks.", "Why?", "Please."),
    2: ("Please help.", "Be brief.", "Any ideas?", "Thank you."),
    3: ("Keep it short.", "Explain your reasoning.", "Thanks in advance.", "Is that possible?"),
}
_SLOTS = {
    "n": _NOUNS,
    "adj": _ADJECTIVES,
    "v": _VERBS,
    "adv": _ADVERBS,
    "p": _PREPOSITIONS,
    "num": _NUMBERS,
}
_SLOT = re.compile(r"^\{(\w+)\}(.*)$")
_Piece: TypeAlias = str | tuple[tuple[str, ...], str]  # a literal word, or (options, punctuation)


def _compile(template: str) -> tuple[_Piece, ...]:
    # Parsed once: a regex substitution per sentence was most of the generation time.
    pieces: list[_Piece] = []
    for word in template.split():
        slot = _SLOT.match(word)
        pieces.append((_SLOTS[slot.group(1)], slot.group(2)) if slot else word)
    return tuple(pieces)


_COMPILED = tuple(_compile(t) for t in _TEMPLATES)
_LONGEST = max(len(t) for t in _COMPILED)
#: For each number of words left (capped at the longest template), the templates that fit:
#: what is left after one is then 0, a closer, or room for the shortest template (4 words).
_FITS = {
    left: tuple(i for i, t in enumerate(_COMPILED) if len(t) <= left)
    for left in range(4, _LONGEST + 1)
}


def _sentence(draw: _Uniforms, pieces: tuple[_Piece, ...], out: list[str]) -> None:
    for piece in pieces:
        if isinstance(piece, str):
            out.append(piece)
            continue
        word = draw.pick(piece[0])
        if out and out[-1] in ("a", "A") and word[0] in "aeiou":
            out[-1] += "n"
        out.append(word + piece[1])


def _prompt_text(draw: _Uniforms, n_words: int) -> str:
    """Whole sentences adding up to exactly `n_words` words."""
    words: list[str] = []
    left = n_words
    while left > 0:
        if left in _CLOSERS:
            words.extend(draw.pick(_CLOSERS[left]).split())
            break
        fits = _FITS[min(left, _LONGEST)]
        chosen = _COMPILED[fits[draw.index(len(fits))]]
        _sentence(draw, chosen, words)
        left -= len(chosen)
    return " ".join(words)


def _arrivals(profile: LoadProfile, rng: np.random.Generator) -> list[float]:
    """Poisson arrival times at the profile's piecewise-constant rate.

    Time rescaling: unit-mean exponential gaps are spent as "rate mass" walking forward
    through the constant-rate segments, which is exact for a piecewise-constant rate and
    skips idle gaps without rejection sampling.
    """
    base = profile.base_rate_rps()
    limit = profile.requests
    until = math.inf if limit is not None else float(profile.duration_s or 0.0)
    draw = _Uniforms(rng)
    times: list[float] = []
    t = 0.0
    while limit is None or len(times) < limit:
        need = -math.log1p(-draw.next())  # Exp(1)
        while True:
            end = min(
                _next_edge(t, profile.burst_every_s, profile.burst_len_s),
                _next_edge(t, profile.idle_every_s, profile.idle_len_s),
            )
            rate = base * profile.multiplier(t if math.isinf(end) else (t + end) / 2)
            if rate > 0 and need <= rate * (end - t):
                t += need / rate
                break
            if math.isinf(end):  # rate 0 forever cannot happen: windows are shorter than periods
                raise AssertionError("no arrivals possible")
            need -= rate * (end - t)
            t = end
        if t >= until:
            break
        times.append(t)
    return times


def build_workload(
    profile: LoadProfile, deployment: str, seed: int | None = None
) -> list[PlannedRequest]:
    """The plan for `profile` against `deployment`, identical for identical arguments.

    `seed` defaults to `profile.seed`. Arrival times, which requests repeat, and the prompt
    texts come from independent streams of the seed, so changing one setting (say the
    prompt lengths) does not reshuffle the arrival times.
    """
    streams = np.random.SeedSequence(profile.seed if seed is None else seed).spawn(3)
    arrival_rng, repeat_rng, text_rng = (np.random.default_rng(s) for s in streams)
    times = _arrivals(profile, arrival_rng)
    n = len(times)

    # An exact count rather than a coin per request: the share of repeats then never exceeds
    # repeat_fraction, however short the run (the first request cannot repeat anything).
    n_repeats = min(math.floor(profile.repeat_fraction * n), max(n - 1, 0))
    repeat_at = set(repeat_rng.choice(np.arange(1, n), size=n_repeats, replace=False).tolist())
    zipf_pick = _Uniforms(repeat_rng)
    # Popularity rank = order of first appearance: rank k is drawn with weight k^-s.
    cumulative = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -profile.zipf_s)

    draw = _Uniforms(text_rng)
    originals: list[int] = []  # plan index of each distinct prompt, in order of appearance
    seen: dict[str, int] = {}
    plan: list[PlannedRequest] = []
    for index, at in enumerate(times):
        if index in repeat_at:
            rank = int(
                np.searchsorted(
                    cumulative[: len(originals)],
                    zipf_pick.next() * cumulative[len(originals) - 1],
                    side="right",
                )
            )
            source = originals[min(rank, len(originals) - 1)]
            plan.append(PlannedRequest(at, _copy_body(plan[source].body), source))
            continue
        content = ""
        for _ in range(20):  # a fresh prompt must not repeat an earlier one by chance
            if profile.prompts == "questions":
                content = question(draw)
            else:
                content = _prompt_text(draw, draw.integer(*profile.prompt_words))
            if content not in seen:
                break
        if content in seen:  # tiny vocabularies of lengths: an honest, labelled repeat
            source = seen[content]
            plan.append(PlannedRequest(at, _copy_body(plan[source].body), source))
            continue
        messages: list[dict[str, str]] = []
        if draw.next() < profile.shared_prefix_fraction:
            messages.append({"role": "system", "content": profile.system_prompt})
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {
            "model": deployment,
            "messages": messages,
            "max_tokens": draw.integer(*profile.max_tokens),
            "temperature": profile.temperature,
        }
        if draw.next() < profile.stream_fraction:
            body["stream"] = True
            # Ask for the usage chunk at the end; the response cache ignores stream_options.
            body["stream_options"] = {"include_usage": True}
        seen[content] = index
        originals.append(index)
        plan.append(PlannedRequest(at, body, None))
    return plan


def _copy_body(body: dict[str, Any]) -> dict[str, Any]:
    # Equal content, separate objects: a caller editing one request must not edit another.
    copied = orjson.loads(orjson.dumps(body))
    assert isinstance(copied, dict)
    return copied


# -- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestResult:
    """What happened to one planned request.

    `status` is None when no HTTP answer came (connection failure, timeout, or dropped).
    Times are seconds; `sent_s` is measured from the start of the run, the others from the
    moment the request was sent. `ttft_s` is set for streamed answers only: the first SSE
    data chunk that carries generated text.
    """

    index: int
    at_s: float
    sent_s: float | None
    status: int | None
    error: str | None = None
    dropped: bool = False
    stream: bool = False
    repeat_of: int | None = None
    latency_s: float | None = None
    ttfb_s: float | None = None
    ttft_s: float | None = None
    cache: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    est_energy_j: float | None = None
    est_cost_usd: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None

    @property
    def error_kind(self) -> str | None:
        """The key this result is counted under in `LoadReport.errors`; None if not an error."""
        if self.dropped or self.ok:
            return None
        if self.status is not None and self.status != 200:
            return str(self.status)
        return (self.error or "error").split(":", 1)[0]


class Percentiles(NamedTuple):
    """p50, p95 and p99 in seconds; None where there were no samples."""

    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            return cls(None, None, None)
        p50, p95, p99 = np.percentile(np.asarray(values), [50, 95, 99]).tolist()
        return cls(p50, p95, p99)

    def text(self) -> str:
        if self.p50 is None:
            return "n/a"
        return "/".join(_seconds(v) for v in self)


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


@dataclass(frozen=True)
class LoadReport:
    """The outcome of one `run_load`. Build it with `LoadReport.build`.

    `sent` excludes `dropped` (arrivals that found `concurrency_limit` requests in flight:
    an open loop drops them rather than delaying them, which would bend the schedule).
    `cancelled` requests were in flight when the run was stopped early; they are neither
    ok nor errors. `achieved_rps` is sent requests per second of the sending window.
    """

    agent_url: str
    planned: int
    sent: int
    ok: int
    errors: dict[str, int]
    dropped: int
    cancelled: int
    interrupted: bool
    concurrency_limit: int
    elapsed_s: float
    send_window_s: float
    achieved_rps: float
    latency: Percentiles
    ttfb: Percentiles
    ttft: Percentiles
    send_lag_p99_s: float | None
    streamed: int
    cache_hits: int
    cache_misses: int
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    est_energy_j: float | None
    est_cost_usd: float | None
    results: list[RequestResult] = field(repr=False)
    #: Why the run gave up before its end (a run of identical refusals), if it did.
    gave_up: str | None = None

    @classmethod
    def build(
        cls,
        agent_url: str,
        planned: int,
        results: list[RequestResult],
        *,
        cancelled: int = 0,
        interrupted: bool = False,
        concurrency_limit: int = 64,
        elapsed_s: float = 0.0,
        send_window_s: float = 0.0,
        gave_up: str | None = None,
    ) -> LoadReport:
        results = sorted(results, key=lambda r: r.index)
        sent = [r for r in results if not r.dropped]
        good = [r for r in sent if r.ok]
        errors: dict[str, int] = {}
        for r in sent:
            kind = r.error_kind
            if kind is not None:
                errors[kind] = errors.get(kind, 0) + 1
        energy = [r.est_energy_j for r in good if r.est_energy_j is not None]
        cost = [r.est_cost_usd for r in good if r.est_cost_usd is not None]
        lags = [r.sent_s - r.at_s for r in sent if r.sent_s is not None]
        return cls(
            agent_url=agent_url,
            planned=planned,
            sent=len(sent) + cancelled,
            ok=len(good),
            errors=dict(sorted(errors.items())),
            dropped=sum(r.dropped for r in results),
            cancelled=cancelled,
            interrupted=interrupted,
            concurrency_limit=concurrency_limit,
            elapsed_s=elapsed_s,
            send_window_s=send_window_s,
            achieved_rps=(len(sent) + cancelled) / send_window_s if send_window_s > 0 else 0.0,
            latency=Percentiles.of([r.latency_s for r in good if r.latency_s is not None]),
            ttfb=Percentiles.of([r.ttfb_s for r in good if r.ttfb_s is not None]),
            ttft=Percentiles.of([r.ttft_s for r in good if r.ttft_s is not None]),
            send_lag_p99_s=Percentiles.of(lags).p99,
            streamed=sum(r.stream for r in good),
            cache_hits=sum(r.cache == "hit" for r in good),
            cache_misses=sum(r.cache == "miss" for r in good),
            prompt_tokens=sum(r.prompt_tokens for r in good),
            completion_tokens=sum(r.completion_tokens for r in good),
            cached_prompt_tokens=sum(r.cached_prompt_tokens for r in good),
            est_energy_j=sum(energy) if energy else None,
            est_cost_usd=sum(cost) if cost else None,
            results=results,
            gave_up=gave_up,
        )

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def cache_hit_rate(self) -> float | None:
        """Response-cache hits over the answers that said whether they were one."""
        seen = self.cache_hits + self.cache_misses
        return self.cache_hits / seen if seen else None

    def summary(self) -> str:
        """One paragraph for people."""
        parts = [
            f"{'Stopped early: sent' if self.interrupted else 'Sent'} {self.sent} of "
            f"{self.planned} planned requests to {self.agent_url} in {self.elapsed_s:.1f} s "
            f"({self.achieved_rps:.2f} req/s offered over {self.send_window_s:.1f} s); "
            f"{self.ok} ok, {self.error_count} "
            f"{'error' if self.error_count == 1 else 'errors'}"
            + (
                " (" + ", ".join(f"{k}: {v}" for k, v in self.errors.items()) + ")"
                if self.errors
                else ""
            )
        ]
        if self.dropped:
            parts.append(
                f"{self.dropped} dropped because {self.concurrency_limit} requests were already "
                "in flight (open loop: late arrivals are dropped, not delayed)"
            )
        if self.cancelled:
            parts.append(f"{self.cancelled} in flight when stopped and abandoned")
        text = ", ".join(parts) + "."
        if self.gave_up:
            text += f" Gave up: {self.gave_up}."
        if self.ok:
            text += (
                f" Latency p50/p95/p99 {self.latency.text()}; time to first byte {self.ttfb.text()}"
            )
            if self.streamed:
                text += f"; time to first token ({self.streamed} streamed) {self.ttft.text()}"
            text += "."
            rate = self.cache_hit_rate
            if rate is not None:
                text += (
                    f" Response cache: {self.cache_hits} of {self.cache_hits + self.cache_misses}"
                    f" answers were hits ({rate:.1%})."
                )
            text += (
                f" Tokens: {self.prompt_tokens:,} prompt ({self.cached_prompt_tokens:,} from the "
                f"prefix cache), {self.completion_tokens:,} completion."
            )
            if self.est_energy_j is not None or self.est_cost_usd is not None:
                text += (
                    f" Gateway estimates: {self.est_energy_j or 0.0:.4g} J, "
                    f"${self.est_cost_usd or 0.0:.4g}."
                )
        if self.send_lag_p99_s is not None and self.send_lag_p99_s > 0.05:
            # The plan is only as good as the sender's ability to keep to it.
            text += (
                f" Sends ran up to {_seconds(self.send_lag_p99_s)} (p99) behind schedule: "
                "the load generator itself was short of CPU."
            )
        return text


#: Identical client errors (4xx but 429) in a row after which a run stops sending.
GIVE_UP_AFTER = 5


async def run_load(
    agent_url: str,
    workload: list[PlannedRequest],
    concurrency_limit: int = 64,
    token: str | None = None,
    on_result: Callable[[RequestResult], None] | None = None,
    timeout_s: float = 120,
    stop: asyncio.Event | None = None,
) -> LoadReport:
    """Send `workload` to `agent_url` at its scheduled times and measure the answers.

    Open loop: each request goes out at its time whatever happened to earlier ones. At most
    `concurrency_limit` are in flight; an arrival that finds the limit reached is dropped
    and counted, not queued. `on_result` is called once per request as it finishes or is
    dropped. Setting `stop` ends the run early: nothing more is sent, the requests in flight
    are abandoned (counted as `cancelled`, not reported one by one), and the report covers
    what finished.
    """
    if concurrency_limit < 1:
        raise ValueError(f"concurrency_limit must be at least 1, not {concurrency_limit}")
    url = agent_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    results: list[RequestResult] = []
    tasks: set[asyncio.Task[None]] = set()
    started = time.perf_counter()
    last_send = 0.0
    in_flight = 0
    #: The same refusal over and over (a wrong URL, model or token) will not get better.
    halt = asyncio.Event()
    gave_up: str | None = None
    streak: tuple[tuple[int, str | None] | None, int] = (None, 0)

    def record(result: RequestResult) -> None:
        nonlocal gave_up, streak
        results.append(result)
        if on_result is not None:
            on_result(result)
        if result.status is not None and 400 <= result.status < 500 and result.status != 429:
            key = (result.status, result.error)
            streak = (key, streak[1] + 1 if streak[0] == key else 1)
            if streak[1] >= GIVE_UP_AFTER and gave_up is None:
                gave_up = (f"{streak[1]} requests in a row refused with {result.status}: "
                           f"{result.error}")  # fmt: skip
                halt.set()
        elif not result.dropped:
            streak = (None, 0)

    async def send(session: aiohttp.ClientSession, index: int, planned: PlannedRequest) -> None:
        nonlocal in_flight
        try:
            record(await _send_one(session, url, headers, index, planned, started))
        finally:
            in_flight -= 1

    async def schedule(session: aiohttp.ClientSession) -> None:
        nonlocal in_flight, last_send
        loop = asyncio.get_running_loop()
        origin = loop.time()
        for index, planned in enumerate(workload):
            delay = origin + planned.at_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            last_send = time.perf_counter() - started
            if in_flight >= concurrency_limit:
                record(
                    RequestResult(
                        index=index,
                        at_s=planned.at_s,
                        sent_s=None,
                        status=None,
                        error=f"dropped: {concurrency_limit} requests already in flight",
                        dropped=True,
                        stream=bool(planned.body.get("stream")),
                        repeat_of=planned.repeat_of,
                    )
                )
                continue
            in_flight += 1
            task = asyncio.create_task(send(session, index, planned))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def until_stopped(work: asyncio.Future[Any]) -> bool:
        """Wait for `work`; True if `stop` (or giving up) came first."""
        stoppers = [asyncio.ensure_future(e.wait()) for e in (stop, halt) if e is not None]
        try:
            await asyncio.wait({work, *stoppers}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for stopper in stoppers:
                stopper.cancel()
        if work.done():
            work.result()  # re-raise a failure of the work itself
            return False
        return True

    interrupted = False
    cancelled = 0
    connector = http_connector(limit=concurrency_limit, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(timeout_s, 10))
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        scheduler = asyncio.ensure_future(schedule(session))
        drain: asyncio.Future[Any] | None = None
        try:
            interrupted = await until_stopped(scheduler)
            if not interrupted and tasks:
                drain = asyncio.gather(*tasks)
                interrupted = await until_stopped(drain)
        finally:
            scheduler.cancel()
            pending = [t for t in tasks if not t.done()]
            cancelled = len(pending)
            for task in pending:
                task.cancel()
            waited = [scheduler, *pending, *([drain] if drain is not None else [])]
            await asyncio.gather(*waited, return_exceptions=True)
    return LoadReport.build(
        agent_url,
        len(workload),
        results,
        cancelled=cancelled,
        interrupted=interrupted,
        concurrency_limit=concurrency_limit,
        elapsed_s=time.perf_counter() - started,
        send_window_s=last_send,
        gave_up=gave_up,
    )


async def _send_one(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    index: int,
    planned: PlannedRequest,
    started: float,
) -> RequestResult:
    stream = bool(planned.body.get("stream"))
    payload = orjson.dumps(planned.body)
    t0 = time.perf_counter()
    fields: dict[str, Any] = {}
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            # aiohttp returns once the status line and headers are in: the first bytes.
            fields["ttfb_s"] = time.perf_counter() - t0
            fields["status"] = resp.status
            fields["cache"] = resp.headers.get("X-Cache")
            fields["est_energy_j"] = _float_header(resp.headers.get("X-Wattops-Est-Energy-J"))
            fields["est_cost_usd"] = _float_header(resp.headers.get("X-Wattops-Est-Cost-USD"))
            if stream and resp.status == 200:
                usage, ttft = await _read_sse(resp, t0)
                fields["ttft_s"] = ttft
            else:
                data = await resp.read()
                usage = _usage_of(data) if resp.status == 200 else None
                if resp.status != 200:
                    fields["error"] = _error_message(resp.status, data)
            fields["latency_s"] = time.perf_counter() - t0
    except TimeoutError:
        fields["error"] = "timeout: no complete answer in time"
        fields.pop("status", None)
        usage = None
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        fields["error"] = f"connection: {type(exc).__name__}: {exc}"
        fields.pop("status", None)
        usage = None
    if usage:
        details = usage.get("prompt_tokens_details") or {}
        fields["prompt_tokens"] = _int(usage.get("prompt_tokens"))
        fields["completion_tokens"] = _int(usage.get("completion_tokens"))
        fields["cached_prompt_tokens"] = _int(
            details.get("cached_tokens") if isinstance(details, dict) else 0
        )
    if "error" in fields:
        fields.pop("latency_s", None)
    return RequestResult(
        index=index,
        at_s=planned.at_s,
        sent_s=t0 - started,
        status=fields.pop("status", None),
        stream=stream,
        repeat_of=planned.repeat_of,
        **fields,
    )


async def _read_sse(
    resp: aiohttp.ClientResponse, t0: float
) -> tuple[dict[str, Any] | None, float | None]:
    """Read an SSE answer to the end: (usage if a chunk carried it, time to first token)."""
    usage: dict[str, Any] | None = None
    ttft: float | None = None
    async for line in resp.content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            continue
        # Parse only chunks that can matter: until the first token, and any carrying usage.
        if ttft is not None and b'"usage"' not in data:
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(chunk, dict):
            continue
        if ttft is None and _has_text(chunk):
            ttft = time.perf_counter() - t0
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
    return usage, ttft


def _has_text(chunk: dict[str, Any]) -> bool:
    # Some servers send a role-only delta before generating anything; that is not a token.
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if choice.get("text") or (
            isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls"))
        ):
            return True
    return False


def _usage_of(data: bytes) -> dict[str, Any] | None:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    usage = body.get("usage") if isinstance(body, dict) else None
    return usage if isinstance(usage, dict) else None


def _error_message(status: int, data: bytes) -> str:
    try:
        message = orjson.loads(data)["error"]["message"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        message = data[:200].decode(errors="replace")
    return f"{status}: {message}"


def _float_header(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- command line ----------------------------------------------------------------------------


def _number(kind: str, check: Callable[[float], bool]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; {kind}") from None
        if not (math.isfinite(value) and check(value)):
            raise argparse.ArgumentTypeError(f"{text} is not allowed; {kind}")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; use 1 or more")
    return value


def _range(text: str) -> tuple[int, int]:
    pieces = text.split(",")
    try:
        values = [int(p) for p in pieces]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not MIN or MIN,MAX (whole numbers)"
        ) from None
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN or MIN,MAX")
    low, high = values[0], values[-1]
    if low < 1:
        raise argparse.ArgumentTypeError(f"MIN must be 1 or more, not {low}")
    if low > high:
        raise argparse.ArgumentTypeError(f"MIN ({low}) must not be above MAX ({high})")
    return low, high


_positive = _number("use a number above 0", lambda v: v > 0)
_non_negative = _number("use 0 or more", lambda v: v >= 0)
_fraction = _number("use a number from 0 to 1", lambda v: 0 <= v <= 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `wattops load`."""
    parser.add_argument(
        "--agent",
        default="http://127.0.0.1:8080",
        metavar="URL",
        help="the agent's base URL (default %(default)s)",
    )
    parser.add_argument(
        "--model",
        default="tiny",
        metavar="DEPLOYMENT",
        help="deployment name, the `model` field (default %(default)s)",
    )
    parser.add_argument(
        "--rate",
        type=_positive,
        default=2.0,
        metavar="RPS",
        help="mean requests per second over the run, bursts included (default 2)",
    )
    span = parser.add_mutually_exclusive_group()
    span.add_argument(
        "--duration", type=_positive, metavar="SECONDS", help="how long to send (default 60)"
    )
    span.add_argument("--requests", type=_count, metavar="N", help="send N requests instead")
    parser.add_argument(
        "--concurrency",
        type=_count,
        default=64,
        metavar="N",
        help="most requests in flight; arrivals over it are dropped, not delayed (default 64)",
    )
    parser.add_argument(
        "--repeat",
        type=_fraction,
        default=0.25,
        metavar="FRACTION",
        help="share of requests repeating an earlier one exactly, 0-1 (default 0.25)",
    )
    parser.add_argument(
        "--burst-factor",
        type=_positive,
        default=3.0,
        metavar="X",
        help="arrival rate in a burst relative to the steady rate (default 3)",
    )
    parser.add_argument(
        "--burst-every",
        type=_non_negative,
        default=30.0,
        metavar="SECONDS",
        help="a burst every SECONDS, the first after SECONDS (default 30; 0: no bursts)",
    )
    parser.add_argument(
        "--burst-len", type=_positive, default=5.0, metavar="SECONDS", help="default 5"
    )
    parser.add_argument(
        "--idle-every",
        type=_non_negative,
        default=0.0,
        metavar="SECONDS",
        help="a gap with no arrivals every SECONDS (default 0: none)",
    )
    parser.add_argument(
        "--idle-len", type=_positive, default=10.0, metavar="SECONDS", help="default 10"
    )
    parser.add_argument(
        "--max-tokens",
        type=_range,
        default=(16, 128),
        metavar="MIN[,MAX]",
        help="max_tokens of each request, drawn from the range (default 16,128)",
    )
    parser.add_argument(
        "--prompts",
        choices=PROMPT_KINDS,
        default="words",
        help="user messages: generated word lists (random-weight models) or real questions "
        "and instructions (trained models) (default %(default)s)",
    )
    parser.add_argument(
        "--prompt-words",
        type=_range,
        default=(8, 64),
        metavar="MIN[,MAX]",
        help="words in a generated user message (default 8,64; not with --prompts questions)",
    )
    parser.add_argument(
        "--temperature",
        type=_non_negative,
        default=0.0,
        metavar="T",
        help="default 0: deterministic answers, which the response cache can serve",
    )
    parser.add_argument(
        "--shared-prefix",
        type=_fraction,
        default=0.5,
        metavar="FRACTION",
        help="share of requests starting with a common system prompt (default 0.5)",
    )
    parser.add_argument(
        "--stream-fraction", type=_fraction, default=0.0, metavar="FRACTION", help="default 0"
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=120.0,
        metavar="SECONDS",
        help="per request, whole answer (default 120)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="same seed, same requests (default %(default)s)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines, summary only")
    # Kept so run_from_args can report checks across options the way argparse reports its own.
    parser.set_defaults(_load_parser=parser)


def _profile_from_args(args: argparse.Namespace) -> LoadProfile | str:
    """The profile, or the message naming the options that do not fit together."""
    if args.burst_every > 0 and args.burst_len >= args.burst_every:
        return (
            f"--burst-len ({args.burst_len:g}) must be shorter than --burst-every "
            f"({args.burst_every:g})"
        )
    if args.idle_every > 0 and args.idle_len >= args.idle_every:
        return (
            f"--idle-len ({args.idle_len:g}) must be shorter than --idle-every "
            f"({args.idle_every:g})"
        )
    duration = None if args.requests is not None else (args.duration or 60.0)
    try:
        return LoadProfile(
            rate_rps=args.rate,
            duration_s=duration,
            requests=args.requests,
            repeat_fraction=args.repeat,
            burst_factor=args.burst_factor,
            burst_every_s=args.burst_every,
            burst_len_s=args.burst_len,
            idle_every_s=args.idle_every,
            idle_len_s=args.idle_len,
            prompts=args.prompts,
            prompt_words=args.prompt_words,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            shared_prefix_fraction=args.shared_prefix,
            stream_fraction=args.stream_fraction,
            seed=args.seed,
        )
    except ValueError as exc:
        return str(exc)


class _Progress:
    """Running counts for the live progress line."""

    def __init__(self, planned: int) -> None:
        self.planned = planned
        self.started = time.perf_counter()
        self.done = self.ok = self.errors = self.dropped = self.hits = 0
        self.latencies: list[float] = []

    def add(self, result: RequestResult) -> None:
        self.done += 1
        if result.dropped:
            self.dropped += 1
        elif result.ok:
            self.ok += 1
            self.hits += result.cache == "hit"
            if result.latency_s is not None:
                self.latencies.append(result.latency_s)
        else:
            self.errors += 1

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        p50 = _seconds(float(np.median(self.latencies))) if self.latencies else "n/a"
        return (
            f"{elapsed:6.1f}s  {self.done}/{self.planned} done  ok {self.ok}  "
            f"errors {self.errors}  dropped {self.dropped}  cache hits {self.hits}  "
            f"{self.done / elapsed if elapsed > 0 else 0.0:.1f} req/s  p50 {p50}"
        )


async def _run_with_progress(
    args: argparse.Namespace, workload: list[PlannedRequest], progress: _Progress
) -> LoadReport:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Ctrl-C sets `stop` rather than raising, so the report of what finished survives.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            previous = signal.getsignal(sig)
            loop.add_signal_handler(sig, stop.set)
            handled[sig] = previous
    tty = sys.stderr.isatty()

    async def show() -> None:
        while True:
            await asyncio.sleep(2.0 if tty else 5.0)
            if tty:  # redraw one line in a terminal; plain lines in a log
                print(f"\r{progress.line()}\033[K", end="", file=sys.stderr, flush=True)
            else:
                print(progress.line(), file=sys.stderr, flush=True)

    printer = None if args.quiet else asyncio.create_task(show())
    try:
        return await run_load(
            args.agent,
            workload,
            concurrency_limit=args.concurrency,
            token=os.environ.get("WATTOPS_TOKEN") or None,
            on_result=progress.add,
            timeout_s=args.timeout,
            stop=stop,
        )
    finally:
        if printer is not None:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
            if tty:
                print(file=sys.stderr)
        for sig, previous in handled.items():
            loop.remove_signal_handler(sig)
            if previous is not None:  # hand back whatever the caller had installed
                signal.signal(sig, previous)


def run_from_args(args: argparse.Namespace) -> int:
    """Run `wattops load`: 0 if every sent request succeeded, 1 if any failed, 2 for bad
    options, 130 when stopped with Ctrl-C (after printing the summary so far)."""
    profile = _profile_from_args(args)
    if isinstance(profile, str):
        parser = getattr(args, "_load_parser", None)
        if isinstance(parser, argparse.ArgumentParser):
            parser.error(profile)  # exits 2 with the usage line, like any argparse error
        print(f"wattops load: error: {profile}", file=sys.stderr)
        return 2
    workload = build_workload(profile, args.model, profile.seed)
    if not args.quiet:
        span = (
            f"{profile.requests} requests"
            if profile.requests is not None
            else f"{profile.duration_s:g} s"
        )
        print(
            f"wattops load: {len(workload)} requests planned ({span} at {profile.rate_rps:g} "
            f"req/s mean, {profile.repeat_fraction:.0%} repeats) to {args.agent}, "
            f"deployment {args.model!r}; Ctrl-C stops and prints the summary",
            file=sys.stderr,
        )
    progress = _Progress(len(workload))
    runner_kwargs: dict[str, Any] = {}
    try:
        import uvloop

        runner_kwargs["loop_factory"] = uvloop.new_event_loop
    except ImportError:  # the standard loop is slower, not wrong
        pass
    try:
        with asyncio.Runner(**runner_kwargs) as runner:
            report = runner.run(_run_with_progress(args, workload, progress))
    except KeyboardInterrupt:  # only before the loop installed its own handler
        print("wattops load: stopped before any request was sent", file=sys.stderr)
        return 130
    print(report.summary())
    if report.interrupted and not report.gave_up:
        return 130
    return 0 if report.error_count == 0 else 1
