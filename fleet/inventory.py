"""The fleet inventory: which agents the console and the CLI talk to (`--inventory fleet.toml`).

```toml
[[agents]]
url = "http://gpu-a1.internal:8080"
[[agents]]
url = "http://jetson-7.internal:8080"
```
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wattops.fleet.client import agent_url


class InventoryError(Exception):
    """The inventory file is invalid; the message names the file and the field."""


class AgentEntry(BaseModel):
    """One agent in the fleet."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(description="base URL of the agent's HTTP API")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        return agent_url(value)


class Inventory(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid")

    agents: list[AgentEntry] = Field(min_length=1)


def load_inventory(path: Path) -> list[str]:
    """The agents' URLs from `path`."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read the inventory: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InventoryError(f"{path}: not valid TOML: {exc}") from None
    try:
        inventory = Inventory.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise InventoryError(f"{path}: {problems}") from None
    return [a.url for a in inventory.agents]
