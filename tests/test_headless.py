"""The headless packages (vocabulary, engines, profiles, quality, the agent, the fleet core)
never import the TUI libraries (textual, rich). pyproject.toml's import-linter contracts say
the same about the import graph; this checks what importing each module really loads."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def headless_modules() -> list[str]:
    names = ["wattops.profiles"]
    for package in ("vocabulary", "engines", "quality", "agents", "fleet", "router"):
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"wattops.{package}."):
            names.append(info.name)
    return sorted(set(names))


@pytest.mark.parametrize("module", headless_modules())
def test_headless_module_does_not_import_tui(module: str) -> None:
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "bad = sorted(m for m in ('textual', 'rich') if m in sys.modules); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} pulled in {out.stdout.strip()}"


def test_api_schema_imports_only_pydantic() -> None:
    code = (
        "import sys; before = set(sys.modules); import wattops.agents.api; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before if not m.startswith('_')}; "
        "print(','.join(sorted(new - {'wattops', 'pydantic', 'pydantic_core', 'typing_extensions',"
        " 'annotated_types', 'typing_inspection'} - set(sys.stdlib_module_names))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
