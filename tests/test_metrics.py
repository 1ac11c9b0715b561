"""The agent's /metrics: counters keep one label set for life, so Prometheus can sum them.

A precision switch or a sensor falling back to the estimate used to move a running total to a
new series (the precision and the source were labels of the counters): `rate()` then saw a
reset and sums by precision counted the same tokens and joules twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import TOKEN, Agent, wait_for
from tests.test_grafana_dashboard import full_snapshot
from wattops.agents.api import Totals
from wattops.agents.metrics import registry_for

Series = tuple[str, tuple[tuple[str, str], ...]]


def counters(text: str) -> dict[Series, float]:
    """Every counter sample of an exposition, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def info(text: str) -> Iterator[dict[str, str]]:
    for family in text_string_to_metric_families(text):
        if family.name == "wattops_deployment_info":
            for sample in family.samples:
                yield sample.labels


def test_a_precision_switch_leaves_every_counter_series_monotone(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(token=TOKEN)
    for i in range(3):
        assert agent.chat(f"before {i}", temperature=0.7).status_code == 200
    wait_for(lambda: agent.deployment()["counters"]["completion_tokens_total"] > 0, 30,
             "tokens counted")  # fmt: skip
    before_text = agent.client.get("/metrics").text
    before = counters(before_text)
    assert [i["precision"] for i in info(before_text)] == ["q8_0"]
    assert agent.control("/v1/deployments/tiny/precision", {"precision": "q4_0"}).status_code == 202
    agent.wait_converged("tiny")
    assert agent.deployment()["precision"] == "q4_0"
    for i in range(3):
        assert agent.chat(f"after {i}", temperature=0.7).status_code == 200
    labels = (("deployment", "tiny"), ("kind", "completion"), ("node", "test-node-0"))
    tokens = ("wattops_deployment_tokens_total", labels)
    # The engine's token counters are read a moment after each answer.
    after_text = wait_for(
        lambda: (t := agent.client.get("/metrics").text) and counters(t)[tokens] > before[tokens]
        and t, 30, "the tokens served after the switch",
    )  # fmt: skip
    after = counters(after_text)
    assert [i["precision"] for i in info(after_text)] == ["q4_0"]
    deployment_series = [s for s in before if s[0].startswith("wattops_deployment_")]
    assert deployment_series, "no deployment counters before the switch"
    for series, value in before.items():
        assert series in after, f"{series} vanished after the switch"
        assert after[series] >= value, f"{series} went back: {value} -> {after[series]}"


def test_energy_is_split_by_kind_and_never_moves_with_the_source() -> None:
    snap = full_snapshot()
    dep = snap.deployments[0]
    assert dep.accounting is not None
    dep.accounting.totals = Totals(energy_j_total=100.0, estimated_energy_j_total=30.0)
    dep.accounting.energy_source = "nvml"
    first = counters(generate_latest(registry_for(lambda: snap)).decode())
    # The sensor fails over to the estimate: 50 J more, all estimated.
    dep.accounting.totals = Totals(energy_j_total=150.0, estimated_energy_j_total=80.0)
    dep.accounting.energy_source = "estimate"
    second = counters(generate_latest(registry_for(lambda: snap)).decode())
    energy = {s: v for s, v in second.items() if s[0] == "wattops_deployment_energy_joules_total"}
    assert set(energy) == {s for s in first if s[0] == "wattops_deployment_energy_joules_total"}
    by_kind = {dict(labels)["kind"]: value for (_, labels), value in energy.items()}
    assert by_kind == {"measured": 70.0, "estimated": 80.0}
    assert {dict(labels)["kind"]: v for (n, labels), v in first.items()
            if n == "wattops_deployment_energy_joules_total"} == {"measured": 70.0,
                                                                  "estimated": 30.0}  # fmt: skip
