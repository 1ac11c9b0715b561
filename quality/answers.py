"""Every precision's greedy answers to the labelled set, through llama-server's slots.

Each precision is served by one llama-server (the build the agent runs, `make llama-server`)
with `PARALLEL` slots and continuous batching, and asked every item as a chat message (the
model's own chat template, `--jinja`) from an empty conversation: temperature 0, at most
`request_body`'s tokens, the items `PARALLEL` at a time. Decoding several sequences per
weight read is what makes this fast on a CPU (about 1.6x the tokens/s of one sequence on the
project's 2-core VM, where decoding is compute-bound; docs/benchmarks.md).

Measured, not assumed: which answers come out can depend on which other sequences shared a
decoding step. On SmolLM2 the f16, q8_0 and q4_0 answers are identical run after run, while
the k-quant files (whose 576-wide rows fall back to Q5_0/Q5_1 for most tensors) change 20-35%
of their answers between two runs and move their accuracy by up to 2.5 points
(docs/benchmarks.md). The answers are cached per item, so a table does not move once
measured; the interval of the drop, and the default non-inferiority verdict, are what keep a
precision on the margin from being chosen on one lucky run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from wattops.engines import server_binary
from wattops.engines.base import EngineError
from wattops.engines.openai_server import free_port
from wattops.quality.labelled import LabelledItem

__all__ = ["PARALLEL", "answer_items", "request_body"]

#: Sequences decoded together (llama-server slots): 16 answer 10% faster than 8 here.
PARALLEL = 16
#: The most tokens of an answer: a match item's answer is a word, a number or a sentence; a
#: free-text item's a short sentence.
MATCH_MAX_TOKENS = 24
TEXT_MAX_TOKENS = 48
SLOT_CONTEXT = 256


def request_body(item: LabelledItem) -> dict[str, Any]:
    """The chat request an item is asked as, by `wattops quality` and by a canary's probes.

    A match item's answer ends at its first blank line: what a small model adds after one is
    chatter ("This is a classic example of..."); on SmolLM2's f16 answers, cutting there
    changed no item's verdict, and saves the tokens."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": item.prompt}],
        "temperature": 0.0,
        "max_tokens": MATCH_MAX_TOKENS if item.matched else TEXT_MAX_TOKENS,
    }
    if item.matched:
        body["stop"] = ["\n\n"]
    return body


async def _ask_all(
    url: str, items: Sequence[LabelledItem], done: Callable[[int], None]
) -> list[str]:
    import httpx  # here, not above: httpx's package imports rich, and the agent is headless

    limits = httpx.Limits(max_connections=PARALLEL)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        gate = asyncio.Semaphore(PARALLEL)
        count = 0

        async def one(item: LabelledItem) -> str:
            nonlocal count
            async with gate:
                resp = await client.post("/v1/chat/completions", json=request_body(item))
                resp.raise_for_status()
                data = resp.json()
            count += 1
            done(count)
            return str(data["choices"][0]["message"].get("content") or "")

        return list(await asyncio.gather(*(one(item) for item in items)))


async def _serve_and_ask(model: Path, items: Sequence[LabelledItem], threads: int,
                         done: Callable[[int], None]) -> list[str]:  # fmt: skip
    import httpx

    try:
        binary = server_binary.find()
    except server_binary.ServerBuildError as exc:
        raise EngineError(f"wattops quality answers through llama-server: {exc}") from None
    port = free_port()
    argv = [
        str(binary), "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--threads", str(threads), "--threads-batch", str(threads),
        "--ctx-size", str(SLOT_CONTEXT * PARALLEL), "--parallel", str(PARALLEL),
        "--no-kv-unified", "--cont-batching", "--no-webui", "--jinja", "--no-warmup",
        "--seed", "0",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=2.0) as probe:
                for _ in range(600):
                    if proc.returncode is not None:
                        break
                    with contextlib.suppress(httpx.HTTPError):
                        if (await probe.get("/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise EngineError(f"llama-server on {model.name} was not ready in 60 s")
            if proc.returncode is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
                raise EngineError(f"llama-server on {model.name} exited: {' / '.join(tail)}")
            return await _ask_all(url, items, done)
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 10)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()


def answer_items(
    model: Path,
    items: Sequence[LabelledItem],
    threads: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[str]:
    """`model`'s greedy answer to each item, in order (see the module docstring)."""
    if not items:
        return []
    threads = threads or os.cpu_count() or 1
    return asyncio.run(_serve_and_ask(model, items, threads, on_progress or (lambda _: None)))
