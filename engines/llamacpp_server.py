"""The llama-server engine: llama.cpp's own HTTP server, one process per replica, with
parallel slots and continuous batching.

The `llamacpp` worker decodes one request at a time; on a CPU that is already close to the
memory-bandwidth limit (every token reads all the weights), so more tokens per held core come
only from decoding several sequences per weight read. `llama-server --parallel N` does that:
N slots, each a sequence, decoded together in one batch per step (continuous batching: a
request joins the batch as soon as a slot frees, without waiting for the others to finish),
each slot keeping its prompt's KV for prefix reuse.

Precisions are made exactly as for the worker engine (ready-made files, the base itself, or
quantized from the base into the variant store); only the replica process differs. Usage comes
from the server's `/metrics` (`--metrics`) and per-slot state from `/slots` (`--slots`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field

from wattops.engines import process, server_binary
from wattops.engines.base import EngineContext, EngineError, Replica
from wattops.engines.llamacpp import LlamaCppEngine, LlamaCppSettings
from wattops.engines.metrics import EngineUsage
from wattops.engines.openai_server import free_port

#: Completion tokens of a request that gives no max_tokens (the worker's default too).
DEFAULT_MAX_TOKENS = 256


class LlamaServerSettings(LlamaCppSettings):
    """`engine = "llamacpp-server"`: llama.cpp's server with parallel slots on this node's CPU."""

    parallel: int = Field(
        4,
        ge=1,
        le=64,
        description="slots per replica: sequences decoded together (each holds `context` "
        "tokens of KV cache); with adaptive_parallel, the most the agent may use",
    )
    adaptive_parallel: bool = Field(
        False,
        description="let the agent adapt how many slots are used (1..parallel) from measured "
        "tokens/s per replica and p95 latency against latency_slo_p95_ms",
    )
    adapt_window_s: float = Field(
        30.0, gt=0, description="seconds of measurements behind each adaptation of the slots"
    )
    server: Path | None = Field(
        None,
        description="llama-server binary to run; default: $WATTOPS_LLAMA_SERVER, else the "
        "build `make llama-server` caches",
    )

    def resolve_paths(self, base: Path) -> None:
        super().resolve_paths(base)
        if self.server is not None and self.server.parent != Path("."):
            self.server = (base / self.server).resolve()


class LlamaServerEngine(LlamaCppEngine):
    """Runs `llama-server` replicas of one model at any precision, each with `parallel` slots."""

    kind = "llamacpp-server"
    Settings = LlamaServerSettings
    parallel: int
    health_path = "/health"
    metrics_path = "/metrics"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        parallel: int = 4,
        adaptive_parallel: bool = False,
        adapt_window_s: float = 30.0,
        server: Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(session, **kwargs)
        self.parallel = parallel
        self.adaptive_parallel = adaptive_parallel
        self.adapt_window_s = adapt_window_s
        self.server = server

    @classmethod
    def arguments(cls, context: EngineContext, settings: LlamaCppSettings) -> dict[str, Any]:
        assert isinstance(settings, LlamaServerSettings)  # the registry validates with Settings
        return {
            **super().arguments(context, settings),
            "parallel": settings.parallel,
            "adaptive_parallel": settings.adaptive_parallel,
            "adapt_window_s": settings.adapt_window_s,
            "server": settings.server,
        }

    def binary(self) -> Path:
        """The llama-server to run; EngineError (field `server`) saying how to get one."""
        if self.server is not None:
            return self.server
        try:
            return server_binary.find()
        except server_binary.ServerBuildError as exc:
            raise EngineError(f"{self.name}: {exc}", field="server") from None

    def argv(self, model: Path, port: int) -> list[str]:
        """The server's command line: `parallel` slots of `context` tokens each."""
        return [
            str(self.binary()),
            "--model", str(model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "--alias", self.name,
            "--threads", str(self.threads),
            "--threads-batch", str(self.threads),
            # The KV cache is split evenly between slots: each gets `context` tokens.
            "--ctx-size", str(self.context * self.parallel),
            "--no-kv-unified",
            "--parallel", str(self.parallel),
            "--cont-batching",
            "--metrics",
            "--slots",
            "--no-webui",
            "--jinja",
            "--no-warmup",
            # A request without max_tokens gets 256, as on the worker (llama-server's own
            # default is until the context is full); a request's own max_tokens still wins.
            "--n-predict", str(DEFAULT_MAX_TOKENS),
            # Prompt caching (the slot's KV reused for a common prefix) is on by default in
            # llama-server; `prefix_cache = false` turns the RAM prompt cache off too.
            *([] if self.prefix_cache else ["--cache-ram", "0"]),
        ]  # fmt: skip

    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        path = await self.model_path(precision)
        log_path = self.log_dir / f"{replica_id}.log"
        port = free_port()
        try:
            proc = await process.spawn(self.argv(path, port), owner=self.owner, log_path=log_path)
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot start llama-server: {exc}", "server") from None
        replica = Replica(
            id=replica_id,
            precision=precision,
            url=f"http://127.0.0.1:{port}",
            process=proc,
            log_path=log_path,
        )
        replica.memory_bytes = path.stat().st_size
        replica.threads = self.threads
        return replica

    async def read_usage(self, replica: Replica, timeout_s: float = 2.0) -> EngineUsage | None:
        """Token, prefix-cache and in-flight counters from `/metrics`.

        llama-server's busy time (prompt plus generation seconds) is summed over slots, so with
        several slots busy at once it runs faster than the clock; it is dropped here and the
        agent counts a replica busy while at least one request is in flight, as for any engine.
        """
        usage = await super().read_usage(replica, timeout_s)
        if usage is None:
            return None
        return dataclasses.replace(usage, busy_seconds=None)

    async def read_slots(self, replica: Replica, timeout_s: float = 2.0) -> list[bool] | None:
        """Per-slot busy flags from `/slots`, or None if it cannot be read."""
        try:
            async with self._session.get(
                replica.url + "/slots", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not isinstance(body, list):
            return None
        return [bool(slot.get("is_processing")) for slot in body if isinstance(slot, dict)]
