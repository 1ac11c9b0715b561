"""Batching as a lever: tokens/s per replica, J/token and $/1M tokens at 1, 2, 4 and 8 slots.

Usage: .venv/bin/python benchmarks/batching.py [--model models/smollm2-135m-instruct.f16.gguf]
       [--precision f16] [--requests-per-client 6] [--max-tokens 64] [--out results.json]

For each configuration a fresh wattops-agent serves the model with ONE replica on ONE thread:
  - worker:   the single-stream llama.cpp worker (`engine = "llamacpp"`), 1 client and N clients
  - slots=N:  llama-server with N slots (`engine = "llamacpp-server"`, parallel = N, fixed)
and N closed-loop clients (N = 1, 2, 4, 8) each send `--requests-per-client` chat requests
(real questions, sampled at temperature 0.7 with a seed per request, so no response-cache hit;
response cache off). Tokens/s counts completion tokens over the wall time of the batch.
J/token and $/1M tokens are the agent's own accounting for the deployment over the same span
(energy: whatever sensor the agent has here, labelled in the output; cost: the hardware
profile's price for what the deployment holds, plus its electricity), divided by all tokens
(prompt + completion) decoded in it, as `wattops bench` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from agent_wait import deployment, wait_serving

from wattops.experiments.launch import agent_argv, free_port, launch, stop_all
from wattops.experiments.questions import SeededDraw, question

CONFIG = """\
[agent]
node = "bench-batching"
listen = "127.0.0.1:{port}"
state_dir = "{state}"
profile = "cpu-generic"
sensor = "auto"
health_interval_s = 0.5

[accounting]
window_s = 10

[cache]
enabled = false

[[deployments]]
name = "bench"
engine = "{engine}"
model = "{model}"
precision = "{precision}"
replicas = 1
max_replicas = 1
threads = 1
context = 1024
{extra}"""


def _ask(url: str, n: int, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": question(SeededDraw(n))}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": n,
    }
    resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    resp.raise_for_status()
    return resp.json()["usage"]  # type: ignore[no-any-return]


def _totals(url: str) -> dict[str, float]:
    dep = deployment(url, "bench")
    totals = dep["accounting"]["totals"]
    counters = dep["counters"]
    return {
        "energy_j": totals["energy_j_total"],
        "estimated_j": totals["estimated_energy_j_total"],
        "cost_usd": totals["cost_usd_total"],
        "tokens": counters["prompt_tokens_total"] + counters["completion_tokens_total"],
        "source": dep["accounting"]["energy_source"],
    }


def measure(url: str, clients: int, per_client: int, max_tokens: int, first: int) -> dict[str, Any]:
    # The accounting attributes energy by busy time once per tick: read it after a settled tick.
    time.sleep(1.5)
    before = _totals(url)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        usages = list(
            pool.map(lambda n: _ask(url, n, max_tokens), range(first, first + clients * per_client))
        )
    seconds = time.perf_counter() - started
    time.sleep(2.5)  # let the accounting tick count the tail of the batch
    after = _totals(url)
    completion = sum(u["completion_tokens"] for u in usages)
    tokens = after["tokens"] - before["tokens"]
    joules = after["energy_j"] - before["energy_j"]
    cost = after["cost_usd"] - before["cost_usd"]
    return {
        "clients": clients,
        "requests": len(usages),
        "seconds": round(seconds, 2),
        "completion_tokens": completion,
        "tokens_per_s": round(completion / seconds, 1),
        "j_per_token": round(joules / tokens, 4) if tokens else None,
        "usd_per_1m_tokens": round(cost / tokens * 1e6, 4) if tokens else None,
        "energy_source": after["source"],
        "energy_estimated_fraction": (
            round((after["estimated_j"] - before["estimated_j"]) / joules, 3) if joules else None
        ),
    }


def run_config(engine: str, extra: str, args: argparse.Namespace, work: Path,
               clients: list[int]) -> list[dict[str, Any]]:  # fmt: skip
    port = free_port()
    folder = work / f"{engine}-{len(list(work.iterdir()))}"
    folder.mkdir()
    config = folder / "agent.toml"
    config.write_text(CONFIG.format(
        port=port, state=folder / "state", engine=engine, model=args.model.resolve(),
        precision=args.precision, extra=extra,
    ))  # fmt: skip
    started = [launch(engine, agent_argv(config), folder / "agent.log")]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_serving(url, "bench", 300, accounted=True)
        _ask(url, 0, 4)  # warm
        return [
            measure(url, n, args.requests_per_client, args.max_tokens, first=1000 * (i + 1))
            for i, n in enumerate(clients)
        ]
    finally:
        stop_all(started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=Path("models/smollm2-135m-instruct.f16.gguf"))  # fmt: skip
    parser.add_argument("--precision", default="f16")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", default="1,2,4,8", help="slot counts to measure")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    slots = [int(s) for s in args.slots.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wattops-batching-") as tmp:
        work = Path(tmp)
        for row in run_config("llamacpp", "", args, work, [1, max(slots)]):
            rows.append({"engine": "worker", "slots": 1, **row})
            print(json.dumps(rows[-1]), flush=True)
        for n in slots:
            extra = f"parallel = {n}\n"
            for row in run_config("llamacpp-server", extra, args, work, [n]):
                rows.append({"engine": "llama-server", "slots": n, **row})
                print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores",
        "model": str(args.model),
        "precision": args.precision,
        "rows": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n| engine | slots | clients | tokens/s per replica | J/token | $/1M tokens |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['engine']} | {row['slots']} | {row['clients']} | {row['tokens_per_s']} "
              f"| {row['j_per_token']} | {row['usd_per_1m_tokens']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
