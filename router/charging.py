"""Who is asking and what it may cost: API keys, budgets and the ledger, around each request.

`Charging` is what the router's hot path calls: `authenticate` (the bearer key, when keys are
required), `admit` (budgets over, degrading, or a reservation of the request's worst case)
and, when the request ends, `settle` (its ledger row at the server's rates, its reservation
released). Worst case: the prompt's UTF-8 bytes plus 16 per message and 64 for the chat
template (a token is at least one byte, so this bounds its tokens for byte-level BPE
vocabularies), plus `max_tokens` (the router's `default_max_tokens` when the request gives
none), priced at the highest rate among the candidates it may be served by. A candidate whose
rates are not known yet (it has not served) is priced at the highest rate known in the fleet;
a fleet that has served nothing has no rate to charge and reserves nothing. The bound is in
`worst_tokens`.
"""

from __future__ import annotations

import itertools
import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItemPerMinute, storage, strategies

from wattops.router.admission import Admission, Amounts, Book, BudgetExceeded, Standing
from wattops.router.api import Budget, BudgetView, KeyCreate, KeyPatch, KeyView
from wattops.router.candidates import Candidate
from wattops.router.keys import KeyRecord, new_key, parse
from wattops.router.ledger import Entry

__all__ = ["Caller", "Charging", "Refusal", "Ticket"]


class Refusal(Exception):
    """The request is refused before it is forwarded: `status`, OpenAI error `code`, message,
    and extra headers (Retry-After)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers or {}


@dataclass(frozen=True)
class Caller:
    """Who sent the request: its key (None when keys are not required and none was given)."""

    key: KeyRecord | None = None

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def team(self) -> str | None:
        return self.key.team if self.key else None


@dataclass
class Ticket:
    """One request on its way: who asked, under which route, what it reserved."""

    request_id: str
    caller: Caller
    route: str | None
    admission: Admission | None = None
    degraded: str | None = None
    #: What answers the cascade set aside cost (computed all the same).
    extra: Amounts = field(default_factory=Amounts)
    #: The fleet's deployments as the request saw them (for the rates it is settled at).
    every: Mapping[str, Candidate] = field(default_factory=dict)
    settled: bool = False


def _rates(c: Candidate) -> tuple[float | None, float | None, float | None, float | None]:
    """($/1M input, $/1M output, J/token, gCO2e/1M tokens)."""
    usd_in = c.usd_per_1m_input if c.usd_per_1m_input is not None else c.usd_per_1m
    usd_out = c.usd_per_1m_output if c.usd_per_1m_output is not None else c.usd_per_1m
    return usd_in, usd_out, c.j_per_token, c.gco2e_per_1m


def _highest(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def amounts(prompt: int, completion: int, rates: tuple[float | None, ...]) -> Amounts:
    """What `prompt` + `completion` tokens cost at `rates` (unknown rates count 0)."""
    usd_in, usd_out, j_per_token, g_per_1m = rates
    return Amounts(
        usd=(prompt * (usd_in or 0.0) + completion * (usd_out or 0.0)) / 1e6,
        kwh=(prompt + completion) * (j_per_token or 0.0) / 3.6e6,
        kgco2e=(prompt + completion) * (g_per_1m or 0.0) / 1e9,
    )


#: Tokens a chat template may add around the messages (roles, special tokens, a default
#: system prompt).
TEMPLATE_TOKENS = 64


def worst_tokens(body: Mapping[str, Any], default_max_tokens: int) -> tuple[int, int]:
    """An upper bound of (prompt tokens, completion tokens) for an OpenAI request body: a
    token is at least one byte, so the text's UTF-8 bytes, plus 16 per message and 64 for the
    chat template (SmolLM2's adds a default system prompt of 15 tokens), plus tool definitions."""
    prompt = TEMPLATE_TOKENS
    if "messages" in body and isinstance(body["messages"], list):
        for message in body["messages"]:
            content = message.get("content") if isinstance(message, dict) else message
            prompt += 16 + len(str(content or "").encode())
    else:
        prompt += len(str(body.get("prompt") or "").encode())
    tools = body.get("tools") or body.get("functions")
    if tools:
        prompt += len(json.dumps(tools).encode())
    asked = body.get("max_completion_tokens", body.get("max_tokens"))
    completion = asked if isinstance(asked, int) and asked > 0 else default_max_tokens
    n = body.get("n")
    return prompt, completion * (n if isinstance(n, int) and n > 0 else 1)


class Charging:
    """Keys, budgets and the ledger (see the module docstring)."""

    def __init__(self, book: Book, require_keys: bool | None, default_max_tokens: int,
                 budgets: Iterable[Budget] = (), limits_storage: storage.Storage | None = None,
                 store_errors: tuple[type[Exception], ...] = ()) -> None:  # fmt: skip
        """`book` and its ledger are one store's (SQLite: `BudgetBook`; Redis:
        `SharedBudgetBook`); `limits_storage` is where the per-key rate limits count (memory
        for one router, the same Redis for several); `store_errors`: what the store raises
        when it cannot be reached (the router answers 503 `store_unavailable`)."""
        self.book = book
        self.store_errors = store_errors
        self.ledger = book.ledger
        self.require_keys_setting = require_keys
        self.default_max_tokens = default_max_tokens
        self.limiter = strategies.MovingWindowRateLimiter(limits_storage or storage.MemoryStorage())
        self._run_id = secrets.token_hex(8)
        self._serial = itertools.count(1)
        for budget in budgets:  # the config's budgets: made once, then the store's
            if budget.name not in self.book.budgets:
                self.book.put(budget)

    # -- keys ------------------------------------------------------------------------------

    @property
    def keys_required(self) -> bool:
        """Keys are required when the config says so, or (unset) once any key exists."""
        if self.require_keys_setting is not None:
            return self.require_keys_setting
        return bool(self.ledger.has_keys())

    def key_record(self, key_id: str) -> KeyRecord | None:
        return self.ledger.key(key_id)

    def key_records(self) -> list[KeyRecord]:
        return self.ledger.key_records()

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request with this Authorization header; Refusal 401/403."""
        if not authorization:
            if self.keys_required:
                raise Refusal(
                    401,
                    "missing_api_key",
                    "this router needs an API key: 'Authorization: Bearer wok_...' (ask its "
                    "admin for one)",
                )
            return Caller()
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise Refusal(401, "invalid_api_key",
                          "the Authorization header must read 'Bearer <key>'")  # fmt: skip
        parsed = parse(given)
        record = self.ledger.key(parsed[0]) if parsed else None
        if parsed is None or record is None or not record.matches(parsed[1]):
            if not self.keys_required and parsed is None:
                return Caller()  # an open router ignores other schemes' tokens
            raise Refusal(403, "invalid_api_key", "the API key is not known to this router")
        if not record.active:
            raise Refusal(403, "key_revoked", f"the API key {record.id} was revoked")
        return Caller(record)

    def create_key(self, asked: KeyCreate) -> tuple[str, KeyView]:
        secret, record = new_key(asked.team, asked.name, asked.rpm, asked.tpm)
        self.ledger.add_key(record)
        for unit, window, limit in asked.budgets():
            budget = Budget.model_validate({
                "name": f"key-{record.id}-{unit}-{window}", "scope": "key",
                "subject": record.id, "unit": unit, "window": window, "limit": limit,
            })  # fmt: skip
            self.book.put(budget)
        return secret, self.key_view(record)

    def key_view(self, record: KeyRecord) -> KeyView:
        own = [b.name for b in self.book.budgets.values()
               if b.scope == "key" and b.subject == record.id]  # fmt: skip
        return KeyView(**record.model_dump(), budgets=own)

    def update_key(self, record: KeyRecord, change: KeyPatch) -> KeyView:
        record = record.model_copy(update=change.model_dump(exclude_unset=True))
        self.ledger.update_key(record)
        return self.key_view(record)

    def revoke_key(self, record: KeyRecord) -> KeyView:
        if record.active:
            record = record.model_copy(update={"revoked_at": time.time()})
            self.ledger.update_key(record)
        return self.key_view(record)

    # -- budgets ---------------------------------------------------------------------------

    def budget_view(self, s: Standing) -> BudgetView:
        b = s.budget
        fraction = s.used / b.limit
        warned = bool(b.warn_at) and s.spent >= b.warn_at[0] * b.limit
        state = "over" if s.over else "degrading" if s.degrading else "warning" if warned else "ok"
        return BudgetView(budget=b, spent=s.spent, reserved=s.reserved, remaining=s.remaining,
                          fraction=fraction, window_start=s.window_start,
                          resets_at=s.resets_at, state=state)  # fmt: skip

    def budget_views(self) -> list[BudgetView]:
        return [self.budget_view(s) for s in self.book.standings()]

    # -- one request -----------------------------------------------------------------------

    def ticket(self, caller: Caller, route: str | None, every: Mapping[str, Candidate]) -> Ticket:
        # Unique across restarts (a random prefix per process) without a uuid4 per request.
        return Ticket(f"{self._run_id}-{next(self._serial)}", caller, route, every=every)

    def limit_rate(self, ticket: Ticket, body: Mapping[str, Any]) -> None:
        """The key's requests and tokens per minute (moving 60 s windows); Refusal 429 naming
        the limit. Tokens are counted at admission as the prompt's bound plus max_tokens (as
        Azure OpenAI counts them), so a request that could pass the limit does not start."""
        key = ticket.caller.key
        if key is None:
            return
        if key.rpm:
            self._hit(key, "rpm", key.rpm, 1, "requests")
        if key.tpm:
            prompt, completion = worst_tokens(body, self.default_max_tokens)
            self._hit(key, "tpm", key.tpm, prompt + completion, "tokens")

    def _hit(self, key: KeyRecord, kind: str, per_minute: int, cost: int, what: str) -> None:
        item = RateLimitItemPerMinute(per_minute)
        if cost > per_minute or not self.limiter.hit(item, key.id, kind, cost=cost):
            stats = self.limiter.get_window_stats(item, key.id, kind)
            wait = max(1, int(stats.reset_time - time.time()) + 1)
            raise Refusal(429, "rate_limit_exceeded",
                          f"key {key.id} is over its {per_minute} {what} per minute "
                          f"({kind}; this request counts {cost}); retry in {wait} s",
                          {"Retry-After": str(wait)})  # fmt: skip

    def check(self, ticket: Ticket) -> Standing | None:
        """The budget that degrades this request, if any; Refusal 429 if one is over."""
        c = ticket.caller
        over, degrading = self.book.check(c.key_id, c.team, ticket.route)
        if over is not None:
            raise self._refusal(over)
        return degrading

    def admit(self, ticket: Ticket, body: Mapping[str, Any], candidates: list[Candidate],
              every: Mapping[str, Candidate], cascade: bool = False) -> None:  # fmt: skip
        """Reserve the request's worst case on every budget that covers it (Refusal 429).

        One answer, at the highest rates among `candidates` (whichever serves it, falling back
        costs nothing: a candidate that failed computed no answer); with `cascade`, every
        candidate may compute an answer before a surer one is asked, and each is charged, so
        the worst case is their sum."""
        c = ticket.caller
        if not self.book.may_cover(c.key_id, c.team, ticket.route):
            return
        prompt, completion = worst_tokens(body, self.default_max_tokens)
        if cascade and len(candidates) > 1:
            worst = Amounts()
            for one in candidates:
                cost = amounts(prompt, completion, self._highest_rates([one], every))
                worst = Amounts(worst.usd + cost.usd, worst.kwh + cost.kwh,
                                worst.kgco2e + cost.kgco2e)  # fmt: skip
        else:
            worst = amounts(prompt, completion, self._highest_rates(candidates, every))
        try:
            ticket.admission = self.book.admit(ticket.request_id, c.key_id, c.team, ticket.route,
                                               worst)  # fmt: skip
        except BudgetExceeded as exc:
            raise self._refusal(exc.standing) from None

    def _highest_rates(self, candidates: list[Candidate], every: Mapping[str, Candidate]
                       ) -> tuple[float | None, ...]:  # fmt: skip
        chosen = [_rates(c) for c in candidates]
        fleet = [_rates(c) for c in every.values()]
        out = []
        for i in range(4):
            value = _highest(r[i] for r in chosen)
            if value is None or any(r[i] is None for r in chosen):
                value = _highest([value, *(r[i] for r in fleet)])
            out.append(value)
        return tuple(out)

    def _refusal(self, s: Standing) -> Refusal:
        exc = BudgetExceeded(s, time.time())
        return Refusal(429, "budget_exceeded", str(exc), {
            "Retry-After": str(exc.retry_after_s), "X-Wattops-Budget": s.budget.name,
        })  # fmt: skip

    def settle(
        self,
        ticket: Ticket,
        served: Candidate | None,
        every: Mapping[str, Candidate],
        prompt: int,
        completion: int,
        status: int,
        cache_hit: bool = False,
        reference: Candidate | None = None,
    ) -> None:
        """Write the request's ledger row at `served`'s rates, release its reservation. The
        row also keeps the tokens' list price at those rates (what a cache hit saved) and at
        the route's reference's (what routing saved), for `wattops report`."""
        if ticket.settled:
            return
        ticket.settled = True
        listed = Amounts()
        if served is not None:
            listed = amounts(prompt, completion, self._highest_rates([served], every))
        cost = Amounts() if cache_hit else listed
        cost = Amounts(cost.usd + ticket.extra.usd, cost.kwh + ticket.extra.kwh,
                       cost.kgco2e + ticket.extra.kgco2e)  # fmt: skip
        at_reference = None
        if reference is not None and served is not None:
            ref_in, ref_out, _, _ = _rates(reference)
            if ref_in is not None and ref_out is not None:
                at_reference = (prompt * ref_in + completion * ref_out) / 1e6
        c = ticket.caller
        entry = Entry(
            request_id=ticket.request_id, time=time.time(), key_id=c.key_id, team=c.team,
            route=ticket.route, served_by=served.key if served else None, status=status,
            prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost.usd,
            energy_kwh=cost.kwh, carbon_kg=cost.kgco2e, degraded=ticket.degraded,
            cache_hit=cache_hit, list_cost_usd=listed.usd, reference_cost_usd=at_reference,
        )  # fmt: skip
        self.book.settle(ticket.admission, entry)

    def escalated(self, ticket: Ticket, served: Candidate, every: Mapping[str, Candidate],
                  prompt: int, completion: int) -> None:  # fmt: skip
        """An answer the cascade set aside: its cost is the request's too."""
        cost = amounts(prompt, completion, self._highest_rates([served], every))
        e = ticket.extra
        ticket.extra = Amounts(e.usd + cost.usd, e.kwh + cost.kwh, e.kgco2e + cost.kgco2e)
