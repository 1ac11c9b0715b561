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

__all__ = [
    "METRICS",
    "TARGETS",
    "change_pct",
    "mean_std",
    "summarise",
    "targets",
    "write_chart",
    "write_table",
]

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
QUALITY = (
    "accuracy_pct",
    "accuracy_low_pct",
    "accuracy_high_pct",
    "drop_points",
    "drop_low",
    "drop_high",
    "bleu",
    "chrf",
    "top1_agreement",
    "mean_kl",
    "perplexity_ratio",
    "exact_match",
)

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
#: Modes served on the demo fleet's profiles (A100, Jetson, CPU host), not on the baseline's
#: hardware: a change against baseline would compare prices, not serving; they are compared
#: with each other (`routed_vs_reference`).
FLEET_MODES = frozenset({"reference", "routed"})
#: The experiment's published targets: fully optimized against baseline (the studies), and
#: the routed fleet against everything on the reference node (the router's issue).
TARGETS = {"cost_saving_pct": 60.0, "energy_saving_pct": 30.0, "routed_saving_pct": 60.0}


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
        if "routed" in summary:
            # The fleet serves several precisions: its figures are the token-weighted ones.
            for metric in ("top1_agreement", "accuracy_pct", "drop_points"):
                summary["routed"][metric] = routed[metric]
    return result


def routed_vs_reference(runs: list[dict[str, Any]], quality: dict[str, Any]
                        ) -> dict[str, Any] | None:  # fmt: skip
    """The routed fleet against everything on the reference node, over the runs that have
    both, with the saving per 1M tokens split in two, each computed:

    - less compute: the reference's cost against the routed fleet's held replica-time priced
      at the reference node's price (each node's cost x reference $/replica-h / its own);
    - price differences: that against what the routed fleet was charged at its nodes' prices.

    The two add up to the whole saving. Quality: the routed tokens' task accuracy, accuracy
    drop and top-1 agreement against f16, weighted by the tokens each precision served."""
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

        def weighted(metric: str, nodes: dict[str, Any] = routed["nodes"],
                     served: int = served) -> float | None:  # fmt: skip
            figures = [(n["tokens"], quality.get(n["precision"], {}).get(metric))
                       for n in nodes.values()]  # fmt: skip
            if any(f is None for t, f in figures if t):
                return None  # a table from before the figure existed
            return sum(t * f for t, f in figures if t) / served

        pairs.append({
            "saving_pct": (1 - per_routed / per_ref) * 100 if per_ref else None,
            "from_less_compute_pct": (per_ref - per_neutral) / per_ref * 100 if per_ref else None,
            "from_prices_pct": (per_neutral - per_routed) / per_ref * 100 if per_ref else None,
            "energy_saving_pct": (1 - routed["energy_j_per_1m_tokens"]
                                  / ref["energy_j_per_1m_tokens"]) * 100
            if ref.get("energy_j_per_1m_tokens") else None,
            "top1_agreement": weighted("top1_agreement"),
            "accuracy_pct": weighted("accuracy_pct"),
            "drop_points": weighted("drop_points"),
            "latency_p95_s": routed["latency_p95_s"],
            "reference_latency_p95_s": ref["latency_p95_s"],
            "token_share": {k: n["tokens"] / served for k, n in routed["nodes"].items()},
        })  # fmt: skip
    if not pairs:
        return None
    out: dict[str, Any] = {"runs": len(pairs)}
    for key in ("saving_pct", "from_less_compute_pct", "from_prices_pct", "energy_saving_pct",
                "top1_agreement", "accuracy_pct", "drop_points", "latency_p95_s",
                "reference_latency_p95_s"):  # fmt: skip
        out[key], out.setdefault("std", {})[key] = mean_std(
            [p[key] for p in pairs if p[key] is not None]
        )
    nodes = sorted({k for p in pairs for k in p["token_share"]})
    out["token_share"] = {
        k: mean_std([p["token_share"].get(k, 0.0) for p in pairs])[0] for k in nodes
    }
    return out


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the experiment against what was measured: `target`, `measured` (text),
    `met` (bool; None where a figure is missing), `margin` (past the target in `unit`, points
    or s; negative when missed) and `runs_met` ("k of n": the runs that meet it on their own,
    where it is judged per run)."""
    modes: dict[str, Any] = results["modes"]
    runs: list[dict[str, Any]] = results.get("runs", [])
    floor = results["settings"].get("floor") or {}
    rows: list[dict[str, Any]] = []

    def per_run(mode: str, against: str, metric: str, ok: Any) -> str:
        pairs = [(r, b) for r in runs if r["mode"] == mode for b in runs
                 if b["mode"] == against and b["run"] == r["run"]]  # fmt: skip
        met = sum(1 for r, b in pairs if ok(change_pct(r.get(metric), b.get(metric))))
        return f"{met} of {len(pairs)}"

    full, base = modes.get("fully_optimized"), modes.get("baseline")
    if full and base:
        change = full["change_vs_baseline_pct"]
        for metric, key, label in (
            ("cost_usd_per_1m_tokens", "cost_saving_pct", "cost per 1M tokens"),
            ("energy_j_per_1m_tokens", "energy_saving_pct", "energy per 1M tokens"),
        ):
            goal = TARGETS[key]
            if change.get(metric) is None:
                rows.append(_missing(f"fully optimized: {label} at least {goal:.0f}% lower"))
                continue
            saving = -change[metric]
            rows.append({
                "target": f"fully optimized: {label} at least {goal:.0f}% lower than baseline",
                "measured": f"{-saving:+.1f}% ({_num(base[metric])} → {_num(full[metric])})",
                "met": saving >= goal, "margin": saving - goal, "unit": "points",
                "runs_met": per_run("fully_optimized", "baseline", metric,
                                    lambda c, g=goal: c is not None and -c >= g),
            })  # fmt: skip
        p50 = change.get("latency_p50_s")
        if p50 is None:
            rows.append(_missing("fully optimized: p50 latency no worse than baseline"))
        else:
            rows.append({
                "target": "fully optimized: p50 latency no worse than baseline",
                "measured": f"{p50:+.1f}% ({_num(base['latency_p50_s'])} s → "
                            f"{_num(full['latency_p50_s'])} s)",
                "met": p50 <= 0, "margin": -p50, "unit": "points",
                "runs_met": per_run("fully_optimized", "baseline", "latency_p50_s",
                                    lambda c: c is not None and c <= 0),
            })  # fmt: skip
        drop, need = full.get("drop_points"), floor.get("max_accuracy_drop")
        if drop is not None and need is not None:
            on_bound = floor.get("verdict") == "bound"
            bound = full["drop_high"] if on_bound else drop
            rows.append({
                "target": f"fully optimized: quality within the floor (accuracy drop ≤ "
                          f"{need:g} points{', upper bound' if on_bound else ''})",
                "measured": f"{full['precision']}: accuracy {_num(full['accuracy_pct'], 3)}%, "
                            f"drop {drop:.1f} [{full['drop_low']:.1f}, {full['drop_high']:.1f}] "
                            "points",
                "met": bound <= need + 1e-9, "margin": need - bound, "unit": "points",
                "runs_met": None,
            })  # fmt: skip
    routed = results.get("routed_vs_reference")
    if routed:
        goal = TARGETS["routed_saving_pct"]
        saving = routed.get("saving_pct")
        target = f"routed: $/1M tokens at least {goal:.0f}% lower than all on the reference"
        if saving is None:
            rows.append(_missing(target))
        else:
            rows.append({
                "target": target,
                "measured": f"{-saving:+.1f}%; saved by price differences "
                            f"{_num(routed['from_prices_pct'], 3)} points, by less compute "
                            f"{_num(routed['from_less_compute_pct'], 3)} points",
                "met": saving >= goal, "margin": saving - goal, "unit": "points",
                "runs_met": None,
            })  # fmt: skip
        need = floor.get("max_accuracy_drop")
        if need is not None and routed.get("drop_points") is not None:
            rows.append({
                "target": f"routed: quality inside the route's floor (accuracy drop ≤ {need:g} "
                          "points on every precision served)",
                "measured": f"accuracy drop {routed['drop_points']:.1f} points, token-weighted",
                "met": routed["drop_points"] <= need + 1e-9, "margin": None, "runs_met": None,
            })  # fmt: skip
        bound_ms = results["settings"].get("route_max_p95_ms")
        if bound_ms and routed.get("latency_p95_s") is not None:
            rows.append({
                "target": f"routed: p95 inside the route's bound ({bound_ms / 1000:g} s)",
                "measured": f"{_num(routed['latency_p95_s'])} s (reference "
                            f"{_num(routed['reference_latency_p95_s'])} s)",
                "met": routed["latency_p95_s"] * 1000 <= bound_ms,
                "margin": bound_ms / 1000 - routed["latency_p95_s"], "unit": "s", "runs_met": None,
            })  # fmt: skip
    return rows


def _missing(target: str) -> dict[str, Any]:
    return {"target": target, "measured": "n/a (a figure is missing)", "met": None,
            "margin": None, "runs_met": None}  # fmt: skip


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


def _failed(runs: list[dict[str, Any]], mode: str) -> str:
    """Requests of `mode` that failed (with their kinds where recorded) or were dropped (not
    sent before the run's end), over its runs."""
    mine = [r for r in runs if r["mode"] == mode]
    total = sum(int(r.get("errors") or 0) for r in mine)
    dropped = sum(int(r.get("dropped") or 0) for r in mine)
    kinds: dict[str, int] = {}
    for r in mine:
        for kind, n in (r.get("error_kinds") or {}).items():
            kinds[kind] = kinds.get(kind, 0) + n
    sent = sum(int(r.get("requests") or 0) for r in mine)
    detail = ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items()))
    unknown = total - sum(kinds.values())
    if unknown > 0:
        detail += (", " if detail else "") + f"kind not recorded: {unknown}"
    if dropped:
        detail += (", " if detail else "") + f"dropped: {dropped}"
    return f"{total + dropped} of {sent:,}" + (f" ({detail})" if detail else "")


def _drop(entry: dict[str, Any]) -> str:
    """An accuracy drop with its interval, "n/a" without one."""
    if entry.get("drop_points") is None:
        return "n/a"
    if entry.get("drop_low") is None:
        return f"{entry['drop_points']:.1f}"  # token-weighted over several precisions
    return f"{entry['drop_points']:.1f} [{entry['drop_low']:.1f}, {entry['drop_high']:.1f}]"


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
        "| Latency p50 s | vs baseline | Accuracy % | Accuracy drop, points [95% CI] | Top-1 "
        "agreement | Energy source |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in modes.items():
        if key in FLEET_MODES:
            entry = {**entry, "change_vs_baseline_pct": {}}  # "—": other hardware
        lines.append(
            f"| {entry['title']} | {entry['precision']} "
            f"| {_ms(entry, 'cost_usd_per_1m_tokens')} | {_pct(entry, 'cost_usd_per_1m_tokens')} "
            f"| {_ms(entry, 'energy_j_per_1m_tokens')} | {_pct(entry, 'energy_j_per_1m_tokens')} "
            f"| {_ms(entry, 'latency_p50_s')} | {_pct(entry, 'latency_p50_s')} "
            f"| {_num(entry.get('accuracy_pct'), 3)} | {_drop(entry)} "
            f"| {_rate(entry['top1_agreement'])} | {entry['energy_source']} |"
        )
    lines += [
        "",
        "| Mode | Cost $/1k req | Energy J/1k req | Latency p95 / p99 s | TTFT p50 / p95 / p99 s "
        "| Throughput tok/s | Response-cache hits | Prefix reuse | Mean KL | PPL ratio "
        "| BLEU / chrF vs references | Same answer as f16 | Failed or dropped (all runs) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in modes.items():
        lines.append(
            f"| {entry['title']} | {_ms(entry, 'cost_usd_per_1k_requests')} "
            f"| {_ms(entry, 'energy_j_per_1k_requests')} "
            f"| {_ms(entry, 'latency_p95_s')} / {_ms(entry, 'latency_p99_s')} "
            f"| {_ms(entry, 'ttft_p50_s')} / {_ms(entry, 'ttft_p95_s')} / "
            f"{_ms(entry, 'ttft_p99_s')} "
            f"| {_ms(entry, 'throughput_tokens_per_s')} | {_rate(entry['cache_hit_rate'])} "
            f"| {_rate(entry['prefix_cache_rate'])} | {_num(entry['mean_kl'], 3)} "
            f"| {_num(entry['perplexity_ratio'], 4)} "
            f"| {_num(entry.get('bleu'), 3)} / {_num(entry.get('chrf'), 3)} "
            f"| {_rate(entry.get('exact_match'))} "
            f"| {_failed(results.get('runs', []), key)} |"
        )
    if FLEET_MODES & modes.keys():
        lines += [
            "",
            "Reference and routed are served on the demo fleet's hardware profiles, not the "
            "baseline's, so they have no change against baseline (—); the routed table below "
            "compares them.",
        ]
    lines += [
        "",
        "Mean ± sample standard deviation over the runs. Cost and energy are what the agent "
        "attributes to the deployment (share held x node price; active energy by busy time, "
        "idle energy by share held), per 1M tokens delivered (prompt + completion, cache hits "
        "included). Quality is measured once per precision (`wattops quality`): task accuracy "
        "on the shipped labelled set and its drop against f16 on the same items (paired 95% "
        "interval), BLEU/chrF of the free-text items against their references; top-1 "
        "agreement, mean KL and perplexity ratio teacher-forced on a shipped text; the share "
        "of answers word for word the same as f16's (consistency, not the floor).",
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
            "Accuracy drop, points (token-weighted) | p95 routed / reference s | Tokens by node |",
            "|---|---|---|---|---|---|---|",
            f"| {_num(routed['saving_pct'], 3)}% | {_num(routed['from_less_compute_pct'], 3)}% "
            f"| {_num(routed['from_prices_pct'], 3)}% | {_num(routed['energy_saving_pct'], 3)}% "
            f"| {_num(routed.get('drop_points'), 2)} | {_num(routed['latency_p95_s'])} / "
            f"{_num(routed['reference_latency_p95_s'])} | {share} |",
            "",
        ]
    rows = targets(results)
    if rows:
        lines += [
            "Against the targets (means over the runs):",
            "",
            "| Target | Measured | Met | Runs meeting it alone |",
            "|---|---|---|---|",
        ]
        for row in rows:
            verdict = "n/a" if row["met"] is None else "met" if row["met"] else "**missed**"
            if row["margin"] is not None and not row["met"]:
                verdict += f" by {-row['margin']:.1f} {row['unit']}"
            lines.append(f"| {row['target']} | {row['measured']} | {verdict} "
                         f"| {row['runs_met'] or ''} |")  # fmt: skip
        lines.append("")
    path.write_text("\n".join(lines))


# -- chart.png -----------------------------------------------------------------------------


def write_chart(path: Path, results: dict[str, Any]) -> None:
    """`chart.png`: cost, energy, p50 latency and task accuracy per mode, with std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"].values())
    panels = (
        ("cost_usd_per_1m_tokens", "Cost, $ per 1M tokens"),
        ("energy_j_per_1m_tokens", "Energy, J per 1M tokens"),
        ("latency_p50_s", "Latency p50, s"),
        ("accuracy_pct", "Task accuracy, %"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    names = [m["title"] for m in modes]
    colours = ["#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"][: len(modes)]
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
