"""Hardware and site profiles: bundled files load, prices add up, bad input is named precisely."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from wattops.profiles import (
    HOURS_PER_YEAR,
    HardwareProfile,
    Price,
    ProfileError,
    SiteProfile,
    available_hardware_profiles,
    available_site_profiles,
    hardware_profile,
    site_profile,
)

REQUIRED_HARDWARE = {
    "a100-40gb",
    "a100-80gb",
    "h100-80gb",
    "jetson-agx-orin-64gb",
    "jetson-orin-nano-8gb",
    "cpu-generic",
}
REQUIRED_SITES = {"default", "us-east", "eu-north"}

OWNED_TOML = """\
name = "{name}"
kind = "jetson"
accelerators = 1
idle_watts = 5.0
max_watts = 15.0
memory_gb = 8.0

[price]
purchase_usd = 876.0
lifetime_years = 2.0
source = "test fixture"
as_of = "2024-01-01"
"""


def test_required_profiles_are_bundled() -> None:
    assert set(available_hardware_profiles()) >= REQUIRED_HARDWARE
    assert set(available_site_profiles()) >= REQUIRED_SITES


@pytest.mark.parametrize("name", available_hardware_profiles())
def test_every_hardware_profile_loads_with_a_sourced_price(name: str) -> None:
    profile = hardware_profile(name)
    assert isinstance(profile, HardwareProfile)
    assert profile.name == name
    assert profile.price.source.strip()
    assert profile.price.as_of.strip()
    assert profile.price.usd_per_hour > 0
    assert 0 <= profile.idle_watts <= profile.max_watts
    assert (profile.accelerators == 0) == (profile.kind == "cpu")


@pytest.mark.parametrize("name", available_site_profiles())
def test_every_site_profile_loads_with_a_source(name: str) -> None:
    site = site_profile(name)
    assert isinstance(site, SiteProfile)
    assert site.name == name
    assert site.source.strip() and site.as_of.strip()
    assert site.pue >= 1.0
    assert site.electricity_usd_per_kwh > 0


def test_default_site_is_the_default() -> None:
    assert site_profile().name == "default"


def test_eu_north_is_lower_carbon_than_the_us_average() -> None:
    assert site_profile("eu-north").grid_gco2e_per_kwh < site_profile().grid_gco2e_per_kwh / 5


def test_cloud_price_per_hour() -> None:
    price = Price(cloud_usd_per_hour=5.12, source="s", as_of="2024")
    assert not price.owned
    assert price.usd_per_hour == pytest.approx(5.12)
    assert hardware_profile("a100-40gb").price.usd_per_hour == pytest.approx(32.7726 / 8, 1e-4)
    assert hardware_profile("h100-80gb").price.usd_per_hour == pytest.approx(98.32 / 8, 1e-4)


def test_owned_price_is_amortised_over_the_lifetime() -> None:
    price = Price(purchase_usd=1999.0, lifetime_years=5.0, source="s", as_of="2023")
    assert price.owned
    assert HOURS_PER_YEAR == 8760.0
    assert price.usd_per_hour == pytest.approx(1999.0 / (5.0 * 8760.0))
    jetson = hardware_profile("jetson-agx-orin-64gb")
    assert jetson.price.owned
    assert jetson.price.usd_per_hour == pytest.approx(1999.0 / (5 * 8760))


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "give either cloud_usd_per_hour"),
        ({"cloud_usd_per_hour": 1.0, "purchase_usd": 10.0, "lifetime_years": 1.0}, "not both"),
        ({"purchase_usd": 10.0}, "lifetime_years is missing"),
        ({"lifetime_years": 3.0}, "purchase_usd is missing"),
    ],
)
def test_price_needs_exactly_one_form(fields: dict[str, float], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        Price(source="s", as_of="2024", **fields)


def test_overrides_apply() -> None:
    before = datetime.date.today().isoformat()
    profile = hardware_profile(
        "a100-80gb", {"idle_watts": 55, "price": {"cloud_usd_per_hour": 3.0}}
    )
    after = datetime.date.today().isoformat()
    assert profile.idle_watts == 55
    assert profile.max_watts == 400.0  # untouched fields keep the file's values
    assert profile.price.usd_per_hour == 3.0
    # The bundled provenance no longer describes the number: it is marked as an override.
    assert profile.price.source.startswith("caller override of profiles/hardware/a100-80gb.toml")
    assert profile.price.as_of in {before, after}  # the day of the call, even at midnight

    sourced = hardware_profile(
        "a100-80gb", {"price": {"cloud_usd_per_hour": 3.0, "source": "quote", "as_of": "2025"}}
    )
    assert (sourced.price.source, sourced.price.as_of) == ("quote", "2025")

    site = site_profile("default", {"pue": 1.2, "electricity_usd_per_kwh": 0.05})
    assert (site.pue, site.electricity_usd_per_kwh) == (1.2, 0.05)


def test_price_override_switching_cloud_to_owned_replaces_the_price_table() -> None:
    profile = hardware_profile(
        "h100-80gb", {"price": {"purchase_usd": 30000.0, "lifetime_years": 4.0}}
    )
    assert profile.price.owned
    assert profile.price.cloud_usd_per_hour is None
    assert profile.price.usd_per_hour == pytest.approx(30000.0 / (4 * 8760))


def test_price_override_within_owned_merges() -> None:
    profile = hardware_profile("jetson-orin-nano-8gb", {"price": {"lifetime_years": 2.5}})
    assert profile.price.purchase_usd == 499.0
    assert profile.price.usd_per_hour == pytest.approx(499.0 / (2.5 * 8760))


def test_owned_to_cloud_override() -> None:
    profile = hardware_profile("jetson-agx-orin-64gb", {"price": {"cloud_usd_per_hour": 0.5}})
    assert not profile.price.owned
    assert profile.price.purchase_usd is None and profile.price.lifetime_years is None


def test_bad_override_names_file_and_field() -> None:
    with pytest.raises(ProfileError) as err:
        hardware_profile("a100-80gb", {"price": {"purchase_usd": 1000.0, "lifetime_years": 0}})
    assert str(err.value) == (
        "profiles/hardware/a100-80gb.toml (with overrides): price.lifetime_years: "
        "Input should be greater than 0"
    )


def test_incomplete_switch_to_owned_is_refused() -> None:
    with pytest.raises(ProfileError, match=r"price: .*lifetime_years is missing"):
        hardware_profile("a100-80gb", {"price": {"purchase_usd": 1000.0}})


def test_unknown_override_field_lists_the_allowed_ones() -> None:
    with pytest.raises(ProfileError) as err:
        hardware_profile("h100-80gb", {"idle_wats": 10})
    message = str(err.value)
    assert "profiles/hardware/h100-80gb.toml (with overrides): idle_wats: unknown field" in message
    assert "idle_watts" in message and "max_watts" in message

    with pytest.raises(ProfileError, match=r"price\.usd: unknown field; allowed: .*purchase_usd"):
        hardware_profile("h100-80gb", {"price": {"usd": 1.0}})


def test_bad_site_override_names_file_and_field() -> None:
    with pytest.raises(ProfileError) as err:
        site_profile("eu-north", {"pue": 0.9})
    assert str(err.value).startswith("profiles/site/eu-north.toml (with overrides): pue: ")
    assert "greater than or equal to 1" in str(err.value)


def test_unknown_profile_lists_the_available_ones() -> None:
    with pytest.raises(ProfileError) as err:
        hardware_profile("tpu-v5")
    message = str(err.value)
    assert "unknown hardware profile 'tpu-v5'" in message
    for name in REQUIRED_HARDWARE:
        assert name in message

    with pytest.raises(ProfileError, match=r"unknown site profile 'mars'.*default.*eu-north"):
        site_profile("mars")


def test_path_like_names_are_not_followed() -> None:
    with pytest.raises(ProfileError, match="unknown hardware profile"):
        hardware_profile("../site/default")


def test_search_folders_come_first(tmp_path: Path) -> None:
    (tmp_path / "my-board.toml").write_text(OWNED_TOML.format(name="my-board"))
    (tmp_path / "a100-80gb.toml").write_text(OWNED_TOML.format(name="a100-80gb"))
    assert "my-board" in available_hardware_profiles([tmp_path])
    assert "my-board" not in available_hardware_profiles()

    board = hardware_profile("my-board", search=[tmp_path])
    assert board.price.usd_per_hour == pytest.approx(876.0 / (2 * 8760))
    shadowed = hardware_profile("a100-80gb", search=[tmp_path])
    assert shadowed.kind == "jetson"  # the user's file wins over the bundled one


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "broken"\nidle_watts = = 3\n')
    with pytest.raises(ProfileError) as err:
        hardware_profile("broken", search=[tmp_path])
    assert str(err.value).startswith(f"{bad}: not valid TOML: ")
    assert "line 2" in str(err.value)


def test_idle_above_max_is_refused(tmp_path: Path) -> None:
    text = OWNED_TOML.format(name="hot").replace("idle_watts = 5.0", "idle_watts = 20.0")
    (tmp_path / "hot.toml").write_text(text)
    with pytest.raises(ProfileError) as err:
        hardware_profile("hot", search=[tmp_path])
    expected = f"{tmp_path / 'hot.toml'}: idle_watts (20) must not exceed max_watts (15)"
    assert str(err.value) == expected

    with pytest.raises(ProfileError, match=r"\(with overrides\): idle_watts \(500\) must not"):
        hardware_profile("a100-40gb", {"idle_watts": 500.0})


def test_negative_numbers_are_refused() -> None:
    with pytest.raises(ProfileError, match=r"memory_gb: Input should be greater than 0"):
        hardware_profile("cpu-generic", {"memory_gb": -1})
    with pytest.raises(ProfileError, match=r"idle_watts: Input should be greater than or equal"):
        hardware_profile("cpu-generic", {"idle_watts": -1})


def test_kind_and_accelerators_must_agree() -> None:
    with pytest.raises(ProfileError, match=r'accelerators must be 0 for kind = "cpu"'):
        hardware_profile("cpu-generic", {"accelerators": 1})
    with pytest.raises(ProfileError, match=r"kind: Input should be 'gpu', 'jetson' or 'cpu'"):
        hardware_profile("a100-40gb", {"kind": "tpu"})


def test_file_name_and_profile_name_must_match(tmp_path: Path) -> None:
    (tmp_path / "renamed.toml").write_text(OWNED_TOML.format(name="original"))
    with pytest.raises(ProfileError, match=r"renamed\.toml: name: must equal the file name"):
        hardware_profile("renamed", search=[tmp_path])


def test_missing_field_in_a_file_is_named(tmp_path: Path) -> None:
    text = OWNED_TOML.format(name="nomem").replace("memory_gb = 8.0\n", "")
    (tmp_path / "nomem.toml").write_text(text)
    with pytest.raises(ProfileError, match=r"nomem\.toml: memory_gb: Field required"):
        hardware_profile("nomem", search=[tmp_path])


def test_cloud_hardware_uses_its_providers_pue_for_carbon() -> None:
    from wattops.agents.cost import CostModel

    site = site_profile("default")  # an industry-average owned site: PUE 1.56
    cloud = hardware_profile("a100-80gb")
    assert cloud.facility is not None and cloud.facility.source and cloud.facility.as_of
    assert cloud.facility.pue < site.pue
    cost = CostModel.from_profiles(cloud, site)
    assert cost.pue == cloud.facility.pue
    assert cost.pue_basis.startswith("the provider's")
    assert cost.carbon_g(3.6e6) == pytest.approx(cloud.facility.pue * site.grid_gco2e_per_kwh)
    # Owned hardware runs at the site; so does a cloud profile overridden to owned hardware.
    owned = CostModel.from_profiles(hardware_profile("jetson-agx-orin-64gb"), site)
    assert (owned.pue, owned.pue_basis.startswith("site default")) == (site.pue, True)
    bought = hardware_profile("a100-80gb", {"price": {"purchase_usd": 15000, "lifetime_years": 4}})
    assert CostModel.from_profiles(bought, site).pue == site.pue
