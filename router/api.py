"""The router's HTTP API schema (`GET /v1/router`, `PATCH /v1/routes/{name}`), shared by the
router (server) and the console (client). Imports only pydantic and the standard library."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "REPLACED_CHRF",
    "Bounds",
    "Budget",
    "BudgetPatch",
    "BudgetView",
    "CandidateView",
    "DecisionView",
    "KeyCreate",
    "KeyCreated",
    "KeyPatch",
    "KeyView",
    "LedgerCheck",
    "RoutePatch",
    "RouteView",
    "RouterView",
]

PolicyName = Literal["cheapest", "greenest", "fastest", "cascade"]
Scope = Literal["key", "team", "route", "fleet"]
Unit = Literal["usd", "kwh", "kgco2e"]
Window = Literal["hour", "day", "month"]
WINDOWS: tuple[str, ...] = ("hour", "day", "month")
#: How each budget unit is written for people.
UNIT_LABELS = {"usd": "USD", "kwh": "kWh", "kgco2e": "kgCO2e"}
#: What each budget unit is counted in, exactly, on every store (`router/billing/money.py`):
#: integers of nano-dollars, millijoules and micrograms CO2e.
COUNTED_IN = {"usd": "nano-USD", "kwh": "mJ", "kgco2e": "ugCO2e"}
#: How many of those make one budget unit.
UNIT_SCALE = {"usd": 10**9, "kwh": 3_600_000_000, "kgco2e": 10**9}
#: The largest amount a budget window may count, in its integers: Redis' scripts compare
#: in Lua's doubles, exact to 2**53 (9.0 M USD, 2.5 GWh, 9,007 tCO2e per window).
UNITS_MAX = 2**53 - 1
DEFAULT_WARN_AT = (0.8, 0.9, 0.95)
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
TEAM_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


#: The most requests or tokens per minute a key may be given (a store keeps 64-bit integers).
RATE_MAX = 10**12


#: What a route's or a patch's old chrF bound is refused with.
REPLACED_CHRF = (
    "max_chrf_drop is gone: quality is task accuracy on the labelled set now, not agreement "
    "with the reference's wording; use max_accuracy_drop (points lost against the reference, "
    "from `wattops quality`) and/or min_quality (the share of its accuracy kept)"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(_Model):
    # Strict: a control call says exactly what it means (false is not 0.0, "2" is not 2).
    model_config = ConfigDict(extra="forbid", strict=True)


class Bounds(_Model):
    """A route's policy and constraints."""

    policy: PolicyName
    min_quality: float | None = Field(
        None, description="least share of the reference's task accuracy kept"
    )
    max_accuracy_drop: float | None = Field(
        None, description="most points of task accuracy lost against the reference"
    )
    max_p95_ms: float | None = None
    max_usd_per_1m_tokens: float | None = None


class RoutePatch(_Request):
    """What an operator may change on a route at run time (kept across router restarts).
    Fields left out stay as they are; null clears a bound."""

    policy: PolicyName | None = None
    min_quality: float | None = Field(None, ge=0, le=1)
    max_accuracy_drop: float | None = Field(None, ge=0, le=100)
    max_p95_ms: float | None = Field(None, gt=0)
    max_usd_per_1m_tokens: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _old_floor(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_chrf_drop" in data:  # the schema imports no wattops
            raise ValueError(REPLACED_CHRF)
        return data


class CandidateView(_Model):
    """One candidate deployment of a route, now and since the router started."""

    key: str = Field(description="node/deployment")
    precision: str | None = None
    state: str = Field(description="the agent's deployment state, or `unseen`")
    live: bool = False
    ready: int = 0
    in_flight: int = 0
    p95_ms: float | None = None
    usd_per_1m_tokens: float | None = None
    figures_current: bool = Field(
        False, description="per-token figures from the agent's current window (else learned)"
    )
    quality: float | None = Field(
        None, description="share of the reference's task accuracy kept (or declared)"
    )
    accuracy_drop: float | None = Field(
        None, description="points of task accuracy lost against the reference (measured)"
    )
    quality_source: str = ""
    breaker: str = Field("closed", description="closed | opened | half-opened")
    excluded: str | None = Field(None, description="why the last decision left it out")
    requests: int = 0
    tokens: int = 0
    share: float = Field(0.0, description="share of the route's answered requests")


class DecisionView(_Model):
    """One request's placement."""

    time: float
    served_by: str | None
    reason: str
    fallbacks: list[str] = []
    status: int


class RouteView(_Model):
    """A route: its bounds, how its traffic splits, and what that saved."""

    name: str
    reference: str
    bounds: Bounds
    candidates: list[CandidateView]
    requests: int = 0
    errors: int = Field(
        0,
        description="answers that failed on the fleet's side: 5xx, 502 when "
        "every candidate failed, streams the engine broke off",
    )
    client_errors: int = Field(
        0,
        description="the clients' own: 4xx from the engine (a bad "
        "request), streams the client broke off (499)",
    )
    refusals: int = Field(0, description="answered 503: no candidate met the bounds")
    fallbacks: int = Field(0, description="candidates skipped after failing before answering")
    escalations: int = Field(0, description="cascade answers set aside for a surer candidate")
    escalated_tokens: int = Field(0, description="their tokens (their cost is in est_cost_usd)")
    tokens: int = 0
    est_cost_usd: float = Field(
        0.0,
        description="tokens x the serving deployment's $/token when answered, or when first "
        "known for one that had not served before (an estimate from the agents' figures)",
    )
    counterfactual_cost_usd: float = Field(
        0.0, description="the same tokens x the reference's $/token at the time (estimate)"
    )
    unpriced_tokens: int = Field(
        0, description="tokens not in the cost figures yet: their server's or the reference's "
        "$/token is not known yet",
    )  # fmt: skip
    est_energy_j: float = 0.0
    counterfactual_energy_j: float = 0.0
    saving: float | None = Field(
        None, description="1 - est/counterfactual cost (priced tokens only)"
    )
    last_decisions: list[DecisionView] = []


class RouterView(_Model):
    """`GET /v1/router`."""

    routes: list[RouteView]
    agents: int
    agents_live: int
    budget_warnings: list[str] = Field(
        default_factory=list, description="the last budget warnings fired, oldest first"
    )
    webhook_sent: int = Field(0, description="budget warnings delivered to a webhook")
    webhook_failed: int = Field(0, description="budget warnings a webhook never got")
    webhook_error: str | None = Field(None, description="the last webhook failure")


# -- budgets and keys (router/billing/budgets.py, keys.py) -------------------------------


def check_limit(field: str, limit: float, unit: str) -> None:
    """ValueError naming `field` unless `limit` is one a budget in `unit` counts exactly."""
    scale = UNIT_SCALE[unit]
    if not 1 <= limit * scale <= UNITS_MAX:
        label = UNIT_LABELS[unit]
        raise ValueError(
            f"{field} {limit!r} {label} is outside what a budget counts exactly: from "
            f"{1 / scale:.3g} to {UNITS_MAX / scale:.4g} {label} (1 to 2**53-1 "
            f"{COUNTED_IN[unit]})"
        )


class Budget(_Request):
    """One budget. `subject` names what it covers: a key's id, a team, a route; none for the
    fleet."""

    name: str = Field(pattern=NAME_PATTERN, description="unique name (letters, digits, ._:-)")
    scope: Scope = Field(description="what it covers: key | team | route | fleet")
    subject: str | None = Field(
        None, description="the key id, team or route name; none for scope fleet"
    )
    unit: Unit = Field(description="usd | kwh | kgco2e")
    window: Window = Field(description="hour | day | month (UTC; month: the calendar month)")
    limit: float = Field(gt=0, description="at or above this (in flight included): refused")
    degrade_at: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="fraction of the limit from which requests are degraded (cheapest "
        "candidate meeting degrade_min_quality); unset: nothing is degraded, only refused",
    )
    degrade_min_quality: float | None = Field(
        None,
        ge=0,
        le=1,
        description="the quality floor degraded requests keep (share of the "
        "reference's task accuracy kept)",
    )
    warn_at: list[float] = Field(
        default_factory=lambda: list(DEFAULT_WARN_AT),
        description="fractions of the limit at which a warning fires, once per window",
    )

    @field_validator("warn_at")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < v <= 1 for v in value):
            raise ValueError(f"warn_at must be fractions in (0, 1], got {value}")
        return sorted(set(value))

    @model_validator(mode="after")
    def _subject(self) -> Budget:
        check_limit("limit", self.limit, self.unit)
        if self.scope == "fleet" and self.subject is not None:
            raise ValueError("a fleet budget has no subject")
        if self.scope != "fleet" and not self.subject:
            raise ValueError(f"a {self.scope} budget needs a subject (the {self.scope} it covers)")
        return self

    @property
    def limit_units(self) -> int:
        """The limit in the integers the stores count (`COUNTED_IN`)."""
        return round(self.limit * UNIT_SCALE[self.unit])

    def covers(self, key_id: str | None, team: str | None, route: str | None) -> bool:
        """Whether a request by this key, team and route counts against this budget."""
        if self.scope == "fleet":
            return True
        return self.subject == {"key": key_id, "team": team, "route": route}[self.scope]

    def describe(self) -> str:
        """How people read it: `team ml, USD per day`."""
        who = "fleet" if self.scope == "fleet" else f"{self.scope} {self.subject}"
        return f"{who}, {UNIT_LABELS[self.unit]} per {self.window}"


class BudgetPatch(_Request):
    """`PATCH /v1/budgets/{name}`: the fields to change (what it covers stays)."""

    limit: float | None = Field(None, gt=0)
    degrade_at: float | None = Field(None, gt=0, lt=1)
    degrade_min_quality: float | None = Field(None, ge=0, le=1)
    warn_at: list[float] | None = None


class BudgetView(_Model):
    """A budget and where it stands in its current window (`GET /v1/budgets`)."""

    budget: Budget
    spent: float = Field(description="spent in this window, from the ledger")
    reserved: float = Field(description="what requests in flight may still cost")
    remaining: float = Field(description="limit - spent - reserved, never below 0")
    fraction: float = Field(description="(spent + reserved) / limit")
    window_start: float = Field(description="unix time the window began (UTC boundary)")
    resets_at: float = Field(description="unix time the window ends and spend starts again")
    state: Literal["ok", "warning", "degrading", "over"]
    counted_in: str = Field(description="the integers the exact figures count: nano-USD, mJ, "
                            "ugCO2e")  # fmt: skip
    limit_units: int = Field(description="the limit, exactly, in `counted_in`")
    spent_units: int = Field(description="spent, exactly, in `counted_in`")
    reserved_units: int = Field(description="reserved, exactly, in `counted_in`")


class KeyCreate(_Request):
    """`POST /v1/keys`: the key's owner, its limits, and budgets made for it."""

    team: str = Field(pattern=TEAM_PATTERN, description="the team it is charged to")
    name: str | None = Field(None, max_length=128, description="what it is for")
    rpm: int | None = Field(None, ge=1, le=RATE_MAX, description="requests per minute")
    tpm: int | None = Field(None, ge=1, le=RATE_MAX,
                            description="tokens per minute (prompt + completion)")  # fmt: skip
    budget_usd_day: float | None = Field(None, gt=0)
    budget_usd_month: float | None = Field(None, gt=0)
    budget_kwh_month: float | None = Field(None, gt=0)
    budget_kgco2e_month: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _limits(self) -> KeyCreate:
        for unit, window, limit in self.budgets():
            check_limit(f"budget_{unit}_{window}", limit, unit)
        return self

    def budgets(self) -> list[tuple[str, str, float]]:
        """(unit, window, limit) of each budget asked for."""
        asked = [
            ("usd", "day", self.budget_usd_day),
            ("usd", "month", self.budget_usd_month),
            ("kwh", "month", self.budget_kwh_month),
            ("kgco2e", "month", self.budget_kgco2e_month),
        ]
        return [(unit, window, limit) for unit, window, limit in asked if limit is not None]


class KeyPatch(_Request):
    """`PATCH /v1/keys/{id}`: what to change (fields left out stay)."""

    name: str | None = Field(None, max_length=128)
    rpm: int | None = Field(None, ge=1, le=RATE_MAX)
    tpm: int | None = Field(None, ge=1, le=RATE_MAX)


class KeyView(_Model):
    """A key as listed: never its secret."""

    id: str
    team: str
    name: str | None = None
    created_at: float
    revoked_at: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    budgets: list[str] = Field(default_factory=list, description="budgets made for this key")


class KeyCreated(KeyView):
    """`POST /v1/keys`'s answer: the key itself, shown this once."""

    key: str = Field(description="Authorization: Bearer <key>; not stored, not shown again")


# -- reports (router/billing/report.py) -------------------------------------------------------


class ReportGroup(_Model):
    """One key, team or route over the report's period (`(none)`: requests without one)."""

    group: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    energy_kwh: float
    carbon_kg: float
    cost_nusd: int = Field(0, description="the cost, exactly, in nano-USD (the ledger's unit)")
    energy_mj: int = Field(0, description="the energy, exactly, in millijoules")
    carbon_ug: int = Field(0, description="the carbon, exactly, in micrograms CO2e")
    cache_hits: int = Field(description="answers from an agent's response cache (cost 0)")
    cache_saving_usd: float = Field(description="those answers' tokens at the server's rates")
    degraded: int = Field(description="answers sent to a cheaper candidate by a budget")
    routing_saving_usd: float = Field(
        description="the same tokens at the route's reference's rates minus at the server's"
    )
    errors: int = Field(
        description="answers that failed on the fleet's side (5xx); the "
        "clients' own (a bad request, a stream they broke off) are not errors"
    )


class FleetSpan(_Model):
    """What the agents attributed to the fleet's deployments between two samples the router
    took (every minute) within the period."""

    start: float
    end: float
    cost_usd: float
    energy_kwh: float
    carbon_kg: float
    #: The ledger's requests between the same two samples.
    ledger_cost_usd: float
    ledger_energy_kwh: float
    ledger_carbon_kg: float
    #: Fleet minus ledger, never below 0: held and idle hardware no request was charged, and
    #: requests not sent through this router.
    unattributed_cost_usd: float
    unattributed_energy_kwh: float
    unattributed_carbon_kg: float
    #: Ledger minus fleet, where the ledger charged more than the agents attributed in the
    #: span (0 otherwise): requests are charged at rates learned over the agents' recent
    #: windows, so a span busier or cheaper than those windows, or answers charged in full
    #: whose work fell partly outside it, come out above the hardware's own cost.
    overcharged_cost_usd: float = 0.0
    overcharged_energy_kwh: float = 0.0
    overcharged_carbon_kg: float = 0.0
    parking_saving_usd: float = Field(
        0.0, description="the hardware charges deployments did not carry while parked (the "
        "share each held when it last ran, at its node's price): part of the unattributed "
        "cost's hardware, saved where that share is reused or the node released",
    )  # fmt: skip


class BudgetForecast(_Model):
    """A budget's spend projected to the end of its window."""

    budget: str
    unit: Unit
    window: Window
    limit: float
    spent: float
    spent_units: int = Field(0, description="spent, exactly, in the unit's integers (COUNTED_IN)")
    rate_per_day: float = Field(description="mean spend per day over the lookback")
    lookback_s: float = Field(description="seconds the rate is measured over")
    projected: float = Field(description="spent + rate x time left in the window")
    runs_out_at: float | None = Field(
        None, description="when spend reaches the limit at that rate (unix time), if before "
        "the window ends; the report's time if it is already spent (never in the past)",
    )  # fmt: skip
    resets_at: float


class LedgerCheck(_Model):
    """`GET /v1/ledger/verify`, `wattops ledger verify`: the ledger re-added and compared."""

    store: str = Field(description="the ledger checked: a SQLite file or a Redis URL")
    rows: int
    chained_rows: int = Field(description="rows with a link of the hash chain (rows written "
                              "before the chain existed have none)")  # fmt: skip
    budgets_checked: int
    windows_checked: int = Field(description="(budget, window) spends re-added and compared")
    mismatches: list[str] = Field(description="every difference found, each naming what")
    ok: bool = Field(description="no mismatch")


class Report(_Model):
    """`GET /v1/report`: chargeback per key, team or route, and budget forecasts."""

    by: Literal["key", "team", "route"]
    since: float
    until: float
    groups: list[ReportGroup]
    total: ReportGroup
    fleet: FleetSpan | None = Field(
        None, description="none until the router has sampled the fleet twice in the period"
    )
    forecasts: list[BudgetForecast]
