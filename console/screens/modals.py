"""The action modals: pick a precision, pick a replica count, confirm, read the arithmetic."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static
from textual.widgets.option_list import Option


class PrecisionModal(ModalScreen[str | None]):
    """A list of the deployment's available precisions, the current one marked: enter
    switches to the chosen one, `c` tries it first as a canary (`canary:<precision>`)."""

    BINDINGS = [
        Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel"),
        Binding("c", "canary", "Canary", id="modal.canary"),
    ]

    def __init__(self, deployment: str, node: str, current: str, available: list[str]) -> None:
        super().__init__()
        self.deployment = deployment
        self.node = node
        self.current = current
        self.available = available

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Label(f"Precision of [b]{self.deployment}[/b] on {self.node}", classes="title")
            options = [
                Option(f"{p}  ← current" if p == self.current else p, id=p) for p in self.available
            ]
            yield OptionList(*options, id="precisions")
            yield Static("enter: switch   c: canary first (10% for 5 min)   esc: cancel",
                         classes="hint")  # fmt: skip

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        if self.current in self.available:
            option_list.highlighted = self.available.index(self.current)
        option_list.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_canary(self) -> None:
        option_list = self.query_one(OptionList)
        if option_list.highlighted is not None:
            self.dismiss(f"canary:{self.available[option_list.highlighted]}")


class ScaleModal(ModalScreen[int | None]):
    """A replica count, prefilled with the current one."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel")]

    def __init__(self, deployment: str, node: str, current: int, maximum: int) -> None:
        super().__init__()
        self.deployment = deployment
        self.node = node
        self.current = current
        self.maximum = maximum

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Label(
                f"Replicas of [b]{self.deployment}[/b] on {self.node} (0..{self.maximum}; 0 parks)",
                classes="title",
            )
            yield Input(str(self.current), id="replicas", type="integer")
            yield Static("", id="problem", classes="problem")
            yield Static("enter: scale   esc: cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        try:
            value = int(event.value)
        except ValueError:
            value = -1
        if not 0 <= value <= self.maximum:
            self.query_one("#problem", Static).update(
                f"replicas must be a whole number in 0..{self.maximum}"
            )
            return
        self.dismiss(value)


class ConfirmModal(ModalScreen[bool]):
    """Yes or no for an action that changes what serves traffic."""

    BINDINGS = [
        Binding("y", "dismiss(True)", "Yes", id="modal.yes"),
        Binding("n,escape", "dismiss(False)", "No", id="modal.no"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Static(self.question, classes="title")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


class DetailModal(ModalScreen[None]):
    """The arithmetic behind an alert or a recommendation."""

    BINDINGS = [Binding("escape,enter,q", "dismiss(None)", "Close", id="modal.close")]

    def __init__(self, title: str, body: str) -> None:
        super().__init__()
        self.title_text = title
        self.body = body

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal wide"):
            yield Label(self.title_text, classes="title")
            yield Static(self.body, markup=False)
            yield Static("esc: close", classes="hint")


class ChoiceModal(ModalScreen[str | None]):
    """One of a few named choices, the current one marked (a route's policy)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel")]

    def __init__(self, title: str, current: str, choices: list[str]) -> None:
        super().__init__()
        self.title_text = title
        self.current = current
        self.choices = choices

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Label(self.title_text, classes="title")
            yield OptionList(*[Option(f"{c}  ← current" if c == self.current else c, id=c)
                               for c in self.choices], id="choices")  # fmt: skip
            yield Static("enter: choose   esc: cancel", classes="hint")

    def on_mount(self) -> None:
        option_list = self.query_one(OptionList)
        if self.current in self.choices:
            option_list.highlighted = self.choices.index(self.current)
        option_list.focus()

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)


class BoundModal(ModalScreen[float | None]):
    """A number within limits, or empty to clear the bound (dismisses with -1 for "clear")."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel", id="modal.cancel")]

    def __init__(self, title: str, current: float | None, low: float, high: float) -> None:
        super().__init__()
        self.title_text = title
        self.current = current
        self.low = low
        self.high = high

    def compose(self) -> ComposeResult:
        with Vertical(classes="modal"):
            yield Label(self.title_text, classes="title")
            yield Input("" if self.current is None else f"{self.current:g}", id="bound")
            yield Static("", id="problem", classes="problem")
            yield Static("enter: set (empty: no bound)   esc: cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one(Input).focus()

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text:
            self.dismiss(-1.0)
            return
        try:
            value = float(text)
        except ValueError:
            value = self.low - 1
        if not self.low < value <= self.high:
            self.query_one("#problem", Static).update(
                f"must be a number above {self.low:g} and at most {self.high:g}, or empty"
            )
            return
        self.dismiss(value)
