"""The agent's durable state: desired precision and replicas per deployment, and counters.

`state.json` is written atomically (temporary file, fsync, rename, fsync of the folder) so a
crash at any moment, kill -9 included, leaves either the old file or the new one, never a torn
one. It is saved once a second and on every change of desired state.

Between two saves the counters go to `counters.journal`: after any change, before the event
loop does anything else (and before any snapshot or scrape can show the new values), the
changed deployments' counters and totals are appended as one JSON line with a single write()
on an O_APPEND descriptor. A killed process loses nothing that reached the kernel, so after
kill -9 a restarted agent replays the lines newer than the state file and every counter
continues from at least the last value anyone saw: they never fall. The journal is not
fsynced (a power cut can lose up to the last second, as before); each save of the state file
empties it. A torn last line (the kill landed inside a write) is skipped.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, ValidationError

from wattops.agents.api import DeploymentCounters, Totals
from wattops.vocabulary import atomic_write

log = logging.getLogger("wattops.agent")


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
    #: Predictive scaling's learned profile (agents/forecast.py), kept across restarts.
    forecast: dict[str, Any] | None = None


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
    #: The last journal line this file already contains (lines up to it are not replayed).
    journal_seq: int = 0


class JournalCounters(BaseModel):
    """One deployment's counters as they were at a journal line."""

    counters: DeploymentCounters
    totals: Totals


class JournalLine(BaseModel):
    """One line of `counters.journal`: the values that changed since the line before."""

    seq: int
    #: Unix time of the line.
    at: float
    deployments: dict[str, JournalCounters] = {}
    #: The node's totals, with the meter's counters read at the same moment: together they
    #: are where the downtime after a kill starts (what was drawn after them is the gap).
    node: Totals | None = None
    meter: Meter | None = None


class CounterJournal:
    """Appends counter values between state saves; replays them after a crash."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seq = 0
        self._fd: int | None = None

    def replay(self, state: AgentState) -> int:
        """Apply the lines newer than `state` to it; returns how many were applied."""
        self.seq = state.journal_seq
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        applied = 0
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                line = JournalLine.model_validate_json(raw)
            except ValidationError:
                torn = number == len(lines)  # no newline after it: the write was cut short
                log.warning(
                    "%s line %d: %s; skipped",
                    self.path,
                    number,
                    "torn (the agent was killed while writing it)" if torn else "unreadable",
                )
                continue
            if line.seq <= state.journal_seq:
                continue
            for name, values in line.deployments.items():
                stored = state.deployments.get(name)
                if stored is not None:
                    stored.counters = values.counters
                    stored.totals = values.totals
            if line.node is not None:
                state.node = line.node
                state.saved_at = line.at
                state.meter = line.meter
            self.seq = max(self.seq, line.seq)
            applied += 1
        return applied

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def append(self, line: bytes) -> None:
        """One write() of one JSON line (a JournalLine's shape, ending in a newline): the
        kernel has it when this returns."""
        assert self._fd is not None, "open() the journal first"
        os.write(self._fd, line)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def empty(self) -> None:
        """Called after a save of the state file, which holds everything the lines held."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StateStore:
    """Loads and saves `<state_dir>/state.json`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "state.json"
        self.journal = CounterJournal(state_dir / "counters.journal")

    def load(self) -> AgentState:
        """The saved state with the journal's newer lines applied; empty if there is none. A
        corrupt file is kept aside, not lost."""
        state = self._load_file()
        replayed = self.journal.replay(state)
        if replayed:
            log.warning(
                "the agent was not stopped cleanly: %d counter update(s) after the last save "
                "of %s restored from %s",
                replayed,
                self.path,
                self.journal.path,
            )
        return state

    def _load_file(self) -> AgentState:
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
