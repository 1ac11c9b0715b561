"""A candidate's quality against its route's reference, for the route's `min_quality` (the
share of the reference's task accuracy kept) and `max_accuracy_drop` (points lost: the 95%
upper bound of the paired interval by default, as `wattops quality`'s floor judges it, or the
point estimate with the route's `accuracy_verdict = "point"`).

In order: the reference itself is 1.0; a figure declared in the route (`quality = {...}` in
router.toml) is used as given; a candidate serving the same model file as the reference reads
the `wattops quality` table of that file (task accuracy on the labelled set, and its drop
against the base on the same items),
which applies when the reference serves the base's own precision; the same model at the same
precision as the reference is 1.0. Anything else is unknown, and a route with a floor then
leaves the candidate out, saying so. The table is only read from the cache, never measured
here (that takes minutes): run `wattops quality MODEL` on the machine the router runs on.
Tables are kept per model file and read again after a minute, so precisions measured later
(or a table measured for the first time) are picked up.
"""

from __future__ import annotations

import time
from pathlib import Path

from wattops.quality import QualityTable, cached
from wattops.router.candidates import Candidate
from wattops.router.choose import QualityFigure
from wattops.router.config import RouteConfig

__all__ = ["QualityBook"]

#: How long a table read from the cache (or its absence) is trusted before reading again.
REREAD_S = 60.0


class QualityBook:
    """Quality figures of candidates against references, read from the cache and kept."""

    def __init__(self, root: Path | None = None, models_dir: Path | None = None) -> None:
        self.root = root
        #: Agents name their model by file name: the file is looked for here.
        self.models_dir = models_dir
        self._tables: dict[str, tuple[float, QualityTable | None]] = {}

    def _table(self, model: str) -> QualityTable | None:
        now = time.monotonic()
        seen = self._tables.get(model)
        if seen is not None and now - seen[0] < REREAD_S:
            return seen[1]
        path = Path(model)
        if self.models_dir is not None and not path.is_absolute():
            path = self.models_dir / path
        table = cached(path, self.root)
        self._tables[model] = (now, table)
        return table

    def figure(self, route: RouteConfig, c: Candidate, ref: Candidate | None) -> QualityFigure:
        if c.key == route.reference:
            return QualityFigure(1.0, 0.0, "the reference")
        if c.key in route.quality:
            return QualityFigure(route.quality[c.key], None, "declared in the route")
        if ref is None:
            return QualityFigure(None, None, f"reference {route.reference} not seen yet")
        if Path(c.model).name != Path(ref.model).name:
            return QualityFigure(None, None, "another model than the reference's; declare it")
        if c.precision == ref.precision:
            return QualityFigure(1.0, 0.0, "the reference's model and precision")
        table = self._table(c.model)
        if table is None or table.reference != ref.precision:
            bare = self.models_dir is None and not Path(c.model).is_absolute()
            where = " (set router.models_dir)" if bare else ""
            return QualityFigure(
                None, None, f"no quality table of {Path(c.model).name}{where}: run wattops quality"
            )
        try:
            row = table.row(c.precision)
        except KeyError:
            return QualityFigure(None, None, f"{c.precision} not in the quality table")
        if route.accuracy_verdict == "bound":
            source = "wattops quality, the drop's 95% upper bound"
            return QualityFigure(row.accuracy_kept, row.drop_points.high, source, True)
        return QualityFigure(row.accuracy_kept, row.drop_points.estimate, "wattops quality")
