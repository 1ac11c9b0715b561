"""`wattops console`: the live fleet view an on-call engineer opens over ssh.

The app owns the fleet state (one event stream per agent, from wattops.fleet) and shows it in
the `FleetScreen`; the node view and the modals are screens of their own.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable

from textual.app import App
from textual.binding import Binding

from wattops.console.screens.fleet import ActionCommands, FleetScreen
from wattops.console.screens.routes import RoutesScreen
from wattops.fleet.kube import KubeFleet
from wattops.fleet.state import FleetState
from wattops.router.client import RouterClient


class WattopsConsole(App[None]):
    """The fleet view, the node view and the control actions."""

    TITLE = "wattops"
    CSS_PATH = "console.tcss"
    COMMANDS = App.COMMANDS | {ActionCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit", tooltip="Leave the console"),
        Binding(
            "r",
            "routes",
            "Routes",
            id="app.routes",
            tooltip="The router's routes: split, savings, policy keys (--router URL)",
        ),
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
        router: str | None = None,
    ) -> None:
        super().__init__()
        self.router = RouterClient(router, token) if router else None
        self.fleet = FleetState(urls, token=token)
        #: False: do not open the agents' streams (snapshot tests fill the fleet themselves).
        self.connect = connect
        self.read_only = read_only
        self.refresh_s = refresh_s
        self.kube = kube
        self.fleet_screen = FleetScreen(
            self.fleet,
            kube=kube,
            token=token,
            read_only=read_only,
            prometheus=prometheus,
            refresh_s=refresh_s,
        )

    def get_default_screen(self) -> FleetScreen:
        return self.fleet_screen

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
        if self.connect:
            self.fleet.start()

    async def on_unmount(self) -> None:
        await self.fleet.stop()
        if self.router is not None:
            await self.router.close()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # `r` is offered (and shown in the footer) only with a router to show.
        return not (action == "routes" and self.router is None)

    def action_routes(self) -> None:
        """The routes view of the router given with --router."""
        if self.router is None:
            return
        if not isinstance(self.screen, RoutesScreen):
            self.push_screen(RoutesScreen(self.router, self.read_only, self.refresh_s))


def make_app(
    urls: Iterable[str],
    token: str | None = None,
    read_only: bool = False,
    prometheus: str | None = None,
    refresh_s: float = 1.0,
    connect: bool = True,
    kube: KubeFleet | None = None,
    router: str | None = None,
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
        router=router,
    )
