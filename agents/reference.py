"""The agent's configuration reference, written from the pydantic models themselves.

`python -m wattops.agents.reference > docs/configuration.md` regenerates it; a test checks the
committed file against this output, so the reference cannot drift from what the agent accepts.
Engines' own keys come from each registered engine's `Settings` model.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from wattops.agents.config import (
    AccountingSection,
    AgentSection,
    CacheSection,
    DeploymentConfig,
    KubernetesSection,
    PolicySection,
    SiteSection,
)
from wattops.engines.registry import ENGINES
from wattops.vocabulary.access import TokenEntry

#: The table, its model, and what the section is for (the model's docstring says the rest).
SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("[agent]", AgentSection),
    ("[cache]", CacheSection),
    ("[accounting]", AccountingSection),
    ("[policy]", PolicySection),
    ("[site]", SiteSection),
    ("[kubernetes]", KubernetesSection),
    ("[[deployments]]", DeploymentConfig),
    ("[[tokens]]", TokenEntry),
)

#: Defaults computed at start, said in words rather than as this machine's value.
DYNAMIC_DEFAULTS = {
    ("[agent]", "node"): "$NODE_NAME, else the host name",
    ("[agent]", "token"): "$WATTOPS_TOKEN, else none",
}


def _type(field: FieldInfo) -> str:
    text = str(field.annotation).replace("typing.", "").replace("pathlib.", "")
    for noise in ("<class '", "'>"):
        text = text.replace(noise, "")
    return text.replace("NoneType", "None").replace(" | ", " or ")


def _default(section: str, name: str, field: FieldInfo) -> str:
    if (section, name) in DYNAMIC_DEFAULTS:
        return DYNAMIC_DEFAULTS[(section, name)]
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "see its keys"
    return "`" + json.dumps(value, default=str) + "`"


def _constraints(field: FieldInfo) -> str:
    found = []
    for meta in field.metadata:
        for attr, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="),
                           ("min_length", "length >="), ("pattern", "matches")):  # fmt: skip
            value = getattr(meta, attr, None)
            if value is not None:
                found.append(f"{sign} `{value}`")
    return ", ".join(found)


def _table(section: str, model: type[BaseModel]) -> list[str]:
    lines = ["| key | type | default | allowed | what it is |", "| --- | --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        lines.append(
            f"| `{name}` | {_type(field)} | {_default(section, name, field)} | "
            f"{_constraints(field) or '-'} | {description or '-'} |"
        )
    return lines


def _doc(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def render_reference() -> str:
    """The whole reference, as Markdown."""
    out = [
        "# Agent configuration reference",
        "",
        "Generated from the pydantic models the agent validates its file with "
        "(`python -m wattops.agents.reference > docs/configuration.md`); "
        "`tests/test_config.py` checks that this file is current. A bad file stops the agent "
        "(exit 2) naming the file, the key and what is allowed. Relative paths are resolved "
        "against the file's folder. `[hardware]` takes any key of the hardware profile "
        "(profiles/hardware/*.toml) and `[site]` any key of the site profile, as overrides.",
        "",
    ]
    for section, model in SECTIONS:
        out += [f"## `{section}`", "", _doc(model), "", *_table(section, model), ""]
    out += [
        "## Engine keys",
        "",
        "Each engine adds its own keys to `[[deployments]]` (its `Settings` model); keys of "
        "another engine are refused.",
        "",
    ]
    # wattops' own engines: an engine installed from another package documents itself.
    own = [n for n in ENGINES.names() if ENGINES.get(n).__module__.startswith("wattops.")]
    for name in own:
        settings = ENGINES.get(name).Settings
        out += [f'### `engine = "{name}"`', "", _doc(settings), "", *_table(name, settings), ""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render_reference(), end="")
