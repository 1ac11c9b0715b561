"""The fleet on Kubernetes, through the API server, with the operator's own kubeconfig.

- Agents are the pods of the agent DaemonSet (`app.kubernetes.io/name=wattops-agent`); the
  console connects to each at its pod IP and `http` port, as to any agent.
- A wattops deployment is a Deployment labelled `app.kubernetes.io/part-of=wattops`; its
  name is the deployment's name and its precision is the env var `WATTOPS_PRECISION` of its
  first container.
- Scaling patches the Deployment's `scale` subresource. A precision change patches the env
  var in the pod template (a strategic merge patch, keyed by container and env names), and
  first makes the rolling update one that never drops below the desired ready count
  (maxUnavailable 0, maxSurge at least 1). Both carry the resourceVersion they were computed
  from, so a concurrent write makes the API server answer 409 and the change is recomputed on
  the fresh object; nothing is written half.
- A rollout is followed the way `kubectl rollout status` does, and also ends as failed when
  a pod of the new template is crash-looping or cannot pull its image.

The kubernetes client is synchronous; callers in an event loop run these in a thread.
Credentials come from `KUBECONFIG` or ~/.kube/config (and a context in it), as kubectl's do,
so what the console may do is what RBAC allows the operator.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wattops.vocabulary import (
    AGENT_SELECTOR,
    PART_OF_SELECTOR,
    PRECISION_ENV,
    PRECISIONS,
    STUCK_REASONS,
    kubeconfig_path,
)

__all__ = [
    "AGENT_SELECTOR",
    "PART_OF_SELECTOR",
    "PRECISION_ENV",
    "KubeDeployment",
    "KubeError",
    "KubeFleet",
    "Rollout",
]

CONFLICT_RETRIES = 5
STRATEGIC_MERGE = "application/strategic-merge-patch+json"


class KubeError(Exception):
    """A Kubernetes API call that did not work, said for people."""


@dataclass(frozen=True)
class KubeDeployment:
    """An engine Deployment as the fleet shows it."""

    namespace: str
    name: str
    precision: str | None
    desired: int
    updated: int
    ready: int
    available: int
    generation: int
    observed_generation: int
    resource_version: str

    @property
    def replicas_text(self) -> str:
        """`ready/desired (updated u, available a)` for tables."""
        return f"{self.ready}/{self.desired} (updated {self.updated}, available {self.available})"


@dataclass(frozen=True)
class Rollout:
    """Where a Deployment's rollout stands: `state` is progressing, complete or failed."""

    state: str
    message: str
    deployment: KubeDeployment

    @property
    def done(self) -> bool:
        return self.state != "progressing"


def _precision_of(obj: Any) -> str | None:
    containers = obj.spec.template.spec.containers or []
    if not containers:
        return None
    for env in containers[0].env or []:
        if env.name == PRECISION_ENV:
            return str(env.value) if env.value is not None else None
    return None


def _view(obj: Any) -> KubeDeployment:
    status = obj.status
    return KubeDeployment(
        namespace=obj.metadata.namespace,
        name=obj.metadata.name,
        precision=_precision_of(obj),
        desired=obj.spec.replicas if obj.spec.replicas is not None else 1,
        updated=(status and status.updated_replicas) or 0,
        ready=(status and status.ready_replicas) or 0,
        available=(status and status.available_replicas) or 0,
        generation=obj.metadata.generation or 0,
        observed_generation=(status and status.observed_generation) or 0,
        resource_version=obj.metadata.resource_version or "",
    )


def _resolve(value: Any, replicas: int, round_up: bool) -> int:
    """An IntOrString of a rolling update (absolute, or a percentage of `replicas`)."""
    if value is None:
        value = "25%"
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text.endswith("%"):
        share = float(text[:-1]) * replicas / 100
        return math.ceil(share) if round_up else math.floor(share)
    return int(text)


#: Where a pod finds its own namespace (the service account's projected volume).
_POD_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class KubeFleet:
    """Engine Deployments and agent pods through one API client."""

    def __init__(
        self, api_client: Any = None, context: str | None = None, namespace: str | None = None
    ) -> None:
        from kubernetes import client, config

        if api_client is None:
            try:
                api_client = config.new_client_from_config(kubeconfig_path(), context=context)
            except (config.ConfigException, OSError) as exc:
                raise KubeError(
                    f"no usable kubeconfig (KUBECONFIG or ~/.kube/config): {exc}"
                ) from None
            if namespace is None:
                namespace = _context_namespace(context)
        self.api_client = api_client
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        #: None: every namespace the operator may list.
        self.namespace = namespace

    @classmethod
    def from_environment(cls, namespace: str | None = None) -> KubeFleet:
        """In a pod: the pod's service account (in-cluster config), in the pod's namespace
        unless told otherwise; elsewhere: the kubeconfig, as the operator's tools do."""
        from kubernetes import client, config

        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            return cls(namespace=namespace)
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise KubeError(f"in a pod, but no usable service account: {exc}") from None
        if namespace is None:
            with contextlib.suppress(OSError):
                namespace = Path(_POD_NAMESPACE).read_text().strip() or None
        return cls(api_client=client.ApiClient(configuration), namespace=namespace)

    # -- errors ----------------------------------------------------------------------------

    def _call(
        self,
        verb: str,
        resource: str,
        namespace: str | None,
        name: str | None,
        fn: Callable[..., Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        where = f"in namespace {namespace}" if namespace else "in any namespace"
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            detail = _status_message(exc)
            if exc.status == 403:
                raise KubeError(
                    f"RBAC refused: you may not {verb} {resource} {where} ({detail}). "
                    "Ask for the wattops-operator ClusterRole (writes), wattops-viewer (reads), "
                    "or wattops-canary (canaries: create and delete of Deployments)."
                ) from None
            if exc.status == 404 and name:
                raise KubeError(f"deployment {name!r} not found {where}") from None
            if exc.status == 401:
                raise KubeError(
                    f"the API server did not accept your credentials: {detail}"
                ) from None
            if exc.status == 409:
                raise
            raise KubeError(f"{verb} {resource} {where} failed ({exc.status}): {detail}") from None
        except HTTPError as exc:
            host = self.api_client.configuration.host
            raise KubeError(f"cannot reach the Kubernetes API at {host}: {exc}") from None

    # -- reading ---------------------------------------------------------------------------

    def _list_labelled(self, resource: str, selector: str) -> list[Any]:
        """Pods or deployments matching `selector`, in our namespace or in all of them."""
        api = self.core if resource == "pods" else self.apps
        kind = "pod" if resource == "pods" else "deployment"
        args: tuple[str, ...] = ()
        if self.namespace:
            fn, args = getattr(api, f"list_namespaced_{kind}"), (self.namespace,)
        else:
            fn = getattr(api, f"list_{kind}_for_all_namespaces")
        result = self._call("list", resource, self.namespace, None, fn, *args,
                            label_selector=selector)  # fmt: skip
        return list(result.items)

    def agent_urls(self) -> list[str]:
        """Base URLs of the running, ready agent pods."""
        urls = []
        for pod in self._list_labelled("pods", AGENT_SELECTOR):
            if not pod.status or pod.status.phase != "Running" or not pod.status.pod_ip:
                continue
            port = 8080
            for container in pod.spec.containers:
                for p in container.ports or []:
                    if p.name == "http":
                        port = p.container_port
            urls.append(f"http://{pod.status.pod_ip}:{port}")
        return sorted(urls)

    def _list(self) -> list[Any]:
        return self._list_labelled("deployments", PART_OF_SELECTOR)

    def deployments(self) -> list[KubeDeployment]:
        """The wattops engine Deployments, by namespace and name."""
        return sorted((_view(d) for d in self._list()), key=lambda d: (d.namespace, d.name))

    def _namespace_of(self, name: str) -> str:
        if self.namespace:
            return self.namespace
        found = sorted(d.metadata.namespace for d in self._list() if d.metadata.name == name)
        if not found:
            raise KubeError(
                f"deployment {name!r} not found in any namespace (looked for Deployments "
                f"labelled {PART_OF_SELECTOR})"
            )
        if len(found) > 1:
            raise KubeError(
                f"deployment {name!r} exists in namespaces {', '.join(found)}: "
                "say which with --namespace"
            )
        return found[0]

    def deployment(self, name: str, namespace: str | None = None) -> KubeDeployment:
        """The engine Deployment called `name` (in the one namespace that has it)."""
        return _view(self.get(name, namespace))

    def get(self, name: str, namespace: str | None = None) -> Any:
        """The Deployment object (the client's V1Deployment)."""
        ns = namespace or self._namespace_of(name)
        return self._call(
            "get", "deployments", ns, name, self.apps.read_namespaced_deployment, name, ns
        )

    # -- writing ---------------------------------------------------------------------------

    def _with_retry(
        self, name: str, write: Callable[[Any], Any], namespace: str | None = None
    ) -> KubeDeployment:
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self._namespace_of(name)
        for _attempt in range(CONFLICT_RETRIES):
            current = self.get(name, ns)
            try:
                write(current)
            except ApiException as exc:  # only 409 gets here: someone wrote in between
                assert exc.status == 409
                continue
            return _view(self.get(name, ns))
        raise KubeError(
            f"deployment {name!r} in namespace {ns} kept changing under us "
            f"({CONFLICT_RETRIES} conflicting writes); nothing was changed, try again"
        )

    def scale(self, name: str, replicas: int, namespace: str | None = None) -> KubeDeployment:
        """Set the desired replicas through the scale subresource."""
        if replicas < 0:
            raise KubeError(f"replicas must be 0 or more, not {replicas}")

        def write(current: Any) -> None:
            body = {
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "spec": {"replicas": replicas},
            }
            ns = current.metadata.namespace
            self._call(
                "patch",
                "deployments/scale",
                ns,
                name,
                self.apps.patch_namespaced_deployment_scale,
                name,
                ns,
                body,
            )

        return self._with_retry(name, write, namespace)

    def set_precision(
        self, name: str, precision: str, namespace: str | None = None
    ) -> KubeDeployment:
        """Roll the Deployment to `precision` (never below the desired ready count)."""
        if precision not in PRECISIONS:
            raise KubeError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")

        def write(current: Any) -> None:
            containers = current.spec.template.spec.containers or []
            if not containers:
                raise KubeError(f"deployment {name!r} has no containers")
            spec: dict[str, Any] = {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": containers[0].name,
                                "env": [{"name": PRECISION_ENV, "value": precision}],
                            }
                        ]
                    }
                }
            }
            strategy = _safe_strategy(current)
            if strategy is not None:
                spec["strategy"] = strategy
            body = {
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "spec": spec,
            }
            ns = current.metadata.namespace
            self._call(
                "patch",
                "deployments",
                ns,
                name,
                self.apps.patch_namespaced_deployment,
                name,
                ns,
                body,
                _content_type=STRATEGIC_MERGE,
            )

        return self._with_retry(name, write, namespace)

    def create_canary(self, name: str, precision: str, replicas: int, label: str,
                      namespace: str | None = None) -> KubeDeployment:  # fmt: skip
        """`<name>-canary`: a copy of the Deployment at `precision` with `replicas` pods, its
        labels (and selector, and pod labels) plus `label: <name>`, so a Service selecting the
        first sends the canary's pods their share of the traffic (fleet/kube_canary.py)."""
        if precision not in PRECISIONS:
            raise KubeError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
        from kubernetes.client.exceptions import ApiException

        current = self.get(name, namespace)
        ns = current.metadata.namespace
        body: dict[str, Any] = self.api_client.sanitize_for_serialization(current)
        canary = f"{name}-canary"
        meta = body["metadata"]
        labels = {**(meta.get("labels") or {}), label: name}
        body["metadata"] = {"name": canary, "namespace": ns, "labels": labels,
                            "annotations": {"wattops.io/canary-of": name}}  # fmt: skip
        body.pop("status", None)
        spec = body["spec"]
        spec["replicas"] = replicas
        spec["selector"].setdefault("matchLabels", {})[label] = name
        template_meta = spec["template"].setdefault("metadata", {})
        template_meta["labels"] = {**(template_meta.get("labels") or {}), label: name}
        containers = spec["template"]["spec"].get("containers") or []
        if not containers:
            raise KubeError(f"deployment {name!r} has no containers")
        env = [e for e in containers[0].get("env") or [] if e.get("name") != PRECISION_ENV]
        containers[0]["env"] = [*env, {"name": PRECISION_ENV, "value": precision}]
        try:
            self._call("create", "deployments", ns, None,
                       self.apps.create_namespaced_deployment, ns, body)  # fmt: skip
        except ApiException as exc:  # 409: AlreadyExists
            raise KubeError(f"{canary} already exists in namespace {ns}: a canary of {name} is "
                            f"running (or was left); wait for its verdict or delete it with "
                            f"`kubectl delete deployment {canary} -n {ns}`") from exc  # fmt: skip
        return self.deployment(canary, ns)

    def delete(self, name: str, namespace: str | None = None) -> bool:
        """Delete a Deployment (its pods go after it); False if it was not there."""
        from kubernetes.client.exceptions import ApiException

        ns = namespace or self._namespace_of(name)
        try:
            self._call("delete", "deployments", ns, None,
                       self.apps.delete_namespaced_deployment, name, ns)  # fmt: skip
        except KubeError as exc:
            if "not found" in str(exc) or "(404)" in str(exc):
                return False
            raise
        except ApiException:  # 409 on a delete: gone already in between
            return False
        return True

    # -- following a rollout ---------------------------------------------------------------

    def rollout(self, name: str, namespace: str | None = None) -> Rollout:
        """Where the rollout of `name` stands now (kubectl rollout status's reading)."""
        obj = self.get(name, namespace)
        view = _view(obj)
        if view.observed_generation < view.generation:
            return Rollout("progressing", "waiting for the deployment controller", view)
        for cond in (obj.status and obj.status.conditions) or []:
            if cond.type == "Progressing" and cond.reason == "ProgressDeadlineExceeded":
                return Rollout("failed", f"ProgressDeadlineExceeded: {cond.message}", view)
        stuck = self._stuck_pod(obj)
        if stuck:
            return Rollout("failed", stuck, view)
        total = (obj.status and obj.status.replicas) or 0
        if view.updated < view.desired:
            return Rollout("progressing", f"{view.updated} of {view.desired} updated", view)
        if total > view.updated:
            old = total - view.updated
            return Rollout("progressing", f"{old} old replicas pending termination", view)
        if view.available < view.updated:
            return Rollout(
                "progressing", f"{view.available} of {view.updated} updated available", view
            )
        return Rollout("complete", f"{view.available} of {view.desired} ready and updated", view)

    def _stuck_pod(self, obj: Any) -> str | None:
        labels = (obj.spec.selector and obj.spec.selector.match_labels) or {}
        if not labels:
            return None
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        ns = obj.metadata.namespace
        pods = self._call(
            "list", "pods", ns, None, self.core.list_namespaced_pod, ns, label_selector=selector
        )
        want = _precision_of(obj)
        for pod in pods.items:
            env = {e.name: e.value for e in (pod.spec.containers[0].env or [])}
            if env.get(PRECISION_ENV) != want:
                continue  # an old pod: it still serves, whatever the new ones do
            for cs in (pod.status and pod.status.container_statuses) or []:
                waiting = cs.state and cs.state.waiting
                if waiting and waiting.reason in STUCK_REASONS:
                    return (
                        f"pod {pod.metadata.name} is {waiting.reason} "
                        f"({cs.restart_count} restarts)"
                        + (f": {waiting.message}" if waiting.message else "")
                    )
        return None

    def follow(
        self,
        name: str,
        timeout_s: float = 600.0,
        poll_s: float = 1.0,
        namespace: str | None = None,
    ) -> Iterator[Rollout]:
        """Yield the rollout's state as it changes, ending with a done one (or on timeout,
        with the last progressing state)."""
        deadline = time.monotonic() + timeout_s
        last: Rollout | None = None
        ns = namespace or self._namespace_of(name)
        while True:
            current = self.rollout(name, ns)
            if last is None or (current.state, current.message) != (last.state, last.message):
                yield current
            last = current
            if current.done or time.monotonic() >= deadline:
                return
            time.sleep(poll_s)


def _safe_strategy(obj: Any) -> dict[str, Any] | None:
    """The strategy patch that makes the rollout never drop below the desired ready count,
    or None when the Deployment already rolls that way."""
    safe = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    strategy = obj.spec.strategy
    if strategy is not None and strategy.type == "Recreate":
        return safe
    # No type means the API server's default: RollingUpdate with 25% / 25%.
    rolling = strategy.rolling_update if strategy is not None else None
    replicas = obj.spec.replicas if obj.spec.replicas is not None else 1
    surge = _resolve(rolling.max_surge if rolling else None, replicas, round_up=True)
    unavailable = _resolve(rolling.max_unavailable if rolling else None, replicas, round_up=False)
    if unavailable == 0 and surge >= 1:
        return None
    if rolling is not None and rolling.max_surge is not None and surge >= 1:
        safe["rollingUpdate"]["maxSurge"] = rolling.max_surge  # type: ignore[index]
    return safe


def _status_message(exc: Any) -> str:
    import json

    try:
        body = json.loads(exc.body or "{}")
    except ValueError:
        return str(exc.reason or exc.status)
    return str(body.get("message") or exc.reason or exc.status)


def _context_namespace(context: str | None) -> str | None:
    from kubernetes import config

    try:
        contexts, active = config.list_kube_config_contexts(kubeconfig_path())
    except (config.ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return (chosen or {}).get("context", {}).get("namespace")
