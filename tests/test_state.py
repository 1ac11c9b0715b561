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
