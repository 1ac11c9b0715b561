"""Canary precision switches: a candidate precision proves itself on live traffic first.

`POST /v1/deployments/{name}/precision` with a `canary` starts one replica at the candidate
precision beside the serving ones. For `duration_s` it takes `share` of the deployment's live
requests (a smooth weighted round robin: with 0.1, every tenth request), and `shadow_share` of
the answered requests (a quarter by default, spread evenly) are **shadowed**: sent again,
greedily (temperature 0, at most `SHADOW_MAX_TOKENS` tokens, not streamed), to one serving
replica and to the candidate, and the two answers compared (exact match and chrF,
`vocabulary/agreement.py`, as `wattops quality` compares precisions). Shadow answers are
discarded; they run one at a time and only while the candidate is idle (its live requests never
wait behind one), the serving side answering on its least busy replica, where a live request
may wait for at most one short greedy answer.

**Labelled probes**: while the candidate is idle, the canary also asks both sides `probes`
items of the shipped labelled set (`wattops.quality.labelled.probe_sample`: the same items,
in the same order, every time), one at a time, greedily, as `wattops quality` asks them, and
scores each answer right or wrong. The paired result (the same items on both sides) gives the
accuracy the candidate loses, with its 95% interval (Agresti-Min, `wattops.quality.intervals`);
their shared greedy prefixes add to the KL. Probes check that the candidate *as deployed*
answers as well as the serving precision, on questions whose answers are known; shadowed live
requests have no known answer, only agreement.

Both sides are measured on the same node over the same window, the way the accounting counts:

- J/token: the deployment's active energy over the window, split between the sides by their
  replicas' busy seconds, over the tokens their replicas evaluated (prompt + completion, from
  the engines' counters; shadow requests count on both sides alike);
- $/1M tokens: the share of the node each side's replicas held (memory or compute, as the
  accounting's shares), at the node's price, plus electricity for its energy, per token;
- latency p50/p95 of the live requests each side answered.

When the window ends, the guards decide (each optional, `api.CanaryGuards`): too few shadowed
pairs (`min_pairs`), probes not all answered, no KL measured while `max_kl` is set, or too few
live requests on either side to compare latency (`MIN_SIDE_REQUESTS`), is **inconclusive** and
rolls back, never a silent promote; otherwise every guard must hold (`max_accuracy_drop` on the
probes, `max_kl`, `min_agreement` when set, `max_p95_change`, `max_j_per_token_change`) for a
**promote** (the zero-downtime switch, adopting the candidate replica), else **rolled back**
(the candidate is drained and stopped; clients see no change). A candidate that crashes or
fails more than `MAX_ERROR_RATE` of its requests (after 5) rolls back at once. The verdict and
every figure, each guard's with its interval where it has one, stay in the deployment's status
until the next canary.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from wattops.agents.api import CanaryRequest, CanarySide, CanaryStatus, ReplicaState
from wattops.quality.intervals import PairedDrop, paired_drop
from wattops.quality.labelled import LabelledItem, probe_sample
from wattops.vocabulary.agreement import AnswerAgreement, agreement

if TYPE_CHECKING:
    from wattops.agents.cost import CostModel
    from wattops.agents.supervisor import LiveReplica

__all__ = [
    "MAX_ERROR_RATE",
    "MIN_SIDE_REQUESTS",
    "SHADOW_MAX_TOKENS",
    "Canary",
    "State",
    "answer_text",
    "shadow_body",
]

log = logging.getLogger("wattops.agent")

#: The longest shadow answer (tokens): enough to see two answers part, cheap to repeat.
SHADOW_MAX_TOKENS = 48
#: Alternatives per token the shadow asks for: each side's distribution for the KL.
KL_ALTERNATIVES = 10
#: Shadows owed at most (answers that came while the candidate was busy).
MAX_SHADOW_CREDIT = 3.0
#: Live requests each side needs before its latency is compared.
MIN_SIDE_REQUESTS = 10
#: A candidate failing more than this share of its requests (after 5) is rolled back at once.
MAX_ERROR_RATE = 0.2

State = Literal["starting", "running", "promoting", "promoted", "rolled_back", "inconclusive"]


def shadow_body(body: Mapping[str, Any], chat: bool = True) -> dict[str, Any]:
    """The request to shadow: the same prompt, greedy, short, not streamed, one answer, with
    the top alternatives at each token (for the teacher-forced KL)."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "logprobs",
                                                       "top_logprobs", "n", "seed")}  # fmt: skip
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    limit = SHADOW_MAX_TOKENS if not isinstance(asked, int) else min(asked, SHADOW_MAX_TOKENS)
    out.pop("max_completion_tokens", None)
    out.update(temperature=0.0, max_tokens=max(1, limit))
    if chat:
        out.update(logprobs=True, top_logprobs=KL_ALTERNATIVES)
    else:
        out["logprobs"] = min(KL_ALTERNATIVES, 5)  # the completions API's own limit
    return out


def answer_tokens(data: Mapping[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Each generated token of an answer's first choice with its top alternatives
    ({token: logprob}); empty when the engine gave no logprobs."""
    choice = (data.get("choices") or [{}])[0]
    lp = choice.get("logprobs") or {}
    out: list[tuple[str, dict[str, float]]] = []
    if isinstance(lp.get("content"), list):  # chat
        for item in lp["content"]:
            top = {t["token"]: float(t["logprob"]) for t in item.get("top_logprobs") or []}
            out.append((str(item.get("token")), top))
    elif isinstance(lp.get("tokens"), list):  # completions
        tops = lp.get("top_logprobs") or [{}] * len(lp["tokens"])
        for token, top in zip(lp["tokens"], tops, strict=False):
            out.append((str(token), {k: float(v) for k, v in (top or {}).items()}))
    return out


def shared_prefix_kl(serving: list[tuple[str, dict[str, float]]],
                     candidate: list[tuple[str, dict[str, float]]]) -> list[float]:  # fmt: skip
    """KL(serving || candidate) at each position where both sides saw the same context: the
    shared greedy prefix, up to and including the first token where they part. Each side's
    top alternatives are its distribution there; a token one side lists and the other does
    not gets the other's smallest listed probability (what its top-k cannot rule out), and
    both are renormalised over the union."""
    out = []
    for (s_token, s_top), (c_token, c_top) in zip(serving, candidate, strict=False):
        if not s_top or not c_top:
            break
        support = set(s_top) | set(c_top)
        s_floor, c_floor = min(s_top.values()), min(c_top.values())
        p = {t: math.exp(s_top.get(t, s_floor)) for t in support}
        q = {t: math.exp(c_top.get(t, c_floor)) for t in support}
        zp, zq = sum(p.values()), sum(q.values())
        out.append(max(0.0, sum(p[t] / zp * math.log((p[t] / zp) / (q[t] / zq))
                                for t in support if p[t] > 0)))  # fmt: skip
        if s_token != c_token:
            break
    return out


def answer_text(data: Mapping[str, Any]) -> str:
    """The text of an OpenAI chat or completion answer's first choice."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message")
    if isinstance(message, dict):
        return str(message.get("content") or "")
    return str(choice.get("text") or "")


@dataclass
class _Tally:
    """One side's live requests."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    first_tokens: list[float] = field(default_factory=list)

    def count(self, latency_s: float | None, error: bool, ttft_s: float | None = None) -> None:
        self.requests += 1
        if error:
            self.errors += 1
        elif latency_s is not None:
            self.latencies.append(latency_s)
        if ttft_s is not None and not error:
            self.first_tokens.append(ttft_s)


def _tokens(live: LiveReplica) -> int:
    seen = live.usage_seen
    return int((seen.prompt_tokens or 0) + (seen.completion_tokens or 0))


def _change(candidate: float | None, serving: float | None) -> float | None:
    if candidate is None or serving is None or serving <= 0:
        return None
    return candidate / serving - 1.0


class Canary:
    """One canary of a deployment: routing, tallies, shadow pairs, figures and verdict."""

    def __init__(self, serving_precision: str, target: str, spec: CanaryRequest,
                 cost: CostModel | None) -> None:  # fmt: skip
        self.serving_precision = serving_precision
        self.target = target
        self.spec = spec
        self.cost = cost
        self.state: State = "starting"
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.ended_wall: float | None = None
        self.verdict: str | None = None
        #: The candidate's replicas (one), not among the deployment's serving ones.
        self.replicas: list[LiveReplica] = []
        self.serving = _Tally()
        self.candidate = _Tally()
        self.pairs: list[tuple[str, str]] = []
        #: KL per token position over the pairs' shared greedy prefixes (shared_prefix_kl).
        self.kl: list[float] = []
        #: The labelled probes to ask, and (serving right, candidate right) for each answered.
        self.probe_items: tuple[LabelledItem, ...] = probe_sample(spec.guards.probes)
        self.probed: list[tuple[bool, bool]] = []
        #: Probes whose request failed on either side (skipped: counted, not scored).
        self.probes_failed = 0
        self.shadowing = False
        self._credit = 0.0
        self._shadow_credit = 0.0
        #: replica -> (busy seconds, tokens) when the window opened (or it was first seen).
        self._base: dict[int, tuple[LiveReplica, float, int]] = {}
        self._active_j0 = 0.0
        self._last: CanaryStatus | None = None
        self._scored: AnswerAgreement | None = None

    # -- while it runs ---------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def ended(self) -> bool:
        return self.state in ("promoted", "rolled_back", "inconclusive")

    def open_window(self, serving: Iterable[LiveReplica], active_j: float) -> None:
        """The candidate is ready: from now on both sides are measured."""
        now = time.monotonic()
        self.state = "running"
        self.started = now
        self._active_j0 = active_j
        self._base = {}
        self._see([*serving, *self.replicas], now)

    def _see(self, replicas: Iterable[LiveReplica], now: float) -> None:
        for live in replicas:
            if id(live) not in self._base:
                self._base[id(live)] = (live, live.busy_seconds(now), _tokens(live))

    def takes_next(self) -> bool:
        """Whether the next live request goes to the candidate (smooth weighted round robin)."""
        self._credit += self.spec.share
        if self._credit >= 1.0 - 1e-9:  # ten 0.1s sum to 0.9999999999999999
            self._credit -= 1.0
            return True
        return False

    def count(self, live: LiveReplica, latency_s: float | None, error: bool,
              ttft_s: float | None = None) -> None:  # fmt: skip
        """A live request ended on `live` (`ttft_s`: its first chunk, when streamed)."""
        side = self.candidate if live in self.replicas else self.serving
        side.count(latency_s, error, ttft_s)

    def failing(self) -> str | None:
        """Why the candidate must go now, or None."""
        c = self.candidate
        if c.requests >= 5 and c.errors / c.requests > MAX_ERROR_RATE:
            return (f"rolled back early: the candidate failed {c.errors} of {c.requests} "
                    f"requests (more than {MAX_ERROR_RATE:.0%})")  # fmt: skip
        return None

    def wants_shadow(self, candidate_idle: bool = True) -> bool:
        """Whether to shadow this answered request: `shadow_share` of them (spread evenly),
        one at a time. An answer that comes while the candidate is busy, or a shadow or probe
        is in flight, still earns its credit (up to `MAX_SHADOW_CREDIT`): the next answer
        that finds the candidate free is shadowed instead, so probes do not starve shadows."""
        if not self.running or not self.replicas:
            return False
        self._shadow_credit = min(MAX_SHADOW_CREDIT, self._shadow_credit + self.spec.shadow_share)
        if candidate_idle and not self.shadowing and self._shadow_credit >= 1.0 - 1e-9:
            self._shadow_credit -= 1.0
            return True
        return False

    def add_pair(self, serving_answer: str, candidate_answer: str,
                 kl: list[float] | None = None) -> None:  # fmt: skip
        self.pairs.append((serving_answer, candidate_answer))
        self.kl.extend(kl or ())

    def add_probe(self, serving_right: bool, candidate_right: bool,
                  kl: list[float] | None = None) -> None:  # fmt: skip
        self.probed.append((serving_right, candidate_right))
        self.kl.extend(kl or ())

    def next_probe(self) -> LabelledItem | None:
        """The next labelled item to ask both sides, None when all have been."""
        done = len(self.probed) + self.probes_failed
        return self.probe_items[done] if done < len(self.probe_items) else None

    def probe_due(self, index: int) -> float:
        """When (monotonic) probe `index` may start: evenly over the first 80% of the window."""
        spacing = 0.8 * self.spec.duration_s / max(1, len(self.probe_items))
        return self.started + index * spacing

    def probe_drop(self) -> PairedDrop | None:
        if not self.probed:
            return None
        return paired_drop([s for s, _ in self.probed], [c for _, c in self.probed])

    def due(self) -> bool:
        """The window is over: `duration_s` has passed and every probe is answered, or, with
        probes left (a candidate busier than planned), twice `duration_s` has (then the
        verdict is inconclusive for want of them, unless a measured guard fails)."""
        if not self.running:
            return False
        elapsed = time.monotonic() - self.started
        if self.next_probe() is not None and self.spec.guards.max_accuracy_drop is not None:
            return elapsed >= 2 * self.spec.duration_s
        return elapsed >= self.spec.duration_s

    # -- figures and verdict ---------------------------------------------------------------

    def _side(self, precision: str, tally: _Tally, replicas: list[LiveReplica], now: float,
              active_j: float, busy_all: float) -> tuple[CanarySide, float, int]:  # fmt: skip
        busy = tokens = 0.0
        for live in replicas:
            _, busy0, tokens0 = self._base.get(id(live), (live, 0.0, 0))
            busy += max(0.0, live.busy_seconds(now) - busy0)
            tokens += max(0, _tokens(live) - tokens0)
        j_per_token = usd = None
        if tokens > 0 and busy_all > 0:
            joules = active_j * busy / busy_all
            j_per_token = joules / tokens
            if self.cost is not None:
                held = sum(self.cost.holding(r) for r in replicas
                           if r.state is not ReplicaState.STOPPED)  # fmt: skip
                seconds = now - self.started
                usd = self.cost.usd(seconds, min(1.0, held), joules) / tokens * 1e6
        lat = sorted(tally.latencies)
        first = sorted(tally.first_tokens)
        side = CanarySide(
            precision=precision, replicas=len(replicas), requests=tally.requests,
            errors=tally.errors, tokens=int(tokens), busy_s=busy, j_per_token=j_per_token,
            usd_per_1m_tokens=usd,
            latency_p50_s=statistics.median(lat) if lat else None,
            latency_p95_s=lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
            ttft_p50_s=statistics.median(first) if first else None,
            ttft_p95_s=first[min(len(first) - 1, int(0.95 * len(first)))] if first else None,
            streamed=len(first),
        )  # fmt: skip
        return side, busy, int(tokens)

    def status(self, serving: list[LiveReplica], active_j: float) -> CanaryStatus:
        """Where it stands: every figure so far (frozen once it has ended)."""
        if self.ended and self._last is not None:
            return self._last
        now = time.monotonic()
        if self.running:
            self._see([*serving, *self.replicas], now)
        seen = [live for live, _, _ in self._base.values()]
        serving_seen = [r for r in seen if r not in self.replicas]
        busy_all = sum(max(0.0, live.busy_seconds(now) - b) for live, b, _ in self._base.values())
        energy = max(0.0, active_j - self._active_j0) if self.running else 0.0
        s_side, _, _ = self._side(self.serving_precision, self.serving, serving_seen, now,
                                  energy, busy_all)  # fmt: skip
        c_side, _, _ = self._side(self.target, self.candidate, self.replicas, now, energy,
                                  busy_all)  # fmt: skip
        found = self._agreement()
        drop = self.probe_drop()
        status = CanaryStatus(
            precision=self.target, share=self.spec.share, duration_s=self.spec.duration_s,
            started_at=self.started_wall,
            elapsed_s=(now - self.started) if self.state != "starting" else 0.0,
            guards=self.spec.guards, state=self.state, serving=s_side, candidate=c_side,
            pairs=len(self.pairs), agreement=found.exact_match if found else None,
            chrf=found.chrf if found else None,
            kl_mean=statistics.fmean(self.kl) if self.kl else None, kl_tokens=len(self.kl),
            probes=len(self.probed), probes_planned=len(self.probe_items),
            accuracy_serving=(drop.both_right + drop.reference_only) / drop.items if drop else None,
            accuracy_candidate=(drop.both_right + drop.candidate_only) / drop.items
            if drop else None,
            accuracy_drop=drop.drop.estimate * 100 if drop else None,
            accuracy_drop_low=drop.drop.low * 100 if drop else None,
            accuracy_drop_high=drop.drop.high * 100 if drop else None,
            j_per_token_change=_change(c_side.j_per_token, s_side.j_per_token),
            p95_change=_change(c_side.latency_p95_s, s_side.latency_p95_s),
            verdict=self.verdict, ended_at=self.ended_wall,
        )  # fmt: skip
        return status

    def _agreement(self) -> AnswerAgreement | None:
        """Exact match and chrF of the pairs (recomputed only when a pair is added: the
        snapshot asks on every change)."""
        if not self.pairs:
            return None
        if self._scored is None or self._scored.prompts != len(self.pairs):
            self._scored = agreement([a for a, _ in self.pairs], [b for _, b in self.pairs])
        return self._scored

    def decide(self, figures: CanaryStatus) -> tuple[State, str]:
        """Promote, roll back or inconclusive, with the reason in words and figures: every
        guard's figure, with its interval where it has one. A guard that has its evidence and
        fails rolls back, naming it, even when another lacks evidence; a promote needs every
        guard's evidence (else inconclusive, never a silent promote)."""
        g = self.spec.guards
        unsure: list[str] = []
        if figures.pairs < g.min_pairs:
            unsure.append(f"{figures.pairs} shadowed pairs, need {g.min_pairs}")
        probes_done = figures.probes >= figures.probes_planned
        if g.max_accuracy_drop is not None and not probes_done:
            unsure.append(f"{figures.probes} of {figures.probes_planned} labelled probes "
                          f"answered by both sides ({self.probes_failed} failed)")  # fmt: skip
        if g.max_kl is not None and figures.kl_mean is None:
            unsure.append("no KL measured (the engine gave no alternatives per token)")
        p95_known = True
        if g.max_p95_change is not None:
            short = [s for s in (figures.serving, figures.candidate)
                     if s.requests - s.errors < MIN_SIDE_REQUESTS]  # fmt: skip
            if short:
                p95_known = False
                side = short[0]
                answered = side.requests - side.errors
                unsure.append(f"{answered} answered requests on {side.precision}, need "
                              f"{MIN_SIDE_REQUESTS} to compare p95")  # fmt: skip
        if g.max_j_per_token_change is not None and figures.j_per_token_change is None:
            unsure.append("J/token not measured on both sides (no tokens or no energy yet)")
        failed: list[str] = []
        passed: list[str] = []

        def judge(ok: bool, text: str) -> None:
            (passed if ok else failed).append(text)

        if g.max_accuracy_drop is not None and figures.accuracy_drop is not None and probes_done:
            assert figures.accuracy_drop_low is not None and figures.accuracy_drop_high is not None
            judged = (figures.accuracy_drop if g.accuracy_verdict == "point"
                      else figures.accuracy_drop_high)  # fmt: skip
            ok = judged <= g.max_accuracy_drop + 1e-9
            on = "" if g.accuracy_verdict == "point" else " (upper bound)"
            judge(ok, f"accuracy drop {figures.accuracy_drop:.1f} "
                      f"[{figures.accuracy_drop_low:.1f}, {figures.accuracy_drop_high:.1f}] "
                      f"points{on} {'<=' if ok else '>'} {g.max_accuracy_drop:g} "
                      f"({figures.probes} probes: {figures.accuracy_serving:.1%} -> "
                      f"{figures.accuracy_candidate:.1%})")  # fmt: skip
        if g.max_kl is not None and figures.kl_mean is not None:
            ok = figures.kl_mean <= g.max_kl
            judge(ok, f"KL {figures.kl_mean:.4f} {'<=' if ok else '>'} {g.max_kl:g} nats/token "
                      f"({figures.kl_tokens} tokens)")  # fmt: skip
        if (g.min_agreement is not None and figures.agreement is not None
                and figures.pairs >= g.min_pairs):  # fmt: skip
            ok = figures.agreement >= g.min_agreement
            judge(ok, f"agreement {figures.agreement:.1%} {'>=' if ok else '<'} "
                      f"{g.min_agreement:.1%} ({figures.pairs} pairs, chrF "
                      f"{figures.chrf:.1f})")  # fmt: skip
        if g.max_p95_change is not None and p95_known:
            if (figures.p95_change is None or figures.candidate.latency_p95_s is None
                    or figures.serving.latency_p95_s is None):  # fmt: skip
                failed.append("p95 not measured on both sides")
            else:
                ok = figures.p95_change <= g.max_p95_change
                judge(ok, f"p95 {figures.p95_change:+.1%} {'<=' if ok else '>'} "
                          f"{g.max_p95_change:+.1%} ({figures.candidate.latency_p95_s:.3f} s vs "
                          f"{figures.serving.latency_p95_s:.3f} s)")  # fmt: skip
        sides_j = (figures.candidate.j_per_token, figures.serving.j_per_token)
        if (g.max_j_per_token_change is not None and figures.j_per_token_change is not None
                and None not in sides_j):  # fmt: skip
            ok = figures.j_per_token_change <= g.max_j_per_token_change
            judge(ok, f"J/token {figures.j_per_token_change:+.1%} {'<=' if ok else '>'} "
                      f"{g.max_j_per_token_change:+.1%} ({figures.candidate.j_per_token:.4g} J "
                      f"vs {figures.serving.j_per_token:.4g} J)")  # fmt: skip
        if failed:
            rest = [f"held: {'; '.join(passed)}"] if passed else []
            rest += [f"not measured: {'; '.join(unsure)}"] if unsure else []
            return "rolled_back", "; ".join(["rolled back: " + "; ".join(failed), *rest])
        if unsure:
            return "inconclusive", f"inconclusive: {'; '.join(unsure)}; rolled back"
        info = [f"{figures.pairs} shadowed pairs"]
        if g.max_accuracy_drop is not None and not figures.probes_planned:
            info.append("no labelled probes asked (probes = 0): accuracy not guarded")
        if g.min_agreement is None and figures.agreement is not None:
            info.append(f"same answer {figures.agreement:.1%} (consistency, not guarded)")
        return "promoted", "promoted: " + "; ".join([*passed, *info])

    def end(self, state: State, verdict: str, figures: CanaryStatus) -> None:
        """Record the outcome; the figures stay as they were when it was decided."""
        self.state = state
        self.verdict = verdict
        self.ended_wall = time.time()
        self._last = figures.model_copy(
            update={"state": state, "verdict": verdict, "ended_at": self.ended_wall}
        )
