"""The llama.cpp engine: replicas of `llamacpp_worker` on loopback ports, one process each."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import Field, field_validator, model_validator

from wattops.engines import process
from wattops.engines.base import (
    EngineAdapter,
    EngineContext,
    EngineError,
    EngineSettings,
    Replica,
)
from wattops.engines.variants import VariantStore, precision_of, quantizable_from
from wattops.vocabulary import PRECISIONS


class LlamaCppSettings(EngineSettings):
    """`engine = "llamacpp"`: a GGUF served by llama.cpp replicas on this node's CPU."""

    model: Path | None = Field(
        None, description="path of the base GGUF (f16, bf16 or f32) the precisions are made from"
    )
    files: dict[str, Path] = Field(
        default_factory=dict, description="ready-made GGUF files per precision"
    )
    threads: int = Field(1, ge=1, description="CPU threads per replica")
    context: int = Field(2048, ge=64, description="context window in tokens")
    prefix_cache: bool = Field(
        True, description="reuse the KV of the previous prompt's common prefix"
    )

    @field_validator("files")
    @classmethod
    def _known_file_precisions(cls, value: dict[str, Path]) -> dict[str, Path]:
        for key in value:
            if key not in PRECISIONS:
                raise ValueError(f"unknown precision {key!r}; allowed: {', '.join(PRECISIONS)}")
        return value

    @model_validator(mode="after")
    def _some_model(self) -> LlamaCppSettings:
        if self.model is None and not self.files:
            raise ValueError("needs `model` (a base GGUF) or `files` (GGUF files per precision)")
        return self

    def resolve_paths(self, base: Path) -> None:
        if self.model is not None:
            self.model = (base / self.model).resolve()
        self.files = {p: (base / f).resolve() for p, f in self.files.items()}


class LlamaCppEngine(EngineAdapter):
    """Runs llama.cpp (llama-cpp-python) replicas of one model at any precision.

    Precisions come from ready-made files, from the base GGUF itself, or are quantized
    from the base on demand and cached in the agent's variant store.
    """

    kind = "llamacpp"
    Settings = LlamaCppSettings
    threads: int
    manages_processes = True
    switches_precision = True
    builds_variants = True
    reports_prefix_cache = True

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        name: str,
        base_model: Path | None,
        files: dict[str, Path],
        variants: VariantStore,
        owner: Path,
        log_dir: Path,
        threads: int = 1,
        context: int = 2048,
        prefix_cache: bool = True,
        startup_timeout_s: float = 120.0,
    ) -> None:
        super().__init__(session)
        self.name = name
        self.base_model = base_model
        self.files = dict(files)
        self.variants = variants
        self.owner = owner
        self.log_dir = log_dir
        self.threads = threads
        self.context = context
        self.prefix_cache = prefix_cache
        self.startup_timeout_s = startup_timeout_s
        self.base_precision = precision_of(base_model) if base_model else None
        self.identity = "|".join(
            f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in ([base_model] if base_model else []) + sorted(self.files.values())
            if p.exists()
        )

    @classmethod
    def arguments(cls, context: EngineContext, settings: LlamaCppSettings) -> dict[str, Any]:
        """The constructor's keyword arguments from the deployment's settings (a subclass
        adds its own keys to these)."""
        return {
            "name": context.name,
            "base_model": settings.model,
            "files": settings.files,
            "variants": context.variants,
            "owner": context.owner,
            "log_dir": context.log_dir,
            "threads": settings.threads,
            "context": settings.context,
            "prefix_cache": settings.prefix_cache,
            "startup_timeout_s": context.startup_timeout_s,
        }

    @classmethod
    def create(cls, context: EngineContext, settings: LlamaCppSettings) -> LlamaCppEngine:
        try:
            return cls(context.session, **cls.arguments(context, settings))
        except OSError as exc:
            raise EngineError(str(exc), field="model") from None
        except EngineError as exc:
            raise EngineError(str(exc), field="model") from None

    def available_precisions(self) -> list[str]:
        names = set(self.files)
        if self.base_precision:
            names.update(quantizable_from(self.base_precision))
        return [p for p in PRECISIONS if p in names]

    def model_label(self) -> str:
        if self.base_model:
            return self.base_model.name
        return next(iter(self.files.values())).name

    async def model_path(self, precision: str) -> Path:
        """The GGUF to load for `precision`, building the variant if needed."""
        if precision in self.files:
            return self.files[precision]
        if self.base_model is None or precision not in self.available_precisions():
            raise EngineError(
                f"{self.name}: precision {precision!r} is not available; "
                f"available: {', '.join(self.available_precisions())}"
            )
        if precision == self.base_precision:
            return self.base_model
        return await self.variants.ensure(self.base_model, precision, self.threads)

    async def prepare(self, precision: str) -> None:
        await self.model_path(precision)

    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        path = await self.model_path(precision)
        log_path = self.log_dir / f"{replica_id}.log"
        argv = [
            sys.executable,
            "-m",
            "wattops.engines.llamacpp_worker",
            "--model",
            str(path),
            "--name",
            self.name,
            "--precision",
            precision,
            "--threads",
            str(self.threads),
            "--ctx",
            str(self.context),
            *([] if self.prefix_cache else ["--no-prefix-cache"]),
        ]
        proc = await process.spawn(argv, owner=self.owner, log_path=log_path, capture_stdout=True)
        replica = Replica(
            id=replica_id, precision=precision, url="", process=proc, log_path=log_path
        )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), self.startup_timeout_s)
        except TimeoutError:
            await process.terminate(proc, 1.0)
            raise EngineError(
                f"replica {replica_id} did not load {path.name} within "
                f"{self.startup_timeout_s:.0f}s: {replica.last_log_lines() or 'no output'}"
            ) from None
        parts = line.decode(errors="replace").split()
        if len(parts) < 2 or parts[0] != "LISTENING":
            await process.terminate(proc, 1.0)
            raise EngineError(
                f"replica {replica_id} failed to start on {path.name}: "
                f"{replica.last_log_lines() or 'exit code ' + str(proc.returncode)}"
            )
        replica.url = f"http://127.0.0.1:{int(parts[1])}"
        replica.memory_bytes = path.stat().st_size
        replica.threads = self.threads
        return replica
