"""`wattops demo` (= `make demo`): a three-node fleet on loopback, with load, in the console.

Starts three agents on this machine with the hardware profiles of a cloud A100, a Jetson AGX
Orin and a plain CPU host (their sensors are not here, so their watts are the profiles'
estimates, labelled `est.`), each serving the trained SmolLM2-135M-Instruct at its own
precision (f16, q4_k_m, q8_0); starts a background load of real questions and instructions
against each (`wattops load --prompts questions`); opens the console. Quitting stops
everything it started.
`--headless` prints the status table every few seconds instead of opening the console.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from wattops.experiments.launch import (
    Launched,
    agent_argv,
    free_port,
    launch,
    stop_all,
    stop_on_hangup,
)

#: (node name, hardware profile, precision it starts at)
DEMO_NODES: tuple[tuple[str, str, str], ...] = (
    # Named after their hardware: in a mixed fleet the operator must see which node is which.
    ("gpu-a100", "a100-80gb", "f16"),
    ("jetson-orin", "jetson-agx-orin-64gb", "q4_k_m"),
    ("cpu-host", "cpu-generic", "q8_0"),
)

#: Nodes whose replicas are llama-server with parallel slots, the slots in use adapted by the
#: agent (continuous batching, as CPU hosts and Jetson boards run llama.cpp); the A100 node keeps
#: the single-stream worker, standing in for a GPU engine that batches on its own.
BATCHING_NODES = frozenset({"jetson-orin", "cpu-host"})
BATCHING = """\
parallel = 4
adaptive_parallel = true
adapt_window_s = 15
"""

#: The model the demo serves (`make models/smollm2-135m-instruct.f16.gguf`).
DEMO_MODEL = Path("models/smollm2-135m-instruct.f16.gguf")
#: The deployment's name on every node: what a client puts in `"model"`.
DEPLOYMENT = "smollm2"

AGENT_CONFIG = """\
[agent]
node = "{node}"
listen = "127.0.0.1:{port}"
state_dir = "{state_dir}"
profile = "{profile}"
sensor = "{sensor}"

[accounting]
window_s = 60
park_advice_after_s = 120

[[deployments]]
name = "{deployment}"
engine = "{engine}"
model = "{model}"
precision = "{precision}"
replicas = 1
max_replicas = 3
threads = 1
context = 1024
{batching}"""


@contextlib.contextmanager
def demo_fleet(model: Path, state_dir: Path, rate: float, with_load: bool = True
               ) -> Iterator[list[str]]:  # fmt: skip
    """Start the agents (and the load); yield their URLs; stop everything on exit."""
    started: list[Launched] = []
    with stop_on_hangup():
        try:
            urls = []
            for node, profile, precision in DEMO_NODES:
                port = free_port()
                node_dir = (state_dir / node).resolve()
                node_dir.mkdir(parents=True, exist_ok=True)
                config = node_dir / "agent.toml"
                config.write_text(AGENT_CONFIG.format(
                    node=node, port=port, state_dir=node_dir, profile=profile, sensor="estimate",
                    model=model.resolve(), precision=precision, deployment=DEPLOYMENT,
                    engine="llamacpp-server" if node in BATCHING_NODES else "llamacpp",
                    batching=BATCHING if node in BATCHING_NODES else "",
                ))  # fmt: skip
                started.append(launch(node, agent_argv(config), node_dir / "agent.log"))
                urls.append(f"http://127.0.0.1:{port}")
            _wait_ready(urls, started)
            if with_load:
                # A new prompt stream each run: the agents' disk caches keep answers across runs,
                # and a repeated stream would be all cache hits.
                seed = int(time.time())
                for n, (url, (node, _, _)) in enumerate(zip(urls, DEMO_NODES, strict=True)):
                    argv = [sys.executable, "-m", "wattops.console.cli", "load", "--agent", url,
                            "--model", DEPLOYMENT, "--rate", str(rate), "--duration", "86400",
                            "--prompts", "questions", "--max-tokens", "16,64",
                            "--idle-every", "90", "--idle-len", "20",
                            "--seed", str(seed + n), "--quiet"]  # fmt: skip
                    started.append(launch(f"load {node}", argv, state_dir / node / "load.log"))
            yield urls
        finally:
            stop_all(started)


def _wait_ready(urls: list[str], started: list[Launched], timeout_s: float = 600) -> None:
    print("wattops demo: starting 3 agents (the first run quantizes the model)...",
          flush=True)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    waiting = set(urls)
    while waiting and time.monotonic() < deadline:
        for item in started:
            if item.process.poll() is not None:
                raise SystemExit(f"wattops demo: {item.name} exited with code "
                                 f"{item.process.returncode}; see its agent.log")  # fmt: skip
        for url in list(waiting):
            try:
                node = httpx.get(f"{url}/v1/node", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                continue
            if all(d["ready_replicas"] >= 1 for d in node["deployments"]):
                print(f"  {node['node']} ready at {url}", flush=True)
                waiting.discard(url)
        time.sleep(0.5)
    if waiting:
        raise SystemExit(f"wattops demo: not ready after {timeout_s:.0f}s: {sorted(waiting)}")


def run_demo(model: Path, state_dir: Path, headless: bool, rate: float,
             interval_s: float = 5.0) -> int:  # fmt: skip
    """Run the demo until the console quits (or Ctrl-C when headless)."""
    if not model.exists():
        print(f"wattops demo: {model} is missing; run `make {DEMO_MODEL}` (or give "
              "--model any f16 GGUF)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        with demo_fleet(model, state_dir, rate) as urls:
            if headless:
                from wattops.console.commands import fleet_rows, render_table
                from wattops.fleet.client import fetch_snapshots

                while True:
                    rows = fleet_rows(asyncio.run(fetch_snapshots(urls)))
                    print(time.strftime("\n%H:%M:%S"), flush=True)
                    print(render_table(rows), flush=True)
                    time.sleep(interval_s)
            else:
                from wattops.console.app import make_app

                make_app(urls).run()
    except KeyboardInterrupt:
        pass
    print("wattops demo: stopped everything it started.")
    return 0
