"""Keys and budgets on a real wattops-router in front of real agents (llama.cpp on the test
model): 401/403 in OpenAI's error shape, revocation at once, the 429 naming the budget with
Retry-After, degrade before refuse, the overshoot bound under 32 concurrent clients, and a
consistent ledger after kill -9 of the router mid-load."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import ROOT, Agent, free_port, real_clock_env, wait_for
from tests.routers import CHAT, ROUTER_BIN, Balanced, RouterProc, clear_of_window_edge
from wattops.router.billing.ledger import Entry, Ledger
from wattops.router.billing.redis_ledger import RedisLedger

WATTOPS = Path(sys.executable).with_name("wattops")
ADMIN = "admin-token-for-tests"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}


Routers = RouterProc | Balanced


@pytest.fixture(params=["sqlite", "redis"])
def make_routers(request: pytest.FixtureRequest, make_router: Callable[..., RouterProc],
                 tmp_path: Path) -> Iterator[Callable[..., Routers]]:  # fmt: skip
    """The suite's router: one with the SQLite store, or two sharing a real Redis behind a
    real HAProxy (`Balanced`), with the same configuration otherwise."""
    made: list[Balanced] = []

    def make(agents: list[Agent], routes: list[dict[str, Any]], **extra: Any) -> Routers:
        if request.param == "sqlite":
            return make_router(agents, routes, **extra)
        url = request.getfixturevalue("redis_url")
        pair = [make_router(agents, routes, store=url, **extra) for _ in range(2)]
        made.append(Balanced(pair, tmp_path))
        return made[-1]

    yield make
    for balanced in made:
        balanced.stop()


def _ledger(router: Routers) -> list[Entry]:
    """Every row of the router's ledger, read from its store directly."""
    if isinstance(router, Balanced):
        url = router.routers[0].router_extra["store"]
        return RedisLedger(url).entries()
    return Ledger(router.folder / "state" / "ledger.sqlite").entries()


def _redis_server(port: int, folder: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A redis-server of a test's own (to stop, kill or put to sleep), on the real clock."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(folder), "--save", "", *extra],
                            stdout=subprocess.DEVNULL, env=real_clock_env())  # fmt: skip
    ping = ["redis-cli", "-p", str(port), "ping"]
    wait_for(lambda: subprocess.run(ping, capture_output=True).returncode == 0, 20, "redis")
    return proc


def _ledger_at(store: str) -> list[Entry]:
    return RedisLedger(store).entries()


def _verify_cli(router: Routers, at_rest: bool = False) -> subprocess.CompletedProcess[str]:
    """`wattops ledger verify` on the router's ledger: through the router, or at rest (its
    state folder, or its Redis store)."""
    if not at_rest:
        where = ["--router", router.url]
    elif isinstance(router, Balanced):
        where = ["--store", router.routers[0].router_extra["store"]]
    else:
        where = ["--state-dir", str(router.folder / "state")]
    env = {**os.environ, "WATTOPS_TOKEN": ADMIN}
    return subprocess.run([str(WATTOPS), "ledger", "verify", *where], capture_output=True,
                          text=True, timeout=120, env=env)  # fmt: skip


def _priced(router: Routers, ask: Callable[[], httpx.Response], route: str = "chat") -> None:
    """Send requests until a candidate of the route has a price (its agent's accounting
    window has seen its tokens): budgets reserve and charge at those prices."""

    each = router.routers if isinstance(router, Balanced) else [router]

    def priced() -> bool:
        ask()
        return all(any(c["usd_per_1m_tokens"] for c in r.route(route)["candidates"])
                   for r in each)  # fmt: skip

    wait_for(priced, 60, "the candidates' prices")


def _create_key(router: Routers, **asked: Any) -> dict[str, Any]:
    resp = router.client.post("/v1/keys", json={"team": "ml", **asked}, headers=ADMIN_HEADERS)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _budget(router: Routers, **fields: Any) -> dict[str, Any]:
    """Make a budget (a team's USD per day unless `fields` say otherwise), at least 3 minutes
    before its window ends: a test that counts its spend never sees the window reset."""
    body = {"scope": "team", "subject": "ml", "unit": "usd", "window": "day", **fields}
    clear_of_window_edge(body["window"])
    resp = router.client.post("/v1/budgets", json=body, headers=ADMIN_HEADERS)
    assert resp.status_code == 201, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _fresh(router: Routers, **budget: Any) -> dict[str, str]:
    """A new key with a budget of its own (`budget` fields): nothing spent against it yet.
    Team budgets would count what the team's other keys spent earlier in the window."""
    made = _create_key(router)
    if budget:
        _budget(router, scope="key", subject=made["id"], **budget)
    return {"Authorization": f"Bearer {made['key']}"}


def _one_answer(router: Routers) -> float:
    """What one answer of `RouterProc.ask` costs now, measured on a key of its own."""
    auth = _fresh(router, name="probe", limit=1e6)
    assert router.ask(headers=auth).status_code == 200
    one = float(_standing(router, "probe")["spent"])
    router.client.delete("/v1/budgets/probe", headers=ADMIN_HEADERS)
    assert one > 0
    return one


def _standing(router: Routers, name: str) -> dict[str, Any]:
    budgets = router.client.get("/v1/budgets", headers=ADMIN_HEADERS).json()
    return next(b for b in budgets if b["budget"]["name"] == name)  # type: ignore[no-any-return]


def test_keys_once_created_are_required_and_revoked_at_once(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    assert router.ask().status_code == 200  # no key yet: open, as before keys existed
    # Keys and budgets are the admin's: not without its token.
    assert router.client.post("/v1/keys", json={"team": "ml"}).status_code == 401
    made = _create_key(router, name="notebook", budget_usd_day=5.0)
    key = made["key"]
    assert key.startswith("wok_") and made["team"] == "ml" and made["name"] == "notebook"
    assert made["budgets"] == [f"key-{made['id']}-usd-day"]
    listed = router.client.get("/v1/keys", headers=ADMIN_HEADERS).json()
    assert [k["id"] for k in listed] == [made["id"]]
    assert (
        "key" not in listed[0]
        and key not in router.client.get("/v1/keys", headers=ADMIN_HEADERS).text
    )  # the secret is shown once, never listed

    missing = router.ask()
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    unknown = router.ask(headers={"Authorization": "Bearer wok_000000000000_" + "x" * 43})
    assert unknown.status_code == 403 and unknown.json()["error"]["code"] == "invalid_api_key"
    # The official client, as an application would use it.
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0)
    answer = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0.5
    )
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    stranger = openai.OpenAI(base_url=router.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError, match="not known"):
        stranger.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=2
        )

    revoked = router.client.delete(f"/v1/keys/{made['id']}", headers=ADMIN_HEADERS)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.PermissionDeniedError, match="revoked"):
        client.chat.completions.create(
            model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )


def test_a_spent_budget_is_refused_with_429_naming_it(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    _priced(router, lambda: router.ask())
    auth = _fresh(router, name="ml-day", limit=1e-9)  # the first answer spends it
    assert router.ask(headers=auth).status_code == 200
    refused = router.ask(headers=auth)
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert "'ml-day' (key " in error["message"] and "USD per day) is spent" in error["message"]
    assert "resets at" in error["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 86400
    assert refused.headers["X-Wattops-Budget"] == "ml-day"
    standing = _standing(router, "ml-day")
    assert standing["state"] == "over" and standing["remaining"] == 0.0
    # Raised, it lets requests in again, at once.
    raised = router.client.patch("/v1/budgets/ml-day", json={"limit": 1e6}, headers=ADMIN_HEADERS)
    assert raised.status_code == 200, raised.text
    assert router.ask(headers=auth).status_code == 200
    # Remaining budget is exported as a finite number.
    metrics = router.metrics()
    line = next(x for x in metrics.splitlines() if x.startswith("wattops_budget_remaining{"))
    assert 'budget="ml-day"' in line and "Inf" not in line
    # Lowered below what it spent: the warnings it passes fire at once, and it refuses.
    lowered = _fresh(router, name="lowered", limit=1e6)
    assert router.ask(headers=lowered).status_code == 200
    spent = _standing(router, "lowered")["spent"]
    changed = router.client.patch("/v1/budgets/lowered", json={"limit": spent / 2},
                                  headers=ADMIN_HEADERS)  # fmt: skip
    assert changed.status_code == 200 and changed.json()["state"] == "over"
    fired = [w for w in router.view()["budget_warnings"] if "budget lowered" in w]
    assert len(fired) == 3, fired  # 80%, 90% and 95%, without another request
    assert router.ask(headers=lowered).status_code == 429


def test_every_stream_is_charged_as_its_unstreamed_twin(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    """Through the official `openai` SDK on one key: an unstreamed answer, then streams
    without and with `include_usage`. Each is in the ledger with the engine's own token count
    and charged to the key's budget; the usage chunk the router asked for is not passed to a
    client that did not ask; a complete stream is answered (200), never an error, however soon
    the client hangs up after `[DONE]` (the SDK does at once)."""
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    _priced(router, lambda: router.ask())
    made = _create_key(router)
    _budget(router, name="streams", scope="key", subject=made["id"], limit=1e6)
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=made["key"], max_retries=0)
    asked = {"model": "chat", "messages": [{"role": "user", "content": "tell me about watts"}],
             "max_tokens": 8, "temperature": 0.7}  # fmt: skip
    plain = client.chat.completions.create(**asked)
    assert plain.usage is not None
    plain_cost = float(_standing(router, "streams")["spent"])
    assert plain_cost > 0
    relayed = []  # content chunks the client got, per stream without usage
    for _ in range(6):  # iterated to [DONE], then the connection is dropped at once
        chunks = list(client.chat.completions.create(**asked, stream=True))
        assert all(c.usage is None and c.choices for c in chunks), "usage it did not ask for"
        relayed.append(sum(1 for c in chunks if c.choices[0].delta.content))
    with_usage = list(client.chat.completions.create(
        **asked, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert with_usage[-1].usage is not None and with_usage[-1].choices == []

    def rows() -> list[Entry]:
        return sorted((e for e in _ledger(router) if e.key_id == made["id"]), key=lambda e: e.time)

    every = wait_for(lambda: len(r := rows()) == 8 and r, 30, "the streams' rows")
    statuses = [e.status for e in every]
    assert statuses == [200] * 8, statuses
    assert all(e.prompt_tokens == plain.usage.prompt_tokens for e in every)
    assert every[0].completion_tokens == plain.usage.completion_tokens
    # The engine's own count (the usage the router asked for): at least one token for each
    # content chunk the client got (a token may decode to nothing until the next one).
    assert all(n <= e.completion_tokens <= 8 for n, e in zip(relayed, every[1:7], strict=True))
    assert every[7].completion_tokens == with_usage[-1].usage.completion_tokens
    assert all(e.cost_nusd > 0 for e in every), [e.cost_nusd for e in every]
    # The budget holds what the ledger does, streams included, to the nano-dollar.
    standing = _standing(router, "streams")
    assert standing["spent_units"] == sum(e.cost_nusd for e in every)
    assert standing["reserved_units"] == 0
    each = router.routers if isinstance(router, Balanced) else [router]
    views = [r.route("chat") for r in each]
    assert sum(v["errors"] + v["client_errors"] for v in views) == 0


def test_a_stream_the_client_breaks_off_is_charged_what_was_generated(
    make_routers: Callable[..., Routers], make_agent: Callable[..., Agent]
) -> None:
    """A client that leaves mid-stream is charged what was generated for it (its prompt's
    bound and a token per content event relayed: the engine's usage never came), recorded as
    499, and it is the client's error, not the route's. SmolLM2 (tens of tokens a second
    here), so that the answer is far from done when the router hears of the hang-up: the
    test model's 400 tokens could all be relayed, [DONE] included, into the socket's buffers
    first, and a stream that reached [DONE] is answered."""
    slow = make_agent(agent_extra={"node": "slow", "profile": "cpu-generic"},
                      tables={"accounting": {"window_s": 5}}, precision="f16", context=512,
                      model=str(ROOT / "models" / "smollm2-135m-instruct.f16.gguf"))  # fmt: skip
    router = make_routers([slow], [{**CHAT, "reference": "slow/tiny"}], token=ADMIN)
    _priced(router, lambda: router.ask())
    made = _create_key(router)
    _budget(router, name="cut", scope="key", subject=made["id"], limit=1e6)
    body = {"model": "chat", "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 400, "temperature": 0.7, "stream": True}  # fmt: skip
    auth = {"Authorization": f"Bearer {made['key']}"}
    # At a router itself: HAProxy could read on past the client's hang-up.
    at = router.routers[0].url if isinstance(router, Balanced) else router.url
    with httpx.stream("POST", at + "/v1/chat/completions", json=body, headers=auth,
                      timeout=60) as resp:  # fmt: skip
        assert resp.status_code == 200
        got = [line for line in itertools.islice(resp.iter_lines(), 8) if line.startswith("data:")]
    assert got and "[DONE]" not in got[-1]
    (cut,) = wait_for(lambda: [e for e in _ledger(router) if e.key_id == made["id"]], 30,
                      "the broken-off stream's row")  # fmt: skip
    assert cut.status == 499 and 1 <= cut.completion_tokens < 400, cut
    assert cut.prompt_tokens > 0 and cut.cost_nusd > 0, cut
    standing = _standing(router, "cut")
    assert standing["spent_units"] == cut.cost_nusd and standing["reserved_units"] == 0
    each = router.routers if isinstance(router, Balanced) else [router]
    views = [r.route("chat") for r in each]
    assert sum(v["errors"] for v in views) == 0 and sum(v["client_errors"] for v in views) == 1


# Alone (tests/conftest.py): it bounds answers against one priced a moment before, and the
# learned price per token moves with how busy the machine is.
@pytest.mark.alone
def test_degraded_answers_come_before_none(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    # One node: every answer costs about the same, so the order below is the budget's doing.
    edge, _ = two_nodes
    route = {**CHAT, "reference": "edge/tiny", "policy": "fastest"}
    router = make_routers([edge], [route], token=ADMIN)
    _priced(router, lambda: router.ask())
    one = _one_answer(router)
    auth = _fresh(router, name="ml-day", limit=12 * one, degrade_at=0.25, degrade_min_quality=0.0)
    outcomes = []
    for _ in range(60):
        resp = router.ask(headers=auth)
        if resp.status_code == 429:
            outcomes.append("refused")
            break
        assert resp.status_code == 200, resp.text
        degraded = resp.headers.get("X-Wattops-Degraded")
        if degraded:
            assert "budget ml-day" in degraded and "cheapest" in degraded
        outcomes.append("degraded" if degraded else "served")
    # In that order, never back: served, then degraded, then refused.
    order = {"served": 0, "degraded": 1, "refused": 2}
    assert [order[o] for o in outcomes] == sorted(order[o] for o in outcomes)
    assert {"served", "degraded", "refused"} <= set(outcomes)


# Alone (tests/conftest.py): it bounds answers against one priced a moment before, and the
# learned price per token moves with how busy the machine is.
@pytest.mark.alone
def test_overshoot_is_bounded_by_the_reservations_in_flight(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    _priced(router, lambda: router.ask())
    one = _one_answer(router)
    # A quarter of one answer: the first request let in reserves its worst case, which covers
    # the limit, so every other one is refused while it is in flight, and after it settles
    # (even if busier agents meanwhile charge half as much per token).
    auth = _fresh(router, name="tight", limit=one / 4)

    def ask(_: int) -> int:
        with httpx.Client(base_url=router.url, timeout=60) as c:
            body = {"model": "chat", "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 4, "temperature": 0.7}  # fmt: skip
            return c.post("/v1/chat/completions", json=body, headers=auth).status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(ask, range(96)))
    assert set(statuses) <= {200, 429}
    # Without reservations, all 32 concurrent requests would pass the check at once.
    assert statuses.count(200) == 1, statuses
    standing = _standing(router, "tight")
    assert standing["reserved"] == 0.0
    assert one / 4 <= standing["spent"] <= 2 * one


# Alone (tests/conftest.py), as the test above: it prices answers against one measured a
# moment before.
@pytest.mark.alone
def test_many_clients_at_a_limit_that_admits_several_requests(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    """32 clients, 96 requests, a limit of about four answers: several are served, then every
    one is refused; the budget holds exactly what the ledger's rows add up to; and spend passed
    the limit by less than one request's reservation. One candidate, so that a reservation is
    known from the rows: its bound of tokens (the prompt's bound plus max_tokens) at the
    rate its row was charged at, the highest of the rows, plus a quarter for rates that moved
    between requests. Without reservations every request in flight passes the check while
    spend is below the limit (tried: the test fails then)."""
    from wattops.router.billing.charging import worst_tokens
    from wattops.router.billing.money import to_units

    cloud = {**CHAT, "name": "cloud", "candidates": ["cloud/*"]}
    router = make_routers(list(two_nodes), [cloud], token=ADMIN)
    _priced(router, lambda: router.ask("cloud"), "cloud")
    auth = _fresh(router, name="probe", limit=1e6)
    assert router.ask("cloud", headers=auth, max_tokens=64).status_code == 200
    one = float(_standing(router, "probe")["spent"])
    made = _create_key(router)
    limit = 4 * one
    _budget(router, name="several", scope="key", subject=made["id"], limit=limit)
    auth = {"Authorization": f"Bearer {made['key']}"}
    # Long enough answers that many are in flight at once (the test model: about 400 a second
    # here), as they would be when spend crosses a limit in production.
    body = {"model": "cloud", "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 64, "temperature": 0.7}  # fmt: skip

    # Each client connected first, then all at once past a barrier: 32 requests arrive
    # together (threads started one by one would trickle in over this machine's 2 cores).
    clients = [httpx.Client(base_url=router.url, timeout=120) for _ in range(32)]
    for c in clients:
        assert c.get("/healthz").status_code == 200
    together = threading.Barrier(32)

    def ask(c: httpx.Client) -> list[int]:
        together.wait(30)
        return [c.post("/v1/chat/completions", json=body, headers=auth).status_code
                for _ in range(3)]  # fmt: skip

    with ThreadPoolExecutor(32) as pool:
        statuses = [s for each in pool.map(ask, clients) for s in each]
    for c in clients:
        c.close()
    assert set(statuses) <= {200, 429}
    served = statuses.count(200)
    assert 2 <= served < 96 and 429 in statuses, statuses
    rows = [e for e in _ledger(router) if e.key_id == made["id"]]
    assert sorted(e.status for e in rows) == [200] * served  # refusals are not charged
    standing = _standing(router, "several")
    assert standing["reserved_units"] == 0
    assert standing["spent_units"] == sum(e.cost_nusd for e in rows)  # to the nano-dollar
    bound = sum(worst_tokens(body, 256))
    reservation = max(e.cost_nusd * bound / (e.prompt_tokens + e.completion_tokens) for e in rows)
    assert standing["spent_units"] < to_units(limit, "usd") + 1.25 * reservation, (
        standing, reservation, served)  # fmt: skip


def test_kill_9_of_the_router_mid_load_leaves_a_consistent_ledger(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    _kill_9_mid_load(make_routers(list(two_nodes), [CHAT], token=ADMIN))


def test_kill_9_with_ledger_sync_full_leaves_a_consistent_ledger(
    make_router: Callable[..., RouterProc], two_nodes: tuple[Agent, Agent]
) -> None:
    """The same with `ledger_sync = "full"` (an fsync per group commit, for power cuts)."""
    _kill_9_mid_load(make_router(list(two_nodes), [CHAT], token=ADMIN, ledger_sync="full"))


def _load(url: str, auth: dict[str, str], answered: list[int], stop: threading.Event,
          clients: int = 8) -> list[threading.Thread]:  # fmt: skip
    """`clients` threads asking the router until `stop`; each 200 appended to `answered`."""

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                body = {"model": "chat", "messages": [{"role": "user", "content": "load"}],
                        "max_tokens": 4, "temperature": 0.7}  # fmt: skip
                try:
                    resp = c.post("/v1/chat/completions", json=body, headers=auth)
                except httpx.HTTPError:
                    continue
                if resp.status_code == 200:
                    answered.append(1)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def _kill_9_mid_load(router: Routers) -> None:
    # The warm-up on a key of its own: only the load's rows are counted below, so an answered
    # request missing from the ledger cannot hide behind a warm-up row.
    warm = {"Authorization": f"Bearer {_create_key(router, team='warm-up')['key']}"}
    _priced(router, lambda: router.ask(headers=warm))
    key = _create_key(router)["key"]
    auth = {"Authorization": f"Bearer {key}"}
    _budget(router, name="ml-month", window="month", limit=1e6)
    answered: list[int] = []
    stop = threading.Event()
    threads = _load(router.url, auth, answered, stop)
    wait_for(lambda: len(answered) >= 20, 60, "load through the router")
    if isinstance(router, Balanced):  # both routers take their share of the load
        assert all(r.route("chat")["requests"] > 0 for r in router.routers)
    assert router.proc is not None
    router.proc.send_signal(signal.SIGKILL)
    router.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    if isinstance(router, RouterProc):
        db = sqlite3.connect(router.folder / "state" / "ledger.sqlite")
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        db.close()
    keyed = [e for e in _ledger(router) if e.team == "ml" and e.status == 200]
    rows, spent = len(keyed), sum(e.cost_nusd for e in keyed)
    # Every answer a client received was in the ledger before it was sent.
    assert rows >= len(answered)
    # The ledger at rest proves itself: chain, counters, report.
    at_rest = _verify_cli(router, at_rest=True)
    assert at_rest.returncode == 0, at_rest.stdout + at_rest.stderr
    router.start()
    standing = _standing(router, "ml-month")
    assert standing["reserved_units"] == 0  # what died with the router holds nothing
    assert standing["spent_units"] == spent
    running = _verify_cli(router)  # and through the restarted router, its memory included
    assert running.returncode == 0 and "ok: the ledger agrees" in running.stdout, running.stdout
    if isinstance(router, RouterProc):  # a row edited by hand, in a copy of the ledger
        copy = router.folder / "edited"
        copy.mkdir()
        db = sqlite3.connect(router.folder / "state" / "ledger.sqlite")
        db.execute("VACUUM INTO ?", (str(copy / "ledger.sqlite"),))
        db.close()
        db = sqlite3.connect(copy / "ledger.sqlite")
        (rid,) = db.execute("SELECT request_id FROM entries WHERE team = 'ml' LIMIT 1 OFFSET 3"
                            ).fetchone()  # fmt: skip
        db.execute("UPDATE entries SET cost_nusd = 0 WHERE request_id = ?", (rid,))
        db.commit()
        db.close()
        edited = subprocess.run([str(WATTOPS), "ledger", "verify", "--state-dir", str(copy)],
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert edited.returncode == 1, edited.stdout
        assert f"row {rid}" in edited.stdout and "the hash chain breaks here" in edited.stdout


def test_requests_and_tokens_per_minute_per_key(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    rpm = {"Authorization": f"Bearer {_create_key(router, rpm=3)['key']}"}
    statuses = [router.ask(headers=rpm).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    limited = router.ask(headers=rpm)
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "3 requests per minute" in limited.json()["error"]["message"]
    assert 1 <= int(limited.headers["Retry-After"]) <= 61
    # Tokens are counted at admission as the prompt's bound plus max_tokens: "hello there"
    # is 11 bytes + 16 for its message + 64 for the template, plus 4 = 95 of 120 for the
    # first, not enough left for a second.
    tpm = {"Authorization": f"Bearer {_create_key(router, tpm=120)['key']}"}
    assert router.ask(headers=tpm).status_code == 200
    second = router.ask(headers=tpm)
    assert second.status_code == 429 and "120 tokens per minute" in second.text
    # Another key of the same team has limits of its own.
    assert router.ask(headers=rpm).status_code == 429
    other = {"Authorization": f"Bearer {_create_key(router)['key']}"}
    assert router.ask(headers=other).status_code == 200


def test_the_cli_manages_keys_and_budgets(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN)
    env = {**os.environ, "WATTOPS_ROUTER": router.url, "WATTOPS_TOKEN": ADMIN}

    def wattops(*argv: str, token: str | None = ADMIN) -> subprocess.CompletedProcess[str]:
        run_env = (
            {**env, "WATTOPS_TOKEN": token}
            if token
            else {k: v for k, v in env.items() if k != "WATTOPS_TOKEN"}
        )
        return subprocess.run([str(WATTOPS), *argv], capture_output=True, text=True,
                              timeout=60, env=run_env)  # fmt: skip

    made = wattops("keys", "create", "--team", "ml", "--name", "cli", "--budget-usd-day", "5")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("wok_") and "shown this once" in made.stderr
    key_id = key.split("_")[1]
    listed = json.loads(wattops("keys", "list", "--json").stdout)
    assert [k["id"] for k in listed] == [key_id] and key not in json.dumps(listed)
    budgets = wattops("budgets", "list")
    assert f"key-{key_id}-usd-day" in budgets.stdout and "ok" in budgets.stdout
    raised = wattops("budgets", "set", f"key-{key_id}-usd-day", "--limit", "9")
    assert raised.returncode == 0 and "of 9 " in raised.stdout
    assert router.ask(headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert wattops("keys", "revoke", key_id).returncode == 0
    assert router.ask(headers={"Authorization": f"Bearer {key}"}).status_code == 403
    # A budget on a team, key or route that does not exist would hold nothing back: refused,
    # naming what exists, unless forced.
    common = ["--unit", "usd", "--window", "day", "--limit", "1"]
    for scope, subject, said in (
        ("team", "nobody", "no key has team 'nobody' (teams: ml)"),
        ("key", "k0", f"no key 'k0' (keys: {key_id})"),
        ("route", "chatt", "no route 'chatt' (routes: chat)"),
    ):
        refused = wattops("budgets", "create", f"typo-{scope}", "--scope", scope, "--subject",
                          subject, *common)  # fmt: skip
        assert refused.returncode != 0 and said in refused.stderr, refused.stderr
    assert "typo-" not in wattops("budgets", "list").stdout
    forced = wattops("budgets", "create", "early", "--scope", "team", "--subject", "nobody",
                     *common, "--force")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    assert "early" in wattops("budgets", "list").stdout
    # Bad input and a wrong credential are named, and change nothing.
    bad = wattops("keys", "create", "--team", "bad team")
    assert bad.returncode != 0 and "--team" in bad.stderr
    wrong = wattops("keys", "list", token="not-the-token")
    assert wrong.returncode != 0 and "403" in wrong.stderr
    assert len(json.loads(wattops("keys", "list", "--json").stdout)) == 1


class _Receiver:
    """A local webhook receiver: answers each POST with the next status of `statuses` (the
    last one repeats) and keeps the bodies."""

    def __init__(self, statuses: list[int]) -> None:
        import http.server

        received = self.received = []  # type: ignore[var-annotated]
        answers = list(statuses)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                status = answers.pop(0) if len(answers) > 1 else answers[0]
                self.send_response(status)
                self.end_headers()
                self.wfile.write(b"ok" if status < 300 else b"nope")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


# Alone (tests/conftest.py): it bounds answers against one priced a moment before, and the
# learned price per token moves with how busy the machine is.
@pytest.mark.alone
def test_warnings_reach_a_webhook_retried_when_it_fails(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent]
) -> None:
    flaky, broken = _Receiver([500, 200]), _Receiver([400])
    try:
        router = make_routers(list(two_nodes), [CHAT], token=ADMIN,
                             budget_webhooks=[flaky.url, broken.url])  # fmt: skip
        _priced(router, lambda: router.ask())
        one = _one_answer(router)
        auth = _fresh(router, name="hooked", limit=1.5 * one, warn_at=[0.5])
        assert router.ask(headers=auth).status_code == 200  # about 67%: the 50% warning
        view = wait_for(lambda: (v := router.view())["webhook_sent"] == 1 and v, 30,
                        "the warning delivered after a retry")  # fmt: skip
        assert len(flaky.received) == 2  # a 500 first, then the 200
        body = flaky.received[-1]
        assert body["budget"] == "hooked" and body["threshold"] == 0.5
        assert "wattops-router: budget hooked" in body["text"] and "50%" in body["text"]
        # A receiver that refuses (400) is not retried, and its failure is visible.
        assert len(broken.received) == 1
        assert view["webhook_failed"] == 1 and "HTTP 400" in view["webhook_error"]
        metrics = router.metrics()
        assert f'wattops_budget_webhook_failures_total{{url="{broken.url}"}} 1.0' in metrics
        assert any("budget hooked" in w for w in view["budget_warnings"])
        # Once per threshold per window: more spend, no second warning.
        assert router.ask(headers=auth).status_code == 200
        assert router.view()["webhook_sent"] == 1 and len(flaky.received) == 2
    finally:
        flaky.close()
        broken.close()


def test_the_report_adds_up_to_the_ledger_and_the_fleet(
    make_routers: Callable[..., Routers], two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    router = make_routers(list(two_nodes), [CHAT], token=ADMIN, fleet_sample_s=0.5)
    _priced(router, lambda: router.ask())
    ml, search = (
        _fresh(router),
        {"Authorization": f"Bearer {_create_key(router, team='search')['key']}"},
    )
    for auth, n in ((ml, 3), (search, 2)):
        for _ in range(n):
            assert router.ask(headers=auth).status_code == 200
    # A response-cache hit: charged nothing, its list price is the cache's saving.
    greedy = {"temperature": 0.0}
    assert router.ask(headers=ml, **greedy).status_code == 200
    hit = router.ask(headers=ml, **greedy)
    assert hit.headers.get("X-Cache") == "hit"
    env = {**os.environ, "WATTOPS_ROUTER": router.url, "WATTOPS_TOKEN": ADMIN}

    def report(*argv: str) -> str:
        done = subprocess.run([str(WATTOPS), "report", *argv], capture_output=True, text=True,
                              timeout=60, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    wait_for(lambda: json.loads(report("--since", "1h", "--format", "json"))["fleet"], 30,
             "two samples of the fleet")  # fmt: skip
    data = json.loads(report("--by", "team", "--since", "1h", "--format", "json"))
    groups = {g["group"]: g for g in data["groups"]}
    assert set(groups) == {"ml", "search", "(none)"}  # (none): the answers before any key
    assert groups["ml"]["requests"] == 5 and groups["search"]["requests"] == 2
    assert groups["ml"]["cache_hits"] == 1 and groups["ml"]["cache_saving_usd"] > 0
    for field in ("requests", "prompt_tokens", "cost_nusd", "energy_mj", "carbon_ug"):
        assert data["total"][field] == sum(g[field] for g in groups.values())  # exactly
    # ...and the ledger's rows.
    rows = len(entries := _ledger(router))
    cost = sum(e.cost_nusd for e in entries)
    assert data["total"]["cost_nusd"] == cost and data["total"]["requests"] == rows
    fleet = data["fleet"]
    assert fleet["cost_usd"] == pytest.approx(
        fleet["ledger_cost_usd"] + fleet["unattributed_cost_usd"] - fleet["overcharged_cost_usd"]
    )
    # The held hardware costs more than the few requests charged: a remainder, not zero.
    assert fleet["unattributed_cost_usd"] > 0
    assert fleet["parking_saving_usd"] == 0.0  # nothing was parked
    # Parked, the edge node's deployment stops holding its share: the report says what that
    # avoided (its share at the node's price, for as long as it stays parked).
    edge = two_nodes[0]
    assert edge.control("/v1/deployments/tiny/scale", {"replicas": 0}).status_code == 202
    parked = wait_for(
        lambda: (f := json.loads(report("--since", "1h", "--format", "json"))["fleet"])
        and f["parking_saving_usd"] > 0 and f, 30, "a parking saving in the report",
    )  # fmt: skip
    assert parked["parking_saving_usd"] < parked["unattributed_cost_usd"]
    assert "Parking: " in report("--by", "team", "--since", "1h")
    table = report("--by", "team", "--since", "1h", "--chart", str(tmp_path / "cost.png"))
    assert "| **total** |" in table and "| ml |" in table and "unattributed" in table
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = report("--by", "key", "--since", "1h", "--format", "csv").splitlines()
    assert lines[0].startswith("key,requests,") and lines[-1].startswith("total,")
    bad = subprocess.run([str(WATTOPS), "report", "--since", "last tuesday"],
                         capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert bad.returncode == 2 and "30d" in bad.stderr
    backwards = subprocess.run([str(WATTOPS), "report", "--since", "2d", "--until", "3d"],
                               capture_output=True, text=True, timeout=60, env=env)  # fmt: skip
    assert backwards.returncode == 2 and "must be after --since" in backwards.stderr
    refused = router.client.get("/v1/report", params={"since": 2e9, "until": 1e9},
                                headers=ADMIN_HEADERS)  # fmt: skip
    assert refused.status_code == 422 and "before it begins" in refused.text


def test_an_unreachable_store_is_named_and_fails_closed(
    make_router: Callable[..., RouterProc], two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    """A router whose Redis is gone answers 503 `store_unavailable` (keys and budgets cannot
    be checked, so nothing passes unchecked) and serves again when it is back; a router whose
    Redis is not there at start says so and exits 2."""
    port = free_port()

    def redis_up() -> subprocess.Popen[bytes]:
        return _redis_server(port, tmp_path, "--appendonly", "no")

    store = f"redis://127.0.0.1:{port}/0"
    refused = make_router(list(two_nodes), [CHAT], start=False, store=store, token=ADMIN)
    done = subprocess.run([str(ROUTER_BIN), "--config", str(refused.config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and f"store {store}: cannot reach Redis" in done.stderr

    redis = redis_up()
    router = make_router(list(two_nodes), [CHAT], store=store, token=ADMIN)
    assert router.ask().status_code == 200
    redis.terminate()
    redis.wait(10)
    down = router.ask()
    assert down.status_code == 503 and down.headers["Retry-After"] == "1"
    error = down.json()["error"]
    assert error["code"] == "store_unavailable" and "unreachable" in error["message"]
    admin = router.client.get("/v1/budgets", headers=ADMIN_HEADERS)
    assert admin.status_code == 503 and admin.json()["error"]["code"] == "store_unavailable"
    metrics = router.client.get("/metrics").text
    assert "wattops_router_store_up 0.0" in metrics
    redis = redis_up()
    try:
        wait_for(lambda: router.ask().status_code == 200, 30, "the router to serve again")
        assert "wattops_router_store_up 1.0" in router.client.get("/metrics").text
        # The outage's start and end are in the audit log, as automatic actions.
        audit = router.client.get("/v1/audit", headers=ADMIN_HEADERS).json()["entries"]
        outage = [e for e in audit if e["path"].startswith("store-outage")]
        assert [e["path"] for e in outage] == ["store-outage-began", "store-outage-ended"]
        assert "refusing requests with 503" in outage[0]["message"]
    finally:
        redis.terminate()
        redis.wait(10)


def test_a_router_that_allows_serves_known_keys_unmetered_and_writes_their_rows_later(
    make_router: Callable[..., RouterProc], two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    """`on_store_error = "allow"`: with Redis gone, a key the router verified before is
    served (no budget counts it, the gauges and the audit log say so), a key it never saw is
    refused (503: it cannot be checked), and the rows of what was served are written to the
    ledger when Redis is back: nothing answered is missing from it."""
    port = free_port()

    def redis_up() -> subprocess.Popen[bytes]:
        return _redis_server(port, tmp_path, "--appendonly", "yes", "--appendfsync", "always")

    redis = redis_up()
    store = f"redis://127.0.0.1:{port}/0"
    router = make_router(list(two_nodes), [CHAT], store=store, token=ADMIN,
                         on_store_error="allow")  # fmt: skip
    known, stranger = _create_key(router), _create_key(router)
    _budget(router, name="known", scope="key", subject=known["id"], limit=1e6)
    auth = {"Authorization": f"Bearer {known['key']}"}
    assert router.ask(headers=auth).status_code == 200  # verified once
    redis.terminate()
    redis.wait(10)
    try:
        served = [router.ask(headers=auth) for _ in range(3)]
        assert [r.status_code for r in served] == [200] * 3
        unseen = router.ask(headers={"Authorization": f"Bearer {stranger['key']}"})
        assert unseen.status_code == 503, unseen.text
        assert "has not seen this key" in unseen.json()["error"]["message"]
        metrics = router.client.get("/metrics").text
        assert "wattops_router_store_up 0.0" in metrics
        assert "wattops_router_unmetered_requests 3.0" in metrics  # the refused one is not
        assert "wattops_router_pending_ledger_rows 3.0" in metrics
    finally:
        redis = redis_up()
    try:
        answered = 4

        def written() -> bool:
            nonlocal answered
            assert router.ask(headers=auth).status_code == 200
            answered += 1
            text = router.client.get("/metrics").text
            return "wattops_router_pending_ledger_rows 0.0" in text and "store_up 1.0" in text

        wait_for(written, 30, "the held rows written once Redis is back")  # probes every 1 s
        rows = [e for e in _ledger_at(store) if e.key_id == known["id"]]
        assert len(rows) == answered and all(e.status == 200 for e in rows)
        standing = _standing(router, "known")  # and the budget counts them, late
        assert standing["spent_units"] == sum(e.cost_nusd for e in rows)
        audit = router.client.get("/v1/audit", headers=ADMIN_HEADERS).json()["entries"]
        ended = [e for e in audit if e["path"] == "store-outage-ended"]
        assert ended and re.search(r"\b([3-9]|\d\d) requests served unmetered, 0 ledger rows "
                                   "dropped", ended[-1]["message"]), ended  # fmt: skip
    finally:
        redis.terminate()
        redis.wait(10)


def test_redis_killed_mid_load_loses_no_answered_row(
    make_router: Callable[..., RouterProc], two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    """redis-server SIGKILLed under load (`appendonly yes`, `appendfsync always`): requests
    fail closed while it is down, and once it is back every answer a client received is in
    the ledger (the load's own rows only: its key), which verifies."""
    port = free_port()
    durable = ("--appendonly", "yes", "--appendfsync", "always")
    redis = _redis_server(port, tmp_path, *durable)
    store = f"redis://127.0.0.1:{port}/0"
    router = make_router(list(two_nodes), [CHAT], store=store, token=ADMIN)
    try:
        warm = {"Authorization": f"Bearer {_create_key(router, team='warm-up')['key']}"}
        _priced(router, lambda: router.ask(headers=warm))
        made = _create_key(router)
        auth = {"Authorization": f"Bearer {made['key']}"}
        _budget(router, name="load", scope="key", subject=made["id"], limit=1e6)
        answered: list[int] = []
        stop = threading.Event()
        threads = _load(router.url, auth, answered, stop)
        wait_for(lambda: len(answered) >= 20, 60, "load through the router")
        redis.send_signal(signal.SIGKILL)
        redis.wait(10)
        during = len(answered)
        down = router.ask(headers=auth)
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        stop.set()
        for t in threads:
            t.join(30)
        assert len(answered) - during <= 8  # at most the requests past their settle
    finally:
        redis = _redis_server(port, tmp_path, *durable)
    try:
        rows = [e for e in _ledger_at(store) if e.key_id == made["id"] and e.status == 200]
        assert len(rows) >= len(answered), (len(rows), len(answered))
        wait_for(lambda: router.ask(headers=auth).status_code == 200, 30, "serving again")
        verified = _verify_cli(router)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        redis.terminate()
        redis.wait(10)


class _SlowProxy:
    """A TCP proxy in front of Redis that holds every reply for `delay` seconds (0 to pass
    them straight on): a store far away, or a slow one, for every call the router makes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay = 0.0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, reply: bool) -> None:
        try:
            while data := src.recv(65536):
                if reply and self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.server.close()


def test_a_slow_redis_never_holds_the_event_loop(
    make_router: Callable[..., RouterProc], two_nodes: tuple[Agent, Agent], tmp_path: Path
) -> None:
    """The Redis store's calls on a request's path are awaited (redis.asyncio), never made on
    the event loop: with every Redis reply held 0.4 s (a proxy in between), a keyed request
    takes its round trips' time while the router answers what needs no store at once, and
    asyncio's debug mode (which logs every callback that holds the loop longer than
    `slow_callback_duration`) logs none that held it for 0.3 s. A blocking call anywhere on
    that path (tried: the reservation on the synchronous client) holds the loop for a reply's
    0.4 s, and the log says `Executing <Task ...> took 0.4 seconds`."""
    port = free_port()
    redis = _redis_server(port, tmp_path, "--appendonly", "no")
    proxy = _SlowProxy(port)
    store = f"redis://127.0.0.1:{proxy.port}/0"
    router = make_router(list(two_nodes), [CHAT], store=store, token=ADMIN, start=False)
    router.env = {"PYTHONASYNCIODEBUG": "1"}
    router.start()
    try:
        made = _create_key(router)
        auth = {"Authorization": f"Bearer {made['key']}"}
        _budget(router, name="slow", scope="key", subject=made["id"], limit=1e6)
        assert router.ask(headers=auth).status_code == 200
        log = router.folder / "router.log"
        before = log.stat().st_size
        finished: list[str] = []

        def keyed() -> None:
            assert router.ask(headers=auth).status_code == 200
            finished.append("keyed")

        proxy.delay = 0.4
        asker = threading.Thread(target=keyed)
        asker.start()
        time.sleep(0.2)  # the keyed request is waiting on its first reply
        models = router.client.get("/v1/models")  # no store: answered meanwhile
        assert models.status_code == 200
        finished.append("models")
        asker.join(60)
        proxy.delay = 0.0
        assert finished == ["models", "keyed"], finished
        with log.open("rb") as f:
            f.seek(before)
            written = f.read().decode(errors="replace")
        held = re.findall(r"Executing .* took (\d+\.\d+) seconds", written)
        assert not [s for s in held if float(s) >= 0.3], written[-3000:]
    finally:
        proxy.close()
        redis.terminate()
        redis.wait(10)
