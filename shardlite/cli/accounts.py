"""`shardlite accounts show EMAIL` and `shardlite sessions purge`."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from .common import CliError, echo, emit_json, open_router, print_table


def cmd_accounts_show(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        account = router.accounts.by_email(args.email)
        if account is None:
            raise CliError(f"no account with an address matching {args.email!r}; check the address (or the "
                           "--root)")
        sessions = router.sessions.count_live(account.id)
        has_password = router.accounts.has_password(account.id)
    info = asdict(account) | {"email_key": router.accounts.key(account.email), "sessions": sessions,
                              "has_password": has_password}
    if args.json:
        emit_json(info)
    else:
        print_table(f"account {account.id}", ["field", "value"], list(info.items()))
    return 0


def cmd_sessions_purge(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        removed = router.sessions.purge()
    if args.json:
        emit_json({"purged": removed})
    else:
        echo(f"purged {removed} expired or revoked sessions")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("accounts", help="inspect accounts")
    accounts = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = accounts.add_parser("show", help="show the account whose address matches EMAIL")
    show.add_argument("email", help="an e-mail address (matched the way accounts are: case and Unicode form folded)")
    show.set_defaults(func=cmd_accounts_show)
    p = sub.add_parser("sessions", help="maintain sessions")
    sessions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    purge = sessions.add_parser("purge", help="delete expired, idle-expired and revoked sessions")
    purge.set_defaults(func=cmd_sessions_purge)
