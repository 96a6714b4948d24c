"""Files from outside are untrusted: what their schema may hold, and shardlite's tables rebuilt (rule 14).

A tenant file brought in by ``import`` or ``restore`` (or a global DB copy from a backup) may have been
crafted: a trigger on ``_shardlite_feed`` copying private entries elsewhere, a trigger or a constraint that
blocks the fence, ``_shardlite_meta`` replaced by a view that swallows the retired marker, forged outbox
events, a foreign key onto an internal table. Two tools keep such a file from ever reaching shardlite's
own tables:

* :func:`foreign_references` lists every object of a schema that is not shardlite's own and touches a
  reserved ``_shardlite`` name: one whose name is reserved, one whose SQL mentions a reserved name
  anywhere (table, index, trigger, view, virtual table; case-insensitive), an index or a trigger attached
  to an internal table. It reads ``sqlite_schema`` only, so it is cheap and works on any connection
  (a tenant's, the global DB's, a trusted copy's). A file with any such object is refused whole.
* :func:`rebuild_tenant_tables` then rebuilds shardlite's tables of a tenant copy from shardlite's current
  definitions (:data:`shardlite.files.schema.INTERNAL_STEPS`): the rows are read out by column name and
  validated, whatever holds the name is dropped, the table is created from the definition and the
  validated rows inserted with explicit columns. Whatever the file's definitions of those tables said
  (a generated ``retired`` column, a CHECK that refuses the marker, other columns) is gone.

"Mentions" is lexical: a reserved name is ``_shardlite`` at the start of a word (not preceded by a letter,
digit, ``_``, ``$`` or a non-ASCII character, which SQLite reads as part of an identifier), also inside
quotes, string literals and comments. An app object whose SQL says ``_shardlite_...`` in a comment or a
string is refused too: over-refusing is the safe side.

Rows are validated by type; the outbox's events (kept only when asked) by structure: a canonical key as
destination, a valid topic, a JSON payload within the size limit, the emitting incarnation's form.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final

import apsw

from ..core.keys import canonical
from ..core.outbox import DEFAULT_MAX_PAYLOAD, check_topic, from_json
from ..errors import IdentityMismatch, InvalidKey, ShardliteError
from .authorizer import RESERVED_PREFIX
from .catalog import GLOBAL_STEPS
from .schema import INTERNAL_STEPS, INTERNAL_VERSION, Step, run_step

__all__ = ["foreign_references", "refuse_foreign", "tenant_objects", "global_objects", "rebuild_tenant_tables",
           "Rebuilt", "TENANT_TABLES", "shown"]

#: ``_shardlite`` at the start of a word, as SQLite's tokenizer splits words (identifier characters are
#: ASCII letters, digits, ``_``, ``$`` and every character past U+007F).
_RESERVED_WORD: Final = re.compile(r"(?<![0-9A-Za-z_$\u0080-\U0010ffff])" + RESERVED_PREFIX + r"[0-9A-Za-z_$]*",
                                   re.IGNORECASE)
_HEX32: Final = re.compile(r"[0-9a-f]{32}")
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
#: Sequence numbers and row ids kept from a file stay below this (emit adds one to the highest).
_MAX_SEQ: Final = 1 << 62

#: One schema object: (type, lower-case name, lower-case table name).
Object = tuple[str, str, str]


def shown(text: object) -> str:
    """``text`` quoted for a message, with invisible and control characters escaped (names in a file
    from outside may hold bidi overrides)."""
    return repr(text) if isinstance(text, str) else f"<{type(text).__name__}>"


def _plain(name: str) -> str:
    """An object's name for a message: as it is when it is a plain identifier, else quoted and escaped."""
    return name if _IDENTIFIER.fullmatch(name) else shown(name)


def _objects_of(steps: Sequence[Sequence[Step]]) -> frozenset[Object]:
    mem = apsw.Connection(":memory:")
    try:
        for version in steps:
            for sql in version:
                if isinstance(sql, str):  # a callable step moves or rewrites data, it creates no object
                    run_step(mem, sql)
        rows = mem.execute("SELECT type, name, tbl_name FROM sqlite_schema").fetchall()
    finally:
        mem.close()
    return frozenset((str(t), str(n).lower(), str(tb).lower()) for t, n, tb in rows
                     if str(n).lower().startswith(RESERVED_PREFIX))


@functools.cache
def tenant_objects() -> frozenset[Object]:
    """The objects shardlite itself creates in a tenant file (its current definitions)."""
    return _objects_of(INTERNAL_STEPS)


@functools.cache
def global_objects() -> frozenset[Object]:
    """The objects shardlite itself creates in the global DB."""
    return _objects_of(GLOBAL_STEPS)


def _describe(kind: str, name: str, table: str, sql: str | None, internal: Collection[Object],
              internal_tables: Collection[str]) -> str | None:
    """Why the object is foreign and touches a reserved name, or None when it is fine."""
    virtual = kind == "table" and sql is not None and sql.lstrip()[:14].upper().startswith("CREATE VIRTUAL")
    if (kind, name.lower(), table.lower()) in internal and not virtual:
        return None  # one of shardlite's own (its definition is shardlite's business, not this check's)
    label = f"{'virtual table' if virtual else kind} {_plain(name)}"
    if kind in ("index", "trigger") and table.lower() in internal_tables:
        return f"{label} on {table}"
    if name.lower().startswith(RESERVED_PREFIX):
        return f"{label} takes a reserved {RESERVED_PREFIX}_* name"
    mentioned = sorted({m.group(0) for m in _RESERVED_WORD.finditer(f"{table} {sql or ''}")})
    if mentioned:
        return f"{label} references {', '.join(mentioned)}"
    return None


def foreign_references(conn: apsw.Connection, schema: str = "main", *,
                       internal: Collection[Object] | None = None) -> list[str]:
    """Every object of ``schema`` ("main", "temp" or an attached name) on ``conn`` that is not shardlite's
    own and touches a reserved name, described for people ("trigger spy on _shardlite_feed", "table trap
    references _shardlite_relay"; a name that is not a plain identifier is quoted with its invisible
    characters escaped); empty when there is none.

    Foreign means: a name with the reserved prefix, SQL that mentions a reserved name anywhere, or an
    index or trigger attached to one of shardlite's tables. shardlite's own objects are ``internal``
    (``(type, lower-case name, lower-case table)``); by default those it creates in a tenant file or in the
    global DB. Automatic indexes (no SQL) are SQLite's and skipped. Reads ``sqlite_schema`` (or
    ``sqlite_temp_schema``) only: no view expands, no trigger fires, nothing is written."""
    known = (tenant_objects() | global_objects()) if internal is None else internal
    tables = {name for kind, name, _ in known if kind == "table"}
    where = "temp.sqlite_schema" if schema.lower() == "temp" else '"' + schema.replace('"', '""') + '".sqlite_schema'
    found = []
    for kind, name, table, sql in conn.execute(f"SELECT type, name, tbl_name, sql FROM {where}").fetchall():
        if kind == "index" and sql is None:
            continue
        why = _describe(str(kind), str(name), str(table), None if sql is None else str(sql), known, tables)
        if why is not None:
            found.append(why)
    return found


def refuse_foreign(conn: apsw.Connection, label: str, *, internal: Collection[Object] | None = None) -> None:
    """Raise :class:`ShardliteError` naming every foreign object :func:`foreign_references` finds in the
    main and temp schemas of ``conn`` (``label`` names the file in the message)."""
    found = foreign_references(conn, "main", internal=internal) + foreign_references(conn, "temp", internal=internal)
    if found:
        raise ShardliteError(
            f"{label} is refused: its schema touches shardlite's own tables ({'; '.join(found)}); nothing was "
            "changed. Remove those objects from the file (or export the tenant again with shardlite) and retry")


# -- the rebuild -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    name: str
    create: str  # the current definition
    columns: tuple[str, ...]


@functools.cache
def _tenant_tables() -> dict[str, _Table]:
    mem = apsw.Connection(":memory:")
    try:
        for version in INTERNAL_STEPS:
            for sql in version:
                run_step(mem, sql)
        found = {}
        for row in mem.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table' ORDER BY rowid").fetchall():
            name = str(row[0])
            columns = tuple(str(r[1]) for r in mem.execute(f"PRAGMA table_info({_quote(name)})").fetchall())
            found[name] = _Table(name, str(row[1]), columns)
        return found
    finally:
        mem.close()


#: shardlite's tables in a tenant file.
TENANT_TABLES: Final = ("_shardlite_meta", "_shardlite_outbox", "_shardlite_inbox", "_shardlite_relay",
                        "_shardlite_feed")
#: Columns a file may lack (added by a later internal version, or never kept: the marker and the claim
#: are cleared anyway), and the value they take.
_OPTIONAL: Final = {("_shardlite_outbox", "origin"): None, ("_shardlite_relay", "last_seq"): 0,
                    ("_shardlite_relay", "id"): 1, ("_shardlite_relay", "claimed_by"): None,
                    ("_shardlite_relay", "claimed_until"): 0, ("_shardlite_relay", "parked_version"): None,
                    ("_shardlite_meta", "retired"): None}


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuilt tenant copy held: its stored key and incarnation, and the outbox events kept."""

    old_key: str
    old_incarnation: str
    events: int


class _Bad(Exception):
    """A value that fails validation (turned into a ShardliteError naming the row)."""


def _int(value: Any, low: int = 0, high: int = _MAX_SEQ) -> int:
    if type(value) is not int or not low <= value <= high:
        raise _Bad(f"{value!r} is not an integer from {low} to {high}")
    return value


def _real(value: Any) -> float | int:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _Bad(f"{value!r} is not a finite number")
    return value  # type: ignore[no-any-return]


def _text(value: Any) -> str:
    if type(value) is not str:
        raise _Bad(f"{shown(value)} is not text")
    return value


def _text_or_null(value: Any) -> str | None:
    return None if value is None else _text(value)


def _key(value: Any) -> str:
    try:
        if canonical(value) == value:
            return value  # type: ignore[no-any-return]
    except InvalidKey as exc:
        raise _Bad(f"{shown(value)} is not a valid key ({exc})") from None
    raise _Bad(f"{shown(value)} is not in canonical form (NFC)")


def _incarnation(value: Any) -> str:
    if type(value) is not str or not _HEX32.fullmatch(value):
        raise _Bad(f"{shown(value)} is not an incarnation (32 lower-case hex digits)")
    return value


def _json(limit: int | None) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        text = _text(value)
        size = len(text.encode("utf-8", "surrogatepass"))
        if limit is not None and size > limit:
            raise _Bad(f"a payload of {size} bytes is over the limit of {limit}")
        try:
            from_json(text)
        except (ValueError, RecursionError):
            raise _Bad(f"{shown(text[:40])} is not JSON") from None
        return text
    return check


def _topic(value: Any) -> str:
    try:
        return check_topic(value)
    except ValueError as exc:
        raise _Bad(f"{shown(value)}: {exc}") from None


def _present(conn: apsw.Connection) -> dict[str, str]:
    """Lower-case name -> stored name of the plain tables of ``conn`` holding one of shardlite's names."""
    rows = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchall()
    wanted = set(TENANT_TABLES)
    return {str(n).lower(): str(n) for (n,) in rows if str(n).lower() in wanted}


def _read(conn: apsw.Connection, stored: str | None, table: _Table, label: str) -> list[tuple[Any, ...]]:
    """The rows of the file's ``stored`` table, one value per column of the current definition (a column
    it lacks takes its value from :data:`_OPTIONAL`). Generated and hidden columns count as columns."""
    if stored is None:
        return []
    have = {str(r[1]).lower() for r in conn.execute(f"PRAGMA table_xinfo({_quote(stored)})").fetchall()}
    picks = []
    for column in table.columns:
        if column.lower() in have:
            picks.append(_quote(column))
        elif (table.name, column) in _OPTIONAL:
            default = _OPTIONAL[(table.name, column)]
            picks.append("NULL" if default is None else str(int(default)))
        else:
            raise IdentityMismatch(f"{label} is not a shardlite tenant file: its {table.name} has no column {column}")
    return conn.execute(f"SELECT {', '.join(picks)} FROM {_quote(stored)}").fetchall()


def _validated(rows: list[tuple[Any, ...]], checks: Sequence[Callable[[Any], Any]], table: str,
               label: str) -> list[tuple[Any, ...]]:
    out = []
    for number, row in enumerate(rows, 1):
        try:
            out.append(tuple(check(value) for check, value in zip(checks, row, strict=True)))
        except _Bad as exc:
            raise ShardliteError(f"{label} is refused: row {number} of {table} is invalid: {exc}; nothing was "
                                 "changed") from None
    return out


def rebuild_tenant_tables(conn: apsw.Connection, *, key: str, incarnation: str, keep_events: bool, label: str,
                          max_payload: int = DEFAULT_MAX_PAYLOAD) -> Rebuilt:
    """Rebuild shardlite's tables of the tenant copy open on ``conn`` (a trusted, :func:`inert` connection
    inside the caller's write transaction) from shardlite's current definitions, as tenant ``key`` with
    the new ``incarnation``; the retired marker, the relay's claim and its parked-flag marker are cleared
    (the copy's marker names a flag of the root and the moment it came from).

    Refuses the file (:class:`ShardliteError`, nothing written) when :func:`refuse_foreign` finds objects
    touching shardlite's tables, when it is no shardlite tenant file (:class:`IdentityMismatch`), when it
    comes from a newer shardlite, or when a row fails validation. Outbox events are kept when
    ``keep_events`` and the file holds ``key``'s own tenant (each keeps the incarnation that emitted it),
    dropped otherwise; event numbers never go back either way. The inbox (what this tenant already
    applied) and the feed are kept."""
    refuse_foreign(conn, label, internal=tenant_objects())
    tables = _tenant_tables()
    present = _present(conn)
    if "_shardlite_meta" not in present:
        raise IdentityMismatch(f"{label} is not a shardlite tenant file (it has no _shardlite_meta table)")
    meta = _read(conn, present["_shardlite_meta"], tables["_shardlite_meta"], label)
    if len(meta) != 1 or meta[0][0] != 1:
        raise IdentityMismatch(f"{label} is not a shardlite tenant file (it needs exactly one identity row)")
    _, old_key, old_incarnation, version, created, _ = _validated(
        meta, (_int, _key, _incarnation, _int, _real, _text_or_null), "_shardlite_meta", label)[0]
    if not 1 <= version <= INTERNAL_VERSION:
        raise ShardliteError(f"{label} is refused: its shardlite tables are at version {version}, this shardlite "
                             f"knows 1 to {INTERNAL_VERSION} (import it with a newer shardlite)")

    def rows(name: str) -> list[tuple[Any, ...]]:
        return _read(conn, present.get(name), tables[name], label)

    outbox = rows("_shardlite_outbox")
    relay = rows("_shardlite_relay")
    last_seq = max([0, *(r[-1] for r in relay if type(r[-1]) is int),
                    *(r[0] for r in outbox if type(r[0]) is int), *_sequence(conn, present.get("_shardlite_outbox"))])
    if last_seq >= _MAX_SEQ:
        raise ShardliteError(f"{label} is refused: its outbox numbers reach {last_seq}, past {_MAX_SEQ}; nothing "
                             "was changed")
    kept = keep_events and old_key == key
    if kept:
        outbox = _validated(outbox, (functools.partial(_int, low=1), _key, _topic, _json(max_payload), _real,
                                     _int, _real, _text_or_null, lambda v: old_incarnation if v is None else
                                     _incarnation(v)), "_shardlite_outbox", label)
    inbox = _validated(rows("_shardlite_inbox"), (_key, _incarnation, _int), "_shardlite_inbox", label)
    feed = _validated(rows("_shardlite_feed"), (functools.partial(_int, low=1), _key, _topic,
                                                _json(None), _text, _real),
                      "_shardlite_feed", label)

    for stored in present.values():
        conn.execute(f"DROP TABLE {_quote(stored)}")
    if _sequence_exists(conn):
        conn.execute("DELETE FROM sqlite_sequence WHERE substr(lower(name), 1, ?) = ?",
                     (len(RESERVED_PREFIX), RESERVED_PREFIX))
    for name in TENANT_TABLES:
        conn.execute(tables[name].create)
    _insert(conn, tables["_shardlite_meta"], [(1, key, incarnation, INTERNAL_VERSION, created, None)])
    _insert(conn, tables["_shardlite_relay"], [(1, None, 0, last_seq, None)])  # no claim, no parked flag
    _insert(conn, tables["_shardlite_outbox"], outbox if kept else [])
    _insert(conn, tables["_shardlite_inbox"], inbox)
    _insert(conn, tables["_shardlite_feed"], feed)
    return Rebuilt(old_key, old_incarnation, len(outbox) if kept else 0)


def _sequence_exists(conn: apsw.Connection) -> bool:
    return bool(conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'sqlite_sequence'"
                             ).fetchall())


def _sequence(conn: apsw.Connection, outbox: str | None) -> list[int]:
    """The AUTOINCREMENT counter a file of internal version 3 or older kept for its outbox."""
    if outbox is None or not _sequence_exists(conn):
        return []
    rows = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (outbox,)).fetchall()
    return [int(r[0]) for r in rows if type(r[0]) is int]


def _insert(conn: apsw.Connection, table: _Table, rows: list[tuple[Any, ...]]) -> None:
    if rows:
        columns = ", ".join(_quote(c) for c in table.columns)
        marks = ", ".join("?" for _ in table.columns)
        conn.executemany(f"INSERT INTO {_quote(table.name)}({columns}) VALUES ({marks})", rows)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
