"""Predictive scaling against the reactive rule on a workload with a repeating daily shape,
compressed in time: cold-start waits avoided, p95, cost.

Usage: .venv/bin/python benchmarks/predictive.py [--model models/smollm2-135m-instruct.f16.gguf]
       [--precision q8_0] [--season 60] [--bucket 5] [--seasons 3] [--quiet-rps 0.2]
       [--busy-rps 3] [--max-tokens 24] [--seed 7] [--out results.json]

The same open-loop arrival stream (Poisson, seeded) is sent to two fresh agents in turn, one
with the reactive autoscaler (the HorizontalPodAutoscaler's rule on requests in flight) and one
with `autoscale_predictive` on top of it. The "day" is `--season` seconds: quiet for the first
half, busy from 50% to 85% of it, quiet again. The first season is the learning one (the
forecast has nothing before it); figures are from the seasons after it only. Both agents run
one replica on one thread at first, up to two (the two cores here), target 1 request in flight.

Reported per mode, over the measured seasons: requests, p50/p95 latency overall and in the
rise windows (the first fifth of each busy stretch), "cold-start waits" (requests that arrived
while the deployment had asked for more replicas than were ready, i.e. waited on a replica
still loading, sampled every 0.1 s from the agent's snapshot), replica-seconds held, and the
cost the agent accounted to the deployment over the same span (at the cpu-generic profile's
price, each one-thread replica holding an eighth of the node while it runs, plus electricity).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
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
node = "bench-predictive"
listen = "127.0.0.1:{port}"
state_dir = "{state}"
profile = "cpu-generic"
sensor = "auto"
health_interval_s = 0.25

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
autoscale_target_in_flight = 1.0
autoscale_min_replicas = 1
autoscale_stabilization_s = {stabilization}
autoscale_predictive = {predictive}
autoscale_season_s = {season}
autoscale_season_bucket_s = {bucket}
"""


def busy(phase: float) -> bool:
    """The day's shape: busy from 50% to 85% of the season."""
    return 0.5 <= phase < 0.85


def arrivals(args: argparse.Namespace) -> list[float]:
    """Seconds from the start at which requests arrive (Poisson at the shape's rate)."""
    rng = random.Random(args.seed)
    top = max(args.busy_rps, args.quiet_rps)
    out, t, end = [], 0.0, args.season * args.seasons
    while True:  # thinning (Lewis-Shedler): the rate changes exactly at the shape's edges
        t += rng.expovariate(top)
        if t >= end:
            return out
        rate = args.busy_rps if busy((t % args.season) / args.season) else args.quiet_rps
        if rng.random() < rate / top:
            out.append(t)


def run(args: argparse.Namespace, predictive: bool, plan: list[float]) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[float, float, int]] = []  # (arrival s, latency s, status)
    samples: list[tuple[float, int, int]] = []  # (s, desired, ready)
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        config.write_text(CONFIG.format(
            port=port, state=f"{tmp}/state", model=args.model.resolve(), precision=args.precision,
            predictive=str(predictive).lower(), season=args.season, bucket=args.bucket,
            stabilization=args.bucket,
        ))  # fmt: skip
        started = [launch("agent", agent_argv(config), Path(tmp) / "agent.log")]
        try:
            wait_serving(url, "chat")
            # The season's phase is wall-clock time modulo its length (as for a real day):
            # start the stream at a season boundary so the shape lines up with the forecast.
            t0 = (time.time() // args.season + 1) * args.season
            time.sleep(max(0.0, t0 - time.time()))
            start_mono = time.monotonic()
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    try:
                        d = deployment(url, "chat")
                        samples.append((time.monotonic() - start_mono, d["desired_replicas"],
                                        d["ready_replicas"]))  # fmt: skip
                    except (httpx.HTTPError, StopIteration):
                        pass
                    time.sleep(0.1)

            def send(at: float, seed: int) -> None:
                ask = [{"role": "user", "content": question(SeededDraw(seed))}]
                body = {"model": "chat", "temperature": 0.7, "seed": seed,
                        "max_tokens": args.max_tokens, "messages": ask}  # fmt: skip
                began = time.monotonic()
                try:
                    status = httpx.post(url + "/v1/chat/completions", json=body,
                                        timeout=300).status_code  # fmt: skip
                except httpx.HTTPError:
                    status = 0
                with lock:
                    results.append((at, time.monotonic() - began, status))

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            before: dict[str, Any] | None = None
            senders = []
            for i, at in enumerate(plan):
                time.sleep(max(0.0, start_mono + at - time.monotonic()))
                if before is None and at >= args.season:  # the measured seasons begin
                    before = httpx.get(url + "/v1/node", timeout=10).json()
                sender = threading.Thread(target=send, args=(at, args.seed * 100_000 + i))
                sender.start()
                senders.append(sender)
            for sender in senders:
                sender.join(300)
            done.set()
            watcher.join(5)
            after = httpx.get(url + "/v1/node", timeout=10).json()
            dep = next(d for d in after["deployments"] if d["name"] == "chat")
        finally:
            stop_all(started)
    assert before is not None, "no arrival after the learning season: give --seasons 2 or more"
    return summarise(args, predictive, results, samples, before, after, dep)


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarise(args: argparse.Namespace, predictive: bool, results: list[tuple[float, float, int]],
              samples: list[tuple[float, int, int]], before: dict[str, Any],
              after: dict[str, Any], dep: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    learn = args.season  # the first season only teaches the forecast
    measured = [(at, lat, st) for at, lat, st in results if at >= learn]
    ok = [lat for _, lat, st in measured if st == 200]
    busy_len = 0.35 * args.season

    def rising(at: float) -> bool:
        phase = (at % args.season) / args.season
        return 0.5 <= phase < 0.5 + 0.2 * 0.35

    loading = [(t, desired > ready) for t, desired, ready in samples if t >= learn]

    def waited(at: float) -> bool:
        near = [flag for t, flag in loading if abs(t - at) <= 0.1]
        return any(near)

    held = 0.0
    for (t1, _, ready), (t2, _, _) in itertools.pairwise(samples):
        if t1 >= learn:
            held += ready * (t2 - t1)

    def held_usd(node: dict[str, Any]) -> float:
        dep = next(d for d in node["deployments"] if d["name"] == "chat")
        return float(dep["accounting"]["totals"]["cost_usd_total"])

    # The deployment's own cost (the share of the node its replicas held, plus electricity):
    # the node's total is billed whole whatever runs on it.
    cost = held_usd(after) - held_usd(before)
    return {
        "mode": "predictive" if predictive else "reactive",
        "requests": len(measured),
        "failed": sum(1 for _, _, st in measured if st != 200),
        "p50_s": _p(ok, 0.5),
        "p95_s": _p(ok, 0.95),
        "rise_p95_s": _p([lat for at, lat, st in measured if st == 200 and rising(at)], 0.95),
        "rise_requests": sum(1 for at, _, _ in measured if rising(at)),
        "cold_start_waits": sum(1 for at, _, _ in measured if waited(at)),
        "replica_seconds": round(held, 1),
        "busy_stretch_s": busy_len,
        "cost_usd": round(cost, 6),
        "forecast": dep.get("forecast"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path,
                        default=Path("models/smollm2-135m-instruct.f16.gguf"))  # fmt: skip
    parser.add_argument("--precision", default="q8_0")
    parser.add_argument("--season", type=float, default=60.0)
    parser.add_argument("--bucket", type=float, default=5.0)
    parser.add_argument("--seasons", type=int, default=3)
    parser.add_argument("--quiet-rps", type=float, default=0.2)
    parser.add_argument("--busy-rps", type=float, default=3.0)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    plan = arrivals(args)
    modes = [run(args, False, plan), run(args, True, plan)]
    report = {
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "command": " ".join(["benchmarks/predictive.py", *sys.argv[1:]]),
        "arrivals": len(plan),
        "modes": modes,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
