"""`wattops policy pause|resume --agent URL`: stop a node's policy from acting (it keeps
planning and saying what it would do), or let it act again (agents/policy.py)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

__all__ = ["add_command"]


def _set(args: argparse.Namespace) -> int:
    from wattops.fleet.client import AgentClient, AgentError
    from wattops.fleet.credentials import CredentialsError, load_token

    try:
        token = load_token()
    except CredentialsError as exc:
        print(f"wattops policy: {exc}", file=sys.stderr)
        return 2

    async def call() -> Any:
        async with AgentClient(args.agent, token=token) as client:
            return await client.policy(args.policy_command == "pause")

    try:
        state = asyncio.run(call())
    except AgentError as exc:
        said = f"answered {exc.status}: " if exc.status else ""
        print(f"wattops policy: {exc.url} {said}{exc.message}", file=sys.stderr)
        return 1
    print(f"policy ({state.mode}) {'paused' if state.paused else 'acting'}; "
          f"{len(state.plan)} step(s) planned now")  # fmt: skip
    return 0


def add_command(commands: Any) -> None:
    policy = commands.add_parser("policy", help="pause or resume a node's policy")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    for name, said in (("pause", "stop acting (it still plans and says)"),
                       ("resume", "act again")):  # fmt: skip
        sub = actions.add_parser(name, help=said)
        sub.add_argument("--agent", required=True, help="the agent's URL")
        sub.set_defaults(func=_set)
