"""`wattops demo`: one agent on loopback serving the generated demo model.

The console issue grows this into the full three-node demo; for now it starts one agent,
prints how to query it, and stops everything it started on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

DEMO_CONFIG = """\
[agent]
node = "demo-node"
listen = "127.0.0.1:{port}"
state_dir = "{state_dir}"

[[deployments]]
name = "tiny"
engine = "llamacpp"
model = "{model}"
precision = "q8_0"
replicas = 1
max_replicas = 3
idle_scale_to_zero_s = 600
threads = {threads}
"""


def run_demo(model: Path, port: int, state_dir: Path) -> int:
    """Start the demo agent in the foreground; returns its exit code."""
    if not model.exists():
        print(
            f"wattops demo: {model} is missing; run `make models/demo.gguf` or "
            f"`wattops model tiny {model} --size demo` first",
            file=sys.stderr,
        )
        return 2
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / "agent.toml"
    threads = max(1, (os.cpu_count() or 2) // 2)
    config_path.write_text(
        DEMO_CONFIG.format(
            port=port, state_dir=state_dir.resolve(), model=model.resolve(), threads=threads
        )
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "wattops.agents.main", "--config", str(config_path)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if agent.poll() is not None:
                return agent.returncode or 1
            try:
                node = httpx.get(f"{url}/v1/node", timeout=1).json()
                if all(d["ready_replicas"] >= 1 for d in node["deployments"]):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        print(
            f"""
wattops demo: agent on {url} serving deployment "tiny" (demo model, q8_0).

  curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model":"tiny","temperature":0,"max_tokens":32,
            "messages":[{{"role":"user","content":"hello"}}]}}'
  curl -s {url}/v1/node | python3 -m json.tool
  curl -s {url}/v1/deployments/tiny/precision -H 'Content-Type: application/json' \\
       -d '{{"precision":"q4_k_m"}}'
  curl -s {url}/v1/deployments/tiny/scale -H 'Content-Type: application/json' \\
       -d '{{"replicas":2}}'

Ctrl-C stops the agent and its replicas.
""",
            flush=True,
        )
        return agent.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(30)
            except subprocess.TimeoutExpired:
                agent.kill()
