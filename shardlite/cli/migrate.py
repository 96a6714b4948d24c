"""`shardlite migrate --app module:attr`: bring every tenant to the app's schema, in parallel."""

from __future__ import annotations

import argparse

from .common import echo, emit_json, load_app, positive_int, print_table, progress


def cmd_migrate(args: argparse.Namespace) -> int:
    router = load_app(args.app, args.root)
    try:
        total = sum(router.status()["tenants_per_node"].values())
        with progress("migrating", total, quiet=args.json) as advance:
            failures = router.migrate_all(parallel=args.parallel, progress=lambda key, error: advance())
        versions = router.status()["schema_versions"]
    finally:
        router.close()
    if args.json:
        emit_json({"tenants": total, "failed": failures, "schema_versions": versions})
    else:
        echo(f"migrated {total - len(failures)} of {total} tenants")
        if failures:
            print_table("failures (these tenants stay on their previous version)", ["key", "error"],
                        sorted(failures.items()))
        print_table("tenants per app schema version", ["schema version", "tenants"], sorted(versions.items()))
    return 1 if failures else 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("migrate", help="migrate every tenant to the app's schema (--app module:attr)")
    p.add_argument("--app", required=True, help="module:attr naming a Router or a callable returning one")
    p.add_argument("--parallel", type=positive_int, default=4, help="tenants migrated at once (default 4)")
    p.set_defaults(func=cmd_migrate)
