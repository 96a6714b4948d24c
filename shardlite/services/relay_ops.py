"""The relay's operations beside delivery: ``status()``, ``retry_dead()``, and the last error recorded in the
global DB for ``shardlite relay status`` (run in any process).

Retrying a dead letter re-emits it as a new event in its source, exactly once. The event commits in the source
tenant and the letter is deleted from the metadata afterwards: two stores, so a crash between the two would
leave the letter behind, and a second retry would emit it again under a new seq (a duplicate no inbox would
catch). So the source's commit also writes a mark for the letter in the source's own inbox (its
:data:`~shardlite.files.schema.EMIT_SQL` event's number under the letter's :func:`retry_mark`, an incarnation no
file ever has), and a retry that finds the mark only deletes the letter. The pending-work flag is written
before that commit, as for any emit.

The last error a relay *logged* (at most one line per kind of error per interval, see
:mod:`shardlite.services.relay_health`) is kept as one JSON value, ``{"at", "tenant", "error", "relay"}``, in the root's
metadata (:class:`~shardlite.meta.kv.MetaKV`) under ``relay_last_error``: a write per logged line, never per
failure.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import TYPE_CHECKING, Any

import apsw

from ..core.outbox import from_json, to_json
from ..errors import ShardliteError, UnknownTenant
from ..files.schema import EMIT_SQL
from ..front.store import Store
from ..meta.pending import DeadLetter

if TYPE_CHECKING:
    from .relay import Relay

__all__ = ["status", "retry_dead", "retry_mark", "recorded_error", "record_error", "LAST_ERROR"]

#: The name of the last logged relay error in the metadata's named values.
LAST_ERROR = "relay_last_error"


def record_error(store: Store, record: dict[str, Any]) -> None:
    """Keep ``record`` (the last error a relay logged) in the global DB."""
    if store.closed:
        return
    store.meta.kv.put(LAST_ERROR, to_json(record))


def recorded_error(store: Store) -> dict[str, Any] | None:
    """The last error any relay of the root logged, as recorded in the global DB; None if none was."""
    value = store.meta.kv.get(LAST_ERROR)
    if value is None:
        return None
    try:
        found = from_json(value)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


#: At most this many sources are looked at by one status.
_MAX_SOURCES = 1_000_000
#: A source's pending events per topic and the oldest one's creation time: one read per source (a status
#: polled while a relay drains reads every source with events; two statements each cost twice as much).
_PER_TOPIC = "SELECT topic, count(*), min(created) FROM _shardlite_outbox GROUP BY topic"


def _node_entry() -> dict[str, Any]:
    return {"pending": 0, "oldest_age": 0.0, "dead_letters": 0, "sources": 0}


def _node_of(store: Store, key: str) -> str:
    """The node of ``key``, a tenant just read: the route that read used, from the store's route cache (a
    route cache is a hint, issue 15 point 3: fine for a per-node count), so a status of N pending sources
    costs no N catalog round trips on PostgreSQL metadata; the catalog only when the cache has none."""
    record = store.resolve(key, create=False, revive=False)
    return record.node if record is not None else store.locate(key).node


def status(relay: Relay) -> dict[str, Any]:
    """See :meth:`shardlite.services.relay.Relay.status`."""
    store = relay.store
    now = time.time()
    per_node: dict[str, dict[str, Any]] = {n.name: _node_entry() for n in store.meta.nodes.list()}
    topics: dict[str, int] = {}
    wakes = store.emitter.wakes
    waking = wakes.keys() if wakes is not None else set()  # committed here, their parked flags not woken yet
    pending = store.meta.pending
    due = [row.key for row in pending.due(math.inf, _MAX_SOURCES)]  # never the parked: drained (see the sweep)
    for key in dict.fromkeys([*due, *sorted(waking)]):
        try:
            per_topic = store.read_internal(key, _PER_TOPIC)
            node = _node_of(store, key)
        except (UnknownTenant, ShardliteError, apsw.Error):
            continue
        count, oldest = 0, None
        for (topic, n, first) in per_topic:
            topics[topic] = topics.get(topic, 0) + int(n)
            count += int(n)
            if first is not None:
                oldest = first if oldest is None else min(oldest, first)
        entry = per_node.setdefault(node, _node_entry())
        entry["pending"] += int(count)
        entry["sources"] += 1 if count else 0
        if oldest is not None:
            entry["oldest_age"] = max(entry["oldest_age"], now - float(oldest))
    dead = store.meta.dead_letters.list(limit=1_000_000)
    for letter in dead:
        node = store.locate(letter.source).node
        per_node.setdefault(node, _node_entry())["dead_letters"] += 1
    last, recorded = relay.errors.last, recorded_error(store)
    if recorded is not None and (last is None or float(recorded.get("at", 0)) > float(last["at"])):
        last = recorded
    return {
        "pending": sum(v["pending"] for v in per_node.values()),
        "oldest_age": max([v["oldest_age"] for v in per_node.values()] or [0.0]),
        "dead_letters": len(dead),
        "topics": dict(sorted(topics.items())),
        "unhandled_topics": sorted(t for t in topics if t not in relay.handlers),
        "nodes": per_node,
        "running": relay.running,
        "last_error": last,
        **relay.troubles(now),
    }


#: Whether the source's inbox holds a letter's :func:`retry_mark` (its re-emit committed there).
_RETRIED = "SELECT 1 FROM _shardlite_inbox WHERE source = ? AND incarnation = ?"
_MARK_RETRIED = "INSERT INTO _shardlite_inbox(source, incarnation, last_seq) VALUES (?, ?, ?)"


def retry_mark(letter: DeadLetter) -> str:
    """The incarnation under which a source's inbox remembers that ``letter`` was re-emitted (see the module
    doc): 32 hex digits like an incarnation, derived from the letter's identity, so never a real one."""
    text = f"shardlite dead letter {letter.incarnation} {letter.seq}"
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()


def retry_dead(relay: Relay, *, source: str | None = None, seq: int | None = None) -> int:
    """See :meth:`shardlite.services.relay.Relay.retry_dead`."""
    store = relay.store
    count = 0
    letters = store.meta.dead_letters
    for letter in letters.list(limit=1_000_000):
        if source is not None and letter.source != source:
            continue
        if seq is not None and letter.seq != seq:
            continue
        mark = retry_mark(letter)
        try:
            with store.writing(letter.source, create=False) as handle:
                if not store.internal(handle, _RETRIED, (letter.source, mark)).fetchall():
                    store.internal(handle, EMIT_SQL, (letter.dest, letter.topic, letter.payload, letter.created))
                    store.internal(handle, _MARK_RETRIED, (letter.source, mark, handle.conn.last_insert_rowid()))
                    store.meta.pending.flag_many([letter.source])  # before the commit, as for any emit
                if relay.fault is not None:
                    relay.fault("re-emitting")
        except UnknownTenant:
            continue  # its source was dropped: nothing can re-emit it (the letter stays listed)
        except Exception as exc:  # noqa: BLE001 - one source never stops the retry of the others
            relay.report("source", letter.source, exc, " (re-emitting a dead letter)")
            continue
        if relay.fault is not None:
            relay.fault("re-emitted")
        letters.delete(letter.source, letter.incarnation, letter.seq)
        count += 1
    relay.errors.flush()
    return count
