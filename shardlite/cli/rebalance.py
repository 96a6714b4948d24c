"""`shardlite nodes list|add|remove` and `shardlite rebalance plan|apply|status|resume|cancel|complete`."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..core.movejournal import FINISHED
from ..front.router import Router
from ..services.rebalance import MoveRow, Notice
from .common import CliError, console_line, echo, emit_json, open_router, positive_int, print_table


def _nodes_table(router: Router, title: str) -> None:
    print_table(title, ["node", "state", "weight", "tenants", "path"],
                [(n["name"], n["state"], n["weight"], n["tenants"], n["path"]) for n in router.nodes.counts()])


def cmd_nodes_list(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        if args.json:
            for node in router.nodes.counts():
                emit_json(node)
        else:
            _nodes_table(router, "nodes")
    return 0


def cmd_nodes_add(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        node = router.nodes.add(args.name, path=args.path, weight=args.weight)
        if args.json:
            emit_json({"added": node.name, "path": node.path, "weight": node.weight})
        else:
            echo(f"added node {node.name} at {node.path} (weight {node.weight}); "
                  "`shardlite rebalance plan` shows what would move there")
    return 0


def cmd_nodes_remove(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        if router.rebalance.status().get("state") == "applying":
            raise CliError("a rebalance is being applied: `shardlite rebalance resume` or `cancel` it first")
        if args.name not in {n.name for n in router.nodes.list()}:
            raise CliError(f"unknown node {args.name!r}")
        tenants = {n["name"]: n["tenants"] for n in router.nodes.counts()}.get(args.name, 0)
        if tenants and not args.yes:
            _confirm(f"drain node {args.name}: move its {tenants} tenants to the other nodes?")
        router.nodes.drain(args.name)
        plan_id, plan = router.rebalance.plan()
        if plan.moves:
            status = _apply(router, args, lambda progress, notice: router.rebalance.apply(
                plan_id, parallel=args.parallel, pause_ms=args.pause_ms, progress=progress, notice=notice),
                len(plan.moves), plan.bytes)
            if status["state"] != "done":
                key, error = next(iter(status["errors"].items()), ("?", "unfinished"))
                raise CliError(f"node {args.name} is draining but {len(status['errors'])} of its moves failed "
                               f"(undone; first: {key}: {error}); fix that, `shardlite rebalance resume`, then "
                               f"`shardlite nodes remove {args.name}` again")
            router.rebalance.complete(plan_id)
        remaining = {n["name"]: n for n in router.nodes.counts()}
        if remaining.get(args.name, {}).get("tenants"):
            reason = plan.left_out[0].reason if plan.left_out else "tenants were created or moved meanwhile"
            raise CliError(f"node {args.name} is draining but still holds {remaining[args.name]['tenants']} "
                           f"tenants ({reason}); make room, then `shardlite nodes remove {args.name}` again")
        if args.name in remaining:
            router.nodes.remove(args.name)
        if args.json:
            emit_json({"removed": args.name, "moved": len(plan.moves)})
        else:
            echo(f"node {args.name} drained ({len(plan.moves)} tenants moved) and removed")
    return 0


def _confirm(question: str) -> None:
    if not sys.stdin.isatty():
        raise CliError(f"{question} Pass --yes to confirm when not on a terminal")
    if input(f"{question} [y/N] ").strip().lower() not in ("y", "yes"):
        raise CliError("cancelled; nothing changed")


def _plan_tables(summary: dict[str, Any], moves: list[tuple[str, str, str, int]]) -> None:
    before, after = summary["before"], summary["after"]
    print_table("tenants and bytes per node", ["node", "tenants before", "bytes before", "tenants after",
                                               "bytes after"],
                [(n, before[n][0], before[n][1], after.get(n, (0, 0))[0], after.get(n, (0, 0))[1]) for n in before])
    print_table(f"{len(moves)} moves", ["key", "from", "to", "bytes"], moves[:200])
    if len(moves) > 200:
        echo(f"... and {len(moves) - 200} more (--json lists them all)")
    _left_out(summary)


def _left_out(summary: dict[str, Any]) -> None:
    left_out = summary.get("left_out") or []
    if left_out:
        print_table(f"{summary.get('left_out_count', len(left_out))} moves left out (not enough free space)",
                    ["key", "from", "to", "bytes", "reason"],
                    [(o["key"], o["from"], o["to"], o["bytes"], o["reason"]) for o in left_out[:200]])


def cmd_plan(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        plan_id, plan = router.rebalance.plan()
    left_out = [{"key": o.move.key, "from": o.move.source, "to": o.move.target, "bytes": o.move.size,
                 "reason": o.reason} for o in plan.left_out]
    summary = {"plan": plan_id, "moves": len(plan.moves), "bytes": plan.bytes, "before": plan.before,
               "after": plan.after, "left_out": left_out, "left_out_count": len(left_out)}
    if args.json:
        emit_json(summary | {"move_list": [{"key": m.key, "from": m.source, "to": m.target, "bytes": m.size}
                                           for m in plan.moves]})
    else:
        _plan_tables(summary, [(m.key, m.source, m.target, m.size) for m in plan.moves])
        echo(f"plan {plan_id} recorded; `shardlite rebalance apply` runs it")
    return 0


def _notices(args: argparse.Namespace, console: Console | None = None) -> Any:
    """What a long command waits for or undid: one line each on stderr; nothing in --json mode."""
    def say(notice: Notice) -> None:
        if args.json:
            return
        if console is not None:
            console_line(console, notice)
        else:
            echo(notice, err=True)
    return say


def _apply(router: Router, args: argparse.Namespace, run: Any, total: int, total_bytes: int) -> dict[str, Any]:
    """``run(progress, notice)``: with a progress bar on a terminal, JSON lines with --json."""
    if args.json or not sys.stderr.isatty():
        def quiet(move: MoveRow) -> None:
            if args.json:
                emit_json({"key": move.key, "from": move.source, "to": move.target, "step": move.step,
                           "bytes": move.size, "error": move.error, "at": time.time()})
        return run(quiet, _notices(args))  # type: ignore[no-any-return]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    console = Console(stderr=True)
    with Progress(*columns, console=console) as bar:
        tenants = bar.add_task("tenants", total=total)
        size = bar.add_task("bytes", total=total_bytes)

        def advance(move: MoveRow) -> None:
            bar.advance(tenants)
            bar.advance(size, move.size)
        return run(advance, _notices(args, console))  # type: ignore[no-any-return]


def _report(status: dict[str, Any], args: argparse.Namespace, *, all_settled: bool = False) -> int:
    """Print a plan's status. Exit status 1 when moves failed (or were skipped), and with ``all_settled``
    also when some are not finished (a cancel that gave up waiting)."""
    if args.json:
        emit_json(status)
    else:
        if status.get("plan") is None:
            echo("no rebalance plan yet")
            return 0
        echo(f"plan {status['plan']}: {status['state']}; steps: "
              + ", ".join(f"{k} {v}" for k, v in sorted(status["steps"].items())))
        pauses = status["pause_ms"]
        if pauses["p50"] is not None:
            echo(f"write pause per tenant (ms): p50 {pauses['p50']:.1f}, p99 {pauses['p99']:.1f}, "
                  f"max {pauses['max']:.1f}")
        for key, error in status["errors"].items():
            echo(f"  {key}: {error}")
        for key, what in status.get("rolled_back", {}).items():
            echo(f"  {key}: rolled back: {what}")
        for key, held in status.get("held", {}).items():
            echo(f"  {key}: held by {held['owner']} at step {held['step']} (lease until "
                  f"{time.strftime('%H:%M:%S', time.localtime(held['until']))})")
        if status.get("left_out_count"):
            echo(f"  {status['left_out_count']} moves were left out of the plan for lack of free space "
                  "(`rebalance status --json` lists them)")
    unsettled = any(step not in FINISHED for step in status.get("steps", {}))
    return 1 if status.get("errors") or (all_settled and unsettled) else 0


def cmd_apply(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        planned = router.rebalance.status()
        if planned.get("state") != "planned":
            raise CliError("no planned rebalance (`shardlite rebalance plan` makes one)")
        if not args.yes:
            _confirm(f"apply plan {planned['plan']}: {planned['moves']} moves, {planned['bytes']} bytes?")
        status = _apply(router, args, lambda progress, notice: router.rebalance.apply(
            parallel=args.parallel, pause_ms=args.pause_ms, progress=progress, notice=notice),
            planned["moves"], planned["bytes"])
    return _report(status, args)


def cmd_resume(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        current = router.rebalance.status()
        left = sum(v for k, v in current.get("steps", {}).items() if k not in FINISHED)
        status = _apply(router, args, lambda progress, notice: router.rebalance.resume(
            parallel=args.parallel, pause_ms=args.pause_ms, progress=progress, notice=notice),
            left, current.get("bytes", 0))
    return _report(status, args)


def cmd_status(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        return _report(router.rebalance.status(), args)


def cmd_cancel(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        return _report(router.rebalance.cancel(wait=args.wait, notice=_notices(args)), args, all_settled=True)


def cmd_complete(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        return _report(router.rebalance.complete(), args)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("nodes", help="list, add and remove storage nodes")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="nodes with their state, weight and tenants")
    a.set_defaults(func=cmd_nodes_list)
    a = actions.add_parser("add", help="add a node (directory created 0700)")
    a.add_argument("name", help="the node's name (letters, digits, '_', '.', '-')")
    a.add_argument("--path", help="directory for the node (default: <root>/<name>)")
    a.add_argument("--weight", type=int, default=1, help="relative share of tenants (default 1)")
    a.set_defaults(func=cmd_nodes_add)
    a = actions.add_parser("remove", help="drain a node (its tenants move away), then remove it")
    a.add_argument("name", help="the node to drain and remove")
    _throttle(a)
    a.set_defaults(func=cmd_nodes_remove)

    p = sub.add_parser("rebalance", help="move tenants to where the ring places them, online")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("plan", help="compute and record the moves")
    a.set_defaults(func=cmd_plan)
    a = actions.add_parser("apply", help="run the planned moves")
    _throttle(a)
    a.set_defaults(func=cmd_apply)
    a = actions.add_parser("status", help="the latest plan's progress")
    a.set_defaults(func=cmd_status)
    a = actions.add_parser("resume", help="continue an interrupted apply")
    _throttle(a)
    a.set_defaults(func=cmd_resume)
    a = actions.add_parser("cancel", help="undo unfinished moves")
    a.add_argument("--wait", type=float, default=None, metavar="SECONDS",
                   help="how long to wait for other rebalancers' moves to be undone (default: 30 s or 3 leases)")
    a.set_defaults(func=cmd_cancel)
    a = actions.add_parser("complete", help="delete retired copies; remove drained nodes")
    a.set_defaults(func=cmd_complete)


def _throttle(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--parallel", type=positive_int, default=1, help="tenants moved at once (default 1)")
    parser.add_argument("--pause-ms", type=float, default=0.0, help="pause between tenants, to throttle")
