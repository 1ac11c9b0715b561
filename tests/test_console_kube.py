"""`wattops console --kube`: Kubernetes Deployments as rows, acted on through the API server.

The API server is tests/kube_apiserver.py, a stand-in on loopback whose deployment controller
rolls pods over time (its docstring says which behaviour of the real one each part copies);
the console is driven by its keys through Textual's Pilot.
"""

from __future__ import annotations

from typing import Any

import kubernetes.client

from tests.kube_apiserver import OPERATOR_TOKEN, VIEWER_TOKEN, KubeApiServer
from tests.test_console import SIZE, until
from wattops.console.app import WattopsConsole, make_app
from wattops.console.screens.modals import ConfirmModal, PrecisionModal
from wattops.fleet.kube import KubeFleet
from wattops.fleet.rows import FleetRow, Link, kube_rows

NS = "ml"
LABELS = {"app.kubernetes.io/part-of": "wattops", "app.kubernetes.io/name": "chat"}


def _containers(precision: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "server",
            "image": "ghcr.io/ggml-org/llama.cpp:server",
            "env": [{"name": "WATTOPS_PRECISION", "value": precision}],
        }
    ]


def _fleet(api: KubeApiServer, token: str = OPERATOR_TOKEN) -> KubeFleet:
    return KubeFleet(api_client=kubernetes.client.ApiClient(api.configuration(token)))


def _row(app: WattopsConsole) -> FleetRow | None:
    return next((r for r in app.fleet_screen.last_rows if r.key == f"kube|{NS}/chat"), None)


def _notes(app: WattopsConsole) -> list[tuple[str, str]]:
    """Record (title, message) of every notification the app shows."""
    seen: list[tuple[str, str]] = []
    original = app.notify

    def notify(message: str, **kwargs: Any) -> None:
        seen.append((str(kwargs.get("title", "")), message))
        original(message, **kwargs)

    app.notify = notify  # type: ignore[method-assign]
    return seen


async def _choose_precision(app: WattopsConsole, pilot: Any, precision: str) -> str:
    await pilot.press("p")
    modal = await until(pilot, lambda: isinstance(app.screen, PrecisionModal) and app.screen,
                        5, "the precision modal")  # fmt: skip
    options = modal.query_one("#precisions")
    ids = [options.get_option_at_index(i).id for i in range(options.option_count)]
    options.highlighted = ids.index(precision)
    await pilot.press("enter")
    confirm = await until(pilot, lambda: isinstance(app.screen, ConfirmModal) and app.screen,
                          5, "the confirmation")  # fmt: skip
    question = str(confirm.query_one(".title").render())
    await pilot.press("y")
    return question


async def test_console_scales_and_rolls_a_kubernetes_deployment() -> None:
    with KubeApiServer(ready_after_s=0.3, nodes=("gpu-1", "gpu-2")) as api:
        api.add_deployment(NS, "chat", LABELS, containers=_containers("q4_k_m"), replicas=2)
        api.settle()
        app = make_app([], token="unused", kube=_fleet(api), refresh_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            notes = _notes(app)
            row = await until(pilot, lambda: _row(app), 10, "the Deployment's row")
            assert (row.node, row.precision, row.state) == ("k8s/ml", "q4_k_m", "serving")
            assert (row.ready, row.desired, row.updated, row.available) == (2, 2, 2, 2)

            # + scales through the scale subresource; the row follows the controller.
            await pilot.press("plus")
            await until(pilot, lambda: (r := _row(app)) and r.ready == 3 and r.available == 3
                        and not app.fleet_screen.pending, 20, "three ready pods")  # fmt: skip
            assert ("done", f"{NS}/chat: 3 of 3 ready and updated") in notes

            # p rolls the pod template; the rollout never drops below 3 ready pods.
            question = await _choose_precision(app, pilot, "q8_0")
            assert "from q4_k_m to q8_0" in question
            lowest = 3

            def rolled() -> bool:
                nonlocal lowest
                r = _row(app)
                if r is not None and r.desired == 3:
                    lowest = min(lowest, r.ready)
                return bool(r and r.desired_precision == "q8_0" and r.state == "serving"
                            and not app.fleet_screen.pending)  # fmt: skip

            await until(pilot, rolled, 30, "the rollout to finish")
            assert lowest == 3
            apps = kubernetes.client.AppsV1Api(
                kubernetes.client.ApiClient(api.configuration(VIEWER_TOKEN))
            )
            deployment = apps.read_namespaced_deployment("chat", NS)
            assert deployment.spec.template.spec.containers[0].env[0].value == "q8_0"
            assert any(t == "done" for t, _ in notes[-2:])

            # A precision whose pods crash-loop: the rollout fails with the reason and the way
            # back, and the old pods keep serving.
            api.crash_when(lambda c: c["env"][0]["value"] == "f16")
            await _choose_precision(app, pilot, "f16")
            failed = await until(
                pilot, lambda: next((m for t, m in notes if t == "failed"), None), 30,
                "the rollout to fail",
            )  # fmt: skip
            assert "CrashLoopBackOff" in failed
            assert f"kubectl -n {NS} rollout undo deployment/chat" in failed
            assert not app.fleet_screen.pending
            assert _row(app).ready == 3  # type: ignore[union-attr]


async def test_rbac_refusal_is_shown_and_nothing_changes() -> None:
    with KubeApiServer(ready_after_s=0.1) as api:
        api.add_deployment(NS, "chat", LABELS, containers=_containers("q4_k_m"), replicas=1)
        api.settle()
        app = make_app([], kube=_fleet(api, VIEWER_TOKEN), refresh_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            notes = _notes(app)
            await until(pilot, lambda: _row(app), 10, "the Deployment's row")
            await pilot.press("plus")
            refused = await until(
                pilot, lambda: next((m for t, m in notes if t == "failed"), None), 10,
                "the refusal",
            )  # fmt: skip
            assert "RBAC refused: you may not patch deployments/scale in namespace ml" in refused
            assert not app.fleet_screen.pending
        apps = kubernetes.client.AppsV1Api(
            kubernetes.client.ApiClient(api.configuration(VIEWER_TOKEN))
        )
        assert apps.read_namespaced_deployment("chat", NS).spec.replicas == 1


def test_deployment_rows_add_up_the_agents_rows_of_their_pods() -> None:
    from wattops.fleet.kube import KubeDeployment

    view = KubeDeployment(NS, "chat", "q8_0", desired=3, updated=1, ready=3, available=3,
                          generation=2, observed_generation=2, resource_version="7")  # fmt: skip

    def pod_row(node: str, watts: float, precision: str, link: Link = Link.LIVE) -> FleetRow:
        return FleetRow(key=f"http://{node}|chat", url=f"http://{node}", node=node, link=link,
                        deployment="chat", precision=precision, ready=1, desired=1,
                        watts=watts, usd_per_hour=0.5, tokens_per_s=10.0, p50_s=0.2,
                        namespace=NS)  # fmt: skip

    rows = [
        pod_row("gpu-1", 100.0, "q4_k_m"),
        pod_row("gpu-2", 50.0, "q4_k_m"),
        pod_row("gpu-3", 70.0, "q8_0"),
        pod_row("gpu-4", 999.0, "q4_k_m", Link.OFFLINE),  # not counted: not live
        FleetRow(key="http://gpu-1|tiny", url="http://gpu-1", node="gpu-1", link=Link.LIVE,
                 deployment="chat", watts=5.0),  # the agent's own "chat": not the Deployment's
    ]  # fmt: skip
    (row,) = kube_rows([view], rows)
    assert (row.precision, row.desired_precision, row.state) == ("q4_k_m", "q8_0", "progressing")
    assert (row.watts, row.usd_per_hour, row.tokens_per_s) == (220.0, 1.5, 30.0)
    assert row.p50_s is None  # percentiles of different nodes do not add up
