"""The routes view (`r` in the fleet view, with `wattops console --router URL`): how each of
the router's routes splits its traffic, what that saved against the reference, why a
candidate is left out; keys to change a route's policy and bounds, which the router applies at
once and keeps across restarts."""

from __future__ import annotations

from contextlib import suppress
from functools import partial
from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from wattops.router.api import RouterView, RouteView
from wattops.router.client import RouterClient, RouterError

from .modals import BoundModal, ChoiceModal, ConfirmModal

POLICIES = ["cheapest", "greenest", "fastest", "cascade"]
COLUMNS = ("ROUTE", "CANDIDATE", "PRECISION", "STATE", "SHARE", "REQUESTS", "$/1M TOK",
           "QUALITY", "BREAKER", "LEFT OUT BECAUSE")  # fmt: skip


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.3g}"


def route_summary(route: RouteView) -> str:
    """One line per route: its bounds, its traffic, what it saved (estimated)."""
    b = route.bounds
    bounds: list[str] = [b.policy]
    if b.min_quality is not None:
        bounds.append(f"quality>={b.min_quality:g}")
    if b.max_accuracy_drop is not None:
        bounds.append(f"accuracy drop<={b.max_accuracy_drop:g}")
    if b.max_p95_ms is not None:
        bounds.append(f"p95<={b.max_p95_ms:g}ms")
    if b.max_usd_per_1m_tokens is not None:
        bounds.append(f"$/1M<={b.max_usd_per_1m_tokens:g}")
    saving = (
        f"saved {route.saving:.0%} est. (${route.est_cost_usd:.4g} vs "
        f"${route.counterfactual_cost_usd:.4g} at {route.reference})"
        if route.saving is not None
        else f"saving unknown yet (no $/token of {route.reference} or of the servers)"
    )
    return (
        f"[b]{route.name}[/b]  {' '.join(bounds)}  |  {route.requests} answered, "
        f"{route.refusals} refused, {route.fallbacks} fallbacks, {route.escalations} "
        f"escalations  |  {saving}"
    )


def route_rows(route: RouteView) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for c in sorted(route.candidates, key=lambda c: -c.requests):
        quality = "-" if c.quality is None else f"{c.quality:.1%}"
        rows.append((
            route.name, c.key + (" (ref)" if c.key == route.reference else ""),
            c.precision or "-", c.state if c.live else f"{c.state} (offline)",
            f"{c.share:.0%}", str(c.requests), _money(c.usd_per_1m_tokens), quality,
            c.breaker, c.excluded or "",
        ))  # fmt: skip
    return rows


class RoutesScreen(Screen[None]):
    """Every route of one router, refreshed every `refresh_s`."""

    BINDINGS = [
        Binding(
            "escape,backspace",
            "app.pop_screen",
            "Back",
            id="routes.back",
            tooltip="Back to the fleet view",
        ),
        Binding(
            "p",
            "policy",
            "Policy",
            id="routes.policy",
            tooltip="Change the selected route's policy",
        ),
        Binding(
            "l",
            "latency",
            "Latency bound",
            id="routes.latency",
            tooltip="Change the selected route's p95 bound (ms)",
        ),
        Binding(
            "m",
            "quality",
            "Quality floor",
            id="routes.quality",
            tooltip="Change the selected route's least top-1 agreement",
        ),
        Binding(
            "b",
            "budgets",
            "Budgets",
            id="routes.budgets",
            tooltip="The router's budgets: spent and reserved against each limit",
        ),
    ]

    def __init__(self, client: RouterClient, read_only: bool = False,
                 refresh_s: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.client = client
        self.read_only = read_only
        self.refresh_s = refresh_s
        self.view_now: RouterView | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="routes-summary")
        yield DataTable(id="routes", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.sub_title = f"router {self.client.url}"
        self.refresh_view()
        self.set_interval(self.refresh_s, self.refresh_view)

    @work(exclusive=True, group="routes")
    async def refresh_view(self) -> None:
        try:
            view = await self.client.view()
        except RouterError as exc:
            with suppress(NoMatches):  # the screen is being taken down
                self.query_one("#routes-summary", Static).update(f"[red]{exc}[/red]")
            return
        # The screen may have gone, or be losing its widgets (popped, or the console quitting:
        # Textual removes the children before the screen), while the router answered.
        if not self.is_attached:
            return
        self.view_now = view
        with suppress(NoMatches):
            self.show(view)

    def show(self, view: RouterView) -> None:
        summary = [route_summary(r) for r in view.routes]
        summary.append(f"agents followed: {view.agents_live} live of {view.agents}")
        self.query_one("#routes-summary", Static).update("\n".join(summary))
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for route in view.routes:
            for cells in route_rows(route):
                table.add_row(*cells)
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))

    def selected_route(self) -> RouteView | None:
        if self.view_now is None or not self.view_now.routes:
            return None
        table = self.query_one(DataTable)
        if not table.row_count:
            return self.view_now.routes[0]
        name = str(table.get_row_at(table.cursor_row)[0])
        return next((r for r in self.view_now.routes if r.name == name), None)

    def action_budgets(self) -> None:
        from .budgets import BudgetsScreen

        self.app.push_screen(BudgetsScreen(self.client, self.read_only, self.refresh_s))

    def _editable_route(self) -> RouteView | None:
        if self.read_only:
            self.notify("read-only console: route changes are off", severity="warning")
            return None
        return self.selected_route()

    def action_policy(self) -> None:
        route = self._editable_route()
        if route is None:
            return

        def picked(policy: str | None) -> None:
            if policy is not None and policy != route.bounds.policy:
                question = f"Route {route.name}: {route.bounds.policy} -> {policy}?"
                change = {"policy": policy}
                self.app.push_screen(
                    ConfirmModal(question), partial(self._confirmed, route.name, change)
                )

        self.app.push_screen(
            ChoiceModal(f"Policy of route [b]{route.name}[/b]", route.bounds.policy, POLICIES),
            picked,
        )

    def _bound(self, route: RouteView, field: str, title: str, current: float | None,
               low: float, high: float) -> None:  # fmt: skip
        def picked(value: float | None) -> None:
            if value is None:
                return
            new = None if value < 0 else value
            if new == current:
                return
            shown = "no bound" if new is None else f"{new:g}"
            self.app.push_screen(
                ConfirmModal(f"Route {route.name}: {field} -> {shown}?"),
                partial(self._confirmed, route.name, {field: new}),
            )

        self.app.push_screen(BoundModal(title, current, low, high), picked)

    def action_latency(self) -> None:
        route = self._editable_route()
        if route is not None:
            self._bound(route, "max_p95_ms", f"p95 bound of route [b]{route.name}[/b], ms",
                        route.bounds.max_p95_ms, 0, 3_600_000)  # fmt: skip

    def action_quality(self) -> None:
        route = self._editable_route()
        if route is not None:
            self._bound(route, "min_quality",
                        f"Least top-1 agreement of route [b]{route.name}[/b] (0..1)",
                        route.bounds.min_quality, 0, 1)  # fmt: skip

    def _confirmed(self, route: str, change: dict[str, Any], yes: bool | None) -> None:
        if yes:
            self.apply(route, change)

    @work(group="route-change")
    async def apply(self, route: str, change: dict[str, Any]) -> None:
        try:
            bounds = await self.client.patch(route, **change)
        except RouterError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.notify(f"route {route}: {bounds.policy}, applied and kept by the router")
        self.refresh_view()
