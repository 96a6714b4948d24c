"""Schema migrations: the app's steps (per key prefix or for every tenant) and shardlite's own tables.

A schema is an ordered list of steps; a step is SQL text (one or several statements, always run whole) or
a callable taking an ``apsw.Cursor``. A tenant's app schema version is the number of steps applied, kept in
``PRAGMA user_version``. shardlite's own tables (``_shardlite_*``) carry their own version in
``_shardlite_meta.internal_version`` and are upgraded on open independently of the app's schema.

Steps run inside the caller's transaction; a failing step rolls the whole migration back, so a tenant is
always at one version or the next, never between.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import apsw
import xxhash

from ..errors import ConfigurationError
from .authorizer import INTERNAL_SQL

__all__ = [
    "Step",
    "SchemaSpec",
    "INTERNAL_STEPS",
    "INTERNAL_VERSION",
    "EMIT_SQL",
    "REMEMBER_LAST_SEQ",
    "run_step",
    "read_versions",
    "upgrade",
]

Step = str | Callable[[apsw.Cursor], None]

#: shardlite's own tables, by version. Version 1: identity and the move/drop marker. Version 2: the
#: transactional outbox, the inbox (dedupe high-water marks), the relay's claim and the activity feed.
#: Version 3: ``_shardlite_outbox.origin``, the incarnation that emitted an event when it is not the file's
#: current one (events carried over by a restore or an import keep their identity, so a destination that
#: already applied them recognises them).
#: Version 4: the outbox and the feed without AUTOINCREMENT, which wrote ``sqlite_sequence`` on every
#: insert (one more page per committing transaction, about a fifth of the chat workload's time). Outbox
#: numbers still never go back: ``_shardlite_relay.last_seq`` keeps the highest number the outbox held
#: before anything was deleted from it (:data:`REMEMBER_LAST_SEQ`, run by whoever deletes), and
#: :data:`EMIT_SQL` numbers a new event past both it and the outbox's own highest. Feed rows are never
#: deleted, so their rowids only grow.
#: Version 5: ``_shardlite_relay.parked_version``, the version of the relay's pending-work flag it parked
#: when it left the outbox empty (:mod:`shardlite.meta.pending`): written only after the park succeeded, so
#: an emitter that finds it set knows a flag exists and needs only a wake-up after its commit.
INTERNAL_STEPS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE _shardlite_meta(
               id INTEGER PRIMARY KEY CHECK (id = 1),
               key TEXT NOT NULL,
               incarnation TEXT NOT NULL,
               internal_version INTEGER NOT NULL,
               created REAL NOT NULL,
               retired TEXT
           )""",
        "INSERT INTO _shardlite_meta(id, key, incarnation, internal_version, created) VALUES (1, '', '', 1, 0)",
    ),
    (
        """CREATE TABLE _shardlite_outbox(
               seq INTEGER PRIMARY KEY AUTOINCREMENT,
               dest TEXT NOT NULL,
               topic TEXT NOT NULL,
               payload TEXT NOT NULL,
               created REAL NOT NULL,
               attempts INTEGER NOT NULL DEFAULT 0,
               next_at REAL NOT NULL DEFAULT 0,
               last_error TEXT
           )""",
        """CREATE TABLE _shardlite_inbox(
               source TEXT NOT NULL,
               incarnation TEXT NOT NULL,
               last_seq INTEGER NOT NULL,
               PRIMARY KEY (source, incarnation)
           ) WITHOUT ROWID""",
        """CREATE TABLE _shardlite_relay(
               id INTEGER PRIMARY KEY CHECK (id = 1),
               claimed_by TEXT,
               claimed_until REAL NOT NULL DEFAULT 0
           )""",
        "INSERT INTO _shardlite_relay(id) VALUES (1)",
        """CREATE TABLE _shardlite_feed(
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               source TEXT NOT NULL,
               topic TEXT NOT NULL,
               payload TEXT NOT NULL,
               event TEXT NOT NULL,
               at REAL NOT NULL
           )""",
    ),
    ("ALTER TABLE _shardlite_outbox ADD COLUMN origin TEXT",),
    (
        "ALTER TABLE _shardlite_relay ADD COLUMN last_seq INTEGER NOT NULL DEFAULT 0",
        """UPDATE _shardlite_relay SET last_seq = max(last_seq,
               coalesce((SELECT seq FROM sqlite_sequence WHERE name = '_shardlite_outbox'), 0),
               coalesce((SELECT max(seq) FROM _shardlite_outbox), 0)) WHERE id = 1""",
        """CREATE TABLE _shardlite_outbox_v4(
               seq INTEGER PRIMARY KEY,
               dest TEXT NOT NULL,
               topic TEXT NOT NULL,
               payload TEXT NOT NULL,
               created REAL NOT NULL,
               attempts INTEGER NOT NULL DEFAULT 0,
               next_at REAL NOT NULL DEFAULT 0,
               last_error TEXT,
               origin TEXT
           )""",
        "INSERT INTO _shardlite_outbox_v4 SELECT seq, dest, topic, payload, created, attempts, next_at, last_error, "
        "origin FROM _shardlite_outbox",
        "DROP TABLE _shardlite_outbox",
        "ALTER TABLE _shardlite_outbox_v4 RENAME TO _shardlite_outbox",
        """CREATE TABLE _shardlite_feed_v4(
               id INTEGER PRIMARY KEY,
               source TEXT NOT NULL,
               topic TEXT NOT NULL,
               payload TEXT NOT NULL,
               event TEXT NOT NULL,
               at REAL NOT NULL
           )""",
        "INSERT INTO _shardlite_feed_v4 SELECT id, source, topic, payload, event, at FROM _shardlite_feed",
        "DROP TABLE _shardlite_feed",
        "ALTER TABLE _shardlite_feed_v4 RENAME TO _shardlite_feed",
        "DELETE FROM sqlite_sequence WHERE name IN ('_shardlite_outbox', '_shardlite_feed')",
    ),
    ("ALTER TABLE _shardlite_relay ADD COLUMN parked_version INTEGER",),
)
INTERNAL_VERSION: Final = len(INTERNAL_STEPS)

#: Insert one outbox event (dest, topic, payload, created), numbered past every number used before.
EMIT_SQL: Final = (
    "INSERT INTO _shardlite_outbox(seq, dest, topic, payload, created) VALUES ("
    "(SELECT max(last_seq, coalesce((SELECT max(seq) FROM _shardlite_outbox), 0)) + 1 FROM _shardlite_relay "
    "WHERE id = 1), ?, ?, ?, ?)")

#: Run before any DELETE from the outbox, in the same transaction, so its numbers are never handed out
#: again (writes only when the outbox holds a number higher than the one kept).
REMEMBER_LAST_SEQ: Final = (
    "UPDATE _shardlite_relay SET last_seq = (SELECT max(seq) FROM _shardlite_outbox) "
    "WHERE id = 1 AND (SELECT max(seq) FROM _shardlite_outbox) > last_seq")


def run_step(conn: apsw.Connection, step: Step) -> None:
    """Run one step whole (every statement of a multi-statement text, see APSW's execute note)."""
    if isinstance(step, str):
        for _ in conn.execute(step):
            pass
    else:
        step(conn.cursor())


def _step_identity(step: Step) -> bytes:
    if isinstance(step, str):
        return b"sql:" + step.strip().encode("utf-8")
    if not callable(step):
        raise ConfigurationError(f"a schema step must be SQL text or a callable, not {type(step).__name__}")
    name = f"{getattr(step, '__module__', '?')}.{getattr(step, '__qualname__', repr(step))}"
    try:
        source = inspect.getsource(step)
    except (OSError, TypeError):
        source = ""
    return b"fn:" + name.encode() + b":" + source.encode("utf-8")


class SchemaSpec:
    """The app's schema: one list for every tenant, or a mapping from key prefix to list."""

    def __init__(self, schema: Sequence[Step] | Mapping[str, Sequence[Step]] | None) -> None:
        self.per_prefix: dict[str, tuple[Step, ...]] | None
        self.every: tuple[Step, ...] | None
        #: False for a router opened without a schema (``shardlite`` commands): versions are unknown.
        self.declared = schema is not None
        if schema is None:
            self.every, self.per_prefix = (), None
        elif isinstance(schema, Mapping):
            self.every = None
            self.per_prefix = {}
            for prefix, steps in schema.items():
                if not isinstance(prefix, str) or ":" in prefix or not prefix:
                    raise ConfigurationError(f"schema prefixes are non-empty text without ':' (got {prefix!r})")
                self.per_prefix[prefix] = self._steps(steps)
        elif isinstance(schema, (list, tuple)):
            self.every, self.per_prefix = self._steps(schema), None
        else:
            raise ConfigurationError("schema must be a list of steps or a mapping from key prefix to a list")
        self._fingerprints: dict[str, str] = {}

    @staticmethod
    def _steps(steps: object) -> tuple[Step, ...]:
        if isinstance(steps, str) or not isinstance(steps, (list, tuple)):
            raise ConfigurationError("a schema is a list of steps (SQL text or callables), not a single string")
        for step in steps:
            _step_identity(step)
        return tuple(steps)

    def steps_for(self, prefix: str) -> tuple[Step, ...]:
        """Steps for tenants whose key starts with ``prefix``; ConfigurationError when there is none."""
        if self.per_prefix is None:
            assert self.every is not None
            return self.every
        try:
            return self.per_prefix[prefix]
        except KeyError:
            known = ", ".join(sorted(self.per_prefix)) or "none"
            raise ConfigurationError(
                f"no schema for key prefix {prefix!r} (prefixes with a schema: {known})"
            ) from None

    def version_for(self, prefix: str) -> int:
        return len(self.steps_for(prefix))

    def fingerprint(self, prefix: str) -> str:
        """A digest of the steps for ``prefix`` (names the cached template)."""
        fp = self._fingerprints.get(prefix)
        if fp is None:
            h = xxhash.xxh3_128()
            for step in self.steps_for(prefix):
                ident = _step_identity(step)
                h.update(len(ident).to_bytes(8, "little"))
                h.update(ident)
            fp = self._fingerprints[prefix] = h.hexdigest()
        return fp


def read_versions(conn: apsw.Connection) -> tuple[int, int]:
    """``(internal_version, app_version)`` of an open tenant file."""
    internal: list[Any] = conn.execute("SELECT internal_version FROM _shardlite_meta WHERE id = 1").fetchall()
    app: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
    return (int(internal[0][0]) if internal else 0), int(app)


def upgrade(conn: apsw.Connection, steps: Sequence[Step], *, internal_from: int, app_from: int) -> None:
    """Apply shardlite's missing internal steps, then the app's missing steps, in the open transaction."""
    for version in range(internal_from, INTERNAL_VERSION):
        for sql in INTERNAL_STEPS[version]:
            run_step(conn, sql)
    if internal_from < INTERNAL_VERSION:
        conn.execute(INTERNAL_SQL + "UPDATE _shardlite_meta SET internal_version = ? WHERE id = 1", (INTERNAL_VERSION,))
    for step in steps[app_from:]:
        run_step(conn, step)
    if app_from < len(steps):
        conn.execute(f"PRAGMA user_version = {int(len(steps))}")
