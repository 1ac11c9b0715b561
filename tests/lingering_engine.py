"""A stand-in for an engine that keeps a stream's connection a moment after its `[DONE]`.

It copies what the agent observes of an OpenAI-compatible server whose stream ends later than
its last event (a proxy in front of vLLM or TGI flushing, a server finishing its bookkeeping
first): `/health` answers 200, `/metrics` answers with llama-server's counter names, and a
streamed chat request gets a role event, three token events, the finish and `data: [DONE]`,
and then the response ends `--linger` seconds later. Run:
`python tests/lingering_engine.py --port N [--linger 1.0]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

METRICS = "llamacpp:prompt_tokens_total 0\nllamacpp:tokens_predicted_total 0\n"


def _event(delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-linger",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "linger",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--linger", type=float, default=1.0)
    args = parser.parse_args()

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = [
            _event({"role": "assistant", "content": ""}),
            *(_event({"content": f" w{i}"}) for i in range(3)),
            _event({}, "length"),
        ]
        for event in events:
            await response.write(event)
        await response.write(b"data: [DONE]\n\n")
        await asyncio.sleep(args.linger)  # the connection stays a moment after [DONE]
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
