"""`wattops`: the operator's command line. Subcommands: `model` (more come with the console)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from wattops.agents.api import PRECISIONS


def _model_tiny(args: argparse.Namespace) -> int:
    from wattops.engines.tiny_model import write_tiny_model

    started = time.perf_counter()
    path = write_tiny_model(args.out, args.size, seed=args.seed)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({args.size}, {size_mb:.1f} MiB) in {time.perf_counter() - started:.1f}s")
    return 0


def _model_quantize(args: argparse.Namespace) -> int:
    from wattops.engines.base import EngineError
    from wattops.engines.variants import quantize

    started = time.perf_counter()
    try:
        quantize(args.source, args.target, args.precision, args.threads)
    except EngineError as exc:
        print(f"wattops model quantize: {exc}", file=sys.stderr)
        return 1
    size_mb = args.target.stat().st_size / 2**20
    print(
        f"wrote {args.target} ({args.precision}, {size_mb:.1f} MiB) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from wattops.console.demo import run_demo

    return run_demo(args.model, args.port, args.state_dir)


def build_parser() -> argparse.ArgumentParser:
    """The whole `wattops` argument parser."""
    parser = argparse.ArgumentParser(prog="wattops", description="wattops operator CLI")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    model = commands.add_parser("model", help="generate and quantize GGUF models")
    model_cmds = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    tiny = model_cmds.add_parser("tiny", help="write a small random-weight llama GGUF")
    tiny.add_argument("out", type=Path, help="output .gguf path")
    tiny.add_argument(
        "--size",
        choices=["test", "demo"],
        default="test",
        help="test: a few MB, loads instantly; demo: about 100M parameters",
    )
    tiny.add_argument("--seed", type=int, default=0, help="weights seed (same seed, same file)")
    tiny.set_defaults(func=_model_tiny)

    quant = model_cmds.add_parser("quantize", help="quantize a GGUF with llama.cpp")
    quant.add_argument("source", type=Path, help="input GGUF (f32, f16 or bf16)")
    quant.add_argument("target", type=Path, help="output GGUF")
    quant.add_argument(
        "--precision",
        required=True,
        choices=PRECISIONS,
        metavar="P",
        help=f"one of: {', '.join(PRECISIONS)}",
    )
    quant.add_argument("--threads", type=int, default=0, help="0: all cores")
    quant.set_defaults(func=_model_quantize)

    demo = commands.add_parser("demo", help="run an agent on the demo model on loopback")
    demo.add_argument("--model", type=Path, default=Path("models/demo.gguf"))
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--state-dir", type=Path, default=Path("state/demo"))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `wattops`."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
