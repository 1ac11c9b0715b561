"""Engine pods on this node: what the agent's cluster mode reads from the Kubernetes API.

The agent lists the pods on its own node (field selector `spec.nodeName`) that match the
engine label selector, every `poll_s` seconds, with the official kubernetes client in a worker
thread. A list, not a watch: a watch needs reconnects and resourceVersion bookkeeping (410
Gone) for no gain here, since accounting works at second scale and one field-selected list
per node every few seconds is cheap for the API server (it answers from its watch cache).

Each pod becomes an `EnginePod`: the Deployment that owns it (its ReplicaSet's name minus the
`-<pod-template-hash>` suffix, which is how the Deployment controller names ReplicaSets), the
precision it serves (`WATTOPS_PRECISION` of its first container), where its OpenAI API is (the
pod IP and the container port named `port_name`), and whether it is Ready (the condition a
Service's endpoints go by).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from wattops.agents.config import KubernetesSection
from wattops.vocabulary import PRECISION_ENV, UNKNOWN_PRECISION, kubeconfig_path


class ClusterError(Exception):
    """The pods could not be listed; the message says why and what to check."""


@dataclass(frozen=True)
class EnginePod:
    """One engine pod on this node, as far as the agent cares."""

    namespace: str
    name: str
    uid: str
    deployment: str
    precision: str
    #: http://<pod IP>:<port>; None until the pod has an IP, or without a port named port_name.
    url: str | None
    ready: bool
    terminating: bool
    created_at: float
    image: str
    memory_bytes: int | None
    cpu_threads: int | None
    restarts: int
    waiting_reason: str | None


def owner_deployment(metadata: Any) -> str:
    """The Deployment a pod belongs to, from its controlling ReplicaSet's name."""
    labels = metadata.labels or {}
    for ref in metadata.owner_references or []:
        if ref.kind == "ReplicaSet":
            template_hash = labels.get("pod-template-hash")
            if template_hash and ref.name.endswith("-" + template_hash):
                return str(ref.name[: -len(template_hash) - 1])
            return str(ref.name)  # a bare ReplicaSet, not made by a Deployment
    return str(labels.get("app.kubernetes.io/name") or metadata.name)


def _quantity(resources: Any, key: str) -> float | None:
    from kubernetes.utils import parse_quantity

    if resources is None:
        return None
    # Requests default to limits when only limits are given, as the API server does.
    for table in (resources.requests, resources.limits):
        if table and key in table:
            try:
                return float(parse_quantity(table[key]))
            except ValueError:
                return None
    return None


def engine_pod(pod: Any, port_name: str) -> EnginePod | None:
    """The EnginePod of a kubernetes client V1Pod; None for a pod that has finished."""
    meta, spec, status = pod.metadata, pod.spec, pod.status
    phase = status.phase if status else None
    if phase in ("Succeeded", "Failed"):
        return None
    container = spec.containers[0]
    env = {e.name: e.value for e in container.env or [] if e.value is not None}
    port = next((p.container_port for p in container.ports or [] if p.name == port_name), None)
    pod_ip = status.pod_ip if status else None
    url = None
    if pod_ip and port:
        host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
        url = f"http://{host}:{port}"
    conditions = (status.conditions if status else None) or []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    statuses = (status.container_statuses if status else None) or []
    waiting = next((s.state.waiting.reason for s in statuses if s.state and s.state.waiting), None)
    memory = _quantity(container.resources, "memory")
    cpu = _quantity(container.resources, "cpu")
    created = meta.creation_timestamp
    return EnginePod(
        namespace=meta.namespace,
        name=meta.name,
        uid=meta.uid,
        deployment=owner_deployment(meta),
        precision=env.get(PRECISION_ENV) or UNKNOWN_PRECISION,
        url=url,
        ready=ready and url is not None,
        terminating=meta.deletion_timestamp is not None,
        created_at=created.timestamp() if created else 0.0,
        image=container.image or "",
        memory_bytes=int(memory) if memory else None,
        cpu_threads=max(1, math.ceil(cpu)) if cpu else None,
        restarts=sum(s.restart_count or 0 for s in statuses),
        waiting_reason=waiting,
    )


class PodLister:
    """Lists the engine pods on one node; `list()` blocks (run it in a thread)."""

    def __init__(self, section: KubernetesSection, node: str) -> None:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise ClusterError(
                "cluster mode needs the kubernetes client: pip install 'wattops[kubernetes]'"
            ) from None
        self.section = section
        self.node = node
        self._core: Any = None
        self.host = ""

    def _api(self) -> Any:
        if self._core is not None:
            return self._core
        from kubernetes import client, config

        section = self.section
        try:
            if section.kubeconfig is not None:
                api = config.new_client_from_config(
                    config_file=str(section.kubeconfig), context=section.context
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = client.Configuration()
                config.load_incluster_config(client_configuration=configuration)
                api = client.ApiClient(configuration)
            else:
                api = config.new_client_from_config(
                    config_file=kubeconfig_path(), context=section.context
                )
        except (config.ConfigException, OSError) as exc:
            raise ClusterError(f"no Kubernetes credentials: {exc}") from None
        self.host = api.configuration.host
        self._core = client.CoreV1Api(api)
        return self._core

    def list(self) -> list[EnginePod]:
        """The engine pods on this node that have not finished; ClusterError if unreadable."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        core = self._api()
        namespace = self.section.namespace
        query = {
            "label_selector": self.section.selector,
            "field_selector": f"spec.nodeName={self.node}",
            "_request_timeout": 10,
        }
        try:
            if namespace:
                pods = core.list_namespaced_pod(namespace, **query)
            else:
                pods = core.list_pod_for_all_namespaces(**query)
        except ApiException as exc:
            raise ClusterError(self._describe(exc)) from None
        except (HTTPError, OSError) as exc:
            raise ClusterError(
                f"cannot reach the Kubernetes API server at {self.host}: {exc}"
            ) from None
        found = (engine_pod(pod, self.section.port_name) for pod in pods.items)
        return [pod for pod in found if pod is not None]

    def _describe(self, exc: Any) -> str:
        where = (
            f"namespace {self.section.namespace}" if self.section.namespace else ("all namespaces")
        )
        if exc.status == 403:
            return (
                f"RBAC: the agent may not list pods in {where} (403); grant it 'list' on "
                "'pods' there, as deploy/kubernetes/base/agent-rbac.yaml does"
            )
        if exc.status == 401:
            return "the Kubernetes API server rejected the agent's credentials (401)"
        return f"listing pods in {where} failed: {exc.status} {exc.reason}"
