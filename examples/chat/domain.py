"""The chat application's domain operations over :class:`shardlite.AsyncRouter`.

Data layout (the point of the example):

* accounts and sessions: the global DB (``ar.accounts``, ``ar.sessions``), e-mail addresses unique;
* ``dm:<a>:<b>`` (``pair_key("dm", a, b)``): one tenant per pair of users, holding their messages;
* ``room:<id>``: one tenant per group room, holding its members and messages; the room's name and id
  live in a small global table (``rooms``) so rooms can be listed and found;
* ``user:<id>``: one tenant per user, holding their activity feed, filled by the outbox: every message
  emits an event to each participant's ``user:`` tenant in the same transaction as the message itself;
* ``conversations`` (global): which conversations a user belongs to, written once per new DM pair or
  room membership, never per message.

The HTTP layer (``app.py``) and the benchmark call these functions; nothing here knows about HTTP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shardlite import AsyncRouter, UnknownTenant, pair_key

__all__ = ["SCHEMA", "GLOBAL_SCHEMA", "Chat", "NotFound", "Forbidden", "Invalid", "MAX_TEXT"]

MAX_TEXT = 2000
MAX_ROOM_NAME = 80

_MESSAGES = ("CREATE TABLE messages(id INTEGER PRIMARY KEY, author_id INTEGER NOT NULL, author TEXT NOT NULL, "
             "body TEXT NOT NULL, at REAL NOT NULL)")
SCHEMA: dict[str, list[Any]] = {
    "dm": [_MESSAGES],
    "room": [_MESSAGES, "CREATE TABLE members(user_id INTEGER PRIMARY KEY, name TEXT NOT NULL, joined REAL NOT NULL)"],
    "user": [],
}
GLOBAL_SCHEMA: list[Any] = [
    "CREATE TABLE rooms(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE COLLATE NOCASE, "
    "created_by INTEGER NOT NULL, created REAL NOT NULL)",
    "CREATE TABLE conversations(user_id INTEGER NOT NULL, conv TEXT NOT NULL, kind TEXT NOT NULL, "
    "title TEXT NOT NULL, PRIMARY KEY (user_id, conv)) WITHOUT ROWID",
]


class NotFound(Exception):
    """An unknown user or room (HTTP 404)."""


class Forbidden(Exception):
    """The user is not a member of the room (HTTP 403)."""


class Invalid(ValueError):
    """Bad input with a readable message (HTTP 422)."""


@dataclass(frozen=True)
class User:
    id: int
    name: str


def clean_text(text: object, *, limit: int = MAX_TEXT, what: str = "message") -> str:
    if not isinstance(text, str):
        raise Invalid(f"the {what} must be text")
    text = text.strip()
    if not text:
        raise Invalid(f"the {what} is empty")
    if len(text) > limit:
        raise Invalid(f"the {what} is longer than {limit} characters")
    return text


def _history(limit: int) -> str:
    """A page of messages before a cursor. The limit (an int, clamped by the callers) is part of the SQL
    text rather than a bound parameter, which costs SQLite several µs more per run
    (see shardlite.front.feed.page_query)."""
    return f"SELECT id, author_id, author, body, at FROM messages WHERE id < ? ORDER BY id DESC LIMIT {int(limit):d}"


def _rows(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [{"id": r[0], "author_id": r[1], "author": r[2], "text": r[3], "at": r[4]} for r in rows]


class Chat:
    """Domain operations; ``ar`` is an entered AsyncRouter opened with SCHEMA and GLOBAL_SCHEMA."""

    def __init__(self, ar: AsyncRouter) -> None:
        self.ar = ar
        ar.use_feed("message")
        # Process-local caches of facts that never change once true: a user's id and name (the app has
        # no rename), and "this DM pair already exists" (its conversations rows are written).
        self._users: dict[int, User] = {}
        self._pairs: set[str] = set()

    # -- users ------------------------------------------------------------------------------------------

    async def user(self, user_id: int) -> User:
        found = self._users.get(user_id)
        if found is not None:
            return found
        account = await self.ar.accounts.get(user_id)
        if account is None:
            raise NotFound(f"no user {user_id}")
        user = User(account.id, account.name or account.email.split("@")[0])
        if len(self._users) > 100_000:
            self._users.clear()
        self._users[user_id] = user
        return user

    async def find_users(self, text: str, *, limit: int = 20) -> list[dict[str, Any]]:
        found = await self.ar.accounts.search(text[:100], limit=limit)
        return [{"id": a.id, "name": a.name or a.email.split("@")[0]} for a in found]

    # -- direct messages ---------------------------------------------------------------------------------

    async def send_dm(self, me: User, other_id: int, text: str) -> dict[str, Any]:
        text = clean_text(text)
        other = await self.user(other_id)
        key = pair_key("dm", me.id, other.id)
        first = key not in self._pairs and not await self.ar.exists(key)
        now = time.time()
        async with self.ar.transaction(key) as tx:
            await tx.execute("INSERT INTO messages(author_id, author, body, at) VALUES (?, ?, ?, ?)",
                             (me.id, me.name, text, now))
            message_id = tx.lastrowid
            event = {"kind": "dm", "conv": key, "peer_id": me.id, "from": me.name, "from_id": me.id,
                     "text": text, "message_id": message_id}
            await tx.emit(f"user:{other.id}", "message", event)
            if other.id != me.id:
                await tx.emit(f"user:{me.id}", "message", event | {"peer_id": other.id})
        if first:  # the global index is written once per pair, not once per message
            async with self.ar.globals.transaction() as gtx:
                for uid, title in ((me.id, other.name), (other.id, me.name)):
                    await gtx.execute("INSERT OR IGNORE INTO conversations(user_id, conv, kind, title) "
                                      "VALUES (?, ?, 'dm', ?)", (uid, key, title))
        self._pairs.add(key)
        return {"id": message_id, "author_id": me.id, "author": me.name, "text": text, "at": now}

    async def dm_history(self, me: User, other_id: int, *, before: int | None = None,
                         limit: int = 50) -> list[dict[str, Any]]:
        other = await self.user(other_id)
        key = pair_key("dm", me.id, other.id)
        limit = max(1, min(limit, 200))
        try:
            rows = await self.ar.query(key, _history(limit), (before or (1 << 62),))
        except UnknownTenant:
            return []
        return _rows(rows)

    # -- rooms --------------------------------------------------------------------------------------------

    async def create_room(self, me: User, name: str) -> dict[str, Any]:
        name = clean_text(name, limit=MAX_ROOM_NAME, what="room name")
        existing = await self.ar.globals.query("SELECT id FROM rooms WHERE name = ?", (name,))
        if existing:
            raise Invalid(f"a room named {name!r} already exists")
        async with self.ar.globals.transaction() as gtx:
            await gtx.execute("INSERT INTO rooms(name, created_by, created) VALUES (?, ?, ?)",
                              (name, me.id, time.time()))
            room_id = gtx.lastrowid
        await self.join_room(me, room_id)
        return {"id": room_id, "name": name}

    async def rooms(self) -> list[dict[str, Any]]:
        rows = await self.ar.globals.query("SELECT id, name FROM rooms ORDER BY name LIMIT 500")
        return [{"id": r[0], "name": r[1]} for r in rows]

    async def _room_name(self, room_id: int) -> str:
        if not 0 < room_id < 2**63:
            raise NotFound(f"no room {room_id}")
        rows = await self.ar.globals.query("SELECT name FROM rooms WHERE id = ?", (room_id,))
        if not rows:
            raise NotFound(f"no room {room_id}")
        return str(rows[0][0])

    async def join_room(self, me: User, room_id: int) -> dict[str, Any]:
        name = await self._room_name(room_id)
        async with self.ar.transaction(f"room:{room_id}") as tx:
            await tx.execute("INSERT OR IGNORE INTO members(user_id, name, joined) VALUES (?, ?, ?)",
                             (me.id, me.name, time.time()))
            joined = tx.changes > 0
        if joined:
            async with self.ar.globals.transaction() as gtx:
                await gtx.execute("INSERT OR IGNORE INTO conversations(user_id, conv, kind, title) "
                                  "VALUES (?, ?, 'room', ?)", (me.id, f"room:{room_id}", name))
        return {"id": room_id, "name": name, "joined": joined}

    async def _check_member(self, me: User, room_id: int) -> None:
        await self._room_name(room_id)
        try:
            rows = await self.ar.query(f"room:{room_id}", "SELECT 1 FROM members WHERE user_id = ?", (me.id,))
        except UnknownTenant:
            rows = []
        if not rows:
            raise Forbidden(f"you have not joined room {room_id}")

    async def post_room(self, me: User, room_id: int, text: str) -> dict[str, Any]:
        text = clean_text(text)
        name = await self._room_name(room_id)
        now = time.time()
        async with self.ar.transaction(f"room:{room_id}") as tx:
            cursor = await tx.execute("SELECT user_id FROM members")
            members = [row[0] for row in cursor]
            if me.id not in members:
                raise Forbidden(f"you have not joined room {room_id}")
            await tx.execute("INSERT INTO messages(author_id, author, body, at) VALUES (?, ?, ?, ?)",
                             (me.id, me.name, text, now))
            message_id = tx.lastrowid
            event = {"kind": "room", "conv": f"room:{room_id}", "room_id": room_id, "room": name,
                     "from": me.name, "from_id": me.id, "text": text, "message_id": message_id}
            await tx.emit_many([f"user:{member}" for member in members], "message", event)
        return {"id": message_id, "author_id": me.id, "author": me.name, "text": text, "at": now}

    async def room_history(self, me: User, room_id: int, *, before: int | None = None,
                           limit: int = 50) -> list[dict[str, Any]]:
        await self._check_member(me, room_id)
        limit = max(1, min(limit, 200))
        rows = await self.ar.query(f"room:{room_id}", _history(limit), (before or (1 << 62),))
        return _rows(rows)

    # -- feed and conversations ---------------------------------------------------------------------------

    async def feed(self, me: User, *, before: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        try:
            items = await self.ar.feed(f"user:{me.id}", limit=max(1, min(limit, 200)), before=before)
        except UnknownTenant:
            return []
        return [{"id": i.id, "at": i.at, **i.payload} for i in items]

    async def conversations(self, me: User) -> list[dict[str, Any]]:
        rows = await self.ar.globals.query("SELECT conv, kind, title FROM conversations WHERE user_id = ? "
                                           "ORDER BY kind, title", (me.id,))
        return [{"conv": r[0], "kind": r[1], "title": r[2]} for r in rows]
