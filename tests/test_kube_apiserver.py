"""The stand-in API server behaves like the real one for the calls wattops makes.

Every test drives it through the official `kubernetes` client, so a shape the client could not
parse, or a status code, message or rollout step that differs from the real server's, fails
here rather than in the tests that rely on the stand-in.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client, watch

from tests.kube_apiserver import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    WATTOPS_OPERATOR,
    KubeApiServer,
)

NAMESPACE = "ml"
PRECISION = "WATTOPS_PRECISION"


@pytest.fixture
def server() -> Iterator[KubeApiServer]:
    with KubeApiServer(ready_after_s=0.05, tick_s=0.02, nodes=("node-a", "node-b")) as server:
        yield server


def api_client(server: KubeApiServer, token: str) -> client.ApiClient:
    return client.ApiClient(server.configuration(token))


@pytest.fixture
def apps(server: KubeApiServer) -> Iterator[client.AppsV1Api]:
    with api_client(server, OPERATOR_TOKEN) as api:
        yield client.AppsV1Api(api)


@pytest.fixture
def core(server: KubeApiServer) -> Iterator[client.CoreV1Api]:
    with api_client(server, OPERATOR_TOKEN) as api:
        yield client.CoreV1Api(api)


def add_tiny(server: KubeApiServer, replicas: int = 2, **options: Any) -> None:
    """The `tiny` llama.cpp deployment at q8_0, rolled out."""
    server.add_deployment(
        NAMESPACE,
        "tiny",
        {"app": "tiny"},
        containers=[
            {
                "name": "llama",
                "image": "wattops/llama-server:1",
                "env": [
                    {"name": PRECISION, "value": "q8_0"},
                    {"name": "WATTOPS_CTX", "value": "2048"},
                ],
            },
            {"name": "exporter", "image": "wattops/exporter:1"},
        ],
        replicas=replicas,
        **options,
    )
    server.settle()


def precision_patch(precision: str) -> dict[str, Any]:
    container = {"name": "llama", "env": [{"name": PRECISION, "value": precision}]}
    return {"spec": {"template": {"spec": {"containers": [container]}}}}


def env_of(deployment: client.V1Deployment) -> dict[str, str | None]:
    llama = deployment.spec.template.spec.containers[0]
    return {variable.name: variable.value for variable in llama.env or []}


def status_of(error: client.ApiException) -> dict[str, Any]:
    status: dict[str, Any] = json.loads(error.body)
    return status


def wait_until(condition: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out waiting for the stand-in"
        time.sleep(0.02)
    return value


def condition(deployment: client.V1Deployment, kind: str) -> client.V1DeploymentCondition:
    return next(c for c in deployment.status.conditions if c.type == kind)


def rolled_out(deployment: client.V1Deployment) -> bool:
    """`kubectl rollout status`'s test: the controller saw this generation and finished it."""
    status = deployment.status
    return (
        (status.observed_generation or 0) >= deployment.metadata.generation
        and status.updated_replicas == deployment.spec.replicas
        and status.replicas == status.updated_replicas
        and status.available_replicas == status.updated_replicas
    )


# --- reads ----------------------------------------------------------------------------------


def test_pod_lists_filter_by_label_and_field_selectors(
    server: KubeApiServer, core: client.CoreV1Api
) -> None:
    for index, node in enumerate(("node-a", "node-b", "node-c")):
        server.add_pod(
            "wattops", f"agent-{node}", {"app": "wattops-agent"}, node, f"10.0.0.{index}"
        )
    server.add_pod("wattops", "console", {"app": "wattops-console"}, "node-a", "10.0.1.1")
    add_tiny(server)

    on_b = core.list_pod_for_all_namespaces(
        label_selector="app=wattops-agent", field_selector="spec.nodeName=node-b"
    )
    not_agents = core.list_namespaced_pod("wattops", label_selector="app!=wattops-agent")
    some = core.list_namespaced_pod("wattops", label_selector="app in (wattops-agent),tier")
    replicas = core.list_pod_for_all_namespaces(label_selector="app=tiny,pod-template-hash")

    assert [pod.metadata.name for pod in on_b.items] == ["agent-node-b"]
    assert on_b.items[0].status.pod_ip == "10.0.0.1"
    assert on_b.kind == "PodList" and on_b.metadata.resource_version
    assert on_b.items[0].kind is None, "list items carry no kind, as the real server's"
    assert [pod.metadata.name for pod in not_agents.items] == ["console"]
    assert some.items == []
    assert len(replicas.items) == 2
    assert {pod.spec.node_name for pod in replicas.items} == {"node-a", "node-b"}
    assert all(pod.metadata.name.startswith("tiny-") for pod in replicas.items)


def test_unsupported_field_selector_is_a_bad_request(
    server: KubeApiServer, core: client.CoreV1Api
) -> None:
    with pytest.raises(client.ApiException) as refused:
        core.list_pod_for_all_namespaces(field_selector="spec.containers=llama")

    assert refused.value.status == 400
    assert status_of(refused.value)["message"] == "field label not supported: spec.containers"


def test_missing_deployment_is_a_404_status(server: KubeApiServer, apps: client.AppsV1Api) -> None:
    with pytest.raises(client.ApiException) as missing:
        apps.read_namespaced_deployment("huge", NAMESPACE)

    assert missing.value.status == 404
    assert status_of(missing.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "huge" not found',
        "reason": "NotFound",
        "details": {"name": "huge", "group": "apps", "kind": "deployments"},
        "code": 404,
    }


# --- patches --------------------------------------------------------------------------------


def test_dict_patch_is_a_strategic_merge_of_containers_and_env_by_name(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    patch = precision_patch("q4_k_m")
    patch["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "WATTOPS_THREADS", "value": "8"}
    )

    patched = apps.patch_namespaced_deployment("tiny", NAMESPACE, patch)

    assert env_of(patched) == {PRECISION: "q4_k_m", "WATTOPS_CTX": "2048", "WATTOPS_THREADS": "8"}
    containers = patched.spec.template.spec.containers
    assert [c.name for c in containers] == ["llama", "exporter"]
    assert containers[0].image == "wattops/llama-server:1"
    assert patched.metadata.generation == 2


def test_strategic_merge_patch_deletes_list_items_and_null_keys(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    patch = {
        "metadata": {"labels": {"app": None}},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "llama", "env": [{"name": "WATTOPS_CTX", "$patch": "delete"}]},
                        {"name": "exporter", "$patch": "delete"},
                    ]
                }
            }
        },
    }

    patched = apps.patch_namespaced_deployment("tiny", NAMESPACE, patch)

    assert patched.metadata.labels is None
    assert [c.name for c in patched.spec.template.spec.containers] == ["llama"]
    assert env_of(patched) == {PRECISION: "q8_0"}


def test_merge_patch_replaces_lists_whole(server: KubeApiServer, apps: client.AppsV1Api) -> None:
    add_tiny(server)

    patched = apps.patch_namespaced_deployment(
        "tiny",
        NAMESPACE,
        precision_patch("q4_k_m"),
        _content_type="application/merge-patch+json",
    )

    (llama,) = patched.spec.template.spec.containers
    assert env_of(patched) == {PRECISION: "q4_k_m"}
    assert llama.image is None, "RFC 7386 replaced the container list with the patch's"


def test_json_patch_applies_operations_and_a_failed_test_changes_nothing(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    path = "/spec/template/spec/containers/0/env/0/value"

    patched = apps.patch_namespaced_deployment(
        "tiny",
        NAMESPACE,
        [
            {"op": "test", "path": path, "value": "q8_0"},
            {"op": "replace", "path": path, "value": "f16"},
            {"op": "add", "path": "/metadata/labels/tier", "value": "gpu"},
        ],
    )
    with pytest.raises(client.ApiException) as refused:
        apps.patch_namespaced_deployment(
            "tiny",
            NAMESPACE,
            [
                {"op": "test", "path": path, "value": "q8_0"},
                {"op": "replace", "path": path, "value": "q2_k"},
            ],
        )

    assert env_of(patched)[PRECISION] == "f16"
    assert patched.metadata.labels == {"app": "tiny", "tier": "gpu"}
    assert refused.value.status == 422
    assert status_of(refused.value)["reason"] == "Invalid"
    assert env_of(apps.read_namespaced_deployment("tiny", NAMESPACE))[PRECISION] == "f16"


def test_unsupported_patch_content_type_is_a_415_status(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)

    with pytest.raises(client.ApiException) as refused:
        apps.patch_namespaced_deployment(
            "tiny",
            NAMESPACE,
            {"spec": {"replicas": 3}},
            _content_type="application/apply-patch+yaml",
        )

    assert refused.value.status == 415
    status = status_of(refused.value)
    assert status["reason"] == "UnsupportedMediaType"
    assert "application/strategic-merge-patch+json" in status["message"]


# --- the scale subresource and concurrency --------------------------------------------------


def test_scale_subresource_reads_and_writes_the_deployments_replicas(
    server: KubeApiServer, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    add_tiny(server)
    before = apps.read_namespaced_deployment("tiny", NAMESPACE)

    scale = apps.read_namespaced_deployment_scale("tiny", NAMESPACE)
    scaled = apps.patch_namespaced_deployment_scale("tiny", NAMESPACE, {"spec": {"replicas": 3}})
    server.settle()
    after = apps.read_namespaced_deployment("tiny", NAMESPACE)

    assert scale.kind == "Scale" and scale.api_version == "autoscaling/v1"
    assert scale.metadata.resource_version == before.metadata.resource_version
    assert (scale.spec.replicas, scale.status.replicas, scale.status.selector) == (2, 2, "app=tiny")
    assert scaled.spec.replicas == 3
    assert after.spec.replicas == 3 and after.status.ready_replicas == 3
    assert after.metadata.generation == before.metadata.generation + 1
    assert int(after.metadata.resource_version) > int(before.metadata.resource_version)
    assert len(core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items) == 3


def test_scaling_to_zero_removes_pods_and_leaves_zero_counts_out(
    server: KubeApiServer, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    add_tiny(server)

    apps.patch_namespaced_deployment_scale("tiny", NAMESPACE, {"spec": {"replicas": 0}})
    server.settle()
    parked = apps.read_namespaced_deployment("tiny", NAMESPACE)
    scale = apps.read_namespaced_deployment_scale("tiny", NAMESPACE)

    assert core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items == []
    assert parked.spec.replicas == 0
    assert parked.status.replicas is None and parked.status.ready_replicas is None
    assert scale.spec.replicas is None, "autoscaling/v1 ScaleSpec.replicas is omitempty"


def test_negative_scale_is_an_invalid_status(server: KubeApiServer, apps: client.AppsV1Api) -> None:
    add_tiny(server)

    with pytest.raises(client.ApiException) as refused:
        apps.patch_namespaced_deployment_scale("tiny", NAMESPACE, {"spec": {"replicas": -1}})

    assert refused.value.status == 422
    status = status_of(refused.value)
    assert status["reason"] == "Invalid"
    assert status["message"] == (
        'Scale.autoscaling "tiny" is invalid: '
        "spec.replicas: Invalid value: -1: must be greater than or equal to 0"
    )
    assert apps.read_namespaced_deployment("tiny", NAMESPACE).spec.replicas == 2


def test_writes_with_a_stale_resource_version_conflict(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    stale = apps.read_namespaced_deployment("tiny", NAMESPACE)
    apps.patch_namespaced_deployment_scale("tiny", NAMESPACE, {"spec": {"replicas": 3}})
    stale_version = stale.metadata.resource_version
    stale.spec.replicas = 1

    conflicts = []
    for write in (
        lambda: apps.replace_namespaced_deployment("tiny", NAMESPACE, stale),
        lambda: apps.patch_namespaced_deployment(
            "tiny",
            NAMESPACE,
            {"metadata": {"resourceVersion": stale_version}, "spec": {"replicas": 1}},
        ),
        lambda: apps.replace_namespaced_deployment_scale(
            "tiny",
            NAMESPACE,
            {
                "metadata": {"name": "tiny", "resourceVersion": stale_version},
                "spec": {"replicas": 1},
            },
        ),
    ):
        with pytest.raises(client.ApiException) as conflict:
            write()
        conflicts.append(conflict.value)
    server.settle()  # the controller's status writes move resourceVersion on too
    current = apps.read_namespaced_deployment("tiny", NAMESPACE)
    current_version = current.metadata.resource_version
    current.spec.replicas = 1
    replaced = apps.replace_namespaced_deployment("tiny", NAMESPACE, current)

    for conflict in conflicts:
        assert conflict.status == 409
        assert status_of(conflict)["reason"] == "Conflict"
        assert status_of(conflict)["message"] == (
            'Operation cannot be fulfilled on deployments.apps "tiny": the object has been '
            "modified; please apply your changes to the latest version and try again"
        )
    assert replaced.spec.replicas == 1
    assert int(replaced.metadata.resource_version) > int(current_version)


def test_replacing_an_unchanged_deployment_changes_nothing(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    current = apps.read_namespaced_deployment("tiny", NAMESPACE)

    replaced = apps.replace_namespaced_deployment("tiny", NAMESPACE, current)

    assert replaced.metadata.resource_version == current.metadata.resource_version
    assert replaced.metadata.generation == current.metadata.generation


# --- authentication and authorization -------------------------------------------------------


def test_viewer_may_read_but_not_scale_with_the_real_forbidden_message(
    server: KubeApiServer,
) -> None:
    add_tiny(server)
    with api_client(server, VIEWER_TOKEN) as api:
        viewer = client.AppsV1Api(api)
        listed = viewer.list_deployment_for_all_namespaces()
        with pytest.raises(client.ApiException) as refused:
            viewer.patch_namespaced_deployment_scale("tiny", NAMESPACE, {"spec": {"replicas": 0}})

    assert [d.metadata.name for d in listed.items] == ["tiny"]
    assert refused.value.status == 403
    assert status_of(refused.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'deployments.apps "tiny" is forbidden: User "viewer" cannot patch resource '
        '"deployments/scale" in API group "apps" in the namespace "ml"',
        "reason": "Forbidden",
        "details": {"name": "tiny", "group": "apps", "kind": "deployments"},
        "code": 403,
    }


def test_a_namespace_role_binding_does_not_reach_the_cluster_scope(
    server: KubeApiServer,
) -> None:
    add_tiny(server)
    server.add_user("ml-operator", "ml-token")
    server.bind("ml-operator", WATTOPS_OPERATOR, namespace=NAMESPACE)
    with api_client(server, "ml-token") as api:
        operator = client.AppsV1Api(api)
        scaled = operator.patch_namespaced_deployment_scale(
            "tiny", NAMESPACE, {"spec": {"replicas": 1}}
        )
        with pytest.raises(client.ApiException) as refused:
            operator.list_deployment_for_all_namespaces()

    assert scaled.spec.replicas == 1
    assert refused.value.status == 403
    assert status_of(refused.value)["message"] == (
        'deployments.apps is forbidden: User "ml-operator" cannot list resource "deployments" '
        'in API group "apps" at the cluster scope'
    )


def test_unknown_token_is_unauthorized(server: KubeApiServer) -> None:
    with api_client(server, "not-a-token") as api, pytest.raises(client.ApiException) as refused:
        client.CoreV1Api(api).list_pod_for_all_namespaces()

    assert refused.value.status == 401
    assert status_of(refused.value)["reason"] == "Unauthorized"


# --- the deployment controller --------------------------------------------------------------


def test_rolling_update_with_max_unavailable_zero_keeps_every_replica_ready(
    server: KubeApiServer, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    add_tiny(
        server,
        replicas=3,
        strategy={"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
    )
    server.ready_after_s = 0.15  # a surge pod lives this long unready: long enough to sample

    apps.patch_namespaced_deployment("tiny", NAMESPACE, precision_patch("q4_k_m"))
    samples = []
    deadline = time.monotonic() + 5
    while True:
        deployment = apps.read_namespaced_deployment("tiny", NAMESPACE)
        status = deployment.status
        samples.append((status.replicas, status.updated_replicas, status.ready_replicas))
        if rolled_out(deployment):
            break
        assert time.monotonic() < deadline, f"the rollout did not finish: {samples[-5:]}"

    assert min(ready or 0 for _, _, ready in samples) >= 3
    assert max(replicas for replicas, _, _ in samples) == 4, "maxSurge 1 allows one extra pod"
    assert samples[-1] == (3, 3, 3)
    assert condition(deployment, "Progressing").reason == "NewReplicaSetAvailable"
    assert deployment.status.observed_generation == deployment.metadata.generation
    assert deployment.metadata.annotations["deployment.kubernetes.io/revision"] == "2"
    pods = core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items
    assert len({pod.metadata.labels["pod-template-hash"] for pod in pods}) == 1
    assert {pod.spec.containers[0].env[0].value for pod in pods} == {"q4_k_m"}


def test_recreate_strategy_removes_old_pods_before_making_new_ones(
    server: KubeApiServer, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    add_tiny(server, strategy={"type": "Recreate"})

    apps.patch_namespaced_deployment("tiny", NAMESPACE, precision_patch("q4_k_m"))
    hashes_seen = []
    deadline = time.monotonic() + 5
    while not rolled_out(apps.read_namespaced_deployment("tiny", NAMESPACE)):
        pods = core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items
        hashes_seen.append({pod.metadata.labels["pod-template-hash"] for pod in pods})
        assert time.monotonic() < deadline, "the rollout did not finish"

    assert hashes_seen, "the rollout was already over when sampling began"
    assert all(len(hashes) <= 1 for hashes in hashes_seen), hashes_seen


def test_crash_looping_rollout_exceeds_its_progress_deadline_and_rolls_back(
    server: KubeApiServer, apps: client.AppsV1Api, core: client.CoreV1Api
) -> None:
    add_tiny(server, progress_deadline_seconds=1)
    server.crash_when(
        lambda container: {"name": PRECISION, "value": "q2_k"} in container.get("env", [])
    )

    def stalled() -> client.V1Deployment | None:
        deployment = apps.read_namespaced_deployment("tiny", NAMESPACE)
        return deployment if condition(deployment, "Progressing").status == "False" else None

    apps.patch_namespaced_deployment("tiny", NAMESPACE, precision_patch("q2_k"))
    stuck = wait_until(stalled)
    crashing = [
        pod
        for pod in core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items
        if not pod.status.container_statuses[0].ready
    ]
    apps.patch_namespaced_deployment("tiny", NAMESPACE, precision_patch("q8_0"))
    server.settle()
    rolled_back = apps.read_namespaced_deployment("tiny", NAMESPACE)

    progressing = condition(stuck, "Progressing")
    assert progressing.reason == "ProgressDeadlineExceeded"
    assert progressing.message.endswith("has timed out progressing.")
    assert (stuck.status.ready_replicas, stuck.status.updated_replicas) == (2, 1)
    assert condition(stuck, "Available").status == "True"
    (pod,) = crashing
    llama = pod.status.container_statuses[0]
    assert llama.state.waiting.reason == "CrashLoopBackOff"
    assert llama.restart_count >= 1
    assert pod.status.container_statuses[1].ready, "only the first container crashes"
    assert condition(rolled_back, "Progressing").reason == "NewReplicaSetAvailable"
    assert rolled_back.metadata.annotations["deployment.kubernetes.io/revision"] == "3"
    pods = core.list_namespaced_pod(NAMESPACE, label_selector="app=tiny").items
    assert pod.metadata.name not in {p.metadata.name for p in pods}
    assert all(p.status.container_statuses[0].ready for p in pods)


def test_pod_watch_sends_added_then_modified_events(
    server: KubeApiServer, core: client.CoreV1Api
) -> None:
    server.add_pod("wattops", "agent-a", {"app": "wattops-agent"}, "node-a", "10.0.0.1")
    since = core.list_pod_for_all_namespaces().metadata.resource_version
    server.set_pod_ready("wattops", "agent-a", ready=False)
    server.add_deployment(NAMESPACE, "tiny", {"app": "tiny"})

    replayed = []
    stream = watch.Watch()
    for event in stream.stream(
        core.list_pod_for_all_namespaces, resource_version=since, timeout_seconds=5
    ):
        pod = event["object"]
        replayed.append((event["type"], pod.metadata.name, pod.status.phase))
        if event["type"] == "MODIFIED" and pod.metadata.name.startswith("tiny-"):
            stream.stop()
    first = watch.Watch()
    for event in first.stream(core.list_namespaced_pod, "wattops", timeout_seconds=5):
        initial = (event["type"], event["object"].metadata.name)
        first.stop()

    replica = next(name for _, name, _ in replayed if name.startswith("tiny-"))
    assert replayed[0] == ("MODIFIED", "agent-a", "Running")
    assert ("ADDED", replica, "Pending") in replayed
    assert ("MODIFIED", replica, "Running") == replayed[-1]
    assert initial == ("ADDED", "agent-a"), "a watch without resourceVersion lists first"


def test_selector_watch_sees_a_deployment_enter_and_leave_the_selection(
    server: KubeApiServer, apps: client.AppsV1Api
) -> None:
    add_tiny(server)
    since = apps.list_namespaced_deployment(NAMESPACE).metadata.resource_version
    apps.patch_namespaced_deployment("tiny", NAMESPACE, {"metadata": {"labels": {"tier": "gpu"}}})
    apps.patch_namespaced_deployment("tiny", NAMESPACE, {"metadata": {"labels": {"tier": None}}})

    events = []
    stream = watch.Watch()
    for event in stream.stream(
        apps.list_namespaced_deployment,
        NAMESPACE,
        label_selector="tier=gpu",
        resource_version=since,
        timeout_seconds=5,
    ):
        events.append((event["type"], event["object"].metadata.labels))
        if event["type"] == "DELETED":
            stream.stop()

    gpu = {"app": "tiny", "tier": "gpu"}
    assert events == [("ADDED", gpu), ("DELETED", gpu)]
