"""Named extension points: engine adapters and power sensors found by name.

Each kind has an entry-point group (`wattops.engines`, `wattops.sensors`), as Harlequin has
`harlequin.adapter`: a package adds an engine or a sensor by declaring one entry point, and
wattops never lists them by hand. `register()` adds one at run time (tests, embedding).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownPlugin(KeyError):
    """No plugin of that name; the message lists the ones there are."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """The plugins of one entry-point group, by name. Entry points are read once, on first
    use; one that fails to import is reported when it is asked for, not before."""

    def __init__(self, group: str, what: str) -> None:
        self.group = group
        #: What a plugin is, for messages: "engine", "sensor".
        self.what = what
        self._found: dict[str, T] = {}
        self._broken: dict[str, str] = {}
        self._loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._found:
                continue  # registered at run time first: that one wins
            try:
                self._found[ep.name] = ep.load()
            except Exception as exc:  # a broken third-party plugin must not stop the others
                self._broken[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"

    def register(self, name: str, plugin: T) -> T:
        """Add (or replace) the plugin called `name`."""
        self._found[name] = plugin
        self._broken.pop(name, None)
        return plugin

    def names(self) -> list[str]:
        """Every usable plugin's name, sorted."""
        self._load()
        return sorted(self._found)

    def get(self, name: str) -> T:
        """The plugin called `name`; UnknownPlugin naming the ones there are otherwise."""
        self._load()
        if name in self._found:
            return self._found[name]
        if name in self._broken:
            raise UnknownPlugin(f"{self.what} {name!r} failed to load ({self._broken[name]})")
        raise UnknownPlugin(
            f"unknown {self.what} {name!r}; allowed: {', '.join(self.names()) or 'none'} "
            f"(more can be installed: entry-point group {self.group!r})"
        )
