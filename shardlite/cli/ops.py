"""`shardlite backup DEST`, `restore SRC`, `query (--key K | --all) SQL`, `tenants drop|export|import`."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from typing import Any

from ..errors import StatementNotAllowed
from ..services import backup as backup_mod
from ..services import erase as erase_mod
from ..services import restore as restore_mod
from ..services.restore_layout import root_state
from .common import (
    CliError,
    advice,
    echo,
    emit_json,
    open_router,
    positive_int,
    print_table,
    progress,
    root_of,
)

_READ_ONLY = "write through your app instead"


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
        echo(f"backed up {summary['tenants']} tenants and the global DB into {summary['dest']} "
             f"({summary['copied']} copied, {summary['skipped_unchanged']} unchanged since the last backup)")
    return 0


def parse_node_paths(pairs: list[str]) -> dict[str, str]:
    paths: dict[str, str] = {}
    for pair in pairs:
        name, sep, directory = pair.partition("=")
        if not sep or not name or not directory:
            raise CliError(f"--node-path expects NAME=DIR, got {pair!r}")
        if name in paths:
            raise CliError(f"--node-path names node {name!r} twice; give it one directory")
        paths[name] = directory
    return paths


def cmd_restore(args: argparse.Namespace) -> int:
    if args.as_key and not args.key:
        raise CliError("--as needs --key (it restores one tenant under another key)")
    if args.from_url is not None:
        if args.src is not None:
            raise CliError("name either a backup directory (SRC) or a replica (--from URL), not both")
        from .replicate import restore_from_replica
        return restore_from_replica(args)
    if args.src is None:
        raise CliError("name the backup directory (SRC) or a replica (--from URL)")
    if args.at is not None:
        raise CliError("--at applies to a replica (--from URL); a backup holds one point in time")
    if args.skip_damaged:
        raise CliError("--skip-damaged applies to a replica (--from URL); a backup is checked whole and refused "
                       "when damaged")
    root = root_of(args)
    node_paths = parse_node_paths(args.node_path or [])
    if root_state(root) != "live":
        if args.as_key:  # --globals and --force are implied here: the whole backup goes into a new or empty root
            raise CliError(f"--as restores into a live root; {root} is new or empty: restore without --as first")
        try:
            with progress("restoring", None, quiet=args.json) as advance:
                done = restore_mod.restore_root(args.src, root, node_paths=node_paths,
                                                keys=[args.key] if args.key else None, progress=lambda key: advance())
        except KeyboardInterrupt:
            kept = root_state(root) == "live"  # an empty root keeps the tenants registered before the interrupt
            echo(f"shardlite restore: interrupted; {root} keeps the tenants restored so far: run the command again "
                 "with --force" if kept else f"shardlite restore: interrupted; what the restore made in {root} was "
                 "taken back: run the command again", err=True)
            return 130
        _report_root(done, args)
        return 0
    if node_paths:
        raise CliError(f"--node-path applies to a new root; {root} is a live data root that keeps its own nodes")
    with open_router(args) as router:
        if args.globals:
            backup_mod.restore_globals(router._store, args.src)
        keys = [args.key] if args.key else None
        restored = router.restore(args.src, keys=keys, as_key=args.as_key, force=args.force)
    if args.json:
        emit_json({"restored": restored})
    else:
        echo(f"restored {len(restored)} tenants (each with a new generation and incarnation)")
    return 0


def _report_root(done: restore_mod.RootRestore, args: argparse.Namespace) -> None:
    if args.json:
        emit_json({"root": done.root, "created": done.created, "restored": done.tenants,
                   "nodes": [asdict(plan) for plan in done.nodes], "globals": done.globals})
        return
    echo(f"{'created' if done.created else 'filled the empty'} data root {done.root} with the backup's node "
         f"layout ({len(done.nodes)} {'node' if len(done.nodes) == 1 else 'nodes'})")
    print_table("nodes", ["node", "path", "weight", "state", "path in the backup"],
                [(p.name, p.path, p.weight, p.state, p.was) for p in done.nodes])
    echo(f"restored {len(done.tenants)} tenants (each with a new generation and incarnation)")
    rows = ", ".join(f"{_shown_table(table)} {count}" for table, count in sorted(done.globals.items()))
    echo(f"restored the global data (rows: {rows or 'none'})")


def _shown_table(table: str) -> str:
    internal = "_shardlite_"
    return table[len(internal):] if table.startswith(internal) else f"app table {table}"


def _params(text: str | None) -> Any:
    if text is None:
        return ()
    try:
        params = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CliError(f"--params is not valid JSON ({exc}); pass a JSON list such as '[1, \"a\"]' or an object "
                       "for named parameters") from None
    if not isinstance(params, (list, dict)):
        raise CliError("--params must be a JSON list (or an object for named parameters), such as '[1, \"a\"]'")
    values = params.values() if isinstance(params, dict) else params
    if any(isinstance(value, (list, dict)) for value in values):
        raise CliError("--params values are numbers, text, true/false or null, not lists or objects, such as "
                       "'[1, \"a\"]'")
    return params


def cmd_query(args: argparse.Namespace) -> int:
    params = _params(args.params)
    table: list[tuple[Any, ...]] = []
    with open_router(args) as router, advice(_READ_ONLY, StatementNotAllowed):
        keys = None if args.all else [args.key]
        total = sum(router.status()["tenants_per_node"].values()) if args.all else 1
        result = router.map(args.sql, params, keys=keys, parallel=args.parallel)
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
        echo(f"note: {key} is on schema version {version} (older than the app's; read as it is)", err=True)
    for key, error in sorted(result.errors.items()):
        hint = "; `shardlite tenants` lists the live ones" if error == "no such tenant" else ""
        echo(f"shardlite query: error: {key}: {error}{hint}", err=True)
    return 1 if result.errors else 0


def cmd_drop(args: argparse.Namespace) -> int:
    if args.erase:
        with open_router(args) as router:
            receipt = router.drop(args.key, erase=True)
        if args.json:
            emit_json(receipt)
        else:
            for line in erase_mod.describe(receipt):
                echo(line)
        if not receipt["complete"]:
            echo("shardlite tenants drop: error: the erase is not complete (the lines in capitals above say what "
                 "is left: an unreadable pack may still hold the tenant, inspect or delete it): then run the erase "
                 "again", err=True)
            return 1
        return 0
    with open_router(args) as router:
        router.drop(args.key)
    emit_json({"dropped": args.key}) if args.json else echo(f"dropped {args.key} (tombstone kept in the catalog)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        info = router.export(args.key, args.file)
    emit_json(info) if args.json else echo(f"exported {args.key} to {info['file']} ({info['size']} bytes)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        backup_mod.import_tenant(router._store, args.file, args.key, force=args.force, keep_events=args.keep_events)
        location = router.locate(args.key)
    if args.json:
        emit_json({"imported": args.key, "node": location.node, "path": location.path})
    else:
        echo(f"imported {args.file} as {args.key} on node {location.node}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("backup", help="consistent copies of every tenant and the global DB, with a manifest")
    p.add_argument("dest", help="the backup directory (created 0700; a previous backup there is updated)")
    p.add_argument("--key", help="back up one tenant")
    p.add_argument("--parallel", type=positive_int, default=backup_mod.PARALLEL,
                   help=f"copies at once (default {backup_mod.PARALLEL})")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="restore tenants from a backup (checksums verified) or from the replica "
                                       "(--from URL); into a new or empty root: the whole root, nodes and "
                                       "global data included")
    p.add_argument("src", nargs="?", help="the backup directory (holds manifest.json)")
    p.add_argument("--from", dest="from_url", metavar="URL",
                   help="restore from a replica (s3://bucket/prefix or file:///path) instead of a backup: a whole "
                        "root into a new or empty --root, or one tenant (--key) into a live one")
    p.add_argument("--at", metavar="TIME",
                   help="with --from: each tenant at its last commit at or before TIME (a whole root: the tenants "
                        "live at TIME, so none dropped before it), the metadata at its last snapshot before it "
                        "(ISO 8601 with a time zone, e.g. 2026-12-06T18:00:00Z); default: the latest")
    p.add_argument("--key", help="restore one tenant")
    p.add_argument("--as", dest="as_key", help="with --key: restore it under another key")
    p.add_argument("--force", action="store_true", help="replace live tenants")
    p.add_argument("--skip-damaged", action="store_true",
                   help="with --from: leave out replica objects that fail their checks (damaged, truncated, not "
                        "written by shardlite) instead of restoring nothing; commits only they held are missing "
                        "then, and each one left out is printed")
    p.add_argument("--globals", action="store_true",
                   help="also restore accounts, sessions and app global tables into a root without tenants "
                        "(a new or empty root gets them anyway)")
    p.add_argument("--node-path", action="append", metavar="NAME=DIR",
                   help="new root only: put the backup's node NAME in DIR (repeatable; default: its place "
                        "under the new root, or <root>/NAME for a node that was outside the old root)")
    p.set_defaults(func=cmd_restore)
    p = sub.add_parser("query", help="a read-only statement on one tenant or all of them")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--key", help="the tenant to read")
    target.add_argument("--all", action="store_true", help="read every tenant")
    p.add_argument("sql", help="one read-only SQL statement")
    p.add_argument("--params", help="JSON list of parameters (or an object for named ones)")
    p.add_argument("--parallel", type=positive_int, default=4, help="tenants read at once (default 4)")
    p.set_defaults(func=cmd_query)


def register_tenant_actions(tenants: argparse.ArgumentParser) -> None:
    actions = tenants.add_subparsers(dest="action", required=False, metavar="ACTION")
    a = actions.add_parser("drop", help="delete a tenant (with its WAL and SHM); the catalog keeps a tombstone; a "
                                        "replica keeps its history until retention expires, unless --erase")
    a.add_argument("key", help="the tenant to drop")
    a.add_argument("--erase", action="store_true",
                   help="also remove every capture of KEY (any incarnation) from the root's replica: packs holding "
                        "it are rewritten without it or deleted, its staged captures go, a tombstone keeps restores "
                        "from bringing it back; prints a receipt (what was deleted, where, when; --json for JSON). "
                        "Safe to run again after an interruption, and on a key already dropped or erased")
    a.set_defaults(func=cmd_drop)
    a = actions.add_parser("export", help="write a tenant to a standalone SQLite file")
    a.add_argument("key", help="the tenant to export")
    a.add_argument("file", help="the file to write (must not exist)")
    a.set_defaults(func=cmd_export)
    a = actions.add_parser("import", help="create a tenant from an exported file")
    a.add_argument("file", help="a standalone SQLite file (an export)")
    a.add_argument("key", help="the key of the tenant to create")
    a.add_argument("--force", action="store_true", help="replace a live tenant")
    a.add_argument("--keep-events", action="store_true",
                   help="keep the file's pending outbox events (checked; only when it holds KEY's own tenant); "
                        "they are dropped by default")
    a.set_defaults(func=cmd_import)
