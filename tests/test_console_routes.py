"""The console's routes view (`r`, with `--router`), driven by its keys against a real
wattops-router in front of real agents serving the test model."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Agent
from tests.routers import CHAT, RouterProc
from tests.test_console import SIZE, until
from wattops.console.app import make_app
from wattops.console.screens.budgets import BudgetsScreen
from wattops.console.screens.modals import BoundModal, ChoiceModal, ConfirmModal
from wattops.console.screens.routes import RoutesScreen


def _cells(
    screen: RoutesScreen | BudgetsScreen, table_id: str = "#routes"
) -> list[tuple[str, ...]]:
    table = screen.query_one(table_id)
    return [tuple(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


async def test_the_routes_view_shows_the_split_and_changes_a_route(
    two_nodes: tuple[Agent, Agent],
    make_router: Callable[..., RouterProc],
) -> None:
    router = make_router(list(two_nodes), [CHAT], token="route-admin")
    for _ in range(3):
        assert router.ask().status_code == 200
    app = make_app([a.url for a in two_nodes], token="route-admin", router=router.url,
                   refresh_s=0.2)  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        screen = await until(pilot, lambda: isinstance(app.screen, RoutesScreen) and app.screen,
                             5, "the routes view")  # fmt: skip
        rows = await until(pilot, lambda: _cells(screen), 10, "the routes table")
        edge = next(r for r in rows if r[1] == "edge/tiny")
        assert (edge[0], edge[4], edge[5]) == ("chat", "100%", "3")  # route, share, requests
        assert any(r[1] == "cloud/tiny (ref)" for r in rows)
        summary = str(screen.query_one("#routes-summary").render())
        assert "chat" in summary and "cheapest" in summary and "3 answered" in summary
        # Policy: cheapest -> fastest, confirmed; the router applies it and keeps it.
        await pilot.press("p")
        choice = await until(pilot, lambda: isinstance(app.screen, ChoiceModal) and app.screen,
                             5, "the policy list")  # fmt: skip
        assert choice.choices.index("fastest") == 2
        await pilot.press("down", "down", "enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: router.route("chat")["bounds"]["policy"] == "fastest", 10,
                    "the router to apply the policy")  # fmt: skip
        # A latency bound, typed in.
        await until(pilot, lambda: isinstance(app.screen, RoutesScreen), 5, "back in the view")
        await pilot.press("l")
        await until(pilot, lambda: isinstance(app.screen, BoundModal), 5, "the bound input")
        await pilot.press(*"2500", "enter")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: router.route("chat")["bounds"]["max_p95_ms"] == 2500, 10,
                    "the router to apply the bound")  # fmt: skip
        summary_now = lambda: str(screen.query_one("#routes-summary").render())  # noqa: E731
        await until(pilot, lambda: "p95<=2500ms" in summary_now(), 10, "the view to show it")


async def test_a_read_only_console_changes_no_route(
    two_nodes: tuple[Agent, Agent],
    make_router: Callable[..., RouterProc],
) -> None:
    router = make_router(list(two_nodes), [CHAT])
    app = make_app([a.url for a in two_nodes], read_only=True, router=router.url, refresh_s=0.2)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, RoutesScreen), 5, "the routes view")
        await pilot.press("p")
        await pilot.pause(0.3)
        assert isinstance(app.screen, RoutesScreen)  # no modal
        assert router.route("chat")["bounds"]["policy"] == "cheapest"


async def test_without_a_router_the_key_is_not_offered(agent: Agent) -> None:
    app = make_app([agent.url], refresh_s=0.2)
    async with app.run_test(size=SIZE) as pilot:
        shown = {b.binding.action for b in app.active_bindings.values() if b.enabled}
        assert "routes" not in shown and "quit" in shown
        await pilot.press("r")
        await pilot.pause(0.2)
        assert not isinstance(app.screen, RoutesScreen)


async def test_the_budgets_view_shows_spend_and_raises_a_limit(
    two_nodes: tuple[Agent, Agent],
    make_router: Callable[..., RouterProc],
) -> None:
    router = make_router(list(two_nodes), [CHAT], token="route-admin")
    admin = {"Authorization": "Bearer route-admin"}
    budget = {"name": "ml-day", "scope": "fleet", "unit": "usd", "window": "day", "limit": 2.0}
    assert router.client.post("/v1/budgets", json=budget, headers=admin).status_code == 201
    app = make_app([a.url for a in two_nodes], token="route-admin", router=router.url,
                   refresh_s=0.2)  # fmt: skip
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("r")
        await until(pilot, lambda: isinstance(app.screen, RoutesScreen), 5, "the routes view")
        await pilot.press("b")
        screen = await until(pilot, lambda: isinstance(app.screen, BudgetsScreen) and app.screen,
                             5, "the budgets view")  # fmt: skip
        rows = await until(pilot, lambda: _cells(screen, "#budgets"), 10, "the budgets table")
        (row,) = rows
        assert row[0] == "ml-day" and row[1] == "fleet" and row[2] == "USD/day"
        assert row[6] == "2" and "ok" in row[7] and row[3].endswith("0%")
        # +10%, confirmed: the router applies it.
        await pilot.press("plus")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the confirmation")
        await pilot.press("y")
        standing = lambda: router.client.get("/v1/budgets", headers=admin).json()[0]  # noqa: E731
        await until(pilot, lambda: abs(standing()["budget"]["limit"] - 2.2) < 1e-9, 10,
                    "the router to raise the limit")  # fmt: skip
        await until(pilot, lambda: _cells(screen, "#budgets")[0][6] == "2.2", 10,
                    "the view to show it")  # fmt: skip
