"""`shardlite init`, `status`, `locate`, `tenants`."""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from ..errors import ConfigurationError
from ..front.router import Router
from ..meta.choose import ENV_VAR
from ..meta.record import RECORD_NAME
from .common import CliError, echo, emit_json, open_router, print_table, root_of
from .ops import register_tenant_actions


def cmd_init(args: argparse.Namespace) -> int:
    root = root_of(args)
    nodes = [n.strip() for n in args.nodes.split(",") if n.strip()] if args.nodes else None
    existed = os.path.exists(os.path.join(root, "global.db")) or os.path.exists(os.path.join(root, RECORD_NAME))
    try:
        with Router(root, nodes=nodes, meta=args.meta, replicate=args.replicate) as router:
            names = [n["name"] for n in router.status()["nodes"]]
            where = router._store.meta.location
            replica = router._store.replicate
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        emit_json({"root": root, "nodes": names, "created": not existed, "meta": where, "replicate": replica})
    else:
        elsewhere = "" if where.startswith("sqlite:") else f"; metadata in {where}"
        replicated = f"; replicated to {replica}" if replica else ""
        echo(f"{'existing' if existed else 'created'} data root {root} with nodes: {', '.join(names)}{elsewhere}"
             f"{replicated}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        status = router.stats()
    if args.json:
        emit_json(status)
        return 0
    counts = status["tenants_per_node"]
    sizes = status["bytes_per_node"]
    print_table(f"shardlite {status['root']} (synchronous={status['synchronous']})",
                ["node", "state", "weight", "tenants", "bytes", "path"],
                [(n["name"], n["state"], n["weight"], counts.get(n["name"], 0), sizes.get(n["name"], 0), n["path"])
                 for n in status["nodes"]])
    print_table("tenants per app schema version", ["schema version", "tenants"],
                sorted(status["schema_versions"].items()))
    echo(f"replica: {status['replicate'] or 'none (not replicated)'}")
    relay, rebalance = status["relay"], status["rebalance"]
    echo(f"relay: {relay['pending']} pending, lag {relay['lag_seconds']:.3f} s, {relay['dead_letters']} dead letters; "
         f"rebalance: {rebalance['state'] or 'none'}")
    return 0


def cmd_locate(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        location = router.locate(args.key)
    if args.json:
        emit_json(asdict(location))
    else:
        print_table(f"locate {location.key}", ["field", "value"],
                    [(k, v) for k, v in asdict(location).items()])
    return 0


def cmd_tenants(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        records = router._store.meta.tenants.iter_tenants()
        rows = []
        for i, record in enumerate(records):
            if args.limit is not None and i >= args.limit:
                break
            row = {"key": record.key, "node": record.node, "generation": record.generation,
                   "epoch": record.epoch, "state": record.state, "schema_version": record.schema_version}
            if args.json:
                emit_json(row)
            else:
                rows.append(row)
    if not args.json:
        print_table("tenants", ["key", "node", "generation", "epoch", "state", "schema"],
                    [tuple(r.values()) for r in rows])
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("init", help="create a data root (idempotent)")
    p.add_argument("--nodes", help="comma-separated node names for a new root (default: n1)")
    p.add_argument("--meta", metavar="URL",
                   help=f"where a new root keeps its metadata: postgresql://user@host:port/dbname (default: "
                        f"${ENV_VAR}, else the embedded global.db); recorded in ROOT/meta.json without a password")
    p.add_argument("--replicate", metavar="URL",
                   help="replicate every tenant to s3://bucket/prefix[?endpoint=http://host:port] (credentials from "
                        "the AWS environment, never the URL) or file:///absolute/dir; recorded in the root's "
                        "metadata on first use")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("status", help="nodes, tenants per node and per schema version, relay lag, rebalance state")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("locate", help="where a key lives (never creates it)")
    p.add_argument("key", help="the tenant's key (e.g. user:42)")
    p.set_defaults(func=cmd_locate)
    p = sub.add_parser("tenants", help="list live tenants; drop, export or import one")
    p.add_argument("--limit", type=int, default=None, help="list at most N tenants")
    p.set_defaults(func=cmd_tenants)
    register_tenant_actions(p)
