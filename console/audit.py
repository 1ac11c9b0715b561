"""`wattops audit`: who did what to an agent or a router, from its audit log.

    wattops audit --agent http://node:8080 [--since 1h] [--follow] [--json]
    wattops audit --router http://router:8090 ...

Needs an operator's (or an admin's) token: `$WATTOPS_TOKEN` or the credentials file. One line
per control call, allowed or refused: when, who (the token's name), from where, what, the
outcome, and the subject's figures at the time (agents). `--follow` keeps printing new ones.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

import httpx

from wattops.console.report import parse_moment
from wattops.vocabulary.tls import client_ssl

__all__ = ["add_command", "line"]


def line(e: dict[str, Any]) -> str:
    """One entry for people."""
    when = dt.datetime.fromtimestamp(float(e.get("time", 0)), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = "" if e.get("body") is None else " " + json.dumps(e["body"], separators=(",", ":"))
    out = (f"{when} {e.get('daemon', '?')} {e.get('who', '?')}@{e.get('from') or '?'} "
           f"{e.get('method', '?')} {e.get('path', '?')}{body} -> {e.get('status')} "
           f"{e.get('outcome', '?')}")  # fmt: skip
    if e.get("message"):
        out += f": {e['message']}"
    if e.get("figures"):
        f = e["figures"]
        out += (f" [{f.get('precision')} {f.get('ready_replicas')}/{f.get('desired_replicas')}"
                f" replicas]")  # fmt: skip
    return out


def _audit(args: argparse.Namespace) -> int:
    from wattops.fleet.credentials import CredentialsError, load_token

    try:
        token = load_token()
    except CredentialsError as exc:
        print(f"wattops audit: {exc}", file=sys.stderr)
        return 2
    url = (args.agent or args.router).rstrip("/")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    since = args.since
    # Verified against $WATTOPS_CA (and with $WATTOPS_CLIENT_CERT), as every operator tool.
    with httpx.Client(base_url=url, headers=headers, timeout=10, verify=client_ssl()) as client:
        while True:
            try:
                resp = client.get("/v1/audit", params={"since": since, "limit": args.limit})
            except httpx.HTTPError as exc:
                print(f"wattops audit: {url}: {exc}", file=sys.stderr)
                return 1
            if resp.status_code != 200:
                try:
                    said = resp.json().get("message") or resp.json()["error"]["message"]
                except (ValueError, KeyError, TypeError, AttributeError):
                    said = resp.text[:200]
                print(f"wattops audit: {url} answered {resp.status_code}: {said}",
                      file=sys.stderr)  # fmt: skip
                return 1
            page = resp.json()
            for entry in page["entries"]:
                print(json.dumps(entry) if args.json else line(entry), flush=True)
                since = max(since, float(entry.get("time", 0)) + 0.001)
            if page.get("torn_lines") and not args.follow:
                print(f"({page['torn_lines']} torn line(s) skipped: written when the daemon "
                      "was killed)", file=sys.stderr)  # fmt: skip
            if not args.follow:
                return 0
            time.sleep(1.0)


def add_command(commands: Any) -> None:
    audit = commands.add_parser("audit", help="who did what to an agent or a router")
    where = audit.add_mutually_exclusive_group(required=True)
    where.add_argument("--agent", help="the agent's URL")
    where.add_argument("--router", help="the router's URL")
    audit.add_argument("--since", type=parse_moment, default=0.0,
                       help="from when: 1h, 30d, 2026-11-01 (default: all kept)")  # fmt: skip
    audit.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    audit.add_argument("--follow", action="store_true", help="keep printing new entries")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")
    audit.set_defaults(func=_audit)
