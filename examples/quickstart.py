"""A walk through shardlite's API on a real data root; prints what each step did.

Run it with `make demo` (data under ./data) or `python examples/quickstart.py --root DIR`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from shardlite import AsyncRouter, Router, StatementNotAllowed, UnknownTenant, pair_key

SCHEMA = {
    "dm": ["CREATE TABLE messages(id INTEGER PRIMARY KEY, author TEXT NOT NULL, body TEXT NOT NULL, at REAL)"],
    "user": ["CREATE TABLE profile(name TEXT NOT NULL, joined REAL NOT NULL)",
             "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL)"],
}


def sync_walk(root: str) -> None:
    with Router(root, schema=SCHEMA) as router:
        print(f"Router on {router.root} (synchronous={router.settings.synchronous})")
        for who in ("alice", "bob"):
            with router.transaction(f"user:{who}") as tx:
                if not tx.execute("SELECT 1 FROM profile").fetchall():
                    tx.execute("INSERT INTO profile(name, joined) VALUES (?, ?)", (who.title(), time.time()))
        dm = pair_key("dm", "bob", "alice")
        print(f"pair_key('dm', 'bob', 'alice') -> {dm!r}")
        with router.transaction(dm) as tx:
            tx.execute("INSERT INTO messages(author, body, at) VALUES (?, ?, ?)", ("alice", "hi bob", time.time()))
            tx.execute("INSERT INTO messages(author, body, at) VALUES (?, ?, ?)", ("bob", "hi alice", time.time()))
        rows = router.query(dm, "SELECT author, body FROM messages ORDER BY id DESC LIMIT 2")
        print(f"last two messages in {dm}: {rows}")
        loc = router.locate(dm)
        print(f"locate({dm!r}) -> node={loc.node} epoch={loc.epoch} state={loc.state}\n    path={loc.path}")
        print(f"locate('user:carol') (never created) -> state={router.locate('user:carol').state}")
        try:
            router.query("user:carol", "SELECT * FROM profile")
        except UnknownTenant as exc:
            print(f"reading a tenant that does not exist -> UnknownTenant: {exc}")
        try:
            router.query(dm, "ATTACH '/etc/passwd' AS x")
        except StatementNotAllowed as exc:
            print(f"ATTACH from user SQL -> StatementNotAllowed: {exc}")
        try:
            with router.transaction(dm) as tx:
                tx.execute("INSERT INTO messages(author, body) VALUES ('mallory', 'never committed')")
                raise RuntimeError("the body failed")
        except RuntimeError:
            count = router.query(dm, "SELECT count(*) FROM messages WHERE author = 'mallory'")[0][0]
            print(f"a failing transaction rolls back: mallory's messages = {count}")
        counter = router.run("user:alice", lambda tx: tx.execute(
            "INSERT INTO notes(body) VALUES ('run() retries whole transactions') RETURNING id").fetchall()[0][0])
        print(f"router.run(...) returned note id {counter}")
        print(f"tenants in the catalog: {sorted(router.tenants())}")
        status = router.status()
        print(f"tenants per node: {status['tenants_per_node']}; per schema version: {status['schema_versions']}")


async def async_walk(root: str) -> None:
    async with AsyncRouter(root, schema=SCHEMA) as ar:
        dm = pair_key("dm", "alice", "bob")

        async def send(i: int) -> None:
            async with ar.transaction(dm) as tx:
                await tx.execute("INSERT INTO messages(author, body, at) VALUES (?, ?, ?)",
                                 ("alice", f"async message {i}", time.time()))

        started = time.perf_counter()
        await asyncio.gather(*(send(i) for i in range(200)))
        elapsed = time.perf_counter() - started
        total = (await ar.query(dm, "SELECT count(*) FROM messages"))[0][0]
        print(f"AsyncRouter: 200 concurrent transactions group-committed in {elapsed * 1000:.1f} ms; "
              f"{dm} now holds {total} messages")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default=os.environ.get("SHARDLITE_ROOT", "./data"))
    args = parser.parse_args()
    sync_walk(args.root)
    asyncio.run(async_walk(args.root))
    print(f"\nInspect it: .venv/bin/shardlite status --root {args.root}")


if __name__ == "__main__":
    main()
