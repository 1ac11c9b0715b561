"""The budgets view (`b` in the routes view): every budget of the router, spent and reserved
against its limit as a bar, its state (ok, warning, degrading, over) and when it resets, the
last warnings fired; `+` and `-` raise or lower the selected budget's limit by 10%, `e` sets it
(the router applies it at once; the router's token is needed, as for every budget change)."""

from __future__ import annotations

import datetime as dt
from contextlib import suppress
from functools import partial

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from wattops.router.api import UNIT_LABELS, BudgetView
from wattops.router.client import RouterClient, RouterError

from .modals import BoundModal, ConfirmModal

COLUMNS = ("BUDGET", "COVERS", "PER", "USED", "SPENT", "RESERVED", "LIMIT", "STATE", "RESETS")
BAR_WIDTH = 20
STATE_STYLE = {"ok": "green", "warning": "yellow", "degrading": "dark_orange", "over": "red"}


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`fraction` (spent + reserved over the limit) as a text bar with its percentage."""
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled) + f" {fraction:4.0%}"


def budget_row(view: BudgetView) -> tuple[str, ...]:
    b = view.budget
    unit = UNIT_LABELS[b.unit]
    covers = "fleet" if b.scope == "fleet" else f"{b.scope} {b.subject}"
    resets = dt.datetime.fromtimestamp(view.resets_at, dt.UTC).strftime("%m-%d %H:%M UTC")
    style = STATE_STYLE[view.state]
    return (
        b.name, covers, f"{unit}/{b.window}", bar(view.fraction), f"{view.spent:.4g}",
        f"{view.reserved:.4g}", f"{b.limit:.4g}", f"[{style}]{view.state}[/{style}]", resets,
    )  # fmt: skip


class BudgetsScreen(Screen[None]):
    """Every budget of one router, refreshed every `refresh_s`."""

    BINDINGS = [
        Binding("escape,backspace", "app.pop_screen", "Back", id="budgets.back"),
        Binding(
            "plus,equals_sign",
            "scale(1.1)",
            "+10%",
            id="budgets.raise",
            tooltip="Raise the selected budget's limit by 10%",
        ),
        Binding(
            "minus",
            "scale(0.9)",
            "-10%",
            id="budgets.lower",
            tooltip="Lower the selected budget's limit by 10%",
        ),
        Binding("e", "edit", "Set limit", id="budgets.edit", tooltip="Set the selected limit"),
    ]

    def __init__(self, client: RouterClient, read_only: bool = False,
                 refresh_s: float = 1.0) -> None:  # fmt: skip
        super().__init__()
        self.client = client
        self.read_only = read_only
        self.refresh_s = refresh_s
        self.views: list[BudgetView] = []

    def compose(self) -> ComposeResult:
        yield Static(id="budgets-summary")
        yield DataTable(id="budgets", cursor_type="row", zebra_stripes=True)
        yield Static(id="budgets-warnings")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns(*COLUMNS)
        self.sub_title = f"router {self.client.url}: budgets"
        self.refresh_view()
        self.set_interval(self.refresh_s, self.refresh_view)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only: the changes are neither shown nor run, as in the fleet view.
        return not (self.read_only and action in ("scale", "edit"))

    @work(exclusive=True, group="budgets")
    async def refresh_view(self) -> None:
        try:
            views = await self.client.budgets()
            warnings = (await self.client.view()).budget_warnings
        except RouterError as exc:
            with suppress(NoMatches):  # the screen is being taken down
                self.query_one("#budgets-summary", Static).update(f"[red]{exc}[/red]")
            return
        # The screen may have gone, or be losing its widgets (popped, or the console quitting:
        # Textual removes the children before the screen), while the router answered.
        if not self.is_attached:
            return
        self.views = views
        with suppress(NoMatches):
            self.show(self.views, warnings)

    def show(self, views: list[BudgetView], warnings: list[str]) -> None:
        states = [v.state for v in views]
        summary = (
            f"{len(views)} budget(s): {states.count('over')} over, "
            f"{states.count('degrading')} degrading, {states.count('warning')} warning"
            if views
            else "no budgets (wattops budgets create ..., or wattops keys create --budget-...)"
        )
        self.query_one("#budgets-summary", Static).update(summary)
        table = self.query_one(DataTable)
        row = table.cursor_row
        table.clear()
        for view in views:
            table.add_row(*budget_row(view))
        if table.row_count:
            table.move_cursor(row=min(row, table.row_count - 1))
        shown = warnings[-5:]
        self.query_one("#budgets-warnings", Static).update(
            "Last warnings:\n" + "\n".join(shown) if shown else "No warning fired."
        )

    def selected(self) -> BudgetView | None:
        table = self.query_one(DataTable)
        if not self.views or not table.row_count:
            return None
        name = str(table.get_row_at(table.cursor_row)[0])
        return next((v for v in self.views if v.budget.name == name), None)

    def action_scale(self, factor: float) -> None:
        view = self.selected()
        if view is None or self.read_only:
            return
        b = view.budget
        new = b.limit * factor
        question = f"Budget {b.name}: limit {b.limit:.4g} -> {new:.4g} {UNIT_LABELS[b.unit]}?"
        self.app.push_screen(ConfirmModal(question), partial(self._confirmed, b.name, new))

    def action_edit(self) -> None:
        view = self.selected()
        if view is None or self.read_only:
            return
        b = view.budget

        def picked(value: float | None) -> None:
            if value is not None and value > 0 and value != b.limit:
                self.apply(b.name, value)

        title = f"Limit of budget [b]{b.name}[/b], {UNIT_LABELS[b.unit]} per {b.window}"
        self.app.push_screen(BoundModal(title, b.limit, 0, 1e12), picked)

    def _confirmed(self, name: str, limit: float, yes: bool | None) -> None:
        if yes:
            self.apply(name, limit)

    @work(group="budget-change")
    async def apply(self, name: str, limit: float) -> None:
        try:
            view = await self.client.patch_budget(name, limit=limit)
        except RouterError as exc:
            self.notify(str(exc), severity="error", timeout=8)
            return
        self.notify(f"budget {name}: limit {view.budget.limit:.4g}, applied by the router")
        self.refresh_view()
