"""Alerts from the agents and recommendations from the fleet's figures, each one key away
from its arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import OptionList
from textual.widgets.option_list import Option

SEVERITY_STYLE = {"critical": "bold red", "warning": "yellow", "info": "cyan", "advice": "green"}


@dataclass(frozen=True)
class PanelItem:
    """One line of the panel."""

    id: str
    severity: str
    text: str
    detail: str


class AlertsPanel(OptionList):
    """A list that is rebuilt only when its items change."""

    DEFAULT_CSS = """
    AlertsPanel { height: 8; border-title-align: left; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.items: list[PanelItem] = []
        self.border_title = "Alerts and recommendations (enter: arithmetic)"

    def show(self, items: list[PanelItem]) -> None:
        """Show `items`, keeping the highlight on the same item where it still exists."""
        if items == self.items:
            return
        highlighted = self.highlighted
        keep = self.items[highlighted].id if highlighted is not None and self.items else None
        self.items = items
        self.clear_options()
        self.add_options(
            Option(
                Text.assemble((f"{i.severity:>8} ", SEVERITY_STYLE.get(i.severity, "")), i.text),
                id=i.id,
            )
            for i in items
        )
        ids = [i.id for i in items]
        if keep in ids:
            self.highlighted = ids.index(keep)

    def item(self, option_id: str | None) -> PanelItem | None:
        """The item behind an option id."""
        return next((i for i in self.items if i.id == option_id), None)
