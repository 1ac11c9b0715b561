"""`wattops keys` and `wattops budgets`: API keys and budgets on a wattops-router, through its
documented HTTP endpoints (`/v1/keys`, `/v1/budgets`) with the router's token (the admin
credential: `$WATTOPS_TOKEN` or the credentials file, as for the agents)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import ValidationError

from wattops.router.api import Budget, BudgetView, KeyCreate, KeyView
from wattops.router.client import RouterClient, RouterError

__all__ = ["add_commands", "call_router"]

ROUTER_ENV = "WATTOPS_ROUTER"
T = TypeVar("T")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def _client(args: argparse.Namespace) -> RouterClient:
    from wattops.fleet.client import agent_url
    from wattops.fleet.credentials import CredentialsError, load_token

    url = args.router or os.environ.get(ROUTER_ENV)
    if not url:
        raise SystemExit(f"wattops {args.command}: give --router URL (or ${ROUTER_ENV})")
    try:
        url = agent_url(url)
        token = load_token()
    except (ValueError, CredentialsError) as exc:
        raise SystemExit(f"wattops {args.command}: {exc}") from None
    return RouterClient(url, token, timeout_s=30.0)


def call_router(args: argparse.Namespace, call: Callable[[RouterClient], Awaitable[T]]) -> T:
    """Run `call` with a client of the router the arguments name; SystemExit on a refusal."""

    async def go() -> T:
        client = _client(args)
        try:
            return await call(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except RouterError as exc:
        raise SystemExit(f"wattops {args.command}: {exc}") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _key_line(k: KeyView) -> str:
    state = f"revoked {_when(k.revoked_at)}" if k.revoked_at else "active"
    limits = ", ".join(f"{n} {v}" for n, v in (("rpm", k.rpm), ("tpm", k.tpm)) if v) or "-"
    return (f"{k.id}  team {k.team}  {k.name or '-'}  {state}  created {_when(k.created_at)}  "
            f"limits {limits}  budgets {', '.join(k.budgets) or '-'}")  # fmt: skip


def _print(args: argparse.Namespace, data: Any, lines: list[str]) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(lines) if lines else "none")
    return 0


# -- keys --------------------------------------------------------------------------------------


def _invalid(command: str, exc: ValidationError) -> SystemExit:
    problems = "; ".join(
        f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
        for e in exc.errors()
    )
    return SystemExit(f"wattops {command}: {problems}")


def _keys_create(args: argparse.Namespace) -> int:
    try:
        asked = KeyCreate(
            team=args.team, name=args.name, rpm=args.rpm, tpm=args.tpm,
            budget_usd_day=args.budget_usd_day, budget_usd_month=args.budget_usd_month,
            budget_kwh_month=args.budget_kwh_month,
            budget_kgco2e_month=args.budget_kgco2e_month,
        )  # fmt: skip
    except ValidationError as exc:
        raise _invalid("keys create", exc) from None
    made = call_router(args, lambda c: c.create_key(asked))
    if args.json:
        print(made.model_dump_json(indent=2))
        return 0
    print(made.key)
    print(f"# {_key_line(made)}", file=sys.stderr)
    print("# the key is shown this once; only a salted hash is kept", file=sys.stderr)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    keys = call_router(args, lambda c: c.keys())
    return _print(args, [k.model_dump() for k in keys], [_key_line(k) for k in keys])


def _keys_show(args: argparse.Namespace) -> int:
    key = call_router(args, lambda c: c.key(args.id))
    return _print(args, key.model_dump(), [_key_line(key)])


def _keys_update(args: argparse.Namespace) -> int:
    changes = {n: getattr(args, n) for n in ("name", "rpm", "tpm") if getattr(args, n) is not None}
    if not changes:
        raise SystemExit("wattops keys update: nothing to change (give --name, --rpm or --tpm)")
    key = call_router(args, lambda c: c.update_key(args.id, **changes))
    return _print(args, key.model_dump(), [_key_line(key)])


def _keys_revoke(args: argparse.Namespace) -> int:
    key = call_router(args, lambda c: c.revoke_key(args.id))
    return _print(args, key.model_dump(), [_key_line(key)])


# -- budgets -----------------------------------------------------------------------------------


def _budget_line(v: BudgetView) -> str:
    b = v.budget
    return (
        f"{b.name}  {b.describe()}  {v.spent:.6g} spent + {v.reserved:.6g} reserved of "
        f"{b.limit:.6g} ({v.fraction:.0%})  {v.state}  resets {_when(v.resets_at)}"
    )


def _budgets_list(args: argparse.Namespace) -> int:
    views = call_router(args, lambda c: c.budgets())
    return _print(args, [v.model_dump() for v in views], [_budget_line(v) for v in views])


def _budgets_create(args: argparse.Namespace) -> int:
    try:
        budget = Budget(
            name=args.name, scope=args.scope, subject=args.subject, unit=args.unit,
            window=args.window, limit=args.limit, degrade_at=args.degrade_at,
            degrade_min_quality=args.degrade_min_quality,
        )  # fmt: skip
    except ValidationError as exc:
        raise _invalid("budgets create", exc) from None
    view = call_router(args, lambda c: c.put_budget(budget, force=args.force))
    return _print(args, view.model_dump(), [_budget_line(view)])


def _budgets_set(args: argparse.Namespace) -> int:
    changes = {n: getattr(args, n) for n in ("limit", "degrade_at", "degrade_min_quality")
               if getattr(args, n) is not None}  # fmt: skip
    if not changes:
        raise SystemExit("wattops budgets set: nothing to change (give --limit, --degrade-at ...)")
    view = call_router(args, lambda c: c.patch_budget(args.name, **changes))
    return _print(args, view.model_dump(), [_budget_line(view)])


def _budgets_delete(args: argparse.Namespace) -> int:
    call_router(args, lambda c: c.delete_budget(args.name))
    print(f"budget {args.name} deleted")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--router", metavar="URL", help=f"the router (default ${ROUTER_ENV})")
    parser.add_argument("--json", action="store_true", help="print JSON")


def add_commands(commands: Any) -> None:
    """`wattops keys ...` and `wattops budgets ...` on the CLI's sub-command parser."""
    keys = commands.add_parser("keys", help="API keys of a wattops-router")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key (printed once)")
    create.add_argument("--team", required=True, help="the team it is charged to")
    create.add_argument("--name", help="what it is for")
    create.add_argument("--rpm", type=_positive_int, help="requests per minute")
    create.add_argument("--tpm", type=_positive_int, help="tokens per minute")
    for flag in ("usd-day", "usd-month", "kwh-month", "kgco2e-month"):
        create.add_argument(f"--budget-{flag}", type=_positive_float, metavar="LIMIT",
                            help=f"a budget of this key, {flag.replace('-', ' per ')}")  # fmt: skip
    create.set_defaults(func=_keys_create)
    for name, helptext, func in (("list", "every key", _keys_list),):
        sub = actions.add_parser(name, help=helptext)
        sub.set_defaults(func=func)
        _common(sub)
    for name, helptext, func in (
        ("show", "one key", _keys_show),
        ("revoke", "refuse the key from now on", _keys_revoke),
    ):
        sub = actions.add_parser(name, help=helptext)
        sub.add_argument("id", help="the key's id (wok_<id>_...)")
        sub.set_defaults(func=func)
        _common(sub)
    update = actions.add_parser("update", help="change a key's name or rate limits")
    update.add_argument("id")
    update.add_argument("--name")
    update.add_argument("--rpm", type=_positive_int)
    update.add_argument("--tpm", type=_positive_int)
    update.set_defaults(func=_keys_update)
    _common(create)
    _common(update)

    budgets = commands.add_parser("budgets", help="budgets of a wattops-router")
    actions = budgets.add_subparsers(dest="budgets_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every budget, where it stands")
    listing.set_defaults(func=_budgets_list)
    make = actions.add_parser("create", help="a budget on a key, team, route or the fleet")
    make.add_argument("name")
    make.add_argument("--scope", required=True, choices=["key", "team", "route", "fleet"])
    make.add_argument("--subject", help="the key id, team or route (not for fleet)")
    make.add_argument("--unit", required=True, choices=["usd", "kwh", "kgco2e"])
    make.add_argument("--window", required=True, choices=["hour", "day", "month"])
    make.add_argument("--limit", required=True, type=_positive_float)
    make.add_argument("--degrade-at", type=float, help="fraction of the limit (0..1)")
    make.add_argument("--degrade-min-quality", type=float, help="0..1")
    make.add_argument("--force", action="store_true",
                      help="make it though its key, team or route is not known yet")  # fmt: skip
    make.set_defaults(func=_budgets_create)
    change = actions.add_parser("set", help="raise or lower a budget now")
    change.add_argument("name")
    change.add_argument("--limit", type=_positive_float)
    change.add_argument("--degrade-at", type=float)
    change.add_argument("--degrade-min-quality", type=float)
    change.set_defaults(func=_budgets_set)
    delete = actions.add_parser("delete", help="remove a budget")
    delete.add_argument("name")
    delete.set_defaults(func=_budgets_delete)
    for sub in (listing, make, change, delete):
        _common(sub)
