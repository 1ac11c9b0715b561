"""Shared fixtures: the generated test model and real `wattops-agent` processes on loopback."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
AGENT_BIN = Path(sys.executable).with_name("wattops-agent")
TOKEN = "s3cret-operator-token"


@pytest.fixture(scope="session")
def test_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `test`-size GGUF: the one `make` generated, or a fresh one."""
    made = ROOT / "models" / "test.gguf"
    if made.exists():
        return made
    from wattops.engines.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "test.gguf", "test")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `redis-server` (Debian's; `make test` installs it) on a free loopback port, with
    no persistence: its URL. Tests that use it flush it first (`redis_url`)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder), "--save", "",
         "--appendonly", "no", "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=real_clock_env(),
    )  # fmt: skip

    def up() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(up, 20, "redis-server to listen")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The real Redis, emptied for this test."""
    import redis

    with redis.Redis.from_url(redis_server) as db:
        db.flushall()
    return redis_server


def real_clock_env() -> dict[str, str]:
    """This environment without libfaketime (`make test-dates` runs the tests with the clock
    days ahead): for the servers that stand on the other side of the clock boundary, Redis and
    HAProxy, which keep the machine's real time as a shared store's would (redis-server also
    cannot start under libfaketime: jemalloc's clock_gettime recursion)."""
    faked = {"LD_PRELOAD", "FAKETIME", "FAKETIME_DONT_FAKE_MONOTONIC", "FAKETIME_NO_CACHE"}
    return {k: v for k, v in os.environ.items() if k not in faked}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (httpx.HTTPError, KeyError, IndexError) as exc:
            last_error = exc
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


@dataclass
class Agent:
    """A real wattops-agent subprocess and an HTTP client for it."""

    config_path: Path
    state_dir: Path
    port: int
    token: str | None
    proc: subprocess.Popen[bytes] | None = None
    #: How to start it; default: the installed `wattops-agent`.
    command: list[str] = field(default_factory=lambda: [str(AGENT_BIN)])
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def start(self, wait_ready: bool = True) -> Agent:
        return self.launch().ready(wait_ready)

    def launch(self) -> Agent:
        """Start the process and return at once (several agents start side by side: `ready`
        waits for each)."""
        log = (self.state_dir.parent / "agent.log").open("ab")
        self.proc = subprocess.Popen(
            [*self.command, "--config", str(self.config_path), "--log-level", "info"],
            stdout=log,
            stderr=log,
        )
        return self

    def ready(self, converged: bool = True) -> Agent:
        """Wait for /healthz, and for the deployments to converge unless `converged` is off."""
        wait_for(self._healthy, 60, "agent /healthz")
        if converged:
            self.wait_converged()
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}: {self.log_tail()}")
        return self.client.get("/healthz").status_code == 200

    def log_tail(self) -> str:
        path = self.state_dir.parent / "agent.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def node(self) -> dict[str, Any]:
        resp = self.client.get("/v1/node")
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def node_from_state(self) -> dict[str, Any]:
        """The node's saved totals, with `saved_at`, from the state file of a stopped agent."""
        import json

        state = json.loads((self.state_dir / "state.json").read_text())
        return {**state["node"], "saved_at": state["saved_at"]}

    def deployment(self, name: str = "tiny") -> dict[str, Any]:
        return next(d for d in self.node()["deployments"] if d["name"] == name)

    def wait_converged(self, name: str | None = None, timeout: float = 90) -> dict[str, Any]:
        """Wait until deployments serve their desired precision and replicas, nothing more."""

        def done() -> dict[str, Any] | None:
            deps = self.node()["deployments"]
            for dep in deps:
                if name and dep["name"] != name:
                    continue
                if dep["state"] not in ("serving", "parked"):
                    return None
                if dep["precision"] != dep["desired_precision"]:
                    return None
                if len(dep["replicas"]) != dep["desired_replicas"]:
                    return None
            return deps[0] if name is None else next(d for d in deps if d["name"] == name)

        return wait_for(done, timeout, f"deployment {name or 'all'} to converge")  # type: ignore[no-any-return]

    def control(self, path: str, body: Any, token: str | None = "default") -> httpx.Response:
        headers = {}
        tok = self.token if token == "default" else token
        if tok:
            headers["Authorization"] = f"Bearer {tok}"
        return self.client.post(path, json=body, headers=headers)

    def chat(self, content: str, **extra: Any) -> httpx.Response:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            **extra,
        }
        return self.client.post("/v1/chat/completions", json=body)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send_signal(sig)
        self.wait_stopped()

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` if the process still runs (several agents stop side by side:
        `wait_stopped` waits for each)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait_stopped(self) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def replica_pids(state_dir: Path) -> list[int]:
    """Live processes carrying this agent's replica marker (see engines/process.py)."""
    from wattops.engines.process import find_orphans

    return find_orphans(state_dir.resolve())


DEFAULT_DEPLOYMENT = {
    "name": "tiny",
    "engine": "llamacpp",
    "precision": "q8_0",
    "replicas": 1,
    "max_replicas": 3,
    "threads": 1,
    "context": 512,
}


def render_toml(
    agent: dict[str, Any],
    deployments: list[dict[str, Any]],
    cache: dict[str, Any] | None = None,
    tables: dict[str, dict[str, Any]] | None = None,
) -> str:
    """A tiny TOML writer for the flat tables these tests use."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["[agent]"] + [f"{k} = {value(v)}" for k, v in agent.items()]
    if cache:
        lines += ["", "[cache]"] + [f"{k} = {value(v)}" for k, v in cache.items()]
    for tname, table in (tables or {}).items():
        lines += ["", f"[{tname}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    for dep in deployments:
        lines += ["", "[[deployments]]"]
        tables = {k: v for k, v in dep.items() if isinstance(v, dict)}
        lines += [f"{k} = {value(v)}" for k, v in dep.items() if not isinstance(v, dict)]
        for tname, table in tables.items():
            lines += [f"[deployments.{tname}]"] + [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def make_agent(tmp_path: Path, test_model: Path) -> Iterator[Callable[..., Agent]]:
    """Factory: `make_agent(token=..., **deployment_overrides)` starts a real agent;
    `tables` adds top-level tables such as `[kubernetes]`. Its power is the profile's estimate
    unless `agent_extra` names another sensor (or `"auto"`, to test detection)."""
    agents: list[Agent] = []

    def make(
        *,
        token: str | None = None,
        deployments: list[dict[str, Any]] | None = None,
        agent_extra: dict[str, Any] | None = None,
        cache: dict[str, Any] | None = None,
        tables: dict[str, dict[str, Any]] | None = None,
        start: bool = True,
        **overrides: Any,
    ) -> Agent:
        state_dir = tmp_path / f"agent{len(agents)}" / "state"
        state_dir.parent.mkdir(parents=True)
        port = free_port()
        agent_table: dict[str, Any] = {
            "node": f"test-node-{len(agents)}",
            "listen": f"127.0.0.1:{port}",
            "state_dir": str(state_dir),
            "health_interval_s": 0.5,
            "wake_timeout_s": 60,
            # The profile's estimate, whatever this machine has: a runner with readable RAPL
            # or an NVIDIA GPU would otherwise measure, and tests that mean the estimate would
            # fail there. A test of detection or of a sensor names it (`agent_extra`).
            "sensor": "estimate",
            **(agent_extra or {}),
        }
        if token:
            agent_table["token"] = token
        if deployments is None:
            deployments = [{**DEFAULT_DEPLOYMENT, "model": str(test_model), **overrides}]
        config_path = state_dir.parent / "agent.toml"
        config_path.write_text(render_toml(agent_table, deployments, cache, tables))
        agent = Agent(config_path, state_dir, port, token)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:  # all at once: each takes a moment to stop its replicas
        agent.send_signal()
    for agent in agents:
        agent.wait_stopped()
        agent.client.close()
        # Nothing the agent started may outlive it.
        wait_for(lambda a=agent: not replica_pids(a.state_dir), 15, "replicas to exit")


@pytest.fixture
def agent(make_agent: Callable[..., Agent]) -> Agent:
    """One agent serving the test model as deployment `tiny` at q8_0, one replica."""
    return make_agent()


os.environ.setdefault("PYTHONUNBUFFERED", "1")

#: Fixtures for tests that run a router (make_router, two_nodes).
pytest_plugins = ["tests.routers"]
# llama-server is built once into the user's cache (`make llama-server`); name that build before
# the cache moves to a folder of this run, so agents started by tests find it.
if "WATTOPS_LLAMA_SERVER" not in os.environ:
    from wattops.engines.server_binary import cached_path

    if cached_path().is_file():
        os.environ["WATTOPS_LLAMA_SERVER"] = str(cached_path())
# Built variants and quality tables go to a folder of this run, not the user's ~/.cache/wattops
# (agents, benches and `wattops quality` started by tests inherit it). One folder per pytest
# process (xdist's workers inherit the controller's environment): the variant and quality
# caches are safe to share (atomic writes, file locks), but a worker's tests then see only what
# that worker built, as in a run in one process, and each folder goes when its process exits.
if "WATTOPS_CACHE_DIR" not in os.environ or os.environ.get("_WATTOPS_TEST_CACHE"):
    _CACHE = tempfile.mkdtemp(prefix="wattops-cache-")
    os.environ["WATTOPS_CACHE_DIR"] = _CACHE
    os.environ["_WATTOPS_TEST_CACHE"] = "1"  # ours: the next pytest process makes its own
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

#: The test modules that may run beside another one. `make test` runs these on two
#: pytest-xdist workers (a module's tests stay on one worker), then every other module alone.
#: A module belongs here when nothing in it depends on how busy the machine is: it compares no
#: two measured figures (throughput, latency, energy, J/token, a learned price) and waits for
#: no timer that a neighbour's load could stretch past its bound. A test of such a module that
#: does is marked `@pytest.mark.alone` and runs with the rest. Not named here, a module runs
#: alone: the safe default for a new test.
BESIDE_OTHERS = frozenset({
    "test_accounting", "test_api_validation", "test_audit", "test_budgets", "test_cli_fleet",
    "test_cluster_mode", "test_config", "test_console", "test_console_kube",
    "test_console_routes", "test_console_snapshots", "test_downtime", "test_engine_metrics",
    "test_engine_registry", "test_fleet_target", "test_fuzz", "test_grafana_dashboard",
    "test_headless", "test_kube", "test_kube_apiserver", "test_kube_manifests", "test_logprobs",
    "test_metrics", "test_openai_engine", "test_power_cap", "test_profiles", "test_quality",
    "test_roles", "test_router_budgets", "test_router_choose", "test_router_relay",
    "test_smollm2", "test_state", "test_tiny_model", "test_tls", "test_variants",
})  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem in BESIDE_OTHERS and item.get_closest_marker("alone") is None:
            item.add_marker(pytest.mark.beside_others)
