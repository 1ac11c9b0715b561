"""Engine adapters by name: the `wattops.engines` entry-point group.

The built-in ones (llamacpp, openai) are declared in pyproject.toml like any third-party
engine; `register_engine` adds one at run time.
"""

from __future__ import annotations

from wattops.engines.base import EngineAdapter
from wattops.vocabulary.plugins import Registry

ENGINES: Registry[type[EngineAdapter]] = Registry("wattops.engines", "engine")


def register_engine(cls: type[EngineAdapter]) -> type[EngineAdapter]:
    """Make `cls` available as `engine = "<cls.kind>"` (usable as a class decorator)."""
    return ENGINES.register(cls.kind, cls)


def engine_type(kind: str) -> type[EngineAdapter]:
    """The adapter class for `engine = kind`; UnknownPlugin listing the known ones otherwise."""
    return ENGINES.get(kind)
