"""The generic OpenAI-compatible engine, launched from an argv template and attached by URL.

The server behind it is the real `llama-server` (the one `make llama-server` builds, found as
the `llamacpp-server` engine finds it), started as a third-party server would be: by the
engine's argv template, or by hand and attached by URL. It stands where vLLM or TGI would on
a GPU node: the same OpenAI HTTP API, a `/health` path, token counters on `/metrics`. What is
not covered here: vLLM's and TGI's own metric names (tests/test_engine_metrics.py parses
their exposition text).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Agent, free_port, wait_for
from tests.cutting_link import CuttingLink
from wattops.engines import server_binary
from wattops.engines.base import EngineError
from wattops.engines.openai_server import OpenAIServerEngine


def server_argv(model: str, port: str, name: str) -> list[str]:
    """How an operator would start llama-server for the engine: one slot, no web UI, the
    chat template from the GGUF, Prometheus metrics on."""
    return [str(server_binary.find()), "--model", model, "--host", "127.0.0.1", "--port", port,
            "--alias", name, "--ctx-size", "512", "--threads", "1", "--parallel", "1",
            "--metrics", "--no-webui", "--jinja", "--no-warmup"]  # fmt: skip


@pytest.fixture
def running_server(test_model: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    with (tmp_path / "llama-server.log").open("wb") as log:
        proc = subprocess.Popen(server_argv(str(test_model), str(port), "attached"),
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/health").status_code == 200, 60, "attached server")
        # llama.cpp's own server (its /props), not a stand-in of ours.
        assert "build_info" in httpx.get(url + "/props").json()
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def test_launched_and_attached_servers_serve_through_the_gateway(
    make_agent: Callable[..., Agent], test_model: Path, running_server: str
) -> None:
    launched = {
        "name": "gpu",
        "engine": "openai",
        "model": str(test_model),
        "precision": "f16",
        "command": server_argv("{model}", "{port}", "gpu"),
        "replicas": 1,
        "max_replicas": 2,
    }
    attached = {
        "name": "remote",
        "engine": "openai",
        "url": running_server,
        "precision": "f16",
        "replicas": 1,
        "max_replicas": 1,
    }
    agent = make_agent(deployments=[launched, attached])
    for name in ("gpu", "remote"):
        body = {
            "model": name,
            "max_tokens": 4,
            "temperature": 0.4,
            "messages": [{"role": "user", "content": "hello there"}],
        }
        resp = agent.client.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200, resp.text
    # Token counters come from the servers' Prometheus metrics.
    wait_for(
        lambda: all(
            d["counters"]["completion_tokens_total"] > 0 for d in agent.node()["deployments"]
        ),
        15,
        "engine token counters",
    )
    # A launched server scales like any replica; an attached one cannot.
    assert agent.control("/v1/deployments/gpu/scale", {"replicas": 2}).status_code == 202
    assert agent.wait_converged("gpu")["ready_replicas"] == 2
    resp = agent.control("/v1/deployments/remote/scale", {"replicas": 2})
    assert resp.status_code == 422
    resp = agent.control("/v1/deployments/remote/precision", {"precision": "q4_0"})
    assert resp.status_code == 422
    assert resp.json()["allowed"] == ["f16"]


def test_command_template_is_filled_per_argument_never_through_a_shell(tmp_path: Path) -> None:
    engine = OpenAIServerEngine(
        None,  # type: ignore[arg-type]  # no HTTP needed to render argv
        name="v",
        model="meta-llama/Llama-2-13b-hf; rm -rf /",
        precision="f16",
        precisions=["f16"],
        url=None,
        command=["vllm", "serve", "{model}", "--port={port}", "--dtype", "{precision}"],
        owner=tmp_path,
        log_dir=tmp_path,
    )
    assert engine.argv("f16", 8001) == [
        "vllm",
        "serve",
        "meta-llama/Llama-2-13b-hf; rm -rf /",
        "--port=8001",
        "--dtype",
        "f16",
    ]
    bad = OpenAIServerEngine(
        None,  # type: ignore[arg-type]
        name="v",
        model="m",
        precision="f16",
        precisions=["f16"],
        url=None,
        command=["serve", "{port}", "{gpu}"],
        owner=tmp_path,
        log_dir=tmp_path,
    )
    with pytest.raises(EngineError, match="placeholders allowed"):
        bad.argv("f16", 1)


def test_an_answer_broken_off_after_its_headers_is_asked_again(
    make_agent: Callable[..., Agent], running_server: str
) -> None:
    """A replica that sends an unstreamed answer's headers and dies before its body (a link
    that cuts the connection there stands in for the moment) has sent the client nothing: the
    gateway asks again, as for a replica that failed before answering, and the client gets
    the answer. A second break in the same request is answered 502."""
    link = CuttingLink(int(running_server.rsplit(":", 1)[1])).start()
    try:
        attached = {"name": "remote", "engine": "openai", "url": link.url, "precision": "f16",
                    "replicas": 1, "max_replicas": 1}  # fmt: skip
        agent = make_agent(deployments=[attached])
        body = {"model": "remote", "max_tokens": 4, "temperature": 0.4,
                "messages": [{"role": "user", "content": "hello there"}]}  # fmt: skip
        link.cut_next = 1
        resp = agent.client.post("/v1/chat/completions", json=body)
        assert link.cut == 1
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 4
        link.cut_next = 2
        resp = agent.client.post("/v1/chat/completions", json=body)
        assert link.cut == 3
        assert resp.status_code == 502 and "broke off" in resp.json()["error"]["message"]
        assert agent.deployment("remote")["counters"]["errors_total"] == 1
    finally:
        link.stop()
