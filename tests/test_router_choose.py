"""The router's choice of deployment (router/choose.py) on hand-made candidates: bounds exclude
with their reason, policies order the rest, the queue counts against the latency bound."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from wattops.router.affinity import Rings, prefix_key
from wattops.router.candidates import Candidate
from wattops.router.choose import Constraints, NoCandidate, QualityFigure, Spread, choose


def cand(key: str, **kw: object) -> Candidate:
    node, dep = key.split("/")
    base = dict(
        key=key, node=node, deployment=dep, url=f"http://{node}", model="m.gguf",
        precision="f16", state="serving", live=True, ready=1, agent_in_flight=0, p50_s=0.5,
        p95_s=1.0, usd_per_hour=1.0, usd_per_1m=10.0, usd_per_1m_input=None,
        usd_per_1m_output=None, j_per_token=1.0, gco2e_per_1m=100.0, figures_current=True,
    )  # fmt: skip
    return Candidate(**{**base, **kw})  # type: ignore[arg-type]


CLOUD = cand("cloud/chat", usd_per_1m=70.0, gco2e_per_1m=50.0, p95_s=0.4, p50_s=0.2)
EDGE = cand("edge/chat", precision="q4_k_m", usd_per_1m=0.5, gco2e_per_1m=30.0, p95_s=2.0)
CPU = cand("cpu/chat", precision="q8_0", usd_per_1m=0.8, gco2e_per_1m=20.0, p95_s=3.0)
QUALITY = {
    "cloud/chat": QualityFigure(1.0, 0.0, "the reference"),
    "edge/chat": QualityFigure(0.85, 6.0, "wattops quality"),
    "cpu/chat": QualityFigure(0.95, 1.0, "wattops quality"),
}


def test_each_policy_orders_the_candidates_by_its_figure() -> None:
    every = [CLOUD, EDGE, CPU]
    cheapest = choose("chat", every, QUALITY, Constraints("cheapest"))
    assert [c.key for c in cheapest.ordered] == ["edge/chat", "cpu/chat", "cloud/chat"]
    assert cheapest.reason.startswith("cheapest: $0.5/1M tokens; 3 of 3 meet no bounds")
    greenest = choose("chat", every, QUALITY, Constraints("greenest"))
    assert greenest.ordered[0].key == "cpu/chat"
    fastest = choose("chat", every, QUALITY, Constraints("fastest"))
    assert fastest.ordered[0].key == "cloud/chat"


def test_bounds_exclude_with_the_reason() -> None:
    bounds = Constraints("cheapest", min_quality=0.9, max_p95_s=2.5)
    choice = choose("chat", [CLOUD, EDGE, CPU], QUALITY, bounds)
    assert [c.key for c in choice.ordered] == ["cloud/chat"]
    assert choice.excluded == {
        "edge/chat": "quality 85.0% < 90%",
        "cpu/chat": "p95 would be 3000ms > 2500ms (0 in flight on 1 ready)",
    }
    # A batch request does not wait on the latency bound: the CPU host is cheaper.
    batch = choose("chat", [CLOUD, EDGE, CPU], QUALITY, replace(bounds, priority="batch"))
    assert batch.ordered[0].key == "cpu/chat"
    # Accuracy drop and price bounds.
    strict = Constraints("cheapest", max_accuracy_drop=1.5, max_usd_per_1m=50.0)
    choice = choose("chat", [CLOUD, EDGE, CPU], QUALITY, strict)
    assert [c.key for c in choice.ordered] == ["cpu/chat"]
    assert choice.excluded["cloud/chat"] == "$70/1M tokens > $50"
    assert choice.excluded["edge/chat"] == "accuracy drop 6.0 > 1.5 points"
    bounded = {**QUALITY, "edge/chat": QualityFigure(0.85, 6.0, "wattops quality", True)}
    choice = choose("chat", [CLOUD, EDGE, CPU], bounded, strict)
    assert choice.excluded["edge/chat"] == "accuracy drop (95% upper bound) 6.0 > 1.5 points"


def test_a_busy_candidate_overflows_to_the_next_one() -> None:
    # The edge node is cheapest, but 4 requests wait on its one replica: 2.0 s p95 plus
    # 4 x 0.5 s median service time is over the 3 s bound; the CPU host takes the request.
    busy_edge = replace(EDGE, agent_in_flight=5)
    choice = choose(
        "chat", [CLOUD, busy_edge, CPU], QUALITY, Constraints("cheapest", max_p95_s=3.5)
    )
    assert choice.ordered[0].key == "cpu/chat"
    assert choice.excluded["edge/chat"] == "p95 would be 4500ms > 3500ms (5 in flight on 1 ready)"


def test_nothing_meets_the_bounds_names_every_candidate() -> None:
    down = replace(CLOUD, live=False)
    with pytest.raises(NoCandidate) as info:
        choose("chat", [down, EDGE], QUALITY, Constraints("cheapest", min_quality=0.9),
               {"edge/chat": "circuit open after 3 failures, probe in 8s"})  # fmt: skip
    message = str(info.value)
    assert "no deployment of route 'chat' meets quality>=0.9 now" in message
    assert "cloud/chat: agent not live" in message
    assert "edge/chat: circuit open after 3 failures" in message
    unknown = {"edge/chat": QualityFigure(None, None, "no quality table of m.gguf")}
    with pytest.raises(NoCandidate, match=r"quality unknown \(no quality table of m.gguf\)"):
        choose("chat", [EDGE], unknown, Constraints("cheapest", min_quality=0.5))


def test_parked_candidates_come_after_every_ready_one() -> None:
    parked_edge = replace(EDGE, state="parked", ready=0)
    choice = choose("chat", [CLOUD, parked_edge], QUALITY, Constraints("cheapest"))
    assert [c.key for c in choice.ordered] == ["cloud/chat", "edge/chat"]
    # ... and are woken when no ready one meets the bounds.
    only = choose("chat", [replace(CLOUD, live=False), parked_edge], QUALITY,
                  Constraints("cheapest"))  # fmt: skip
    assert only.ordered[0].key == "edge/chat" and "waking it" in only.reason


def test_a_candidate_that_never_served_is_priced_by_its_held_dollars() -> None:
    # The CPU host has no $/1M tokens yet; the others get 10 and 0.5 $/1M per held $/h...
    fresh = replace(CPU, usd_per_1m=None, usd_per_hour=0.05)
    cloud = replace(CLOUD, usd_per_hour=5.0, usd_per_1m=70.0)  # 14 $/1M per held $/h
    edge = replace(EDGE, usd_per_hour=0.05, usd_per_1m=0.5)  # 10
    choice = choose("chat", [cloud, edge, fresh], QUALITY, Constraints("cheapest"))
    # ... so its prior is 0.05 x median(14, 10) = 0.6: between the edge and the cloud.
    assert [c.key for c in choice.ordered] == ["edge/chat", "cpu/chat", "cloud/chat"]
    first_served = choose("chat", [replace(cloud, usd_per_1m=None), fresh], QUALITY,
                          Constraints("cheapest"))  # fmt: skip
    assert first_served.ordered[0].key == "cpu/chat"
    assert "held (no tokens yet)" in first_served.reason


def test_equivalent_candidates_share_by_load_or_by_prefix_affinity() -> None:
    twins = [cand(f"edge{i}/chat", usd_per_1m=0.50 + i / 100) for i in range(3)]
    dear = replace(CLOUD, usd_per_1m=0.9)  # more than 20% above the best: not equivalent
    quality = {c.key: QualityFigure(1.0, 0.0, "declared") for c in [*twins, dear]}
    bounds = Constraints("cheapest")
    # Without a prefix: the least busy, turn by turn among equally busy ones.
    firsts = [choose("chat", [*twins, dear], quality, bounds, spread=Spread(turn=t)).ordered[0].key
              for t in range(3)]  # fmt: skip
    assert sorted(firsts) == ["edge0/chat", "edge1/chat", "edge2/chat"]
    busy = [replace(twins[0], agent_in_flight=2), twins[1], replace(twins[2], agent_in_flight=1)]
    choice = choose("chat", [*busy, dear], quality, bounds)
    assert [c.key for c in choice.ordered] == [
        "edge1/chat",
        "edge2/chat",
        "edge0/chat",
        "cloud/chat",
    ]
    assert ", least busy of 3 within 20%" in choice.reason
    # With a prefix: always the same one while its load allows ...
    rings = Rings()
    spread = Spread(prefix="system-prompt-A", rings=rings)
    home = choose("chat", [*twins, dear], quality, bounds, spread=spread).ordered[0].key
    for t in range(5):
        again = choose("chat", [*twins, dear], quality, bounds, spread=replace(spread, turn=t))
        assert again.ordered[0].key == home and "prefix affinity among 3" in again.reason
    # ... other prefixes spread over the twins ...
    homes = {
        choose("chat", twins, quality, bounds, spread=Spread(prefix=f"p{i}", rings=rings))
        .ordered[0]
        .key
        for i in range(30)
    }
    assert len(homes) == 3
    # ... and a home busier than 1.25 x the mean load sends its prefix to the next on the ring.
    loaded = [replace(c, agent_in_flight=4) if c.key == home else c for c in twins]
    moved = choose("chat", loaded, quality, bounds, spread=spread).ordered[0].key
    assert moved != home
    assert choose("chat", loaded, quality, bounds, spread=spread).ordered[0].key == moved


def test_prefix_key_is_the_conversation_before_the_last_message() -> None:
    system = {"role": "system", "content": "You are terse."}
    one = prefix_key({"messages": [system, {"role": "user", "content": "a"}]})
    two = prefix_key({"messages": [system, {"role": "user", "content": "b"}]})
    assert one is not None and one == two
    assert prefix_key({"messages": [{"role": "user", "content": "a"}]}) is None
    assert prefix_key({"prompt": "Once upon"}) is None
    longer = prefix_key({"messages": [system, {"role": "user", "content": "a"},
                                      {"role": "assistant", "content": "b"},
                                      {"role": "user", "content": "c"}]})  # fmt: skip
    assert longer not in (None, one)


def test_quality_figures_come_from_the_cache_and_follow_new_measurements(
    test_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wattops.router.quality as book_module
    from wattops.quality import measure
    from wattops.router.config import RouteConfig

    # The router reads the table `wattops quality` left in the cache; it never measures.
    root = tmp_path / "cache"
    route = RouteConfig(name="chat", candidates=["*/t"], reference="a/t")
    ref = cand("a/t", model=str(test_model), precision="f16")
    q4 = cand("b/t", model=str(test_model), precision="q4_0")
    book = book_module.QualityBook(root)
    assert (
        book.figure(route, q4, ref).source == "no quality table of test.gguf: run wattops quality"
    )
    # A short labelled set and text stand in for the shipped ones (the test model is random).
    import wattops.quality.table as table_module

    items = table_module.labelled_set()[:6]
    monkeypatch.setattr(table_module, "labelled_set", lambda: items)
    text = table_module.evaluation_text()[:1500]
    monkeypatch.setattr(table_module, "evaluation_text", lambda: text)
    measure(test_model, ("f16", "q8_0"), root=root, threads=1)
    monkeypatch.setattr(book_module, "REREAD_S", 0.0)
    assert book.figure(route, q4, ref).source == "q4_0 not in the quality table"
    table = measure(test_model, ("f16", "q4_0"), root=root, threads=1)
    figure = book.figure(route, q4, ref)
    row = table.row("q4_0")
    # By default a route judges the drop's 95% upper bound, as `wattops quality`'s floor does.
    assert figure.source == "wattops quality, the drop's 95% upper bound" and figure.upper_bound
    assert (figure.kept, figure.accuracy_drop) == (row.accuracy_kept, row.drop_points.high)
    pointed = route.model_copy(update={"accuracy_verdict": "point"})
    figure = book.figure(pointed, q4, ref)
    assert figure.source == "wattops quality" and not figure.upper_bound
    assert figure.accuracy_drop == row.drop_points.estimate
    assert book.figure(route, ref, ref).kept == 1.0  # the reference itself


def test_the_old_chrf_bound_is_refused_naming_the_new_ones() -> None:
    from pydantic import ValidationError

    from wattops.router.api import RoutePatch
    from wattops.router.config import RouteConfig

    with pytest.raises(ValidationError, match=r"max_chrf_drop is gone: .* use max_accuracy_drop"):
        RouteConfig(name="chat", candidates=["*/t"], reference="a/t", max_chrf_drop=40)
    with pytest.raises(ValidationError, match=r"max_chrf_drop is gone: .* use max_accuracy_drop"):
        RoutePatch.model_validate({"max_chrf_drop": 40})
    assert RouteConfig(name="chat", candidates=["*/t"], reference="a/t",
                       max_accuracy_drop=1.5).max_accuracy_drop == 1.5  # fmt: skip
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        RouteConfig(name="chat", candidates=["*/t"], reference="a/t", max_accuracy_drop=101)
