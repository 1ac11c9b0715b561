"""Helpers and fixtures for tests that run a real wattops-router (registered for every test
module by conftest's pytest_plugins): a router subprocess with a config written from dicts,
and two agents priced as an edge CPU host and a cloud A100 box."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Agent, free_port, real_clock_env, wait_for

ROUTER_BIN = Path(sys.executable).with_name("wattops-router")


def clear_of_window_edge(window: str = "day", margin_s: float = 180.0) -> None:
    """Wait for the next UTC `window` (hour, day, month) if the current one ends within
    `margin_s`: a router subprocess runs on the real clock, so a test that counts spend in a
    window would see it start again from zero at 00:00 UTC if its run crossed it."""
    from wattops.router.billing.budgets import window_end

    now = time.time()
    end = window_end(window, datetime.fromtimestamp(now, UTC)).timestamp()
    if end - now < margin_s:
        time.sleep(end - now + 1)


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
    #: Extra environment for the router process (e.g. PYTHONASYNCIODEBUG).
    env: dict[str, str] = field(default_factory=dict)

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
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen([str(ROUTER_BIN), "--config", str(self.config)],
                                     stdout=log, stderr=log, env=env)  # fmt: skip
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

    def metrics(self) -> str:
        return self.client.get("/metrics").text

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
                      tables=window, start=False)  # fmt: skip
    cloud = make_agent(agent_extra={"node": "cloud", "profile": "a100-80gb", "sensor": "estimate"},
                       tables=window, start=False)  # fmt: skip
    edge.launch(), cloud.launch()  # side by side: each takes a couple of seconds to be ready
    return edge.ready(), cloud.ready()


CHAT = {"name": "chat", "candidates": ["*/tiny"], "reference": "cloud/tiny", "policy": "cheapest"}


class Balanced:
    """Two wattops-routers sharing one Redis store behind a real HAProxy (Debian's; `make test`
    installs it), balancing each request round robin: how several routers are deployed, seen
    by a test as one router. Admin calls, keys and requests land on either router, so every
    assertion about budgets, keys and the ledger holds across both."""

    def __init__(self, routers: list[RouterProc], folder: Path) -> None:
        self.routers = routers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        servers = "\n".join(
            f"  server r{n} 127.0.0.1:{r.port} check inter 500ms fall 1 rise 1"
            for n, r in enumerate(routers)
        )
        config = folder / "haproxy.cfg"
        config.write_text(
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n"
            "  timeout server 120s\n  option redispatch\n  retries 1\n"
            f"frontend routers\n  bind 127.0.0.1:{self.port}\n  default_backend routers\n"
            f"backend routers\n  balance roundrobin\n{servers}\n"
        )
        quiet = subprocess.DEVNULL
        self.lb = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=quiet,
                                   stderr=quiet, env=real_clock_env())  # fmt: skip
        self.client = httpx.Client(base_url=self.url, timeout=60)
        wait_for(lambda: self.client.get("/healthz").status_code == 200, 30, "HAProxy")

    # What the tests use of one RouterProc: the first router stands for "the router" where
    # one process is meant (the one a kill -9 test kills and restarts).
    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self.routers[0].proc

    @property
    def folder(self) -> Path:
        return self.routers[0].folder

    def start(self) -> Balanced:
        self.routers[0].start()
        return self

    def route(self, name: str) -> dict[str, Any]:
        return self.routers[0].route(name)

    def view(self) -> dict[str, Any]:
        """The routers' views together: counts added, lists joined."""
        views = [r.view() for r in self.routers]
        out = dict(views[0])
        for v in views[1:]:
            for k, x in v.items():
                if isinstance(x, int | float) and not isinstance(x, bool):
                    out[k] = out.get(k, 0) + x
                elif isinstance(x, list):
                    out[k] = [*out.get(k, []), *x]
                elif x and not out.get(k):
                    out[k] = x
        return out

    def ask(self, model: str = "chat", headers: dict[str, str] | None = None,
            **extra: Any) -> httpx.Response:  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 4, "temperature": 0.7, **extra}  # fmt: skip
        return self.client.post("/v1/chat/completions", json=body, headers=headers or {})

    def metrics(self) -> str:
        """Every router's /metrics (each counts what it did itself)."""
        return "\n".join(r.metrics() for r in self.routers)

    def stop(self) -> None:
        self.client.close()
        self.lb.terminate()
        self.lb.wait(10)
