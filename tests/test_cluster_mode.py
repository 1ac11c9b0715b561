"""The agent's cluster mode: engine pods on its node, found through the Kubernetes API,
scraped and accounted for, and reported as Kubernetes-managed.

The API server is tests/kube_apiserver.py, a stand-in on loopback (its docstring says which
behaviour of the real server each part copies). The "pods" are listed through it, but what
serves behind their address is real: a wattops llama.cpp worker on the test model at
127.0.0.1, as an engine container would be at its pod IP.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client

from tests.conftest import ROOT, Agent, free_port, wait_for
from tests.kube_apiserver import KubeApiServer, cluster_role_from_manifest
from wattops.agents.api import ReplicaState
from wattops.agents.cluster import PodReplica
from wattops.agents.config import KubernetesSection
from wattops.agents.pods import ClusterError, PodLister, engine_pod
from wattops.engines.base import Replica
from wattops.engines.metrics import EngineUsage

NS = "llm"
NODE = "test-node-0"  # make_agent's first agent calls its node this
HASH = "5d8f7c9b6"
LABELS = {
    "app.kubernetes.io/part-of": "wattops",
    "app.kubernetes.io/name": "tiny-chat",
    "pod-template-hash": HASH,
}
#: What deploy/kubernetes/base/agent-rbac.yaml grants the agent's ServiceAccount, read from it.
AGENT_ROLE = cluster_role_from_manifest(
    ROOT / "deploy" / "kubernetes" / "base" / "agent-rbac.yaml", "wattops-agent"
)
AGENT_TOKEN = "wattops-agent-sa-token"


def _container(port: int, precision: str = "q8_0") -> dict[str, Any]:
    return {
        "name": "server",
        "image": "ghcr.io/example/llama-server:b4000",
        "env": [{"name": "WATTOPS_PRECISION", "value": precision}],
        "ports": [{"name": "http", "containerPort": port}],
        "resources": {"requests": {"cpu": "1", "memory": "64Mi"}},
    }


@pytest.fixture
def api() -> Iterator[KubeApiServer]:
    with KubeApiServer(nodes=(NODE, "other-node")) as server:
        server.add_user("agent", AGENT_TOKEN)
        server.bind("agent", AGENT_ROLE)
        yield server


@pytest.fixture
def engine_port(test_model: Path) -> Iterator[int]:
    """A real OpenAI-compatible engine (wattops's llama.cpp worker) on loopback."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "wattops.engines.llamacpp_worker",
        "--model",
        str(test_model),
        "--port",
        str(port),
        "--name",
        "tiny-chat",
        "--precision",
        "q8_0",
        "--ctx",
        "512",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(url + "/health").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 60, "engine worker")
    yield port
    proc.terminate()
    proc.wait(10)


def _lister(api: KubeApiServer, tmp_path: Path, token: str, **section: Any) -> PodLister:
    kubeconfig = api.write_kubeconfig(tmp_path / f"kubeconfig-{token}", token)
    return PodLister(KubernetesSection(enabled=True, kubeconfig=kubeconfig, **section), NODE)


def test_lists_only_engine_pods_on_its_own_node(api: KubeApiServer, tmp_path: Path) -> None:
    api.add_pod(NS, f"tiny-chat-{HASH}-x1", LABELS, NODE, "10.0.0.7",
                containers=[_container(8000)], replica_set=f"tiny-chat-{HASH}")  # fmt: skip
    api.add_pod(NS, f"tiny-chat-{HASH}-y2", LABELS, "other-node", "10.0.1.9",
                containers=[_container(8000)], replica_set=f"tiny-chat-{HASH}")  # fmt: skip
    api.add_pod("wattops", "agent-abc", {"app.kubernetes.io/name": "wattops-agent"}, NODE,
                "10.0.0.2")  # fmt: skip
    # A bare pod (no ReplicaSet) is named by its app.kubernetes.io/name label.
    bare = {"app.kubernetes.io/part-of": "wattops", "app.kubernetes.io/name": "embedder"}
    api.add_pod("other", "embedder-0", bare, NODE, "10.0.0.8",
                containers=[_container(9000, "f16")], ready=False)  # fmt: skip

    pods = {p.name: p for p in _lister(api, tmp_path, AGENT_TOKEN).list()}

    assert set(pods) == {f"tiny-chat-{HASH}-x1", "embedder-0"}
    chat = pods[f"tiny-chat-{HASH}-x1"]
    assert (chat.namespace, chat.deployment, chat.precision) == (NS, "tiny-chat", "q8_0")
    assert chat.url == "http://10.0.0.7:8000" and chat.ready
    assert chat.memory_bytes == 64 * 2**20 and chat.cpu_threads == 1
    embedder = pods["embedder-0"]
    assert (embedder.deployment, embedder.precision, embedder.ready) == ("embedder", "f16", False)
    # Narrowed to one namespace.
    narrowed = _lister(api, tmp_path, AGENT_TOKEN, namespace="other").list()
    assert [p.name for p in narrowed] == ["embedder-0"]


def test_rbac_refusal_and_an_unreachable_server_are_named(
    api: KubeApiServer, tmp_path: Path
) -> None:
    api.add_user("nobody", "no-rights")
    with pytest.raises(ClusterError, match=r"RBAC: the agent may not list pods in all namespaces"):
        _lister(api, tmp_path, "no-rights").list()
    lister = _lister(api, tmp_path, AGENT_TOKEN)
    api.stop()
    with pytest.raises(ClusterError, match="cannot reach the Kubernetes API server at http://"):
        lister.list()


def test_a_pod_object_becomes_an_engine_pod() -> None:
    """Fields the stand-in does not produce: termination, limits only, a crash loop."""
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(
            name="chat-7f-abc",
            namespace=NS,
            uid="u1",
            labels={"pod-template-hash": "7f"},
            owner_references=[
                client.V1OwnerReference(
                    api_version="apps/v1", kind="ReplicaSet", name="chat-7f", uid="rs"
                )
            ],
            creation_timestamp=datetime(2026, 11, 21, tzinfo=UTC),
            deletion_timestamp=datetime(2026, 11, 21, 0, 5, tzinfo=UTC),
        ),
        spec=client.V1PodSpec(
            containers=[
                client.V1Container(
                    name="server",
                    image="vllm/vllm-openai:v0.9",
                    ports=[client.V1ContainerPort(name="http", container_port=8000)],
                    resources=client.V1ResourceRequirements(
                        limits={"cpu": "2500m", "memory": "2Gi"}
                    ),
                )
            ]
        ),
        status=client.V1PodStatus(
            phase="Running",
            pod_ip="fd00::7",
            container_statuses=[
                client.V1ContainerStatus(
                    name="server",
                    image="vllm/vllm-openai:v0.9",
                    image_id="",
                    ready=False,
                    restart_count=4,
                    state=client.V1ContainerState(
                        waiting=client.V1ContainerStateWaiting(reason="CrashLoopBackOff")
                    ),
                )
            ],
        ),
    )
    made = engine_pod(pod, "http")
    assert made is not None
    assert (made.deployment, made.precision, made.url) == (
        "chat",
        "unknown",
        "http://[fd00::7]:8000",
    )
    assert made.terminating and not made.ready
    assert (made.memory_bytes, made.cpu_threads) == (2 * 2**30, 3)
    assert (made.restarts, made.waiting_reason) == (4, "CrashLoopBackOff")
    pod.status.phase = "Succeeded"
    assert engine_pod(pod, "http") is None


READY = ReplicaState.READY


def test_busy_time_comes_from_the_engine() -> None:
    # Pods seen Ready (a starting one would count its start-up as busy too).
    live = PodReplica(Replica(id="p", precision="q8_0", url="http://x"), state=READY)
    live.busy_counter = 0.0  # a pod created after the agent: its counter counts from zero
    live.observe(EngineUsage(busy_seconds=2.0), now=10.0)
    live.observe(EngineUsage(busy_seconds=5.5), now=11.0)
    assert live.busy_seconds(12.0) == 5.5
    live.observe(EngineUsage(busy_seconds=1.0), now=12.0)  # container restarted
    assert live.busy_seconds(13.0) == 6.5
    # An engine with only a requests-in-flight gauge: busy from a scrape that saw work
    # to the next scrape.
    sampled = PodReplica(Replica(id="q", precision="q8_0", url="http://x"), state=READY)
    sampled.observe(EngineUsage(in_flight=0), now=1.0)
    sampled.observe(EngineUsage(in_flight=2), now=2.0)
    sampled.observe(EngineUsage(in_flight=1), now=3.5)
    sampled.observe(EngineUsage(in_flight=0), now=4.0)
    sampled.observe(EngineUsage(in_flight=0), now=9.0)
    assert sampled.busy_seconds(9.0) == pytest.approx(2.0)
    # One that reports neither: the requests routed through the agent.
    silent = PodReplica(Replica(id="r", precision="q8_0", url="http://x"), state=READY)
    silent.observe(EngineUsage(prompt_tokens=3), now=1.0)
    silent.take()
    assert silent.busy_seconds(silent.busy_since + 1.5) == pytest.approx(1.5)
    # Its engine starts reporting: busy time goes on from there, never backwards.
    silent.observe(EngineUsage(busy_seconds=0.0), now=silent.busy_since + 2.0)
    assert silent.busy_seconds(silent.busy_since + 3.0) == pytest.approx(2.0)


def _chat(url: str, model: str, content: str) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": 8,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    }
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60)


def test_agent_accounts_for_engine_pods_on_its_node(
    api: KubeApiServer,
    engine_port: int,
    make_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    kubeconfig = api.write_kubeconfig(tmp_path / "agent-kubeconfig", AGENT_TOKEN)
    agent = make_agent(
        deployments=[],
        token="op-token",
        tables={"kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig), "poll_s": 0.2}},
        start=False,
    ).start(wait_ready=False)
    pod = f"tiny-chat-{HASH}-a1"
    api.add_pod(NS, pod, LABELS, NODE, "127.0.0.1", containers=[_container(engine_port)],
                replica_set=f"tiny-chat-{HASH}")  # fmt: skip

    def found() -> dict[str, Any] | None:
        deps = {d["name"]: d for d in agent.node()["deployments"]}
        dep = deps.get("tiny-chat")
        return dep if dep and dep["ready_replicas"] == 1 else None

    dep = wait_for(found, 20, "the engine pod in the snapshot")
    assert (dep["managed_by"], dep["namespace"], dep["precision"]) == ("kubernetes", NS, "q8_0")
    assert dep["model"] == "ghcr.io/example/llama-server:b4000"
    assert [r["id"] for r in dep["replicas"]] == [pod]

    # Traffic that reaches the pod through its Service, not through the agent, is counted
    # from the engine's own metrics, and its busy time draws active energy.
    engine_url = f"http://127.0.0.1:{engine_port}"
    for i in range(3):
        assert _chat(engine_url, "tiny-chat", f"straight to the pod {i}").status_code == 200

    def counted() -> dict[str, Any] | None:
        dep = found()
        if dep is None or dep["counters"]["completion_tokens_total"] == 0:
            return None
        return dep if dep["accounting"]["totals"]["active_energy_j_total"] > 0 else None

    dep = wait_for(counted, 20, "tokens and active energy from the engine's metrics")
    assert dep["counters"]["prompt_tokens_total"] > 0
    assert dep["accounting"]["share"] > 0  # the pod's requests hold part of the node
    assert dep["accounting"]["totals"]["cost_usd_total"] > 0
    assert dep["counters"]["requests_total"] == 0  # none came through the agent

    # The agent's own endpoint routes to the Ready pods on its node.
    assert _chat(agent.url, "tiny-chat", "through the agent").status_code == 200

    # Control belongs to Kubernetes.
    refused = agent.control("/v1/deployments/tiny-chat/scale", {"replicas": 2}, "op-token")
    assert refused.status_code == 409
    assert refused.json()["error"] == "managed_by_kubernetes"
    assert "wattops scale tiny-chat 2 --kube -n llm" in refused.json()["message"]

    # A rollout to f16: a new pod, not ready yet, beside the old one.
    new_hash = "6c4b9d7f8"
    new_pod = f"tiny-chat-{new_hash}-b2"
    api.add_pod(NS, new_pod, {**LABELS, "pod-template-hash": new_hash}, NODE, "127.0.0.1",
                containers=[_container(engine_port, "f16")], ready=False,
                replica_set=f"tiny-chat-{new_hash}")  # fmt: skip
    dep = wait_for(
        lambda: (d := found()) and d["state"] == "switching" and d,
        20,
        "the rollout seen as a precision switch",
    )
    assert (dep["precision"], dep["desired_precision"]) == ("q8_0", "f16")
    api.set_pod_ready(NS, new_pod, True)
    api.delete_pod(NS, pod)
    dep = wait_for(
        lambda: (d := found()) and d["state"] == "serving" and d["precision"] == "f16" and d,
        20,
        "the rollout finished",
    )
    assert [r["id"] for r in dep["replicas"]] == [new_pod]

    # Not ready: requests through the agent get 503 at once, nothing is woken.
    api.set_pod_ready(NS, new_pod, False)
    wait_for(lambda: (d := agent.deployment("tiny-chat")) and d["ready_replicas"] == 0, 20)
    unready = _chat(agent.url, "tiny-chat", "nobody home")
    assert unready.status_code == 503 and "no Ready pod" in unready.text

    # No pods left: the deployment leaves the snapshot, its totals stay in the state file.
    tokens = agent.deployment("tiny-chat")["counters"]["completion_tokens_total"]
    api.delete_pod(NS, new_pod)
    wait_for(
        lambda: all(d["name"] != "tiny-chat" for d in agent.node()["deployments"]),
        20,
        "the deployment to leave",
    )
    agent.stop()
    saved = json.loads((agent.state_dir / "state.json").read_text())
    assert saved["deployments"]["tiny-chat"]["counters"]["completion_tokens_total"] == tokens


def test_an_unlistable_cluster_raises_an_alert(
    api: KubeApiServer, make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    api.add_user("nobody", "no-rights")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", "no-rights")
    agent = make_agent(
        deployments=[],
        tables={"kubernetes": {"enabled": True, "kubeconfig": str(kubeconfig), "poll_s": 0.2}},
        start=False,
    ).start(wait_ready=False)

    def alert() -> dict[str, Any] | None:
        return next((a for a in agent.node()["alerts"] if a["kind"] == "cluster_unreachable"), None)

    found = wait_for(alert, 20, "the cluster alert")
    assert "RBAC" in found["detail"] and found["subject"] == NODE
