"""A stand-in for an engine whose inference is wedged while its HTTP server lives.

It copies what the agent observes of a llama.cpp replica stuck in native code: `/health`
answers 200, `/metrics` answers with llama-server's counter names, frozen, and a chat request
is accepted and never answered. Run: `python tests/stuck_engine.py --port N`.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

METRICS = (
    "llamacpp:prompt_tokens_total 0\n"
    "llamacpp:tokens_predicted_total 0\n"
    "llamacpp:requests_processing 0\n"
)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=METRICS)


async def chat(request: web.Request) -> web.Response:
    await request.read()
    await asyncio.Event().wait()  # the inference thread never comes back
    raise AssertionError("unreachable")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
