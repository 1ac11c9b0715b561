"""Router overhead benchmark: what wattops-router adds in front of an agent.

Usage: .venv/bin/python benchmarks/router.py [--requests 20000] [--keys]
                                             [--store sqlite|redis|both] [--two-routers]
                                             [--stream] [--litellm PATH] [--out results.json]

Starts (each in its own process) the fast stand-in engine of benchmarks/gateway.py (answers
every OpenAI chat request at once with a fixed body), a real wattops-agent attached to it, and
a real wattops-router with one route whose only candidate is that agent's deployment. A load
generator (aiohttp, uvloop) then measures, at concurrency 1 and 32, in the same run:
  - agent: client -> agent -> stand-in engine
  - router: client -> router -> agent -> stand-in engine
Sampling requests (temperature 0.7): never answered from the agent's response cache. Added
latency is the router path's percentile minus the agent path's; the throughput ratio is the
router path's requests/s over the agent path's. All four processes share this machine's cores.

With `--keys`, the router path carries an API key (`Authorization: Bearer wok_...`) covered by
three budgets (the key's USD per day, its team's kWh per month, the fleet's USD per month, all
far from their limits): each request is authenticated, checked and reserved against them, and
written to the SQLite ledger when it ends. Without, the ledger still gets its row per request.
With `--store redis`, keys, budgets and the ledger are in a real redis-server started for the
run on this machine (append-only file, fsync every second: the durability the docs advise),
reached over loopback TCP: the shared store of several routers, here measured with one. With
`--store both`, one router on each store, measured in the same run (paths `router`, SQLite,
and `router_redis`); `--two-routers` adds `routers_redis_x2`: two routers on the one Redis,
the load split between them (half the clients each), as behind a load balancer.

With `--stream`, every request is streamed (the stand-in sends a role event, 16 token events,
the finish and `[DONE]`, one write each) and read to its end: the router's event relay, which
asks for and strips the usage chunk, on the path.

With `--litellm PATH` (the `litellm` command of an environment that has `litellm[proxy]`: it
is not one of wattops' dependencies), LiteLLM's proxy is measured in the same role and the
same run: client -> LiteLLM proxy -> agent -> stand-in engine, one model `chat` whose
deployment is the agent's OpenAI endpoint, a master key (it refuses to start without one; the
check is a string compare), no database, no callbacks, its bundled model-cost map (no
network), one worker process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway import free_port, load, summarize, wait_http


def _key_and_budgets(router: str) -> dict[str, str]:
    """A key with a daily USD budget, a team kWh budget and a fleet USD budget, all far from
    their limits; the Authorization header that carries the key."""
    import httpx

    admin = {"Authorization": "Bearer bench-admin"}
    made = httpx.post(f"{router}/v1/keys", headers=admin, timeout=10,
                      json={"team": "bench", "budget_usd_day": 1e6}).json()  # fmt: skip
    for budget in (
        {"name": "team-kwh", "scope": "team", "subject": "bench", "unit": "kwh",
         "window": "month", "limit": 1e6},
        {"name": "fleet-usd", "scope": "fleet", "unit": "usd", "window": "month", "limit": 1e6},
    ):  # fmt: skip
        httpx.post(f"{router}/v1/budgets", headers=admin, json=budget, timeout=10)
    return {"Authorization": f"Bearer {made['key']}"}


async def _split(where: list[tuple[str, bytes, dict[str, str]]], concurrency: int,
                 total: int) -> tuple[list[float], float]:  # fmt: skip
    """`load` spread over `where` (several routers behind one client pool): each gets its
    share of the clients and requests, at the same time; the latencies together, the wall
    time of the slowest."""
    share = max(1, concurrency // len(where))
    done = await asyncio.gather(*(
        load(base + "/v1/chat/completions", payload, share, total // len(where), headers)
        for base, payload, headers in where
    ))  # fmt: skip
    return [x for lat, _ in done for x in lat], max(wall for _, wall in done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per measurement at c=32")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--keys", action="store_true", help="a key and three budgets on the way")
    parser.add_argument("--stream", action="store_true",
                        help="streamed answers (16 token events each), read to [DONE]")  # fmt: skip
    parser.add_argument(
        "--store",
        choices=["sqlite", "redis", "both"],
        default="sqlite",
        help="where keys, budgets and the ledger are kept (default: sqlite)",
    )
    parser.add_argument("--two-routers", action="store_true",
                        help="also two routers on the one Redis (with --store both)")  # fmt: skip
    parser.add_argument("--litellm", type=Path, metavar="PATH",
                        help="also measure LiteLLM's proxy (its `litellm` command)")  # fmt: skip
    args = parser.parse_args()
    if args.litellm is not None and not os.access(args.litellm, os.X_OK):
        parser.error(f"--litellm: {args.litellm} is not an executable (give the `litellm` "
                     "command of a venv with litellm[proxy] installed)")  # fmt: skip

    engine_port, agent_port, router_port = free_port(), free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        agent_config = Path(tmp) / "agent.toml"
        agent_config.write_text(f"""
[agent]
node = "bench"
listen = "127.0.0.1:{agent_port}"
state_dir = "{tmp}/state"

[cache]
disk_bytes = 0

[[deployments]]
name = "bench"
engine = "openai"
url = "http://127.0.0.1:{engine_port}"
precision = "f16"
""")
        redis_url = None
        if args.store in ("redis", "both"):
            redis_port = free_port()
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", tmp,
                 "--save", "", "--appendonly", "yes", "--appendfsync", "everysec"],
                stdout=subprocess.DEVNULL,
            ))  # fmt: skip
        # name -> (store, port): the routers measured, each with its own state folder.
        routers: dict[str, tuple[str, int]] = {}
        if args.store == "redis":
            routers["router"] = (str(redis_url), router_port)
        else:
            routers["router"] = ("sqlite", router_port)
        if args.store == "both":
            routers["router_redis"] = (str(redis_url), free_port())
            if args.two_routers:
                routers["router_redis_b"] = (str(redis_url), free_port())
        try:
            gateway_script = Path(__file__).with_name("gateway.py")
            procs.append(subprocess.Popen(
                [sys.executable, str(gateway_script), "--stand-in-port", str(engine_port)]
            ))  # fmt: skip
            wait_http(f"http://127.0.0.1:{engine_port}/health")
            quiet = ["--log-level", "warning"]
            procs.append(subprocess.Popen(
                [str(bin_dir / "wattops-agent"), "--config", str(agent_config), *quiet]
            ))  # fmt: skip
            wait_http(f"http://127.0.0.1:{agent_port}/healthz")
            for name, (store, port) in routers.items():
                config = Path(tmp) / f"{name}.toml"
                config.write_text(f"""
[router]
listen = "127.0.0.1:{port}"
state_dir = "{tmp}/{name}-state"
token = "bench-admin"
store = "{store}"

[[agents]]
url = "http://127.0.0.1:{agent_port}"

[[routes]]
name = "chat"
candidates = ["bench/bench"]
reference = "bench/bench"
""")
                procs.append(subprocess.Popen(
                    [str(bin_dir / "wattops-router"), "--config", str(config), *quiet]
                ))  # fmt: skip
                wait_http(f"http://127.0.0.1:{port}/healthz")
            paths = ["agent", *(n for n in routers if n != "router_redis_b")]
            if "router_redis_b" in routers:
                paths.append("routers_redis_x2")
            if args.litellm is not None:
                litellm_port = free_port()
                litellm_config = Path(tmp) / "litellm.yaml"
                litellm_config.write_text(f"""
model_list:
  - model_name: chat
    litellm_params:
      model: openai/bench
      api_base: http://127.0.0.1:{agent_port}/v1
      api_key: unused
litellm_settings:
  telemetry: false
general_settings:
  master_key: sk-wattops-bench
""")
                env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                       "LITELLM_LOG": "ERROR"}  # fmt: skip
                procs.append(subprocess.Popen(
                    [str(args.litellm), "--config", str(litellm_config), "--host", "127.0.0.1",
                     "--port", str(litellm_port), "--num_workers", "1"],
                    env=env, stdout=subprocess.DEVNULL,
                ))  # fmt: skip
                wait_http(f"http://127.0.0.1:{litellm_port}/health/liveliness", timeout=120)
                paths.append("litellm")
            time.sleep(2.0)  # the agent marks the attached server ready; the router sees it
            auth: dict[str, dict[str, str]] = {name: {} for name in routers}
            if args.keys:
                for name, (_, port) in routers.items():
                    if name != "router_redis_b":  # the same Redis: its key is router_redis's
                        auth[name] = _key_and_budgets(f"http://127.0.0.1:{port}")
                if "router_redis_b" in routers:
                    auth["router_redis_b"] = auth["router_redis"]

            def body(model: str) -> bytes:
                asked = {"model": model, "temperature": 0.7, "max_tokens": 1,
                         "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
                if args.stream:
                    asked["stream"] = True
                return orjson.dumps(asked)

            # path -> [(base URL, body, headers)]: the load is split across the list.
            targets = {"agent": [(f"http://127.0.0.1:{agent_port}", body("bench"), {})]}
            for name, (_, port) in routers.items():
                if name != "router_redis_b":
                    targets[name] = [(f"http://127.0.0.1:{port}", body("chat"), auth[name])]
            if "router_redis_b" in routers:
                targets["routers_redis_x2"] = [
                    (f"http://127.0.0.1:{routers[n][1]}", body("chat"), auth[n])
                    for n in ("router_redis", "router_redis_b")
                ]
            if "litellm" in paths:
                targets["litellm"] = [(f"http://127.0.0.1:{litellm_port}", body("chat"),
                                       {"Authorization": "Bearer sk-wattops-bench"})]  # fmt: skip
            results: dict[str, dict[str, float]] = {}
            for concurrency in (1, 32):
                n = args.requests if concurrency > 1 else max(2000, args.requests // 5)
                # Alternated twice, so a slow spell of the shared machine hits both paths.
                for rnd in (1, 2):
                    for label, where in targets.items():
                        lat, wall = asyncio.run(_split(where, concurrency, n // 2))
                        key = f"{label}_c{concurrency}"
                        got = summarize(lat, wall)
                        if rnd == 1:
                            results[key] = got
                        else:  # mean of the two rounds
                            results[key] = {k: (results[key][k] + v) / 2 for k, v in got.items()}
            for c in (1, 32):
                for label in paths[1:]:  # "added_c1" is the router's, as before
                    added = "added" if label == "router" else f"added_{label}"
                    results[f"{added}_c{c}"] = {
                        q: results[f"{label}_c{c}"][q] - results[f"agent_c{c}"][q]
                        for q in ("p50_ms", "p99_ms")
                    }
                    results[f"{added}_c{c}"]["throughput_ratio"] = (
                        results[f"{label}_c{c}"]["req_per_s"] / results[f"agent_c{c}"]["req_per_s"]
                    )
            if "router_redis_c32" in results:  # the targets: Redis against SQLite, x2 routers
                results["redis_over_sqlite_c32"] = {"throughput_ratio": (
                    results["router_redis_c32"]["req_per_s"] / results["router_c32"]["req_per_s"]
                )}  # fmt: skip
            if "routers_redis_x2_c32" in results:
                results["two_routers_over_one_c32"] = {"throughput_ratio": (
                    results["routers_redis_x2_c32"]["req_per_s"]
                    / results["router_redis_c32"]["req_per_s"]
                )}  # fmt: skip
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "requests": args.requests,
        "keys_and_budgets": args.keys,
        "store": args.store,
        "stream": args.stream,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
