"""The operator's token for control calls: from WATTOPS_TOKEN, or from the console config file,
which is refused if anyone but its owner can read it."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

ENV_TOKEN = "WATTOPS_TOKEN"
ENV_CONFIG = "WATTOPS_CONFIG"


class CredentialsError(Exception):
    """The token cannot be used as configured; the message says how to fix it."""


def config_path() -> Path:
    """`$WATTOPS_CONFIG`, else `$XDG_CONFIG_HOME/wattops/console.toml` (~/.config/...)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "wattops" / "console.toml"


def load_token(path: Path | None = None) -> str | None:
    """The operator token, or None when neither the environment nor the file has one."""
    token = os.environ.get(ENV_TOKEN)
    if token:
        return token.strip()
    path = path or config_path()
    if not path.exists():
        return None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(
            f"{path} holds the operator token but is readable by others "
            f"(mode {stat.filemode(mode)}); run `chmod 600 {path}` or use {ENV_TOKEN}"
        )
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CredentialsError(f"{path}: not valid TOML: {exc}") from None
    token = data.get("token")
    if token is not None and not isinstance(token, str):
        raise CredentialsError(f"{path}: `token` must be a string")
    return token or None
