"""`wattops status`, `scale` and `precision` from the shell against real agents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import TOKEN, Agent, free_port, wait_for

WATTOPS = str(Path(sys.executable).with_name("wattops"))


def wattops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "WATTOPS_TOKEN"}
    full_env["WATTOPS_CONFIG"] = "/nonexistent/console.toml"
    full_env.update(env or {})
    return subprocess.run([WATTOPS, *args], capture_output=True, text=True, timeout=300,
                          env=full_env)  # fmt: skip


def test_status_prints_the_fleet_and_fails_for_an_unreachable_node(agent: Agent) -> None:
    # The row's power is the deployment's attributed watts over the recent window: it needs
    # a couple of seconds of history first (until then the table says "-").
    wait_for(lambda: agent.deployment()["accounting"]["figures"]["watts"] is not None, 30,
             "the first attributed watts")  # fmt: skip
    ok = wattops("status", "--agent", agent.url)
    assert ok.returncode == 0, ok.stderr
    header, line = ok.stdout.splitlines()[:2]
    assert header.split()[:5] == ["NODE", "DEPLOYMENT", "PRECISION", "REPLICAS", "STATE"]
    assert line.split()[:5] == ["test-node-0", "tiny", "q8_0", "1/1", "serving"]
    assert "est." in line  # the agent is pinned to the estimate: its watts say so
    # Which hardware each node is (its profile), in a mixed fleet.
    assert header.split()[5] == "HARDWARE" and line.split()[5] == "cpu-generic"
    dead = f"http://127.0.0.1:{free_port()}"
    bad = wattops("status", "--agent", agent.url, "--agent", dead)
    assert bad.returncode == 1
    assert f"unreachable: {dead}" in bad.stderr
    assert "offline" in bad.stdout
    raw = json.loads(wattops("status", "--agent", agent.url, "--json").stdout)
    assert raw[0]["snapshot"]["deployments"][0]["name"] == "tiny"


def test_scale_and_precision_wait_for_the_outcome(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(token=TOKEN)
    env = {"WATTOPS_TOKEN": TOKEN}
    out = wattops("scale", "tiny", "2", "--agent", agent.url, env=env)
    assert out.returncode == 0, out.stderr
    assert "done: tiny has 2 ready replica(s)" in out.stdout
    assert agent.deployment()["ready_replicas"] == 2
    out = wattops("precision", "tiny", "q4_0", "--agent", agent.url, env=env)
    assert out.returncode == 0, out.stderr
    assert "done: tiny serves q4_0 on 2 replica(s)" in out.stdout
    refused = wattops("precision", "tiny", "q9_9", "--agent", agent.url, env=env)
    assert refused.returncode == 1
    assert "q9_9" in refused.stderr and "q4_k_m" in refused.stderr
    no_token = wattops("scale", "tiny", "1", "--agent", agent.url)
    assert no_token.returncode == 1
    assert "Bearer" in no_token.stderr
    quick = wattops("scale", "tiny", "1", "--agent", agent.url, "--no-wait", env=env)
    assert quick.returncode == 0 and "done" not in quick.stdout
    unknown = wattops("scale", "nope", "1", "--agent", agent.url, env=env)
    assert unknown.returncode == 2 and "tiny on test-node-0" in unknown.stderr
    negative = wattops("scale", "tiny", "-1", "--agent", agent.url, env=env)
    assert negative.returncode == 2 and "must be" in negative.stderr


def test_a_token_file_readable_by_others_is_refused(agent: Agent, tmp_path: Path) -> None:
    config = tmp_path / "console.toml"
    config.write_text(f'token = "{TOKEN}"\n')
    config.chmod(0o644)
    out = wattops("scale", "tiny", "1", "--agent", agent.url, env={"WATTOPS_CONFIG": str(config)})
    assert out.returncode != 0
    assert "readable by others" in out.stderr and "chmod 600" in out.stderr
    config.chmod(0o600)
    out = wattops("scale", "tiny", "1", "--agent", agent.url, env={"WATTOPS_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr


def test_inventory_file_errors_name_the_field(tmp_path: Path) -> None:
    inventory = tmp_path / "fleet.toml"
    inventory.write_text('[[agents]]\nurl = "ftp://gpu-a1:8080"\n')  # not HTTP
    out = wattops("status", "--inventory", str(inventory))
    assert out.returncode != 0
    assert "agents.0.url" in out.stderr and "http://" in out.stderr


def test_what_a_new_user_types_is_understood_or_refused_with_the_reason(
    make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = make_agent(token=TOKEN)
    host_port = agent.url.removeprefix("http://")
    # No scheme: it is an agent's address all the same; given twice, it is one node.
    out = wattops("status", "--agent", host_port, "--agent", agent.url + "/")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()
            and not line.startswith("!")] == ["test-node-0"]  # fmt: skip
    # A refused control call says how to give the token.
    refused = wattops("scale", "tiny", "2", "--agent", agent.url)
    assert refused.returncode == 1
    assert "WATTOPS_TOKEN" in refused.stderr and "mode 600" in refused.stderr
    # A refused precision lists what is allowed once.
    env = {"WATTOPS_TOKEN": TOKEN}
    wrong = wattops("precision", "tiny", "q9_9", "--agent", agent.url, env=env)
    assert wrong.stderr.count("q4_k_m") == 1
    # An address nobody answers on says why.
    dead = wattops("status", "--agent", f"127.0.0.1:{free_port()}")
    assert dead.returncode == 1 and "cannot connect" in dead.stderr
    # Numbers that cannot be meant are refused before anything is sent.
    bad = wattops("scale", "tiny", "2", "--agent", agent.url, "--timeout", "-5", env=env)
    assert bad.returncode == 2 and "more than 0 seconds" in bad.stderr
    assert agent.deployment()["desired_replicas"] == 1
    seed = wattops("model", "tiny", str(tmp_path / "x.gguf"), "--seed", "-3")
    assert seed.returncode == 2 and "0..4294967295" in seed.stderr
    missing = wattops("model", "tiny", str(tmp_path / "no" / "such" / "x.gguf"))
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    assert not (tmp_path / "no").exists()
    folder = wattops("model", "tiny", str(tmp_path))
    assert folder.returncode != 0 and "is a folder" in folder.stderr


def test_a_failed_deployment_says_why_where_people_look(
    make_agent: Callable[..., Agent], test_model: Path
) -> None:
    missing = {"name": "falcon-7b", "engine": "openai", "model": "tiiuae/falcon-7b",
               "command": ["vllm-not-installed", "serve", "{model}", "--port", "{port}"],
               "precision": "f16"}  # fmt: skip
    tiny = {"name": "tiny", "engine": "llamacpp", "model": str(test_model), "context": 512}
    agent = make_agent(deployments=[tiny, missing], start=False)
    agent.start(wait_ready=False)
    alert = wait_for(lambda: next((a for a in agent.node()["alerts"]
                                   if a["kind"] == "deployment_failed"), None), 60,
                     "the failure alert")  # fmt: skip
    assert alert["subject"] == "falcon-7b" and alert["severity"] == "critical"
    assert "'vllm-not-installed' was not found on PATH" in alert["message"]
    out = wattops("status", "--agent", agent.url)
    row = next(line for line in out.stdout.splitlines() if "falcon-7b" in line)
    assert "failed" in row and row.split()[-1] == "1"  # its ALERTS column
    assert "! test-node-0: falcon-7b on test-node-0 failed:" in out.stdout
    assert "not found on PATH" in out.stdout
    # Nothing ran, so no log was left behind for it (one per attempt, empty, before).
    assert not any("falcon" in p.name for p in (agent.state_dir / "logs").glob("*.log"))


def test_model_quantize_keeps_llama_cpps_log_out_and_says_why_it_failed(
    test_model: Path, tmp_path: Path
) -> None:
    out = wattops("model", "quantize", str(test_model), str(tmp_path / "q.gguf"),
                  "--precision", "q4_0")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("wrote ") and out.stderr == ""  # not llama.cpp's loader log
    text = tmp_path / "notes.gguf"
    text.write_text("# not a model\n")
    bad = wattops("model", "quantize", str(text), str(tmp_path / "x.gguf"), "--precision", "q4_0")
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "not a GGUF file" in bad.stderr


def test_help_says_what_is_true() -> None:
    make_help = subprocess.run(["make", "-s", "help"], cwd=Path(__file__).parent.parent,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "three-node fleet" in make_help.stdout  # not "an agent"
    precision = wattops("precision", "--help").stdout
    assert "available_precisions" in precision and "f32, f16, bf16" not in precision
    load = wattops("load", "--help").stdout
    assert "(default http://127.0.0.1:8080)" in load and "(default tiny)" in load


def test_old_replica_logs_are_pruned(tmp_path: Path) -> None:
    from wattops.engines.process import prune_logs

    for i in range(60):
        log = tmp_path / f"tiny-q8_0-{i:02d}.log"
        log.write_text("x")
        os.utime(log, (1_000_000 + i, 1_000_000 + i))
    prune_logs(tmp_path, keep=50)
    kept = sorted(p.name for p in tmp_path.glob("*.log"))
    assert len(kept) == 50 and kept[0] == "tiny-q8_0-10.log"  # the oldest ten went
