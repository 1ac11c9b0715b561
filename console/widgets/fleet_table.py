"""The fleet table: one row per deployment per node, updated in place cell by cell."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from rich.text import Text
from textual.widgets import DataTable

from wattops.console import rows as fmt
from wattops.console.rows import FleetRow, Link

SPARK = "▁▂▃▄▅▆▇█"
#: Points shown in the fleet table's trend columns (one per second).
SPARK_WIDTH = 12

#: (key, header, sort value)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("node", "NODE"),
    ("deployment", "DEPLOYMENT"),
    ("precision", "PRECISION"),
    ("replicas", "REPLICAS"),
    ("state", "STATE"),
    ("power", "POWER"),
    ("power_trend", "W"),
    ("j_per_token", "J/TOK"),
    ("usd_per_1m", "$/1M TOK"),
    ("usd_per_hour", "$/H"),
    ("tokens_per_s", "TOK/S"),
    ("tokens_trend", "TOK/S"),
    ("cache", "CACHE"),
    ("p50", "P50"),
    ("p95", "P95"),
    ("alerts", "ALERTS"),
)
#: Columns `o` cycles through when sorting, and how each sorts.
SORTABLE: dict[str, str] = {
    "node": "node",
    "deployment": "deployment",
    "power": "watts",
    "j_per_token": "j_per_token",
    "usd_per_1m": "usd_per_1m_tokens",
    "usd_per_hour": "usd_per_hour",
    "tokens_per_s": "tokens_per_s",
    "cache": "cache_hit_rate",
    "p95": "p95_s",
    "alerts": "alerts",
}

STATE_STYLE = {
    "serving": "green",
    "switching": "bold yellow",
    "scaling": "yellow",
    "parked": "dim",
    "failed": "bold red",
    "offline": "bold red",
    "stale": "yellow",
}


def sparkline(values: Sequence[float]) -> str:
    """Unicode blocks scaled to the series' own maximum."""
    values = list(values)[-SPARK_WIDTH:]
    if not values:
        return ""
    top = max(values) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1)))] for v in values)


def cells(
    row: FleetRow, watts: Sequence[float], tokens: Sequence[float], pending: str | None
) -> tuple[Text | str, ...]:
    """The rendered cells of one row."""
    if not row.deployment:
        state = Text(row.link.value, style=STATE_STYLE[row.link.value])
        return (row.node, "-", "-", "-", state, *("",) * (len(COLUMNS) - 5))
    precision = Text(row.precision)
    if row.desired_precision != row.precision:
        precision.append(f"→{row.desired_precision}", style="bold yellow")
    state_text = row.state if row.link is Link.LIVE else row.link.value
    state = Text(state_text, style=STATE_STYLE.get(state_text, ""))
    if pending:
        state.append(f" {pending}", style="italic cyan")
    power = Text(fmt.watts(row.watts, False))
    if row.estimated and row.watts is not None:
        power.append(" est.", style="dim italic")
    alerts = Text(str(row.alerts), style="bold red") if row.alerts else Text("-", style="dim")
    return (
        row.node,
        row.deployment,
        precision,
        f"{row.ready}/{row.desired}",
        state,
        power,
        Text(sparkline(watts), style="magenta"),
        fmt.number(row.j_per_token, 3),
        fmt.money(row.usd_per_1m_tokens),
        fmt.money(row.usd_per_hour),
        fmt.number(row.tokens_per_s, 1),
        Text(sparkline(tokens), style="cyan"),
        fmt.percent(row.cache_hit_rate),
        fmt.millis(row.p50_s),
        fmt.millis(row.p95_s),
        alerts,
    )


class FleetTable(DataTable[Text | str]):
    """Rows keyed by `url|deployment`; only cells whose text changed are redrawn."""

    DEFAULT_CSS = """
    FleetTable { height: 1fr; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._shown: dict[str, tuple[str, ...]] = {}
        self._order: list[str] = []

    def on_mount(self) -> None:
        for key, label in COLUMNS:
            width = SPARK_WIDTH if key.endswith("_trend") else None
            self.add_column(label, key=key, width=width)

    def show(
        self,
        rows: Sequence[FleetRow],
        series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
        pending: Mapping[str, str],
    ) -> None:
        """Make the table show `rows` in this order, touching only what changed."""
        order = [r.key for r in rows]
        rendered = {r.key: cells(r, *series.get(r.key, ((), ())), pending.get(r.key)) for r in rows}
        if order != self._order:
            selected = self.selected_key()
            self.clear()
            for key in order:
                self.add_row(*rendered[key], key=key)
            self._order = order
            self._shown = {k: tuple(str(c) for c in v) for k, v in rendered.items()}
            if selected in order:
                self.move_cursor(row=order.index(selected))
            return
        for key in order:
            plain = tuple(str(c) for c in rendered[key])
            before = self._shown.get(key)
            for i, (col, _) in enumerate(COLUMNS):
                if before is None or before[i] != plain[i]:
                    self.update_cell(key, col, rendered[key][i], update_width=True)
            self._shown[key] = plain

    def selected_key(self) -> str | None:
        """The row key under the cursor, if any."""
        if not self._order or self.cursor_row < 0 or self.cursor_row >= len(self._order):
            return None
        return self._order[self.cursor_row]
