"""`wattops quality MODEL`: the quality table of a model's precisions, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wattops.engines.base import EngineError
from wattops.quality.table import DEFAULT_PRECISIONS, QualityFloor, QualityTable, measure
from wattops.vocabulary import PRECISIONS, cache_dir

__all__ = ["add_arguments", "format_table", "run_from_args"]


def _precisions(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown precision {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(PRECISIONS)}"
        )
    return names


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a share between 0 and 1, not {text!r}")
    return value


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be chrF points between 0 and 100, not {text!r}")
    return value


def add_floor_arguments(parser: argparse.ArgumentParser) -> None:
    """--min-top1 / --max-chrf-drop, shared by `wattops quality` and `wattops bench`."""
    floor = QualityFloor()
    parser.add_argument(
        "--min-top1",
        type=_share,
        default=floor.top1_agreement,
        help="quality floor: least top-1 agreement with the base, 0..1 (default %(default)s)",
    )
    parser.add_argument(
        "--max-chrf-drop",
        type=_points,
        default=floor.chrf_drop,
        help="quality floor: most chrF points lost against the base (default %(default)s)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the base GGUF (f16) whose precisions to score")
    parser.add_argument(
        "--precisions",
        type=_precisions,
        default=DEFAULT_PRECISIONS,
        help=f"comma-separated precisions (default {','.join(DEFAULT_PRECISIONS)})",
    )
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where variants and tables are kept (default {cache_dir()})",
    )
    add_floor_arguments(parser)


def format_table(table: QualityTable, floor: QualityFloor) -> str:
    _, why = table.cheapest(floor)
    head = (
        "| Precision | File MB | Top-1 agreement | Mean KL | PPL ratio | Exact match | "
        "chrF | chrF drop | Meets floor |"
    )
    lines = [
        f"Quality of {table.model} against its {table.reference} base "
        "(agreement with the base, not accuracy against ground truth)",
        "",
        head,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.rows:
        missing = floor.shortfalls(r)
        meets = "yes" if r.precision == table.reference or not missing else "no"
        lines.append(
            f"| {r.precision} | {r.file_bytes / 1e6:.1f} | {r.top1_agreement:.1%} | "
            f"{r.mean_kl:.4f} | {r.perplexity_ratio:.4f} | {r.exact_match:.1%} | "
            f"{r.chrf:.1f} | {r.chrf_drop:.2f} | {meets} |"
        )
    first = table.rows[0]
    lines += [
        "",
        f"Teacher-forced over {first.positions} tokens of Moby-Dick ch. 1-2; answers: greedy, "
        f"up to 48 tokens, to {first.prompts} shipped prompts.",
        f"Floor: {floor.describe(table.reference)}. Cheapest meeting it: {why}.",
    ]
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace) -> int:
    if not args.model.is_file():
        print(f"wattops quality: {args.model}: no such file", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"wattops quality: --threads must be at least 1, not {args.threads}",
              file=sys.stderr)  # fmt: skip
        return 2
    floor = QualityFloor(args.min_top1, args.max_chrf_drop)

    def stage(text: str) -> None:
        print(f"wattops quality: {text}", file=sys.stderr, flush=True)

    try:
        table = measure(
            args.model, args.precisions, root=args.cache_dir, threads=args.threads, on_stage=stage
        )
    except (ValueError, EngineError) as exc:
        print(f"wattops quality: {exc}", file=sys.stderr)
        return 2
    if args.json:
        chosen, why = table.cheapest(floor)
        out = {**table.as_dict(), "floor": floor.__dict__,
               "cheapest_meeting_floor": chosen.precision, "why": why}  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(format_table(table, floor))
    return 0
