"""Roles: viewer, operator and admin tokens on a real agent and a real router, table-driven
over every control endpoint (401 without a token, 403 naming the role needed and the one held,
allowed from the role up), reads behind a token when asked, the older single `token` as an
admin, `/v1/whoami`, and tokens files checked at start."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import AGENT_BIN, Agent
from tests.routers import CHAT, RouterProc
from wattops.vocabulary.access import Access, AccessDenied, TokenEntry, hash_token, load_tokens

WATTOPS = Path(sys.executable).with_name("wattops")
SECRETS = {"viewer": "viewer-secret-0123456789", "operator": "operator-secret-0123456789",
           "admin": "admin-secret-0123456789ab"}  # fmt: skip
ROLES = ("none", "viewer", "operator", "admin")


def tokens_file(folder: Path) -> Path:
    """A tokens file with one token per role, stored hashed (the admin's in plain text, which
    is accepted with a warning)."""
    path = folder / "tokens.toml"
    path.write_text(
        "".join(f'[[tokens]]\nname = "{role}-bot"\nrole = "{role}"\nhash = "{hash_token(secret)}"\n'
                for role, secret in SECRETS.items() if role != "admin")
        + f'[[tokens]]\nname = "admin-bot"\nrole = "admin"\ntoken = "{SECRETS["admin"]}"\n'
    )  # fmt: skip
    return path


def auth(role: str) -> dict[str, str]:
    return {} if role == "none" else {"Authorization": f"Bearer {SECRETS[role]}"}


def expect(needed: str, held: str, status: int, body: str) -> None:
    """`held` calling an endpoint that needs `needed`: 401, 403 naming both, or allowed."""
    if held == "none":
        assert status == 401, body
        assert "Authorization: Bearer" in body and needed in body
    elif ROLES.index(held) < ROLES.index(needed):
        assert status == 403, body
        assert f"needs the {needed} role; token '{held}-bot' is a {held}" in body
    else:
        assert status not in (401, 403), body


def test_tokens_hash_and_check_in_constant_form() -> None:
    stored = hash_token("a-long-enough-secret")
    assert stored.startswith("sha256$") and "a-long-enough-secret" not in stored
    assert hash_token("a-long-enough-secret") != stored  # a salt of its own each time
    access = Access([TokenEntry(name="ci", role="viewer", hash=stored)], "legacy-token-1234")
    assert access.check("Bearer a-long-enough-secret", "viewer", "x").name == "ci"
    assert access.check("Bearer legacy-token-1234", "admin", "x").role == "admin"
    with pytest.raises(AccessDenied, match="needs the operator role; token 'ci' is a viewer"):
        access.check("Bearer a-long-enough-secret", "operator", "scaling")
    with pytest.raises(AccessDenied, match="not one of this daemon's tokens") as unknown:
        access.check("Bearer wrong-wrong-wrong-wrong", "viewer", "x")
    assert unknown.value.status == 403 and "wrong-wrong" not in str(unknown.value)
    with pytest.raises(AccessDenied) as missing:
        access.check(None, "viewer", "reading")
    assert missing.value.status == 401
    assert Access([]).open and Access([]).check(None, "admin", "x").name == "anonymous"


def test_tokens_files_are_checked_naming_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    for text, said in (
        ('[[tokens]]\nname = "ci"\nrole = "root"\nhash = "x"\n', "tokens[0]: role"),
        ('[[tokens]]\nname = "ci"\nrole = "viewer"\n', "exactly one of hash (preferred) or token"),
        ('[[tokens]]\nname = "ci"\nrole = "viewer"\ntoken = "short"\n', "tokens[0]: token"),
        ('[agent]\nnode = "x"\n', "only [[tokens]] tables belong here, not agent"),
        ("[[tokens]\n", "not valid TOML"),
    ):  # fmt: skip
        bad.write_text(text)
        with pytest.raises(ValueError, match=r"tokens_file .*bad\.toml") as raised:
            load_tokens(bad)
        assert said in str(raised.value), str(raised.value)
    assert [e.name for e in load_tokens(tokens_file(tmp_path))] == [
        "viewer-bot", "operator-bot", "admin-bot"
    ]  # fmt: skip


@pytest.fixture
def guarded(make_agent: Callable[..., Agent], tmp_path: Path) -> Agent:
    """An agent whose reads need a token too; the fixture's own client reads as a viewer."""
    agent = make_agent(agent_extra={"tokens_file": str(tokens_file(tmp_path)), "reads": "viewer"},
                       start=False)  # fmt: skip
    agent.client.headers.update(auth("viewer"))
    agent.start()
    return agent


AGENT_CONTROL = [
    ("POST", "/v1/deployments/tiny/scale", {"replicas": 1}),
    ("POST", "/v1/deployments/tiny/precision", {"precision": "q8_0"}),
    ("DELETE", "/v1/deployments/tiny/canary", None),
]
AGENT_READS = ["/v1/node", "/v1/history?seconds=5", "/metrics"]


def test_each_role_on_every_agent_endpoint(guarded: Agent) -> None:
    c = httpx.Client(base_url=guarded.url, timeout=30)  # no token of its own
    for held in ROLES:
        for method, path, body in AGENT_CONTROL:
            resp = c.request(method, path, json=body, headers=auth(held))
            expect("operator", held, resp.status_code, resp.text)
        for path in AGENT_READS:
            resp = c.get(path, headers=auth(held))
            expect("viewer", held, resp.status_code, resp.text)
            if held != "none":
                assert resp.status_code == 200, (path, resp.text)
        who = c.get("/v1/whoami", headers=auth(held)).json()
        assert who["open"] is False and who["reads"] == "viewer"
        assert who["role"] == (None if held == "none" else held)
        assert who["may_control"] == (held in ("operator", "admin"))
    # Inference stays as it was: open on the agent.
    assert guarded.chat("still open", temperature=0.5).status_code == 200
    # The CLI reads with its token too.
    for held, code in (("viewer", 0), ("none", 1)):
        env = {k: v for k, v in os.environ.items() if k != "WATTOPS_TOKEN"}
        if held != "none":
            env["WATTOPS_TOKEN"] = SECRETS[held]
        shown = subprocess.run([str(WATTOPS), "status", "--agent", guarded.url],
                               capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
        assert shown.returncode == code, (held, shown.stdout, shown.stderr)


def test_the_older_single_token_is_an_admin_and_reads_stay_open(
    make_agent: Callable[..., Agent],
) -> None:
    agent = make_agent(token="legacy-operator-token")
    assert agent.client.get("/v1/node").status_code == 200  # reads = "open", the default
    refused = agent.client.post("/v1/deployments/tiny/scale", json={"replicas": 1})
    assert refused.status_code == 401
    ok = agent.control("/v1/deployments/tiny/scale", {"replicas": 1})
    assert ok.status_code == 202
    who = agent.client.get("/v1/whoami", headers={"Authorization": "Bearer legacy-operator-token"})
    assert who.json()["name"] == "token" and who.json()["role"] == "admin"


def test_an_agent_refuses_a_bad_tokens_file_at_start(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tokens]]\nname = "x"\nrole = "superuser"\nhash = "nope"\n')
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path}/state"\ntokens_file = "tokens.toml"\n')
    done = subprocess.run([str(AGENT_BIN), "--config", str(config)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "agent.tokens_file" in done.stderr
    assert "tokens[0]: role" in done.stderr


BUDGET = {"name": "b", "scope": "fleet", "unit": "usd", "window": "day", "limit": 5.0}
ROUTER_CALLS: list[tuple[str, str, Any, str]] = [
    ("GET", "/v1/router", None, "viewer"),
    ("GET", "/metrics", None, "viewer"),
    ("PATCH", "/v1/routes/chat", {"policy": "cheapest"}, "operator"),
    ("GET", "/v1/budgets", None, "viewer"),
    ("GET", "/v1/report?since=0", None, "viewer"),
    ("POST", "/v1/budgets", BUDGET, "admin"),
    ("GET", "/v1/keys", None, "admin"),
    ("POST", "/v1/keys", {"team": "ml"}, "admin"),
]


def test_each_role_on_every_router_endpoint(
    make_router: Callable[..., RouterProc], agent: Agent, tmp_path: Path
) -> None:
    route = {**CHAT, "candidates": ["*/tiny"], "reference": f"{agent.node()['node']}/tiny"}
    router = make_router([agent], [route], start=False, tokens_file=str(tokens_file(tmp_path)),
                         reads="viewer")  # fmt: skip
    router.client.headers.update(auth("viewer"))  # the fixture's own reads
    router.start()
    c = httpx.Client(base_url=router.url, timeout=30)  # no token of its own
    made = 0
    for held in ROLES:
        for method, path, body, needed in ROUTER_CALLS:
            resp = c.request(method, path, json=body, headers=auth(held))
            expect(needed, held, resp.status_code, resp.text)
            if method == "POST" and path == "/v1/budgets" and resp.status_code == 201:
                made += 1
                c.delete("/v1/budgets/b", headers=auth("admin"))
        who = c.get("/v1/whoami", headers=auth(held)).json()
        assert who["role"] == (None if held == "none" else held)
    assert made == 1  # only the admin made the budget
    # The CLI shows the refusal with the role needed.
    env = {**os.environ, "WATTOPS_ROUTER": router.url, "WATTOPS_TOKEN": SECRETS["operator"]}
    listed = subprocess.run([str(WATTOPS), "keys", "list"], capture_output=True, text=True,
                            timeout=60, env=env)  # fmt: skip
    assert listed.returncode != 0 and "needs the admin role" in listed.stderr


def test_keys_and_budgets_are_never_open(make_router: Callable[..., RouterProc],
                                         agent: Agent) -> None:  # fmt: skip
    route = {**CHAT, "candidates": ["*/tiny"], "reference": f"{agent.node()['node']}/tiny"}
    router = make_router([agent], [route])
    assert router.client.get("/v1/router").status_code == 200  # no tokens: reads and control
    assert router.client.patch("/v1/routes/chat", json={"policy": "fastest"}).status_code == 200
    for path in ("/v1/keys", "/v1/budgets", "/v1/report?since=0"):
        refused = router.client.get(path)
        assert refused.status_code == 403 and "needs a token: add [[tokens]]" in refused.text


def test_wattops_token_new_prints_the_token_once_and_its_table() -> None:
    made = subprocess.run([str(WATTOPS), "token", "new", "ci", "--role", "viewer"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert made.returncode == 0
    token = made.stdout.strip()
    assert token.startswith("wot_") and token not in made.stderr
    assert '[[tokens]]\nname = "ci"\nrole = "viewer"\nhash = "sha256$' in made.stderr
    stored = made.stderr.split('hash = "')[1].split('"')[0]
    assert (
        Access([TokenEntry(name="ci", role="viewer", hash=stored)])
        .check(f"Bearer {token}", "viewer", "x")
        .name
        == "ci"
    )
    bad = subprocess.run([str(WATTOPS), "token", "new", "two words", "--role", "viewer"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "letters, digits" in bad.stderr
    hashed = subprocess.run([str(WATTOPS), "token", "hash"], input=token + "\n",
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert hashed.returncode == 0 and hashed.stdout.startswith("sha256$")


async def test_a_console_with_a_viewer_token_sends_nothing_on_an_action_key(
    make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    from tests.test_console import SIZE, serving, until
    from wattops.console.app import make_app

    agent = make_agent(agent_extra={"tokens_file": str(tokens_file(tmp_path))})
    app = make_app([agent.url], token=SECRETS["viewer"], refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: serving(app), 30, "the first snapshot")
        screen = app.fleet_screen
        await until(pilot, lambda: agent.url in screen.denied, 10, "the agent's answer on roles")
        assert screen.denied[agent.url] == (
            "actions need an operator token (token 'viewer-bot' is a viewer)"
        )
        assert "actions disabled" in screen.sub_title
        # Shown, but disabled: a key press runs nothing, and nothing reaches the agent.
        assert screen.check_action("scale_up", ()) is None
        assert screen.check_action("sort", ()) is True
        await pilot.press("plus", "z", "y")
        await pilot.pause(1.0)
        assert screen.pending == {}  # no action was started, so no request went out
    dep = agent.deployment()
    assert dep["desired_replicas"] == 1 and dep["ready_replicas"] == 1
