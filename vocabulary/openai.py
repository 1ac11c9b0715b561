"""What every wattops endpoint that speaks OpenAI's API shares (the agent's gateway, the
router): OpenAI's error shape, which OpenAI client libraries know how to show, and reading a
request body with a size bound."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["MAX_BODY_BYTES", "BodyTooLarge", "error_body", "read_body", "replay"]

#: Largest request body accepted (a long prompt is well under this).
MAX_BODY_BYTES = 16 * 2**20


#: Error codes whose `type` is OpenAI's for a spent quota, not a bad request: what clients
#: (the official SDKs' users, LiteLLM, LangChain) look for to stop retrying and tell the user.
QUOTA_CODES = frozenset({"budget_exceeded"})


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """`{"error": {...}}` as OpenAI answers a request it refuses (4xx) or cannot serve (5xx)."""
    if code in QUOTA_CODES:
        kind = "insufficient_quota"
    else:
        kind = "invalid_request_error" if status < 500 else "server_error"
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
        }
    }


class BodyTooLarge(Exception):
    """The request body is over MAX_BODY_BYTES."""


Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def read_body(receive: Receive, limit: int = MAX_BODY_BYTES) -> bytes | None:
    """An ASGI request's whole body; None when the client went away first; BodyTooLarge past
    `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app `body` (already read by a middleware) first, then
    whatever the client sends next (its disconnect)."""
    sent = False

    async def again() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
