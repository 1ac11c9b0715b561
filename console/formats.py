"""How figures read on screen and in the shell: the number formats every view shares."""

from __future__ import annotations


def watts(value: float | None, estimated: bool) -> str:
    """`312 W`, or `312 W est.` for an estimate; `-` for no data."""
    if value is None:
        return "-"
    return f"{value:,.0f} W" + (" est." if estimated else "")


def number(value: float | None, digits: int = 2, unit: str = "") -> str:
    """A figure with a fixed number of decimals, or `-`."""
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def money(value: float | None, suffix: str = "") -> str:
    """Dollars with cents (more decimals under a cent)."""
    if value is None:
        return "-"
    digits = 2 if abs(value) >= 0.1 else 4
    return f"${value:,.{digits}f}{suffix}"


def percent(value: float | None) -> str:
    """0.234 -> `23%`."""
    return "-" if value is None else f"{value:.0%}"


def millis(value: float | None) -> str:
    """Seconds as milliseconds, or seconds when long."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10 else f"{value:.1f} s"
