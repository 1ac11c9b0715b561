"""The agent's state file: what an older agent wrote is restored, never dropped."""

from __future__ import annotations

import json
from pathlib import Path

from wattops.agents.state import StateStore


def test_a_state_file_from_before_the_totals_rename_is_restored(tmp_path: Path) -> None:
    old = {
        "deployments": {
            "tiny": {
                "desired": {"precision": "q8_0", "replicas": 2},
                "counters": {"requests_total": 7},
                "energy": {"energy_j_total": 1234.5, "cost_usd_total": 0.25},
            }
        },
        "node": {"energy_j_total": 5000.0},
    }
    (tmp_path / "state.json").write_text(json.dumps(old))
    store = StateStore(tmp_path)
    state = store.load()
    tiny = state.deployments["tiny"]
    assert (tiny.totals.energy_j_total, tiny.totals.cost_usd_total) == (1234.5, 0.25)
    assert tiny.counters.requests_total == 7
    store.save(state)
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["deployments"]["tiny"]["totals"]["energy_j_total"] == 1234.5
    assert "energy" not in saved["deployments"]["tiny"]
    assert not (tmp_path / "state.json.corrupt").exists()


def _line(seq: int, requests: int, joules: float, node_joules: float | None = None) -> bytes:
    from wattops.agents.api import DeploymentCounters, Totals
    from wattops.agents.state import JournalCounters, JournalLine

    line = JournalLine(
        seq=seq,
        at=1000.0 + seq,
        deployments={
            "tiny": JournalCounters(
                counters=DeploymentCounters(requests_total=requests),
                totals=Totals(energy_j_total=joules),
            )
        },
        node=Totals(energy_j_total=node_joules) if node_joules is not None else None,
    )
    return line.model_dump_json().encode() + b"\n"


def test_the_counter_journal_brings_back_what_came_after_the_last_save(tmp_path: Path) -> None:
    """What a kill -9 between two saves leaves: the state file at journal line 2, lines 1-4 in
    the journal (the save and the emptying of the journal did not both happen), and half of
    line 5. Lines 3 and 4 are replayed in order, 1 and 2 are already in the file, 5 is torn."""
    state = {
        "deployments": {
            "tiny": {
                "desired": {"precision": "q8_0", "replicas": 1},
                "counters": {"requests_total": 20},
                "totals": {"energy_j_total": 200.0},
            }
        },
        "node": {"energy_j_total": 900.0},
        "saved_at": 1002.5,
        "journal_seq": 2,
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    torn = _line(5, 99, 999.0)[:40]
    lines = _line(1, 1, 1.0, 1.0) + _line(2, 2, 2.0) + _line(3, 30, 300.0, 1000.0)
    (tmp_path / "counters.journal").write_bytes(lines + _line(4, 40, 400.0) + torn)
    store = StateStore(tmp_path)
    restored = store.load()
    tiny = restored.deployments["tiny"]
    assert (tiny.counters.requests_total, tiny.totals.energy_j_total) == (40, 400.0)
    # The node's totals and the start of the downtime come from the last line that had them.
    assert (restored.node.energy_j_total, restored.saved_at) == (1000.0, 1003.0)
    assert store.journal.seq == 4  # the next line is 5 again: the torn one is not counted


def test_a_journal_older_than_the_state_file_changes_nothing(tmp_path: Path) -> None:
    state = {
        "deployments": {
            "tiny": {
                "desired": {"precision": "q8_0", "replicas": 1},
                "counters": {"requests_total": 20},
            }
        },
        "journal_seq": 7,
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    (tmp_path / "counters.journal").write_bytes(_line(6, 10, 1.0) + _line(7, 15, 2.0))
    store = StateStore(tmp_path)
    assert store.load().deployments["tiny"].counters.requests_total == 20
    assert store.journal.seq == 7
    # Appending after a save starts from an empty file.
    store.journal.open()
    store.journal.empty()
    assert (tmp_path / "counters.journal").stat().st_size == 0
    store.journal.close()
