"""Limits in front of the agent's and the router's APIs (not their inference paths, which have
their own: the OpenAI body limit in `openai.py`).

- headers: more than `MAX_HEADER_BYTES` in all is 431;
- bodies: a control call's body over `MAX_BODY_BYTES` is 413 (they are a few hundred bytes);
- slow clients: a body that has not arrived within `BODY_TIMEOUT_S` is 408 (the connection's
  idle keep-alive is uvicorn's `timeout_keep_alive`, 5 s);
- event streams: more than `MAX_STREAMS_PER_CLIENT` open `/v1/events` streams from one client
  address is 429 (a console holds one per agent; a leaking script would otherwise hold the
  agent's memory and file descriptors).

Each refusal is an ErrorBody-shaped JSON answer naming the limit, and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from wattops.vocabulary.openai import BodyTooLarge, read_body, replay

__all__ = [
    "BODY_TIMEOUT_S",
    "MAX_BODY_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_STREAMS_PER_CLIENT",
    "Guard",
    "agent_error",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_HEADER_BYTES = 32 * 1024
MAX_BODY_BYTES = 1024 * 1024
BODY_TIMEOUT_S = 30.0
MAX_STREAMS_PER_CLIENT = 16
STREAM_PATHS = frozenset({"/v1/events"})


def agent_error(status: int, code: str, message: str) -> bytes:
    """The agent's ErrorBody shape."""
    return json.dumps({"error": code, "message": message, "allowed": None}).encode()


async def _refuse(send: Send, body: bytes, status: int,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
    fields = [(b"content-type", b"application/json"),
              (b"content-length", str(len(body)).encode()), *(headers or [])]  # fmt: skip
    await send({"type": "http.response.start", "status": status, "headers": fields})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware applying the limits above to `app`."""

    def __init__(self, app: ASGIApp, body_timeout_s: float = BODY_TIMEOUT_S,
                 max_streams: int = MAX_STREAMS_PER_CLIENT,
                 error: Callable[[int, str, str], bytes] = agent_error) -> None:  # fmt: skip
        self.app = app
        self.error = error
        self.body_timeout_s = body_timeout_s
        self.max_streams = max_streams
        self.streams: Counter[str] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = sum(len(k) + len(v) for k, v in scope.get("headers", []))
        if size > MAX_HEADER_BYTES:
            message = f"the request's headers are {size} bytes; at most {MAX_HEADER_BYTES}"
            await _refuse(send, self.error(431, "headers_too_large", message), 431)
            return
        if scope["path"] in STREAM_PATHS:
            await self._stream(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            body = await asyncio.wait_for(read_body(receive, MAX_BODY_BYTES), self.body_timeout_s)
        except TimeoutError:
            message = f"the body did not arrive within {self.body_timeout_s:g} s"
            await _refuse(send, self.error(408, "request_timeout", message), 408)
            return
        except BodyTooLarge:
            message = f"a control call's body is at most {MAX_BODY_BYTES} bytes"
            await _refuse(send, self.error(413, "body_too_large", message), 413)
            return
        if body is None:
            return  # the client went away: nobody to answer
        await self.app(scope, replay(body, receive), send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        who = client[0] if client else "?"
        if self.streams[who] >= self.max_streams:
            message = (f"{who} already holds {self.streams[who]} event streams here; at most "
                       f"{self.max_streams} per client address")  # fmt: skip
            await _refuse(send, self.error(429, "too_many_streams", message), 429,
                          [(b"retry-after", b"5")])  # fmt: skip
            return
        self.streams[who] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.streams[who] -= 1
            if self.streams[who] <= 0:
                del self.streams[who]
