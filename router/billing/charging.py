"""Who is asking and what it may cost: API keys, budgets and the ledger, around each request.

`Charging` is what the router's hot path calls: `authenticate` (the bearer key, when keys are
required), `admit` (budgets over, degrading, or a reservation of the request's worst case)
and, when the request ends, `settle` (its ledger row at the server's rates, its reservation
released). Worst case: the prompt's UTF-8 bytes plus 16 per message and 64 for the chat
template (a token is at least one byte, so this bounds its tokens for byte-level BPE
vocabularies), plus `max_tokens` (the router's `default_max_tokens` when the request gives
none), priced at the highest rate among the candidates it may be served by (a cascade's:
the sum over them, each may answer). Amounts are integers (`money.py`).

A deployment that has not served yet has no measured rates. It is priced by a **prior**: its
held $/h, its share of its node's watts and its node's grid intensity spread over
`prior_tokens_per_s` (`[router]`, default 10) tokens a second, an upper bound for any
deployment that serves at least that fast. Its answers are charged at the prior too, until its
agent publishes measured rates (`wattops report` shows what the ledger charged above the
agents' attribution as `overcharged`). Where even the prior is unknown (an agent without a
price or power reading), the highest rate known in the fleet stands in; only a fleet with no
rates and no prices at all reserves and charges nothing, and there is no money to count.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from wattops.router.api import COUNTED_IN, Budget, BudgetView, KeyCreate, KeyPatch, KeyView
from wattops.router.billing.admission import Admission, Book, BudgetExceeded, Standing
from wattops.router.billing.keys import KeyRecord, new_key, parse
from wattops.router.billing.ledger import Entry
from wattops.router.billing.money import UNKNOWN, Amounts, Rates, charge, from_units
from wattops.router.candidates import Candidate

__all__ = ["Caller", "Charging", "Outage", "Refusal", "Ticket"]

log = logging.getLogger("wattops.router")

#: Ledger rows held while the store is unreachable (`on_store_error = "allow"`), written when
#: it is back; beyond this many, the oldest are dropped (and counted).
PENDING_MAX = 100_000
#: With the store out and `allow`, requests skip it (no wait on a dead connection) and one
#: call probes it again every this many seconds.
PROBE_S = 1.0


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
    #: Checked against the key as this router last saw it, the store being out (allow mode).
    unchecked: bool = False

    @property
    def key_id(self) -> str | None:
        return self.key.id if self.key else None

    @property
    def team(self) -> str | None:
        return self.key.team if self.key else None


@dataclass
class Outage:
    """The store unreachable: since when, the last error, and what was served meanwhile
    without a budget counting it (`on_store_error = "allow"`)."""

    since: float
    error: str
    unmetered: int = 0
    #: Ledger rows dropped because more than PENDING_MAX were waiting.
    dropped: int = 0
    #: When a call last tried the store.
    probed: float = 0.0


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
    #: Let in while the store was unreachable, with no budget checked (on_store_error allow).
    unmetered: bool = False


def measured(c: Candidate) -> Rates:
    """The candidate's rates as its agent measured them (None where it has not served)."""
    usd_in = c.usd_per_1m_input if c.usd_per_1m_input is not None else c.usd_per_1m
    usd_out = c.usd_per_1m_output if c.usd_per_1m_output is not None else c.usd_per_1m
    return Rates.of(usd_in, usd_out, c.j_per_token, c.gco2e_per_1m)


def prior(c: Candidate, tokens_per_s: float) -> Rates:
    """The rates of a deployment serving `tokens_per_s`: its held $/h, watts and their carbon
    over that many tokens (None where its agent publishes no price or power)."""
    usd = None if c.usd_per_hour is None else c.usd_per_hour / 3600 / tokens_per_s * 1e6
    j = None if c.held_watts is None else c.held_watts / tokens_per_s
    g = None
    if j is not None and c.grid_gco2e_per_kwh is not None:
        g = j / 3.6e6 * c.grid_gco2e_per_kwh * 1e6
    return Rates.of(usd, usd, j, g)


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
                 budgets: Iterable[Budget] = (), limits_storage: Storage | None = None,
                 store_errors: tuple[type[Exception], ...] = (),
                 prior_tokens_per_s: float = 10.0,
                 on_store_error: Literal["refuse", "allow"] = "refuse") -> None:  # fmt: skip
        """`book` and its ledger are one store's (SQLite: `BudgetBook`; Redis:
        `SharedBudgetBook`); `limits_storage` is where the per-key rate limits count (memory
        for one router, the same Redis for several); `store_errors`: what the store raises
        when it cannot be reached (the router answers 503 `store_unavailable`)."""
        self.book = book
        self.store_errors = store_errors
        self.ledger = book.ledger
        self.require_keys_setting = require_keys
        self.default_max_tokens = default_max_tokens
        self.prior_tokens_per_s = prior_tokens_per_s
        self.on_store_error = on_store_error
        #: The store's outage now (None: reachable, as far as the last call knew).
        self.outage: Outage | None = None
        #: Called with ("began" | "ended", the outage): the router logs, audits, alerts.
        self.on_outage: Callable[[str, Outage], None] | None = None
        #: Keys this router has verified against the store (allow mode checks them while the
        #: store is out; a key it has never seen is refused).
        self._verified: dict[str, KeyRecord] = {}
        self._had_keys = False
        self._pending: deque[tuple[Admission | None, Entry]] = deque()
        self.limiter = MovingWindowRateLimiter(limits_storage or MemoryStorage())
        #: The budgets as `abudget_views` last found them.
        self.last_views: list[BudgetView] = []
        self._run_id = secrets.token_hex(8)
        self._serial = itertools.count(1)
        for budget in budgets:  # the config's budgets: made once, then the store's
            if budget.name not in self.book.budgets:
                self.book.put(budget)

    # -- the store unreachable -------------------------------------------------------------

    def _skip_store(self) -> bool:
        """Whether to go on without the store: it is out, the router allows that, and it is
        not time to probe it again."""
        outage = self.outage
        if outage is None or self.on_store_error != "allow":
            return False
        now = time.monotonic()
        if now - outage.probed < PROBE_S:
            return True
        outage.probed = now
        return False

    def _store_failed(self, exc: Exception) -> None:
        """Note the outage (once when it begins); re-raise unless the router allows."""
        self.store_error(exc)
        if self.on_store_error != "allow":
            raise exc

    def store_error(self, exc: Exception) -> None:
        """The store failed a call: an outage begins (said once), or goes on."""
        if self.outage is None:
            self.outage = Outage(time.time(), str(exc), probed=time.monotonic())
            log.error("the router's store is unreachable: %s; requests are %s", exc,
                      "served unmetered (on_store_error = allow)"
                      if self.on_store_error == "allow" else "refused (503)")  # fmt: skip
            if self.on_outage is not None:
                self.on_outage("began", self.outage)
        else:
            self.outage.error = str(exc)

    def store_ok(self) -> None:
        """The store answered a call: an outage ends (said once)."""
        self._store_ok()

    def _store_ok(self) -> None:
        if self.outage is None:
            return
        outage, self.outage = self.outage, None
        log.warning("the router's store is reachable again after %.0f s; %d requests were "
                    "served unmetered", time.time() - outage.since, outage.unmetered)  # fmt: skip
        if self.on_outage is not None:
            self.on_outage("ended", outage)

    # -- keys ------------------------------------------------------------------------------

    def key_record(self, key_id: str) -> KeyRecord | None:
        return self.ledger.key(key_id)

    def key_records(self) -> list[KeyRecord]:
        return self.ledger.key_records()

    async def authenticate(self, authorization: str | None) -> Caller:
        """The caller of a request with this Authorization header; Refusal 401/403. With the
        store out and `on_store_error = "allow"`, a key this router verified before is
        checked against what it saw then; any other is refused (503 store_unavailable)."""
        try:
            if self._skip_store():
                return self._unchecked(authorization)
            required = self.require_keys_setting
            if required is None:  # unset: once any key exists
                self._had_keys = self._had_keys or await self.ledger.ahas_keys()
                required = self._had_keys
            parsed = self._parsed(authorization, required)
            record = await self.ledger.akey(parsed[0]) if parsed else None
        except self.store_errors as exc:
            self._store_failed(exc)
            return self._unchecked(authorization)
        self._store_ok()
        if record is not None:  # as the store has it now: revoked ones too, so they stay so
            self._verified[record.id] = record
        return self._caller(parsed, record)

    def _unchecked(self, authorization: str | None) -> Caller:
        """The caller as far as this router can tell with its store out: a key it verified
        before, as it was then; any other key is refused (503)."""
        parsed = self._parsed(authorization, bool(self.require_keys_setting or self._had_keys))
        if parsed is not None and parsed[0] not in self._verified:
            error = self.outage.error if self.outage else "unknown error"
            raise Refusal(503, "store_unavailable",
                          f"the router's store is unreachable ({error}) and it has not seen "
                          "this key before: it cannot be checked; retry shortly",
                          {"Retry-After": "1"})  # fmt: skip
        caller = self._caller(parsed, self._verified.get(parsed[0]) if parsed else None)
        return Caller(caller.key, unchecked=True)

    @staticmethod
    def _parsed(authorization: str | None, required: bool) -> tuple[str, str] | None:
        """The key's (id, secret) from the header; None for a caller without a key on a
        router that does not require one; Refusal 401/403."""
        if not authorization:
            if required:
                raise Refusal(
                    401,
                    "missing_api_key",
                    "this router needs an API key: 'Authorization: Bearer wok_...' (ask its "
                    "admin for one)",
                )
            return None
        scheme, _, given = authorization.partition(" ")
        given = given.strip()
        if scheme.lower() != "bearer" or not given:
            raise Refusal(401, "invalid_api_key",
                          "the Authorization header must read 'Bearer <key>'")  # fmt: skip
        parsed = parse(given)
        if parsed is None:
            if not required:
                return None  # an open router ignores other schemes' tokens
            raise Refusal(403, "invalid_api_key", "the API key is not known to this router")
        return parsed

    @staticmethod
    def _caller(parsed: tuple[str, str] | None, record: KeyRecord | None) -> Caller:
        if parsed is None:
            return Caller()
        if record is None or not record.matches(parsed[1]):
            raise Refusal(403, "invalid_api_key", "the API key is not known to this router")
        if not record.active:
            raise Refusal(403, "key_revoked", f"the API key {record.id} was revoked")
        return Caller(record)

    def create_key(self, asked: KeyCreate) -> tuple[str, KeyView]:
        secret, record = new_key(asked.team, asked.name, asked.rpm, asked.tpm)
        # Every budget valid before anything is written: a refused one leaves no key behind.
        budgets = [Budget.model_validate({
            "name": f"key-{record.id}-{unit}-{window}", "scope": "key",
            "subject": record.id, "unit": unit, "window": window, "limit": limit,
        }) for unit, window, limit in asked.budgets()]  # fmt: skip
        self.ledger.add_key(record)
        for budget in budgets:
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
        fraction = s.used / s.limit
        warned = bool(b.warn_at) and s.spent >= b.warn_at[0] * s.limit
        state = "over" if s.over else "degrading" if s.degrading else "warning" if warned else "ok"
        return BudgetView(budget=b, spent=from_units(s.spent, b.unit),
                          reserved=from_units(s.reserved, b.unit),
                          remaining=from_units(s.remaining, b.unit), fraction=fraction,
                          window_start=s.window_start, resets_at=s.resets_at, state=state,
                          counted_in=COUNTED_IN[b.unit], limit_units=s.limit,
                          spent_units=s.spent, reserved_units=s.reserved)  # fmt: skip

    async def abudget_views(self) -> list[BudgetView]:
        """Every budget where it stands (kept for the metrics, which are read without an
        await)."""
        self.last_views = [self.budget_view(s) for s in await self.book.astandings()]
        return self.last_views

    # -- one request -----------------------------------------------------------------------

    def ticket(self, caller: Caller, route: str | None, every: Mapping[str, Candidate]) -> Ticket:
        # Unique across restarts (a random prefix per process) without a uuid4 per request.
        return Ticket(f"{self._run_id}-{next(self._serial)}", caller, route, every=every,
                      unmetered=caller.unchecked)  # fmt: skip

    async def limit_rate(self, ticket: Ticket, body: Mapping[str, Any]) -> None:
        """The key's requests and tokens per minute (moving 60 s windows); Refusal 429 naming
        the limit. Tokens are counted at admission as the prompt's bound plus max_tokens (as
        Azure OpenAI counts them), so a request that could pass the limit does not start."""
        key = ticket.caller.key
        if key is None or ticket.unmetered:
            return  # no rate limits while the store (where they count) is out
        try:
            if key.rpm:
                await self._hit(key, "rpm", key.rpm, 1, "requests")
            if key.tpm:
                prompt, completion = worst_tokens(body, self.default_max_tokens)
                await self._hit(key, "tpm", key.tpm, prompt + completion, "tokens")
        except self.store_errors as exc:
            self._store_failed(exc)

    async def _hit(self, key: KeyRecord, kind: str, per_minute: int, cost: int,
                   what: str) -> None:  # fmt: skip
        item = RateLimitItemPerMinute(per_minute)
        if cost > per_minute or not await self.limiter.hit(item, key.id, kind, cost=cost):
            stats = await self.limiter.get_window_stats(item, key.id, kind)
            wait = max(1, int(stats.reset_time - time.time()) + 1)
            raise Refusal(429, "rate_limit_exceeded",
                          f"key {key.id} is over its {per_minute} {what} per minute "
                          f"({kind}; this request counts {cost}); retry in {wait} s",
                          {"Retry-After": str(wait)})  # fmt: skip

    async def admit(self, ticket: Ticket, body: Mapping[str, Any], candidates: list[Candidate],
                    every: Mapping[str, Candidate], cascade: bool = False
                    ) -> Standing | None:  # fmt: skip
        """Check the budgets that cover the request and reserve its worst case on each, in
        one step (one script on Redis): Refusal 429 if one is over; else the first that is
        past its degrade threshold, if any (the caller sends the request to a cheaper
        candidate and calls `readmit`).

        The worst case is one answer at the highest rates among `candidates` (whichever
        serves it, falling back costs nothing: a candidate that failed computed no answer);
        with `cascade`, every candidate may compute an answer before a surer one is asked, and
        each is charged, so it is their sum."""
        c = ticket.caller
        if ticket.unmetered or not self.book.may_cover(c.key_id, c.team, ticket.route):
            return None
        worst = self._worst(body, candidates, every, cascade)
        try:
            ticket.admission = await self.book.aadmit(ticket.request_id, c.key_id, c.team,
                                                      ticket.route, worst)  # fmt: skip
        except BudgetExceeded as exc:
            raise self._refusal(exc.standing) from None
        except self.store_errors as exc:
            self._store_failed(exc)
            ticket.unmetered = True
            return None
        return ticket.admission.degrading

    async def readmit(self, ticket: Ticket, body: Mapping[str, Any], candidates: list[Candidate],
                      every: Mapping[str, Candidate], cascade: bool = False) -> None:  # fmt: skip
        """The request now goes to `candidates` (degraded): if they may cost more than it
        reserved (a cheaper candidate not priced yet, at its prior), reserve again at their
        worst case, refused like any other; otherwise the reservation stands."""
        held = ticket.admission
        if held is None:
            return
        worst = self._worst(body, candidates, every, cascade)
        r = held.reserved
        if worst.nusd <= r.nusd and worst.mj <= r.mj and worst.ug <= r.ug:
            return
        await self.release(ticket)
        ticket.request_id += "-r"  # a reservation of its own
        await self.admit(ticket, body, candidates, every, cascade)

    def _worst(self, body: Mapping[str, Any], candidates: list[Candidate],
               every: Mapping[str, Candidate], cascade: bool) -> Amounts:  # fmt: skip
        prompt, completion = worst_tokens(body, self.default_max_tokens)
        if cascade and len(candidates) > 1:
            return Amounts.total(charge(prompt, completion, self.rates([one], every))
                                 for one in candidates)  # fmt: skip
        return charge(prompt, completion, self.rates(candidates, every))

    def rates(self, candidates: list[Candidate], every: Mapping[str, Candidate]) -> Rates:
        """The highest rates among `candidates`: each one's measured rates, its prior where
        it has none, the fleet's highest measured where even that is unknown (the module
        docstring). The one pricing path: admission, settling and escalations all use it."""
        out = UNKNOWN
        for c in candidates:
            out = out.highest(measured(c).or_else(prior(c, self.prior_tokens_per_s)))
        if not out.known:
            fleet = UNKNOWN
            for c in every.values():
                fleet = fleet.highest(measured(c))
            out = out.or_else(fleet)
        return out

    def _refusal(self, s: Standing) -> Refusal:
        exc = BudgetExceeded(s, time.time())
        return Refusal(429, "budget_exceeded", str(exc), {
            "Retry-After": str(exc.retry_after_s), "X-Wattops-Budget": s.budget.name,
        })  # fmt: skip

    async def release(self, ticket: Ticket) -> None:
        """Give back what the ticket reserved (its request failed before it was settled)."""
        if ticket.admission is None:
            return
        try:
            await self.book.arelease(ticket.admission)
        except self.store_errors as exc:  # its reservation is released by the heartbeat
            self._store_failed(exc)

    async def settle(
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
            listed = charge(prompt, completion, self.rates([served], every))
        cost = (Amounts() if cache_hit else listed) + ticket.extra
        at_reference = None
        if reference is not None and served is not None:
            ref = measured(reference)
            if ref.fusd_in is not None and ref.fusd_out is not None:
                at_reference = charge(prompt, completion, ref).nusd
        c = ticket.caller
        entry = Entry(
            request_id=ticket.request_id, time=time.time(), key_id=c.key_id, team=c.team,
            route=ticket.route, served_by=served.key if served else None, status=status,
            prompt_tokens=prompt, completion_tokens=completion, cost_nusd=cost.nusd,
            energy_mj=cost.mj, carbon_ug=cost.ug, degraded=ticket.degraded,
            cache_hit=cache_hit, list_cost_nusd=listed.nusd, reference_cost_nusd=at_reference,
        )  # fmt: skip
        if ticket.unmetered and self.outage is not None:
            self.outage.unmetered += 1
        await self._write(ticket.admission, entry)

    async def _write(self, admission: Admission | None, entry: Entry) -> None:
        """Settle `entry` on the store; with the store out (allow mode) hold it, in order,
        and write what is held before the next row that can be written."""
        try:
            if self._skip_store():
                raise self._pending_error()
            while self._pending:
                await self.book.asettle(*self._pending[0])
                self._pending.popleft()
            await self.book.asettle(admission, entry)
        except self.store_errors as exc:
            self._store_failed(exc)  # refuse: raised (the answer is not sent)
            self._pending.append((admission, entry))
            if len(self._pending) > PENDING_MAX:
                self._pending.popleft()
                if self.outage is not None:
                    self.outage.dropped += 1
            return
        self._store_ok()

    def _pending_error(self) -> Exception:
        return self.store_errors[0](self.outage.error if self.outage else "the store is out")

    @property
    def pending(self) -> int:
        """Ledger rows held for a store that was out (written when it is back)."""
        return len(self._pending)

    def escalated(self, ticket: Ticket, served: Candidate, every: Mapping[str, Candidate],
                  prompt: int, completion: int) -> None:  # fmt: skip
        """An answer the cascade set aside: its cost is the request's too."""
        ticket.extra = ticket.extra + charge(prompt, completion, self.rates([served], every))
