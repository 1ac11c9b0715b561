"""Hardware and site profiles: what a device costs per hour, the power it draws, where it runs.

Profiles are TOML files bundled next to this module:

* ``hardware/<name>.toml`` -> :class:`HardwareProfile` (price, idle/max watts, memory)
* ``site/<name>.toml`` -> :class:`SiteProfile` (electricity price, PUE, grid carbon intensity)

Every price and site figure carries a ``source`` and an ``as_of`` date; the TOML comments say
how each figure was derived and flag the ones that could not be verified.

Callers may add folders that are searched before the bundled ones and may override single
fields (see :func:`hardware_profile`). A profile that fails validation raises
:class:`ProfileError` naming the file, the field and what is allowed, for example::

    profiles/hardware/a100-80gb.toml (with overrides): price.lifetime_years: Input should be
    greater than 0
"""

from __future__ import annotations

import copy
import datetime
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "HOURS_PER_YEAR",
    "HardwareProfile",
    "Price",
    "ProfileError",
    "SiteProfile",
    "available_hardware_profiles",
    "available_site_profiles",
    "hardware_profile",
    "site_profile",
]

HOURS_PER_YEAR = 8760.0
"""Hours used to amortise owned hardware: 365 days x 24 h (leap days ignored)."""

BUNDLED_DIR = Path(__file__).resolve().parent
HARDWARE_DIR = BUNDLED_DIR / "hardware"
SITE_DIR = BUNDLED_DIR / "site"

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
AS_OF_PATTERN = r"^\d{4}(-\d{2}(-\d{2})?)?$"

CLOUD_KEYS = frozenset({"cloud_usd_per_hour"})
OWNED_KEYS = frozenset({"purchase_usd", "lifetime_years"})
AMOUNT_KEYS = CLOUD_KEYS | OWNED_KEYS


class ProfileError(Exception):
    """A profile is missing or invalid; the message names file, field and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class Price(_Strict):
    """What one hour of the hardware costs: a cloud on-demand rate or owned hardware amortised.

    Exactly one of the two forms is given: ``cloud_usd_per_hour``, or ``purchase_usd`` together
    with ``lifetime_years``. Electricity is not part of the price; it comes from the site profile.
    """

    cloud_usd_per_hour: float | None = Field(None, ge=0)
    """Cloud on-demand list price in USD per hour for everything the profile describes."""

    purchase_usd: float | None = Field(None, ge=0)
    """List purchase price in USD of owned hardware (amortised linearly over its lifetime)."""

    lifetime_years: float | None = Field(None, gt=0)
    """Years over which `purchase_usd` is amortised; an assumption, not a list price."""

    source: str = Field(min_length=1)
    """Where the figure comes from: vendor, price list, region, and any arithmetic applied."""

    as_of: str = Field(pattern=AS_OF_PATTERN)
    """Date of the list price: YYYY, YYYY-MM or YYYY-MM-DD."""

    @model_validator(mode="after")
    def _one_form(self) -> Price:
        cloud = self.cloud_usd_per_hour is not None
        owned = [k for k in ("purchase_usd", "lifetime_years") if getattr(self, k) is not None]
        if cloud and owned:
            raise ValueError(
                "give either cloud_usd_per_hour (cloud) or purchase_usd + lifetime_years "
                f"(owned), not both; got cloud_usd_per_hour and {' and '.join(owned)}"
            )
        if not cloud and not owned:
            raise ValueError(
                "give either cloud_usd_per_hour (cloud) or purchase_usd + lifetime_years (owned)"
            )
        if owned and len(owned) == 1:
            missing = "lifetime_years" if owned[0] == "purchase_usd" else "purchase_usd"
            raise ValueError(
                f"owned hardware needs both purchase_usd and lifetime_years; {missing} is missing"
            )
        return self

    @property
    def owned(self) -> bool:
        """True for owned hardware (purchase price amortised), False for a cloud rate."""
        return self.cloud_usd_per_hour is None

    @property
    def usd_per_hour(self) -> float:
        """USD per hour: the cloud rate, or purchase_usd / (lifetime_years * 8760)."""
        if self.cloud_usd_per_hour is not None:
            return self.cloud_usd_per_hour
        assert self.purchase_usd is not None and self.lifetime_years is not None
        return self.purchase_usd / (self.lifetime_years * HOURS_PER_YEAR)


class Facility(_Strict):
    """The data-center overhead a cloud provider publishes for its own sites.

    A cloud rental runs in the provider's data centers, not at the operator's site: carbon for
    its energy is multiplied by the provider's PUE (hyperscale sites run at about 1.1-1.2)
    rather than the site profile's, which describes the operator's own facility.
    """

    pue: float = Field(ge=1.0)
    """Power usage effectiveness the provider reports for its data centers."""

    source: str = Field(min_length=1)
    """Where the figure comes from: provider, report, scope (global, region)."""

    as_of: str = Field(pattern=AS_OF_PATTERN)
    """Year (or date) the figure describes: YYYY, YYYY-MM or YYYY-MM-DD."""


class _Named(_Strict):
    """A profile: a named, strictly validated model whose name equals its file name."""

    name: str = Field(pattern=NAME_PATTERN)
    """Profile name; equals the file name without `.toml`."""


class HardwareProfile(_Named):
    """One serving device (or a fixed slice of a node): its price, power envelope and memory."""

    description: str = ""
    """Human-readable description of exactly what the profile covers."""

    kind: Literal["gpu", "jetson", "cpu"]
    """Device class: a data-center GPU, an NVIDIA Jetson module, or a CPU-only host."""

    accelerators: int = Field(ge=0)
    """GPUs (or Jetson modules) the profile describes; 0 for a CPU host."""

    idle_watts: float = Field(ge=0)
    """Typical power of the whole described device(s) when idle, in watts."""

    max_watts: float = Field(gt=0)
    """Maximum power (TDP / max board or module power) of the described device(s), in watts."""

    memory_gb: float = Field(gt=0)
    """Accelerator memory in GB (Jetson: unified memory; CPU: host RAM)."""

    cpu_cores: int = Field(0, ge=0)
    """CPU cores (vCPUs for cloud instances) the price covers; mainly for kind = "cpu"."""

    price: Price
    """What one hour of this hardware costs, with source and date."""

    facility: Facility | None = None
    """Cloud hardware: the provider's published PUE, used for the carbon of its energy instead
    of the site's while the price is a cloud rate (a profile overridden to owned hardware runs
    at your site: the site's PUE). None: the site profile's PUE."""

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if self.idle_watts > self.max_watts:
            raise ValueError(
                f"idle_watts ({self.idle_watts:g}) must not exceed max_watts ({self.max_watts:g})"
            )
        if self.kind == "cpu" and self.accelerators != 0:
            raise ValueError(f'accelerators must be 0 for kind = "cpu", got {self.accelerators}')
        if self.kind != "cpu" and self.accelerators < 1:
            raise ValueError(f'accelerators must be at least 1 for kind = "{self.kind}", got 0')
        return self

    def scaled(self, accelerators: int) -> HardwareProfile:
        """The same hardware with `accelerators` devices instead of `self.accelerators`: price,
        idle and maximum watts, memory and cores scale in proportion (a whole 8-GPU box
        against a one-GPU profile costs and draws eight times as much)."""
        if self.kind == "cpu" or accelerators == self.accelerators:
            return self
        factor = accelerators / self.accelerators
        price = self.price
        amounts = (
            {"cloud_usd_per_hour": (price.cloud_usd_per_hour or 0.0) * factor}
            if not price.owned
            else {"purchase_usd": (price.purchase_usd or 0.0) * factor}
        )
        note = (
            f"x{factor:g} ({accelerators} devices found, the profile describes {self.accelerators})"
        )
        return self.model_copy(
            update={
                "accelerators": accelerators,
                "idle_watts": self.idle_watts * factor,
                "max_watts": self.max_watts * factor,
                "memory_gb": self.memory_gb * factor,
                "cpu_cores": round(self.cpu_cores * factor),
                "description": f"{self.description} {note}".strip(),
                "price": price.model_copy(update={**amounts, "source": f"{price.source}; {note}"}),
            }
        )


class SiteProfile(_Named):
    """Where hardware runs: what electricity costs, facility overhead (PUE) and grid carbon."""

    description: str = ""
    """Human-readable description of the site or region the figures stand for."""

    electricity_usd_per_kwh: float = Field(ge=0)
    """Electricity price in USD per kWh drawn from the grid."""

    pue: float = Field(ge=1.0)
    """Power usage effectiveness: facility power / IT power (1.0 = no overhead)."""

    grid_gco2e_per_kwh: float = Field(ge=0)
    """Grid carbon intensity in grams CO2-equivalent per kWh (see the file for the basis)."""

    source: str = Field(min_length=1)
    """Where the three figures come from."""

    as_of: str = Field(pattern=AS_OF_PATTERN)
    """Date (year) of the data the figures describe: YYYY, YYYY-MM or YYYY-MM-DD."""


_M = TypeVar("_M", bound=_Named)


def _display(path: Path) -> str:
    """Bundled files as `profiles/hardware/x.toml`; anything else as given."""
    try:
        return str(path.resolve().relative_to(BUNDLED_DIR.parent))
    except ValueError:
        return str(path)


def _allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed at `loc` (the location of an unknown key)."""
    current: type[BaseModel] = model
    for part in loc[:-1]:
        field = current.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)


def _describe(exc: ValidationError, model: type[BaseModel], where: str) -> str:
    lines = []
    for item in exc.errors():
        loc = tuple(item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = _allowed_fields(model, loc)
            msg = f"unknown field; allowed: {', '.join(allowed)}" if allowed else "unknown field"
        field = ".".join(str(part) for part in loc)
        lines.append(f"{where}: {field}: {msg}" if field else f"{where}: {msg}")
    return "\n".join(lines)


def _validate(model: type[_M], data: Mapping[str, Any], where: str) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_describe(exc, model, where)) from None


def _read_toml(path: Path) -> dict[str, Any]:
    where = _display(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{where}: cannot read the profile: {exc.strerror}") from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from None


def _folders(bundled: Path, search: Iterable[Path] | None) -> list[Path]:
    return [Path(p) for p in (search or [])] + [bundled]


def _available(bundled: Path, search: Iterable[Path] | None) -> list[str]:
    names: set[str] = set()
    for folder in _folders(bundled, search):
        if folder.is_dir():
            names.update(p.stem for p in folder.glob("*.toml") if re.match(NAME_PATTERN, p.stem))
    return sorted(names)


def available_hardware_profiles(search: list[Path] | None = None) -> list[str]:
    """Names of the hardware profiles: the bundled ones plus any in the `search` folders."""
    return _available(HARDWARE_DIR, search)


def available_site_profiles(search: list[Path] | None = None) -> list[str]:
    """Names of the site profiles: the bundled ones plus any in the `search` folders."""
    return _available(SITE_DIR, search)


def _find(kind: str, name: str, bundled: Path, search: Iterable[Path] | None) -> Path:
    folders = _folders(bundled, search)
    if re.match(NAME_PATTERN, name):
        for folder in folders:
            candidate = folder / f"{name}.toml"
            if candidate.is_file():
                return candidate
    available = _available(bundled, search)
    raise ProfileError(
        f"unknown {kind} profile {name!r}; available: {', '.join(available) or '(none)'} "
        f"(searched {', '.join(_display(f) for f in folders)})"
    )


def _merge_price(
    base: Mapping[str, Any], override: Mapping[str, Any], where: str
) -> dict[str, Any]:
    """Apply a `price` override; see :func:`hardware_profile` for the rule."""
    base_modes = {"cloud" for k in base if k in CLOUD_KEYS} | {
        "owned" for k in base if k in OWNED_KEYS
    }
    new_modes = {"cloud" for k in override if k in CLOUD_KEYS} | {
        "owned" for k in override if k in OWNED_KEYS
    }
    switches = bool(new_modes - base_modes)
    merged = {k: v for k, v in base.items() if not (switches and k in AMOUNT_KEYS)}
    merged.update(override)
    if new_modes:
        if "source" not in override:
            merged["source"] = f"caller override of {where}; bundled price: {base.get('source')}"
        if "as_of" not in override:
            merged["as_of"] = datetime.date.today().isoformat()
    return merged


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            merged[key] = _deep_merge(current, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load(
    model: type[_M],
    kind: str,
    name: str,
    bundled: Path,
    overrides: Mapping[str, Any] | None,
    search: Iterable[Path] | None,
) -> _M:
    path = _find(kind, name, bundled, search)
    where = _display(path)
    data = _read_toml(path)
    base = _validate(model, data, where)
    if base.name != name:
        raise ProfileError(f"{where}: name: must equal the file name {name!r}, got {base.name!r}")
    if not overrides:
        return base
    merged = dict(data)
    rest = dict(overrides)
    if model is HardwareProfile and isinstance(rest.get("price"), Mapping):
        merged["price"] = _merge_price(data.get("price", {}), rest.pop("price"), where)
    merged = _deep_merge(merged, rest)
    return _validate(model, merged, f"{where} (with overrides)")


def hardware_profile(
    name: str,
    overrides: dict[str, Any] | None = None,
    search: list[Path] | None = None,
) -> HardwareProfile:
    """Load, override and validate the hardware profile `name`.

    `search` folders are checked for `<name>.toml` in order before the bundled
    `profiles/hardware/` folder. `overrides` is a nested dict merged over the file, e.g.
    ``{"idle_watts": 55, "price": {"cloud_usd_per_hour": 3.0}}``.

    Rule for `price` overrides:

    * Keys that keep the price's form (cloud stays cloud, owned stays owned) are merged into
      the file's price table, e.g. ``{"lifetime_years": 3}`` keeps the file's `purchase_usd`.
    * Keys of the other form replace the whole price table: the file's amounts are dropped,
      so ``{"purchase_usd": 15000, "lifetime_years": 4}`` turns a cloud profile into an owned
      one (and giving both forms in one override is an error).
    * Whenever an override sets an amount but not `source` / `as_of`, the source becomes
      "caller override of <file>; bundled price: ..." and `as_of` today's date, so the
      bundled provenance never labels a number it no longer describes.

    Raises :class:`ProfileError` naming the file and field on any problem, and listing the
    available names when `name` is unknown.
    """
    return _load(HardwareProfile, "hardware", name, HARDWARE_DIR, overrides, search)


def site_profile(
    name: str = "default",
    overrides: dict[str, Any] | None = None,
    search: list[Path] | None = None,
) -> SiteProfile:
    """Load, override and validate the site profile `name` (see :func:`hardware_profile`)."""
    return _load(SiteProfile, "site", name, SITE_DIR, overrides, search)
