"""The console driven by its keys (Textual's Pilot) against real agents serving the test model."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot

from tests.conftest import TOKEN, Agent
from wattops.console.app import WattopsConsole, make_app
from wattops.console.screens.modals import ConfirmModal, PrecisionModal, ScaleModal
from wattops.fleet.rows import FleetRow, Link

SIZE = (200, 40)


async def until(pilot: Pilot[Any], predicate: Callable[[], Any], within: float = 60.0,
                what: str = "condition") -> Any:  # fmt: skip
    """Let the app run until `predicate()` holds (the console redraws on its own timer)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await pilot.pause(0.1)
    raise AssertionError(f"timed out after {within}s waiting for {what}")


def row(app: WattopsConsole, deployment: str = "tiny", node: str | None = None) -> FleetRow:
    return next(r for r in app.fleet_screen.last_rows
                if r.deployment == deployment and (node is None or r.node == node))  # fmt: skip


def serving(app: WattopsConsole) -> bool:
    return any(r.deployment == "tiny" and r.state == "serving" for r in app.fleet_screen.last_rows)


async def test_scale_keys_scale_the_real_deployment(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(token=TOKEN)
    app = make_app([agent.url], token=TOKEN, refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: serving(app), 30, "the first snapshot")
        await pilot.press("plus")
        await until(pilot, lambda: (r := row(app)).ready == 2 and r.desired == 2
                    and r.state == "serving", 90, "two ready replicas")  # fmt: skip
        assert agent.deployment()["ready_replicas"] == 2
        await pilot.press("minus")
        await until(pilot, lambda: (r := row(app)).desired == 1 and r.state == "serving", 60,
                    "back to one replica")  # fmt: skip
        # `s` opens a modal prefilled with the current count.
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, ScaleModal), 5, "the scale modal")
        field = app.screen.query_one("#replicas")
        assert field.value == "1"  # type: ignore[attr-defined]
        field.value = ""  # type: ignore[attr-defined]
        await pilot.press("9", "enter")  # over max_replicas (3): refused in the modal
        assert isinstance(app.screen, ScaleModal)
        assert "0..3" in str(app.screen.query_one("#problem").render())
        field.value = ""  # type: ignore[attr-defined]
        await pilot.press("3", "enter")
        await until(pilot, lambda: (r := row(app)).ready == 3 and r.state == "serving", 120,
                    "three replicas")  # fmt: skip
        # Park asks first; "n" changes nothing, "y" parks.
        await pilot.press("z")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the confirmation")
        await pilot.press("n")
        await pilot.pause(0.5)
        assert agent.deployment()["desired_replicas"] == 3
        await pilot.press("z")
        await until(pilot, lambda: isinstance(app.screen, ConfirmModal), 5, "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: row(app).state == "parked", 60, "the parked state")
        assert agent.deployment()["replicas"] == []


async def test_precision_switch_with_confirmation(agent: Agent) -> None:
    app = make_app([agent.url], refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: serving(app), 30, "the first snapshot")
        await pilot.press("p")
        modal = await until(pilot, lambda: isinstance(app.screen, PrecisionModal) and app.screen,
                            5, "the precision modal")  # fmt: skip
        options = modal.query_one("#precisions")
        labels = [str(options.get_option_at_index(i).prompt)
                  for i in range(options.option_count)]  # fmt: skip
        assert "q8_0  ← current" in labels
        # Move from the current (q8_0) to q4_0 and choose it.
        target = labels.index("q4_0")
        await pilot.press(*["down"] * (target - labels.index("q8_0  ← current")), "enter")
        confirm = await until(pilot, lambda: isinstance(app.screen, ConfirmModal) and app.screen,
                              5, "the confirmation")  # fmt: skip
        assert "q8_0 to q4_0" in str(confirm.query_one(".title").render())
        await pilot.press("y")
        await until(pilot, lambda: row(app).precision == "q4_0" and row(app).state == "serving",
                    120, "the switch to finish")  # fmt: skip
        dep = agent.deployment()
        assert (dep["precision"], dep["desired_precision"]) == ("q4_0", "q4_0")


async def test_read_only_console_offers_and_sends_nothing(agent: Agent) -> None:
    app = make_app([agent.url], read_only=True, refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: serving(app), 30, "the first snapshot")
        offered = {b.binding.action for b in app.active_bindings.values()
                   if b.enabled and b.binding.show}  # fmt: skip
        assert offered.isdisjoint({"precision", "scale_up", "scale_down", "scale_to", "park"})
        assert "quit" in offered
        await pilot.press("plus", "p", "z", "s")
        await pilot.pause(1.0)
        assert isinstance(app.screen, type(app.get_default_screen()))  # no modal opened
        assert agent.deployment()["desired_replicas"] == 1
        assert app.fleet_screen.pending == {}


async def test_killed_agent_is_shown_offline_while_others_keep_updating(
    make_agent: Callable[..., Agent],
) -> None:
    first = make_agent()
    second = make_agent()
    app = make_app([first.url, second.url], refresh_s=0.1)
    async with app.run_test(size=SIZE) as pilot:
        rows = app.fleet_screen
        await until(pilot, lambda: len([r for r in rows.last_rows if r.state == "serving"]) == 2,
                    30, "both nodes")  # fmt: skip
        second.stop(signal.SIGKILL)
        await until(pilot, lambda: any(r.link is Link.OFFLINE and r.url == second.url
                                       for r in rows.last_rows), 30, "the offline")  # fmt: skip
        link = app.fleet.links[first.url]
        version = link.version
        await until(pilot, lambda: link.version > version + 2, 15, "more events from the other")
        assert row(app, node="test-node-0").link is Link.LIVE
        assert app.fleet.links[second.url].error
        # The screen keeps answering keys while one agent is gone.
        await pilot.press("o")
        await asyncio.sleep(0)
        assert app.fleet_screen.sort_key == "node"


async def test_a_refused_connection_is_not_called_a_closed_stream() -> None:
    from tests.conftest import free_port
    from wattops.fleet.state import FleetState

    url = f"http://127.0.0.1:{free_port()}"
    fleet = FleetState([url])
    fleet.start()
    try:
        link = fleet.links[url]
        for _ in range(300):  # named at once, not after the SSE library's own retries
            if link.error:
                break
            await asyncio.sleep(0.1)
        assert link.error is not None and "cannot connect" in link.error
        assert "closed the stream" not in link.error
    finally:
        await fleet.stop()
