"""`make demo`'s fleet: three agents named after their hardware, serving the trained SmolLM2 at
f16, q4_k_m and q8_0, answering real questions in English (asked through the official `openai`
client, as an application would)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import ROOT
from wattops.console.commands import fleet_rows, render_table
from wattops.console.demo import BATCHING_NODES, DEMO_MODEL, DEMO_NODES, DEPLOYMENT, demo_fleet
from wattops.fleet.client import fetch_snapshots

MODEL = ROOT / DEMO_MODEL


def _ask(url: str, question: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.chat.completions.create(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": question}],
        max_tokens=32,
        temperature=0,
    )
    return answer.choices[0].message.content or ""


@pytest.mark.timeout(900)
def test_the_demo_fleet_serves_smollm2_and_answers_in_english(tmp_path: Path) -> None:
    assert MODEL.exists(), "make test builds it: wattops model smollm2 models"
    with demo_fleet(MODEL, tmp_path, rate=0.1, with_load=False) as urls:
        for url, (node, profile, precision) in zip(urls, DEMO_NODES, strict=True):
            snapshot = httpx.get(f"{url}/v1/node", timeout=10).json()
            assert snapshot["node"] == node and snapshot["cost"]["profile"] == profile
            (deployment,) = snapshot["deployments"]
            assert deployment["name"] == DEPLOYMENT and deployment["precision"] == precision
            # CPU hosts and Jetson boards batch with llama-server's slots, adapted by the agent.
            batching = node in BATCHING_NODES
            assert deployment["engine"] == ("llamacpp-server" if batching else "llamacpp")
            assert (deployment["batching"] or {}).get("adaptive", False) is batching
        # The f16 node knows a capital city.
        f16 = urls[[p for _, _, p in DEMO_NODES].index("f16")]
        assert "Paris" in _ask(f16, "What is the capital of France?")
        # Every node answers in words, not the random model's token salad.
        for url in urls:
            answer = _ask(url, "Name three colours of the rainbow.")
            words = re.findall(r"[A-Za-z]+", answer)
            assert len(words) >= 3, answer
        # The operator sees which node is which: node names and hardware in the status table.
        table = render_table(fleet_rows(asyncio.run(fetch_snapshots(urls))))
        for node, profile, _ in DEMO_NODES:
            assert node in table and profile in table


def test_a_launcher_killed_with_sigkill_takes_its_children_along(tmp_path: Path) -> None:
    """What `wattops demo` and `wattops bench` start (agents, load generators, the router)
    goes with them even when they are killed with SIGKILL and cannot stop anything: a script
    launches two long-running children the way they do, then is killed."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from wattops.experiments.launch import launch\n"
        "started = [launch(f'child {n}', [sys.executable, '-c', 'import time; time.sleep(600)'],"
        f" Path({str(tmp_path)!r}) / f'child{{n}}.log') for n in range(2)]\n"
        f"Path({str(pids)!r}).write_text(' '.join(str(s.process.pid) for s in started))\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not pids.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    children = [int(p) for p in pids.read_text().split()]
    assert all(_alive(pid) for pid in children)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(10)
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in children), "children outlived a SIGKILLed launcher"


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) is not alive either.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
