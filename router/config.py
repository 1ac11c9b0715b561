"""`router.toml`: the router daemon, the agents it follows and the routes it serves.

```toml
[router]
listen = "0.0.0.0:8090"
state_dir = "/var/lib/wattops-router"
token = "..."                 # control endpoints (PUT /v1/routes/...); default $WATTOPS_TOKEN
inventory = "fleet.toml"      # or [[agents]] entries below, or kubernetes = true

[[agents]]
url = "http://gpu-a1.internal:8080"

[[routes]]
name = "chat"                 # what clients put in "model"
candidates = ["*/smollm2"]    # node/deployment globs
reference = "gpu-a1/smollm2"  # quality 1.0, and the counterfactual of every saving
policy = "cheapest"           # cheapest | greenest | fastest | cascade
max_accuracy_drop = 1.5       # points of task accuracy lost against the reference, at most
max_p95_ms = 4000
```

Validated with pydantic; a bad file stops the router with the file, the field and what is
allowed (`ConfigError`).
"""

from __future__ import annotations

import fnmatch
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wattops.fleet.client import agent_url
from wattops.fleet.inventory import InventoryError, load_inventory
from wattops.router.api import REPLACED_CHRF, Budget
from wattops.vocabulary.access import TokenEntry, load_tokens, unique_names
from wattops.vocabulary.net import split_listen
from wattops.vocabulary.replaced import refuse_replaced
from wattops.vocabulary.tls import tls_pair_problem

__all__ = [
    "POLICIES",
    "AgentEntry",
    "ConfigError",
    "RouteConfig",
    "RouterConfig",
    "RouterSection",
    "load_config",
    "parse_config",
]

Policy = Literal["cheapest", "greenest", "fastest", "cascade"]
POLICIES: tuple[str, ...] = ("cheapest", "greenest", "fastest", "cascade")


class ConfigError(Exception):
    """The router configuration is invalid; the message names file, field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RouterSection(_Section):
    """`[router]`: how the daemon runs."""

    listen: str = Field("127.0.0.1:8090", description="host:port the router binds to")
    state_dir: Path = Field(
        Path("router-state"), description="route overrides set at run time, learned figures"
    )
    token: str | None = Field(
        default_factory=lambda: os.environ.get("WATTOPS_TOKEN") or None,
        description="an admin bearer token (named `token`), beside the [[tokens]]; default: "
        "$WATTOPS_TOKEN",
    )
    tokens_file: Path | None = Field(
        None, description="a TOML file of [[tokens]] (name, role, hash), read at start"
    )
    tls_cert: Path | None = Field(
        None, description="serve HTTPS with this certificate (PEM; reloaded on SIGHUP)"
    )
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="require client certificates signed by this CA (mutual TLS)"
    )
    agent_token: str | None = Field(
        default_factory=lambda: os.environ.get("WATTOPS_AGENT_TOKEN") or None,
        description="bearer token sent to the agents (a viewer's is enough: needed when their "
        "reads = viewer); default: $WATTOPS_AGENT_TOKEN",
    )  # fmt: skip
    reads: Literal["open", "viewer"] = Field(
        "open", description="open: /v1/router and /metrics need no token; viewer: they need "
        "one of any role",
    )  # fmt: skip
    inventory: Path | None = Field(None, description="fleet.toml listing the agents")
    models_dir: Path | None = Field(
        None, description="where the agents' model files are found by name (same machine or a "
        "shared mount), to read their `wattops quality` tables; unset: quality comes only "
        "from the routes' declared figures",
    )  # fmt: skip
    kubernetes: bool = Field(
        False, description="follow the agent pods the Kubernetes API lists (in a pod: its "
        "service account; elsewhere: the kubeconfig), listed again every discovery_interval_s",
    )  # fmt: skip
    connect_timeout_s: float = Field(
        2.0, gt=0, description="a candidate that does not accept the connection in this time "
        "is skipped for the next one",
    )  # fmt: skip
    request_timeout_s: float = Field(
        600.0, gt=0, description="upper bound on one answer, streaming included"
    )
    breaker_failures: int = Field(
        3, ge=1, description="consecutive failures that open a candidate's circuit breaker"
    )
    breaker_open_s: float = Field(
        10.0, gt=0, description="how long an open breaker skips its candidate before one probe"
    )
    discovery_interval_s: float = Field(
        30.0, gt=0, description="with kubernetes = true: how often agent pods are listed again"
    )
    decisions_kept: int = Field(
        50, ge=0, description="last decisions kept per route for /v1/router"
    )
    require_keys: bool | None = Field(
        None, description="inference needs an API key (Authorization: Bearer wok_...); unset: "
        "required as soon as one key has been created (POST /v1/keys, `wattops keys create`)",
    )  # fmt: skip
    default_max_tokens: int = Field(
        256, ge=1, description="the completion tokens a request without max_tokens is reserved "
        "for against its budgets (the llama.cpp engines' default answer length)",
    )  # fmt: skip
    budget_webhooks: list[str] = Field(
        default_factory=list, description="URLs each budget warning is POSTed to as JSON "
        "(Slack incoming webhooks and generic receivers); retried with backoff",
    )  # fmt: skip
    fleet_sample_s: float = Field(
        60.0, gt=0, description="how often the fleet's attributed totals are kept in the ledger "
        "(the other side of `wattops report`'s unattributed line)",
    )  # fmt: skip
    prior_tokens_per_s: float = Field(
        10.0, gt=0, description="the throughput a deployment that has not served yet is assumed "
        "to have at the least: its tokens are reserved and charged at its held $/h, its node's "
        "watts and grid intensity over this many tokens a second (an upper bound for any "
        "deployment faster than this), until its agent publishes measured rates",
    )  # fmt: skip
    on_store_error: Literal["refuse", "allow"] = Field(
        "refuse", description="when the keys-and-budgets store cannot be reached: refuse "
        "(503 store_unavailable, fail closed) or allow (serve the request unmetered: its key is "
        "not checked, no budget counts it, an alert and an audit line say so)",
    )  # fmt: skip
    ledger_sync: Literal["normal", "full"] = Field(
        "normal", description="ledger.sqlite durability: normal survives a crash of the router "
        "(kill -9); full also a power cut, with an fsync per request",
    )  # fmt: skip
    store: str = Field(
        "sqlite", description="where keys, budgets and the ledger are kept: `sqlite` (one "
        "router: ledger.sqlite in state_dir) or a Redis URL (redis://, rediss://, unix://) "
        "shared by several routers behind a load balancer",
    )  # fmt: skip
    store_prefix: str = Field(
        "wattops:", min_length=1, description="the prefix of every Redis key (several fleets "
        "in one Redis database each need their own)",
    )  # fmt: skip
    router_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="this router's name among those "
        "sharing a Redis store (its reservations are kept under it); unset: one made on the "
        "first start and kept in state_dir",
    )  # fmt: skip

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> RouterSection:
        problem = tls_pair_problem(self.tls_cert, self.tls_key, self.tls_client_ca)
        if problem is not None:
            raise ValueError(problem)
        return self

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"{value!r} is not a store: give `sqlite` or a Redis URL (redis://host:6379/0, "
                "rediss://... for TLS, unix:///path/redis.sock)"
            )
        return value


class AgentEntry(_Section):
    """`[[agents]]`: one agent the router follows."""

    url: str

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        return agent_url(value)


class RouteConfig(_Section):
    """`[[routes]]`: one name clients ask for, and how its requests are placed."""

    name: str = Field(min_length=1, description="what clients put in `model`")
    candidates: list[str] = Field(
        min_length=1, description="deployments as node/deployment, globs allowed (`*/smollm2`)"
    )
    reference: str = Field(
        description="node/deployment whose quality is 1.0 and whose cost is the counterfactual"
    )
    policy: Policy = "cheapest"
    min_quality: float | None = Field(
        None, ge=0, le=1, description="least share of the reference's task accuracy kept "
        "(measured by `wattops quality`, or declared in `quality`)",
    )  # fmt: skip
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="most points of task accuracy lost against the "
        "reference on the labelled set (`wattops quality`)",
    )  # fmt: skip
    accuracy_verdict: Literal["point", "bound"] = Field(
        "bound", description="what max_accuracy_drop compares: the drop's 95% upper bound "
        "(shown within the bound, as `wattops quality`'s floor) or its point estimate",
    )  # fmt: skip
    max_p95_ms: float | None = Field(None, gt=0, description="latency bound of one answer")
    max_usd_per_1m_tokens: float | None = Field(None, gt=0, description="price bound")
    cascade_min_logprob: float = Field(
        -0.5, le=0, description="cascade: an answer whose mean token log-probability is below "
        "this goes to the next candidate",
    )  # fmt: skip
    affinity: bool = Field(
        True, description="requests sharing a conversation prefix go to the same deployment "
        "among equivalent ones while its load allows (prefix cache hits)",
    )  # fmt: skip
    equivalent_within: float = Field(
        0.2, ge=0, description="candidates within this share of the best figure are equivalent "
        "and share the traffic (by load, or by prefix affinity)",
    )  # fmt: skip
    affinity_load_factor: float = Field(
        1.25, gt=1, description="a prefix stays on its deployment while that one's requests in "
        "flight stay within this multiple of the mean",
    )  # fmt: skip
    quality: dict[str, float] = Field(
        default_factory=dict,
        description="declared quality of candidates (node/deployment = 0..1: the share of the "
        "reference's task accuracy kept), used when the router cannot read the quality table "
        "of a candidate's model",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_floor(cls, data: Any) -> Any:
        return refuse_replaced(data, {"max_chrf_drop": REPLACED_CHRF})

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value:
            raise ValueError(
                f"a route name cannot contain '/' ({value!r}): node/deployment names address "
                "one deployment directly"
            )
        return value

    @field_validator("candidates")
    @classmethod
    def _node_slash_deployment(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if pattern.count("/") != 1:
                raise ValueError(
                    f"{pattern!r} must be node/deployment (globs allowed, e.g. '*/smollm2')"
                )
        return value

    @field_validator("quality")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        for key, share in value.items():
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"{key}: quality must be a share between 0 and 1, not {share}")
        return value

    @model_validator(mode="after")
    def _reference_is_a_candidate(self) -> RouteConfig:
        if not self.matches(self.reference):
            raise ValueError(
                f"reference {self.reference!r} matches none of the candidates "
                f"({', '.join(self.candidates)})"
            )
        return self

    def matches(self, key: str) -> bool:
        """Whether the deployment `node/deployment` is a candidate of this route."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.candidates)


class RouterConfig(_Section):
    """The whole file."""

    router: RouterSection = RouterSection()
    agents: list[AgentEntry] = []
    routes: list[RouteConfig] = Field(min_length=1)
    budgets: list[Budget] = Field(
        default_factory=list, description="budgets made on the first start (then kept in the "
        "ledger and changed through /v1/budgets)",
    )  # fmt: skip
    tokens: list[TokenEntry] = Field(
        default_factory=list, description="[[tokens]]: bearer tokens by name with their role "
        "(viewer, operator, admin) and hash",
    )  # fmt: skip
    _source: str = "<config>"
    _inventory_urls: list[str] = []

    @model_validator(mode="after")
    def _unique_routes(self) -> RouterConfig:
        names = [r.name for r in self.routes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"route names must be unique; repeated: {', '.join(twice)}")
        budgets = [b.name for b in self.budgets]
        twice = sorted({n for n in budgets if budgets.count(n) > 1})
        if twice:
            raise ValueError(f"budget names must be unique; repeated: {', '.join(twice)}")
        unique_names(self.tokens)
        return self

    @property
    def source(self) -> str:
        return self._source

    def agent_urls(self) -> list[str]:
        """The agents to follow: the inventory file's, then the [[agents]] entries."""
        return list(dict.fromkeys([*self._inventory_urls, *(a.url for a in self.agents)]))

    def route(self, name: str) -> RouteConfig | None:
        return next((r for r in self.routes if r.name == name), None)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"  {loc}: {item['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_config(data: dict[str, object], source: str = "<config>") -> RouterConfig:
    """Validate an already-parsed mapping; relative paths stay as written."""
    try:
        config = RouterConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    config._source = source
    return config


def load_config(path: Path) -> RouterConfig:
    """Read and validate `path`; relative paths inside are resolved against its folder."""
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, str(path))
    base = path.parent.resolve()
    config.router.state_dir = (base / config.router.state_dir).resolve()
    if config.router.models_dir is not None:
        config.router.models_dir = (base / config.router.models_dir).resolve()
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        given = getattr(config.router, name)
        if given is not None:
            setattr(config.router, name, (base / given).resolve())
    if config.router.tokens_file is not None:
        config.router.tokens_file = (base / config.router.tokens_file).resolve()
        try:
            config.tokens = [*config.tokens, *load_tokens(config.router.tokens_file)]
            unique_names(config.tokens)
        except ValueError as exc:
            raise ConfigError(f"{path}: router.{exc}") from None
    if config.router.inventory is not None:
        config.router.inventory = (base / config.router.inventory).resolve()
        try:
            config._inventory_urls = load_inventory(config.router.inventory)
        except InventoryError as exc:
            raise ConfigError(f"{path}: router.inventory: {exc}") from None
    if not config.agent_urls() and not config.router.kubernetes:
        raise ConfigError(
            f"{path}: no agents to route to: give router.inventory, [[agents]] url = ..., or "
            "kubernetes = true"
        )
    return config
