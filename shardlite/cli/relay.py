"""`shardlite relay run --app module:attr [--once]`, `relay status`, `relay dead`, `relay retry`."""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import asdict
from typing import Any

from .common import echo, emit_json, load_app, log_to_stderr, open_router, print_table


def _some(keys: list[str], shown: int = 10) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def cmd_run(args: argparse.Namespace) -> int:
    router = load_app(args.app, args.root)
    log_to_stderr()
    try:
        if args.once:
            try:
                stats = router.relay.drain(timeout=args.timeout)
            except Exception as exc:  # noqa: BLE001 - not one tenant's error (those are confined): say it in one line
                echo(f"shardlite relay run: {type(exc).__name__}: {exc}; fix that and run the relay again", err=True)
                return 1
            report: dict[str, Any] = asdict(stats) | {"unhandled_topics": sorted(stats.unhandled_topics),
                                                      "failing": sorted(stats.failing)}
            if args.json:
                emit_json(report)
            else:
                echo(f"delivered {stats.delivered}, dead-lettered {stats.dead}, failed attempts {stats.failed}, "
                      f"unhandled {stats.unhandled} ({', '.join(report['unhandled_topics']) or 'none'}), "
                      f"deferred {stats.deferred}, failing tenants {len(stats.failing)} ({_some(report['failing'])})")
            return 0
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        router.relay.start()
        if not args.json:
            echo(f"relay running for {router.root} (handlers: {', '.join(sorted(router._handlers)) or 'none'}); "
                  "Ctrl-C stops it")
        stop.wait()
        router.relay.stop()
        return 0
    finally:
        router.close()


def cmd_status(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        status = router.relay.status()
    # about this process, meaningless here; the last error is the one any relay of the root recorded
    del status["unhandled_topics"], status["running"], status["failing"], status["unavailable"]
    if args.json:
        emit_json(status)
        return 0
    print_table("relay status", ["node", "pending", "oldest age (s)", "sources", "dead letters"],
                [(n, v["pending"], f"{v['oldest_age']:.3f}", v["sources"], v["dead_letters"])
                 for n, v in sorted(status["nodes"].items())])
    echo(f"pending {status['pending']}, lag {status['oldest_age']:.3f} s, dead letters {status['dead_letters']}")
    if status["topics"]:
        echo("pending per topic: " + ", ".join(f"{t} {n}" for t, n in status["topics"].items()))
    last = status["last_error"]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(last.get("at", 0))))
        echo(f"last relay error ({when}): {last.get('error')}")
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        letters = router._store.meta.dead_letters.list(limit=args.limit)
    if args.json:
        for letter in letters:
            emit_json(asdict(letter))
    else:
        print_table("dead letters", ["source", "seq", "dest", "topic", "attempts", "error"],
                    [(d.source, d.seq, d.dest, d.topic, d.attempts, d.error) for d in letters])
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    with open_router(args) as router:
        count = router.relay.retry_dead(source=args.source, seq=args.seq)
    if args.json:
        emit_json({"requeued": count})
    else:
        echo(f"requeued {count} dead letters as new events")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("relay", help="run the outbox relay; inspect and retry dead letters")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    run = actions.add_parser("run", help="deliver events with the handlers of --app until stopped")
    run.add_argument("--app", required=True, help="module:attr naming a Router or a callable returning one")
    run.add_argument("--once", action="store_true",
                     help="drain everything pending (waiting out retries and dead relays' leases), then exit")
    run.add_argument("--timeout", type=float, default=300.0, help="with --once: give up after this many seconds")
    run.set_defaults(func=cmd_run)
    status = actions.add_parser("status", help="pending events, lag and dead letters per node")
    status.set_defaults(func=cmd_status)
    dead = actions.add_parser("dead", help="list dead letters")
    dead.add_argument("--limit", type=int, default=1000, help="list at most N dead letters (default 1000)")
    dead.set_defaults(func=cmd_dead)
    retry = actions.add_parser("retry", help="requeue dead letters as new events")
    retry.add_argument("--source", help="only dead letters from this source key")
    retry.add_argument("--seq", type=int, help="only this sequence number (with --source)")
    retry.set_defaults(func=cmd_retry)
