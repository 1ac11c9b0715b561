"""The agent's TOML configuration, validated with pydantic.

A bad file stops the agent with a message naming the file, the field and what is allowed.
"""

from __future__ import annotations

import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from wattops.agents.sensors.registry import sensor_names
from wattops.engines.base import EngineSettings
from wattops.engines.registry import ENGINES, engine_type
from wattops.vocabulary import PRECISIONS
from wattops.vocabulary.access import TokenEntry, load_tokens, unique_names
from wattops.vocabulary.net import split_listen
from wattops.vocabulary.plugins import UnknownPlugin
from wattops.vocabulary.replaced import refuse_replaced
from wattops.vocabulary.tls import tls_pair_problem

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"


class ConfigError(Exception):
    """The agent configuration is invalid; the message names file, field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentSection(_Section):
    """`[agent]`: how the daemon itself runs."""

    node: str = Field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname(),
        description="node name shown to operators (and the node whose pods cluster mode "
        "watches); default: $NODE_NAME (Kubernetes' downward API), else the host name",
    )
    listen: str = Field("127.0.0.1:8080", description="host:port the HTTP API binds to")
    state_dir: Path = Field(Path("state"), description="desired state, counters, model variants")
    prometheus_url: str | None = Field(
        None, pattern=r"^https?://", description="a Prometheus that scrapes this agent: "
        "predictive scaling reads a season of request history from it at start when it has "
        "none of its own (a new agent, a lost state folder)",
    )  # fmt: skip
    token: str | None = Field(
        default_factory=lambda: os.environ.get("WATTOPS_TOKEN") or None,
        description="an admin bearer token (named `token`), beside the [[tokens]]; default: "
        "$WATTOPS_TOKEN (a Kubernetes Secret), else none",
    )
    tokens_file: Path | None = Field(
        None, description="a TOML file of [[tokens]] (name, role, hash), read at start"
    )
    reads: Literal["open", "viewer"] = Field(
        "open", description="open: snapshots, events, history and metrics need no token; "
        "viewer: they need one of any role (then give Prometheus and the router one)",
    )  # fmt: skip
    tls_cert: Path | None = Field(
        None, description="serve HTTPS with this certificate (PEM; reloaded on SIGHUP)"
    )
    tls_key: Path | None = Field(None, description="its private key (PEM)")
    tls_client_ca: Path | None = Field(
        None, description="require client certificates signed by this CA (mutual TLS)"
    )
    wake_timeout_s: float = Field(
        120.0, gt=0, description="how long a request waits for a parked deployment to wake"
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="upper bound on one upstream answer, streaming included"
    )
    drain_timeout_s: float = Field(
        120.0, ge=0, description="how long a retired replica may finish in-flight requests"
    )
    health_interval_s: float = Field(1.0, gt=0, description="seconds between replica health checks")
    sensor: str = Field(
        "auto",
        description="power sensor by name (nvml, jetson, rapl, estimate, or an installed one); "
        "auto tries the measured sensors (nvml, jetson, rapl), then the estimate",
    )
    estimate_basis: Literal["host", "agent"] = Field(
        "host",
        description="what the estimate scales with on a CPU node with no power sensor: host: "
        "all the host's CPU time (/proc/stat; a node that serves and does nothing else); "
        "agent: the CPU time of the agent and the replicas it starts (/proc/PID/stat; a "
        "shared host, whose other work would otherwise be charged to the deployments; an "
        "attached server's processes are not its own and are left out too)",
    )
    profile: str = Field("cpu-generic", description="hardware profile name (profiles/hardware)")
    sysfs_root: Path = Field(
        Path("/"),
        description="the folder that holds the host's sys/ (sensors read "
        '<sysfs_root>/sys/...; "/host" in a container that mounts /sys at /host/sys)',
    )
    sample_hz: float = Field(10.0, gt=0, le=100, description="power samples per second")
    budget_usd_per_hour: float | None = Field(None, gt=0, description="alert above this burn")
    budget_usd_per_day: float | None = Field(
        None, gt=0, description="alert when the burn rate projects above this per day"
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        split_listen(value)
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> AgentSection:
        problem = tls_pair_problem(self.tls_cert, self.tls_key, self.tls_client_ca)
        if problem is not None:
            raise ValueError(problem)
        return self

    @field_validator("sensor")
    @classmethod
    def _known_sensor(cls, value: str) -> str:
        if value not in sensor_names():
            raise ValueError(f"unknown sensor {value!r}; allowed: {', '.join(sensor_names())}")
        return value

    @property
    def host(self) -> str:
        """The host part of `listen`, without IPv6 brackets."""
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of `listen`."""
        return split_listen(self.listen)[1]


class SiteSection(BaseModel):
    """`[site]`: electricity price, PUE and grid carbon; a site profile plus overrides."""

    model_config = ConfigDict(extra="allow")

    name: str = Field("default", description="site profile name (profiles/site)")

    def overrides(self) -> dict[str, object]:
        """The fields given besides `name`."""
        return dict(self.model_extra or {})


class PolicySection(_Section):
    """`[policy]`: limits the node keeps to, and whether it only says how (agents/policy.py)."""

    mode: Literal["off", "advise", "act"] = Field(
        "off", description="advise: plan and say, change nothing; act: carry the plan out"
    )
    max_usd_per_hour: float | None = Field(
        None, gt=0, description="the node's burn (full price + electricity) to stay under"
    )
    max_watts: float | None = Field(None, gt=0, description="the node's power to stay under")
    hysteresis: float = Field(
        0.05, ge=0, le=1, description="act only past a limit by more than this fraction"
    )
    park_idle_s: float = Field(600.0, gt=0, description="idle this long: may be parked")
    dwell_s: float = Field(
        300.0, ge=0, description="seconds a deployment is left alone after the policy acted on it"
    )
    switch_precision: bool = Field(
        True, description="may try a smaller precision (as a canary) when parking and scaling "
        "do not cover the excess",
    )  # fmt: skip
    max_accuracy_drop: float = Field(
        1.5, ge=0, le=100, description="the canary's accuracy guard for those switches: points "
        "of task accuracy the smaller precision may lose on the labelled probes",
    )  # fmt: skip

    @model_validator(mode="before")
    @classmethod
    def _old_floor(cls, data: Any) -> Any:
        return refuse_replaced(data, {"quality_floor": (
            "quality_floor (agreement with the serving precision's wording) is gone: use "
            "max_accuracy_drop, the points of task accuracy a smaller precision may lose on "
            "the canary's labelled probes (default 1.5)"
        )})  # fmt: skip

    power_limit: bool = Field(
        True, description="may lower GPU power limits (NVML nodes, within each card's bounds; "
        "restored after) to meet max_watts; needs root or CAP_SYS_ADMIN",
    )  # fmt: skip
    interval_s: float = Field(10.0, gt=0, description="seconds between two looks")


class AccountingSection(_Section):
    """`[accounting]`: how cost and energy are turned into per-token figures and advice."""

    input_token_weight: float = Field(
        1.0, ge=0, description="relative cost of one prompt token in the input/output split"
    )
    output_token_weight: float = Field(
        3.0, ge=0, description="relative cost of one generated token (decode is dearer)"
    )
    window_s: float = Field(300.0, gt=0, le=3600, description="window of the recent figures")
    park_advice_after_s: float = Field(
        600.0, gt=0, description="idle this long with replicas running: advise parking"
    )

    @model_validator(mode="after")
    def _some_weight(self) -> AccountingSection:
        if self.input_token_weight + self.output_token_weight <= 0:
            raise ValueError("input_token_weight and output_token_weight cannot both be 0")
        return self


class CacheSection(_Section):
    """`[cache]`: the gateway's response cache for deterministic (temperature 0) requests."""

    enabled: bool = Field(True, description="answer repeated temperature-0 requests from the cache")
    memory_bytes: int = Field(64 * 2**20, ge=0, description="byte cap of the in-memory LRU tier")
    disk_bytes: int = Field(
        1 * 2**30, ge=0, description="byte cap of the on-disk SQLite tier (its write-ahead log "
        "adds at most an eighth, 64 KiB at least); 0 disables it",
    )  # fmt: skip


class KubernetesSection(_Section):
    """`[kubernetes]`: cluster mode. Engines are pods of Kubernetes Deployments that the agent
    finds on its own node, scrapes and accounts for; it never starts, scales or stops them."""

    enabled: bool = Field(
        False, description="cluster mode: account for the engine pods on this node"
    )
    namespace: str = Field("", description='namespace to watch; "" = all namespaces')
    selector: str = Field(
        "app.kubernetes.io/part-of=wattops",
        min_length=1,
        description="label selector that makes a pod an engine",
    )
    port_name: str = Field(
        "http", min_length=1, description="container port serving the OpenAI API and /metrics"
    )
    poll_s: float = Field(5.0, gt=0, le=300, description="seconds between pod lists")
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig file to reach the API server with; default: the pod's "
        "service account in a cluster, else $KUBECONFIG or ~/.kube/config",
    )
    context: str | None = Field(None, description="kubeconfig context; default: its current one")


class EngineSettingsError(ValueError):
    """An engine's own keys did not validate: each problem as (field, message)."""

    def __init__(self, engine: str, problems: list[tuple[str, str]]) -> None:
        super().__init__(
            "; ".join(f"{field}: {msg}" if field else msg for field, msg in problems)
            + f" (keys of engine {engine!r})"
        )
        self.problems = problems


class DeploymentConfig(BaseModel):
    """`[[deployments]]`: one model served under one name.

    The keys below are common to every engine; the rest of the table are the engine's own
    (its `Settings` model, e.g. `model`, `threads` and `context` for llamacpp), validated by
    that model and kept in `settings`.
    """

    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=NAME_PATTERN, description="what clients put in `model`")
    engine: str = Field(
        description="engine adapter, by its registered name (llamacpp, openai, or an "
        "installed one from the wattops.engines entry-point group)"
    )
    precision: str | None = Field(None, description="precision to serve; default: the base's")
    replicas: int = Field(1, ge=0, description="replicas to run; 0 parks the deployment")
    max_replicas: int = Field(
        4, ge=0, description="the most replicas scaling (by hand or autoscaling) may ask for"
    )
    idle_scale_to_zero_s: float | None = Field(
        None, gt=0, description="park after this long without a request; unset: never"
    )
    autoscale_target_in_flight: float | None = Field(
        None,
        gt=0,
        description="scale replicas between autoscale_min_replicas and max_replicas to keep "
        "this many requests in flight per replica (HPA's rule); unset: replicas are fixed",
    )
    autoscale_min_replicas: int = Field(
        1, ge=1, description="the fewest replicas autoscaling keeps while not parked"
    )
    autoscale_stabilization_s: float = Field(
        30.0, ge=0, description="scale down to the highest recommendation of this window"
    )
    autoscale_predictive: bool = Field(
        False, description="also start replicas ahead of the rises a seasonal forecast of the "
        "request rate predicts (agents/forecast.py), by the measured cold-start time",
    )  # fmt: skip
    autoscale_season_s: float = Field(
        86400.0, gt=0, description="the forecast's season: the traffic's shape repeats this often"
    )
    autoscale_season_bucket_s: float = Field(
        300.0, gt=0, description="the forecast's resolution: arrivals are counted per bucket"
    )
    policy: bool = Field(
        True, description="the node's [policy] may act on this deployment (park, scale, "
        "canary); false: it is left alone, its cost still counts in the node's burn",
    )  # fmt: skip
    latency_slo_p95_ms: float | None = Field(
        None,
        gt=0,
        description="the p95 latency (ms) answers should stay inside; adaptive batching "
        "(llamacpp-server's adaptive_parallel) uses fewer slots when it is passed",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="how long one replica may take to load and answer its health path"
    )
    no_progress_timeout_s: float = Field(
        120.0,
        gt=0,
        description="a replica with requests in flight whose engine counts no token (prompt or "
        "generated) for this long is hung: it is killed and replaced, although its health "
        "path may still answer; keep it above your longest prompt's evaluation time",
    )
    memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory one replica holds; default: its model file (llamacpp) "
        "or one whole accelerator (openai)",
    )
    budget_usd_per_hour: float | None = Field(
        None, gt=0, description="alert when the deployment's cost rate is above this"
    )
    budget_usd_per_day: float | None = Field(
        None, gt=0, description="alert when its cost rate projects above this per day"
    )
    _settings: EngineSettings = PrivateAttr()

    @property
    def settings(self) -> EngineSettings:
        """The engine's own keys, validated by its `Settings` model."""
        return self._settings

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        try:
            engine_type(value)
        except UnknownPlugin:
            known = ", ".join(repr(n) for n in ENGINES.names())
            raise ValueError(f"unknown engine {value!r}; allowed: {known}") from None
        return value

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str | None) -> str | None:
        if value is not None and value not in PRECISIONS:
            raise ValueError(f"unknown precision {value!r}; allowed: {', '.join(PRECISIONS)}")
        return value

    @model_validator(mode="after")
    def _engine_settings(self) -> DeploymentConfig:
        if self.replicas > self.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        if (
            self.autoscale_target_in_flight is not None
            and self.autoscale_min_replicas > self.max_replicas
        ):
            raise ValueError(
                f"autoscale_min_replicas ({self.autoscale_min_replicas}) exceeds max_replicas "
                f"({self.max_replicas})"
            )
        if self.autoscale_predictive and self.autoscale_target_in_flight is None:
            raise ValueError("autoscale_predictive needs autoscale_target_in_flight (the load "
                             "each replica is meant to carry)")  # fmt: skip
        if self.autoscale_predictive and (
            self.autoscale_season_s < 2 * self.autoscale_season_bucket_s
        ):
            raise ValueError(
                f"autoscale_season_s ({self.autoscale_season_s:g}) must be at least two "
                f"autoscale_season_bucket_s ({self.autoscale_season_bucket_s:g})"
            )
        adapter = engine_type(self.engine)
        try:
            self._settings = adapter.Settings.model_validate(self.model_extra or {})
        except ValidationError as exc:
            raise EngineSettingsError(
                self.engine,
                [
                    (".".join(str(p) for p in e["loc"]), e["msg"].removeprefix("Value error, "))
                    for e in exc.errors()
                ],
            ) from None
        return self


class AgentConfig(_Section):
    """The whole agent configuration file."""

    agent: AgentSection = Field(default_factory=AgentSection)
    cache: CacheSection = Field(default_factory=CacheSection)
    hardware: dict[str, object] = Field(
        default_factory=dict, description="overrides of the hardware profile's fields"
    )
    site: SiteSection = Field(default_factory=SiteSection)
    accounting: AccountingSection = Field(default_factory=AccountingSection)
    policy: PolicySection = Field(default_factory=PolicySection)
    kubernetes: KubernetesSection = Field(default_factory=KubernetesSection)
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    tokens: list[TokenEntry] = Field(
        default_factory=list, description="[[tokens]]: bearer tokens by name with their role "
        "(viewer, operator, admin) and hash; no token at all: control is open",
    )  # fmt: skip
    _source: str = PrivateAttr("<config>")

    @property
    def source(self) -> str:
        """The file this configuration was read from (for messages)."""
        return self._source

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        unique_names(self.tokens)
        seen: set[str] = set()
        for dep in self.deployments:
            if dep.name in seen:
                raise ValueError(f"deployment name {dep.name!r} appears twice")
            seen.add(dep.name)
        return self

    def deployment(self, name: str) -> DeploymentConfig:
        """The deployment called `name`; KeyError if there is none."""
        for dep in self.deployments:
            if dep.name == name:
                return dep
        raise KeyError(name)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(top level)"
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, EngineSettingsError):
            # An engine's own keys: point at each key, as for the common ones.
            engine = f" (engine {item['input'].get('engine')!r})"
            lines += [f"  {loc}.{field}: {msg}{engine}" if field else f"  {loc}: {msg}{engine}"
                      for field, msg in cause.problems]  # fmt: skip
            continue
        msg = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: dict[str, object], source: str = "<config>") -> AgentConfig:
    """Validate an already-parsed config mapping; relative paths stay as written."""
    try:
        config = AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    config._source = source
    return config


def load_config(path: Path) -> AgentConfig:
    """Read and validate `path`. Relative paths inside are resolved against its folder."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    config = parse_config(data, str(path))
    base = path.parent.resolve()
    config.agent.state_dir = (base / config.agent.state_dir).resolve()
    config.agent.sysfs_root = (base / config.agent.sysfs_root).resolve()
    if config.kubernetes.kubeconfig is not None:
        config.kubernetes.kubeconfig = (base / config.kubernetes.kubeconfig).resolve()
    for dep in config.deployments:
        dep.settings.resolve_paths(base)
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        given = getattr(config.agent, name)
        if given is not None:
            setattr(config.agent, name, (base / given).resolve())
    if config.agent.tokens_file is not None:
        config.agent.tokens_file = (base / config.agent.tokens_file).resolve()
        try:
            config.tokens = [*config.tokens, *load_tokens(config.agent.tokens_file)]
            unique_names(config.tokens)
        except ValueError as exc:
            raise ConfigError(f"{path}: agent.{exc}") from None
    return config
