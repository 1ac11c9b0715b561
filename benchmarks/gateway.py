"""Gateway overhead benchmark: what one agent adds in front of a fast stand-in engine.

Usage: .venv/bin/python benchmarks/gateway.py [--requests 20000] [--stream] [--out results.json]

Starts (each in its own process) a stand-in engine that answers OpenAI chat requests at once
with a fixed body, and a real wattops-agent attached to it. A load generator (aiohttp, uvloop)
then measures, at concurrency 1 and 32:
  - direct: client -> stand-in engine
  - gateway: client -> agent -> stand-in engine (sampling requests: never cached)
  - cache hit: client -> agent, temperature 0, answered from the response cache
Added latency is the gateway's latency percentile minus the direct one in the same run. All
three processes share this machine's cores, as they would on a small node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}
        ],
        "usage": {
            "prompt_tokens": 8,
            "completion_tokens": 1,
            "total_tokens": 9,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
)


#: A streamed answer, as llama.cpp's server sends it: a role chunk, one event per token
#: (STREAM_TOKENS of them), the finish, the usage chunk when asked for, then [DONE].
STREAM_TOKENS = 16


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"  # fmt: skip


STREAM = [
    _event({"role": "assistant", "content": ""}),
    *(_event({"content": f" w{i}"}) for i in range(STREAM_TOKENS)),
    _event({}, "length"),
]
USAGE_EVENT = b"data: " + orjson.dumps({
    "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "bench",
    "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": STREAM_TOKENS,
                             "total_tokens": 8 + STREAM_TOKENS},
}) + b"\n\n"  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_stand_in(port: int) -> None:
    """A minimal OpenAI-compatible engine: answers every request immediately (streamed, in
    STREAM_TOKENS events, when asked)."""
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in STREAM:  # one write an event, as an engine sends tokens
            await response.write(event)
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(USAGE_EVENT)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="", content_type="text/plain")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", metrics)
    import uvloop

    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def load(
    url: str, body: bytes, concurrency: int, total: int, extra_headers: dict[str, str] | None = None
) -> tuple[list[float], float]:
    """Send `total` requests with `concurrency` workers; returns latencies and wall time."""
    latencies: list[float] = []
    remaining = total
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json", **(extra_headers or {})}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"HTTP {resp.status}")
                latencies.append(time.perf_counter() - started)

        # Warm up connections and code paths first.
        for _ in range(concurrency * 5):
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(latencies: list[float], wall: float) -> dict[str, float]:
    return {
        "p50_ms": pct(latencies, 0.50) * 1000,
        "p99_ms": pct(latencies, 0.99) * 1000,
        "req_per_s": len(latencies) / wall,
    }


def wait_http(url: str, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="per measurement")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--stream", action="store_true",
                        help="streamed answers (16 token events each), read to [DONE]")  # fmt: skip
    args = parser.parse_args()
    streamed = {"stream": True} if args.stream else {}

    engine_port, agent_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        config.write_text(f"""
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
        try:
            procs.append(
                subprocess.Popen([sys.executable, __file__, "--stand-in-port", str(engine_port)])
            )
            wait_http(f"http://127.0.0.1:{engine_port}/health")
            agent_bin = Path(sys.executable).with_name("wattops-agent")
            procs.append(
                subprocess.Popen(
                    [str(agent_bin), "--config", str(config), "--log-level", "warning"]
                )
            )
            wait_http(f"http://127.0.0.1:{agent_port}/healthz")
            time.sleep(1.5)  # the supervisor marks the attached server ready

            sampled = orjson.dumps(
                {
                    "model": "bench",
                    "temperature": 0.7,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}],
                    **streamed,
                }
            )
            greedy = orjson.dumps(
                {
                    "model": "bench",
                    "temperature": 0,
                    "max_tokens": 1,
                    "messages": [{"role": "user", "content": "hi"}],
                    **streamed,
                }
            )
            direct_url = f"http://127.0.0.1:{engine_port}/v1/chat/completions"
            agent_url = f"http://127.0.0.1:{agent_port}/v1/chat/completions"
            results: dict[str, dict[str, float]] = {}
            for concurrency in (1, 32):
                n = args.requests if concurrency > 1 else max(2000, args.requests // 5)
                for label, url, body in (
                    ("direct", direct_url, sampled),
                    ("gateway", agent_url, sampled),
                    ("cache_hit", agent_url, greedy),
                ):
                    lat, wall = asyncio.run(load(url, body, concurrency, n))
                    results[f"{label}_c{concurrency}"] = summarize(lat, wall)
            for c in (1, 32):
                for q in ("p50_ms", "p99_ms"):
                    results[f"added_c{c}"] = results.get(f"added_c{c}", {})
                    results[f"added_c{c}"][q] = (
                        results[f"gateway_c{c}"][q] - results[f"direct_c{c}"][q]
                    )
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(30)
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "requests": args.requests,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--stand-in-port":
        run_stand_in(int(sys.argv[2]))
    else:
        main()
