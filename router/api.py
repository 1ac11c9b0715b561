"""The router's HTTP API schema (`GET /v1/router`, `PATCH /v1/routes/{name}`), shared by the
router (server) and the console (client). Imports only pydantic and the standard library."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Bounds", "CandidateView", "DecisionView", "RoutePatch", "RouteView", "RouterView"]

PolicyName = Literal["cheapest", "greenest", "fastest", "cascade"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Bounds(_Model):
    """A route's policy and constraints."""

    policy: PolicyName
    min_quality: float | None = Field(None, description="least top-1 agreement with the reference")
    max_chrf_drop: float | None = None
    max_p95_ms: float | None = None
    max_usd_per_1m_tokens: float | None = None


class RoutePatch(_Model):
    """What an operator may change on a route at run time (kept across router restarts).
    Fields left out stay as they are; null clears a bound."""

    policy: PolicyName | None = None
    min_quality: float | None = Field(None, ge=0, le=1)
    max_chrf_drop: float | None = Field(None, ge=0, le=100)
    max_p95_ms: float | None = Field(None, gt=0)
    max_usd_per_1m_tokens: float | None = Field(None, gt=0)


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
    quality: float | None = Field(None, description="top-1 agreement with the reference")
    chrf_drop: float | None = None
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
    errors: int = 0
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
