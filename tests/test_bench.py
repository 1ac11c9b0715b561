"""`wattops bench`: its workload, statistics, its choice of precision and one small real run."""

from __future__ import annotations

import json
import math
import os
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wattops.console.cli import main as cli_main
from wattops.experiments.bench import (
    DEFAULT_MODES,
    MODES,
    BenchSettings,
    agent_config,
    default_workload,
    exclusive,
    run_bench,
)
from wattops.experiments.bench_report import (
    _failed,
    _num,
    change_pct,
    mean_std,
    summarise,
    targets,
)
from wattops.experiments.load import build_workload
from wattops.quality import QualityFloor

# -- the workload --------------------------------------------------------------------------


def test_every_mode_of_a_run_gets_the_same_stream_and_runs_differ() -> None:
    settings = BenchSettings(model=Path(__file__))
    streams = {
        run: build_workload(settings.workload, "bench", seed=settings.seed + run)
        for run in range(settings.runs)
    }
    again = build_workload(settings.workload, "bench", seed=settings.seed + 2)
    assert [(p.at_s, p.body) for p in again] == [(p.at_s, p.body) for p in streams[2]]
    firsts = {json.dumps(s[0].body, sort_keys=True) for s in streams.values()}
    assert len(firsts) == settings.runs


def test_default_workload_shape() -> None:
    profile = default_workload()
    plan = build_workload(profile, "bench", seed=0)
    assert len(plan) == 1000
    repeats = sum(p.repeat_of is not None for p in plan)
    assert 0.15 * len(plan) <= repeats <= 0.30 * len(plan)  # "no more than 30% repeat exactly"
    assert all(p.body["stream"] for p in plan)  # time to first token for every answer
    assert all(p.body["temperature"] == 0 for p in plan)
    gaps = np.diff([p.at_s for p in plan])
    assert gaps.max() >= profile.idle_len_s * 0.8  # idle gaps exist, for scale-to-zero
    lengths = {p.body["max_tokens"] for p in plan}
    assert min(lengths) == profile.max_tokens[0] and max(lengths) == profile.max_tokens[1]


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="modes must be a non-empty subset"):
        BenchSettings(model=Path(__file__), modes=("baseline", "turbo"))
    with pytest.raises(ValueError, match="runs must be at least 1"):
        BenchSettings(model=Path(__file__), runs=0)


def test_cli_names_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "--model", str(tmp_path / "missing.gguf"), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "missing.gguf: no such file" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# -- statistics ----------------------------------------------------------------------------


def test_agent_config_paths_are_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make bench` passes a relative --out; the agent resolves relative paths against its
    config file's folder, so the bench must write them absolute (it once did not)."""
    monkeypatch.chdir(tmp_path)
    model = tmp_path / "demo.gguf"
    model.write_bytes(b"")
    settings = BenchSettings(model=Path("demo.gguf"))
    mode = next(m for m in MODES if m.key == "model_optimized")
    text = agent_config(settings, mode, 8080, Path("out/work/state"),
                              {"q4_k_m": Path("out/variants/demo.q4_k_m.gguf")})  # fmt: skip
    config = tomllib.loads(text)
    deployment = config["deployments"][0]
    assert config["agent"]["state_dir"] == str(tmp_path / "out/work/state")
    assert deployment["files"] == {"q4_k_m": str(tmp_path / "out/variants/demo.q4_k_m.gguf")}
    assert deployment["model"] == str(model)


def test_mean_and_sample_standard_deviation() -> None:
    mean, std = mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(math.sqrt(32 / 7))  # n - 1, not n
    assert mean_std([3.0]) == (3.0, None)
    assert mean_std([]) == (None, None)


def test_table_numbers_are_never_in_exponent_notation() -> None:
    # A spread of 594 J at two significant digits once printed as "5.9e+02".
    assert _num(594.2, 2) == "594"
    assert _num(10_461.3) == "10,461"
    assert _num(0.00036, 2) == "0.00036" and _num(1.66, 3) == "1.66" and _num(None) == "n/a"


def test_change_against_baseline() -> None:
    assert change_pct(60.0, 100.0) == pytest.approx(-40.0)
    assert change_pct(107.0, 100.0) == pytest.approx(7.0)
    assert change_pct(1.0, 0.0) is None
    assert change_pct(None, 1.0) is None


def _run(mode: str, run: int, cost: float, energy: float, p50: float) -> dict[str, object]:
    return {
        "mode": mode,
        "run": run,
        "precision": "f16" if mode == "baseline" else "q4_k_m",
        "energy_source": "estimate",
        "energy_estimated_fraction": 1.0,
        "cost_usd_per_1m_tokens": cost,
        "energy_j_per_1m_tokens": energy,
        "latency_p50_s": p50,
    }


def test_summary_means_over_runs_and_changes_of_means() -> None:
    runs = [
        _run("baseline", 0, 10.0, 100.0, 1.0),
        _run("baseline", 1, 12.0, 120.0, 1.2),
        _run("fully_optimized", 0, 4.0, 70.0, 1.0),
        _run("fully_optimized", 1, 4.8, 84.0, 1.2),
    ]
    quality = {
        "f16": {"top1_agreement": 1.0, "accuracy_pct": 36.0, "drop_points": 0.0},
        "q4_k_m": {"top1_agreement": 0.93, "accuracy_pct": 35.0, "drop_points": 1.0},
    }
    summary = summarise(runs, quality, 2, ["baseline", "fully_optimized"])
    assert summary["complete"] is True
    full = summary["modes"]["fully_optimized"]
    assert full["cost_usd_per_1m_tokens"] == pytest.approx(4.4)
    assert full["std"]["cost_usd_per_1m_tokens"] == pytest.approx(math.sqrt(0.32))
    assert full["change_vs_baseline_pct"]["cost_usd_per_1m_tokens"] == pytest.approx(-60.0)
    assert full["change_vs_baseline_pct"]["energy_j_per_1m_tokens"] == pytest.approx(-30.0)
    assert (full["top1_agreement"], full["accuracy_pct"], full["drop_points"]) == (0.93, 35, 1)
    assert full["energy_source"] == "estimate"
    assert summarise(runs[:3], quality, 2, ["baseline", "fully_optimized"])["complete"] is False


def test_targets_say_which_are_met_by_how_much_and_in_how_many_runs() -> None:
    runs = [
        _run("baseline", 0, 10.0, 100.0, 1.0),
        _run("baseline", 1, 10.0, 100.0, 1.0),
        _run("fully_optimized", 0, 3.8, 60.0, 0.9),  # -62% cost on its own
        _run("fully_optimized", 1, 4.6, 75.0, 1.1),  # -54%, and a slower p50
    ]
    quality = {"f16": {"accuracy_pct": 36.0, "drop_points": 0.0, "drop_low": -0.5,
                       "drop_high": 0.5},
               "q4_k_m": {"accuracy_pct": 34.0, "drop_points": 2.0, "drop_low": -1.0,
                          "drop_high": 5.0}}  # fmt: skip
    results = summarise(runs, quality, 2, ["baseline", "fully_optimized"])
    floor = {"max_accuracy_drop": 1.5, "max_kl": None, "verdict": "point"}
    results |= {"runs": runs, "settings": {"floor": floor}}
    rows = {row["target"].split(": ")[1].split(" ")[0]: row for row in targets(results)}
    assert rows["cost"]["met"] is False and rows["cost"]["margin"] == pytest.approx(-2.0)
    assert rows["cost"]["runs_met"] == "1 of 2"
    assert rows["energy"]["met"] is True  # -32.5% on the means
    assert rows["energy"]["runs_met"] == "1 of 2"  # -40% and -25%
    assert rows["p50"]["met"] is True and rows["p50"]["runs_met"] == "1 of 2"
    assert rows["quality"]["met"] is False  # a 2.0-point drop against a 1.5 floor
    assert rows["quality"]["margin"] == pytest.approx(-0.5)
    assert "accuracy 34%, drop 2.0 [-1.0, 5.0] points" in rows["quality"]["measured"]
    # Judged on the interval's upper bound, the margin is to 5.0.
    results["settings"]["floor"]["verdict"] = "bound"
    rows = {row["target"].split(": ")[1].split(" ")[0]: row for row in targets(results)}
    assert rows["quality"]["margin"] == pytest.approx(-3.5)
    assert "upper bound" in rows["quality"]["target"]
    # A figure missing is neither met nor missed.
    results["modes"]["fully_optimized"]["change_vs_baseline_pct"]["latency_p50_s"] = None
    rows = {row["target"].split(": ")[1].split(" ")[0]: row for row in targets(results)}
    assert rows["p50"]["met"] is None and rows["p50"]["measured"].startswith("n/a")


# -- a small real run ----------------------------------------------------------------------


def test_bench_runs_every_mode_against_real_agents(test_model: Path, tmp_path: Path) -> None:
    workload = replace(
        default_workload(),
        requests=8,
        rate_rps=4.0,
        burst_every_s=0.0,
        idle_every_s=0.0,
        max_tokens=(4, 8),
        prompt_words=(4, 8),
    )
    # The random test model answers every labelled item wrong at every precision (no drop),
    # so the floor here adds a KL bound: q8_0's KL against f16 is under 0.0001 nats/token on
    # it, q5_k_m's 0.0005, so q8_0 is the cheapest that meets it.
    floor = QualityFloor(max_accuracy_drop=1.5, max_kl=0.0002, verdict="point")
    settings = BenchSettings(
        model=test_model, workload=workload, runs=1, sensor="estimate", context=512, floor=floor
    )
    out = tmp_path / "bench"
    results = run_bench(settings, out, show_progress=False)
    assert set(results["modes"]) == set(DEFAULT_MODES)
    # The fully optimized mode serves the precision the quality table chose, and says why.
    choice = results["precision_choice"]
    assert choice["chosen"] == "q8_0" and "q5_k_m (KL 0.0005 > 0.0002" in choice["why"]
    assert results["modes"]["fully_optimized"]["precision"] == "q8_0"
    assert results["modes"]["model_optimized"]["precision"] == "q4_k_m"
    assert set(results["quality"]) == {"f16", "q8_0", "q5_k_m", "q4_k_m", "q4_0"}
    for key, entry in results["modes"].items():
        for field in (
            "cost_usd_per_1m_tokens",
            "energy_j_per_1m_tokens",
            "latency_p50_s",
            "top1_agreement",
            "accuracy_pct",
            "drop_points",
            "energy_source",
        ):
            assert entry[field] is not None, (key, field)
        assert entry["energy_source"] == "estimate"
        assert entry["cost_usd_per_1m_tokens"] > 0 and entry["energy_j_per_1m_tokens"] > 0
    runs = results["runs"]
    assert all(r["ok"] == 8 and r["errors"] == 0 for r in runs)
    # The baseline has no response cache and no prefix reuse; the fully optimized mode has both.
    base = next(r for r in runs if r["mode"] == "baseline")
    full = next(r for r in runs if r["mode"] == "fully_optimized")
    assert base["cache_hit_rate"] == 0 and base["prefix_cache_rate"] == 0
    assert full["prefix_cache_rate"] > 0
    # Two of the eight requests repeat an earlier one exactly: answered from the cache.
    assert full["cache_hit_rate"] > 0
    table = (out / "table.md").read_text()
    assert table.count("| Fully optimized |") == 2
    assert "Fully optimized precision: q8_0: the smallest precision with" in table
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["complete"] is True and len(on_disk["runs"]) == len(DEFAULT_MODES)

    # --resume keeps what is done and runs nothing again.
    again = run_bench(settings, out, resume=True, show_progress=False)
    assert [r["elapsed_s"] for r in again["runs"]] == [r["elapsed_s"] for r in runs]
    # ... and the record still says when the experiment started, and when it was resumed.
    assert again["started_at"] == on_disk["started_at"] and len(again["resumed_at"]) == 1

    # A second bench into the same folder is refused while one holds it, and changes nothing.
    before = (out / "results.json").read_bytes()
    refused = f"another wattops bench \\(pid {os.getpid()}\\)"
    with exclusive(out), pytest.raises(ValueError, match=refused):
        run_bench(settings, out, resume=True, show_progress=False)
    assert (out / "results.json").read_bytes() == before
    other = replace(settings, seed=7)
    with pytest.raises(ValueError, match="other settings"):
        run_bench(other, out, resume=True, show_progress=False)


def test_routed_fleet_against_the_reference_node(test_model: Path, tmp_path: Path) -> None:
    """The three-node fleet (A100 f16, Jetson q4_k_m, CPU host q8_0) behind a real router,
    against everything on the A100 node, on one stream; the saving is split and adds up."""
    workload = replace(default_workload(), requests=8, rate_rps=4.0, burst_every_s=0.0,
                       idle_every_s=0.0, max_tokens=(4, 8), prompts="words",
                       prompt_words=(4, 8))  # fmt: skip
    # On the random test model every precision answers the labelled set equally (all wrong),
    # so the route's accuracy floor leaves no node out; the A100 share is far dearer.
    settings = BenchSettings(
        model=test_model, workload=workload, runs=1, sensor="estimate", context=512,
        floor=QualityFloor(1.5, verdict="point"), modes=("reference", "routed"),
    )  # fmt: skip
    results = run_bench(settings, tmp_path / "bench", show_progress=False)
    assert all(r["ok"] == 8 and r["errors"] == 0 for r in results["runs"])
    routed_run = next(r for r in results["runs"] if r["mode"] == "routed")
    assert set(routed_run["nodes"]) == {"gpu-a100", "jetson-orin", "cpu-host"}
    routed = results["routed_vs_reference"]
    assert sum(routed["token_share"].values()) == pytest.approx(1.0)
    assert routed["token_share"]["gpu-a100"] < 0.5
    assert routed["drop_points"] <= 1.5  # token-weighted, inside the route's floor
    assert 0 < routed["top1_agreement"] <= 1
    assert routed["saving_pct"] > 0
    parts = routed["from_less_compute_pct"] + routed["from_prices_pct"]
    assert parts == pytest.approx(routed["saving_pct"], abs=1e-6)
    assert (
        "Routed against everything on the reference node"
        in (tmp_path / "bench" / "table.md").read_text()
    )
    with pytest.raises(ValueError, match="add reference"):
        BenchSettings(model=test_model, modes=("routed",))


def test_failed_requests_are_summed_with_their_kinds() -> None:
    runs = [
        {"mode": "batching", "requests": 1000, "errors": 2},  # before kinds were recorded
        {"mode": "batching", "requests": 1000, "errors": 1, "error_kinds": {"502": 1}},
        {"mode": "baseline", "requests": 1000, "errors": 0, "error_kinds": {}},
    ]
    assert _failed(runs, "batching") == "3 of 2,000 (502: 1, kind not recorded: 2)"
    assert _failed(runs, "baseline") == "0 of 1,000"
    runs.append({"mode": "baseline", "requests": 1000, "errors": 0, "dropped": 3})
    assert _failed(runs, "baseline") == "3 of 2,000 (dropped: 3)"
