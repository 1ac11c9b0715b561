"""Canaries on Kubernetes (fleet/kube_canary.py): a second Deployment beside the first,
against the stand-in API server (tests/kube_apiserver.py: its docstring says which behaviour
of the real one each part copies, create and delete of Deployments and the garbage collection
of their pods included) through the real kubernetes client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from tests.conftest import ROOT, Agent
from tests.kube_apiserver import (
    OPERATOR_TOKEN,
    WATTOPS_OPERATOR,
    KubeApiServer,
    cluster_role_from_manifest,
)
from tests.test_kube import ENGINE, NS, _cli, _engine, _kubeconfig
from wattops.agents.api import CanaryGuards
from wattops.fleet.kube import KubeError, KubeFleet
from wattops.fleet.kube_canary import (
    CANARY_LABEL,
    KubeCanary,
    SideTotals,
    canary_replicas,
    judge,
)

CANARY_TOKEN = "wattops-canary-token"
#: The role as the package's manifest declares it.
CANARY_ROLE = cluster_role_from_manifest(
    ROOT / "deploy/kubernetes/base/operator-rbac.yaml", "wattops-canary"
)
OFF = CanaryGuards(max_j_per_token_change=None)


@pytest.fixture
def api() -> Any:
    with KubeApiServer(ready_after_s=0.15, nodes=("gpu-1", "gpu-2")) as server:
        server.add_user("canary", CANARY_TOKEN)
        server.bind("canary", WATTOPS_OPERATOR)
        server.bind("canary", CANARY_ROLE)
        server.add_deployment(NS, "chat", ENGINE, containers=_engine("q8_0"), replicas=3)
        server.settle()
        yield server


def fleet(api: KubeApiServer, token: str = CANARY_TOKEN) -> KubeFleet:
    return KubeFleet(api_client=kubernetes.client.ApiClient(api.configuration(token)))


def pods(api: KubeApiServer, selector: dict[str, str]) -> list[Any]:
    core = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(api.configuration(
        CANARY_TOKEN)))  # fmt: skip
    text = ",".join(f"{k}={v}" for k, v in selector.items())
    return list(core.list_namespaced_pod(NS, label_selector=text).items)


def test_canary_pods_for_a_share_of_a_service_split_by_pods() -> None:
    assert canary_replicas(0.25, 3) == 1  # 1 of 4 pods: 25%
    assert canary_replicas(0.1, 9) == 1  # 1 of 10
    assert canary_replicas(0.5, 4) == 4
    assert canary_replicas(0.01, 2) == 1  # never none
    with pytest.raises(ValueError, match="between 0 and 1"):
        canary_replicas(1.0, 2)


def test_the_verdict_follows_the_energy_guard_and_says_what_it_did_not_measure() -> None:
    def side(name: str, tokens: int, joules: float) -> tuple[SideTotals, SideTotals]:
        return SideTotals(name, 3, 0, 0.0, 0.0), SideTotals(name, 3, tokens, joules, tokens * 1e-6)

    guards = CanaryGuards()  # J/token not worse
    better = judge(side("chat", 1000, 100.0), side("chat-canary", 400, 30.0), guards, None)
    assert better[0] == "promoted" and better[1].startswith("promoted: J/token -25.0%")
    assert "probes, KL, answer agreement and p95 not measured on Kubernetes" in better[1]
    worse = judge(side("chat", 1000, 100.0), side("chat-canary", 400, 48.0), guards, None)
    assert worse[0] == "rolled_back" and "J/token +20.0% > +0.0%" in worse[1]
    unseen = judge(side("chat", 1000, 100.0), side("chat-canary", 0, 0.0), guards, None)
    assert unseen[0] == "inconclusive" and "0 tokens on the canary" in unseen[1]
    assert judge(side("chat", 0, 0.0), side("chat-canary", 0, 0.0), OFF, None)[0] == "promoted"
    sick = judge(side("chat", 1, 1.0), side("c", 1, 1.0), OFF, "pod x is CrashLoopBackOff")
    assert sick == ("rolled_back", "rolled back: pod x is CrashLoopBackOff")


def test_a_canary_deployment_is_promoted_by_patching_the_first_and_deleting_itself(
    api: KubeApiServer,
) -> None:
    trial = KubeCanary(fleet(api), "chat", "q4_k_m", 0.25, 0.5, OFF, snapshots=list)
    made = trial.start()
    assert (made.name, made.desired, made.precision) == ("chat-canary", 1, "q4_k_m")
    apps = fleet(api).apps
    canary = apps.read_namespaced_deployment("chat-canary", NS)
    # The first one's labels, plus the canary label, on the Deployment, selector and pods.
    assert canary.metadata.labels == {**ENGINE, CANARY_LABEL: "chat"}
    assert canary.spec.selector.match_labels == {**ENGINE, CANARY_LABEL: "chat"}
    assert canary.spec.template.metadata.labels == {**ENGINE, CANARY_LABEL: "chat"}
    env = {e.name: e.value for e in canary.spec.template.spec.containers[0].env}
    assert env == {"WATTOPS_PRECISION": "q4_k_m", "LLAMA_ARG_CTX_SIZE": "4096"}
    api.settle()
    # What a Service selecting the first Deployment's pods now sends traffic to: 3 + 1.
    assert len(pods(api, ENGINE)) == 4 and len(pods(api, {CANARY_LABEL: "chat"})) == 1
    with pytest.raises(KubeError, match="chat-canary already exists in namespace ml"):
        KubeCanary(fleet(api), "chat", "q4_k_m", 0.25, 0.5, OFF).start()
    said: list[str] = []
    state, verdict = trial.run(said.append, poll_s=0.05)
    assert state == "promoted" and verdict.startswith("promoted: J/token guard off")
    main = apps.read_namespaced_deployment("chat", NS)
    assert main.spec.template.spec.containers[0].env[0].value == "q4_k_m"
    names = [d.metadata.name for d in apps.list_namespaced_deployment(NS).items]
    assert names == ["chat"]
    api.settle()
    assert not pods(api, {CANARY_LABEL: "chat"})  # its pods went with it
    assert any("promoting q4_k_m" in line for line in said)


def test_a_crash_looping_canary_is_rolled_back_and_nothing_else_changes(
    api: KubeApiServer,
) -> None:
    api.crash_when(lambda c: any(e.get("value") == "q2_k" for e in c.get("env", [])))
    trial = KubeCanary(fleet(api), "chat", "q2_k", 0.25, 30.0, OFF, snapshots=list)
    trial.start()
    state, verdict = trial.run(lambda _: None, poll_s=0.05, ready_timeout_s=20)
    assert state == "rolled_back" and "CrashLoopBackOff" in verdict, verdict
    apps = fleet(api).apps
    assert [d.metadata.name for d in apps.list_namespaced_deployment(NS).items] == ["chat"]
    main = apps.read_namespaced_deployment("chat", NS)
    assert main.spec.template.spec.containers[0].env[0].value == "q8_0"


def test_without_the_canary_role_the_refusal_names_it(api: KubeApiServer) -> None:
    with pytest.raises(KubeError, match=r"RBAC refused: you may not create deployments.*"
                       r"wattops-canary"):  # fmt: skip
        KubeCanary(fleet(api, OPERATOR_TOKEN), "chat", "q4_k_m", 0.25, 1.0, OFF).start()
    with pytest.raises(KubeError, match="already serves q8_0"):
        KubeCanary(fleet(api), "chat", "q8_0", 0.25, 1.0, OFF).start()


def test_the_cli_runs_a_kube_canary_reading_the_real_agents(
    api: KubeApiServer, agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """With the default guards the agents must have measured both Deployments: the real agent
    here (an agent pod of the DaemonSet, at 127.0.0.1) serves no engine pod of `chat`, so the
    verdict is inconclusive and the canary is removed: never a silent promote."""
    port = int(agent.url.rsplit(":", 1)[1])
    agent_pod = [{"name": "agent", "image": "wattops",
                  "ports": [{"name": "http", "containerPort": port}]}]  # fmt: skip
    api.add_pod("wattops", "agent-a", {"app.kubernetes.io/name": "wattops-agent"}, "gpu-1",
                "127.0.0.1", containers=agent_pod)  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path, api, CANARY_TOKEN)))
    code = _cli(["precision", "--kube", "chat", "q4_k_m", "--canary", "25%", "--for", "5s"])
    out, err = capsys.readouterr()
    assert code == 1, (out, err)
    assert "ml/chat-canary: 1 pod(s) at q4_k_m beside chat's" in out
    assert "inconclusive: J/token not measured on both sides" in err
    apps = fleet(api).apps
    assert [d.metadata.name for d in apps.list_namespaced_deployment(NS).items] == ["chat"]
    assert _cli(["precision", "--kube", "chat", "q4_k_m", "--canary", "25%", "--no-wait"]) == 2
    assert "must stay to judge it" in capsys.readouterr().err


def test_an_interrupted_canary_deletes_itself(api: KubeApiServer) -> None:
    """Ctrl-C (or SIGTERM, which the CLI maps to it) during the window: the canary Deployment
    is deleted before the interruption goes on, so nothing is left holding a share."""
    trial = KubeCanary(fleet(api), "chat", "q4_k_m", 0.25, 60.0, OFF, snapshots=list)
    trial.start()
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if len(said) == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trial.run(say, poll_s=0.05)
    apps = fleet(api).apps
    assert [d.metadata.name for d in apps.list_namespaced_deployment(NS).items] == ["chat"]
    assert said[-1] == "interrupted: chat-canary deleted (rolled back)"
