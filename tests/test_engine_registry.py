"""Engines and sensors are found by name: a new engine is one module plus its registration.

The `EchoEngine` below is such a module, written as a third-party package would write it: its
own settings model, `create()`, and replicas that are small aiohttp servers answering the
OpenAI chat API. A real `wattops-agent` process (started through `main()` below, which
registers the engine first, as an installed entry point would) runs a deployment on it: the
gateway, scaling and the snapshot all work on an engine the agent has never heard of.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from pydantic import Field

from tests.conftest import TOKEN, Agent, free_port, wait_for
from wattops.agents.config import ConfigError, parse_config
from wattops.agents.sensors.registry import SENSORS, sensor_names
from wattops.engines.base import EngineAdapter, EngineContext, EngineError, EngineSettings, Replica
from wattops.engines.registry import ENGINES, register_engine


class EchoSettings(EngineSettings):
    """`engine = "echo"`: answers every chat request with a fixed reply."""

    reply: str = Field(min_length=1, description="what every answer says")


class EchoEngine(EngineAdapter):
    """Replicas are aiohttp servers in the agent's own process, one port each."""

    kind = "echo"
    Settings = EchoSettings
    switches_precision = False

    def __init__(self, context: EngineContext, settings: EchoSettings) -> None:
        super().__init__(context.session)
        self.reply = settings.reply
        self.identity = f"echo|{settings.reply}"
        self._runners: dict[str, web.AppRunner] = {}

    @classmethod
    def create(cls, context: EngineContext, settings: Any) -> EchoEngine:
        if context.precision not in (None, "f16"):
            raise EngineError("echo serves f16 only", field="precision")
        return cls(context, settings)

    def available_precisions(self) -> list[str]:
        return ["f16"]

    def model_label(self) -> str:
        return "echo"

    async def start_replica(self, precision: str, replica_id: str) -> Replica:
        async def health(request: web.Request) -> web.Response:
            return web.Response(text="ok")

        async def chat(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response({
                "id": f"chatcmpl-{replica_id}", "object": "chat.completion",
                "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": self.reply}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            })  # fmt: skip

        app = web.Application()
        app.router.add_get("/health", health)
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        self._runners[replica_id] = runner
        return Replica(id=replica_id, precision=precision, url=f"http://127.0.0.1:{port}")

    async def stop_replica(self, replica: Replica, grace_s: float = 5.0) -> None:
        runner = self._runners.pop(replica.id, None)
        if runner is not None:
            await runner.cleanup()


def main() -> None:
    """`python -c "from tests.test_engine_registry import main; main()" --config ...`: the
    agent with the echo engine registered, as if a package had declared its entry point."""
    from wattops.agents.main import main as agent_main

    register_engine(EchoEngine)
    agent_main(sys.argv[1:])


def test_the_built_in_engines_and_sensors_come_from_entry_points() -> None:
    # Declared in pyproject.toml like any third-party plugin; the agent lists none by hand.
    assert {"llamacpp", "openai"} <= set(ENGINES.names())
    assert {"nvml", "jetson", "rapl", "estimate"} <= set(SENSORS.names())
    assert sensor_names()[0] == "auto"


def test_an_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"deployments": [{"name": "x", "engine": "echo", "reply": "hi"}]}, "a.toml")
    message = str(info.value)
    assert "deployments.0.engine" in message and "unknown engine 'echo'" in message
    assert "'llamacpp'" in message and "'openai'" in message


def test_a_registered_engine_validates_its_own_keys() -> None:
    register_engine(EchoEngine)
    try:
        good = parse_config({"deployments": [{"name": "x", "engine": "echo", "reply": "hi"}]})
        assert isinstance(good.deployments[0].settings, EchoSettings)
        assert good.deployments[0].settings.reply == "hi"
        with pytest.raises(ConfigError) as info:
            parse_config({"deployments": [{"name": "x", "engine": "echo", "reply": "",
                                           "threads": 2}]}, "agent.toml")  # fmt: skip
        message = str(info.value)
        assert message.startswith("agent.toml: invalid configuration")
        assert "deployments.0.reply: String should have at least 1 character" in message
        # llamacpp's keys are not echo's: refused, with the key named.
        assert "deployments.0.threads: Extra inputs are not permitted" in message
    finally:
        ENGINES._found.pop("echo", None)


ECHO = {"name": "echo", "engine": "echo", "reply": "hello from echo", "max_replicas": 2}


def test_a_deployment_runs_on_an_engine_added_in_one_module(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(
        token=TOKEN,
        deployments=[ECHO],
        start=False,
    )
    agent.command = [sys.executable, "-c",
                     "from tests.test_engine_registry import main; main()"]  # fmt: skip
    agent.start()
    try:
        dep = agent.deployment("echo")
        assert (dep["engine"], dep["state"], dep["ready_replicas"]) == ("echo", "serving", 1)
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        answer = agent.client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "hello from echo"
        assert agent.control("/v1/deployments/echo/scale", {"replicas": 2}).status_code == 202
        wait_for(lambda: agent.deployment("echo")["ready_replicas"] == 2, 30, "two echo replicas")
        assert agent.deployment("echo")["counters"]["requests_total"] == 1
    finally:
        agent.stop()
