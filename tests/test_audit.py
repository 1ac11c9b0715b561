"""The audit log: every control call, allowed or refused, on a real agent and a real router;
lines survive kill -9 (a torn last line is detected and skipped), the file rotates by size,
secrets never appear, and `wattops audit` prints it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.conftest import Agent
from tests.routers import CHAT, RouterProc
from tests.test_roles import SECRETS, auth, tokens_file
from wattops.vocabulary.audit import AuditLog, redact

WATTOPS = Path(sys.executable).with_name("wattops")


def test_lines_rotate_by_size_and_torn_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=400, keep=2)
    for n in range(20):
        audit.write({"time": n, "what": "x" * 40})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]  # bounded: keep = 2
    assert all(p.stat().st_size <= 400 for p in tmp_path.iterdir())
    entries, torn = audit.read()
    times = [e["time"] for e in entries]
    assert times == sorted(times) and times[-1] == 19 and torn == 0
    assert audit.read(since=18)[0] == [
        {"time": 18, "what": "x" * 40},
        {"time": 19, "what": "x" * 40},
    ]
    # A kill -9 in the middle of a write leaves half a line: found on open, skipped on read.
    with path.open("ab") as f:
        f.write(b'{"time": 20, "wh')
    again = AuditLog(path, max_bytes=10_000, keep=2)
    again.write({"time": 21})
    entries, torn = again.read(since=19)
    assert [e["time"] for e in entries] == [19, 21] and torn == 1


def test_secrets_are_redacted_wherever_they_are() -> None:
    body = {"team": "ml", "token": "s3cret", "nested": [{"api_key": "k", "name": "n"}],
            "Authorization": "Bearer x", "password": "p"}  # fmt: skip
    assert redact(body) == {"team": "ml", "token": "<redacted>",
                            "nested": [{"api_key": "<redacted>", "name": "n"}],
                            "Authorization": "<redacted>", "password": "<redacted>"}  # fmt: skip


def test_agent_actions_allowed_and_refused_are_audited_and_survive_kill_9(
    make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = make_agent(agent_extra={"tokens_file": str(tokens_file(tmp_path))})
    c = httpx.Client(base_url=agent.url, timeout=30)
    ok = c.post("/v1/deployments/tiny/scale", json={"replicas": 1}, headers=auth("operator"))
    assert ok.status_code == 202
    refused = c.post("/v1/deployments/tiny/precision", json={"precision": "q4_k_m"},
                     headers=auth("viewer"))  # fmt: skip
    assert refused.status_code == 403
    anonymous = c.post("/v1/deployments/tiny/scale", json={"replicas": 2})
    assert anonymous.status_code == 401
    # Reads are not audited; the audit itself needs an operator.
    assert c.get("/v1/node").status_code == 200
    assert c.get("/v1/audit", headers=auth("viewer")).status_code == 403
    assert agent.proc is not None
    agent.stop(signal.SIGKILL)  # every line was fsynced before its answer went out
    agent.start()
    page = c.get("/v1/audit", headers=auth("operator")).json()
    entries = page["entries"]
    assert [(e["who"], e["path"], e["status"], e["outcome"]) for e in entries] == [
        ("operator-bot", "/v1/deployments/tiny/scale", 202, "allowed"),
        ("viewer-bot", "/v1/deployments/tiny/precision", 403, "refused"),
        ("no token", "/v1/deployments/tiny/scale", 401, "refused"),
    ]
    first, second = entries[0], entries[1]
    assert first["body"] == {"replicas": 1} and first["from"].startswith("127.0.0.1:")
    assert first["figures"]["precision"] == "q8_0" and first["figures"]["deployment"] == "tiny"
    assert "needs the operator role; token 'viewer-bot' is a viewer" in second["message"]
    text = (agent.state_dir / "audit.jsonl").read_text()
    assert all(secret not in text for secret in SECRETS.values())
    # The CLI, as an operator on call would read it.
    env = {**os.environ, "WATTOPS_TOKEN": SECRETS["operator"]}
    shown = subprocess.run([str(WATTOPS), "audit", "--agent", agent.url, "--since", "1h"],
                           capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert len(lines) == 3
    assert "agent operator-bot@127.0.0.1:" in lines[0]
    assert (
        'POST /v1/deployments/tiny/scale {"replicas":1} -> 202 allowed [q8_0 1/1 replicas]'
        in (lines[0])
    )
    assert "-> 403 refused: " in lines[1] and "needs the operator role" in lines[1]
    as_json = subprocess.run([str(WATTOPS), "audit", "--agent", agent.url, "--json"],
                             capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert [json.loads(x)["who"] for x in as_json.stdout.splitlines()] == [
        "operator-bot", "viewer-bot", "no token"
    ]  # fmt: skip
    denied = subprocess.run([str(WATTOPS), "audit", "--agent", agent.url], capture_output=True,
                            text=True, timeout=60,
                            env={**env, "WATTOPS_TOKEN": SECRETS["viewer"]})  # fmt: skip
    assert denied.returncode == 1 and "403" in denied.stderr


def test_router_control_calls_are_audited(make_router: Callable[..., RouterProc],
                                          agent: Agent) -> None:  # fmt: skip
    route = {**CHAT, "candidates": ["*/tiny"], "reference": f"{agent.node()['node']}/tiny"}
    router = make_router([agent], [route], token="router-admin-token-1234")
    admin = {"Authorization": "Bearer router-admin-token-1234"}
    assert router.client.patch("/v1/routes/chat", json={"policy": "fastest"},
                               headers=admin).status_code == 200  # fmt: skip
    made = router.client.post("/v1/keys", json={"team": "ml"}, headers=admin)
    assert made.status_code == 201
    assert router.client.post("/v1/keys", json={"team": "ml"}).status_code == 401
    assert router.ask().status_code in (200, 401)  # inference is not a control call
    page = router.client.get("/v1/audit", headers=admin).json()
    got = [(e["who"], e["method"], e["path"], e["status"]) for e in page["entries"]]
    assert got == [
        ("token", "PATCH", "/v1/routes/chat", 200),
        ("token", "POST", "/v1/keys", 201),
        ("no token", "POST", "/v1/keys", 401),
    ]
    # The key is in the answer only: never in the audit log.
    text = (router.folder / "state" / "audit.jsonl").read_text()
    assert made.json()["key"] not in text and "router-admin-token-1234" not in text


async def test_the_console_node_view_shows_the_audit_log(
    make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    from tests.test_console import serving, until
    from wattops.console.app import make_app
    from wattops.console.screens.node import NodeScreen

    agent = make_agent(agent_extra={"tokens_file": str(tokens_file(tmp_path))})
    scaled = agent.client.post("/v1/deployments/tiny/scale", json={"replicas": 1},
                               headers=auth("operator"))  # fmt: skip
    assert scaled.status_code == 202

    async def panel(held: str, shown: str) -> None:
        app = make_app([agent.url], token=SECRETS[held], refresh_s=0.1)
        async with app.run_test(size=(200, 60)) as pilot:
            await until(pilot, lambda: serving(app), 30, "the first snapshot")
            await pilot.press("enter")
            screen = await until(pilot, lambda: isinstance(app.screen, NodeScreen) and app.screen,
                                 5, "the node view")  # fmt: skip
            await until(pilot, lambda: shown in str(screen.query_one("#audit").render()), 10,
                        f"the audit panel for a {held}")  # fmt: skip

    await panel("operator", "operator-bot@127.0.0.1")
    await panel("viewer", "needs an operator's token")
