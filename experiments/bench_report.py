"""`wattops bench` results: statistics over runs, `table.md` and `chart.png`.

Every figure of a mode is the mean over its runs with the sample standard deviation (n - 1);
"vs baseline" is the change of the mean against the baseline's mean, in percent. Quality
figures are deterministic (teacher-forced on a fixed text), so they are measured once per
precision, not per run.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

__all__ = ["METRICS", "change_pct", "mean_std", "summarise", "write_chart", "write_table"]

#: Per-run figures summarised per mode.
METRICS = (
    "cost_usd_per_1m_tokens",
    "cost_usd_per_1k_requests",
    "energy_j_per_1m_tokens",
    "energy_j_per_1k_requests",
    "latency_p50_s",
    "latency_p95_s",
    "latency_p99_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "ttft_p99_s",
    "throughput_requests_per_s",
    "throughput_tokens_per_s",
    "cache_hit_rate",
    "prefix_cache_rate",
    "energy_j",
    "node_energy_j",
    "cost_usd",
    "carbon_g",
    "errors",
)
QUALITY = ("top1_agreement", "mean_kl", "perplexity_ratio", "exact_match", "chrf_drop")

TITLES = {
    "baseline": "Baseline",
    "model_optimized": "Model-optimized",
    "fully_optimized": "Fully optimized",
    "batching": "Batching only",
    "reference": "Reference (A100, f16)",
    "routed": "Routed (3 nodes)",
}
#: The routed experiment's reference node (experiments/bench.py: FLEET).
REFERENCE_NODE = "gpu-a100"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; std is None for fewer than two values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def change_pct(value: float | None, baseline: float | None) -> float | None:
    """Change of `value` against `baseline` in percent (negative: lower)."""
    if value is None or baseline is None or baseline == 0:
        return None
    return (value - baseline) / baseline * 100.0


def summarise(
    runs: list[dict[str, Any]], quality: dict[str, Any], planned_runs: int, modes: list[str]
) -> dict[str, Any]:
    """The `modes` section of results.json (and whether every planned run is in)."""
    summary: dict[str, Any] = {}
    for key in modes:
        mine = [r for r in runs if r["mode"] == key]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "title": TITLES.get(key, key),
            "precision": mine[0]["precision"],
            "runs": len(mine),
            "std": {},
        }
        for metric in METRICS:
            values = [float(r[metric]) for r in mine if r.get(metric) is not None]
            entry[metric], entry["std"][metric] = mean_std(values)
        sources = sorted({r["energy_source"] for r in mine})
        entry["energy_source"] = sources[0] if len(sources) == 1 else "mixed: " + ", ".join(sources)
        fractions = [
            r["energy_estimated_fraction"]
            for r in mine
            if r.get("energy_estimated_fraction") is not None
        ]
        entry["energy_estimated_fraction"] = mean_std(fractions)[0]
        q = quality.get(entry["precision"], {})
        for metric in QUALITY:
            entry[metric] = q.get(metric)
        summary[key] = entry
    base = summary.get("baseline")
    for entry in summary.values():
        entry["change_vs_baseline_pct"] = {
            metric: change_pct(entry.get(metric), base.get(metric) if base else None)
            for metric in (*METRICS, *QUALITY)
        }
    complete = all(sum(1 for r in runs if r["mode"] == key) >= planned_runs for key in modes)
    result: dict[str, Any] = {"modes": summary, "complete": complete}
    routed = routed_vs_reference(runs, quality)
    if routed is not None:
        result["routed_vs_reference"] = routed
    return result


def routed_vs_reference(runs: list[dict[str, Any]], quality: dict[str, Any]
                        ) -> dict[str, Any] | None:  # fmt: skip
    """The routed fleet against everything on the reference node, over the runs that have
    both, with the saving per 1M tokens split in two, each computed:

    - less compute: the reference's cost against the routed fleet's held replica-time priced
      at the reference node's price (each node's cost x reference $/replica-h / its own);
    - price differences: that against what the routed fleet was charged at its nodes' prices.

    The two add up to the whole saving. Quality: the routed tokens' top-1 agreement with f16,
    weighted by the tokens each precision served."""
    pairs = []
    for run in sorted({r["run"] for r in runs}):
        ref = next((r for r in runs if r["run"] == run and r["mode"] == "reference"), None)
        routed = next((r for r in runs if r["run"] == run and r["mode"] == "routed"), None)
        if ref is None or routed is None or not ref["tokens"] or not routed["tokens"]:
            continue
        ref_price = ref["nodes"][REFERENCE_NODE]["replica_usd_per_hour"]
        neutral = sum(
            n["cost_usd"] * ref_price / n["replica_usd_per_hour"]
            for n in routed["nodes"].values()
            if n["replica_usd_per_hour"]
        )
        per_ref = ref["cost_usd"] / ref["tokens"] * 1e6
        per_neutral = neutral / routed["tokens"] * 1e6
        per_routed = routed["cost_usd"] / routed["tokens"] * 1e6
        served = sum(n["tokens"] for n in routed["nodes"].values()) or 1
        top1 = (
            sum(
                n["tokens"] * (quality.get(n["precision"], {}).get("top1_agreement") or 0.0)
                for n in routed["nodes"].values()
            )
            / served
        )
        pairs.append({
            "saving_pct": (1 - per_routed / per_ref) * 100 if per_ref else None,
            "from_less_compute_pct": (per_ref - per_neutral) / per_ref * 100 if per_ref else None,
            "from_prices_pct": (per_neutral - per_routed) / per_ref * 100 if per_ref else None,
            "energy_saving_pct": (1 - routed["energy_j_per_1m_tokens"]
                                  / ref["energy_j_per_1m_tokens"]) * 100
            if ref.get("energy_j_per_1m_tokens") else None,
            "top1_agreement": top1,
            "latency_p95_s": routed["latency_p95_s"],
            "reference_latency_p95_s": ref["latency_p95_s"],
            "token_share": {k: n["tokens"] / served for k, n in routed["nodes"].items()},
        })  # fmt: skip
    if not pairs:
        return None
    out: dict[str, Any] = {"runs": len(pairs)}
    for key in ("saving_pct", "from_less_compute_pct", "from_prices_pct", "energy_saving_pct",
                "top1_agreement", "latency_p95_s", "reference_latency_p95_s"):  # fmt: skip
        out[key], out.setdefault("std", {})[key] = mean_std(
            [p[key] for p in pairs if p[key] is not None]
        )
    nodes = sorted({k for p in pairs for k in p["token_share"]})
    out["token_share"] = {
        k: mean_std([p["token_share"].get(k, 0.0) for p in pairs])[0] for k in nodes
    }
    return out


# -- table.md ------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000 or magnitude >= 10**digits:
        # Whole numbers as such: "10,461 ± 594", not "± 5.9e+02".
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _ms(entry: dict[str, Any], metric: str, digits: int = 3) -> str:
    mean, std = entry.get(metric), entry["std"].get(metric)
    if mean is None:
        return "n/a"
    return _num(mean, digits) + (f" ± {_num(std, 2)}" if std is not None else "")


def _pct(entry: dict[str, Any], metric: str) -> str:
    value = entry["change_vs_baseline_pct"].get(metric)
    if value is None:
        return "—"
    return f"{value:+.1f}%"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def write_table(path: Path, results: dict[str, Any]) -> None:
    """`table.md`: the study's layout (cost, energy, latency, quality against baseline),
    then the detail."""
    modes: dict[str, Any] = results["modes"]
    settings = results["settings"]
    workload = settings["workload"]
    first = next(iter(modes.values()), None)
    runs_done = min((m["runs"] for m in modes.values()), default=0)
    lines = [
        "# wattops bench",
        "",
        f"Command: `{results.get('command') or 'wattops bench'}`  ",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, "
        f"{results['machine']['platform']}  ",
        f"Workload per run: {workload['requests']} requests at {workload['rate_rps']} req/s "
        f"mean (bursts x{workload['burst_factor']}, idle gaps of {workload['idle_len_s']} s "
        f"every {workload['idle_every_s']} s), {workload['repeat_fraction']:.0%} exact repeats; "
        f"{runs_done} of {settings['runs']} runs"
        + ("" if results.get("complete") else " (INCOMPLETE)")
        + f"; model {Path(settings['model']).name}; priced as {settings['hardware']}, "
        f"site {settings['site']}.",
        "",
    ]
    if first is not None and any(m["energy_source"] != "measured" for m in modes.values()):
        sources = ", ".join(sorted({m["energy_source"] for m in modes.values()}))
        lines += [
            f"**Energy source: {sources}.** "
            + (
                "No power sensor was readable, so energy is the agent's utilisation-based "
                "estimate from the hardware profile's idle and peak watts, not a measurement."
                if "estimate" in sources
                else "Energy is read from the sensors named."
            ),
            "",
        ]
    lines += [
        "| Mode | Precision | Cost $/1M tokens | vs baseline | Energy J/1M tokens | vs baseline "
        "| Latency p50 s | vs baseline | Top-1 agreement | chrF drop | Energy source |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in modes.values():
        lines.append(
            f"| {entry['title']} | {entry['precision']} "
            f"| {_ms(entry, 'cost_usd_per_1m_tokens')} | {_pct(entry, 'cost_usd_per_1m_tokens')} "
            f"| {_ms(entry, 'energy_j_per_1m_tokens')} | {_pct(entry, 'energy_j_per_1m_tokens')} "
            f"| {_ms(entry, 'latency_p50_s')} | {_pct(entry, 'latency_p50_s')} "
            f"| {_rate(entry['top1_agreement'])} | {_num(entry.get('chrf_drop'), 2)} "
            f"| {entry['energy_source']} |"
        )
    lines += [
        "",
        "| Mode | Cost $/1k req | Energy J/1k req | Latency p95 / p99 s | TTFT p50 / p95 / p99 s "
        "| Throughput tok/s | Response-cache hits | Prefix reuse | Mean KL | PPL ratio "
        "| Exact-match answers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in modes.values():
        lines.append(
            f"| {entry['title']} | {_ms(entry, 'cost_usd_per_1k_requests')} "
            f"| {_ms(entry, 'energy_j_per_1k_requests')} "
            f"| {_ms(entry, 'latency_p95_s')} / {_ms(entry, 'latency_p99_s')} "
            f"| {_ms(entry, 'ttft_p50_s')} / {_ms(entry, 'ttft_p95_s')} / "
            f"{_ms(entry, 'ttft_p99_s')} "
            f"| {_ms(entry, 'throughput_tokens_per_s')} | {_rate(entry['cache_hit_rate'])} "
            f"| {_rate(entry['prefix_cache_rate'])} | {_num(entry['mean_kl'], 3)} "
            f"| {_num(entry['perplexity_ratio'], 4)} | {_rate(entry.get('exact_match'))} |"
        )
    lines += [
        "",
        "Mean ± sample standard deviation over the runs. Cost and energy are what the agent "
        "attributes to the deployment (share held x node price; active energy by busy time, "
        "idle energy by share held), per 1M tokens delivered (prompt + completion, cache hits "
        "included). Quality is agreement with the base precision, measured once per precision "
        "(`wattops quality`): top-1 agreement, mean KL and perplexity ratio teacher-forced on a "
        "shipped text; exact-match answers and chrF drop (100 - chrF) of greedy answers to the "
        "shipped prompts.",
        "",
    ]
    choice = results.get("precision_choice")
    if choice and "fully_optimized" in modes:
        lines += [f"Fully optimized precision: {choice['why']}.", ""]
    routed = results.get("routed_vs_reference")
    if routed:
        share = ", ".join(f"{k} {v:.0%}" for k, v in routed["token_share"].items())
        lines += [
            "Routed against everything on the reference node (same stream, "
            f"{routed['runs']} runs; cost per 1M tokens):",
            "",
            "| Saving | from less compute | from price differences | Energy saving | "
            "Top-1 (token-weighted) | p95 routed / reference s | Tokens by node |",
            "|---|---|---|---|---|---|---|",
            f"| {_num(routed['saving_pct'], 3)}% | {_num(routed['from_less_compute_pct'], 3)}% "
            f"| {_num(routed['from_prices_pct'], 3)}% | {_num(routed['energy_saving_pct'], 3)}% "
            f"| {_rate(routed['top1_agreement'])} | {_num(routed['latency_p95_s'])} / "
            f"{_num(routed['reference_latency_p95_s'])} | {share} |",
            "",
        ]
    path.write_text("\n".join(lines))


# -- chart.png -----------------------------------------------------------------------------


def write_chart(path: Path, results: dict[str, Any]) -> None:
    """`chart.png`: cost, energy, p50 latency and top-1 agreement per mode, with std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"].values())
    panels = (
        ("cost_usd_per_1m_tokens", "Cost, $ per 1M tokens"),
        ("energy_j_per_1m_tokens", "Energy, J per 1M tokens"),
        ("latency_p50_s", "Latency p50, s"),
        ("top1_agreement", "Top-1 agreement with f16"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    names = [m["title"] for m in modes]
    colours = ["#7f7f7f", "#1f77b4", "#2ca02c"][: len(modes)]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        values = [m.get(metric) or 0.0 for m in modes]
        errors = [(m["std"].get(metric) or 0.0) if metric in m["std"] else 0.0 for m in modes]
        ax.bar(names, values, yerr=errors, color=colours, capsize=4)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    source = ", ".join(sorted({m["energy_source"] for m in modes}))
    fig.suptitle(f"wattops bench — energy source: {source}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
