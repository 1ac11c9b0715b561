"""`wattops console`: the live fleet view an on-call engineer opens over ssh.

The screen reads the fleet state on its own timer; the agents' event streams run as tasks on
the same loop and control calls run in workers, so nothing the network does can freeze it.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import httpx
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import Hit, Hits, Provider
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.widgets import Footer, Header, Input, OptionList, Static

from wattops.agents.api import PRECISIONS, DeploymentStatus
from wattops.console import rows as fmt
from wattops.console.client import AgentClient, AgentError
from wattops.console.fleet import AgentLink, FleetState
from wattops.console.recommend import precision_advice
from wattops.console.rollout import Action, judge
from wattops.console.rows import FleetRow, kube_key, kube_rows, rows_for
from wattops.console.screens.modals import ConfirmModal, DetailModal, PrecisionModal, ScaleModal
from wattops.console.screens.node import NodeScreen
from wattops.console.widgets.alerts_panel import AlertsPanel, PanelItem
from wattops.console.widgets.fleet_table import SORTABLE, FleetTable

#: Screens under which the fleet view does not redraw.
_MODALS = (PrecisionModal, ScaleModal, ConfirmModal, DetailModal)
#: Control actions: hidden and refused in read-only mode.
CONTROL_ACTIONS = frozenset({"precision", "scale_up", "scale_down", "scale_to", "park"})
#: Seconds between reads of the Kubernetes Deployments (`--kube`).
KUBE_POLL_S = 2.0
#: The most replicas the scale modal offers for a Kubernetes Deployment (more: the CLI).
KUBE_SCALE_MAX = 100
#: How long the console follows a Kubernetes rollout before saying it is still going.
KUBE_ROLLOUT_TIMEOUT_S = 900.0

if TYPE_CHECKING:
    from wattops.console.kube import KubeDeployment, KubeFleet, Rollout


@dataclass
class Pending:
    """A control action sent and not finished yet."""

    action: Action
    target: str | int
    node: str
    #: When the agent answered 202 (monotonic); None while the call is on its way. Only
    #: snapshots that arrive after it can show the action's outcome.
    accepted_at: float | None = None
    #: A Kubernetes rollout's latest state, as `kubectl rollout status` words it.
    progress: str = ""


class ActionCommands(Provider):
    """The command palette's entries for the selected deployment's actions."""

    async def search(self, query: str) -> Hits:
        app = self.app
        assert isinstance(app, WattopsConsole)
        matcher = self.matcher(query)
        commands = [
            ("Fleet: sort by next column", app.action_sort, "Cycle the sort column"),
            ("Fleet: filter rows", app.action_filter, "Filter by node, deployment..."),
        ]
        if not app.read_only:
            commands += [
                ("Deployment: switch precision", app.action_precision, "Pick a precision"),
                ("Deployment: scale up by one", app.action_scale_up, "One more replica"),
                ("Deployment: scale down by one", app.action_scale_down, "One replica fewer"),
                ("Deployment: scale to a number", app.action_scale_to, "Choose the count"),
                ("Deployment: park (scale to zero)", app.action_park, "Stop all replicas"),
            ]
        for name, callback, help_text in commands:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)


class WattopsConsole(App[None]):
    """The fleet view, the node view and the control actions."""

    TITLE = "wattops"
    CSS_PATH = "console.tcss"
    COMMANDS = App.COMMANDS | {ActionCommands}
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
            "a",
            "alerts",
            "Alerts",
            id="fleet.alerts",
            tooltip="Move to the alerts and recommendations",
        ),
        Binding(
            "question_mark", "help", "Help", key_display="?", id="app.help", tooltip="Show the keys"
        ),
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Leave the console"),
    ]

    def __init__(
        self,
        urls: Iterable[str],
        token: str | None = None,
        read_only: bool = False,
        prometheus: str | None = None,
        refresh_s: float = 1.0,
        connect: bool = True,
        kube: KubeFleet | None = None,
    ) -> None:
        super().__init__()
        #: `--kube`: the API server, for the engine Deployments and for acting on them.
        self.kube = kube
        self.kube_deployments: list[KubeDeployment] = []
        self.kube_error: str | None = None
        #: False: do not open the agents' streams (snapshot tests fill the fleet themselves).
        self.connect = connect
        self.fleet = FleetState(urls)
        self.token = token
        self.read_only = read_only
        self.prometheus = prometheus
        self.refresh_s = refresh_s
        self.pending: dict[str, Pending] = {}
        self.filter_text = ""
        self.sort_key: str | None = None
        self.sort_reverse = False
        self.last_rows: list[FleetRow] = []
        self._labels: dict[str, str] = {}
        self._order_state: tuple[str, str | None, bool] = ("", None, False)
        self._panel_cache: dict[str, tuple[tuple[object, ...], list[PanelItem]]] = {}
        self._control_http: httpx.AsyncClient | None = None

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
        # Hundreds of snapshots a second make many short-lived objects; the default GC
        # thresholds then run full collections often enough to stall key presses for a few
        # hundred ms (docs/benchmarks.md). Collect less often, and never walk what startup
        # built.
        gc.set_threshold(50_000, 50, 100)
        gc.freeze()
        self.sub_title = ("read-only: " if self.read_only else "") + (
            f"{len(self.fleet.links)} agent(s)" + (" + Kubernetes API" if self.kube else "")
        )
        self.query_one("#filter", Input).display = False
        self.fleet.on_change = self._link_changed
        if self.connect:
            self.fleet.start()
        # One pool for control calls: a new connection per key press costs tens of ms.
        self._control_http = httpx.AsyncClient(timeout=10.0)
        if self.kube is not None:
            self._poll_kube()
            self.set_interval(KUBE_POLL_S, self._poll_kube)
        self.refresh_fleet()
        self.set_interval(self.refresh_s, self.refresh_fleet)
        self.query_one(FleetTable).focus()

    @work(thread=True, group="kube-poll", exclusive=True, exit_on_error=False)
    def _poll_kube(self) -> None:
        from wattops.console.kube import KubeError

        assert self.kube is not None
        try:
            found = self.kube.deployments()
        except KubeError as exc:
            self.call_from_thread(self._kube_listed, None, str(exc))
            return
        self.call_from_thread(self._kube_listed, found, None)

    def _kube_listed(self, found: list[KubeDeployment] | None, error: str | None) -> None:
        if found is not None:
            self.kube_deployments = found
        self.kube_error = error

    async def on_unmount(self) -> None:
        await self.fleet.stop()
        if self._control_http is not None:
            await self._control_http.aclose()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only: the actions are neither shown nor run, and no control call is made.
        return not (self.read_only and action in CONTROL_ACTIONS)

    # -- refresh ---------------------------------------------------------------------------

    def _link_changed(self, link: AgentLink) -> None:
        # An operator waiting on an action sees its effect at once, not at the next redraw:
        # that node's rows are redrawn on their own, without a pass over the whole fleet.
        if any(k.startswith(link.url + "|") for k in self.pending):
            self.call_next(self._refresh_link, link)

    def _refresh_link(self, link: AgentLink) -> None:
        if not self.screen_stack or isinstance(self.screen, _MODALS):
            return
        try:
            table = self.screen_stack[0].query_one(FleetTable)
        except NoMatches:
            return
        self._judge_pending()
        rows = rows_for(link.url, link.snapshot, link.link(time.monotonic()))
        labels = {k: f"{p.action}→{p.target}…" for k, p in self.pending.items()}
        series = {
            f"{link.url}|{name}": (link.watts[name], link.tokens[name]) for name in link.watts
        }
        table.update_rows(rows, series, labels)
        self.last_rows = [next((r for r in rows if r.key == old.key), old)
                          for old in self.last_rows]  # fmt: skip

    def refresh_fleet(self) -> None:
        """Redraw from the fleet state: totals, table, alerts; judge pending actions."""
        if not self.screen_stack:
            return  # shutting down: a stream delivered one more event
        if isinstance(self.screen, _MODALS):
            return  # do not redraw under a modal (and keep the selection stable)
        try:
            table = self.screen_stack[0].query_one(FleetTable)
        except NoMatches:
            return  # starting up or shutting down
        rows, changed = self.fleet.rows()
        if self.kube is not None:
            # A handful of rows, redrawn every time: their counts come from another source.
            deployments = kube_rows(self.kube_deployments, rows)
            changed.update(r.key for r in deployments)
            rows = deployments + rows
        self._judge_pending()
        labels = {k: f"{p.action}→{p.target}… {p.progress}".rstrip()
                  for k, p in self.pending.items()}  # fmt: skip
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
        series = {}
        for key in changed:
            url, _, name = key.partition("|")
            link = self.fleet.links.get(url)
            if link is not None and name in link.watts:
                series[key] = (link.watts[name], link.tokens[name])
        with self.batch_update():
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

    def _judge_pending(self) -> None:
        for key, pending in list(self.pending.items()):
            found = self.fleet.find(key)
            dep = _deployment(found[0], found[1]) if found else None
            if dep is None or found is None:
                continue
            if pending.accepted_at is None or found[0].last_event <= pending.accepted_at:
                continue  # no snapshot yet that knows about the action
            outcome = judge(dep, pending.action, pending.target)
            if outcome.done is None:
                continue
            del self.pending[key]
            if outcome.done:
                self.notify(f"{pending.node}: {outcome.message}", title="done")
            else:
                self.notify(
                    f"{pending.node}: {outcome.message}",
                    title="failed",
                    severity="error",
                    timeout=15,
                )

    # -- selection -------------------------------------------------------------------------

    def selected(self) -> tuple[AgentLink, DeploymentStatus] | None:
        """The link and deployment under the cursor, or None (with a notice)."""
        key = self.query_one(FleetTable).selected_key()
        found = self.fleet.find(key) if key else None
        dep = _deployment(found[0], found[1]) if found else None
        if found is None or dep is None:
            self.notify("select a deployment row first", severity="warning")
            return None
        if not found[0].connected:
            self.notify(f"{found[0].url} is offline", severity="warning")
            return None
        return found[0], dep

    # -- actions ---------------------------------------------------------------------------

    def action_precision(self) -> None:
        """Pick a precision, confirm, send."""
        managed, view = self._kube_selected()
        if managed:
            if view is not None:
                self._kube_precision(view)
            return
        chosen = self.selected()
        if chosen is None:
            return
        link, dep = chosen
        node = link.node

        def picked(precision: str | None) -> None:
            if precision is None or precision == dep.precision:
                return
            question = (
                f"Switch {dep.name} on {node} from {dep.precision} to {precision}?\n"
                f"New replicas start first; traffic moves when they are healthy."
            )
            self.push_screen(
                ConfirmModal(question),
                partial(self._confirmed, link, dep.name, "precision", precision),
            )

        self.push_screen(
            PrecisionModal(dep.name, node, dep.precision, dep.available_precisions), picked
        )

    def action_scale_up(self) -> None:
        """One more replica."""
        managed, view = self._kube_selected()
        if managed:
            if view is not None:
                self._kube_send(view, "scale", view.desired + 1)
            return
        chosen = self.selected()
        if chosen:
            link, dep = chosen
            if dep.desired_replicas >= dep.max_replicas:
                self.notify(
                    f"{dep.name} is at max_replicas ({dep.max_replicas})", severity="warning"
                )
                return
            self.send(link, dep.name, "scale", dep.desired_replicas + 1)

    def action_scale_down(self) -> None:
        """One replica fewer (to zero asks to confirm, as parking does)."""
        managed, view = self._kube_selected()
        if managed:
            if view is not None and view.desired > 0:
                if view.desired == 1:
                    self._kube_ask_park(view)
                else:
                    self._kube_send(view, "scale", view.desired - 1)
            return
        chosen = self.selected()
        if chosen:
            link, dep = chosen
            if dep.desired_replicas == 0:
                return
            if dep.desired_replicas == 1:
                self.action_park()
                return
            self.send(link, dep.name, "scale", dep.desired_replicas - 1)

    def action_scale_to(self) -> None:
        """Scale to a number chosen in a modal."""
        managed, view = self._kube_selected()
        if managed:
            if view is not None:
                self._kube_scale_to(view)
            return
        chosen = self.selected()
        if chosen is None:
            return
        link, dep = chosen
        node = link.node

        def picked(replicas: int | None) -> None:
            if replicas is None or replicas == dep.desired_replicas:
                return
            if replicas == 0:
                self._ask_park(link, dep, node)
            else:
                self.send(link, dep.name, "scale", replicas)

        self.push_screen(ScaleModal(dep.name, node, dep.desired_replicas, dep.max_replicas), picked)

    def action_park(self) -> None:
        """Scale to zero, after confirmation."""
        managed, view = self._kube_selected()
        if managed:
            if view is not None:
                self._kube_ask_park(view)
            return
        chosen = self.selected()
        if chosen:
            link, dep = chosen
            self._ask_park(link, dep, link.node)

    def _ask_park(self, link: AgentLink, dep: DeploymentStatus, node: str) -> None:
        question = (
            f"Park {dep.name} on {node}? Its {dep.desired_replicas} replica(s) stop; the "
            "next request waits for a cold start."
        )
        self.push_screen(
            ConfirmModal(question), partial(self._confirmed, link, dep.name, "scale", 0)
        )

    def _confirmed(
        self, link: AgentLink, deployment: str, action: Action, target: str | int, yes: bool | None
    ) -> None:
        if yes:
            self.send(link, deployment, action, target)

    def send(self, link: AgentLink, deployment: str, action: Action, target: str | int) -> None:
        """Send one control call in the background; progress then comes from the stream."""
        if self.read_only:  # belt and braces: check_action already hides these
            self.notify("read-only console: no action is sent", severity="warning")
            return
        node = link.node
        self.pending[f"{link.url}|{deployment}"] = Pending(action, target, node)
        self._send(link.url, deployment, action, target, node)

    @work(group="control", exit_on_error=False)
    async def _send(
        self, url: str, deployment: str, action: Action, target: str | int, node: str
    ) -> None:
        try:
            async with AgentClient(url, token=self.token, http=self._control_http) as client:
                await client.act(deployment, action, target)
        except AgentError as exc:
            self.pending.pop(f"{url}|{deployment}", None)
            allowed = f" (allowed: {', '.join(exc.allowed)})" if exc.allowed else ""
            self.notify(
                f"{node} refused {action} {deployment}: {exc.message}{allowed}",
                title="refused",
                severity="error",
                timeout=15,
            )
            return
        pending = self.pending.get(f"{url}|{deployment}")
        if pending is not None:
            pending.accepted_at = time.monotonic()
        self.notify(f"{node}: {action} {deployment} → {target} accepted", title="sent")

    # -- actions on Kubernetes Deployments (through the API server) ------------------------

    def _kube_selected(self) -> tuple[bool, KubeDeployment | None]:
        """(True, its Deployment) when the row under the cursor is Kubernetes-managed (the
        Deployment's own row, or an agent's row of its pods); (True, None) when it is but
        cannot be acted on (the operator is told why); (False, None) for the agent's own."""
        key = self.query_one(FleetTable).selected_key()
        row = next((r for r in self.last_rows if r.key == key), None) if key else None
        if row is None or row.namespace is None:
            return False, None
        if self.kube is None:
            self.notify(
                f"{row.deployment} is the Kubernetes Deployment {row.namespace}/{row.deployment}:"
                " open the console with --kube to scale it or change its precision",
                severity="warning",
            )
            return True, None
        wanted = (row.namespace, row.deployment)
        view = next((d for d in self.kube_deployments if (d.namespace, d.name) == wanted), None)
        if view is None:
            self.notify(
                f"{row.namespace}/{row.deployment} is not among the Deployments the API server "
                "lists for you", severity="warning",
            )  # fmt: skip
        return True, view

    def _kube_precision(self, view: KubeDeployment) -> None:
        current = view.precision or "unknown"
        where = f"k8s/{view.namespace}"

        def picked(precision: str | None) -> None:
            if precision is None or precision == current:
                return
            question = (
                f"Roll {view.namespace}/{view.name} from {current} to {precision}?\n"
                "New pods start first (maxUnavailable 0); old ones stop once new ones are Ready."
            )
            self.push_screen(
                ConfirmModal(question), partial(self._kube_confirmed, view, "precision", precision)
            )

        self.push_screen(PrecisionModal(view.name, where, current, list(PRECISIONS)), picked)

    def _kube_scale_to(self, view: KubeDeployment) -> None:
        def picked(replicas: int | None) -> None:
            if replicas is None or replicas == view.desired:
                return
            if replicas == 0:
                self._kube_ask_park(view)
            else:
                self._kube_send(view, "scale", replicas)

        where = f"k8s/{view.namespace}"
        self.push_screen(ScaleModal(view.name, where, view.desired, KUBE_SCALE_MAX), picked)

    def _kube_ask_park(self, view: KubeDeployment) -> None:
        question = (
            f"Scale {view.namespace}/{view.name} to 0? Its {view.desired} pod(s) stop, and "
            "nothing wakes a Kubernetes Deployment on request: it serves again when scaled up."
        )
        self.push_screen(ConfirmModal(question), partial(self._kube_confirmed, view, "scale", 0))

    def _kube_confirmed(
        self, view: KubeDeployment, action: Action, target: str | int, yes: bool | None
    ) -> None:
        if yes:
            self._kube_send(view, action, target)

    def _kube_send(self, view: KubeDeployment, action: Action, target: str | int) -> None:
        if self.read_only:
            self.notify("read-only console: no action is sent", severity="warning")
            return
        key = kube_key(view.namespace, view.name)
        if key in self.pending:
            self.notify(f"{view.name}: a change is still rolling out", severity="warning")
            return
        self.pending[key] = Pending(action, target, f"k8s/{view.namespace}", time.monotonic())
        self._kube_act(view, action, target)

    @work(thread=True, group="kube-act", exit_on_error=False)
    def _kube_act(self, view: KubeDeployment, action: Action, target: str | int) -> None:
        """Write through the API server, then follow the rollout as `kubectl rollout status`."""
        from wattops.console.kube import KubeError

        assert self.kube is not None
        key = kube_key(view.namespace, view.name)
        name, where = view.name, f"{view.namespace}/{view.name}"
        try:
            if action == "scale":
                self.kube.scale(name, int(target), view.namespace)
            else:
                self.kube.set_precision(name, str(target), view.namespace)
            self.call_from_thread(self.notify, f"{where}: {action} → {target} accepted",
                                  title="sent")  # fmt: skip
            last: Rollout | None = None
            for last in self.kube.follow(name, KUBE_ROLLOUT_TIMEOUT_S, namespace=view.namespace):
                self.call_from_thread(self._kube_progress, key, last)
        except KubeError as exc:
            self.call_from_thread(self._kube_finished, key, "failed", f"{where}: {exc}")
            return
        if last is None or last.state == "progressing":
            message = last.message if last else "no news"
            self.call_from_thread(
                self._kube_finished, key, "progressing",
                f"{where}: still rolling out after {KUBE_ROLLOUT_TIMEOUT_S:.0f} s: {message}",
            )  # fmt: skip
        elif last.state == "failed":
            undo = (f"; `kubectl -n {view.namespace} rollout undo deployment/{name}` goes back"
                    if action == "precision" else "")  # fmt: skip
            self.call_from_thread(self._kube_finished, key, "failed",
                                  f"{where}: {last.message}{undo}")  # fmt: skip
        else:
            self.call_from_thread(self._kube_finished, key, "complete",
                                  f"{where}: {last.message}")  # fmt: skip

    def _kube_progress(self, key: str, rollout: Rollout) -> None:
        pending = self.pending.get(key)
        if pending is not None:
            pending.progress = rollout.message
        self.kube_deployments = [
            rollout.deployment if (d.namespace, d.name) == (
                rollout.deployment.namespace, rollout.deployment.name) else d
            for d in self.kube_deployments
        ]  # fmt: skip

    def _kube_finished(self, key: str, state: str, message: str) -> None:
        self.pending.pop(key, None)
        if state == "complete":
            self.notify(message, title="done")
        elif state == "failed":
            self.notify(message, title="failed", severity="error", timeout=30)
        else:
            self.notify(message, title="still rolling out", severity="warning", timeout=30)

    def action_node_view(self) -> None:
        """Open the node view of the selected row's node."""
        key = self.query_one(FleetTable).selected_key()
        if key is None:
            return
        link = self.fleet.links.get(key.partition("|")[0])
        if link is not None:
            self.push_screen(NodeScreen(link, self.prometheus))

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
            self.push_screen(DetailModal(item.text, item.detail))

    def action_help(self) -> None:
        """Show the keys."""
        lines = [
            f"{b.key_display or b.key:>6}  {b.description}: {b.tooltip}"
            for b in self.BINDINGS
            if isinstance(b, Binding) and not (self.read_only and b.action in CONTROL_ACTIONS)
        ]
        lines.append("\nctrl+p opens the command palette with the same actions.")
        if self.read_only:
            lines.append("Read-only: no action can be sent from this console.")
        self.push_screen(DetailModal("Keys", "\n".join(lines)))


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


def _deployment(link: AgentLink, name: str) -> DeploymentStatus | None:
    if link.snapshot is None:
        return None
    return next((d for d in link.snapshot.deployments if d.name == name), None)


def make_app(
    urls: Iterable[str],
    token: str | None = None,
    read_only: bool = False,
    prometheus: str | None = None,
    refresh_s: float = 1.0,
    connect: bool = True,
    kube: KubeFleet | None = None,
) -> WattopsConsole:
    """The console app; tests and the demo build it the same way the CLI does."""
    return WattopsConsole(
        urls,
        token=token,
        read_only=read_only,
        prometheus=prometheus,
        refresh_s=refresh_s,
        connect=connect,
        kube=kube,
    )
