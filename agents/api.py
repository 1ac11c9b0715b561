"""The agent's HTTP API schema, shared by the agent (server) and the console (client).

This module imports only pydantic, the standard library and the shared vocabulary, so that the
fleet core, the router and the console can depend on it without pulling in the agent's runtime.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from wattops.vocabulary import PowerSource

API_VERSION = "v1"


class DeploymentState(StrEnum):
    """What a deployment is doing now."""

    SERVING = "serving"
    SWITCHING = "switching"
    SCALING = "scaling"
    PARKED = "parked"
    FAILED = "failed"


class ReplicaState(StrEnum):
    """Lifecycle of one engine replica."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReplicaStatus(_Model):
    """One replica process (or attached server) of a deployment."""

    id: str
    precision: str
    state: ReplicaState
    url: str
    pid: int | None = Field(None, description="OS process id; null for attached servers")
    in_flight: int = Field(0, description="requests being served right now")
    restarts: int = Field(0, description="times this replica slot was restarted after a crash")
    started_at: float = Field(description="unix time the replica was started")


class LatencySummary(_Model):
    """Latency of the gateway's answers over the recent window, in seconds."""

    p50_s: float | None = None
    p95_s: float | None = None
    window: int = Field(0, description="number of answers the percentiles are computed over")


class ForecastStatus(_Model):
    """Predictive scaling (agents/forecast.py): what the seasonal forecast says now."""

    season_s: float
    bucket_s: float
    ready: bool = Field(description="a whole season seen: the forecast is used")
    phases_seen: int = Field(description="buckets of the season seen so far")
    phases: int
    rate_now: float | None = Field(None, description="forecast requests/s now")
    peak_ahead: float | None = Field(
        None, description="the highest forecast requests/s over the lead time ahead"
    )
    level: float = Field(description="today's traffic over the profile (1: as usual)")
    lead_s: float = Field(description="how far ahead replicas are started: cold start + bucket")
    cold_start_s: float | None = Field(None, description="measured: spawn to healthy, mean")
    service_s: float | None = Field(None, description="measured mean seconds per request")
    replicas: int | None = Field(None, description="what the forecast alone would run")
    reason: str | None = Field(None, description="the last scaling decision and why")


class BatchingStatus(_Model):
    """Slots of an engine that decodes several requests together (llamacpp-server)."""

    parallel: int = Field(description="slots each replica was started with")
    slots: int = Field(
        description="slots in use per replica: requests the gateway lets into a replica at once"
    )
    adaptive: bool = Field(description="the agent adapts `slots` from measurements")
    reason: str | None = Field(None, description="why `slots` is what it is (last change)")
    changed_at: float | None = Field(None, description="when `slots` last changed (unix time)")
    tokens_per_s_per_replica: float | None = Field(
        None, description="tokens decoded per second per replica over the last tuning window"
    )
    waited: int = Field(0, description="requests that waited for a free slot, last window")


class CanarySide(_Model):
    """One side of a canary (the serving precision or the candidate) over its window."""

    precision: str
    replicas: int = 0
    requests: int = Field(0, description="live requests answered by this side")
    errors: int = 0
    tokens: int = Field(0, description="prompt + completion tokens its replicas evaluated")
    busy_s: float = Field(0.0, description="seconds its replicas had a request in flight")
    j_per_token: float | None = Field(
        None, description="active energy by busy time (as the accounting attributes it) per token"
    )
    usd_per_1m_tokens: float | None = Field(
        None, description="the share of the node its replicas held, plus electricity, per 1M tokens"
    )
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    ttft_p50_s: float | None = Field(
        None, description="time to first token of its streamed live requests (none: no stream)"
    )
    ttft_p95_s: float | None = None
    streamed: int = Field(0, description="streamed live requests, which the TTFT figures are of")


#: The canary's quality guards' defaults (chosen from SmolLM2's figures, docs/benchmarks.md).
DEFAULT_MAX_ACCURACY_DROP = 1.5
DEFAULT_PROBES = 200
DEFAULT_MAX_KL = 0.1


class CanaryGuards(_Model):
    """What a candidate must show to be promoted (each optional; defaults in brackets)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_accuracy_drop: float | None = Field(
        DEFAULT_MAX_ACCURACY_DROP, ge=0, le=100, description="points of task accuracy the "
        "candidate may lose against the serving precision on the labelled probes (paired, same "
        f"items) [{DEFAULT_MAX_ACCURACY_DROP:g}]",
    )  # fmt: skip
    accuracy_verdict: Literal["point", "bound"] = Field(
        "point", description="how max_accuracy_drop reads the drop's 95% interval: its point "
        "estimate, or its upper bound (non-inferiority) [point]",
    )  # fmt: skip
    probes: int = Field(
        DEFAULT_PROBES, ge=0, le=10000, description="labelled items asked of both sides while "
        f"the candidate is idle; all must be answered to decide (0: none) [{DEFAULT_PROBES}]",
    )  # fmt: skip
    max_kl: float | None = Field(
        DEFAULT_MAX_KL, ge=0, description="mean KL(serving || candidate) per token, nats, over "
        "the shadowed pairs' and probes' shared greedy prefixes "
        f"[{DEFAULT_MAX_KL:g}]",
    )  # fmt: skip
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="greedy answer agreement (exact match) on shadowed pairs: "
        "consistency with the serving precision's wording, not correctness [off]",
    )  # fmt: skip
    max_p95_change: float | None = Field(
        0.10, ge=-1, description="p95 latency change allowed, a fraction (0.10: 10% worse) [0.10]"
    )
    max_j_per_token_change: float | None = Field(
        0.0, ge=-1, description="J/token change allowed, a fraction (0: not worse; -0.2: at "
        "least 20% better) [0]",
    )  # fmt: skip
    min_pairs: int = Field(50, ge=1, le=100000, description="shadowed pairs needed to decide [50]")


class CanaryRequest(_Model):
    """A canary: the candidate precision takes `share` of live traffic for `duration_s`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    share: float = Field(0.1, gt=0, lt=1, description="fraction of live requests sent to it")
    duration_s: float = Field(
        300.0, ge=5, le=86400, description="how long it runs (up to twice as long while "
        "labelled probes are left to answer)",
    )  # fmt: skip
    shadow_share: float = Field(
        0.25, gt=0, le=1, description="fraction of answered requests also sent, greedily, to "
        "both precisions to compare their answers (one at a time, while the candidate is idle)",
    )  # fmt: skip
    guards: CanaryGuards = CanaryGuards()


class CanaryStatus(_Model):
    """A canary running, or the last one with its verdict."""

    precision: str = Field(description="the candidate precision")
    share: float
    duration_s: float
    started_at: float = Field(description="unix time")
    elapsed_s: float
    guards: CanaryGuards
    state: Literal["starting", "running", "promoting", "promoted", "rolled_back", "inconclusive"]
    serving: CanarySide
    candidate: CanarySide
    pairs: int = Field(0, description="requests shadowed to both precisions with greedy decoding")
    agreement: float | None = Field(None, description="exact-match share of the pairs")
    chrf: float | None = Field(None, description="chrF of the candidate's answers, 0..100")
    kl_mean: float | None = Field(
        None, description="teacher-forced KL(serving || candidate) per token, nats: over each "
        "pair's shared greedy prefix (the same context on both sides, up to and including the "
        "first differing token), from the top-10 alternatives each side gives",
    )  # fmt: skip
    kl_tokens: int = Field(0, description="token positions the KL is the mean of")
    probes: int = Field(0, description="labelled probes answered by both sides")
    probes_planned: int = Field(0, description="labelled probes to ask")
    accuracy_serving: float | None = Field(None, description="share of probes right, serving")
    accuracy_candidate: float | None = Field(None, description="share of probes right, candidate")
    accuracy_drop: float | None = Field(
        None, description="points of accuracy the candidate loses on the probes (paired)"
    )
    accuracy_drop_low: float | None = Field(None, description="its 95% interval, low (points)")
    accuracy_drop_high: float | None = Field(None, description="its 95% interval, high (points)")
    j_per_token_change: float | None = Field(None, description="candidate vs serving, a fraction")
    p95_change: float | None = Field(None, description="candidate vs serving, a fraction")
    verdict: str | None = Field(None, description="the decision and why, once made")
    ended_at: float | None = None


class DeploymentCounters(_Model):
    """Monotonic counters since the deployment was first configured on this node."""

    requests_total: int = 0
    errors_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    cached_prompt_tokens_total: int = Field(
        0, description="prompt tokens served from the engine's prefix (KV) cache"
    )
    cache_hits_total: int = Field(0, description="answers served from the response cache")
    cache_misses_total: int = Field(0, description="cacheable requests that went to an engine")


class Totals(_Model):
    """Monotonic energy, cost and carbon totals (kept across agent restarts): what a
    deployment or the node has used and what that cost, since it was first configured."""

    energy_j_total: float = Field(0.0, description="joules at the wall of the measured devices")
    active_energy_j_total: float = Field(0.0, description="energy above the idle baseline")
    idle_energy_j_total: float = Field(0.0, description="energy at the idle baseline")
    estimated_energy_j_total: float = Field(
        0.0, description="part of energy_j_total that was estimated, not measured"
    )
    cost_usd_total: float = Field(0.0, description="hardware (rental or amortised) + electricity")
    carbon_g_total: float = Field(0.0, description="gCO2e: energy x PUE x grid intensity")
    unmetered_s_total: float = Field(
        0.0,
        description="seconds the agent was down while the node (still billed, still drawing) "
        "could not be metered: their cost is counted, their energy is unknown, not zero",
    )
    parked_s_total: float = Field(
        0.0, description="seconds a deployment was parked (no replica: it held nothing)"
    )
    parked_usd_avoided_total: float = Field(
        0.0,
        description="the hardware charge a deployment did not carry while parked: the share "
        "of the node it held when it last ran, at the node's price; the node's unallocated "
        "cost grew by as much (a saving for the fleet where that share is reused or released)",
    )


class Figures(_Model):
    """Rates and per-token figures over the recent window (`window_s`). None: no data."""

    window_s: float
    watts: float | None = Field(None, description="mean power attributed over the window")
    tokens_per_s: float | None = None
    requests_per_s: float | None = None
    cost_usd_per_hour: float | None = Field(None, description="burn rate over the window")
    j_per_token: float | None = None
    usd_per_1m_tokens: float | None = None
    usd_per_1m_input_tokens: float | None = Field(
        None, description="cost split by the configured input/output token weights"
    )
    usd_per_1m_output_tokens: float | None = None
    gco2e_per_1m_tokens: float | None = None
    response_cache_hit_rate: float | None = Field(
        None, description="gateway response-cache hits / cacheable requests"
    )
    prefix_cache_hit_rate: float | None = Field(
        None, description="engine prefix-cache prompt tokens / prompt tokens"
    )


class DeploymentAccounting(_Model):
    """What a deployment holds of its node and what it has cost."""

    share: float = Field(description="share of the node held now: max(memory, compute) share")
    cost_usd_per_hour: float = Field(description="node price x share (+ its electricity)")
    energy_source: PowerSource
    budget_usd_per_hour: float | None = None
    budget_usd_per_day: float | None = None
    totals: Totals = Totals()
    figures: Figures


class DeviceReading(_Model):
    """One measured device: a GPU, a Jetson rail or a RAPL zone, as its sensor read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    watts: float
    energy_j: float | None = Field(
        None,
        description="cumulative joules from the device's own counter, wrap-around already "
        "counted; null when the device has no counter (its energy is integrated from watts)",
    )
    utilisation: float | None = Field(None, description="0..1")
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_limit_watts: float | None = None
    volts: float | None = None
    amps: float | None = None
    in_total: bool = Field(
        True, description="counted in the node total (false for rails already inside VDD_IN)"
    )


class NodePower(_Model):
    """The node's power now and its energy so far."""

    source: PowerSource = Field(description="where the watts come from; estimate is no measurement")
    sensor: str = Field(description="what is measured, where")
    total_from: str = Field("", description="how the node total is formed from the readings")
    watts: float
    watts_smoothed: float = Field(description="exponential mean over about 5 s")
    sample_hz: float
    devices: list[DeviceReading] = []
    sensor_error: str | None = None


class NodeCost(_Model):
    """The node's hardware profile, price and site settings."""

    profile: str
    price_usd_per_hour: float = Field(description="rental, or purchase / lifetime")
    price_basis: str = Field(description="cloud on-demand or owned (amortised), with source")
    owned: bool
    electricity_usd_per_kwh: float
    pue: float
    pue_basis: str = Field(
        "",
        description="where the PUE comes from: the site, or the cloud "
        "provider's published figure for cloud hardware",
    )
    grid_gco2e_per_kwh: float
    burn_usd_per_hour: float = Field(description="the node's full price now (+ electricity)")
    unallocated_usd_per_hour: float = Field(description="burn no deployment holds")
    budget_usd_per_hour: float | None = None
    budget_usd_per_day: float | None = None


class Alert(_Model):
    """Something an operator should look at, with its arithmetic."""

    id: str = Field(description="stable id, e.g. budget:node:hour or parkable:tiny")
    kind: Literal[
        "budget_exceeded",
        "parkable",
        "sensor_failed",
        "cluster_unreachable",
        "agent_downtime",
        "deployment_failed",
    ]
    severity: Literal["info", "warning", "critical"]
    subject: str = Field(description="node or deployment name")
    message: str
    detail: str = Field("", description="the arithmetic behind the message")
    since: float = Field(description="unix time the condition began")
    saves_usd_per_hour: float | None = None


class PolicyStep(_Model):
    """One step a policy plans (advise) or takes (act), with its reason and arithmetic."""

    deployment: str = Field(description="the deployment acted on; `*`: the whole node "
                            "(power_limit, power_restore)")  # fmt: skip
    action: Literal["park", "scale", "canary", "power_limit", "power_restore"]
    target: int | str = Field(description="replicas (park, scale), the precision (canary), or "
                              "the GPUs' summed power limit in watts (power_*)")  # fmt: skip
    reason: str
    saves_usd_per_hour: float | None = Field(
        None, description="what it should save; none: measured by the canary, or not money"
    )
    limits: dict[str, float] | None = Field(
        None, description="power_*: the limit each GPU gets, in watts (gpu0: 300)"
    )


class PolicyAction(PolicyStep):
    """A step the policy took."""

    time: float = Field(description="unix time")
    outcome: str = Field(description="accepted, or why it was refused")


class PolicyStatus(_Model):
    """The node's policy: its limits, where the node stands, the plan, what it did."""

    mode: Literal["advise", "act"]
    paused: bool
    max_usd_per_hour: float | None
    max_watts: float | None
    over: list[str] = Field(description="the limits passed now, in words; empty: within them")
    plan: list[PolicyStep] = Field(description="what it would do now (advise) or is doing (act)")
    actions: list[PolicyAction] = Field(description="the last steps taken, oldest first")


class DeploymentStatus(_Model):
    """A deployment as the agent sees it: desired and actual state, counters, last error."""

    name: str
    engine: str
    model: str
    managed_by: Literal["agent", "kubernetes"] = Field(
        "agent",
        description="agent: this agent runs the replicas and takes control requests; "
        "kubernetes: pods of a Kubernetes Deployment on this node, which the agent observes "
        "and accounts for but does not control",
    )
    namespace: str | None = Field(None, description="Kubernetes namespace (managed_by kubernetes)")
    precision: str = Field(description="precision the ready replicas serve")
    desired_precision: str
    available_precisions: list[str]
    desired_replicas: int
    ready_replicas: int
    max_replicas: int
    state: DeploymentState
    last_error: str | None = None
    idle_scale_to_zero_s: float | None = None
    #: Set when the agent scales replicas with load (requests in flight per replica).
    autoscale_target_in_flight: float | None = None
    idle_s: float = Field(0.0, description="seconds since the last request")
    replicas: list[ReplicaStatus] = []
    counters: DeploymentCounters = DeploymentCounters()
    latency: LatencySummary = LatencySummary()
    batching: BatchingStatus | None = None
    forecast: ForecastStatus | None = Field(
        None, description="predictive scaling (autoscale_predictive), when configured"
    )
    canary: CanaryStatus | None = Field(
        None, description="a canary precision switch running, or the last one and its verdict"
    )
    accounting: DeploymentAccounting | None = None


class NodeSnapshot(_Model):
    """Everything the agent publishes about its node at one moment."""

    node: str
    agent_version: str
    started_at: float
    time: float
    version: int = Field(description="increases every time the snapshot changes")
    deployments: list[DeploymentStatus]
    power: NodePower | None = None
    cost: NodeCost | None = None
    totals: Totals = Totals()
    figures: Figures | None = None
    alerts: list[Alert] = []
    policy: PolicyStatus | None = Field(
        None, description="the node's policy ([policy] in its file)"
    )


class DeploymentHistory(_Model):
    """One deployment in one HistoryPoint."""

    watts: float = Field(description="power attributed to the deployment over that second")
    precision: str
    ready_replicas: int
    requests_total: int
    prompt_tokens_total: int
    completion_tokens_total: int
    energy_j_total: float
    cost_usd_total: float
    carbon_g_total: float
    cached_prompt_tokens_total: int
    cache_hits_total: int
    cache_misses_total: int


class HistoryPoint(_Model):
    """One second of the node's history; totals are cumulative, rates are over that second."""

    t: float = Field(description="unix time at the end of the second")
    watts: float
    source: PowerSource
    energy_j_total: float
    cost_usd_total: float
    carbon_g_total: float
    deployments: dict[str, DeploymentHistory]


class History(_Model):
    """Answer of GET /v1/history: oldest point first."""

    node: str
    resolution_s: float
    points: list[HistoryPoint]


class _Request(_Model):
    # Strict: a control call says exactly what it means ("2" is not 2 replicas).
    model_config = ConfigDict(extra="forbid", strict=True)


class PolicyRequest(_Request):
    """Body of POST /v1/policy."""

    paused: bool = Field(description="true: plan and say, never act; false: act again")


class ScaleRequest(_Request):
    """Body of POST /v1/deployments/{name}/scale."""

    replicas: Annotated[int, Field(ge=0, description="desired replica count; 0 parks")]


class PrecisionRequest(_Request):
    """Body of POST /v1/deployments/{name}/precision."""

    precision: str = Field(
        description="llama.cpp precision name, e.g. q4_k_m (read case-insensitively: Q4_K_M)"
    )
    canary: CanaryRequest | None = Field(
        None, description="try the precision on a share of live traffic first; promoted or "
        "rolled back on its guards when the time is up (none: switch at once)",
    )  # fmt: skip

    @field_validator("precision")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()


class Accepted(_Model):
    """Answer to a control request: accepted, carried out in the background."""

    deployment: str
    action: str
    desired_replicas: int
    desired_precision: str


class ErrorBody(_Model):
    """Every 4xx/5xx body the agent sends: what was wrong and what is allowed."""

    error: str = Field(description="machine-readable error code")
    message: str = Field(description="what was wrong and what is allowed")
    allowed: list[str] | None = None
