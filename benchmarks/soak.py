"""A fault soak: clients through the router to two agents while things break, on loopback.

Usage: .venv/bin/python benchmarks/soak.py [--clients 16] [--duration 180] [--out soak.json]

Starts two real wattops-agents (llama.cpp on the generated test model, two replicas each, a
response cache whose disk tier is capped at 256 KiB) and a real wattops-router with one route
over both. `--clients` closed-loop clients send chat requests through the router (half of them
greedy and repeated, so the cache fills and evicts; half sampled). Every `--every` seconds one
fault, in turn:

  1. a replica SIGKILLed (its agent restarts it);
  2. a precision switch on one agent (q8_0 <-> q4_k_m);
  3. an agent SIGKILLed, and started again 3 s later with the same files;
  4. the cache pushed past its cap (a burst of distinct greedy requests).

Meanwhile every agent's snapshot is read each second, and counters that must only grow
(node energy and cost, each deployment's requests and tokens) are checked never to fall; after
an agent's restart its desired state (precision, replicas) is compared with before. The report:
requests sent, answered, failed (with why, and how many were in flight on the agent killed at
that moment), the router's fallbacks (requests it retried elsewhere before answering), the
counters that fell (should be none), the desired state kept (should be all), and `wattops
ledger verify` on the router's ledger once everything has stopped (should be ok).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from wattops.experiments.launch import Launched, agent_argv, free_port, launch, stop_all

ROOT = Path(__file__).resolve().parent.parent

AGENT = """\
[agent]
node = "{node}"
listen = "127.0.0.1:{port}"
state_dir = "{state}"
sensor = "estimate"
health_interval_s = 0.5

[cache]
memory_bytes = 65536
disk_bytes = 262144

[[deployments]]
name = "tiny"
engine = "llamacpp"
model = "{model}"
precision = "q8_0"
replicas = 2
max_replicas = 3
threads = 1
context = 512
"""


class Soak:
    def __init__(self, folder: Path, model: Path, clients: int) -> None:
        self.folder = folder
        self.model = model
        self.clients = clients
        self.ports = [free_port(), free_port()]
        self.nodes = ["soak-a", "soak-b"]
        self.agents: dict[str, Launched] = {}
        self.started: list[Launched] = []
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.sent = 0
        self.lock = threading.Lock()
        self.killed_at: list[float] = []
        self.events: list[str] = []
        self.fell: list[str] = []
        self.kept: list[bool] = []
        self.last: dict[str, dict[str, float]] = {}

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.ports[n]}"

    def start_agent(self, n: int) -> None:
        node = self.nodes[n]
        config = self.folder / f"{node}.toml"
        config.write_text(AGENT.format(node=node, port=self.ports[n], model=self.model,
                                       state=self.folder / node))  # fmt: skip
        launched = launch(node, agent_argv(config), self.folder / f"{node}.log")
        self.agents[node] = launched
        self.started.append(launched)
        _wait(self.url(n) + "/healthz")

    def start_router(self) -> str:
        port = free_port()
        config = self.folder / "router.toml"
        agents = "".join(f'[[agents]]\nurl = "{self.url(n)}"\n\n' for n in range(2))
        config.write_text(f'[router]\nlisten = "127.0.0.1:{port}"\nstate_dir = '
                          f'"{self.folder}/router"\n\n{agents}[[routes]]\nname = "chat"\n'
                          'candidates = ["*/tiny"]\nreference = "soak-a/tiny"\n'
                          'policy = "fastest"\n\n'
                          # Budgets far from their limits: every answer is reserved and
                          # counted, and `wattops ledger verify` re-adds their windows.
                          '[[budgets]]\nname = "fleet-hour"\nscope = "fleet"\nunit = "usd"\n'
                          'window = "hour"\nlimit = 1000000.0\n\n'
                          '[[budgets]]\nname = "route-kwh"\nscope = "route"\nsubject = "chat"\n'
                          'unit = "kwh"\nwindow = "day"\nlimit = 1000000.0\n')  # fmt: skip
        argv = [str(Path(sys.executable).with_name("wattops-router")), "--config", str(config)]
        self.started.append(launch("router", argv, self.folder / "router.log"))
        url = f"http://127.0.0.1:{port}"
        _wait(url + "/healthz")
        deadline = time.monotonic() + 60
        while httpx.get(url + "/v1/router").json()["agents_live"] < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the router did not see both agents")
            time.sleep(0.5)
        return url

    def client(self, n: int, router: str) -> None:
        i = 0
        with httpx.Client(base_url=router, timeout=120) as c:
            while not self.stop.is_set():
                i += 1
                greedy = n % 2 == 0
                text = f"question {i % 7}" if greedy else f"client {n} asks {i}"
                body = {"model": "chat", "max_tokens": 8, "temperature": 0.0 if greedy else 0.8,
                        "messages": [{"role": "user", "content": text}]}  # fmt: skip
                with self.lock:
                    self.sent += 1
                try:
                    resp = c.post("/v1/chat/completions", json=body)
                    kind = "answered" if resp.status_code == 200 else f"http {resp.status_code}"
                except httpx.HTTPError as exc:
                    kind = f"error {type(exc).__name__}"
                with self.lock:
                    self.outcomes[kind] += 1

    def watch(self) -> None:
        """Read every agent's counters each second; note any that fell."""
        while not self.stop.is_set():
            for n, node in enumerate(self.nodes):
                try:
                    snap = httpx.get(self.url(n) + "/v1/node", timeout=2).json()
                except (httpx.HTTPError, ValueError):
                    continue  # killed for the moment
                now = {"energy_j": snap["totals"]["energy_j_total"],
                       "cost_usd": snap["totals"]["cost_usd_total"]}  # fmt: skip
                for d in snap["deployments"]:
                    c = d["counters"]
                    now[f"{d['name']}.requests"] = c["requests_total"]
                    now[f"{d['name']}.prompt_tokens"] = c["prompt_tokens_total"]
                    now[f"{d['name']}.completion_tokens"] = c["completion_tokens_total"]
                before = self.last.get(node, {})
                for key, value in now.items():
                    if key in before and value < before[key] - 1e-9:
                        self.fell.append(f"{node} {key}: {before[key]} -> {value}")
                self.last[node] = {**before, **now}
            time.sleep(1.0)

    def fault(self, turn: int) -> None:
        n = turn % 2
        node, url = self.nodes[n], self.url(n)
        kind = turn % 4
        if kind == 0:
            pids = [r["pid"] for r in httpx.get(url + "/v1/node").json()["deployments"][0]
                    ["replicas"] if r.get("pid")]  # fmt: skip
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                self.events.append(f"{node}: replica {pids[0]} SIGKILLed")
        elif kind == 1:
            dep = httpx.get(url + "/v1/node").json()["deployments"][0]
            target = "q4_k_m" if dep["desired_precision"] == "q8_0" else "q8_0"
            httpx.post(url + "/v1/deployments/tiny/precision", json={"precision": target})
            self.events.append(f"{node}: precision switch to {target}")
        elif kind == 2:
            dep = httpx.get(url + "/v1/node").json()["deployments"][0]
            desired = (dep["desired_precision"], dep["desired_replicas"])
            self.agents[node].process.send_signal(signal.SIGKILL)
            self.agents[node].process.wait(10)
            self.killed_at.append(time.monotonic())
            time.sleep(3.0)
            self.start_agent(n)
            dep = httpx.get(url + "/v1/node").json()["deployments"][0]
            kept = (dep["desired_precision"], dep["desired_replicas"]) == desired
            self.kept.append(kept)
            self.events.append(f"{node}: SIGKILLed, started again; desired state "
                               f"{'kept' if kept else 'LOST'} {desired}")  # fmt: skip
        else:
            with httpx.Client(base_url=url, timeout=120) as c:
                for i in range(60):
                    c.post("/v1/chat/completions", json={
                        "model": "tiny", "max_tokens": 16, "temperature": 0.0,
                        "messages": [{"role": "user", "content": f"fill {turn} {i}"}]})  # fmt: skip
            size = sum(p.stat().st_size for p in (self.folder / node / "response-cache")
                       .rglob("*") if p.is_file())  # fmt: skip
            self.events.append(f"{node}: cache pushed past its cap; disk tier now {size} bytes "
                               "(cap 262144, plus the store's own index)")  # fmt: skip


def _wait(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--every", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = ROOT / "models" / "test.gguf"
    if not model.exists():
        subprocess.run([sys.executable, "-m", "wattops.console.cli", "model", "tiny", str(model)],
                       check=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        soak = Soak(Path(tmp), model, args.clients)
        try:
            for n in range(2):
                soak.start_agent(n)
            router = soak.start_router()
            threads = [threading.Thread(target=soak.client, args=(n, router))
                       for n in range(args.clients)]  # fmt: skip
            threads.append(threading.Thread(target=soak.watch))
            for t in threads:
                t.start()
            began = time.monotonic()
            turn = 0
            while time.monotonic() - began < args.duration:
                time.sleep(args.every)
                soak.fault(turn)
                turn += 1
            soak.stop.set()
            for t in threads:
                t.join(180)
            view = httpx.get(router + "/v1/router").json()
        finally:
            soak.stop.set()
            stop_all(soak.started)
        # The router's ledger at rest, re-added and compared (`wattops ledger verify`).
        verified = subprocess.run([str(Path(sys.executable).with_name("wattops")), "ledger",
                                   "verify", "--state-dir", f"{tmp}/router", "--json"],
                                  capture_output=True, text=True, timeout=600)  # fmt: skip
        ledger = json.loads(verified.stdout) if verified.stdout else {"error": verified.stderr}
    route = view["routes"][0]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "command": " ".join(["benchmarks/soak.py", *sys.argv[1:]]),
        "clients": args.clients,
        "duration_s": args.duration,
        "sent": soak.sent,
        "outcomes": dict(soak.outcomes),
        "router_fallbacks": route.get("fallbacks"),
        "router_errors": route.get("errors"),
        "faults": soak.events,
        "counters_that_fell": soak.fell,
        "desired_state_kept": f"{sum(soak.kept)} of {len(soak.kept)} restarts",
        "ledger_verify": ledger,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
