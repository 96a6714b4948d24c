"""The built-in activity feed: a standard handler that appends events to ``_shardlite_feed`` in the
destination tenant, and a reader that returns them newest first with a cursor.

``router.use_feed("message", ...)`` registers :func:`append` for those topics; ``router.feed(key,
limit=50, before=None)`` returns :class:`FeedItem` objects, newest first; pass the last item's ``id`` as
``before`` for the next page. Appending is exactly once in effect (the relay's inbox mark commits with it).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..core.outbox import Event, from_json, to_json
from ..files.authorizer import INTERNAL_SQL
from .transaction import Transaction

__all__ = ["FeedItem", "append", "insert_values", "page_query", "INSERT", "MAX_PAGE"]

#: The largest page :func:`page_query` (``router.feed(limit=...)``) returns.
MAX_PAGE = 1000


def page_query(limit: int) -> str:
    """The feed page statement for ``limit`` entries (clamped to 0..MAX_PAGE) before a cursor (``?``): one
    of shardlite's own reads (prefixed with INTERNAL_SQL, run trusted: user SQL may not read the feed table).

    The limit is written into the SQL text, not bound. Measured with APSW 3.54 (SQLite built with STAT4):
    a LIMIT bound as a parameter costs 3 to 9 µs more per run (it looks like a re-prepare after each
    bind; the statement cache still hits), as much as a small page read itself. The statement cache
    keeps one prepared statement per limit in use."""
    return (f"{INTERNAL_SQL}SELECT id, source, topic, payload, event, at FROM _shardlite_feed WHERE id < ? "
            f"ORDER BY id DESC LIMIT {max(0, min(int(limit), MAX_PAGE))}")


class FeedItem(NamedTuple):
    """One feed entry: ``id`` (the cursor), the event's source key, topic, payload and id, and when the
    source emitted it. Immutable; a named tuple because a page builds fifty of them (a frozen dataclass
    cost 0.7 µs each, a sixth of reading the page)."""

    id: int
    source: str
    topic: str
    payload: Any
    event_id: str
    at: float


INSERT = "INSERT INTO _shardlite_feed(source, topic, payload, event, at) VALUES (?, ?, ?, ?, ?)"


def append(tx: Transaction, event: Event) -> None:
    """Handler: add ``event`` to the destination tenant's feed."""
    tx._internal(INSERT, (event.source, event.topic, to_json(event.payload), event.id, event.created))


def insert_values(source: str, incarnation: str, topic: str, payload_json: str, seq: int,
                  created: float) -> tuple[str, str, str, str, float]:
    """The :data:`INSERT` parameters for an outbox event as stored (its payload still JSON text): what
    :func:`append` writes for that event, for a relay that applies the feed without decoding it."""
    return source, topic, payload_json, f"{source}/{incarnation}/{seq}", created


def items(rows: list[tuple[Any, ...]]) -> list[FeedItem]:
    """Feed rows as :class:`FeedItem` objects. The payloads (JSON texts written by :func:`append`; user SQL
    cannot write this table) are decoded in one :func:`~shardlite.core.outbox.from_json` of their array: per
    call, the decoder's overhead costs more than parsing a small payload does."""
    if not rows:
        return []
    try:
        payloads = from_json("[" + ",".join([row[3] for row in rows]) + "]")
        if not isinstance(payloads, list) or len(payloads) != len(rows):
            raise ValueError("a payload is not exactly one JSON value")
    except ValueError:  # decode them one by one: the same values, or the error of the bad one
        payloads = [from_json(row[3]) for row in rows]
    new = tuple.__new__
    return [new(FeedItem, (i, s, t, p, e, float(a)))
            for (i, s, t, _, e, a), p in zip(rows, payloads, strict=True)]
