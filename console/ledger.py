"""`wattops ledger verify`: re-add a router's ledger and compare it with what the router counts
and reports (`router/billing/verify.py` says what is checked). Through the router (`--router URL` or
`$WATTOPS_ROUTER`, with its token), or on a ledger at rest: `--state-dir DIR` (the router's
`ledger.sqlite`) or `--store redis://...`. Exits 0 when everything agrees, 1 naming every
mismatch, 2 when the ledger cannot be read."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from wattops.console.keys import ROUTER_ENV, call_router
from wattops.router.api import LedgerCheck

__all__ = ["add_command"]


def _verify(args: argparse.Namespace) -> int:
    if args.state_dir is not None or args.store is not None:
        from wattops.router.billing.verify import verify_at  # a ledger at rest: read it here

        try:
            check = verify_at(args.state_dir, args.store, args.prefix)
        except (OSError, ConnectionError, ValueError) as exc:
            print(f"wattops ledger verify: cannot read the ledger: {exc}", file=sys.stderr)
            return 2
    else:
        if not (args.router or os.environ.get(ROUTER_ENV)):
            print(f"wattops ledger verify: give --router URL (or ${ROUTER_ENV}), --state-dir DIR "
                  "or --store redis://...", file=sys.stderr)  # fmt: skip
            return 2
        check = call_router(args, lambda client: client.verify_ledger())
    return _report(args, check)


def _report(args: argparse.Namespace, check: LedgerCheck) -> int:
    if args.json:
        print(json.dumps(check.model_dump(), indent=2))
    else:
        counted = f"{check.budgets_checked} budgets, {check.windows_checked} windows re-added"
        print(f"{check.store}: {check.rows} rows ({check.chained_rows} chained), {counted}")
        for line in check.mismatches:
            print(f"MISMATCH {line}")
        print("ok: the ledger agrees with the counters and the report" if check.ok
              else f"{len(check.mismatches)} mismatches")  # fmt: skip
    return 0 if check.ok else 1


def add_command(commands: Any) -> None:
    """`wattops ledger verify` on the CLI's sub-command parser."""
    ledger = commands.add_parser("ledger", help="a wattops-router's ledger")
    actions = ledger.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    verify = actions.add_parser("verify", help="re-add the ledger and compare (exit 1 on a "
                                "mismatch)")  # fmt: skip
    where = verify.add_mutually_exclusive_group()
    where.add_argument("--router", metavar="URL", help=f"the router (default ${ROUTER_ENV})")
    where.add_argument("--state-dir", type=Path, metavar="DIR",
                       help="a router's state folder: its ledger.sqlite, at rest")  # fmt: skip
    where.add_argument("--store", metavar="URL", help="a Redis store: redis://host:port/db")
    verify.add_argument("--prefix", default="wattops:", help="the Redis keys' prefix")
    verify.add_argument("--json", action="store_true", help="print JSON")
    verify.set_defaults(func=_verify)
