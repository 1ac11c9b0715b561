"""The router's stream relay on hand-made event streams: whole events relayed as they come,
LF or CRLF, however the bytes are cut; the usage chunk taken for the ledger and kept from a
client that did not ask for it; `[DONE]` told from a stream broken off before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from wattops.router.proxy import _Relay


class _Upstream:
    """What the relay reads of aiohttp's response: `content.iter_any()` and `headers`."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces, self.headers, self.content = pieces, {}, self

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk)


STREAM = [
    _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}),
    _event({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
    _event({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
    _event({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}),
    b"data: [DONE]",
]


def _relay(raw: bytes, piece: int, client_usage: bool) -> tuple[list[bytes], _Relay]:
    upstream = _Upstream([raw[i : i + piece] for i in range(0, len(raw), piece)])
    relay = _Relay(None, None, None, None, None, upstream, [], "", None,  # type: ignore[arg-type]
                   client_usage=client_usage)  # fmt: skip

    async def read() -> list[bytes]:
        return [chunk async for chunk in relay.chunks()]

    return asyncio.run(read()), relay


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("piece", [1, 7, 4096])
@pytest.mark.parametrize("client_usage", [False, True])
def test_events_are_relayed_whole_and_the_usage_only_to_who_asked(
    sep: bytes, piece: int, client_usage: bool
) -> None:
    raw = sep.join(STREAM) + sep
    chunks, relay = _relay(raw, piece, client_usage)
    out = b"".join(chunks)
    assert relay.done and not relay.broken
    assert relay.usage is not None and (
        relay.usage.prompt_tokens,
        relay.usage.completion_tokens,
    ) == (9, 2)
    assert relay.events == 2  # the content events, for a stream cut off before its usage
    assert (b'"usage"' in out) == client_usage
    assert b'"Hel"' in out and b'"lo"' in out and out.rstrip().endswith(b"data: [DONE]")
    if piece == 1:  # as they come, not held to the end
        assert len(chunks) >= len(STREAM) - 1


def test_a_stream_without_done_is_broken_and_counts_what_was_relayed() -> None:
    raw = b"\n\n".join(STREAM[:3]) + b"\n\n"
    _, relay = _relay(raw, 5, client_usage=False)
    assert not relay.done and relay.broken and relay.usage is None and relay.events == 2


def test_usage_on_a_content_event_is_taken_and_removed_for_the_client() -> None:
    last = _event({"choices": [{"index": 0, "delta": {"content": "!"}}],
                   "usage": {"prompt_tokens": 9, "completion_tokens": 3}})  # fmt: skip
    raw = b"\n\n".join([*STREAM[:3], last, b"data: [DONE]"]) + b"\n\n"
    chunks, relay = _relay(raw, 4096, client_usage=False)
    out = b"".join(chunks)
    assert relay.usage is not None and relay.usage.completion_tokens == 3
    assert b'"usage"' not in out and b'"!"' in out and relay.events == 3
