"""The fleet table: one row per deployment per node, drawn line by line from a row cache.

Textual's DataTable re-renders every visible cell after any update and re-measures whole
columns; with hundreds of agents updating every second that was most of the console's CPU
(docs/benchmarks.md). This table keeps one rendered line per row, keyed by the row's text,
and redraws only the lines whose text changed and are on screen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from wattops.console import formats as fmt
from wattops.fleet.rows import FleetRow, Link

SPARK = "▁▂▃▄▅▆▇█"
#: Points shown in the trend columns (one per second).
SPARK_WIDTH = 12


@dataclass(frozen=True)
class Column:
    """One column of the fleet table."""

    key: str
    header: str
    #: The most characters it takes.
    width: int
    #: Which columns stay on a narrow terminal: lowest first (NODE, DEPLOYMENT, STATE, ...,
    #: the trend sparklines last).
    priority: int
    #: Sized to its content (names, states), up to `width`; else always `width` wide.
    fit: bool = False
    #: For the help: what the column shows.
    meaning: str = ""


COLUMNS: tuple[Column, ...] = (
    Column("node", "NODE", 22, 0, True, "the node's name (its agent)"),
    Column("hardware", "HARDWARE", 20, 8, True, "the node's hardware profile: its price, "
           "power envelope and memory (profiles/hardware)"),
    Column("deployment", "DEPLOYMENT", 16, 1, True, "the deployment: what clients put in model"),
    Column("precision", "PRECISION", 15, 7, True, "precision served; →x: switching to x"),
    Column("replicas", "REPLICAS", 8, 3, False, "ready/desired replicas"),
    Column("state", "STATE", 22, 2, True, "serving, switching, scaling, parked, failed; "
           "offline/stale: the agent's data is not live; an action under way after it"),
    Column("power", "POWER", 11, 5, False, "watts attributed to the deployment, mean over the "
           "accounting window (est.: from the estimate, not a sensor)"),
    Column("power_trend", "POWER TREND", SPARK_WIDTH, 15, False,
           "POWER over the last 12 s, one mark a second, scaled to its own peak"),
    Column("j_per_token", "J/TOK", 7, 12, False, "joules per token over the window"),
    Column("usd_per_1m", "$/1M TOK", 9, 9, False, "dollars per million tokens over the window"),
    Column("usd_per_hour", "$/H", 8, 4, False, "what the deployment costs per hour: the "
           "share of the node it holds x the node's price (+ electricity when owned)"),
    Column("tokens_per_s", "TOK/S", 7, 10, False, "tokens per second, mean over the window"),
    Column("tokens_trend", "TOK/S TREND", SPARK_WIDTH, 16, False,
           "TOK/S over the last 12 s, one mark a second, scaled to its own peak"),
    Column("cache", "CACHE", 5, 13, False, "response-cache hits / cacheable requests"),
    Column("p50", "P50", 8, 14, False, "median answer latency over recent requests"),
    Column("p95", "P95", 8, 11, False, "95th percentile answer latency"),
    Column("alerts", "ALERTS", 6, 6, False, "alerts about this deployment (press a)"),
)  # fmt: skip
COLUMN_INDEX = {c.key: i for i, c in enumerate(COLUMNS)}
#: Columns `o` cycles through when sorting, and the FleetRow field each sorts by.
SORTABLE: dict[str, str] = {
    "node": "node", "deployment": "deployment", "power": "watts", "j_per_token": "j_per_token",
    "usd_per_1m": "usd_per_1m_tokens", "usd_per_hour": "usd_per_hour",
    "tokens_per_s": "tokens_per_s", "cache": "cache_hit_rate", "p95": "p95_s",
    "alerts": "alerts",
}  # fmt: skip

STATE_STYLE = {
    "serving": Style(color="green"), "switching": Style(color="yellow", bold=True),
    "scaling": Style(color="yellow"), "progressing": Style(color="yellow"),
    "parked": Style(dim=True),
    "failed": Style(color="red", bold=True), "offline": Style(color="red", bold=True),
    "stale": Style(color="yellow"),
}  # fmt: skip
DIM = Style(dim=True, italic=True)
PENDING = Style(color="cyan", italic=True)
CHANGING = Style(color="yellow", bold=True)
ALERT = Style(color="red", bold=True)
SPARK_WATTS = Style(color="magenta")
SPARK_TOKENS = Style(color="cyan")
HEADER = Style(bold=True)
CURSOR = Style(reverse=True)

#: One cell: its pieces of text with their styles.
Cell = tuple[tuple[str, Style | None], ...]


def sparkline(values: Sequence[float]) -> str:
    """Unicode blocks scaled to the series' own maximum."""
    values = list(values)[-SPARK_WIDTH:]
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def cells(row: FleetRow, watts: Sequence[float], tokens: Sequence[float],
          pending: str | None) -> tuple[Cell, ...]:  # fmt: skip
    """The cells of one row, as text pieces with styles."""
    if not row.deployment:
        link: Cell = ((row.link.value, STATE_STYLE[row.link.value]),)
        return (((row.node, None),), (("-", None),), (("-", None),), (("-", None),),
                (("-", None),), link, *(((("", None),),) * (len(COLUMNS) - 6)))  # fmt: skip
    precision: Cell = ((row.precision, None),)
    if row.desired_precision != row.precision:
        precision += ((f"→{row.desired_precision}", CHANGING),)
    state_text = row.state if row.link is Link.LIVE else row.link.value
    state: Cell = ((state_text, STATE_STYLE.get(state_text)),)
    if row.updated is not None:  # a Kubernetes Deployment: its rollout counts
        state += ((f" {row.updated} upd {row.available} avl", DIM),)
    if pending:
        state += ((f" {pending}", PENDING),)
    power: Cell = ((fmt.watts(row.watts, False), None),)
    if row.estimated and row.watts is not None:
        power += ((" est.", DIM),)
    alerts: Cell = ((str(row.alerts), ALERT),) if row.alerts else (("-", DIM),)
    return (
        ((row.node, None),), ((row.profile or "-", DIM),), ((row.deployment, None),), precision,
        ((f"{row.ready}/{row.desired}", None),), state, power,
        ((sparkline(watts), SPARK_WATTS),), ((fmt.number(row.j_per_token, 3), None),),
        ((fmt.money(row.usd_per_1m_tokens), None),), ((fmt.money(row.usd_per_hour), None),),
        ((fmt.number(row.tokens_per_s, 1), None),), ((sparkline(tokens), SPARK_TOKENS),),
        ((fmt.percent(row.cache_hit_rate), None),), ((fmt.millis(row.p50_s), None),),
        ((fmt.millis(row.p95_s), None),), alerts,
    )  # fmt: skip


def cell_text(cell: Cell) -> str:
    """A cell's plain text."""
    return "".join(text for text, _ in cell)


#: The columns shown and how wide: (index into COLUMNS, width), in COLUMNS' order.
Layout = tuple[tuple[int, int], ...]


def fit_columns(total: int, content: Mapping[str, int]) -> Layout:
    """The columns that fit in `total` characters, most important first, each as wide as its
    content (`content`: the widest text of the fitted columns) or its fixed width."""
    widths = {
        c.key: min(c.width, max(len(c.header), content.get(c.key, 0))) if c.fit else c.width
        for c in COLUMNS
    }
    chosen: set[int] = set()
    used = 0
    for index in sorted(range(len(COLUMNS)), key=lambda i: COLUMNS[i].priority):
        need = widths[COLUMNS[index].key] + 1
        if used + need <= total or len(chosen) < 2:  # NODE and DEPLOYMENT always
            chosen.add(index)
            used += need
    return tuple((i, widths[COLUMNS[i].key]) for i in sorted(chosen))


FULL: Layout = tuple((i, c.width) for i, c in enumerate(COLUMNS))


def line(row_cells: Sequence[Cell], layout: Layout = FULL) -> list[Segment]:
    """One table line: the layout's cells cut or padded to their width, one space between."""
    segments: list[Segment] = []
    for index, width in layout:
        cell = row_cells[index]
        used = 0
        for text, style in cell:
            room = width - used
            if room <= 0:
                break
            piece = text[:room]
            segments.append(Segment(piece, style))
            used += len(piece)
        segments.append(Segment(" " * (width - used + 1)))
    return segments


def header(layout: Layout, sorted_by: tuple[str, bool] | None) -> list[Segment]:
    """The header line; the sort column marked ▲ (ascending) or ▼ (descending)."""
    labels = []
    for column in COLUMNS:
        mark = ""
        if sorted_by is not None and sorted_by[0] == column.key:
            mark = "▼" if sorted_by[1] else "▲"
        labels.append(((column.header + mark, HEADER),))
    return line(labels, layout)


def width_of(layout: Layout) -> int:
    """Characters a line of `layout` takes."""
    return sum(width + 1 for _, width in layout)


class FleetTable(ScrollView, can_focus=True):
    """Rows keyed by `url|deployment`, with a cursor; the first line is the header."""

    DEFAULT_CSS = """
    FleetTable { height: 1fr; }
    """

    BINDINGS = [
        Binding("up,k", "cursor(-1)", "Up", show=False, id="table.up"),
        Binding("down,j", "cursor(1)", "Down", show=False, id="table.down"),
        Binding("pageup", "page(-1)", "Page up", show=False, id="table.page_up"),
        Binding("pagedown", "page(1)", "Page down", show=False, id="table.page_down"),
        Binding("home", "jump(0)", "First", show=False, id="table.first"),
        Binding("end", "jump(-1)", "Last", show=False, id="table.last"),
        Binding("enter", "select", "Node", id="fleet.node", tooltip="Open the node view"),
    ]

    cursor_row: reactive[int] = reactive(0)
    """Index of the selected row."""

    class RowSelected(Message):
        """Enter on a row."""

        def __init__(self, table: FleetTable, key: str) -> None:
            super().__init__()
            self.table = table
            self.key = key

        @property
        def control(self) -> FleetTable:
            """The table the row is in (lets `@on(..., selector)` match it)."""
            return self.table

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._order: list[str] = []
        #: key -> (row, its sparkline series, its pending-action label)
        self._rows: dict[str, tuple[FleetRow, tuple[Sequence[float], Sequence[float]],
                                    str | None]] = {}  # fmt: skip
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._lines: dict[str, Strip] = {}
        #: The widest content of each fitted column over the rows shown.
        self._content: dict[str, int] = {}
        self._layout: Layout = FULL
        self._sorted_by: tuple[str, bool] | None = None

    def sort_marker(self, key: str | None, reverse: bool) -> None:
        """Mark column `key` as the sort column in the header (None: no sort)."""
        wanted = (key, reverse) if key else None
        if wanted != self._sorted_by:
            self._sorted_by = wanted
            self.refresh_line(0)

    def _fit(self) -> None:
        """Choose the columns for the current width and content; redraw if they changed."""
        layout = fit_columns(self.size.width or width_of(FULL), self._content)
        if layout != self._layout:
            self._layout = layout
            self._lines.clear()
            self.virtual_size = Size(width_of(layout), len(self._order) + 1)
            self.refresh()

    def on_resize(self) -> None:
        self._fit()

    # -- data ------------------------------------------------------------------------------

    def show(
        self,
        rows: Sequence[FleetRow],
        series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        pending: Mapping[str, str],
        changed: set[str] | None = None,
    ) -> None:
        """Make the table show `rows` in this order, redrawing only changed visible lines.

        `changed`: the keys whose data may differ since the last call (None: all of them).
        Cells are built lazily, when a line is drawn: rows off screen cost nothing here.
        """
        selected = self.selected_key()
        order = [r.key for r in rows]
        self._content = {
            "node": max((len(r.node) for r in rows), default=0),
            "hardware": max((len(r.profile) for r in rows), default=0),
            "deployment": max((len(r.deployment) for r in rows), default=0),
            "precision": max((len(r.precision) + (len(r.desired_precision) + 1
                              if r.desired_precision != r.precision else 0) for r in rows),
                             default=0),
            "state": max((len(r.state) + (len(pending[r.key]) + 1 if r.key in pending else 0)
                          for r in rows), default=0),
        }  # fmt: skip
        self._fit()
        for row in rows:
            if changed is None or row.key in changed or row.key not in self._rows:
                self._rows[row.key] = (row, series.get(row.key, ((), ())),
                                       pending.get(row.key))  # fmt: skip
                self._cells.pop(row.key, None)
                self._lines.pop(row.key, None)
        if order != self._order:
            keep = set(order)
            for gone in [k for k in self._rows if k not in keep]:
                self._rows.pop(gone, None)
                self._cells.pop(gone, None)
                self._lines.pop(gone, None)
            self._order = order
            self.virtual_size = Size(width_of(self._layout), len(order) + 1)
            if selected in order:
                self.cursor_row = order.index(selected)
            self.cursor_row = min(self.cursor_row, max(0, len(order) - 1))
            self.refresh()
            return
        top = self.scroll_offset.y
        for index in range(top, min(len(order), top + self.size.height)):
            if order[index] not in self._lines:
                self.refresh_line(index + 1)  # virtual y: ScrollView subtracts the scroll

    def update_rows(
        self,
        rows: Sequence[FleetRow],
        series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        pending: Mapping[str, str],
    ) -> None:
        """Redraw just these rows where they already are (a node with an action under way),
        without the pass over the whole fleet that `show` makes."""
        top = self.scroll_offset.y
        for row in rows:
            if row.key not in self._rows:
                continue
            self._rows[row.key] = (row, series.get(row.key, ((), ())), pending.get(row.key))
            self._cells.pop(row.key, None)
            self._lines.pop(row.key, None)
            index = self._order.index(row.key)
            if 0 < index + 1 - top < self.size.height:
                self.refresh_line(index + 1)

    def _row_cells(self, key: str) -> tuple[Cell, ...]:
        found = self._cells.get(key)
        if found is None:
            row, (watts, tokens), label = self._rows[key]
            found = self._cells[key] = cells(row, watts, tokens, label)
        return found

    def selected_key(self) -> str | None:
        """The row key under the cursor, if any."""
        if 0 <= self.cursor_row < len(self._order):
            return self._order[self.cursor_row]
        return None

    def cell(self, key: str, column: str) -> str:
        """The text of one cell (for tests and benchmarks)."""
        return cell_text(self._row_cells(key)[COLUMN_INDEX[column]])

    def move_cursor(self, row: int) -> None:
        """Select row `row` and scroll it into view."""
        if self._order:
            self.cursor_row = max(0, min(row, len(self._order) - 1))

    # -- drawing ---------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        base = self.rich_style
        width = width_of(self._layout)
        if y == 0:
            strip = Strip(header(self._layout, self._sorted_by), width).apply_style(base)
        else:
            index = y - 1 + scroll_y
            if index >= len(self._order):
                return Strip.blank(self.size.width, self.rich_style)
            key = self._order[index]
            cached = self._lines.get(key)
            if cached is None:
                # The widget's own style under every segment: unstyled cells would otherwise
                # be drawn without the table's colours.
                cached = Strip(line(self._row_cells(key), self._layout), width).apply_style(base)
                self._lines[key] = cached
            strip = cached
            if index == self.cursor_row and self.has_focus:
                strip = strip.apply_style(CURSOR)
        return strip.crop_extend(scroll_x, scroll_x + self.size.width, base)

    def watch_cursor_row(self, old: int, new: int) -> None:
        self._scroll_to_cursor()
        self.refresh()

    def _scroll_to_cursor(self) -> None:
        rows_visible = max(1, self.size.height - 1)
        top = self.scroll_offset.y
        if self.cursor_row < top:
            self.scroll_to(y=self.cursor_row, animate=False)
        elif self.cursor_row >= top + rows_visible:
            self.scroll_to(y=self.cursor_row - rows_visible + 1, animate=False)

    def on_click(self, event: events.Click) -> None:
        index = event.y - 1 + self.scroll_offset.y
        if 0 <= index < len(self._order):
            self.cursor_row = index

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # -- keys ------------------------------------------------------------------------------

    def action_cursor(self, step: int) -> None:
        """Move the cursor by `step` rows."""
        self.move_cursor(self.cursor_row + step)

    def action_page(self, pages: int) -> None:
        """Move the cursor by a screenful."""
        self.move_cursor(self.cursor_row + pages * max(1, self.size.height - 2))

    def action_jump(self, row: int) -> None:
        """First (0) or last (-1) row."""
        self.move_cursor(len(self._order) - 1 if row < 0 else row)

    def action_select(self) -> None:
        """Enter: announce the selected row."""
        key = self.selected_key()
        if key is not None:
            self.post_message(self.RowSelected(self, key))
