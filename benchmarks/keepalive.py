"""Requests lost to a pooled connection the server is closing: an aiohttp client pool with its
default idle limit (15 s) against the project's pool (`http_connector`, 4 s), each reusing a
connection `--gap` seconds after its last answer, against a server that closes idle connections
after 5 s (uvicorn as the agent and the router run it; or `--url` for any other, e.g. a
llama-server, whose cpp-httplib also closes after 5 s).

    python benchmarks/keepalive.py [--trials 20] [--gap 5.0] [--url URL]

(`--url http://127.0.0.1:8080/v1/chat/completions` for a llama-server on port 8080.) Each
trial: one request, a wait of `gap` + i ms (i = 0..9, to sweep the moment of the close), then a
second request on the same pool (POSTs, as inference requests are); a trial fails when the
second request gets no answer. The figures are counts, not timings: the machine's load moves
the race window a little, not whether it exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import aiohttp
import uvicorn

from wattops.vocabulary.net import CLIENT_KEEPALIVE_S, SERVER_KEEPALIVE_S, http_connector

# A POST, as every inference request is: aiohttp retries an idempotent request (GET) once on a
# reused connection the server closed, but never a POST.
_BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})  # fmt: skip
    await send({"type": "http.response.body", "body": b"ok"})


async def _trials(url: str, connector: aiohttp.TCPConnector, trials: int, gap: float) -> int:
    failed = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(trials):
            async with session.post(url, json=_BODY) as response:
                await response.read()
            await asyncio.sleep(gap + (i % 10) / 1000)
            try:
                async with session.post(url, json=_BODY) as response:
                    await response.read()
            except aiohttp.ClientConnectionError:
                failed += 1
    return failed


async def main(args: argparse.Namespace) -> dict[str, Any]:
    server = None
    url = args.url
    if url is None:
        server = uvicorn.Server(uvicorn.Config(
            _app, host="127.0.0.1", port=args.port, log_level="error",
            timeout_keep_alive=int(SERVER_KEEPALIVE_S),
        ))  # fmt: skip
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn offers no event for it)
            await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{args.port}/"
    result: dict[str, Any] = {"url": url, "trials": args.trials, "gap_s": args.gap}
    try:
        default = await _trials(url, aiohttp.TCPConnector(), args.trials, args.gap)
        ours = await _trials(url, http_connector(), args.trials, args.gap)
    finally:
        if server is not None:
            server.should_exit = True
            await task
    result["failed_aiohttp_default_15s"] = default
    result[f"failed_http_connector_{CLIENT_KEEPALIVE_S:g}s"] = ours
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--gap", type=float, default=SERVER_KEEPALIVE_S)
    parser.add_argument("--port", type=int, default=18777)
    parser.add_argument("--url", help="a running server to test instead of the built-in one")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=1))
