"""The authorizer on every connection user SQL reaches: what user SQL may not do (README, Isolation).

User SQL may not run transaction control (BEGIN, COMMIT, ROLLBACK, SAVEPOINT: shardlite owns the
transaction), ATTACH or DETACH (no API call on key A may reach key B's file), pragmas that change the
connection or the file, or create, alter, drop, read or write shardlite's own ``_shardlite_*`` tables
(app SQL and outside files are untrusted: it never reads or writes shardlite's internal tables). Reads of
the app's tables and read-only pragmas (``table_info``, ``user_version`` without a value, ...) stay
allowed.

A refusal raises :class:`~shardlite.errors.StatementNotAllowed` from inside the authorizer, so the caller
sees what was refused and why rather than SQLite's bare "not authorized". shardlite's own statements run
with :attr:`Guard.trusted` set, and their text starts with :data:`INTERNAL_SQL`: SQLite asks the
authorizer only when it prepares a statement, and a prepared statement is reused from APSW's cache by its
text, so user SQL can never reuse a statement authorized in trusted mode (it cannot know the nonce).

A schema change made by user SQL sets :attr:`Guard.ddl`; the transaction's owner then checks, before the
change can commit, that no user object references, shadows or constrains a shardlite table (a foreign
key to ``_shardlite_relay`` would make shardlite's own writes fail with "foreign key mismatch").
"""

from __future__ import annotations

import secrets
from typing import Final

import apsw

from ..errors import StatementNotAllowed

__all__ = ["Guard", "RESERVED_PREFIX", "READONLY_PRAGMAS", "INTERNAL_SQL", "SAVEPOINT_PREFIX"]

RESERVED_PREFIX: Final = "_shardlite"

#: Prefix for shardlite's own statements that write ``_shardlite_*`` tables. The per-process nonce keeps
#: user SQL of the same text from ever reusing a statement prepared (and authorized) in trusted mode.
INTERNAL_SQL: Final = f"/* shardlite {secrets.token_hex(8)} */ "

#: Savepoints whose name starts with this per-process secret pass the authorizer without trusted mode
#: (user SQL cannot guess it), so the per-transaction savepoints of a group-commit batch cost one cached
#: statement each and no authorizer toggling.
SAVEPOINT_PREFIX: Final = f"shardlite_{secrets.token_hex(8)}_"

#: Pragmas user SQL may run. Those in the first set take an argument that names something to inspect;
#: the second set are allowed only without an argument (reading, never setting).
_PRAGMAS_WITH_ARGUMENT: Final = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list",
     "foreign_key_check", "integrity_check", "quick_check", "table_list"}
)
_PRAGMAS_READ_ONLY: Final = frozenset(
    {"user_version", "schema_version", "data_version", "page_count", "page_size", "freelist_count",
     "compile_options", "collation_list", "function_list", "module_list", "pragma_list", "table_list",
     "database_list", "foreign_keys", "journal_mode", "synchronous", "encoding", "application_id",
     "auto_vacuum", "cache_size", "integrity_check", "quick_check", "foreign_key_check", "max_page_count"}
)
READONLY_PRAGMAS: Final = _PRAGMAS_WITH_ARGUMENT | _PRAGMAS_READ_ONLY

_WRITES: Final = frozenset({apsw.SQLITE_INSERT, apsw.SQLITE_UPDATE, apsw.SQLITE_DELETE})
_SCHEMA_OPS: Final = frozenset(
    {apsw.SQLITE_CREATE_TABLE, apsw.SQLITE_CREATE_INDEX, apsw.SQLITE_CREATE_TRIGGER, apsw.SQLITE_CREATE_VIEW,
     apsw.SQLITE_CREATE_TEMP_TABLE, apsw.SQLITE_CREATE_TEMP_INDEX, apsw.SQLITE_CREATE_TEMP_TRIGGER,
     apsw.SQLITE_CREATE_TEMP_VIEW, apsw.SQLITE_DROP_TABLE, apsw.SQLITE_DROP_INDEX, apsw.SQLITE_DROP_TRIGGER,
     apsw.SQLITE_DROP_VIEW, apsw.SQLITE_DROP_TEMP_TABLE, apsw.SQLITE_DROP_TEMP_INDEX,
     apsw.SQLITE_DROP_TEMP_TRIGGER, apsw.SQLITE_DROP_TEMP_VIEW, apsw.SQLITE_CREATE_VTABLE,
     apsw.SQLITE_DROP_VTABLE, apsw.SQLITE_ALTER_TABLE}
)


def _reserved(name: str | None) -> bool:
    return name is not None and name.lower().startswith(RESERVED_PREFIX)


class Guard:
    """A per-connection authorizer. Call it as SQLite's authorizer callback.

    ``member_savepoints``: allow the group commit's per-transaction savepoints (their names carry the
    per-process secret :data:`SAVEPOINT_PREFIX`) without trusted mode; only tenant *write* connections
    need them, so read connections refuse every savepoint whatever its name."""

    __slots__ = ("trusted", "read_only", "member_savepoints", "ddl")

    def __init__(self, *, read_only: bool = False, member_savepoints: bool = False) -> None:
        self.trusted = False
        #: When set, refuse every write (``shardlite query`` and ``router.map`` run with it).
        self.read_only = read_only
        self.member_savepoints = member_savepoints and not read_only
        #: User SQL created, dropped or changed a schema object since the owner last cleared it.
        self.ddl = False

    def __call__(self, op: int, p1: str | None, p2: str | None, db: str | None, trigger: str | None) -> int:
        if self.trusted and trigger is None:
            # Trusted mode covers shardlite's own top-level statements only: a user trigger fired by one of
            # them (say through a cascade) is still user SQL and is checked like any other.
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_READ:
            if _reserved(p1):
                raise StatementNotAllowed(f"user SQL may not read shardlite's own table {p1}"
                                          + (" (use router.feed())" if p1 == "_shardlite_feed" else ""))
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_SELECT or op == apsw.SQLITE_FUNCTION:
            if op == apsw.SQLITE_FUNCTION and p2 is not None and p2.lower() == "load_extension":
                raise StatementNotAllowed("load_extension() is not allowed on tenant connections")
            return apsw.SQLITE_OK
        if op in _WRITES:
            if _reserved(p1):
                raise StatementNotAllowed(f"user SQL may not write shardlite's own table {p1}")
            if self.read_only:
                raise StatementNotAllowed("this statement writes, and only read-only statements are allowed here")
            return apsw.SQLITE_OK
        if (op == apsw.SQLITE_SAVEPOINT and self.member_savepoints and p2 is not None
                and p2.startswith(SAVEPOINT_PREFIX)):
            return apsw.SQLITE_OK
        if op == apsw.SQLITE_TRANSACTION or op == apsw.SQLITE_SAVEPOINT:
            raise StatementNotAllowed(
                "transaction control (BEGIN/COMMIT/ROLLBACK/SAVEPOINT) is managed by shardlite: "
                "use router.transaction(key); nested transactions become savepoints"
            )
        if op == apsw.SQLITE_ATTACH or op == apsw.SQLITE_DETACH:
            raise StatementNotAllowed("ATTACH/DETACH is not allowed on tenant connections (tenant isolation)")
        if op == apsw.SQLITE_PRAGMA:
            name = (p1 or "").lower()
            if name in _PRAGMAS_WITH_ARGUMENT or (p2 is None and name in _PRAGMAS_READ_ONLY):
                return apsw.SQLITE_OK
            shown = f"PRAGMA {name}" + (f"={p2}" if p2 is not None else "")
            raise StatementNotAllowed(
                f"{shown} is not allowed: pragmas that change the connection or the file are managed by shardlite"
            )
        if op == apsw.SQLITE_ALTER_TABLE and not self.trusted:
            # The authorizer is told the table's old name only, so a RENAME could move a table into the
            # reserved namespace unseen: schema changes belong in the schema steps (which run trusted).
            raise StatementNotAllowed("ALTER TABLE is not allowed in user SQL: put schema changes in the "
                                      "router's schema steps (they run as migrations)")
        if op in _SCHEMA_OPS:
            if _reserved(p1) or _reserved(p2):
                raise StatementNotAllowed(f"the {RESERVED_PREFIX}_* names are reserved for shardlite's own tables")
            if self.read_only:
                raise StatementNotAllowed("this statement changes the schema, and only reads are allowed here")
            self.ddl = True
            return apsw.SQLITE_OK
        if self.read_only and op not in (apsw.SQLITE_RECURSIVE,):
            raise StatementNotAllowed("only read-only statements are allowed here")
        return apsw.SQLITE_OK
