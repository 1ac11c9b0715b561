"""Helpers and fixtures for tests that run a real wattops-router (registered for every test
module by conftest's pytest_plugins): a router subprocess with a config written from dicts,
and two agents priced as an edge CPU host and a cloud A100 box."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Agent, free_port, wait_for

ROUTER_BIN = Path(sys.executable).with_name("wattops-router")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"
    return json.dumps(str(v))


@dataclass
class RouterProc:
    """A real wattops-router subprocess."""

    folder: Path
    agents: list[str]
    routes: list[dict[str, Any]]
    router_extra: dict[str, Any] = field(default_factory=dict)
    budgets: list[dict[str, Any]] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        self.config = self.folder / "router.toml"
        router = {"listen": f"127.0.0.1:{self.port}", "state_dir": str(self.folder / "state"),
                  "breaker_open_s": 1.0, **self.router_extra}  # fmt: skip
        lines = ["[router]", *(f"{k} = {_toml_value(v)}" for k, v in router.items())]
        for url in self.agents:
            lines += ["", "[[agents]]", f"url = {_toml_value(url)}"]
        for route in self.routes:
            lines += ["", "[[routes]]", *(f"{k} = {_toml_value(v)}" for k, v in route.items())]
        for budget in self.budgets:
            lines += ["", "[[budgets]]", *(f"{k} = {_toml_value(v)}" for k, v in budget.items())]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self, live: int | None = None) -> RouterProc:
        log = (self.folder / "router.log").open("ab")
        self.proc = subprocess.Popen([str(ROUTER_BIN), "--config", str(self.config)],
                                     stdout=log, stderr=log)  # fmt: skip
        wanted = len(self.agents) if live is None else live
        wait_for(lambda: self.view()["agents_live"] >= wanted, 60, "router to see the agents")
        return self

    def view(self) -> dict[str, Any]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.folder / "router.log").read_text()[-2000:]
            raise AssertionError(f"router exited with {self.proc.returncode}: {log}")
        return self.client.get("/v1/router").json()  # type: ignore[no-any-return]

    def route(self, name: str) -> dict[str, Any]:
        return next(r for r in self.view()["routes"] if r["name"] == name)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)

    def ask(self, model: str = "chat", headers: dict[str, str] | None = None,
            **extra: Any) -> httpx.Response:  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 4, "temperature": 0.7, **extra}  # fmt: skip
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
        self.client.close()


@pytest.fixture
def make_router(tmp_path: Path) -> Iterator[Callable[..., RouterProc]]:
    made: list[RouterProc] = []

    def make(
        agents: list[Agent],
        routes: list[dict[str, Any]],
        start: bool = True,
        budgets: list[dict[str, Any]] | None = None,
        **router_extra: Any,
    ) -> RouterProc:
        folder = tmp_path / f"router{len(made)}"
        folder.mkdir()
        proc = RouterProc(folder, [a.url for a in agents], routes, router_extra, budgets or [])
        made.append(proc)
        return proc.start() if start else proc

    yield make
    for proc in made:
        proc.stop()


@pytest.fixture
def two_nodes(make_agent: Callable[..., Agent]) -> tuple[Agent, Agent]:
    """`edge` priced as a CPU host, `cloud` as an A100 box: both serve `tiny` at q8_0."""
    # 5 s accounting windows: per-token figures follow a change within seconds.
    window = {"accounting": {"window_s": 5}}
    edge = make_agent(agent_extra={"node": "edge", "profile": "cpu-generic", "sensor": "estimate"},
                      tables=window)  # fmt: skip
    cloud = make_agent(agent_extra={"node": "cloud", "profile": "a100-80gb", "sensor": "estimate"},
                       tables=window)  # fmt: skip
    return edge, cloud


CHAT = {"name": "chat", "candidates": ["*/tiny"], "reference": "cloud/tiny", "policy": "cheapest"}
