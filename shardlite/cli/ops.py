"""`shardlite backup DEST`, `restore SRC`, `query (--key K | --all) SQL`, `tenants drop|export|import`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .. import backup as backup_mod
from .common import CliError, emit_json, open_router, print_table, progress


def cmd_backup(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        keys = [args.key] if args.key else None
        total = 1 if keys else sum(router.status()["tenants_per_node"].values())
        with progress("backing up", total, quiet=args.json) as advance:
            manifest = backup_mod.backup(router._store, args.dest, keys=keys, progress=lambda k, c: advance(),
                                         parallel=args.parallel)
    summary = {"dest": os.path.abspath(args.dest), "tenants": len(manifest["tenants"]), "copied": manifest["copied"],
               "skipped_unchanged": manifest["skipped"]}
    if args.json:
        emit_json(summary)
    else:
        print(f"backed up {summary['tenants']} tenants and the global DB into {summary['dest']} "
              f"({summary['copied']} copied, {summary['skipped_unchanged']} unchanged since the last backup)")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.as_key and not args.key:
        raise CliError("--as needs --key")
    with open_router(args) as router:
        if args.globals:
            backup_mod.restore_globals(router._store, args.src)
        keys = [args.key] if args.key else None
        restored = router.restore(args.src, keys=keys, as_key=args.as_key, force=args.force)
    if args.json:
        emit_json({"restored": restored})
    else:
        print(f"restored {len(restored)} tenants (each with a new generation and incarnation)")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        keys = None if args.all else [args.key]
        total = sum(router.status()["tenants_per_node"].values()) if args.all else 1
        result = router.map(args.sql, json.loads(args.params) if args.params else (), keys=keys,
                            parallel=args.parallel)
        table: list[tuple[Any, ...]] = []
        with progress("querying", total, quiet=args.json) as advance:
            for key, rows in result:
                advance()
                if args.json:
                    emit_json({"key": key, "columns": result.columns or [], "rows": [list(r) for r in rows]})
                else:
                    table.extend((key, *row) for row in rows)
    if not args.json:
        print_table(f"{result.count} tenants", ["key", *(result.columns or [])], table)
    for key, version in sorted(result.outdated.items()):
        print(f"note: {key} is on schema version {version} (older than the app's; read as it is)",
              file=sys.stderr)
    for key, error in sorted(result.errors.items()):
        print(f"error: {key}: {error}", file=sys.stderr)
    return 1 if result.errors else 0


def cmd_drop(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        router.drop(args.key)
    emit_json({"dropped": args.key}) if args.json else print(f"dropped {args.key} (tombstone kept in the catalog)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        info = router.export(args.key, args.file)
    emit_json(info) if args.json else print(f"exported {args.key} to {info['file']} ({info['size']} bytes)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        backup_mod.import_tenant(router._store, args.file, args.key, force=args.force, keep_events=args.keep_events)
        location = router.locate(args.key)
    if args.json:
        emit_json({"imported": args.key, "node": location.node, "path": location.path})
    else:
        print(f"imported {args.file} as {args.key} on node {location.node}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("backup", help="consistent copies of every tenant and the global DB, with a manifest")
    p.add_argument("dest")
    p.add_argument("--key", help="back up one tenant")
    p.add_argument("--parallel", type=int, default=backup_mod.PARALLEL,
                   help=f"copies at once (default {backup_mod.PARALLEL})")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore tenants from a backup (checksums verified)")
    p.add_argument("src")
    p.add_argument("--key", help="restore one tenant")
    p.add_argument("--as", dest="as_key", help="with --key: restore it under another key")
    p.add_argument("--force", action="store_true", help="replace live tenants")
    p.add_argument("--globals", action="store_true",
                   help="also restore accounts, sessions and app global tables (into an empty root)")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("query", help="a read-only statement on one tenant or all of them")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--key")
    target.add_argument("--all", action="store_true")
    p.add_argument("sql")
    p.add_argument("--params", help="JSON list of parameters")
    p.add_argument("--parallel", type=int, default=4)
    p.set_defaults(func=cmd_query)


def register_tenant_actions(tenants: argparse.ArgumentParser, common: argparse.ArgumentParser) -> None:
    actions = tenants.add_subparsers(dest="action", required=False, metavar="ACTION")
    a = actions.add_parser("drop", help="delete a tenant (with its WAL and SHM); the catalog keeps a tombstone",
                           parents=[common])
    a.add_argument("key")
    a.set_defaults(func=cmd_drop)
    a = actions.add_parser("export", help="write a tenant to a standalone SQLite file", parents=[common])
    a.add_argument("key")
    a.add_argument("file")
    a.set_defaults(func=cmd_export)
    a = actions.add_parser("import", help="create a tenant from an exported file", parents=[common])
    a.add_argument("file")
    a.add_argument("key")
    a.add_argument("--force", action="store_true", help="replace a live tenant")
    a.add_argument("--keep-events", action="store_true",
                   help="keep the file's pending outbox events (checked; only when it holds KEY's own tenant); "
                        "they are dropped by default")
    a.set_defaults(func=cmd_import)
