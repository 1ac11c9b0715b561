"""The Kubernetes manifests in deploy/kubernetes build with kustomize, every object parses as the
Kubernetes API type of its kind, and together they keep the contract the agent's Kubernetes mode
relies on: the agent's mounts, probes, RBAC and config, and the shape of an engine Deployment.

No API server runs here, so the checks are `kubectl kustomize` (the same build `kubectl apply -k`
does) and the official Python client's models, which carry the API's field names and types.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from wattops.agents.config import parse_config
from wattops.profiles import hardware_profile
from wattops.router.config import parse_config as parse_router_config
from wattops.vocabulary import PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
#: What `kubectl apply -k` is pointed at: the default (NVIDIA GPU nodes) and the overlays.
VARIANTS = {
    "nvidia": KUBE,
    "cpu": KUBE / "overlays" / "cpu",
    "jetson": KUBE / "overlays" / "jetson",
}
NAMESPACE = "wattops"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
EXPECTED_KINDS = {
    "Namespace",
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "ConfigMap",
    "DaemonSet",
    "PersistentVolumeClaim",
    "Deployment",
    "Service",
    "Role",
    "RoleBinding",
    "HorizontalPodAutoscaler",
}
AGENT = "wattops-agent"
ENGINE = "tiny-chat"
ENGINE_LABEL = ("app.kubernetes.io/part-of", "wattops")
CONFIG_PATH = "/etc/wattops/agent.toml"
READ_VERBS = {"get", "list", "watch"}
API = client.ApiClient()


class ManifestError(AssertionError):
    """A built manifest is not an object the Kubernetes API would accept as written."""


def model_class_name(doc: dict[str, Any]) -> str:
    """The client's model class for a document: apps/v1 DaemonSet -> V1DaemonSet."""
    version = str(doc.get("apiVersion", "")).rpartition("/")[2]
    name = f"{version.capitalize()}{doc.get('kind', '')}"
    if not version or not hasattr(client, name):
        raise ManifestError(
            f"{doc.get('kind')!r} ({doc.get('apiVersion')!r}) is not a kind the kubernetes "
            f"client knows (no kubernetes.client.{name})"
        )
    return name


def to_model(doc: dict[str, Any]) -> Any:
    """Parse `doc` into its client model and fail if any field of it was not understood."""
    name = model_class_name(doc)
    # The public ApiClient.deserialize takes a REST response, and its signature changed when
    # the client's generator did (v37: response text plus content type); the private method
    # it delegates to has kept (data, class name) across versions.
    try:
        model = API._ApiClient__deserialize(doc, name)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise ManifestError(f"{describe(doc)} does not parse as {name}: {err}") from None
    # Unknown keys (a misspelt field, a field of another API version) are dropped silently by
    # deserialisation; serialising back and comparing finds them.
    back = API.sanitize_for_serialization(model)
    if back != doc:
        raise ManifestError(
            f"{describe(doc)}: fields lost or changed when parsed as {name} "
            f"(misspelt or unknown):\n{first_difference(doc, back)}"
        )
    return model


def first_difference(want: Any, got: Any, path: str = "") -> str:
    """Where two JSON-like values first differ, as a path and both values."""
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                return first_difference(want.get(key), got.get(key), f"{path}.{key}")
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        for index, (a, b) in enumerate(zip(want, got, strict=True)):
            if a != b:
                return first_difference(a, b, f"{path}[{index}]")
    return f"  {path or '.'}: manifest {json.dumps(want)} -> model {json.dumps(got)}"


def describe(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def kustomize(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize path`, parsed: the objects `kubectl apply -k path` would send."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is not on PATH; this test builds the manifests with `kubectl kustomize`. "
            "`make test` installs it; by hand, see https://kubernetes.io/docs/tasks/tools/ "
            "(kubectl 1.21+)."
        )
    done = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        pytest.fail(
            f"kubectl kustomize {path.relative_to(ROOT)} failed (the manifests need kubectl "
            f"1.21+, which embeds kustomize v4+):\n{done.stderr}"
        )
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@dataclass(frozen=True)
class Build:
    """One variant's objects, as parsed documents and as client models, in the same order."""

    docs: list[dict[str, Any]]
    models: list[Any]

    def all(self, kind: str) -> list[Any]:
        return [m for d, m in zip(self.docs, self.models, strict=True) if d["kind"] == kind]

    def one(self, kind: str, name: str) -> Any:
        found = [m for m in self.all(kind) if m.metadata.name == name]
        assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
        return found[0]

    def agent_config_map(self) -> Any:
        """The ConfigMap the agent DaemonSet mounts (its name carries kustomize's hash)."""
        volume = volume_named(self.one("DaemonSet", AGENT), "config")
        assert volume.config_map is not None, "the agent's config volume is not a ConfigMap"
        return self.one("ConfigMap", volume.config_map.name)

    def agent_toml(self) -> dict[str, Any]:
        data = self.agent_config_map().data or {}
        assert "agent.toml" in data, "the agent's ConfigMap has no agent.toml key"
        return tomllib.loads(data["agent.toml"])


@functools.cache
def build(variant: str) -> Build:
    """Build and parse a variant, once per test session."""
    docs = kustomize(VARIANTS[variant])
    return Build(docs, [to_model(doc) for doc in docs])


@pytest.fixture
def base() -> Build:
    return build("nvidia")


def pod_spec(workload: Any) -> Any:
    return workload.spec.template.spec


def first_container(workload: Any) -> Any:
    return pod_spec(workload).containers[0]


def volume_named(workload: Any, name: str) -> Any:
    found = [v for v in pod_spec(workload).volumes or [] if v.name == name]
    assert found, f"{workload.metadata.name} has no volume {name!r}"
    return found[0]


def mount_of(container: Any, volume: str) -> Any:
    found = [m for m in container.volume_mounts or [] if m.name == volume]
    assert found, f"container {container.name} does not mount volume {volume!r}"
    return found[0]


def env_of(container: Any) -> dict[str, Any]:
    return {var.name: var for var in container.env or []}


def http_port(container: Any) -> int:
    """The container port named "http" (the agent's [kubernetes].port_name for engines)."""
    ports = [p.container_port for p in container.ports or [] if p.name == "http"]
    assert ports, f"container {container.name} has no port named 'http'"
    return int(ports[0])


def probe_port(container: Any, probe: Any) -> int:
    """The container port an HTTP probe hits, resolving a port name."""
    assert probe is not None and probe.http_get is not None, "not an HTTP probe"
    port = probe.http_get.port
    if isinstance(port, str) and not port.isdigit():
        named = [p.container_port for p in container.ports or [] if p.name == port]
        assert named, f"probe names port {port!r}, which {container.name} does not have"
        return int(named[0])
    return int(port)


def selects(selector: str, labels: dict[str, str] | None) -> bool:
    """Whether an equality-based label selector ("a=b,c!=d") matches `labels`."""
    labels = labels or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = (s.strip() for s in term.replace("==", "=").split("=", 1))
            if labels.get(key) != value:
                return False
        else:
            pytest.fail(f"selector term {term!r}: this test handles only k=v and k!=v")
    return True


def allows(rules: Iterable[Any], group: str, resource: str, verb: str) -> bool:
    """Whether RBAC policy rules grant `verb` on `resource` in API `group`."""
    return any(
        (group in rule.api_groups or "*" in rule.api_groups)
        and (resource in (rule.resources or []) or "*" in (rule.resources or []))
        and (verb in rule.verbs or "*" in rule.verbs)
        for rule in rules
    )


def granted_verbs(rules: Iterable[Any]) -> set[str]:
    return {verb for rule in rules for verb in rule.verbs}


# --- every object -----------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_object_parses_as_the_api_type_of_its_kind(variant: str) -> None:
    result = build(variant)
    kinds = {doc["kind"] for doc in result.docs}
    assert kinds == EXPECTED_KINDS, f"unexpected kinds {kinds ^ EXPECTED_KINDS}"
    for doc, model in zip(result.docs, result.models, strict=True):
        assert type(model).__name__ == model_class_name(doc)


def test_a_misspelt_field_is_reported_not_dropped() -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "x"},
        "automountServiceAcountToken": False,
    }
    with pytest.raises(ManifestError, match="automountServiceAcountToken"):
        to_model(doc)
    with pytest.raises(ManifestError, match="not a kind the kubernetes client knows"):
        to_model({"apiVersion": "apps/v1", "kind": "Deploymnet", "metadata": {"name": "x"}})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_namespaced_object_lands_in_the_wattops_namespace(variant: str) -> None:
    result = build(variant)
    for doc, model in zip(result.docs, result.models, strict=True):
        if doc["kind"] in CLUSTER_SCOPED:
            assert model.metadata.namespace is None, f"{describe(doc)} is cluster-scoped"
        else:
            assert model.metadata.namespace == NAMESPACE, describe(doc)
    assert result.one("Namespace", NAMESPACE)
    for binding in result.all("ClusterRoleBinding"):
        for subject in binding.subjects:
            if subject.kind == "ServiceAccount":
                assert subject.namespace == NAMESPACE, f"{binding.metadata.name}: {subject.name}"


def test_namespace_admits_the_agents_host_path_volumes(base: Build) -> None:
    # Pod Security's baseline and restricted levels reject any hostPath volume.
    labels = base.one("Namespace", NAMESPACE).metadata.labels
    assert labels.get("pod-security.kubernetes.io/enforce") == "privileged"


# --- the agent --------------------------------------------------------------------------------


def test_agent_runs_with_the_config_map_it_mounts(base: Build) -> None:
    daemonset = base.one("DaemonSet", AGENT)
    agent = first_container(daemonset)
    assert agent.command == ["wattops-agent", "--config", CONFIG_PATH]
    mount = mount_of(agent, "config")
    assert mount.read_only
    assert f"{mount.mount_path.rstrip('/')}/agent.toml" == CONFIG_PATH
    assert base.agent_config_map().metadata.name.startswith("wattops-agent-config")
    assert daemonset.spec.selector.match_labels == {"app.kubernetes.io/name": AGENT}
    labels = daemonset.spec.template.metadata.labels
    assert labels["app.kubernetes.io/component"] == "agent"


def test_agent_mounts_the_hosts_sys_read_only_where_its_config_looks(base: Build) -> None:
    config = base.agent_toml()["agent"]
    assert config["sysfs_root"] == "/host"
    daemonset = base.one("DaemonSet", AGENT)
    volume = volume_named(daemonset, "host-sys")
    assert volume.host_path is not None and volume.host_path.path == "/sys"
    mount = mount_of(first_container(daemonset), "host-sys")
    assert mount.read_only is True
    # A plain read-only bind leaves /sys's submounts (cgroup, bpf) writable.
    assert mount.recursive_read_only == "IfPossible"
    assert mount.mount_path == f"{config['sysfs_root']}/sys"


def test_agent_keeps_its_state_on_the_node(base: Build) -> None:
    daemonset = base.one("DaemonSet", AGENT)
    volume = volume_named(daemonset, "state")
    assert volume.host_path is not None
    assert (volume.host_path.path, volume.host_path.type) == (
        "/var/lib/wattops",
        "DirectoryOrCreate",
    )
    mount = mount_of(first_container(daemonset), "state")
    assert not mount.read_only
    assert mount.mount_path == base.agent_toml()["agent"]["state_dir"]


def test_agent_probes_hit_healthz_on_its_http_port(base: Build) -> None:
    agent = first_container(base.one("DaemonSet", AGENT))
    port = http_port(agent)
    assert port == 8080
    assert base.agent_toml()["agent"]["listen"] == f"0.0.0.0:{port}"
    for probe in (agent.liveness_probe, agent.readiness_probe):
        assert probe is not None and probe.http_get is not None
        assert probe.http_get.path == "/healthz"
        assert probe_port(agent, probe) == port


def test_agent_pods_invite_prometheus_to_scrape_metrics(base: Build) -> None:
    daemonset = base.one("DaemonSet", AGENT)
    annotations = daemonset.spec.template.metadata.annotations or {}
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    assert annotations.get("prometheus.io/port") == str(http_port(first_container(daemonset)))


def test_agent_reads_its_node_namespace_and_token_from_the_environment(base: Build) -> None:
    env = env_of(first_container(base.one("DaemonSet", AGENT)))
    assert env["NODE_NAME"].value_from.field_ref.field_path == "spec.nodeName"
    assert env["POD_NAMESPACE"].value_from.field_ref.field_path == "metadata.namespace"
    token = env["WATTOPS_TOKEN"].value_from.secret_key_ref
    assert (token.name, token.key, token.optional) == ("wattops-agent-token", "token", True)
    assert "token" not in base.agent_toml()["agent"], "a token in a ConfigMap is readable to all"
    assert not base.all("Secret"), "no Secret with a real token belongs in the repository"


def test_agent_reaches_nvml_through_the_nvidia_runtime_without_taking_a_gpu(base: Build) -> None:
    daemonset = base.one("DaemonSet", AGENT)
    spec = pod_spec(daemonset)
    agent = first_container(daemonset)
    assert spec.runtime_class_name == "nvidia"
    env = env_of(agent)
    assert env["NVIDIA_VISIBLE_DEVICES"].value == "all"
    assert env["NVIDIA_DRIVER_CAPABILITIES"].value == "utility"
    resources = {**(agent.resources.requests or {}), **(agent.resources.limits or {})}
    assert "nvidia.com/gpu" not in resources
    assert spec.node_selector is None
    assert any(
        t.key == "nvidia.com/gpu" and t.effect == "NoSchedule" and t.operator == "Exists"
        for t in spec.tolerations or []
    )


def test_agent_is_small_and_unprivileged(base: Build) -> None:
    agent = first_container(base.one("DaemonSet", AGENT))
    assert agent.resources.requests == {"cpu": "100m", "memory": "128Mi"}
    assert agent.resources.limits and "memory" in agent.resources.limits
    security = agent.security_context
    assert security.allow_privilege_escalation is False
    assert security.privileged in (None, False)
    assert security.read_only_root_filesystem is True
    assert security.capabilities.drop == ["ALL"]
    assert not security.capabilities.add


def test_agent_service_account_may_watch_pods_and_read_nodes_only(base: Build) -> None:
    account = pod_spec(base.one("DaemonSet", AGENT)).service_account_name
    assert account == AGENT
    assert base.one("ServiceAccount", account)
    rules = [
        rule
        for binding in base.all("ClusterRoleBinding")
        if any(
            s.kind == "ServiceAccount" and s.name == account and s.namespace == NAMESPACE
            for s in binding.subjects
        )
        for rule in base.one(binding.role_ref.kind, binding.role_ref.name).rules
    ]
    for verb in READ_VERBS:
        assert allows(rules, "", "pods", verb), f"the agent cannot {verb} pods"
    assert allows(rules, "", "nodes", "get")
    assert granted_verbs(rules) <= READ_VERBS, "the agent only ever reads"


def test_agent_config_enables_kubernetes_and_selects_engines_not_itself(base: Build) -> None:
    kube = base.agent_toml()["kubernetes"]
    assert kube["enabled"] is True
    assert kube["namespace"] == ""
    assert kube["selector"] == "=".join(ENGINE_LABEL)
    agent_pods = base.one("DaemonSet", AGENT).spec.template.metadata.labels
    assert not selects(kube["selector"], agent_pods), "the agent would watch itself as an engine"
    engine = base.one("Deployment", ENGINE)
    assert selects(kube["selector"], engine.spec.template.metadata.labels)
    assert kube["port_name"] in {p.name for p in first_container(engine).ports}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_agent_config_is_accepted_by_the_agent(variant: str) -> None:
    data = build(variant).agent_toml()
    config = parse_config(data, f"{variant}: agent.toml")
    assert hardware_profile(config.agent.profile).name == config.agent.profile
    assert config.kubernetes.enabled  # cluster mode: the engines are the cluster's pods


# --- the overlays -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "profile", "sensor"),
    [("cpu", "cpu-generic", "auto"), ("jetson", "jetson-agx-orin-64gb", "jetson")],
)
def test_overlays_drop_the_nvidia_runtime_and_change_only_the_agent(
    base: Build, variant: str, profile: str, sensor: str
) -> None:
    overlay = build(variant)
    daemonset = overlay.one("DaemonSet", AGENT)
    assert pod_spec(daemonset).runtime_class_name is None
    assert not {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"} & set(
        env_of(first_container(daemonset))
    )
    config = overlay.agent_toml()
    assert (config["agent"]["profile"], config["agent"]["sensor"]) == (profile, sensor)
    assert config["kubernetes"] == base.agent_toml()["kubernetes"]
    assert {k: v for k, v in config["agent"].items() if k not in {"profile", "sensor"}} == {
        k: v for k, v in base.agent_toml()["agent"].items() if k not in {"profile", "sensor"}
    }

    def rest(result: Build) -> list[dict[str, Any]]:
        return [d for d in result.docs if d["kind"] not in {"DaemonSet", "ConfigMap"}]

    assert rest(overlay) == rest(base)


# --- the people's roles -----------------------------------------------------------------------


def test_viewer_role_reads_what_the_console_shows_and_writes_nothing(base: Build) -> None:
    rules = base.one("ClusterRole", "wattops-viewer").rules
    assert granted_verbs(rules) <= READ_VERBS
    for group, resource in [
        ("", "pods"),
        ("", "nodes"),
        ("", "events"),
        ("apps", "deployments"),
        ("apps", "deployments/scale"),
        ("apps", "replicasets"),
        ("apps", "daemonsets"),
    ]:
        for verb in READ_VERBS:
            assert allows(rules, group, resource, verb), f"viewer cannot {verb} {resource}"


def test_operator_role_can_scale_and_switch_precision_but_not_create_or_delete(
    base: Build,
) -> None:
    rules = base.one("ClusterRole", "wattops-operator").rules
    for resource in ("deployments", "deployments/scale"):
        for verb in ("patch", "update"):
            assert allows(rules, "apps", resource, verb), f"operator cannot {verb} {resource}"
    assert not granted_verbs(rules) & {"create", "delete", "deletecollection", "*"}
    viewer = base.one("ClusterRole", "wattops-viewer").rules
    for rule in viewer:
        for group in rule.api_groups:
            for resource in rule.resources:
                for verb in rule.verbs:
                    assert allows(rules, group, resource, verb), f"operator lacks {verb} {resource}"
    assert not allows(rules, "", "pods", "patch"), "pods change only through their Deployment"


def test_people_roles_are_bound_to_nobody(base: Build) -> None:
    bound = {binding.role_ref.name for binding in base.all("ClusterRoleBinding")}
    assert not bound & {"wattops-viewer", "wattops-operator"}


# --- the example engine -----------------------------------------------------------------------


def test_engine_deployment_is_a_wattops_deployment(base: Build) -> None:
    engine = base.one("Deployment", ENGINE)
    key, value = ENGINE_LABEL
    assert engine.metadata.labels[key] == value
    assert engine.spec.template.metadata.labels[key] == value
    container = first_container(engine)
    precision = env_of(container)["WATTOPS_PRECISION"].value
    assert precision in PRECISIONS
    # Kubernetes expands $(VAR) in args from the container's env: the precision picks the file.
    assert f"/models/{ENGINE}.$(WATTOPS_PRECISION).gguf" in container.args
    assert http_port(container) == 8080
    assert container.readiness_probe.http_get.path == "/health"
    assert probe_port(container, container.readiness_probe) == 8080
    assert container.resources.requests
    claim = volume_named(engine, "models").persistent_volume_claim
    assert claim is not None and base.one("PersistentVolumeClaim", claim.claim_name)
    assert mount_of(container, "models").mount_path == "/models"


def test_engine_precision_rollout_never_drops_below_full_strength(base: Build) -> None:
    engine = base.one("Deployment", ENGINE)
    strategy = engine.spec.strategy
    assert strategy.type == "RollingUpdate"
    assert strategy.rolling_update.max_unavailable == 0
    surge = strategy.rolling_update.max_surge
    assert isinstance(surge, int) and surge >= 1, f"maxSurge {surge!r}: want an absolute >= 1"
    assert engine.spec.progress_deadline_seconds == 600


def test_engine_service_selects_the_engine_pods_and_no_agent(base: Build) -> None:
    engine = base.one("Deployment", ENGINE)
    service = base.one("Service", ENGINE)
    selector = service.spec.selector
    pod_labels = engine.spec.template.metadata.labels
    assert selector and selector.items() <= pod_labels.items()
    agent_labels = base.one("DaemonSet", AGENT).spec.template.metadata.labels
    assert not selector.items() <= agent_labels.items()
    [port] = service.spec.ports
    assert (port.name, port.port) == ("http", 8080)
    target = port.target_port
    container = first_container(engine)
    assert target == "http" or target == http_port(container)


# --- the router -------------------------------------------------------------------------------

ROUTER = "wattops-router"


def router_toml(built: Build) -> dict[str, Any]:
    volume = volume_named(built.one("Deployment", ROUTER), "config")
    assert volume.config_map is not None
    data = built.one("ConfigMap", volume.config_map.name).data or {}
    return tomllib.loads(data["router.toml"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_router_config_is_accepted_by_the_router(variant: str) -> None:
    config = parse_router_config(router_toml(build(variant)), f"{variant}: router.toml")
    assert config.router.kubernetes  # it finds the agents through the API
    assert config.router.state_dir == Path("/var/lib/wattops-router")
    route = config.routes[0]
    assert route.matches(f"any-node/{ENGINE}")  # the example engine is a candidate


def test_router_runs_with_its_config_and_serves_on_its_port(base: Build) -> None:
    deployment = base.one("Deployment", ROUTER)
    router = first_container(deployment)
    assert router.command == ["wattops-router", "--config", "/etc/wattops/router.toml"]
    assert mount_of(router, "config").mount_path == "/etc/wattops"
    listen = router_toml(base)["router"]["listen"]
    assert int(listen.rpartition(":")[2]) == http_port(router)
    state = mount_of(router, "state").mount_path
    assert state == router_toml(base)["router"]["state_dir"]
    for probe in (router.readiness_probe, router.liveness_probe):
        assert probe.http_get.path == "/healthz"
        assert probe_port(router, probe) == http_port(router)
    # Unprivileged: it only forwards HTTP.
    context = router.security_context
    assert context.run_as_non_root and context.read_only_root_filesystem
    assert context.capabilities.drop == ["ALL"]
    # Not an engine: the agents must not account for it.
    labels = deployment.spec.template.metadata.labels
    assert ENGINE_LABEL[0] not in labels


def test_router_service_and_autoscaler_point_at_the_router(base: Build) -> None:
    deployment = base.one("Deployment", ROUTER)
    service = base.one("Service", ROUTER)
    labels = deployment.spec.template.metadata.labels
    assert all(labels.get(k) == v for k, v in service.spec.selector.items())
    assert service.spec.ports[0].target_port == "http"
    hpa = base.one("HorizontalPodAutoscaler", ROUTER)
    target = hpa.spec.scale_target_ref
    assert (target.kind, target.name) == ("Deployment", ROUTER)
    assert 1 <= hpa.spec.min_replicas <= hpa.spec.max_replicas
    # The CPU target is a share of the container's request, which must therefore be set.
    assert first_container(deployment).resources.requests["cpu"]


def test_router_may_only_read_pods_in_its_namespace(base: Build) -> None:
    role = base.one("Role", ROUTER)
    assert granted_verbs(role.rules) == READ_VERBS
    assert {r for rule in role.rules for r in rule.resources} == {"pods"}
    binding = base.one("RoleBinding", ROUTER)
    assert binding.role_ref.kind == "Role" and binding.role_ref.name == ROUTER
    assert [(s.kind, s.name) for s in binding.subjects] == [("ServiceAccount", ROUTER)]
    assert pod_spec(base.one("Deployment", ROUTER)).service_account_name == ROUTER
