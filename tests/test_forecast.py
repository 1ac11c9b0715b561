"""Predictive scaling (agents/forecast.py): the seasonal forecast on synthetic periodic
histories, and a real agent that starts a replica ahead of the rise its forecast expects."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.conftest import Agent, wait_for
from wattops.agents.forecast import SeasonalForecast, replicas_for

SEASON, BUCKET = 100.0, 10.0  # ten buckets


def square(phase: int) -> float:
    """Requests/s: quiet (0.5) for the first half of the season, busy (5) for the second."""
    return 0.5 if phase < 5 else 5.0


def feed(forecast: SeasonalForecast, seasons: float, start: float = 0.0,
         shape: Callable[[int], float] = square, scale: float = 1.0) -> float:  # fmt: skip
    """Arrivals spread evenly over each bucket, at the shape's rate; returns the end time."""
    t = start
    end = start + seasons * SEASON
    while t < end:
        phase = int(t // BUCKET) % 10
        arrivals = round(shape(phase) * scale * BUCKET)
        for k in range(arrivals):
            forecast.add(t + k * BUCKET / arrivals)
        t += BUCKET
    return t


def test_no_forecast_until_a_whole_season_is_seen() -> None:
    forecast = SeasonalForecast(SEASON, BUCKET)
    end = feed(forecast, 0.5)
    assert not forecast.ready and forecast.rate(end) is None and forecast.peak(end, 30) is None
    feed(forecast, 0.6, start=end)
    assert forecast.ready


def test_the_profile_follows_the_repeating_shape_and_sees_the_rise_ahead() -> None:
    forecast = SeasonalForecast(SEASON, BUCKET)
    end = feed(forecast, 3)  # three seasons: t = 300, phase 0 (the quiet half begins)
    assert [round(r or 0, 2) for r in forecast.profile] == [0.5] * 5 + [5.0] * 5
    assert forecast.rate(end + 5) == pytest.approx(0.5)
    assert forecast.rate(end + 55) == pytest.approx(5.0)
    # At phase 0, looking 50 s ahead sees the rise at phase 5; looking 40 s ahead does not.
    assert forecast.peak(end, 50) == pytest.approx(5.0)
    assert forecast.peak(end, 40) == pytest.approx(0.5)


def test_a_busier_day_lifts_the_whole_forecast_within_bounds() -> None:
    forecast = SeasonalForecast(SEASON, BUCKET)
    end = feed(forecast, 2)
    end = feed(forecast, 0.4, start=end, scale=1.6)  # three quiet buckets closed at 1.6x
    assert forecast.level() == pytest.approx(1.6)
    assert forecast.rate(end + 10) == pytest.approx(5.0 * 1.6)  # the busy half, lifted
    wild = SeasonalForecast(SEASON, BUCKET)
    feed(wild, 0.4, start=feed(wild, 2), scale=10.0)
    assert wild.level() == 2.0  # clamped: one odd stretch does not multiply the forecast by 10


def test_silence_is_learned_as_zero_and_a_long_gap_does_not_hang() -> None:
    forecast = SeasonalForecast(SEASON, BUCKET)
    end = feed(forecast, 1)
    forecast.add(end + 10 * SEASON)  # the agent was down ten seasons: one season of zeros
    assert forecast.ready
    assert max(r or 0 for r in forecast.profile) < 5.0  # halved towards the silence


def test_the_profile_is_kept_across_a_restart_only_for_the_same_season() -> None:
    learned = SeasonalForecast(SEASON, BUCKET)
    feed(learned, 2)
    saved = json.loads(json.dumps(learned.to_dict()))
    again = SeasonalForecast(SEASON, BUCKET)
    again.restore(saved)
    assert again.ready and again.profile == learned.profile
    other = SeasonalForecast(SEASON * 2, BUCKET)
    other.restore(saved)
    assert not other.ready


def test_replicas_follow_littles_law() -> None:
    # 5 req/s x 0.8 s each = 4 in flight; at 1.5 per replica: 3 replicas (2.67 rounded up).
    assert replicas_for(5.0, 0.8, 1.5) == 3
    assert replicas_for(0.5, 0.8, 1.5) == 1
    assert replicas_for(0.0, 0.8, 1.5) == 0
    with pytest.raises(ValueError, match="season_s >= 2 x bucket_s"):
        SeasonalForecast(10, 10)


def test_an_agent_starts_a_replica_ahead_of_the_rise_its_forecast_expects(
    make_agent: Callable[..., Agent],
) -> None:
    """The profile is the one the agent would have learned (busy at every phase, restored from
    its state file as after a restart); the live load is one request at a time, which the
    reactive rule alone serves with one replica. The forecast starts a second one and says why;
    a flat quiet profile starts nothing."""
    outcomes = {}
    for rate in (5000.0, 0.0):  # the test model answers in milliseconds
        agent = make_agent(start=False, replicas=1, max_replicas=2,
                           autoscale_target_in_flight=1.0, autoscale_predictive=True,
                           autoscale_season_s=60, autoscale_season_bucket_s=5)  # fmt: skip
        state = {"deployments": {"tiny": {
            "desired": {"precision": "q8_0", "replicas": 1},
            "forecast": {"season_s": 60.0, "bucket_s": 5.0, "profile": [rate] * 12},
        }}}  # fmt: skip
        agent.state_dir.mkdir(parents=True, exist_ok=True)
        (agent.state_dir / "state.json").write_text(json.dumps(state))
        agent.start()
        agent.wait_converged()
        for i in range(3):  # measured service time: what turns a rate into replicas
            assert agent.chat(f"how long {i}", temperature=0.7).status_code == 200
        if rate:
            dep = wait_for(lambda a=agent: (d := a.deployment())["ready_replicas"] == 2 and d,
                           60, "the forecast's second replica")  # fmt: skip
        else:
            wait_for(lambda a=agent: a.deployment()["forecast"]["replicas"] is not None, 30,
                     "the forecast's figure")  # fmt: skip
            dep = agent.deployment()
        outcomes[rate] = dep
    busy, quiet = outcomes[5000.0], outcomes[0.0]
    assert busy["forecast"]["ready"] and busy["forecast"]["replicas"] == 2
    assert busy["forecast"]["reason"].startswith("1 -> 2: forecast: ")
    assert "req/s expected within" in busy["forecast"]["reason"]
    assert "max_replicas 2), started ahead" in busy["forecast"]["reason"]
    assert quiet["desired_replicas"] == 1 and quiet["forecast"]["replicas"] == 1
    assert quiet["forecast"]["reason"] is None


def test_idle_parking_waits_for_the_forecast_and_a_parked_deployment_is_woken_ahead(
    make_agent: Callable[..., Agent],
) -> None:
    """With idle_scale_to_zero_s and a forecast: a deployment idle for longer than that is
    parked only when the forecast expects no request within the lead time, and is woken before
    the buckets where it expects some; parking by hand is never undone by the forecast."""
    import time

    season, bucket = 60.0, 5.0
    # Start at a bucket's beginning: the quiet span is then the whole four buckets ahead,
    # not 0-5 s less by where in its bucket the test happened to start.
    time.sleep(bucket - time.time() % bucket)
    first = int(time.time() // bucket)  # the bucket the test starts in
    phase = first % 12
    # Quiet now and for the next four buckets, busy from the fifth on.
    profile = [0.0 if (p - phase) % 12 < 5 else 5.0 for p in range(12)]
    agent = make_agent(start=False, replicas=1, max_replicas=2, idle_scale_to_zero_s=1.0,
                       autoscale_target_in_flight=1.0, autoscale_predictive=True,
                       autoscale_season_s=season, autoscale_season_bucket_s=bucket)  # fmt: skip
    state = {"deployments": {"tiny": {
        "desired": {"precision": "q8_0", "replicas": 1},
        "forecast": {"season_s": season, "bucket_s": bucket, "profile": profile},
    }}}  # fmt: skip
    agent.state_dir.mkdir(parents=True, exist_ok=True)
    (agent.state_dir / "state.json").write_text(json.dumps(state))
    agent.start()
    wait_for(lambda: agent.deployment()["desired_replicas"] == 0, 20,
             "parked while the forecast is quiet")  # fmt: skip
    woken = wait_for(lambda: (d := agent.deployment())["desired_replicas"] == 1 and d, 40,
                     "woken ahead of the busy buckets")  # fmt: skip
    assert time.time() < (first + 5) * bucket  # before the first busy bucket began
    assert woken["forecast"]["reason"].startswith("0 -> 1: forecast: ")
    assert "woken ahead" in woken["forecast"]["reason"]
    # Busy now: idle for longer than idle_scale_to_zero_s, it is not parked again.
    time.sleep(3.0)
    assert agent.deployment()["desired_replicas"] >= 1
    # Parked by hand, it stays parked whatever the forecast says.
    assert agent.control("/v1/deployments/tiny/scale", {"replicas": 0}).status_code == 202
    time.sleep(3.0)
    assert agent.deployment()["desired_replicas"] == 0
