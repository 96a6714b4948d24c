"""`shardlite meta copy --to URL`: move a root's embedded metadata to PostgreSQL; `shardlite meta show`;
`shardlite meta roots` and `meta forget ROOT_ID` for the roots of a shared PostgreSQL database."""

from __future__ import annotations

import argparse
import datetime
import os
from typing import TYPE_CHECKING, Any

from ..errors import ConfigurationError, MetaUnavailable
from ..meta.choose import ENV_VAR
from ..meta.location import MetaLocation, parse_location
from ..meta.record import read_record
from .common import CliError, echo, emit_json, print_table, require_root, root_of

if TYPE_CHECKING:
    from ..meta.postgres.roots import RootRow


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


def _location(args: argparse.Namespace) -> MetaLocation:
    url = args.meta or os.environ.get(ENV_VAR)
    if not url:
        raise CliError(f"no database: pass --meta postgresql://user@host:port/dbname or set {ENV_VAR}")
    try:
        return parse_location(url)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def _shown(row: RootRow) -> dict[str, Any]:
    return {"id": row.id, "label": row.label, "created": row.created, "nodes": row.nodes, "tenants": row.tenants}


def cmd_roots(args: argparse.Namespace) -> int:
    location = _location(args)
    from ..meta.postgres.roots import list_roots  # loads psycopg: only for this command

    try:
        rows = list_roots(location)
    except (ConfigurationError, MetaUnavailable) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        emit_json({"location": location.printable, "roots": [_shown(row) for row in rows]})
        return 0
    print_table(f"roots in {location.printable}", ["id", "created in", "created", "nodes", "tenant rows"],
                [(row.id, row.label, _when(row.created), ", ".join(row.nodes), row.tenants) for row in rows])
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    location = _location(args)
    from ..meta.postgres.roots import forget_root, list_roots  # loads psycopg: only for this command

    try:
        if not args.yes:
            found = {row.id: row for row in list_roots(location)}.get(args.root_id)
            if found is None:
                raise CliError(f"the database at {location.printable} holds no root {args.root_id!r}: "
                               "`shardlite meta roots` lists them")
            echo(f"would forget root {found.id} (created in {found.label}): its {found.tenants} tenant rows, nodes "
                 f"{', '.join(found.nodes) or 'none'}, named values and rebalance plans; accounts and sessions "
                 "stay. Run again with --yes to do it", err=True)
            return 1
        gone = forget_root(location, args.root_id)
    except (ConfigurationError, MetaUnavailable) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        emit_json({"location": location.printable, "forgotten": _shown(gone)})
    else:
        echo(f"forgot root {gone.id} (created in {gone.label}): {gone.tenants} tenant rows and nodes "
             f"{', '.join(gone.nodes) or 'none'}; restore its backup or replica into a new root now")
    return 0


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat(timespec="seconds")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("meta", help="where the root's metadata lives; move it to PostgreSQL; the roots of a shared "
                                     "PostgreSQL database")
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
    r = actions.add_parser("roots", help="the roots a PostgreSQL database holds (id, where each was created, "
                                         "nodes, tenant rows)")
    r.add_argument("--meta", metavar="URL", help=f"postgresql://user@host:port/dbname (default: ${ENV_VAR})")
    r.set_defaults(func=cmd_roots)
    f = actions.add_parser(
        "forget", help="remove a lost root's rows from a shared PostgreSQL database (its tenants, nodes, named "
                       "values, rebalance plans), so its backup or replica can be restored into a new root there",
        description="For a root whose directory is lost: its tenant keys and node names stay taken in the "
                    "database until its rows go. Refused for a root alive on this machine (the directory it was "
                    "created in holds its meta.json). Accounts and sessions are the database's and stay. Without "
                    "--yes it only says what would go.")
    f.add_argument("root_id", metavar="ROOT_ID", help="the root's id (`shardlite meta roots` lists them)")
    f.add_argument("--meta", metavar="URL", help=f"postgresql://user@host:port/dbname (default: ${ENV_VAR})")
    f.add_argument("--yes", action="store_true", help="do it (without: only say what would go)")
    f.set_defaults(func=cmd_forget)
