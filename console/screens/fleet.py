"""The fleet view: every deployment on every node as a row, the fleet's totals, the alerts,
and the keys that act on the selected deployment.

The screen reads the fleet state on its own timer; the agents' event streams run as tasks on
the same loop and control calls run in workers, so nothing the network does can freeze it.
Every action goes through a `FleetTarget` (wattops.fleet.target): whether an agent or the
Kubernetes API carries it out is the target's business, not this screen's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import aiohttp
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, OptionList, Static

from wattops.console import formats as fmt
from wattops.console.screens.modals import ConfirmModal, DetailModal, PrecisionModal, ScaleModal
from wattops.console.screens.node import NodeScreen
from wattops.console.widgets.alerts_panel import AlertsPanel, PanelItem
from wattops.console.widgets.fleet_table import COLUMNS, SORTABLE, FleetTable
from wattops.fleet.advice import precision_advice
from wattops.fleet.client import AgentClient, AgentError
from wattops.fleet.kube import KubeDeployment, KubeError, KubeFleet
from wattops.fleet.rollout import Action
from wattops.fleet.rows import FleetRow, kube_rows, rows_for
from wattops.fleet.state import AgentLink, FleetState
from wattops.fleet.target import ActionRefused, AgentTarget, FleetTarget, KubeTarget
from wattops.vocabulary.net import http_connector
from wattops.vocabulary.tls import client_ssl

#: Screens under which the fleet view does not redraw.
_MODALS = (PrecisionModal, ScaleModal, ConfirmModal, DetailModal)
#: Control actions: hidden and refused in read-only mode.
CONTROL_ACTIONS = frozenset({"precision", "scale_up", "scale_down", "scale_to", "park"})
#: Seconds between reads of the Kubernetes Deployments (`--kube`).
KUBE_POLL_S = 2.0
#: The most replicas the scale modal offers for a Kubernetes Deployment (more: the CLI).
KUBE_SCALE_MAX = 100
#: How long the console follows an action (a switch, a rollout) before saying it still goes.
ACTION_TIMEOUT_S = 900.0


@dataclass
class Pending:
    """A control action sent and not finished yet, shown in its row."""

    action: Action
    target: str | int
    #: Where it stands, when the target reports more than the row shows (a rollout's words).
    progress: str = ""


class ActionCommands(Provider):
    """The command palette's entries for the selected deployment's actions."""

    async def search(self, query: str) -> Hits:
        screen = self.screen
        if not isinstance(screen, FleetScreen):
            return
        matcher = self.matcher(query)
        commands = [
            ("Fleet: sort by next column", screen.action_sort, "Cycle the sort column"),
            ("Fleet: filter rows", screen.action_filter, "Filter by node, deployment..."),
        ]
        if not screen.read_only:
            commands += [
                ("Deployment: switch precision", screen.action_precision, "Pick a precision"),
                ("Deployment: scale up by one", screen.action_scale_up, "One more replica"),
                ("Deployment: scale down by one", screen.action_scale_down, "One replica fewer"),
                ("Deployment: scale to a number", screen.action_scale_to, "Choose the count"),
                ("Deployment: park (scale to zero)", screen.action_park, "Stop all replicas"),
            ]
        for name, callback, help_text in commands:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class FleetScreen(Screen[None]):
    """The fleet table, totals and alerts, with the control keys."""

    BINDINGS = [
        Binding(
            "p",
            "precision",
            "Precision",
            id="deployment.precision",
            tooltip="Switch the selected deployment's precision (asks to confirm)",
        ),
        Binding(
            "plus,+",
            "scale_up",
            "+1",
            key_display="+",
            id="deployment.scale_up",
            tooltip="One more replica",
        ),
        Binding(
            "minus,-",
            "scale_down",
            "-1",
            key_display="-",
            id="deployment.scale_down",
            tooltip="One replica fewer",
        ),
        Binding(
            "s",
            "scale_to",
            "Scale",
            id="deployment.scale_to",
            tooltip="Scale to a number of replicas",
        ),
        Binding(
            "z",
            "park",
            "Park",
            id="deployment.park",
            tooltip="Scale to zero (asks to confirm); the next request wakes it",
        ),
        Binding(
            "slash",
            "filter",
            "Filter",
            key_display="/",
            id="fleet.filter",
            tooltip="Filter rows by node, deployment, precision or state",
        ),
        Binding("o", "sort", "Sort", id="fleet.sort", tooltip="Sort by the next figure"),
        Binding(
            "escape",
            "clear_filter",
            "Clear filter",
            show=False,
            id="fleet.clear_filter",
            tooltip="Show every row again",
        ),
        Binding(
            "a",
            "alerts",
            "Alerts",
            id="fleet.alerts",
            tooltip="Move to the alerts and recommendations",
        ),
        Binding(
            "question_mark", "help", "Help", key_display="?", id="app.help", tooltip="Show the keys"
        ),
    ]

    def __init__(
        self,
        fleet: FleetState,
        kube: KubeFleet | None = None,
        token: str | None = None,
        read_only: bool = False,
        prometheus: str | None = None,
        refresh_s: float = 1.0,
    ) -> None:
        super().__init__()
        self.fleet = fleet
        #: `--kube`: the API server, for the engine Deployments and for acting on them.
        self.kube = kube
        self.kube_deployments: list[KubeDeployment] = []
        self.kube_error: str | None = None
        self.token = token
        self.read_only = read_only
        self.prometheus = prometheus
        self.refresh_s = refresh_s
        #: Actions under way, by row key.
        self.pending: dict[str, Pending] = {}
        self.filter_text = ""
        self.sort_key: str | None = None
        self.sort_reverse = False
        #: The rows as last drawn (filtered and sorted).
        self.last_rows: list[FleetRow] = []
        self._labels: dict[str, str] = {}
        self._order_state: tuple[str, str | None, bool] = ("", None, False)
        self._panel_cache: dict[str, tuple[tuple[object, ...], list[PanelItem]]] = {}
        self._control_http: aiohttp.ClientSession | None = None
        #: Per agent URL, why this console's token may not act there (a viewer's token).
        self.denied: dict[str, str] = {}
        self._asked_whoami: set[str] = set()

    # -- layout ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="totals")
        with Vertical(id="main"):
            yield FleetTable(id="fleet")
            yield Input(
                placeholder="filter: node, deployment, precision or state; enter to apply",
                id="filter",
            )
            yield AlertsPanel(id="alerts")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False
        self.fleet.on_change = self._link_changed
        # One pool for control calls: a new connection per key press costs tens of ms.
        self._control_http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10.0),
            connector=http_connector(ssl=client_ssl()),
        )
        if self.kube is not None:
            self._poll_kube()
            self.set_interval(KUBE_POLL_S, self._poll_kube)
        self.refresh_fleet()
        self.set_interval(self.refresh_s, self.refresh_fleet)
        self.query_one(FleetTable).focus()

    async def on_unmount(self) -> None:
        if self._control_http is not None:
            await self._control_http.close()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only: the actions are neither shown nor run, and no control call is made.
        if action not in CONTROL_ACTIONS:
            return True
        if self.read_only:
            return False
        # A token that may act on no agent (a viewer's): shown, disabled; the reason is in the
        # title, and `send` refuses (with it) anything that reaches it.
        links = [u for u, link in self.fleet.links.items() if link.connected]
        if links and all(u in self.denied for u in links):
            return None
        return True

    def _ask_whoami(self, link: AgentLink) -> None:
        """Once per agent: what this console's token or client certificate may do there
        (`GET /v1/whoami`)."""
        if self.kube is not None or link.url in self._asked_whoami or not link.connected:
            return
        self._asked_whoami.add(link.url)
        self.run_worker(self._whoami(link.url), group=f"whoami {link.url}",
                        exit_on_error=False)  # fmt: skip

    async def _whoami(self, url: str) -> None:
        try:
            async with AgentClient(url, token=self.token, http=self._control_http) as client:
                who = await client.whoami()
        except AgentError:
            return  # an older agent without roles: its refusals will say what is wrong
        if who.may_control:
            self.denied.pop(url, None)
        else:
            credential = who.via or "token"
            held = (
                f"{credential} {who.name!r} is a {who.role}" if who.name
                else "no token or client certificate given"
            )  # fmt: skip
            self.denied[url] = f"actions need an operator {credential} ({held})"
            self.sub_title = f"{self.denied[url]}: actions disabled"
        self.refresh_bindings()

    @work(thread=True, group="kube-poll", exclusive=True, exit_on_error=False)
    def _poll_kube(self) -> None:
        assert self.kube is not None
        try:
            found = self.kube.deployments()
        except KubeError as exc:
            self.app.call_from_thread(self._kube_listed, None, str(exc))
            return
        self.app.call_from_thread(self._kube_listed, found, None)

    def _kube_listed(self, found: list[KubeDeployment] | None, error: str | None) -> None:
        if found is not None:
            self.kube_deployments = found
        self.kube_error = error

    # -- refresh ---------------------------------------------------------------------------

    def _link_changed(self, link: AgentLink) -> None:
        self._ask_whoami(link)
        # An operator waiting on an action sees its effect at once, not at the next redraw:
        # that node's rows are redrawn on their own, without a pass over the whole fleet.
        if any(k.startswith(link.url + "|") for k in self.pending):
            self.app.call_next(self._refresh_link, link)

    def _drawable(self) -> FleetTable | None:
        """The table, when the fleet view is on top and mounted; None otherwise (a modal is
        open: do not redraw under it, and keep the selection stable)."""
        if not self.is_attached or isinstance(self.app.screen, _MODALS):
            return None
        try:
            return self.query_one(FleetTable)
        except NoMatches:
            return None  # starting up or shutting down

    def _refresh_link(self, link: AgentLink) -> None:
        table = self._drawable()
        if table is None:
            return
        rows = rows_for(link.url, link.snapshot, link.link(time.monotonic()))
        labels = self._pending_labels()
        series = {
            f"{link.url}|{name}": (link.watts[name], link.tokens[name]) for name in link.watts
        }
        table.update_rows(rows, series, labels)
        self.last_rows = [next((r for r in rows if r.key == old.key), old)
                          for old in self.last_rows]  # fmt: skip

    def _pending_labels(self) -> dict[str, str]:
        return {k: f"{p.action}→{p.target}… {p.progress}".rstrip()
                for k, p in self.pending.items()}  # fmt: skip

    def refresh_fleet(self) -> None:
        """Redraw from the fleet state: totals, table, alerts."""
        table = self._drawable()
        if table is None:
            return
        rows, changed = self.fleet.rows()
        if self.kube is not None:
            # A handful of rows, redrawn every time: their counts come from another source.
            deployments = kube_rows(self.kube_deployments, rows)
            changed.update(r.key for r in deployments)
            rows = deployments + rows
        labels = self._pending_labels()
        changed.update(k for k in labels.keys() | self._labels.keys()
                       if labels.get(k) != self._labels.get(k))  # fmt: skip
        self._labels = labels
        order_state = (self.filter_text, self.sort_key, self.sort_reverse)
        if order_state != self._order_state:
            self._order_state = order_state
            changed.update(r.key for r in rows)
        if self.filter_text:
            needle = self.filter_text.lower()
            rows = [r for r in rows
                    if needle in f"{r.node} {r.deployment} {r.precision} {r.state} "
                                 f"{r.link}".lower()]  # fmt: skip
        if self.sort_key:
            attr = SORTABLE[self.sort_key]
            # Rows without the figure go last whichever way the others are sorted.
            known = [r for r in rows if getattr(r, attr) is not None]
            known.sort(key=lambda r: getattr(r, attr), reverse=self.sort_reverse)
            rows = known + [r for r in rows if getattr(r, attr) is None]
        self.last_rows = rows
        table.sort_marker(self.sort_key, self.sort_reverse)
        series = {}
        for key in changed:
            url, _, name = key.partition("|")
            link = self.fleet.links.get(url)
            if link is not None and name in link.watts:
                series[key] = (link.watts[name], link.tokens[name])
        with self.app.batch_update():
            table.show(rows, series, labels, changed)
            self._show_totals()
            self.query_one(AlertsPanel).show(self._panel_items())

    def _show_totals(self) -> None:
        t = self.fleet.totals()
        live = sum(1 for link in self.fleet.links.values() if link.connected)
        est = " [i]est.[/i]" if t["estimated_nodes"] else ""
        hit = "-" if t["cache_hit_rate"] < 0 else f"{t['cache_hit_rate']:.0%}"
        alerts = int(t["alerts"])
        alert_text = f"[b red]{alerts} alert(s)[/b red]" if alerts else "no alerts"
        self.query_one("#totals", Static).update(
            f" fleet  [b]{fmt.money(t['usd_per_hour'])}/h[/b]   {t['watts']:,.0f} W{est}   "
            f"{t['tokens_per_s']:,.1f} tok/s   cache hit {hit}   {alert_text}   "
            f"nodes {live}/{len(self.fleet.links)} live"
        )

    def _panel_items(self) -> list[PanelItem]:
        items = []
        if self.kube_error is not None:
            items.append(PanelItem("kube|error", "critical",
                                   f"Kubernetes API: {self.kube_error}",
                                   "The Deployments' rows show what was last read; retrying "
                                   f"every {KUBE_POLL_S:.0f} s."))  # fmt: skip
        for link in self.fleet.links.values():
            key = _items_key(link)
            cached = self._panel_cache.get(link.url)
            if cached is None or cached[0] != key:
                cached = (key, _link_items(link))
                self._panel_cache[link.url] = cached
            items.extend(cached[1])
        return items

    # -- the selected deployment -----------------------------------------------------------

    def selected_target(self) -> FleetTarget | None:
        """What the row under the cursor lets the operator act on; None (with a notice saying
        why) when nothing can be: no deployment row, an offline node, a Kubernetes row
        without `--kube`."""
        key = self.query_one(FleetTable).selected_key()
        row = next((r for r in self.last_rows if r.key == key), None) if key else None
        if row is None or not row.deployment:
            self.notify("select a deployment row first", severity="warning")
            return None
        if row.namespace is not None:
            return self._kube_target(row)
        found = self.fleet.find(row.key)
        link = found[0] if found else None
        dep = link.deployment(row.deployment) if link else None
        if link is None or dep is None:
            self.notify("select a deployment row first", severity="warning")
            return None
        if not link.connected:
            self.notify(f"{link.url} is offline", severity="warning")
            return None
        return AgentTarget.of(link.url, link.node, dep, token=self.token,
                              http=self._control_http, snapshots=link.next_snapshot)  # fmt: skip

    def _kube_target(self, row: FleetRow) -> KubeTarget | None:
        """A Kubernetes-managed row (the Deployment's own, or an agent's row of its pods)."""
        if self.kube is None:
            self.notify(
                f"{row.deployment} is the Kubernetes Deployment {row.namespace}/{row.deployment}:"
                " open the console with --kube to scale it or change its precision",
                severity="warning",
            )
            return None
        wanted = (row.namespace, row.deployment)
        view = next((d for d in self.kube_deployments if (d.namespace, d.name) == wanted), None)
        if view is None:
            self.notify(
                f"{row.namespace}/{row.deployment} is not among the Deployments the API server "
                "lists for you", severity="warning",
            )  # fmt: skip
            return None
        return KubeTarget.of(self.kube, view, KUBE_SCALE_MAX)

    # -- actions ---------------------------------------------------------------------------

    def action_precision(self) -> None:
        """Pick a precision, confirm, send."""
        target = self.selected_target()
        if target is None:
            return

        def picked(precision: str | None) -> None:
            if precision is None or precision == target.precision:
                return
            if precision.startswith("canary:"):
                trial = precision.removeprefix("canary:")
                if trial == target.precision:
                    return
                question = (
                    f"Try {trial} on 10% of {target.deployment}'s traffic on {target.where} for "
                    f"5 min first? Promoted if its answers agree with {target.precision}'s on "
                    "90% of shadowed requests, p95 is at most 10% worse and J/token not worse; "
                    "rolled back otherwise (clients see no change)."
                )
                self.app.push_screen(
                    ConfirmModal(question), partial(self._confirmed, target, "canary", trial)
                )
                return
            question = (
                f"Switch {target.deployment} on {target.where} from {target.precision} to "
                f"{precision}?\n{target.switch_note()}"
            )
            self.app.push_screen(
                ConfirmModal(question), partial(self._confirmed, target, "precision", precision)
            )

        self.app.push_screen(
            PrecisionModal(target.deployment, target.where, target.precision, target.precisions),
            picked,
        )

    def action_scale_up(self) -> None:
        """One more replica."""
        target = self.selected_target()
        if target is None:
            return
        if target.desired_replicas >= target.max_replicas:
            self.notify(
                f"{target.deployment} is at max_replicas ({target.max_replicas})",
                severity="warning",
            )
            return
        self.send(target, "scale", target.desired_replicas + 1)

    def action_scale_down(self) -> None:
        """One replica fewer (to zero asks to confirm, as parking does)."""
        target = self.selected_target()
        if target is None or target.desired_replicas == 0:
            return
        if target.desired_replicas == 1:
            self._ask_park(target)
        else:
            self.send(target, "scale", target.desired_replicas - 1)

    def action_scale_to(self) -> None:
        """Scale to a number chosen in a modal."""
        target = self.selected_target()
        if target is None:
            return

        def picked(replicas: int | None) -> None:
            if replicas is None or replicas == target.desired_replicas:
                return
            if replicas == 0:
                self._ask_park(target)
            else:
                self.send(target, "scale", replicas)

        self.app.push_screen(
            ScaleModal(target.deployment, target.where, target.desired_replicas,
                       target.max_replicas),
            picked,
        )  # fmt: skip

    def action_park(self) -> None:
        """Scale to zero, after confirmation."""
        target = self.selected_target()
        if target is not None:
            self._ask_park(target)

    def _ask_park(self, target: FleetTarget) -> None:
        question = f"Park {target.deployment} on {target.where}? {target.park_note()}"
        self.app.push_screen(ConfirmModal(question), partial(self._confirmed, target, "scale", 0))

    def _confirmed(
        self, target: FleetTarget, action: Action, value: str | int, yes: bool | None
    ) -> None:
        if yes:
            self.send(target, action, value)

    def send(self, target: FleetTarget, action: Action, value: str | int) -> None:
        """Carry out one action in the background; its row says it is under way until the
        outcome is known. A newer action on the same deployment replaces an older one."""
        if self.read_only:  # belt and braces: check_action already hides these
            self.notify("read-only console: no action is sent", severity="warning")
            return
        reason = self.denied.get(getattr(target, "url", ""))
        if reason is not None:
            self.notify(f"{target.label}: {reason}; nothing was sent", severity="warning")
            return
        self.pending[target.key] = Pending(action, value)
        self.run_worker(self._carry_out(target, action, value), group=f"act {target.key}",
                        exclusive=True, exit_on_error=False)  # fmt: skip

    async def _carry_out(self, target: FleetTarget, action: Action, value: str | int) -> None:
        key = target.key
        try:
            accepted = await target.act(action, value)
        except ActionRefused as exc:
            self.pending.pop(key, None)
            self.notify(exc.reason, title="failed", severity="error", timeout=15)
            return
        self.notify(accepted, title="sent")
        pending = self.pending.get(key)

        def progress(message: str) -> None:
            if pending is not None:
                pending.progress = message

        # An agent's row shows the deployment's own state; a rollout's words add to it.
        outcome = await target.follow(
            action, value, ACTION_TIMEOUT_S,
            None if isinstance(target, AgentTarget) else progress,
        )  # fmt: skip
        if self.pending.get(key) is pending:
            self.pending.pop(key, None)
        message = f"{target.label}: {outcome.message}"
        if outcome.done:
            self.notify(message, title="done")
        elif outcome.done is False:
            self.notify(message, title="failed", severity="error", timeout=30)
        else:
            self.notify(message, title="still rolling out", severity="warning", timeout=30)

    # -- navigation ------------------------------------------------------------------------

    def action_node_view(self) -> None:
        """Open the node view of the selected row's node."""
        key = self.query_one(FleetTable).selected_key()
        if key is None:
            return
        link = self.fleet.links.get(key.partition("|")[0])
        if link is not None:
            self.app.push_screen(NodeScreen(link, self.prometheus, self.token, self.read_only,
                                            self.denied.get(link.url)))  # fmt: skip

    @on(FleetTable.RowSelected, "#fleet")
    def _row_selected(self) -> None:
        self.action_node_view()

    def action_filter(self) -> None:
        """Show the filter box."""
        box = self.query_one("#filter", Input)
        box.display = True
        box.value = self.filter_text
        box.focus()

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self, event: Input.Submitted) -> None:
        self.filter_text = event.value.strip()
        event.input.display = bool(self.filter_text)
        self.query_one(FleetTable).focus()
        self.refresh_fleet()
        if self.filter_text and not self.last_rows:
            self.notify(f"no row matches {self.filter_text!r}; escape clears the filter",
                        severity="warning")  # fmt: skip

    def action_clear_filter(self) -> None:
        """Escape: drop the filter and show every row."""
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        if self.filter_text:
            self.filter_text = ""
            self.refresh_fleet()
        self.query_one(FleetTable).focus()

    def action_sort(self) -> None:
        """Cycle the sort column: ascending, then descending, then the next column."""
        keys = list(SORTABLE)
        if self.sort_key is None:
            self.sort_key, self.sort_reverse = keys[0], False
        elif not self.sort_reverse:
            self.sort_reverse = True
        else:
            i = keys.index(self.sort_key) + 1
            self.sort_key, self.sort_reverse = (keys[i], False) if i < len(keys) else (None, False)
        order = (
            "off"
            if self.sort_key is None
            else (f"{self.sort_key} {'descending' if self.sort_reverse else 'ascending'}")
        )
        self.notify(f"sort: {order}", timeout=2)
        self.refresh_fleet()

    def action_alerts(self) -> None:
        """Focus the alerts and recommendations panel."""
        self.query_one(AlertsPanel).focus()

    @on(OptionList.OptionSelected, "#alerts")
    def _alert_selected(self, event: OptionList.OptionSelected) -> None:
        item = self.query_one(AlertsPanel).item(event.option.id)
        if item is not None:
            self.app.push_screen(DetailModal(item.text, item.detail))

    def action_help(self) -> None:
        """Show the keys."""
        lines = [
            f"{b.key_display or b.key:>6}  {b.description}: {b.tooltip}"
            for b in [*self.BINDINGS, *self.app.BINDINGS, *FleetTable.BINDINGS]
            if isinstance(b, Binding) and b.tooltip
            and not (self.read_only and b.action in CONTROL_ACTIONS)
        ]  # fmt: skip
        lines += [
            "   tab  Focus: move between the table and the alerts",
            "\nctrl+p opens the command palette with the same actions.",
            "\nColumns (a narrow terminal shows the most needed first: the trends go first):",
            *(f"{c.header:>12}  {c.meaning}" for c in COLUMNS),
            "\nFigures are over the agent's accounting window (window_s, 300 s by default),",
            "so a deployment parked a moment ago still shows what it drew before; the header's",
            "W is the whole node's power, a row's POWER the deployment's share of it.",
        ]
        if self.read_only:
            lines.append("Read-only: no action can be sent from this console.")
        self.app.push_screen(DetailModal("Keys", "\n".join(lines)))


def _items_key(link: AgentLink) -> tuple[object, ...]:
    # What the panel lines of a node depend on: recomputed only when one of these changes,
    # not on every event (the figures move every second, the advice does not).
    snap = link.snapshot
    if snap is None or not link.connected:
        return (link.connected, link.error, link.attempts)
    return (
        tuple((a.id, a.message, a.detail) for a in snap.alerts),
        tuple((d.name, d.precision, d.ready_replicas > 0, tuple(d.available_precisions))
              for d in snap.deployments),
    )  # fmt: skip


def _link_items(link: AgentLink) -> list[PanelItem]:
    """One node's lines of the alerts panel."""
    if not link.connected:
        return [PanelItem(f"{link.url}|offline", "critical",
                          f"{link.url} offline: {link.error or 'no answer'}",
                          f"Reconnecting with backoff (attempt {link.attempts}). Its last "
                          "figures are kept but not counted in the fleet totals.")]  # fmt: skip
    snap = link.snapshot
    if snap is None:
        return []
    items = [PanelItem(f"{link.url}|{a.id}", a.severity, f"{snap.node}: {a.message}", a.detail)
             for a in snap.alerts]  # fmt: skip
    items += [PanelItem(r.id, "advice", r.message, r.detail)
              for r in precision_advice(link.url, snap)]  # fmt: skip
    return items
