"""A real Prometheus server (Debian's `prometheus`) scrapes a real agent; the series are read
back with prometheus-api-client, as the console's `--prometheus` history does."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_api_client import PrometheusConnect

from tests.conftest import Agent, free_port, wait_for


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: `make test` installs Debian's package"
    procs: list[subprocess.Popen[bytes]] = []

    def start(agent_port: int) -> str:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: wattops\n"
            f"    static_configs:\n      - targets: ['127.0.0.1:{agent_port}']\n"
        )
        log = (tmp_path / "prometheus.log").open("wb")
        procs.append(
            subprocess.Popen(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=log, stderr=log,
            )
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/-/ready").status_code == 200, 60, "prometheus ready")
        return url

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(30)


def test_prometheus_scrapes_power_cost_and_tokens_from_a_real_agent(
    make_agent: Callable[..., Agent], prometheus: Callable[[int], str]
) -> None:
    agent = make_agent(agent_extra={"profile": "a100-80gb"})
    prom = PrometheusConnect(url=prometheus(agent.port), disable_ssl=True)
    for i in range(4):
        assert agent.chat(f"metric me {i}", temperature=0.6).status_code == 200

    def series(query: str) -> list[dict[str, object]]:
        return prom.custom_query(query)  # type: ignore[no-any-return]

    requests = wait_for(
        lambda: [r for r in series('wattops_deployment_requests_total{deployment="tiny"}')
                 if float(r["value"][1]) >= 4],
        60, "the request counter in Prometheus",
    )  # fmt: skip
    labels = requests[0]["metric"]
    assert labels["node"] == "test-node-0"
    # The precision is not a counter label (a switch would move the total to a new series):
    # it is on the info gauge, to join on.
    assert "precision" not in labels
    served = series('wattops_deployment_info{deployment="tiny"}')
    assert [r["metric"]["precision"] for r in served] == ["q8_0"]
    # Every watt carries its source; this agent is pinned to the profile estimate.
    power = series("wattops_node_power_watts")
    assert power and power[0]["metric"]["source"] == "estimate"
    assert 60.0 <= float(power[0]["value"][1]) <= 400.0  # the a100-80gb profile's range
    tokens = series('wattops_deployment_tokens_total{deployment="tiny",kind="completion"}')
    assert float(tokens[0]["value"][1]) > 0

    # Counters only grow; the raw samples come back with the scrape timestamps.
    def samples(metric: str) -> list[tuple[float, float]]:
        result = prom.custom_query(f"{metric}[2m]")
        return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []

    energy = wait_for(lambda: (h := samples("wattops_node_energy_joules_total")) and
                      len(h) >= 5 and h, 30, "five energy samples")  # fmt: skip
    joules = [v for _, v in energy]
    assert joules == sorted(joules) and joules[-1] > joules[0]
    # The node burns its full price: 5.12 $/h for one A100 80GB (cloud, electricity included).
    cost = samples("wattops_node_cost_usd_total")
    (t0, c0), (t1, c1) = cost[0], cost[-1]
    assert (c1 - c0) / (t1 - t0) * 3600 == pytest.approx(5.12, rel=0.1)


def test_a_new_agent_takes_its_forecast_history_from_prometheus(
    make_agent: Callable[..., Agent], prometheus: Callable[[int], str]
) -> None:
    """Predictive scaling on an agent with nothing learned (a lost state folder) reads a
    season of its node's request counter from the Prometheus that scraped it before."""
    import time

    season, bucket = 12, 2
    settings = dict(replicas=1, max_replicas=2, autoscale_target_in_flight=1.0,
                    autoscale_predictive=True, autoscale_season_s=season,
                    autoscale_season_bucket_s=bucket)  # fmt: skip
    first = make_agent(**settings)
    url = prometheus(first.port)
    prom = PrometheusConnect(url=url, disable_ssl=True)
    wait_for(lambda: prom.custom_query('wattops_deployment_requests_total{deployment="tiny"}'),
             60, "the first scrape")  # fmt: skip
    until = time.monotonic() + season + 2 * bucket
    while time.monotonic() < until:  # about two requests a second, scraped every second
        assert first.chat("again", temperature=0.6).status_code == 200
        time.sleep(0.4)
    learned = first.deployment()["forecast"]
    first.stop()
    second = make_agent(agent_extra={"node": "test-node-0", "prometheus_url": url}, **settings)
    forecast = second.deployment()["forecast"]
    assert forecast["ready"] and forecast["phases_seen"] == season // bucket, forecast
    assert forecast["peak_ahead"] > 1.0, (forecast, learned)
    assert "predictive scaling took" in second.log_tail()
    # Without Prometheus it starts from nothing, and says so by its figures.
    third = make_agent(agent_extra={"node": "test-node-0"}, **settings)
    assert third.deployment()["forecast"]["ready"] is False
