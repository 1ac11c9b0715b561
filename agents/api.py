"""The agent's HTTP API schema, shared by the agent (server) and the console (client).

This module imports only pydantic and the standard library so that the console can depend on
it without pulling in the agent's runtime.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

API_VERSION = "v1"

#: llama.cpp model types by the lower-case names its tools use, best quality first.
PRECISIONS: tuple[str, ...] = (
    "f32",
    "f16",
    "bf16",
    "q8_0",
    "q6_k",
    "q5_k_m",
    "q5_k_s",
    "q5_1",
    "q5_0",
    "q4_k_m",
    "q4_k_s",
    "iq4_nl",
    "iq4_xs",
    "q4_1",
    "q4_0",
    "q3_k_l",
    "q3_k_m",
    "q3_k_s",
    "q2_k",
)

#: Precisions a base model file may have: the agent quantizes from these.
BASE_PRECISIONS: tuple[str, ...] = ("f32", "f16", "bf16")


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


class DeploymentStatus(_Model):
    """A deployment as the agent sees it: desired and actual state, counters, last error."""

    name: str
    engine: str
    model: str
    precision: str = Field(description="precision the ready replicas serve")
    desired_precision: str
    available_precisions: list[str]
    desired_replicas: int
    ready_replicas: int
    max_replicas: int
    state: DeploymentState
    last_error: str | None = None
    idle_scale_to_zero_s: float | None = None
    idle_s: float = Field(0.0, description="seconds since the last request")
    replicas: list[ReplicaStatus] = []
    counters: DeploymentCounters = DeploymentCounters()
    latency: LatencySummary = LatencySummary()


class NodeSnapshot(_Model):
    """Everything the agent publishes about its node at one moment."""

    node: str
    agent_version: str
    started_at: float
    time: float
    version: int = Field(description="increases every time the snapshot changes")
    deployments: list[DeploymentStatus]


class ScaleRequest(_Model):
    """Body of POST /v1/deployments/{name}/scale."""

    replicas: Annotated[int, Field(ge=0, description="desired replica count; 0 parks")]


class PrecisionRequest(_Model):
    """Body of POST /v1/deployments/{name}/precision."""

    precision: str = Field(description="llama.cpp precision name, lower case, e.g. q4_k_m")


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
