"""`--kube`: discovery, scaling and precision rollouts through the real kubernetes client.

The API server is tests/kube_apiserver.py, a stand-in on loopback (no kube-apiserver can run
here); its docstring says which behaviour of the real server each part copies.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from tests.conftest import Agent
from tests.kube_apiserver import OPERATOR_TOKEN, VIEWER_TOKEN, KubeApiServer
from wattops.console.cli import main as cli_main
from wattops.fleet.kube import KubeError, KubeFleet

NS = "ml"
ENGINE = {"app.kubernetes.io/part-of": "wattops", "app.kubernetes.io/name": "chat"}


def _engine(precision: str = "q4_k_m") -> list[dict[str, Any]]:
    return [
        {
            "name": "server",
            "image": "ghcr.io/ggml-org/llama.cpp:server",
            "env": [
                {"name": "WATTOPS_PRECISION", "value": precision},
                {"name": "LLAMA_ARG_CTX_SIZE", "value": "4096"},
            ],
        },
        {"name": "sidecar", "image": "busybox"},
    ]


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(ready_after_s=0.15, nodes=("gpu-1", "gpu-2")) as server:
        yield server


def _fleet(
    api: KubeApiServer, token: str = OPERATOR_TOKEN, namespace: str | None = None
) -> KubeFleet:
    client = kubernetes.client.ApiClient(api.configuration(token))
    return KubeFleet(api_client=client, namespace=namespace)


def _deployment(api: KubeApiServer, **kwargs: Any) -> dict[str, Any]:
    kwargs.setdefault("containers", _engine())
    kwargs.setdefault("replicas", 2)
    made = api.add_deployment(NS, "chat", ENGINE, **kwargs)
    api.settle()
    return made


def _read(api: KubeApiServer, name: str = "chat") -> Any:
    apps = kubernetes.client.AppsV1Api(kubernetes.client.ApiClient(api.configuration(VIEWER_TOKEN)))
    return apps.read_namespaced_deployment(name, NS)


def test_discovers_agent_pods_and_engine_deployments_only(api: KubeApiServer) -> None:
    agent = {"app.kubernetes.io/name": "wattops-agent"}
    ports = [
        {"name": "agent", "image": "wattops", "ports": [{"name": "http", "containerPort": 9090}]}
    ]
    api.add_pod("wattops", "agent-a", agent, "gpu-1", "10.0.0.11", containers=ports)
    api.add_pod("wattops", "agent-b", agent, "gpu-2", "10.0.0.12", containers=ports)
    api.add_pod("wattops", "other", {"app": "x"}, "gpu-1", "10.0.0.13")
    _deployment(api)
    api.add_deployment(NS, "unrelated", {"app": "web"}, replicas=1)
    api.settle()

    fleet = _fleet(api, VIEWER_TOKEN)
    assert fleet.agent_urls() == ["http://10.0.0.11:9090", "http://10.0.0.12:9090"]
    (chat,) = fleet.deployments()
    assert (chat.namespace, chat.name, chat.precision) == (NS, "chat", "q4_k_m")
    assert (chat.desired, chat.updated, chat.ready, chat.available) == (2, 2, 2, 2)
    assert _fleet(api, VIEWER_TOKEN, namespace="elsewhere").deployments() == []


def test_scale_through_the_scale_subresource(api: KubeApiServer) -> None:
    _deployment(api)
    fleet = _fleet(api)
    view = fleet.scale("chat", 4)
    assert view.desired == 4
    states = list(fleet.follow("chat", timeout_s=10, poll_s=0.05))
    assert states[-1].state == "complete", states
    assert _read(api).status.ready_replicas == 4


def test_precision_rollout_never_drops_below_desired_ready(api: KubeApiServer) -> None:
    # The API server's default strategy (25% / 25%) would take one of 4 replicas down.
    _deployment(api, replicas=4)
    fleet = _fleet(api)
    lowest = [4]
    stop = threading.Event()

    def watch_ready() -> None:
        while not stop.is_set():
            lowest[0] = min(lowest[0], _read(api).status.ready_replicas or 0)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch_ready, daemon=True)
    watcher.start()
    try:
        fleet.set_precision("chat", "q8_0")
        states = list(fleet.follow("chat", timeout_s=20, poll_s=0.05))
    finally:
        stop.set()
        watcher.join()
    assert states[-1].state == "complete", states
    assert any(s.state == "progressing" for s in states)
    assert lowest[0] >= 4
    obj = _read(api)
    rolling = obj.spec.strategy.rolling_update
    assert (rolling.max_unavailable, rolling.max_surge) in ((0, 1), (0, "25%"))
    first = obj.spec.template.spec.containers[0]
    env = {e.name: e.value for e in first.env}
    # A strategic merge by name: the precision changed, the other variable and container stayed.
    assert env == {"WATTOPS_PRECISION": "q8_0", "LLAMA_ARG_CTX_SIZE": "4096"}
    assert [c.name for c in obj.spec.template.spec.containers] == ["server", "sidecar"]
    assert fleet.deployments()[0].precision == "q8_0"


def test_a_crash_looping_precision_fails_the_rollout_and_old_pods_serve(
    api: KubeApiServer,
) -> None:
    _deployment(api, replicas=2)
    api.crash_when(lambda c: any(e.get("value") == "q2_k" for e in c.get("env", [])))
    fleet = _fleet(api)
    fleet.set_precision("chat", "q2_k")
    states = list(fleet.follow("chat", timeout_s=20, poll_s=0.05))
    assert states[-1].state == "failed", states
    assert "CrashLoopBackOff" in states[-1].message
    assert _read(api).status.ready_replicas == 2  # maxUnavailable 0: the old ones still serve


def test_progress_deadline_exceeded_ends_the_rollout() -> None:
    with KubeApiServer(ready_after_s=30) as api:
        api.add_deployment(
            NS, "chat", ENGINE, containers=_engine(), replicas=1, progress_deadline_seconds=1
        )
        fleet = _fleet(api)
        fleet.set_precision("chat", "q8_0")
        states = list(fleet.follow("chat", timeout_s=20, poll_s=0.1))
        assert states[-1].state == "failed", states
        assert states[-1].message.startswith("ProgressDeadlineExceeded")


def test_rbac_refusal_names_verb_resource_and_namespace(api: KubeApiServer) -> None:
    _deployment(api)
    fleet = _fleet(api, VIEWER_TOKEN)
    with pytest.raises(KubeError, match=r"may not patch deployments/scale in namespace ml"):
        fleet.scale("chat", 5)
    with pytest.raises(KubeError, match=r"may not patch deployments in namespace ml"):
        fleet.set_precision("chat", "q8_0")
    obj = _read(api)
    assert obj.spec.replicas == 2  # nothing changed
    assert obj.spec.template.spec.containers[0].env[0].value == "q4_k_m"


def test_unknown_deployment_and_bad_precision_are_named(api: KubeApiServer) -> None:
    _deployment(api)
    with pytest.raises(KubeError, match=r"deployment 'nope' not found in any namespace"):
        _fleet(api).scale("nope", 1)
    with pytest.raises(KubeError, match=r"deployment 'nope' not found in namespace ml"):
        _fleet(api, namespace=NS).scale("nope", 1)
    with pytest.raises(KubeError, match=r"unknown precision 'q3_turbo'; allowed: f32"):
        _fleet(api).set_precision("chat", "q3_turbo")


def test_a_stale_write_is_retried_on_the_fresh_object(api: KubeApiServer) -> None:
    _deployment(api)
    fleet = _fleet(api)
    other = kubernetes.client.AppsV1Api(
        kubernetes.client.ApiClient(api.configuration(OPERATOR_TOKEN))
    )
    real_patch = fleet.apps.patch_namespaced_deployment
    calls: list[int] = []

    def racing_patch(name: str, namespace: str, body: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            # Someone else writes between our read and our write: our resourceVersion is stale.
            other.patch_namespaced_deployment(
                name, namespace, {"metadata": {"annotations": {"who": "someone-else"}}}
            )
        return real_patch(name, namespace, body, **kwargs)

    fleet.apps.patch_namespaced_deployment = racing_patch  # type: ignore[method-assign]
    view = fleet.set_precision("chat", "q8_0")
    assert len(calls) == 2  # the first got 409 Conflict, the second went through
    assert view.precision == "q8_0"
    assert _read(api).metadata.annotations["who"] == "someone-else"  # their write survived


def _kubeconfig(tmp_path: Path, api: KubeApiServer, token: str) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
                "users": [{"name": "me", "user": {"token": token}}],
                "contexts": [
                    {"name": "ops", "context": {"cluster": "standin", "user": "me"}},
                    {
                        "name": "ops-ml",
                        "context": {"cluster": "standin", "user": "me", "namespace": NS},
                    },
                ],
                "current-context": "ops",
            }
        )
    )
    return path


def _cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(argv)
    return int(exit_info.value.code or 0)


def test_cli_scale_and_precision_with_kubeconfig(
    api: KubeApiServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _deployment(api)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, api, OPERATOR_TOKEN)))
    assert _cli(["scale", "--kube", "--context", "ops-ml", "chat", "3", "--timeout", "20"]) == 0
    out = capsys.readouterr().out
    assert "ml/chat: scale -> 3 accepted" in out and "done: 3 of 3 ready" in out
    assert _cli(["precision", "--kube", "chat", "q8_0", "--timeout", "20"]) == 0
    assert "done:" in capsys.readouterr().out
    assert _cli(["precision", "--kube", "chat", "fp3"]) == 2
    assert "unknown precision 'fp3'" in capsys.readouterr().err
    assert _read(api).spec.template.spec.containers[0].env[0].value == "q8_0"


def test_status_kube_finds_a_real_agent_through_the_api(
    api: KubeApiServer,
    agent: Agent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = int(agent.url.rsplit(":", 1)[1])
    ports = [
        {"name": "agent", "image": "wattops", "ports": [{"name": "http", "containerPort": port}]}
    ]
    api.add_pod(
        "wattops",
        "agent-a",
        {"app.kubernetes.io/name": "wattops-agent"},
        "gpu-1",
        "127.0.0.1",
        containers=ports,
    )
    _deployment(api)
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, api, VIEWER_TOKEN)))
    assert _cli(["status", "--kube", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [a["reachable"] for a in data["agents"]] == [True]
    assert data["agents"][0]["snapshot"]["deployments"][0]["name"] == "tiny"
    assert [(d["name"], d["ready"], d["precision"]) for d in data["deployments"]] == [
        ("chat", 2, "q4_k_m")
    ]
