"""`shardlite meta copy --to URL`: move a root's embedded metadata to PostgreSQL; `shardlite meta show`."""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigurationError, MetaUnavailable
from ..meta.choose import ENV_VAR
from ..meta.location import parse_location
from ..meta.record import read_record
from .common import CliError, echo, emit_json, require_root, root_of


def cmd_copy(args: argparse.Namespace) -> int:
    root = root_of(args)
    require_root(root)
    url = args.to or os.environ.get(ENV_VAR)
    if not url:
        raise CliError(f"no target: pass --to postgresql://user@host:port/dbname or set {ENV_VAR} (a password "
                       "is better given by PGPASSWORD or ~/.pgpass than on the command line)")
    from ..meta.copy import copy_to_postgres  # loads psycopg: only for this command

    try:
        report = copy_to_postgres(root, url)
    except MetaUnavailable as exc:
        raise CliError(f"{exc}; nothing was switched: run meta copy again once it can be reached") from exc
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        emit_json({"root": root, "location": report.location, "rows": report.rows, "resumed": report.resumed})
    elif not report.rows:
        echo(f"{root}: metadata is at {report.location} already")
    else:
        counts = ", ".join(f"{n} {name}" for name, n in report.rows.items() if n)
        echo(f"{root}: metadata moved to {report.location} and verified ({counts or 'no rows'}); global.db is "
             "fenced: restart every process using this root")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    root = root_of(args)
    require_root(root)
    try:
        record = read_record(root)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    require_root(root)
    where = record.location.printable if record else parse_location(None).printable
    if args.json:
        emit_json({"root": root, "backend": "postgresql" if record else "sqlite", "location": where,
                   "root_id": record.root_id if record else None})
    else:
        echo(f"{root}: metadata in {where if record else os.path.join(root, 'global.db') + ' (embedded)'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("meta", help="where the root's metadata lives; move it to PostgreSQL")
    actions = p.add_subparsers(dest="meta_command", required=True, metavar="ACTION")
    c = actions.add_parser(
        "copy", help="move the root's metadata (catalog, nodes, journal, pending work, dead letters, accounts, "
                     "credentials, sessions) from global.db to PostgreSQL, verify it, then switch the root to it",
        description="Copies every shardlite table of global.db into the PostgreSQL database (one transaction), "
                    "compares both row by row, fences global.db against writes, and records the location in "
                    "ROOT/meta.json. Metadata writes of running processes wait (or fail with Busy) meanwhile, "
                    "and fail after the switch until they are restarted. Refused while a rebalance is in "
                    "flight. Safe to run again after a crash at any point. The app's own global tables stay in "
                    "ROOT/app_global.db.")
    c.add_argument("--to", metavar="URL",
                   help=f"postgresql://user@host:port/dbname (default: ${ENV_VAR}); never recorded with a password")
    c.set_defaults(func=cmd_copy)
    s = actions.add_parser("show", help="where the root's metadata lives (embedded global.db, or PostgreSQL)")
    s.set_defaults(func=cmd_show)
