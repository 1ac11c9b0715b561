"""The words every wattops layer shares: precisions, power sources, Kubernetes names.

This package imports nothing of wattops and nothing outside the standard library, so the
engines, the agent, the fleet core, the router and the console may all import it (an
import-linter contract in pyproject.toml keeps it that way).
"""

from wattops.vocabulary.files import atomic_write, cache_dir
from wattops.vocabulary.kubernetes import (
    AGENT_SELECTOR,
    PART_OF_SELECTOR,
    PRECISION_ENV,
    STUCK_REASONS,
    UNKNOWN_PRECISION,
    kubeconfig_path,
)
from wattops.vocabulary.power import BUILTIN_SOURCES, ESTIMATE, PowerSource
from wattops.vocabulary.precisions import BASE_PRECISIONS, PRECISIONS

__all__ = [
    "AGENT_SELECTOR",
    "BASE_PRECISIONS",
    "BUILTIN_SOURCES",
    "ESTIMATE",
    "PART_OF_SELECTOR",
    "PRECISIONS",
    "PRECISION_ENV",
    "STUCK_REASONS",
    "UNKNOWN_PRECISION",
    "PowerSource",
    "atomic_write",
    "cache_dir",
    "kubeconfig_path",
]
