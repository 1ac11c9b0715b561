"""`wattops token new NAME --role ROLE` and `wattops token hash`: bearer tokens for the
agents' and routers' `[[tokens]]` (vocabulary/access.py), made and hashed here so a token
never has to be written in a config file."""

from __future__ import annotations

import argparse
import re
import secrets
import sys
from typing import Any

from wattops.vocabulary.access import ROLES, hash_token

__all__ = ["add_command"]

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def _name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"must be 1-64 letters, digits or _.@- (it names the holder in refusals and the "
            f"audit log), got {text!r}"
        )
    return text


def _table(name: str, role: str, hashed: str) -> str:
    return f'[[tokens]]\nname = "{name}"\nrole = "{role}"\nhash = "{hashed}"\n'


def _new(args: argparse.Namespace) -> int:
    token = "wot_" + secrets.token_urlsafe(32)
    print(token)
    print("# the token above is shown this once; put this table in the agent's or router's "
          "config (or its tokens_file):", file=sys.stderr)  # fmt: skip
    print(_table(args.name, args.role, hash_token(token)), file=sys.stderr, end="")
    return 0


def _hash(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip()
    if len(token) < 16:
        print("wattops token hash: give the token (16 characters or more) on standard input",
              file=sys.stderr)  # fmt: skip
        return 2
    print(hash_token(token))
    return 0


def add_command(commands: Any) -> None:
    token = commands.add_parser("token", help="bearer tokens with roles for agents and routers")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = actions.add_parser("new", help="a new random token, and its [[tokens]] table")
    new.add_argument("name", type=_name, help="who holds it (shown in refusals and the audit)")
    new.add_argument("--role", choices=ROLES, required=True,
                     help="viewer: reads; operator: scale, precision, canaries, routes; admin: "
                     "keys, budgets, and all the rest")  # fmt: skip
    new.set_defaults(func=_new)
    hashed = actions.add_parser("hash", help="the hash of a token read from standard input")
    hashed.set_defaults(func=_hash)
