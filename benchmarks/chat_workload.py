"""The headline benchmark (brief §6, last row): the chat workload at the library level on three backends.

Usage::

    .venv/bin/python benchmarks/chat_workload.py            # full run (a few minutes)
    .venv/bin/python benchmarks/chat_workload.py --quick    # short run (about a minute)
    .venv/bin/python benchmarks/chat_workload.py --profile  # + CPU split and cProfile of 2 extra shardlite rounds
    .venv/bin/python benchmarks/chat_workload.py --meta     # + the shardlite row with metadata on PostgreSQL

The workload. ``--users`` (200) accounts; every user has 8 DM contacts (a ring: the users 1 to 4 places
either side, so 800 DM pairs) and belongs to one of 20 rooms of 10 members. ``--tasks`` (64) concurrent
simulated users each run their share of a fixed, seeded list of operations, one after another; each
operation picks a random user and, for DMs, one of that user's contacts. The mix is exact (the list is
shuffled): 40% send a DM, 30% read a DM history (limit 50), 20% read the user's activity feed (limit 50),
10% post to the user's room (10 members, so 10 feed entries). Every backend runs the *same* operations
(same seed, same users, same texts, same per-task split) with the same concurrency.

The backends (each in its own process: the stdlib ``sqlite3`` module, which aiosqlite uses, must never be
loaded in a process that opens shardlite files):

* **shardlite**: ``examples.chat.domain.Chat`` over ``AsyncRouter(root, schema=SCHEMA,
  global_schema=GLOBAL_SCHEMA, relay=True, max_open=4096)``: as ``examples/chat/app.py`` opens it (WAL,
  ``synchronous=NORMAL``, relay in-process) but with the connection pool sized for the working set (about
  1,020 tenants, a read and a write connection each); the domain operations are called directly (no HTTP).
  One tenant file per DM pair, per room and per user (feed), the feeds filled by the outbox relay. Its
  ops/s count the time until the relay has delivered every feed entry of the round (``drain``).
  A diagnostic row runs the app's default ``max_open=256`` (one round of at most 3,000 operations).
* **aiosqlite**: one shared SQLite file, the same tables with a ``tenant_id`` column (WAL,
  ``synchronous=NORMAL``); one writer connection (writes serialised by an ``asyncio.Lock``, the usual
  advice for SQLite) and 4 reader connections. There is no outbox: each operation's writes (message
  plus a feed row per participant) happen in one ``BEGIN IMMEDIATE`` transaction, which favours the
  baseline (less work per message, and the feed is up to date at once).
* **postgres**: PostgreSQL (Debian's package, started on loopback by ``shardlite.testing.postgres``;
  ``fsync=on``) through an asyncpg pool of 16 connections, the same schema and the same single
  transaction per operation as the aiosqlite baseline; once with ``synchronous_commit=on`` (the default:
  every commit waits for a WAL flush, stronger than the SQLite rows) and once with
  ``synchronous_commit=off`` (closer to WAL + ``synchronous=NORMAL``: a crash of the machine may lose the
  last commits, never corrupts).
* **shardlite, metadata on PostgreSQL** (``--meta``): the shardlite row with ``AsyncRouter(..., meta=URL)``:
  catalog, accounts, sessions and the relay's pending-work flags in the throwaway PostgreSQL server (a
  database of its own, ``fsync=on``, ``synchronous_commit=on``); the tenants stay SQLite files. The URL
  reaches the worker as ``SHARDLITE_META``. ``benchmarks/meta.py`` runs this row paired with the others.
* **shardlite FULL** (extra row): shardlite with ``synchronous=FULL`` (an fsync per commit, the durability
  class of PostgreSQL with ``synchronous_commit=on``).
* **shardlite, relay process** (extra row): the same app process with ``relay=False``, and the relay as a
  process of its own (``shardlite relay run --app examples.chat.relay:router``, what ``python -m
  examples.chat --relay-process`` runs): the relay's work no longer shares the app process's GIL. Its ops/s
  also count the time until that process has delivered every feed entry.

The baselines issue the statements the domain issues (account lookup, history query, feed query, room
name lookup, member list, message insert), except that ``send_dm`` folds the account lookup and the
"first message of this pair?" check into one query and writes all feed rows with one ``executemany``.

Every backend is set up and warmed up (accounts, rooms, one message per DM pair and room, then
``--warmup`` untimed operations) before the timed rounds. Rounds of ``--ops`` operations run backend
after backend, in a rotating order; a backend's figures are those of its median round (by ops/s).
At the end every backend reports how many messages and feed entries it holds, which must agree.
Results go to ``benchmarks/last_chat_results.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_PATH = os.path.join(HERE, "last_chat_results.json")
TARGET = 3.0
#: The shardlite rows' tenant-connection pool: the working set is ~1,020 tenants (800 DM pairs, 20 rooms,
#: 200 feeds) with a read and a write connection each, well over AsyncRouter's default max_open=256.
MAX_OPEN = 4096
DEFAULT_LABEL = "shardlite (default max_open=256)"
RELAY_PROCESS_LABEL = "shardlite, relay process"
META_LABEL = "shardlite, metadata on PostgreSQL"
DIAGNOSTIC_OPS = 3000

KINDS = ("send_dm", "dm_history", "feed", "post_room")
MIX = {"send_dm": 0.40, "dm_history": 0.30, "feed": 0.20, "post_room": 0.10}
CONTACTS_EACH_SIDE = 4
ROOM_SIZE = 10
HISTORY_LIMIT = 50
FEED_LIMIT = 50
BIG = 1 << 62

WORDS = ("hello there how are you doing today the meeting moved to three see you at lunch did you read the "
         "report ok thanks great idea let us ship it tomorrow maybe later coffee sounds good sorry running "
         "late what about the weekend plans new build is green").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the workload (identical in every process: pure functions of the seed) -------------------------------------


def contacts(users: int) -> list[list[int]]:
    return [[(u + d) % users for d in range(-CONTACTS_EACH_SIDE, CONTACTS_EACH_SIDE + 1) if d] for u in range(users)]


def dm_pairs(users: int) -> list[tuple[int, int]]:
    return sorted({(min(u, c), max(u, c)) for u, cs in enumerate(contacts(users)) for c in cs})


def room_of(user: int) -> int:
    return user // ROOM_SIZE


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 18)))


Op = tuple[str, int, int, str]  # (kind, user index, contact or room index, text)


def plan(seed: int, n: int, users: int, tasks: int) -> list[list[Op]]:
    """``n`` operations in the exact mix, shuffled, dealt to ``tasks`` tasks round-robin."""
    rng = random.Random(seed)
    counts = {k: int(round(n * share)) for k, share in MIX.items()}
    counts["send_dm"] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    cs = contacts(users)
    ops: list[Op] = []
    for kind in kinds:
        u = rng.randrange(users)
        if kind in ("send_dm", "dm_history"):
            ops.append((kind, u, rng.choice(cs[u]), text(rng) if kind == "send_dm" else ""))
        elif kind == "feed":
            ops.append((kind, u, -1, ""))
        else:
            ops.append((kind, u, room_of(u), text(rng)))
    return [ops[t::tasks] for t in range(tasks)]


def seed_ops(users: int) -> list[Op]:
    """One message per DM pair and per room (creates every conversation before timing)."""
    rng = random.Random(7)
    ops: list[Op] = [("send_dm", a, b, text(rng)) for a, b in dm_pairs(users)]
    ops += [("post_room", r * ROOM_SIZE, r, text(rng)) for r in range((users + ROOM_SIZE - 1) // ROOM_SIZE)]
    return ops


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))  # nearest rank
    return sorted_values[i]


def summarize(lat: list[float]) -> dict[str, float]:
    s = sorted(lat)
    return {"n": len(s), "p50_ms": pct(s, 0.50) * 1e3, "p99_ms": pct(s, 0.99) * 1e3,
            "mean_ms": (sum(s) / len(s) * 1e3) if s else float("nan")}


# -- shared by the baselines (no shardlite import in their processes) -------------------------------------------


class NotFound(Exception):
    pass


class Forbidden(Exception):
    pass


def clean_text(value: object, limit: int = 2000) -> str:
    """Same checks as ``examples.chat.domain.clean_text``."""
    if not isinstance(value, str):
        raise ValueError("the message must be text")
    value = value.strip()
    if not value:
        raise ValueError("the message is empty")
    if len(value) > limit:
        raise ValueError("the message is too long")
    return value


def dm_key(a: int, b: int) -> str:
    """``shardlite.pair_key("dm", a, b)`` for integer ids (ids sorted as text)."""
    x, y = sorted((str(a), str(b)))
    return f"dm:{x}:{y}"


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def history_rows(rows: Any) -> list[dict[str, Any]]:
    return [{"id": r[0], "author_id": r[1], "author": r[2], "text": r[3], "at": r[4]} for r in rows]


def feed_rows(rows: Any) -> list[dict[str, Any]]:
    # what shardlite's feed reader and Chat.feed do: parse the payload, merge it with id and time
    return [{"id": int(r[0]), "at": float(r[5]), **json.loads(r[3])} for r in rows]


# -- backends ------------------------------------------------------------------------------------------------------


class Backend:
    """Operations by user/contact/room *index*; each backend maps them to its ids."""

    name = "?"

    async def setup(self, users: int) -> None: ...
    async def send_dm(self, u: int, other: int, body: str) -> Any: ...
    async def dm_history(self, u: int, other: int) -> Any: ...
    async def feed(self, u: int) -> Any: ...
    async def post_room(self, u: int, room: int, body: str) -> Any: ...

    async def settle(self) -> None:
        """Wait until every effect of the operations so far is visible (the shardlite relay)."""

    async def totals(self) -> dict[str, int]:
        return {}

    async def close(self) -> None: ...

    def op(self, kind: str) -> Callable[[int, int, str], Awaitable[Any]]:
        if kind == "send_dm":
            return self.send_dm
        if kind == "dm_history":
            return lambda u, o, _t: self.dm_history(u, o)
        if kind == "feed":
            return lambda u, _o, _t: self.feed(u)
        return self.post_room


class ShardliteBackend(Backend):
    def __init__(self, root: str, synchronous: str, options: dict[str, Any] | None = None) -> None:
        self.name = f"shardlite {synchronous}"
        self.root, self.synchronous = root, synchronous
        self.extra = dict(options or {})  # more AsyncRouter keyword arguments (max_open)
        #: Deliver through ``shardlite relay run --app examples.chat.relay:router`` in a process of its own
        #: instead of the in-process relay.
        self.relay_process = bool(self.extra.pop("relay_process", False))
        self.relay_proc: subprocess.Popen[bytes] | None = None

    async def setup(self, users: int) -> None:
        from examples.chat.domain import GLOBAL_SCHEMA, SCHEMA, Chat, User
        from shardlite import AsyncRouter

        self.ar = AsyncRouter(self.root, schema=SCHEMA, global_schema=GLOBAL_SCHEMA, relay=not self.relay_process,
                              synchronous=self.synchronous, **self.extra)
        await self.ar.__aenter__()
        if self.relay_process:
            env = dict(os.environ, SHARDLITE_ROOT=self.root, CHAT_MAX_OPEN=str(self.extra.get("max_open", 1024)))
            self.relay_proc = subprocess.Popen(
                [sys.executable, "-m", "shardlite", "relay", "run", "--json", "--app", "examples.chat.relay:router"],
                env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        self.chat = Chat(self.ar)
        self.users = []
        for u in range(users):
            uid = await self.ar.accounts.register(f"user{u}@bench.example", name=f"user{u}")
            self.users.append(User(uid, f"user{u}"))
        self.rooms: list[int] = []
        for r in range((users + ROOM_SIZE - 1) // ROOM_SIZE):
            members = [self.users[m] for m in range(r * ROOM_SIZE, min(users, (r + 1) * ROOM_SIZE))]
            room = await self.chat.create_room(members[0], f"room {r}")
            for m in members[1:]:
                await self.chat.join_room(m, room["id"])
            self.rooms.append(room["id"])

    async def send_dm(self, u: int, other: int, body: str) -> Any:
        return await self.chat.send_dm(self.users[u], self.users[other].id, body)

    async def dm_history(self, u: int, other: int) -> Any:
        return await self.chat.dm_history(self.users[u], self.users[other].id, limit=HISTORY_LIMIT)

    async def feed(self, u: int) -> Any:
        return await self.chat.feed(self.users[u], limit=FEED_LIMIT)

    async def post_room(self, u: int, room: int, body: str) -> Any:
        return await self.chat.post_room(self.users[u], self.rooms[room], body)

    async def settle(self) -> None:
        while True:
            status = await self.ar.relay.status()
            if not status["pending"]:
                return
            await asyncio.sleep(0.005)

    async def totals(self) -> dict[str, int]:
        messages = feed = 0
        async for key in self.ar.tenants():
            if key.startswith(("dm:", "room:")):
                messages += (await self.ar.query(key, "SELECT count(*) FROM messages"))[0][0]
            elif key.startswith("user:"):
                feed += self.ar._store.read_internal(key, "SELECT count(*) FROM _shardlite_feed")[0][0]
        return {"messages": messages, "feed": feed}

    async def close(self) -> None:
        await self.ar.aclose()
        if self.relay_proc is not None:
            self.relay_proc.terminate()  # SIGTERM: the relay stops after its pass and gives up its leases
            self.relay_proc.wait(timeout=60)


SQLITE_SCHEMA = [
    "CREATE TABLE accounts(id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL, "
    "created REAL NOT NULL)",
    "CREATE TABLE rooms(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE COLLATE NOCASE, "
    "created_by INTEGER NOT NULL, created REAL NOT NULL)",
    "CREATE TABLE conversations(user_id INTEGER NOT NULL, conv TEXT NOT NULL, kind TEXT NOT NULL, "
    "title TEXT NOT NULL, PRIMARY KEY (user_id, conv)) WITHOUT ROWID",
    "CREATE TABLE messages(id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, author_id INTEGER NOT NULL, "
    "author TEXT NOT NULL, body TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX messages_tenant ON messages(tenant_id, id)",
    "CREATE TABLE members(tenant_id TEXT NOT NULL, user_id INTEGER NOT NULL, name TEXT NOT NULL, "
    "joined REAL NOT NULL, PRIMARY KEY (tenant_id, user_id)) WITHOUT ROWID",
    "CREATE TABLE feed(id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, source TEXT NOT NULL, topic TEXT NOT NULL, "
    "payload TEXT NOT NULL, event TEXT NOT NULL, at REAL NOT NULL)",
    "CREATE INDEX feed_tenant ON feed(tenant_id, id)",
]

PG_SCHEMA = [
    "CREATE TABLE accounts(id BIGINT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT NOT NULL, "
    "created DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE rooms(id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL, created_by BIGINT NOT NULL, "
    "created DOUBLE PRECISION NOT NULL)",
    "CREATE UNIQUE INDEX rooms_name ON rooms(lower(name))",
    "CREATE TABLE conversations(user_id BIGINT NOT NULL, conv TEXT NOT NULL, kind TEXT NOT NULL, "
    "title TEXT NOT NULL, PRIMARY KEY (user_id, conv))",
    "CREATE TABLE messages(id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL, author_id BIGINT NOT NULL, "
    "author TEXT NOT NULL, body TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX messages_tenant ON messages(tenant_id, id)",
    "CREATE TABLE members(tenant_id TEXT NOT NULL, user_id BIGINT NOT NULL, name TEXT NOT NULL, "
    "joined DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant_id, user_id))",
    "CREATE TABLE feed(id BIGSERIAL PRIMARY KEY, tenant_id TEXT NOT NULL, source TEXT NOT NULL, "
    "topic TEXT NOT NULL, payload TEXT NOT NULL, event TEXT NOT NULL, at DOUBLE PRECISION NOT NULL)",
    "CREATE INDEX feed_tenant ON feed(tenant_id, id)",
]


class SqlBackend(Backend):
    """The shared-schema baselines; subclasses supply the driver calls and the SQL dialect."""

    P = "?"  # placeholder style

    def ids(self, users: int) -> None:
        self.users = [(u + 1, f"user{u}") for u in range(users)]
        self.rooms = [r + 1 for r in range((users + ROOM_SIZE - 1) // ROOM_SIZE)]

    def sql(self, text_: str) -> str:
        return text_


class AiosqliteBackend(SqlBackend):
    name = "aiosqlite"

    def __init__(self, path: str, readers: int = 4) -> None:
        self.path, self.nreaders = path, readers

    async def _connect(self) -> Any:
        import aiosqlite

        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def setup(self, users: int) -> None:
        if os.path.exists(self.path):
            raise SystemExit(f"{self.path} exists: the worker only uses a file it creates itself")
        self.ids(users)
        self.w = await self._connect()
        for stmt in SQLITE_SCHEMA:
            await self.w.execute(stmt)
        self.readers: asyncio.Queue[Any] = asyncio.Queue()
        for _ in range(self.nreaders):
            self.readers.put_nowait(await self._connect())
        self.wlock = asyncio.Lock()
        now = time.time()
        await self.w.execute("BEGIN")
        await self.w.executemany("INSERT INTO accounts(id, email, name, created) VALUES (?, ?, ?, ?)",
                                 [(uid, f"{name}@bench.example", name, now) for uid, name in self.users])
        for r, room_id in enumerate(self.rooms):
            members = self.users[r * ROOM_SIZE:(r + 1) * ROOM_SIZE]
            await self.w.execute("INSERT INTO rooms(id, name, created_by, created) VALUES (?, ?, ?, ?)",
                                 (room_id, f"room {r}", members[0][0], now))
            await self.w.executemany("INSERT INTO members(tenant_id, user_id, name, joined) VALUES (?, ?, ?, ?)",
                                     [(f"room:{room_id}", uid, name, now) for uid, name in members])
            await self.w.executemany("INSERT INTO conversations(user_id, conv, kind, title) VALUES (?, ?, 'room', ?)",
                                     [(uid, f"room:{room_id}", f"room {r}") for uid, _ in members])
        await self.w.execute("COMMIT")

    async def read(self, sql: str, params: tuple[Any, ...]) -> Any:
        conn = await self.readers.get()
        try:
            return await conn.execute_fetchall(sql, params)
        finally:
            self.readers.put_nowait(conn)

    async def _write(self, steps: Callable[[Any], Awaitable[Any]]) -> Any:
        async with self.wlock:
            w = self.w
            await w.execute("BEGIN IMMEDIATE")
            try:
                result = await steps(w)
            except BaseException:
                await w.execute("ROLLBACK")
                raise
            await w.execute("COMMIT")
            return result

    async def send_dm(self, u: int, other: int, body: str) -> Any:
        body = clean_text(body)
        me_id, me_name = self.users[u]
        other_id = self.users[other][0]
        key = dm_key(me_id, other_id)
        found = await self.read("SELECT name, EXISTS(SELECT 1 FROM conversations WHERE user_id = ? AND conv = ?) "
                                "FROM accounts WHERE id = ?", (me_id, key, other_id))
        if not found:
            raise NotFound(other_id)
        other_name, known = found[0]
        now = time.time()

        async def steps(w: Any) -> int:
            cur = await w.execute("INSERT INTO messages(tenant_id, author_id, author, body, at) VALUES (?, ?, ?, ?, ?)",
                                  (key, me_id, me_name, body, now))
            mid = int(cur.lastrowid)
            event = {"kind": "dm", "conv": key, "peer_id": me_id, "from": me_name, "from_id": me_id,
                     "text": body, "message_id": mid}
            await w.executemany("INSERT INTO feed(tenant_id, source, topic, payload, event, at) "
                                "VALUES (?, ?, 'message', ?, ?, ?)",
                                [(f"user:{other_id}", key, dumps(event), f"{key}/{mid}/0", now),
                                 (f"user:{me_id}", key, dumps(event | {"peer_id": other_id}), f"{key}/{mid}/1", now)])
            if not known:
                await w.executemany("INSERT OR IGNORE INTO conversations(user_id, conv, kind, title) "
                                    "VALUES (?, ?, 'dm', ?)", [(me_id, key, other_name), (other_id, key, me_name)])
            return mid

        mid = await self._write(steps)
        return {"id": mid, "author_id": me_id, "author": me_name, "text": body, "at": now}

    async def dm_history(self, u: int, other: int) -> Any:
        me_id = self.users[u][0]
        other_id = self.users[other][0]
        if not await self.read("SELECT name FROM accounts WHERE id = ?", (other_id,)):
            raise NotFound(other_id)
        rows = await self.read("SELECT id, author_id, author, body, at FROM messages WHERE tenant_id = ? AND id < ? "
                               "ORDER BY id DESC LIMIT ?", (dm_key(me_id, other_id), BIG, HISTORY_LIMIT))
        return history_rows(rows)

    async def feed(self, u: int) -> Any:
        rows = await self.read("SELECT id, source, topic, payload, event, at FROM feed WHERE tenant_id = ? AND id < ? "
                               "ORDER BY id DESC LIMIT ?", (f"user:{self.users[u][0]}", BIG, FEED_LIMIT))
        return feed_rows(rows)

    async def post_room(self, u: int, room: int, body: str) -> Any:
        body = clean_text(body)
        me_id, me_name = self.users[u]
        room_id = self.rooms[room]
        found = await self.read("SELECT name FROM rooms WHERE id = ?", (room_id,))
        if not found:
            raise NotFound(room_id)
        name = found[0][0]
        key = f"room:{room_id}"
        now = time.time()

        async def steps(w: Any) -> int:
            found = await w.execute_fetchall("SELECT user_id FROM members WHERE tenant_id = ?", (key,))
            members = [r[0] for r in found]
            if me_id not in members:
                raise Forbidden(room_id)
            cur = await w.execute("INSERT INTO messages(tenant_id, author_id, author, body, at) VALUES (?, ?, ?, ?, ?)",
                                  (key, me_id, me_name, body, now))
            mid = int(cur.lastrowid)
            payload = dumps({"kind": "room", "conv": key, "room_id": room_id, "room": name, "from": me_name,
                             "from_id": me_id, "text": body, "message_id": mid})
            await w.executemany("INSERT INTO feed(tenant_id, source, topic, payload, event, at) "
                                "VALUES (?, ?, 'message', ?, ?, ?)",
                                [(f"user:{m}", key, payload, f"{key}/{mid}/{i}", now) for i, m in enumerate(members)])
            return mid

        mid = await self._write(steps)
        return {"id": mid, "author_id": me_id, "author": me_name, "text": body, "at": now}

    async def totals(self) -> dict[str, int]:
        m = (await self.read("SELECT count(*) FROM messages", ()))[0][0]
        f = (await self.read("SELECT count(*) FROM feed", ()))[0][0]
        return {"messages": int(m), "feed": int(f)}

    async def close(self) -> None:
        await self.w.close()
        while not self.readers.empty():
            await self.readers.get_nowait().close()


class PostgresBackend(SqlBackend):
    def __init__(self, dsn: str, synchronous_commit: str, pool: int = 16) -> None:
        self.name = f"postgres sync_commit={synchronous_commit}"
        self.dsn, self.sc, self.size = dsn, synchronous_commit, pool

    async def setup(self, users: int) -> None:
        import asyncpg

        self.ids(users)
        self.pool = await asyncpg.create_pool(self.dsn, min_size=self.size, max_size=self.size,
                                              server_settings={"synchronous_commit": self.sc})
        now = time.time()
        async with self.pool.acquire() as c, c.transaction():
            for stmt in PG_SCHEMA:
                await c.execute(stmt)
            await c.executemany("INSERT INTO accounts(id, email, name, created) VALUES ($1, $2, $3, $4)",
                                [(uid, f"{name}@bench.example", name, now) for uid, name in self.users])
            for r, room_id in enumerate(self.rooms):
                members = self.users[r * ROOM_SIZE:(r + 1) * ROOM_SIZE]
                await c.execute("INSERT INTO rooms(id, name, created_by, created) VALUES ($1, $2, $3, $4)",
                                room_id, f"room {r}", members[0][0], now)
                await c.executemany("INSERT INTO members(tenant_id, user_id, name, joined) VALUES ($1, $2, $3, $4)",
                                    [(f"room:{room_id}", uid, name, now) for uid, name in members])
                await c.executemany("INSERT INTO conversations(user_id, conv, kind, title) VALUES ($1, $2, 'room', $3)",
                                    [(uid, f"room:{room_id}", f"room {r}") for uid, _ in members])
        async with self.pool.acquire() as c:
            await c.execute("ANALYZE")
            self.server = str(await c.fetchval("SHOW server_version"))
            self.settings = {k: str(await c.fetchval(f"SHOW {k}")) for k in ("fsync", "synchronous_commit",
                                                                              "wal_sync_method", "shared_buffers")}

    async def send_dm(self, u: int, other: int, body: str) -> Any:
        body = clean_text(body)
        me_id, me_name = self.users[u]
        other_id = self.users[other][0]
        key = dm_key(me_id, other_id)
        async with self.pool.acquire() as c:
            found = await c.fetchrow("SELECT name, EXISTS(SELECT 1 FROM conversations WHERE user_id = $1 "
                                     "AND conv = $2) FROM accounts WHERE id = $3", me_id, key, other_id)
            if found is None:
                raise NotFound(other_id)
            other_name, known = found
            now = time.time()
            async with c.transaction():
                mid = await c.fetchval("INSERT INTO messages(tenant_id, author_id, author, body, at) "
                                       "VALUES ($1, $2, $3, $4, $5) RETURNING id", key, me_id, me_name, body, now)
                event = {"kind": "dm", "conv": key, "peer_id": me_id, "from": me_name, "from_id": me_id,
                         "text": body, "message_id": mid}
                await c.executemany("INSERT INTO feed(tenant_id, source, topic, payload, event, at) "
                                    "VALUES ($1, $2, 'message', $3, $4, $5)",
                                    [(f"user:{other_id}", key, dumps(event), f"{key}/{mid}/0", now),
                                     (f"user:{me_id}", key, dumps(event | {"peer_id": other_id}), f"{key}/{mid}/1",
                                      now)])
                if not known:
                    await c.executemany("INSERT INTO conversations(user_id, conv, kind, title) "
                                        "VALUES ($1, $2, 'dm', $3) ON CONFLICT DO NOTHING",
                                        [(me_id, key, other_name), (other_id, key, me_name)])
        return {"id": mid, "author_id": me_id, "author": me_name, "text": body, "at": now}

    async def dm_history(self, u: int, other: int) -> Any:
        me_id = self.users[u][0]
        other_id = self.users[other][0]
        async with self.pool.acquire() as c:
            if await c.fetchrow("SELECT name FROM accounts WHERE id = $1", other_id) is None:
                raise NotFound(other_id)
            rows = await c.fetch("SELECT id, author_id, author, body, at FROM messages WHERE tenant_id = $1 "
                                 "AND id < $2 ORDER BY id DESC LIMIT $3", dm_key(me_id, other_id), BIG, HISTORY_LIMIT)
        return history_rows(rows)

    async def feed(self, u: int) -> Any:
        rows = await self.pool.fetch("SELECT id, source, topic, payload, event, at FROM feed WHERE tenant_id = $1 "
                                     "AND id < $2 ORDER BY id DESC LIMIT $3", f"user:{self.users[u][0]}", BIG,
                                     FEED_LIMIT)
        return feed_rows(rows)

    async def post_room(self, u: int, room: int, body: str) -> Any:
        body = clean_text(body)
        me_id, me_name = self.users[u]
        room_id = self.rooms[room]
        key = f"room:{room_id}"
        async with self.pool.acquire() as c:
            name = await c.fetchval("SELECT name FROM rooms WHERE id = $1", room_id)
            if name is None:
                raise NotFound(room_id)
            now = time.time()
            async with c.transaction():
                members = [r[0] for r in await c.fetch("SELECT user_id FROM members WHERE tenant_id = $1", key)]
                if me_id not in members:
                    raise Forbidden(room_id)
                mid = await c.fetchval("INSERT INTO messages(tenant_id, author_id, author, body, at) "
                                       "VALUES ($1, $2, $3, $4, $5) RETURNING id", key, me_id, me_name, body, now)
                payload = dumps({"kind": "room", "conv": key, "room_id": room_id, "room": name, "from": me_name,
                                 "from_id": me_id, "text": body, "message_id": mid})
                await c.executemany("INSERT INTO feed(tenant_id, source, topic, payload, event, at) "
                                    "VALUES ($1, $2, 'message', $3, $4, $5)",
                                    [(f"user:{m}", key, payload, f"{key}/{mid}/{i}", now)
                                     for i, m in enumerate(members)])
        return {"id": mid, "author_id": me_id, "author": me_name, "text": body, "at": now}

    async def totals(self) -> dict[str, int]:
        async with self.pool.acquire() as c:
            return {"messages": int(await c.fetchval("SELECT count(*) FROM messages")),
                    "feed": int(await c.fetchval("SELECT count(*) FROM feed"))}

    async def close(self) -> None:
        await self.pool.close()


# -- running rounds ------------------------------------------------------------------------------------------------


async def run_ops(backend: Backend, per_task: list[list[Op]]) -> dict[str, Any]:
    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: dict[str, int] = {}
    ops = {k: backend.op(k) for k in KINDS}
    clock = time.perf_counter

    async def user(todo: list[Op]) -> None:
        for kind, u, arg, body in todo:
            t0 = clock()
            try:
                await ops[kind](u, arg, body)
            except Exception as exc:  # noqa: BLE001 - counted and reported; there should be none
                name = f"{kind}: {type(exc).__name__}: {exc}"[:200]
                errors[name] = errors.get(name, 0) + 1
                continue
            lat[kind].append(clock() - t0)

    gc.collect()
    start = clock()
    await asyncio.gather(*(user(todo) for todo in per_task))
    elapsed = clock() - start
    await backend.settle()
    drain = clock() - start - elapsed
    n = sum(len(t) for t in per_task)
    everything = [x for k in KINDS for x in lat[k]]
    return {"ops": n, "elapsed_s": elapsed, "drain_s": drain, "ops_per_s": n / (elapsed + drain),
            "errors": errors, "all": summarize(everything), "kinds": {k: summarize(lat[k]) for k in KINDS}}


async def cpu_split(backend: Backend, per_task: list[list[Op]]) -> dict[str, Any]:
    """One round, with the CPU seconds of the event-loop thread, of the relay's passes (on worker threads)
    and of the whole process (diagnosis of the shardlite row)."""
    assert isinstance(backend, ShardliteBackend)
    relay = backend.ar.relay.sync
    original = relay.run_once
    acc = {"relay_cpu_s": 0.0, "relay_wall_s": 0.0, "relay_passes": 0, "delivered": 0}

    def run_once(*a: Any, **k: Any) -> Any:
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            stats = original(*a, **k)
            acc["delivered"] += stats.delivered
            return stats
        finally:
            acc["relay_cpu_s"] += time.thread_time() - c0
            acc["relay_wall_s"] += time.perf_counter() - w0
            acc["relay_passes"] += 1

    relay.run_once = run_once  # type: ignore[method-assign]
    p0, t0 = time.process_time(), time.thread_time()
    try:
        result = await run_ops(backend, per_task)
    finally:
        relay.run_once = original  # type: ignore[method-assign]
    result["cpu"] = acc | {"loop_cpu_s": time.thread_time() - t0, "process_cpu_s": time.process_time() - p0,
                           "wall_s": result["elapsed_s"] + result["drain_s"]}
    return result


def make_backend(args: argparse.Namespace) -> Backend:
    if args.worker == "shardlite":
        return ShardliteBackend(args.path, args.synchronous, json.loads(args.router_options))
    if args.worker == "aiosqlite":
        return AiosqliteBackend(args.path, readers=args.readers)
    if args.worker == "postgres":
        return PostgresBackend(args.dsn, args.synchronous_commit, pool=args.pool)
    raise SystemExit(f"unknown worker {args.worker}")


async def worker(args: argparse.Namespace) -> None:
    """One backend in this process. Prints ``ready``, then answers each line on stdin: ``round SEED N`` (one
    timed round: ``result``), ``totals 0 0`` (rows held: ``totals``), ``cpu SEED N`` (a round with the CPU
    split: ``cpu``), ``profile SEED N`` (a round under cProfile, written to --profile-out: ``profile``);
    ``final`` at EOF."""
    backend = make_backend(args)
    t0 = time.perf_counter()
    await backend.setup(args.users)
    await run_ops(backend, [seed_ops(args.users)])  # sequential: creates every conversation
    warm = await run_ops(backend, plan(10_000 + args.users, args.warmup, args.users, args.tasks))
    if warm["errors"]:
        raise SystemExit(f"{backend.name}: errors during warm-up: {warm['errors']}")
    info: dict[str, Any] = {"name": backend.name, "setup_s": time.perf_counter() - t0}
    if isinstance(backend, PostgresBackend):
        info |= {"server": backend.server, "settings": backend.settings}
    print("ready " + json.dumps(info), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd, seed, n = line.split()
        per_task = plan(int(seed), int(n), args.users, args.tasks)
        if cmd == "totals":
            print("totals " + json.dumps(await backend.totals()), flush=True)
        elif cmd == "cpu":
            print("cpu " + json.dumps(await cpu_split(backend, per_task)), flush=True)
        elif cmd == "profile":
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            result = await run_ops(backend, per_task)
            prof.disable()
            with open(args.profile_out, "w") as f:
                stats = pstats.Stats(prof, stream=f)
                f.write(f"# {backend.name}: {result['ops']} ops, {result['ops_per_s']:.0f} ops/s under cProfile "
                        "(event-loop thread only)\n")
                stats.sort_stats("tottime").print_stats(40)
                stats.sort_stats("cumulative").print_stats(60)
                stats.print_callers(r"method 'execute' of 'apsw")  # which statements cost what
            print("profile " + json.dumps(result), flush=True)
        else:
            print("result " + json.dumps(await run_ops(backend, per_task)), flush=True)
    final = {"sqlite3_loaded": "sqlite3" in sys.modules}
    await backend.close()
    print("final " + json.dumps(final), flush=True)


# -- the driver ----------------------------------------------------------------------------------------------------


class Worker:
    """One backend's worker process; ``env`` adds to its environment (``SHARDLITE_META``: a DSN with its
    password stays out of the command line)."""

    def __init__(self, label: str, argv: list[str], durability: str, env: dict[str, str] | None = None) -> None:
        self.label, self.durability = label, durability
        env = dict(os.environ, **(env or {}), PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.info: dict[str, Any] = {}
        self.rounds: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}
        self.totals: dict[str, int] = {}
        self.ops = 0
        self.failed: str | None = None
        self.diagnostic = False

    def expect(self, word: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith(word + " "):
            self.proc.kill()
            raise RuntimeError(f"{self.label}: worker said {line!r} (expected {word})")
        return json.loads(line[len(word) + 1:])  # type: ignore[no-any-return]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.failed:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.final = self.expect("final")
        self.proc.wait(timeout=120)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "python": platform.python_version(),
            "platform": platform.platform()}


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}×"


def report(workers: list[Worker], skipped: dict[str, str], args: argparse.Namespace, total_s: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for wk in workers:
        if wk.failed or not wk.rounds:
            skipped[wk.label] = wk.failed or "no rounds"
            continue
        median = sorted(wk.rounds, key=lambda r: r["ops_per_s"])[len(wk.rounds) // 2]  # median round by ops/s
        errors: dict[str, int] = {}
        for r in wk.rounds:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        rows.append({"label": wk.label, "durability": wk.durability, "median": median, "rounds": len(wk.rounds),
                     "ops_per_s_rounds": [r["ops_per_s"] for r in wk.rounds], "info": wk.info, "errors": errors,
                     "ops": wk.ops, "totals": wk.totals, "sqlite3_loaded": wk.final.get("sqlite3_loaded")})
    by = {r["label"]: r for r in rows}
    head = by.get("shardlite")
    out: list[str] = []
    w = max([len(r["label"]) for r in rows] + [len(k) for k in skipped] + [26])
    d = max([len(r["durability"]) for r in rows] + [10])
    out.append(f"chat workload, library level: {args.users} users, {args.tasks} concurrent simulated users, "
               f"{args.ops} operations per round, {args.rounds} round(s) per backend (median round shown);")
    out.append(f"mix 40% send DM / 30% DM history (limit {HISTORY_LIMIT}) / 20% feed (limit {FEED_LIMIT}) / "
               f"10% room post ({ROOM_SIZE} members)")
    out.append("")
    out.append(f"{'backend':<{w}}  {'durability':<{d}}  {'ops/s':>7}  {'rounds ops/s':>17}  {'p50 ms':>7}  "
               f"{'p99 ms':>7}  {'shardlite ÷':>11}")
    out.append("-" * (w + d + 66))
    for r in rows:
        m = r["median"]
        ratio = head["median"]["ops_per_s"] / m["ops_per_s"] if head and r is not head else None
        spread = "/".join(f"{x:.0f}" for x in r["ops_per_s_rounds"])
        out.append(f"{r['label']:<{w}}  {r['durability']:<{d}}  {m['ops_per_s']:>7.0f}  {spread:>17}  "
                   f"{m['all']['p50_ms']:>7.2f}  {m['all']['p99_ms']:>7.2f}  {fmt_ratio(ratio):>11}")
        r["shardlite_ratio"] = ratio
    for label, reason in skipped.items():
        out.append(f"{label:<{w}}  skipped ({reason})")
    out.append("")
    out.append("p50 / p99 per operation (ms), median round:")
    out.append(f"{'backend':<{w}}  " + "  ".join(f"{k:>17}" for k in KINDS))
    for r in rows:
        k = r["median"]["kinds"]
        out.append(f"{r['label']:<{w}}  " + "  ".join(f"{k[x]['p50_ms']:>7.2f} / {k[x]['p99_ms']:>7.2f}"
                                                       for x in KINDS))
    out.append("")
    verdicts: dict[str, Any] = {}
    if head:
        hs = head["median"]
        extra = (f", except the default-max_open row (one round of {min(args.ops, DIAGNOSTIC_OPS)} ops)"
                 if DEFAULT_LABEL in by else "")
        out.append(f"shardlite rows: AsyncRouter(max_open={MAX_OPEN}){extra}; their ops/s count the relay's drain "
                   f"after the last operation (median round: {hs['drain_s'] * 1e3:.0f} ms of "
                   f"{hs['elapsed_s'] + hs['drain_s']:.2f} s).")
        for label in ("aiosqlite", "postgres (sync_commit=on)", "postgres (sync_commit=off)"):
            if label in by:
                ratio = hs["ops_per_s"] / by[label]["median"]["ops_per_s"]
                verdicts[label] = {"ratio": ratio, "met": ratio >= TARGET}
                out.append(f"target shardlite ≥ {TARGET:.0f}× {label}: {ratio:.2f}× "
                           f"{'MET' if ratio >= TARGET else 'MISSED'}")
            else:
                verdicts[label] = {"ratio": None, "met": None}
                out.append(f"target shardlite ≥ {TARGET:.0f}× {label}: not measured ({skipped.get(label, 'skipped')})")
            if label in by and RELAY_PROCESS_LABEL in by:
                ratio = by[RELAY_PROCESS_LABEL]["median"]["ops_per_s"] / by[label]["median"]["ops_per_s"]
                verdicts[f"{RELAY_PROCESS_LABEL} vs {label}"] = {"ratio": ratio, "met": ratio >= TARGET}
                out.append(f"  the same with the relay in its own process ({RELAY_PROCESS_LABEL}): {ratio:.2f}× "
                           f"{'MET' if ratio >= TARGET else 'MISSED'}")
        if META_LABEL in by:
            meta_s = by[META_LABEL]["median"]["ops_per_s"]
            out.append(f"{META_LABEL} ÷ shardlite (embedded metadata): {meta_s / hs['ops_per_s']:.2f}× "
                       "(issue 15: ≥ 0.8×)")
            for label in ("postgres (sync_commit=on)", "postgres (sync_commit=off)"):
                if label in by:
                    out.append(f"{META_LABEL} ÷ {label}: {meta_s / by[label]['median']['ops_per_s']:.2f}× "
                               "(issue 15: ≥ 2×)")
        if "shardlite FULL" in by and "postgres (sync_commit=on)" in by:
            ratio = by["shardlite FULL"]["median"]["ops_per_s"] / by["postgres (sync_commit=on)"]["median"]["ops_per_s"]
            out.append(f"same durability class (fsync per commit): shardlite FULL ÷ postgres (sync_commit=on) = "
                       f"{ratio:.2f}×")
    groups: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        if r["totals"]:
            groups.setdefault((r["rounds"], r["ops"]), {})[r["label"]] = r["totals"]
    for (n, ops), totals in sorted(groups.items(), reverse=True):
        agree = len({json.dumps(t, sort_keys=True) for t in totals.values()}) == 1
        out.append(f"check ({n} × {ops} ops): messages / feed entries held afterwards "
                   f"{'agree' if agree else 'DIFFER'}: "
                   + ", ".join(f"{k} {v['messages']}/{v['feed']}" for k, v in totals.items()))
    errs = {r["label"]: r["errors"] for r in rows if r["errors"]}
    if errs:
        out.append(f"ERRORS: {errs}")
    if any(r["sqlite3_loaded"] for r in rows if r["label"].startswith("shardlite")):
        out.append("WARNING: the stdlib sqlite3 module was loaded in a shardlite worker")
    for r in rows:
        if "server" in r["info"]:
            settings = ", ".join(f"{k}={v}" for k, v in r["info"]["settings"].items() if k != "synchronous_commit")
            out.append(f"PostgreSQL {r['info']['server']} on 127.0.0.1 ({settings}), asyncpg pool of {args.pool}")
            break
    m = machine()
    out.append(f"machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} RAM, Python {m['python']}, {m['platform']}")
    out.append(f"command: .venv/bin/python benchmarks/chat_workload.py{''.join(' ' + a for a in sys.argv[1:])} "
               f"(took {total_s:.0f} s)")
    print("\n".join(out), flush=True)
    return {"rows": rows, "skipped": skipped, "verdicts": verdicts, "machine": m, "table": out,
            "config": {k: getattr(args, k) for k in ("users", "tasks", "ops", "rounds", "warmup", "pool", "quick")}
            | {"max_open": MAX_OPEN}}


def driver(args: argparse.Namespace) -> None:
    from shardlite.testing.postgres import PgUnavailable, postgres

    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="shardlite-chat-bench-")
    skipped: dict[str, str] = {}
    workers: list[Worker] = []
    common = ["--users", str(args.users), "--tasks", str(args.tasks), "--warmup", str(args.warmup),
              "--profile-out", args.profile_out]
    try:
        with contextlib.ExitStack() as stack:
            server = None
            if not args.no_pg:
                try:
                    log("starting a throwaway PostgreSQL server...")
                    server = stack.enter_context(postgres(["chat_on", "chat_off"]))
                except PgUnavailable as exc:
                    skipped["postgres (sync_commit=on)"] = skipped["postgres (sync_commit=off)"] = str(exc)
            else:
                skipped["postgres (sync_commit=on)"] = skipped["postgres (sync_commit=off)"] = "--no-pg"
            sized = json.dumps({"max_open": MAX_OPEN})
            envs: dict[str, dict[str, str]] = {}
            specs: list[tuple[str, list[str], str, bool]] = [
                ("shardlite", ["--worker", "shardlite", "--path", os.path.join(tmp, "shardlite"),
                               "--router-options", sized], "WAL, synchronous=NORMAL", False),
                ("aiosqlite", ["--worker", "aiosqlite", "--path", os.path.join(tmp, "shared.db")],
                 "WAL, synchronous=NORMAL", False),
            ]
            if server is not None:
                specs += [("postgres (sync_commit=on)", ["--worker", "postgres", "--dsn", server.dsn("chat_on"),
                           "--synchronous-commit", "on", "--pool", str(args.pool)], "fsync=on, WAL flush per commit",
                           False),
                          ("postgres (sync_commit=off)", ["--worker", "postgres", "--dsn", server.dsn("chat_off"),
                           "--synchronous-commit", "off", "--pool", str(args.pool)],
                           "fsync=on, no flush wait at commit", False)]
            if args.meta and server is not None:
                envs[META_LABEL] = {"SHARDLITE_META": server.create_database("chat_meta")}
                specs.append((META_LABEL, ["--worker", "shardlite", "--path", os.path.join(tmp, "shardlite-meta"),
                                           "--router-options", sized],
                              "WAL, synchronous=NORMAL; metadata: fsync=on, WAL flush per commit", False))
            elif args.meta:
                skipped[META_LABEL] = skipped.get("postgres (sync_commit=on)", "--no-pg")
            if not args.no_relay_process:
                specs.append((RELAY_PROCESS_LABEL, ["--worker", "shardlite", "--path",
                                                    os.path.join(tmp, "shardlite-relay-process"), "--router-options",
                                                    json.dumps({"max_open": MAX_OPEN, "relay_process": True})],
                              "WAL, synchronous=NORMAL", False))
            if not args.no_full:
                specs.append(("shardlite FULL", ["--worker", "shardlite", "--synchronous", "FULL", "--path",
                                                 os.path.join(tmp, "shardlite-full"), "--router-options", sized],
                              "WAL, synchronous=FULL (fsync/commit)", False))
            if not args.no_default:
                specs.append((DEFAULT_LABEL, ["--worker", "shardlite", "--path",
                                              os.path.join(tmp, "shardlite-default")], "WAL, synchronous=NORMAL", True))
            if args.only:
                specs = [s for s in specs if s[0] in args.only]
            for label, argv, durability, diagnostic in specs:
                # the default-max_open row is ~20× slower: one short round after a short warm-up
                wk = Worker(label, [*argv, *common, *(["--warmup", "1000"] if diagnostic else [])], durability,
                            envs.get(label))
                wk.diagnostic = diagnostic
                wk.ops = min(args.ops, DIAGNOSTIC_OPS) if diagnostic else args.ops
                workers.append(wk)
            for wk in workers:  # set up in parallel (untimed), then wait for all
                try:
                    wk.info = wk.expect("ready")
                    log(f"{wk.label}: ready (setup and warm-up {wk.info['setup_s']:.1f} s)")
                except Exception as exc:  # noqa: BLE001
                    wk.failed = f"setup failed: {exc}"
                    log(wk.failed)
            live = [wk for wk in workers if not wk.failed]
            for rnd in range(args.rounds):
                now = [wk for wk in live if rnd == 0 or not wk.diagnostic]  # diagnostic rows: one round
                order = now[rnd % len(now):] + now[:rnd % len(now)] if now else []
                for wk in order:
                    if wk.failed:
                        continue
                    try:
                        wk.send(f"round {1000 + rnd} {wk.ops}")
                        result = wk.expect("result")
                    except Exception as exc:  # noqa: BLE001 - a backend that dies is reported, not fatal
                        wk.failed = f"failed in round {rnd + 1}: {exc}"
                        log(f"{wk.label}: {wk.failed}")
                        continue
                    wk.rounds.append(result)
                    log(f"round {rnd + 1}/{args.rounds} {wk.label:<28} {result['ops_per_s']:8.0f} ops/s  "
                        f"p50 {result['all']['p50_ms']:6.2f} ms  p99 {result['all']['p99_ms']:7.2f} ms"
                        + (f"  drain {result['drain_s'] * 1e3:.0f} ms" if result["drain_s"] > 0.0005 else "")
                        + (f"  errors {result['errors']}" if result["errors"] else ""))
            live = [wk for wk in live if not wk.failed]
            for wk in live:
                wk.send("totals 0 0")
                wk.totals = wk.expect("totals")
            if args.profile:
                for wk in live[:1] if args.only else [w for w in live if w.label == "shardlite"]:
                    if wk.label.startswith("shardlite"):  # with --only: the first row chosen
                        wk.send(f"cpu 998 {args.ops}")
                        cpu = wk.expect("cpu")
                        wk.info["cpu_split"] = cpu["cpu"]
                        log(f"shardlite CPU split of one round: {json.dumps(cpu['cpu'])}")
                        wk.send(f"profile 999 {args.ops}")
                        wk.expect("profile")
                        log(f"cProfile of one shardlite round written to {args.profile_out}")
            for wk in workers:
                try:
                    wk.finish()
                except Exception as exc:  # noqa: BLE001
                    log(f"{wk.label}: {exc}")
    finally:
        for wk in workers:
            if wk.proc.poll() is None:
                wk.proc.kill()
                wk.proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    results = report(workers, skipped, args, time.perf_counter() - started)
    with open(RESULTS_PATH, "w") as f:
        json.dump(results, f, indent=1, default=str)
    log(f"results written to {os.path.relpath(RESULTS_PATH, ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round per backend")
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=64, help="concurrent simulated users")
    parser.add_argument("--ops", type=int, default=None, help="operations per round (10000; quick 3000)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per backend (3; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed operations after seeding (4000; quick 1000)")
    parser.add_argument("--pool", type=int, default=16, help="asyncpg pool size")
    parser.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL rows")
    parser.add_argument("--meta", action="store_true",
                        help="add the shardlite row with its metadata on the throwaway PostgreSQL server")
    parser.add_argument("--no-full", action="store_true", help="skip the shardlite synchronous=FULL row")
    parser.add_argument("--no-relay-process", action="store_true",
                        help="skip the shardlite row whose relay runs in a process of its own")
    parser.add_argument("--no-default", action="store_true", help="skip the shardlite default max_open row")
    parser.add_argument("--only", nargs="*", help="run only these backends (labels)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile one extra shardlite round (of the first --only row if given)")
    parser.add_argument("--profile-out", default=os.path.join(tempfile.gettempdir(), "shardlite_chat_profile.txt"))
    # worker mode (internal)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dsn", help=argparse.SUPPRESS)
    parser.add_argument("--synchronous", default="NORMAL", help=argparse.SUPPRESS)
    parser.add_argument("--router-options", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--readers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--synchronous-commit", default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.ops = args.ops or (3000 if args.quick else 10000)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (1000 if args.quick else 4000)
    if args.worker:
        if HERE in sys.path:  # worker processes import the project, never the sibling benchmark modules
            sys.path.remove(HERE)
        asyncio.run(worker(args))
    else:
        sys.path.insert(0, HERE)
        driver(args)


if __name__ == "__main__":
    main()
