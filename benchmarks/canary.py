"""A canary precision switch on SmolLM2 under steady load: its verdict and every figure.

Usage: .venv/bin/python benchmarks/canary.py [--model models/smollm2-135m-instruct.f16.gguf]
       [--serving q8_0] [--candidate q4_k_m] [--share 0.25] [--duration 180]
       [--clients 2] [--max-tokens 32] [--guard NAME=VALUE ...] [--out results.json]

A fresh wattops-agent serves the model at `--serving` with one replica on one thread (the
candidate gets one more replica on one thread: the two cores of this machine). `--clients`
closed-loop clients send the project's built-in questions (sampled at temperature 0.7 with a
seed per request, response cache off; every other client streams, for the time to first
token). Once the deployment serves, the canary is started with
the default guards (accuracy drop at most 1.5 points on 200 labelled probes, KL at most 0.1
nats/token, p95 at most 10% worse, J/token not worse, 50 shadowed pairs) unless `--guard` says
otherwise, and the script waits for its verdict, then prints the deployment's `canary` status
as JSON: both sides' requests, tokens, busy seconds, J/token, $/1M tokens and p50/p95 over the
same window, the probes' accuracy on each side and the drop with its interval, the KL, the
shadowed pairs' agreement and chrF, and the verdict. Energy is whatever sensor the agent has
here (labelled `energy_source`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from agent_wait import deployment, wait_serving

from wattops.experiments.launch import agent_argv, free_port, launch, stop_all
from wattops.experiments.questions import SeededDraw, question

CONFIG = """\
[agent]
node = "bench-canary"
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
name = "chat"
engine = "llamacpp"
model = "{model}"
precision = "{precision}"
replicas = 1
max_replicas = 2
threads = 1
context = 1024
"""


def _guard(text: str) -> tuple[str, float | int | str | None]:
    name, _, value = text.partition("=")
    if name == "accuracy_verdict":
        return name, value
    if value.lower() == "none":
        return name, None
    return name, int(value) if name in ("min_pairs", "probes") else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=Path("models/smollm2-135m-instruct.f16.gguf"))  # fmt: skip
    parser.add_argument("--serving", default="q8_0")
    parser.add_argument("--candidate", default="q4_k_m")
    parser.add_argument("--share", type=float, default=0.25)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--guard", action="append", default=[], type=_guard)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started: list[Any] = []
    stop = threading.Event()
    answered: list[int] = []
    failed: list[str] = []

    def client(n: int) -> None:
        i = 0
        with httpx.Client(base_url=url, timeout=600) as c:
            while not stop.is_set():
                seed = n * 1_000_000 + i
                i += 1
                ask = [{"role": "user", "content": question(SeededDraw(seed))}]
                body = {"model": "chat", "temperature": 0.7, "seed": seed, "stream": n % 2 == 0,
                        "max_tokens": args.max_tokens, "messages": ask}  # fmt: skip
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    (answered if resp.status_code == 200 else failed).append(resp.status_code)
                except httpx.HTTPError as exc:
                    failed.append(repr(exc))  # type: ignore[arg-type]

    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        model = args.model.resolve()
        config.write_text(CONFIG.format(port=port, state=f"{tmp}/state", model=model,
                                        precision=args.serving))  # fmt: skip
        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        try:
            started.append(launch("agent", agent_argv(config), Path(tmp) / "agent.log"))
            wait_serving(url, "chat")
            for t in threads:
                t.start()
            time.sleep(10)  # the serving side warm before the window opens
            spec = {"share": args.share, "duration_s": args.duration, "guards": dict(args.guard)}
            resp = httpx.post(f"{url}/v1/deployments/chat/precision", timeout=30,
                              json={"precision": args.candidate, "canary": spec})  # fmt: skip
            resp.raise_for_status()
            began = time.monotonic()
            while True:
                canary = deployment(url, "chat")["canary"]
                if canary and canary["verdict"] and canary["state"] != "promoting":
                    break
                if time.monotonic() - began > args.duration + 600:
                    raise RuntimeError("no verdict")
                time.sleep(2)
            dep = deployment(url, "chat")
        finally:
            stop.set()
            for t in threads:
                if t.is_alive():
                    t.join(600)
            stop_all(started)
    report = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "command": " ".join(["benchmarks/canary.py", *sys.argv[1:]]),
        "model": str(args.model),
        "energy_source": (dep.get("accounting") or {}).get("energy_source"),
        "answered": len(answered),
        "failed": len(failed),
        "precision_after": dep["precision"],
        "canary": dep["canary"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
