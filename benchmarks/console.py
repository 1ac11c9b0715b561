"""Console benchmark: the console against many agents streaming at 1 Hz.

Usage: .venv/bin/python benchmarks/console.py [--agents 1000] [--seconds 30] [--presses 20]

A light stand-in serves N agents from one aiohttp process (each agent is a path prefix,
`http://127.0.0.1:PORT/a/I`), with the real API's shapes: `/v1/events` pushes a NodeSnapshot
(built from the real pydantic models, one deployment with accounting figures that change every
second) once a second and at once after a control call; `/v1/deployments/{name}/scale` answers
202 and changes the next snapshot. The console (`make_app`, headless, 200x50) runs in this
process. Reported: the console's CPU (process time per wall second, steady state, after every
agent is live) and the time from pressing `+` on a row to the table showing the new replica
count (the control call, the agent's push, the stream, the redraw of that line). The key is
injected through the app's driver as a terminal's key would be.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

from aiohttp import web

#: The console's own default redraw interval (console/app.py).
REFRESH_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def snapshot(i: int, tick: int, replicas: int, version: int, watts: float | None = None,
             tokens: float | None = None) -> bytes:  # fmt: skip
    """One node's snapshot, valid against the real schema (checked at start)."""
    from wattops.agents.api import (
        DeploymentAccounting,
        DeploymentCounters,
        DeploymentState,
        DeploymentStatus,
        Figures,
        LatencySummary,
        NodeCost,
        NodePower,
        NodeSnapshot,
        Totals,
    )

    if watts is None:
        watts = 150.0 + (i * 7 + tick * 13) % 200
    if tokens is None:
        tokens = 40.0 + tick % 20
    fig = Figures(window_s=60, watts=watts, tokens_per_s=tokens, j_per_token=1.5,
                  usd_per_1m_tokens=20.0 + (tick % 5), cost_usd_per_hour=5.12,
                  response_cache_hit_rate=0.3)  # fmt: skip
    dep = DeploymentStatus(
        name="tiny", engine="llamacpp", model="demo.gguf", precision="q8_0",
        desired_precision="q8_0", available_precisions=["f16", "q8_0", "q4_k_m", "q4_0"],
        desired_replicas=replicas, ready_replicas=replicas, max_replicas=8,
        state=DeploymentState.SERVING,
        counters=DeploymentCounters(requests_total=tick * 3, prompt_tokens_total=tick * 90,
                                    completion_tokens_total=tick * 60),
        latency=LatencySummary(p50_s=0.8, p95_s=1.9, window=100),
        accounting=DeploymentAccounting(share=1.0, cost_usd_per_hour=5.12,
                                        energy_source="estimate", totals=Totals(),
                                        figures=fig),
    )  # fmt: skip
    snap = NodeSnapshot(
        node=f"node-{i:04d}", agent_version="bench", started_at=0.0, time=float(tick),
        version=version, deployments=[dep],
        power=NodePower(source="estimate", sensor="bench", watts=watts, watts_smoothed=watts,
                        sample_hz=10),
        cost=NodeCost(profile="a100-80gb", price_usd_per_hour=5.12, price_basis="bench",
                      owned=False, electricity_usd_per_kwh=0.12, pue=1.5,
                      grid_gco2e_per_kwh=390, burn_usd_per_hour=5.12,
                      unallocated_usd_per_hour=0.0),
        figures=fig,
    )  # fmt: skip
    return snap.model_dump_json().encode()


def serve(port: int, agents: int) -> None:
    """The stand-in: N agents behind one server."""
    replicas = [1] * agents
    # Built once with the real models (so the shape is the API's), then only the numbers
    # change per push: the stand-in must stay light, or its own lag is what gets measured.
    template = snapshot(0, 0, 1, 0, watts=987654.25, tokens=876543.25).decode()
    template = template.replace("987654.25", "{w}").replace("876543.25", "{k}")
    template = template.replace('"node-0000"', '"node-{i:04d}"')
    template = template.replace('"desired_replicas":1', '"desired_replicas":{r}')
    template = template.replace('"ready_replicas":1', '"ready_replicas":{r}')
    template = template.replace('"version":0', '"version":{v}')
    template = template.replace('"time":0.0', '"time":{t}.0')
    template = template.replace("{", "{{").replace("}", "}}")
    for name in ("i:04d", "r", "v", "t", "w", "k"):
        template = template.replace("{{" + name + "}}", "{" + name + "}")

    def render(i: int, t: int, r: int, v: int) -> bytes:
        # Figures move every second, per agent, as a loaded fleet's would.
        w = 150.0 + (i * 7 + t * 13) % 200
        return template.format(i=i, r=r, v=v, t=t, w=w, k=40.0 + (i + t) % 20).encode()

    # Set by a control call: that agent pushes its new snapshot at once.
    wake = [asyncio.Event() for _ in range(agents)]

    async def events(request: web.Request) -> web.StreamResponse:
        i = int(request.match_info["i"])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        # Each agent ticks at its own phase within the second, as agents started at different
        # moments do; a control call pushes at once.
        loop = asyncio.get_running_loop()
        next_at = loop.time() + i / agents
        version = 0
        while True:
            version += 1
            t = int(loop.time())
            await resp.write(b"event: snapshot\ndata: " + render(i, t, replicas[i], version)
                             + b"\n\n")  # fmt: skip
            try:
                await asyncio.wait_for(wake[i].wait(), max(0.0, next_at - loop.time()))
                wake[i].clear()
            except TimeoutError:
                next_at += 1.0

    async def scale(request: web.Request) -> web.Response:
        i = int(request.match_info["i"])
        body = await request.json()
        replicas[i] = int(body["replicas"])
        wake[i].set()
        return web.json_response({"deployment": "tiny", "action": "scale",
                                  "desired_replicas": replicas[i],
                                  "desired_precision": "q8_0"}, status=202)  # fmt: skip

    app = web.Application()
    app.router.add_get("/a/{i}/v1/events", events)
    app.router.add_post("/a/{i}/v1/deployments/tiny/scale", scale)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def measure(urls: list[str], seconds: float, presses: int) -> dict[str, Any]:
    from textual import events

    from wattops.console.app import make_app
    from wattops.console.widgets.fleet_table import FleetTable

    app = make_app(urls, refresh_s=REFRESH_S)
    result: dict[str, Any] = {}
    async with app.run_test(size=(200, 50)) as pilot:
        started = time.monotonic()
        while sum(1 for link in app.fleet.links.values() if link.snapshot) < len(urls):
            await pilot.pause(0.2)
            if time.monotonic() - started > 120:
                raise SystemExit("not every agent became live in 120 s")
        result["all_live_after_s"] = round(time.monotonic() - started, 1)
        await pilot.pause(3.0)
        cpu0, wall0 = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        result["cpu_percent_of_one_core"] = round(
            (time.process_time() - cpu0) / (time.monotonic() - wall0) * 100, 1
        )
        table = app.query_one(FleetTable)
        latencies = []
        for n in range(presses):
            table.move_cursor(row=n * 37 % len(urls))
            await pilot.pause(0.05)
            key = table.selected_key()
            assert key is not None
            before = next(r for r in app.fleet_screen.last_rows if r.key == key).desired
            # The key goes in the way a terminal's does (through the driver), without the
            # Pilot's wait for the app to go idle, which would be counted otherwise.
            event = events.Key("plus", "+")
            event.set_sender(app)
            t0 = time.perf_counter()
            app._driver.send_message(event)  # type: ignore[union-attr]
            # Done when the row holds the new count and its line has been drawn again.
            while table.cell(key, "replicas") != f"{before + 1}/{before + 1}" or (
                key not in table._lines
            ):
                await asyncio.sleep(0.001)
                if time.perf_counter() - t0 > 10:
                    raise SystemExit(f"no effect of + on {key} after 10 s")
            latencies.append(time.perf_counter() - t0)
            await pilot.pause(0.3)
        latencies.sort()
        result["key_to_screen_ms"] = {
            "p50": round(statistics.median(latencies) * 1000, 1),
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000, 1),
            "max": round(latencies[-1] * 1000, 1),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--presses", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(args.agents)])
    try:
        time.sleep(2.0)
        urls = [f"http://127.0.0.1:{port}/a/{i}" for i in range(args.agents)]
        result = asyncio.run(measure(urls, args.seconds, args.presses))
    finally:
        server.terminate()
        server.wait(10)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}",
        "agents": args.agents,
        **result,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
