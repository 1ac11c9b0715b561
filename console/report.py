"""`wattops report`: chargeback per team, key or route from a wattops-router's ledger, with
the fleet's unattributed remainder and each budget's forecast (router/billing/report.py has
the method).

    wattops report --by team --since 30d [--until 2026-11-30] [--format md|csv|json]
                   [--chart out.png] [--router URL]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import re
import sys
import time
from pathlib import Path
from typing import Any

from wattops.router.api import UNIT_LABELS, Report, ReportGroup

__all__ = ["add_command", "parse_moment", "render"]

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([mhdw])$")
_UNIT_S = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_moment(text: str, now: float | None = None) -> float:
    """`30d`, `12h`, `90m`, `2w` (ago), or an ISO date/time (UTC if no zone): unix time."""
    now = time.time() if now is None else now
    found = _AGO.match(text.strip())
    if found:
        return now - float(found.group(1)) * _UNIT_S[found.group(2)]
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a span back from now (30d, 12h, 90m, 2w) or an ISO date "
            "(2026-11-01, 2026-11-01T08:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _day(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


COLUMNS = ("group", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "energy_kwh",
           "carbon_kg", "cache_hits", "cache_saving_usd", "routing_saving_usd", "degraded",
           "errors")  # fmt: skip


def _row(g: ReportGroup) -> list[str]:
    return [
        g.group, str(g.requests), str(g.prompt_tokens), str(g.completion_tokens),
        f"{g.cost_usd:.6f}", f"{g.energy_kwh:.6f}", f"{g.carbon_kg:.6f}", str(g.cache_hits),
        f"{g.cache_saving_usd:.6f}", f"{g.routing_saving_usd:.6f}", str(g.degraded),
        str(g.errors),
    ]  # fmt: skip


def render(report: Report, fmt: str) -> str:
    """The report as Markdown, CSV (one row per group, then total) or JSON."""
    if fmt == "json":
        return report.model_dump_json(indent=2)
    rows = [_row(g) for g in report.groups] + [_row(report.total)]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([report.by if c == "group" else c for c in COLUMNS])
        writer.writerows(rows)
        return out.getvalue()
    lines = [
        f"# Chargeback by {report.by}, {_day(report.since)} to {_day(report.until)}",
        "",
        "Each request at its server's rates when it was answered (the ledger); `(none)`: "
        "requests without one.",
        "",
        "| " + " | ".join(report.by if c == "group" else c for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines[-1] = lines[-1].replace("| total |", "| **total** |", 1)
    f = report.fleet
    lines.append("")
    if f is None:
        lines.append("Fleet: not sampled twice in this period yet (the router samples it every "
                     "minute), so no unattributed line.")  # fmt: skip
    else:
        lines += [
            f"Fleet, {_day(f.start)} to {_day(f.end)} (the router's samples of what the agents "
            "attribute to their deployments):",
            "",
            "| | cost_usd | energy_kwh | carbon_kg |",
            "|---|---|---|---|",
            f"| requests in the ledger | {f.ledger_cost_usd:.6f} | {f.ledger_energy_kwh:.6f} "
            f"| {f.ledger_carbon_kg:.6f} |",
            f"| unattributed (held, idle, or not through this router) | "
            f"{f.unattributed_cost_usd:.6f} | {f.unattributed_energy_kwh:.6f} | "
            f"{f.unattributed_carbon_kg:.6f} |",
            *([f"| overcharged (the ledger's learned rates above the span's own cost) | "
               f"-{f.overcharged_cost_usd:.6f} | -{f.overcharged_energy_kwh:.6f} | "
               f"-{f.overcharged_carbon_kg:.6f} |"]
              if f.overcharged_cost_usd or f.overcharged_energy_kwh or f.overcharged_carbon_kg
              else []),
            f"| **fleet** | {f.cost_usd:.6f} | {f.energy_kwh:.6f} | {f.carbon_kg:.6f} |",
            "",
            f"Parking: {f.parking_saving_usd:.6f} USD of hardware the parked deployments did "
            "not hold (the share each held when it last ran, at its node's price); it is in "
            "the unattributed line, saved where that share is reused or the node released.",
        ]  # fmt: skip
    if report.forecasts:
        lines += [
            "",
            "Budgets, projected to the end of their window (mean spend over the lookback, "
            "extrapolated):",
            "",
            "| budget | spent | limit | per day | projected | runs out | resets |",
            "|---|---|---|---|---|---|---|",
        ]
        for fc in report.forecasts:
            unit = UNIT_LABELS[fc.unit]
            if fc.runs_out_at is None:
                out_at = "not this window"
            elif fc.spent >= fc.limit:
                out_at = "spent"
            else:
                out_at = _day(fc.runs_out_at)
            lines.append(
                f"| {fc.budget} | {fc.spent:.6g} {unit} | {fc.limit:.6g} | "
                f"{fc.rate_per_day:.6g} | {fc.projected:.6g} | {out_at} | {_day(fc.resets_at)} |"
            )
    return "\n".join(lines) + "\n"


def chart(report: Report, path: Path) -> None:
    """Cost per group as horizontal bars (with the unattributed remainder when known)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [g.group for g in report.groups]
    values = [g.cost_usd for g in report.groups]
    if report.fleet is not None:
        labels.append("unattributed")
        values.append(report.fleet.unattributed_cost_usd)
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(labels) + 1.5))
    ax.barh(labels[::-1], values[::-1], color="#4c72b0")
    ax.set_xlabel("USD")
    ax.set_title(f"Cost by {report.by}, {_day(report.since)} to {_day(report.until)}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report(args: argparse.Namespace) -> int:
    from wattops.console.keys import call_router

    until = args.until
    if until is not None and until <= args.since:
        print(f"wattops report: --until ({_day(until)}) must be after --since "
              f"({_day(args.since)})", file=sys.stderr)  # fmt: skip
        return 2
    report = call_router(args, lambda c: c.report(args.by, args.since, until))
    print(render(report, args.format), end="")
    if args.chart:
        chart(report, args.chart)
    return 0


def add_command(commands: Any) -> None:
    """`wattops report` on the CLI's sub-command parser."""
    parser = commands.add_parser(
        "report", help="chargeback per team, key or route from a router's ledger"
    )
    parser.add_argument("--by", choices=["team", "key", "route"], default="team")
    parser.add_argument(
        "--since",
        type=parse_moment,
        default="30d",
        help="30d, 12h, 90m, 2w back from now, or an ISO date (default 30d)",
    )
    parser.add_argument("--until", type=parse_moment, help="the period's end (default now)")
    parser.add_argument("--format", choices=["md", "csv", "json"], default="md")
    parser.add_argument("--chart", type=Path, metavar="PNG", help="cost per group as a chart")
    parser.add_argument("--router", metavar="URL", help="the router (default $WATTOPS_ROUTER)")
    parser.set_defaults(func=_report)
