"""A generic engine for OpenAI-compatible servers (vLLM, TGI, llama-server).

Either launched from an argv template with `{model}`, `{port}` and `{precision}` placeholders
(never through a shell), or attached to an already-running server by URL. Health comes from
the server's health path; tokens and prefix-cache hits from its Prometheus metrics.
"""

from __future__ import annotations

import socket
from pathlib import Path

import aiohttp
from pydantic import Field, model_validator

from wattops.engines import process
from wattops.engines.base import (
    EngineAdapter,
    EngineContext,
    EngineError,
    EngineSettings,
    Replica,
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the server binds it itself right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class OpenAIServerSettings(EngineSettings):
    """`engine = "openai"`: an OpenAI-compatible server (vLLM, TGI, llama-server), launched
    from a command template or attached to by URL."""

    model: str | None = Field(None, description="the model id the server serves; default: name")
    url: str | None = Field(None, description="attach to this running server")
    command: list[str] | None = Field(
        None,
        description="argv template with {model} {port} {precision}; never run through a shell",
    )
    precisions: list[str] = Field(
        default_factory=list,
        description="precisions the command template can serve ({precision} placeholder); "
        "default: the deployment's precision, else f16",
    )
    health_path: str = Field("/health", description="answers 200 when the server is ready")
    metrics_path: str = Field("/metrics", description="the server's Prometheus metrics")

    @model_validator(mode="after")
    def _url_or_command(self) -> OpenAIServerSettings:
        if (self.url is None) == (self.command is None):
            raise ValueError("engine 'openai' needs exactly one of `url` or `command`")
        if self.command is not None and not any("{port}" in a for a in self.command):
            raise ValueError("`command` must contain a {port} placeholder")
        return self


class OpenAIServerEngine(EngineAdapter):
    """Launches or attaches to an OpenAI-compatible inference server."""

    kind = "openai"
    Settings = OpenAIServerSettings
    builds_variants = False
    reports_prefix_cache = True  # when the server exports vLLM's prefix-cache counters

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        name: str,
        model: str | None,
        precision: str,
        precisions: list[str],
        url: str | None,
        command: list[str] | None,
        owner: Path,
        log_dir: Path,
        health_path: str = "/health",
        metrics_path: str = "/metrics",
        startup_timeout_s: float = 300.0,
    ) -> None:
        super().__init__(session)
        if (url is None) == (command is None):
            raise EngineError(f"{name}: give exactly one of url or command")
        self.name = name
        self.model = model or name
        self.precision = precision
        self.precisions = precisions or [precision]
        self.url = url.rstrip("/") if url else None
        self.command = command
        self.owner = owner
        self.log_dir = log_dir
        self.health_path = health_path
        self.metrics_path = metrics_path
        self.startup_timeout_s = startup_timeout_s
        self.identity = f"{self.model}|{self.url or ' '.join(self.command or [])}"
        # An attached server is one fixed replica at one precision.
        self.manages_processes = command is not None  # type: ignore[misc]
        self.switches_precision = command is not None and len(self.precisions) > 1  # type: ignore[misc]

    @classmethod
    def create(cls, context: EngineContext, settings: OpenAIServerSettings) -> OpenAIServerEngine:
        precision = context.precision or (settings.precisions[0] if settings.precisions else "f16")
        return cls(
            context.session,
            name=context.name,
            model=settings.model,
            precision=precision,
            precisions=settings.precisions or [precision],
            url=settings.url,
            command=settings.command,
            owner=context.owner,
            log_dir=context.log_dir,
            health_path=settings.health_path,
            metrics_path=settings.metrics_path,
            startup_timeout_s=context.startup_timeout_s,
        )

    def available_precisions(self) -> list[str]:
        return list(self.precisions)

    def model_label(self) -> str:
        return self.model

    def argv(self, precision: str, port: int) -> list[str]:
        """The command template filled in; each placeholder stays inside its own argument."""
        assert self.command is not None
        values = {"model": self.model, "port": str(port), "precision": precision}
        try:
            return [arg.format(**values) for arg in self.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise EngineError(
                f"{self.name}: bad command template ({exc}); placeholders allowed: "
                "{model} {port} {precision}"
            ) from None

    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        if precision not in self.precisions:
            raise EngineError(
                f"{self.name}: precision {precision!r} is not available; "
                f"available: {', '.join(self.precisions)}"
            )
        if self.url is not None:
            return Replica(id=replica_id, precision=precision, url=self.url)
        port = free_port()
        log_path = self.log_dir / f"{replica_id}.log"
        try:
            proc = await process.spawn(
                self.argv(precision, port), owner=self.owner, log_path=log_path
            )
        except OSError as exc:
            raise EngineError(f"{self.name}: cannot start the engine: {exc}", "command") from None
        return Replica(
            id=replica_id,
            precision=precision,
            url=f"http://127.0.0.1:{port}",
            process=proc,
            log_path=log_path,
        )
