"""The router's state: the fleet it follows, its routes with their run-time changes, what it
has learned about each deployment, its circuit breakers and its statistics.

Stateless apart from its configuration and two small files in `state_dir`, written atomically:
`routes.json` (policy and bounds changed at run time through `PATCH /v1/routes/{name}`) and
`learned.json` (the last per-token figures seen per deployment), and the store of keys,
budgets and the ledger (`billing/store.py`: SQLite in `state_dir`, or a Redis that several routers
share). Several routers can therefore run side by side behind a load balancer; each keeps its
own statistics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from purgatory import AsyncCircuitBreakerFactory
from purgatory.service._async.circuitbreaker import AsyncCircuitBreaker

from wattops.fleet.state import FleetState
from wattops.router.affinity import Rings, prefix_key
from wattops.router.api import (
    Bounds,
    CandidateView,
    DecisionView,
    RoutePatch,
    RouterView,
    RouteView,
)
from wattops.router.billing.admission import BudgetWarning
from wattops.router.billing.budgets import utc_moment
from wattops.router.billing.charging import Charging, Outage, Ticket, measured
from wattops.router.billing.money import Amounts, charge, from_units, to_units
from wattops.router.billing.store import open_charging
from wattops.router.candidates import Candidate, Learned, candidate_of, key_of
from wattops.router.choose import PRIORITIES, Choice, Constraints, QualityFigure, Spread
from wattops.router.config import POLICIES, RouteConfig, RouterConfig
from wattops.router.notify import Notifier
from wattops.router.quality import QualityBook
from wattops.vocabulary import atomic_write
from wattops.vocabulary.access import Access
from wattops.vocabulary.audit import AuditLog

__all__ = ["BadRequestHeader", "Router", "Usage"]

log = logging.getLogger("wattops.router")

POLICY_HEADER = "x-wattops-policy"
LATENCY_HEADER = "x-wattops-max-latency-ms"
PRIORITY_HEADER = "x-wattops-priority"


class BadRequestHeader(ValueError):
    """A routing header with a value that is not allowed; the message names both."""


@dataclass(frozen=True)
class Usage:
    """What one answer used, with the per-token figures of who served it and of the
    reference at the time (None: unknown)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _cost(c: Candidate | None, usage: Usage) -> float | None:
    """The answer's $ at `c`'s measured rates, as the ledger prices them (`charging.measured`,
    `money.charge`); None while it has none (the route's statistics price it later)."""
    rates = measured(c) if c is not None else None
    if rates is None or rates.fusd_in is None or rates.fusd_out is None:
        return None
    return from_units(charge(usage.prompt_tokens, usage.completion_tokens, rates).nusd, "usd")


def _energy(c: Candidate | None, usage: Usage) -> float | None:
    """The answer's joules at `c`'s measured J/token (None while unknown)."""
    rates = measured(c) if c is not None else None
    if rates is None or rates.uj is None:
        return None
    return charge(usage.prompt_tokens, usage.completion_tokens, rates).mj / 1000


@dataclass
class RouteStats:
    """Counts since the router started."""

    requests: int = 0
    errors: int = 0
    client_errors: int = 0
    refusals: int = 0
    fallbacks: int = 0
    escalations: int = 0
    escalated_tokens: int = 0
    tokens: int = 0
    est_cost_usd: float = 0.0
    counterfactual_cost_usd: float = 0.0
    est_energy_j: float = 0.0
    counterfactual_energy_j: float = 0.0
    #: Tokens (prompt, completion) answered by a candidate whose $/token was not known yet
    #: (it had not served before): priced when the view is made, with its figures then.
    unpriced: dict[str, Usage] = field(default_factory=dict)
    served: Counter[str] = field(default_factory=Counter)
    served_tokens: Counter[str] = field(default_factory=Counter)
    excluded: dict[str, str] = field(default_factory=dict)
    #: (time, served_by, reason, fallbacks, status), made into DecisionView by view().
    decisions: deque[tuple[float, str | None, str, list[str], int]] = field(default_factory=deque)


class Router:
    """Everything a request's placement needs, and what placements are recorded into."""

    def __init__(self, config: RouterConfig, urls: list[str] | None = None) -> None:
        self.config = config
        self.fleet = FleetState(urls if urls is not None else config.agent_urls(),
                                token=config.router.agent_token)  # fmt: skip
        self.state_dir = config.router.state_dir
        self.routes: dict[str, RouteConfig] = {r.name: r for r in config.routes}
        self.overrides: dict[str, dict[str, Any]] = self._read("routes.json")
        self.learned: dict[str, Learned] = {
            key: Learned(**figures) for key, figures in self._read("learned.json").items()
        }
        self.in_flight: Counter[str] = Counter()
        self.quality = QualityBook(models_dir=config.router.models_dir)
        self.breakers = AsyncCircuitBreakerFactory(
            default_threshold=config.router.breaker_failures,
            default_ttl=config.router.breaker_open_s,
            # A request cancelled (the router stopping) says nothing of the candidate.
            exclude=[asyncio.CancelledError],
        )
        self._breakers: dict[str, AsyncCircuitBreaker] = {}
        self.stats: dict[str, RouteStats] = {name: RouteStats() for name in self.routes}
        self.registry = CollectorRegistry()
        labels = ["route", "candidate"]
        self.m_requests = PromCounter("wattops_route_requests", "Answered requests",
                                      labels, registry=self.registry)  # fmt: skip
        self.m_tokens = PromCounter("wattops_route_tokens", "Tokens answered (prompt + "
                                    "completion)", labels, registry=self.registry)  # fmt: skip
        self.m_cost = PromCounter(
            "wattops_route_cost_usd", "Estimated cost of the answers (kind=achieved) and of the "
            "same tokens at the reference (kind=counterfactual)", ["route", "kind"],
            registry=self.registry,
        )  # fmt: skip
        self.m_energy = PromCounter(
            "wattops_route_energy_j", "Estimated energy, achieved and counterfactual",
            ["route", "kind"], registry=self.registry,
        )  # fmt: skip
        self.m_escalations = PromCounter(
            "wattops_route_escalations", "Cascade answers set aside for the next candidate",
            labels, registry=self.registry,
        )  # fmt: skip
        self.m_fallbacks = PromCounter("wattops_route_fallbacks", "Candidates skipped after "
                                       "failing", labels, registry=self.registry)  # fmt: skip
        self.m_refusals = PromCounter(
            "wattops_route_refusals", "Requests refused: no candidate met the bounds",
            ["route"], registry=self.registry,
        )  # fmt: skip
        self.m_budget_refusals = PromCounter(
            "wattops_budget_refusals", "Requests refused (429) because a budget was spent",
            ["budget"], registry=self.registry,
        )  # fmt: skip
        self.m_budget_degraded = PromCounter(
            "wattops_budget_degraded", "Requests sent to a cheaper candidate by a budget",
            ["budget"], registry=self.registry,
        )  # fmt: skip
        self.m_webhook_failures = PromCounter(
            "wattops_budget_webhook_failures", "Budget warnings a webhook receiver never got "
            "(after every retry)", ["url"], registry=self.registry,
        )  # fmt: skip
        #: Set by the daemon (it owns the HTTP session): budget warnings as webhooks.
        self.notifier: Notifier | None = None
        self.m_budget_warnings = PromCounter(
            "wattops_budget_warnings", "Budget warnings fired (once per threshold and window)",
            ["budget", "threshold"], registry=self.registry,
        )  # fmt: skip
        self.charging = open_charging(config.router, config.budgets)
        #: Who may do what: the [[tokens]] and the older single `token` (an admin).
        self.access = Access(config.tokens, config.router.token, "router",
                             certificates=config.router.tls_client_ca is not None)  # fmt: skip
        #: Every control call, allowed or refused (vocabulary/audit.py).
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        self.audit.open()
        self.charging.book.on_warning = self._warned
        self.charging.on_outage = self._outage
        #: The store's outages as people read them (the router's view shows the last ones).
        self.outages: deque[str] = deque(maxlen=20)
        self.registry.register(_BudgetGauges(self.charging))
        self._last_save = time.monotonic()
        self._last_sample = 0.0
        self._bounds: dict[str, Bounds] = {}
        self.rings = Rings()
        self._turn = 0
        #: deployments() kept until a snapshot, a link state or a count in flight changes.
        self._every: tuple[tuple[Any, ...], dict[str, Candidate]] | None = None

    # -- persistence -----------------------------------------------------------------------

    def _read(self, name: str) -> dict[str, Any]:
        path = self.state_dir / name
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); starting without it", path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write(self, name: str, data: Mapping[str, Any]) -> None:
        atomic_write(self.state_dir / name, (json.dumps(data, indent=1) + "\n").encode())

    def save_learned(self) -> None:
        self._write("learned.json", {k: asdict(v) for k, v in self.learned.items()})
        self._last_save = time.monotonic()

    def sample_fleet(self) -> None:
        """Keep what the agents attribute to every deployment now (cumulative cost, energy,
        carbon; an agent's last snapshot if it is offline), for the report's fleet line."""
        cost = kwh = kg = parked = 0.0
        for link in self.fleet.links.values():
            snapshot = link.snapshot
            for dep in snapshot.deployments if snapshot else []:
                if dep.accounting is not None:
                    t = dep.accounting.totals
                    cost += t.cost_usd_total
                    kwh += t.energy_j_total / 3.6e6
                    kg += t.carbon_g_total / 1000
                    parked += t.parked_usd_avoided_total
        totals = Amounts.of_units(usd=cost, kwh=kwh, kgco2e=kg)
        self.charging.ledger.sample_fleet(time.time(), totals, to_units(parked, "usd"))
        self._last_sample = time.monotonic()

    def maybe_sample_fleet(self, every_s: float = 60.0) -> None:
        if time.monotonic() - self._last_sample >= every_s:
            self.sample_fleet()

    def maybe_save_learned(self, every_s: float = 30.0) -> None:
        if time.monotonic() - self._last_save > every_s:
            self.save_learned()

    # -- routes and their bounds -----------------------------------------------------------

    def bounds(self, route: RouteConfig) -> Bounds:
        """The route's policy and bounds: the file's, with the run-time changes over them."""
        found = self._bounds.get(route.name)
        if found is None:
            found = self._bounds[route.name] = self._make_bounds(route)
        return found

    def _make_bounds(self, route: RouteConfig) -> Bounds:
        base = {
            "policy": route.policy,
            "min_quality": route.min_quality,
            "max_accuracy_drop": route.max_accuracy_drop,
            "max_p95_ms": route.max_p95_ms,
            "max_usd_per_1m_tokens": route.max_usd_per_1m_tokens,
        }
        kept = self.overrides.get(route.name, {})
        stale = sorted(set(kept) - set(Bounds.model_fields))
        if stale:  # a bound an older router kept (max_chrf_drop): it no longer means anything
            log.warning("route %s: ignoring the stored change of %s (no longer a bound; see "
                        "max_accuracy_drop)", route.name, ", ".join(stale))  # fmt: skip
        return Bounds(**{**base, **{k: v for k, v in kept.items() if k not in stale}})

    def patch(self, name: str, change: RoutePatch) -> Bounds:
        """Apply and keep a run-time change of a route's bounds (KeyError: no such route)."""
        route = self.routes[name]
        given = change.model_dump(exclude_unset=True)
        kept = {k: v for k, v in self.overrides.get(name, {}).items() if k in Bounds.model_fields}
        merged = {**kept, **given}
        Bounds(**{**self.bounds(route).model_dump(), **merged})  # validate before keeping
        overrides = {**self.overrides, name: merged}
        self._write("routes.json", overrides)
        self.overrides = overrides
        self._bounds.pop(name, None)
        log.info("route %s changed: %s", name, given)
        return self.bounds(route)

    def spread(self, route: RouteConfig, body: Mapping[str, Any]) -> Spread:
        """How this request is placed among equivalent candidates of `route`."""
        self._turn += 1
        return Spread(
            equivalent_within=route.equivalent_within,
            prefix=prefix_key(body) if route.affinity else None,
            rings=self.rings,
            load_factor=route.affinity_load_factor,
            turn=self._turn,
        )

    def constraints(self, route: RouteConfig, headers: Mapping[str, str],
                    stream: bool = False) -> Constraints:  # fmt: skip
        """The route's bounds as the request's headers change them: a latency bound can only be
        tightened; the policy is replaced; batch priority drops the latency bound. On the
        cascade policy a whole (unstreamed) answer is judged by its own confidence, so the
        quality floor does not leave the cheap candidates out; a streamed one cannot be taken
        back, so it goes to the cheapest candidate that meets the floor."""
        b = self.bounds(route)
        policy = headers.get(POLICY_HEADER, b.policy)
        if policy not in POLICIES:
            raise BadRequestHeader(
                f"X-Wattops-Policy: {policy!r} is not a policy; allowed: {', '.join(POLICIES)}"
            )
        max_p95_s = b.max_p95_ms / 1000 if b.max_p95_ms is not None else None
        if LATENCY_HEADER in headers:
            text = headers[LATENCY_HEADER]
            try:
                asked = float(text)
            except ValueError:
                asked = -1.0
            if not asked > 0:
                raise BadRequestHeader(
                    f"X-Wattops-Max-Latency-Ms: {text!r} must be a number of milliseconds above 0"
                )
            max_p95_s = min(asked / 1000, max_p95_s) if max_p95_s else asked / 1000
        priority = headers.get(PRIORITY_HEADER, "interactive")
        if priority not in PRIORITIES:
            raise BadRequestHeader(
                f"X-Wattops-Priority: {priority!r} is not a priority; allowed: "
                f"{', '.join(PRIORITIES)}"
            )
        judged = policy == "cascade" and not stream
        return Constraints(
            policy=policy,
            min_quality=None if judged else b.min_quality,
            max_accuracy_drop=None if judged else b.max_accuracy_drop,
            max_p95_s=max_p95_s, max_usd_per_1m=b.max_usd_per_1m_tokens, priority=priority,
        )  # fmt: skip

    # -- the fleet as candidates -----------------------------------------------------------

    def deployments(self) -> dict[str, Candidate]:
        """Every deployment the agents report now, by node/deployment (rebuilt only when a
        snapshot or a link's state has changed; requests in flight are read live)."""
        now = time.monotonic()
        links = self.fleet.links.values()
        key_now = tuple((link.version, link.link(now)) for link in links)
        if self._every is not None and self._every[0] == key_now:
            return self._every[1]
        found: dict[str, Candidate] = {}
        for url, link in self.fleet.links.items():
            snapshot = link.snapshot
            if snapshot is None:
                continue
            state = link.link(now)
            for dep in snapshot.deployments:
                key = key_of(snapshot.node, dep.name)
                learned = self.learned.setdefault(key, Learned())
                found[key] = candidate_of(snapshot, dep, url, state, self.in_flight, learned)
        self._every = (key_now, found)
        return found

    def candidates(self, route: RouteConfig, every: dict[str, Candidate] | None = None
                   ) -> list[Candidate]:  # fmt: skip
        every = self.deployments() if every is None else every
        return [c for key, c in every.items() if route.matches(key)]

    def quality_of(self, route: RouteConfig, cands: list[Candidate]) -> dict[str, QualityFigure]:
        ref = next((c for c in cands if c.key == route.reference), None)
        return {c.key: self.quality.figure(route, c, ref) for c in cands}

    def unavailable(self, cands: list[Candidate]) -> dict[str, str]:
        """Candidates whose circuit breaker is open now (not yet due for a probe)."""
        out = {}
        now = time.time()
        for c in cands:
            breaker = self._breakers.get(c.key)
            if breaker is None:
                continue
            ctx = breaker.context
            if ctx.state == "opened" and ctx.opened_at is not None:
                left = ctx.opened_at + ctx.ttl - now
                if left > 0:
                    out[c.key] = (
                        f"circuit open after {ctx.threshold} failures, probe in {left:.0f}s"
                    )
        return out

    async def breaker(self, key: str) -> AsyncCircuitBreaker:
        found = self._breakers.get(key)
        if found is None:
            found = self._breakers[key] = await self.breakers.get_breaker(key)
        return found

    # -- what happened ---------------------------------------------------------------------

    def _warned(self, warning: BudgetWarning) -> None:
        self.m_budget_warnings.labels(warning.budget, f"{warning.threshold:g}").inc()
        if self.notifier is not None:
            self.notifier.send(warning)

    def _outage(self, what: str, outage: Outage) -> None:
        """The store became unreachable, or reachable again: an audit line (written off the
        event loop: it fsyncs), a line in the router's view, and the store gauges."""
        allow = self.charging.on_store_error == "allow"
        if what == "began":
            text = (f"store unreachable since {utc_moment(outage.since)}: {outage.error}; "
                    + ("serving unmetered (on_store_error = allow)" if allow
                       else "refusing requests with 503 store_unavailable"))  # fmt: skip
        else:
            text = (f"store reachable again at {utc_moment(time.time())} after "
                    f"{time.time() - outage.since:.0f} s; {outage.unmetered} requests served "
                    f"unmetered, {outage.dropped} ledger rows dropped")  # fmt: skip
        self.outages.append(text)
        line = {"time": time.time(), "daemon": "router", "who": "router (automatic)",
                "method": "STORE", "path": f"store-outage-{what}", "outcome": "automatic",
                "message": text}  # fmt: skip
        try:
            asyncio.get_running_loop().run_in_executor(None, self.audit.write, line)
        except RuntimeError:  # no event loop: a test, a command
            self.audit.write(line)

    def notify_with(self, notifier: Notifier) -> None:
        """Send budget warnings to `notifier`'s URLs; count what never arrives."""
        self.notifier = notifier
        notifier.on_failure = lambda url: self.m_webhook_failures.labels(url).inc()

    async def record(self, route: str | None, choice: Choice | None, served: Candidate | None,
                     reference: Candidate | None, usage: Usage | None, status: int,
                     fallbacks: list[str], reason: str, ticket: Ticket | None = None,
                     cache_hit: bool = False) -> None:  # fmt: skip
        """One request's outcome, into the ledger (with `ticket`), the route's statistics and
        the metrics."""
        if ticket is not None:  # charged for what the server computed, whatever the status
            charged = served if status < 400 or usage is not None else None
            await self.charging.settle(
                ticket, charged, ticket.every,
                usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0,
                status, cache_hit, reference,
            )  # fmt: skip
        if route is None or route not in self.stats:
            return
        stats = self.stats[route]
        if choice is not None:
            stats.excluded = choice.excluded
        stats.fallbacks += len(fallbacks)
        for key in fallbacks:
            self.m_fallbacks.labels(route, key).inc()
        if status == 503 and served is None and choice is None:
            stats.refusals += 1
            self.m_refusals.labels(route).inc()
        elif served is None or status >= 500:
            stats.errors += 1
        elif status >= 400:  # the client's own: a bad request, or a stream it broke off
            stats.client_errors += 1
        else:
            stats.requests += 1
            stats.served[served.key] += 1
            self.m_requests.labels(route, served.key).inc()
            if usage is not None:
                stats.tokens += usage.total
                stats.served_tokens[served.key] += usage.total
                self.m_tokens.labels(route, served.key).inc(usage.total)
                if not self._price(route, stats, served, reference, usage):
                    held = stats.unpriced.get(served.key, Usage(0, 0))
                    stats.unpriced[served.key] = Usage(
                        held.prompt_tokens + usage.prompt_tokens,
                        held.completion_tokens + usage.completion_tokens,
                    )
        keep = self.config.router.decisions_kept
        if keep:
            stats.decisions.append(
                (time.time(), served.key if served else None, reason, fallbacks, status)
            )
            if len(stats.decisions) > keep:
                stats.decisions.popleft()

    def record_escalation(self, route: str | None, served: Candidate,
                          reference: Candidate | None, usage: Usage | None,
                          ticket: Ticket | None = None) -> None:  # fmt: skip
        """An answer the cascade set aside for a surer one: counted, and its cost with it."""
        if ticket is not None and usage is not None:
            self.charging.escalated(ticket, served, ticket.every, usage.prompt_tokens,
                                    usage.completion_tokens)  # fmt: skip
        if route is None or route not in self.stats:
            return
        stats = self.stats[route]
        stats.escalations += 1
        self.m_escalations.labels(route, served.key).inc()
        if usage is not None:
            stats.escalated_tokens += usage.total
            if not self._price(route, stats, served, None, usage, counterfactual=False):
                held = stats.unpriced.get(served.key, Usage(0, 0))
                stats.unpriced[served.key] = Usage(
                    held.prompt_tokens + usage.prompt_tokens,
                    held.completion_tokens + usage.completion_tokens,
                )

    def _price(self, route: str, stats: RouteStats, served: Candidate,
               reference: Candidate | None, usage: Usage,
               counterfactual: bool = True) -> bool:  # fmt: skip
        """Add `usage`'s estimated cost and energy, and the reference's counterfactual, to the
        route's figures; False when the server's or the reference's $/token is unknown.
        Without `counterfactual` (an escalated answer: the reference would not have computed
        it), only the cost is added."""
        cost, cf = _cost(served, usage), _cost(reference, usage) if counterfactual else 0.0
        if cost is None or cf is None:
            return False
        stats.est_cost_usd += cost
        stats.counterfactual_cost_usd += cf
        self.m_cost.labels(route, "achieved").inc(cost)
        if counterfactual:
            self.m_cost.labels(route, "counterfactual").inc(cf)
        energy = _energy(served, usage)
        cf_energy = _energy(reference, usage) if counterfactual else 0.0
        if energy is not None and cf_energy is not None:
            stats.est_energy_j += energy
            stats.counterfactual_energy_j += cf_energy
            self.m_energy.labels(route, "achieved").inc(energy)
            if counterfactual:
                self.m_energy.labels(route, "counterfactual").inc(cf_energy)
        return True

    def view(self) -> RouterView:
        """`GET /v1/router`."""
        every = self.deployments()
        routes = []
        for name, route in self.routes.items():
            stats = self.stats[name]
            reference = every.get(route.reference)
            for key, usage in list(stats.unpriced.items()):
                served = every.get(key)
                if served is not None and self._price(name, stats, served, reference, usage):
                    del stats.unpriced[key]
            cands = self.candidates(route, every)
            quality = self.quality_of(route, cands)
            unavailable = self.unavailable(cands)
            views = []
            for c in cands:
                q = quality[c.key]
                breaker = self._breakers.get(c.key)
                views.append(CandidateView(
                    key=c.key, precision=c.precision, state=c.state, live=c.live,
                    ready=c.ready, in_flight=c.in_flight,
                    p95_ms=c.p95_s * 1000 if c.p95_s is not None else None,
                    usd_per_1m_tokens=c.usd_per_1m, figures_current=c.figures_current,
                    quality=q.kept, accuracy_drop=q.accuracy_drop, quality_source=q.source,
                    breaker=breaker.context.state if breaker else "closed",
                    excluded=unavailable.get(c.key) or stats.excluded.get(c.key),
                    requests=stats.served[c.key], tokens=stats.served_tokens[c.key],
                    share=stats.served[c.key] / stats.requests if stats.requests else 0.0,
                ))  # fmt: skip
            saving = (
                1 - stats.est_cost_usd / stats.counterfactual_cost_usd
                if stats.counterfactual_cost_usd > 0
                else None
            )
            routes.append(RouteView(
                name=name, reference=route.reference, bounds=self.bounds(route),
                candidates=views, requests=stats.requests, errors=stats.errors,
                client_errors=stats.client_errors,
                refusals=stats.refusals, fallbacks=stats.fallbacks, tokens=stats.tokens,
                escalations=stats.escalations, escalated_tokens=stats.escalated_tokens,
                est_cost_usd=stats.est_cost_usd,
                counterfactual_cost_usd=stats.counterfactual_cost_usd,
                est_energy_j=stats.est_energy_j,
                counterfactual_energy_j=stats.counterfactual_energy_j, saving=saving,
                unpriced_tokens=sum(u.total for u in stats.unpriced.values()),
                last_decisions=[
                    DecisionView(time=t, served_by=by, reason=why, fallbacks=fb, status=st)
                    for t, by, why, fb, st in list(stats.decisions)[-10:]
                ],
            ))  # fmt: skip
        now = time.monotonic()
        live = sum(1 for link in self.fleet.links.values() if link.link(now).value == "live")
        warnings = [w.message() for w in list(self.charging.book.warnings)[-20:]]
        warnings += list(self.outages)[-5:]
        n = self.notifier
        return RouterView(
            routes=routes, agents=len(self.fleet.links), agents_live=live,
            budget_warnings=warnings, webhook_sent=n.sent if n else 0,
            webhook_failed=n.failed if n else 0, webhook_error=n.last_error if n else None,
        )  # fmt: skip


class _BudgetGauges(Collector):
    """Each budget's spend, reservations, limit and what remains, read at scrape time (finite:
    what remains is never below 0, and a budget without a limit does not exist)."""

    def __init__(self, charging: Charging) -> None:
        self.charging = charging

    def collect(self):  # type: ignore[no-untyped-def]
        labels = ["budget", "scope", "subject", "unit", "window"]
        families = {
            name: GaugeMetricFamily(f"wattops_budget_{name}", text, labels=labels)
            for name, text in (
                ("spent", "Spent in the current window (ledger)"),
                ("reserved", "Reserved by requests in flight"),
                ("limit", "The budget's limit"),
                ("remaining", "limit - spent - reserved, never below 0"),
            )
        }
        charging = self.charging
        for view in charging.last_views:  # as the /metrics handler read them just before
            b = view.budget
            values = [b.name, b.scope, b.subject or "", b.unit, b.window]
            families["spent"].add_metric(values, view.spent)
            families["reserved"].add_metric(values, view.reserved)
            families["limit"].add_metric(values, b.limit)
            families["remaining"].add_metric(values, view.remaining)
        yield from families.values()
        outage = charging.outage
        yield GaugeMetricFamily("wattops_router_store_up", "1 while the keys-and-budgets store "
                                "answers, 0 from a failed call until one succeeds",
                                value=0 if outage else 1)  # fmt: skip
        yield GaugeMetricFamily("wattops_router_unmetered_requests", "Requests served with no "
                                "budget checked during the store's current outage "
                                "(on_store_error = allow)",
                                value=outage.unmetered if outage else 0)  # fmt: skip
        yield GaugeMetricFamily(
            "wattops_router_pending_ledger_rows",
            "Ledger rows held for the store, written when it is back",
            value=charging.pending,
        )
