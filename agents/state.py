"""The agent's durable state: desired precision and replicas per deployment, and counters.

Written atomically (temporary file, fsync, rename, fsync of the folder) so a crash at any
moment, kill -9 included, leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, ValidationError

from wattops.agents.api import DeploymentCounters, Totals
from wattops.vocabulary import atomic_write


class DesiredState(BaseModel):
    """What the operator asked a deployment to be."""

    precision: str
    replicas: int


class StoredDeployment(BaseModel):
    """Everything kept across restarts for one deployment."""

    desired: DesiredState
    counters: DeploymentCounters = DeploymentCounters()
    #: Energy, cost and carbon; state files written before the fleet core call it `energy`.
    totals: Totals = Field(Totals(), validation_alias=AliasChoices("totals", "energy"))
    #: The share of the node it held when saved: what it goes on paying for while the agent
    #: is down (a rented node keeps billing).
    share: float = 0.0


class Meter(BaseModel):
    """The power sensor's hardware counters when the state was saved: what lets a restarted
    agent measure the energy used while it was down (NVML and RAPL counters keep counting
    across an agent restart, not across a reboot)."""

    source: str
    #: The host's boot id (/proc/sys/kernel/random/boot_id): a different one means a reboot.
    boot_id: str
    #: Per device: (joules on its counter, joules after which it wraps, or None).
    counters: dict[str, tuple[float, float | None]]


class AgentState(BaseModel):
    """The whole state file."""

    deployments: dict[str, StoredDeployment] = {}
    #: The node's energy, cost and carbon totals.
    node: Totals = Totals()
    #: Unix time of the save: the start of any downtime that follows.
    saved_at: float | None = None
    meter: Meter | None = None


class StateStore:
    """Loads and saves `<state_dir>/state.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"

    def load(self) -> AgentState:
        """The saved state; empty if there is none. A corrupt file is kept aside, not lost."""
        try:
            raw: Any = json.loads(self.path.read_bytes())
            return AgentState.model_validate(raw)
        except FileNotFoundError:
            return AgentState()
        except (ValueError, ValidationError):
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            return AgentState()

    def save(self, state: AgentState) -> None:
        """Write the state atomically."""
        atomic_write(self.path, state.model_dump_json(indent=2).encode())
