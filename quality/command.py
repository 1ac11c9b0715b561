"""`wattops quality MODEL`: the quality table of a model's precisions, as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from wattops.engines.base import EngineError
from wattops.quality.table import (
    DEFAULT_PRECISIONS,
    VERDICTS,
    QualityFloor,
    QualityTable,
    measure,
)
from wattops.vocabulary import PRECISIONS, cache_dir

__all__ = [
    "add_arguments",
    "add_floor_arguments",
    "floor_from_args",
    "format_table",
    "run_from_args",
]


def _precisions(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in names if p not in PRECISIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown precision {', '.join(unknown) or '(none given)'}; "
            f"allowed: {', '.join(PRECISIONS)}"
        )
    return names


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"must be accuracy points between 0 and 100, not {text!r}")
    return value


def _nats(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be nats per token, 0 or more, not {text!r}")
    return value


class _Replaced(argparse.Action):
    """A flag of the old floor (agreement with the base's wording): refused, naming the new."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:  # fmt: skip
        parser.error(
            f"{option_string} is gone: the quality floor is task accuracy against the labelled "
            "set now, not agreement with the base's wording; use --max-accuracy-drop POINTS "
            "(default 1.5) and, optionally, --max-kl NATS"
        )


def add_floor_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-accuracy-drop / --max-kl / --verdict, shared by `wattops quality` and
    `wattops bench`; the old --min-top1 / --max-chrf-drop are refused by name."""
    floor = QualityFloor()
    parser.add_argument(
        "--max-accuracy-drop",
        type=_points,
        default=floor.max_accuracy_drop,
        metavar="POINTS",
        help="quality floor: most points of task accuracy lost against the base "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-kl",
        type=_nats,
        default=None,
        metavar="NATS",
        help="quality floor, optional: most mean teacher-forced KL against the base, nats/token",
    )
    parser.add_argument(
        "--verdict",
        choices=VERDICTS,
        default=floor.verdict,
        help="how the floor reads the drop's 95%% interval: its point estimate, or its upper "
        "bound (non-inferiority) (default %(default)s)",
    )
    for old in ("--min-top1", "--max-chrf-drop"):
        parser.add_argument(old, action=_Replaced, help=argparse.SUPPRESS)


def floor_from_args(args: argparse.Namespace) -> QualityFloor:
    return QualityFloor(args.max_accuracy_drop, args.max_kl, args.verdict)


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
    first = table.rows[0]
    lines = [
        f"Quality of {table.model} against its {table.reference} base: task accuracy on "
        f"{first.items} labelled items (95% intervals), BLEU/chrF of {first.text_items} "
        "free-text items against references, teacher-forced KL and top-1, consistency with "
        "the base's answers",
        "",
        "| Precision | File MB | Accuracy % [95% CI] | Drop points [95% CI] | BLEU | chrF | "
        "Mean KL | Top-1 | PPL ratio | Same answer | Meets floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.rows:
        meets = "yes" if r.precision == table.reference or not floor.shortfalls(r) else "no"
        lines.append(
            f"| {r.precision} | {r.file_bytes / 1e6:.1f} | "
            f"{r.accuracy.scaled(100).describe()} | {r.drop_points.describe()} | "
            f"{r.bleu:.1f} | {r.chrf:.1f} | {r.mean_kl:.4f} | {r.top1_agreement:.1%} | "
            f"{r.perplexity_ratio:.4f} | {r.exact_match:.1%} | {meets} |"
        )
    lines += [
        "",
        f"Teacher-forced over {first.positions} tokens of Moby-Dick ch. 1-2; answers greedy, "
        "through llama-server. Drop: the base's accuracy minus this one's on the same items "
        "(paired, Agresti-Min interval).",
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
    floor = floor_from_args(args)

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
        out = {**table.as_dict(), "floor": floor.as_dict(),
               "cheapest_meeting_floor": chosen.precision, "why": why}  # fmt: skip
        print(json.dumps(out, indent=2))
    else:
        print(format_table(table, floor))
    return 0
