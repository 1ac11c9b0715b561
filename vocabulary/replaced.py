"""Settings that were replaced: refused by name, saying what took their place.

A config file or an API body that still uses an old key is refused with the new key's name,
not silently ignored and not answered with pydantic's bare "extra inputs are not permitted".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["refuse_replaced"]


def refuse_replaced(data: Any, replaced: Mapping[str, str]) -> Any:
    """`data` unchanged; ValueError with the message of the first replaced key it holds (for a
    pydantic `model_validator(mode="before")`)."""
    if isinstance(data, dict):
        for key, message in replaced.items():
            if key in data:
                raise ValueError(message)
    return data
