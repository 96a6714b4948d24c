"""A relay's lease on a source tenant, kept in the source's own file (``_shardlite_relay``: who holds it,
until when): taking it with a batch of the outbox, and giving leases back when the relay stops.

While a relay's lease has more than a quarter of its time left (its acknowledgements renew it), its next
read of the source *is* the claim: no other relay can take the source meanwhile, and emitters only add rows.
A live lease of another relay is seen by a read, without taking the source's write lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..core.outbox import OutboxRow, plan
from ..errors import Busy, TenantMoving, UnknownTenant
from ..front.store import Store
from .delivery import Claim, Handler

__all__ = ["ClaimedElsewhere", "claim_source", "release_leases"]

log = logging.getLogger("shardlite.relay")

# The batch size is written into the SQL text (see feed.page_query: a bound LIMIT re-prepares every run).
_READ_OUTBOX = ("SELECT seq, dest, topic, payload, created, attempts, next_at, origin FROM _shardlite_outbox "
                "ORDER BY seq LIMIT {batch:d}")
#: A source whose lease this relay still holds is read, not claimed: the claim row, the file's incarnation
#: and parked-flag marker, and a batch of its outbox in one snapshot (one row with NULL event columns when the
#: outbox is empty).
_PEEK = ("SELECT r.claimed_by, r.claimed_until, m.incarnation, r.parked_version, o.seq, o.dest, o.topic, "
         "o.payload, o.created, o.attempts, o.next_at, o.origin "
         "FROM _shardlite_meta AS m JOIN _shardlite_relay AS r ON r.id = 1 "
         "LEFT JOIN (SELECT * FROM _shardlite_outbox ORDER BY seq LIMIT {batch:d}) AS o WHERE m.id = 1 ORDER BY o.seq")


class ClaimedElsewhere(Exception):
    """Another live relay holds the source's lease until ``until``."""

    def __init__(self, until: float) -> None:
        super().__init__(until)
        self.until = until


def claim_source(store: Store, source: str, now: float, *, relay_id: str, lease: float, batch: int,
                 handlers: dict[str, Handler], held: set[str], wait_ms: int) -> Claim:
    """Take ``source``'s lease for ``relay_id`` (``lease`` seconds from ``now``) and read a batch of its
    outbox, planned against ``handlers``; ``held`` (the sources whose lease this relay holds) follows.
    :class:`ClaimedElsewhere` when another relay's lease is live. Locks are waited for ``wait_ms`` at most."""
    peek = _PEEK.format(batch=int(batch))
    # On the write connection: a read connection would be taken from under this process's own readers (the
    # AsyncRouter's reads on the event loop fall back to a worker thread when theirs is busy), which made the
    # chat workload (benchmarks/chat_workload.py, PostgreSQL metadata) ~6 % slower in an A/B of both.
    found = store.read_on_writer(source, peek, move_wait=0.0, wait_ms=wait_ms)
    claimed_by, claimed_until, incarnation, marker = found[0][:4]
    if claimed_by == relay_id and claimed_until - now > lease / 4:
        rows = [OutboxRow(*row[4:]) for row in found if row[4] is not None]
        return _claim(source, str(incarnation), rows, handlers, now, float(claimed_until), batch, marker)
    if claimed_by not in (None, relay_id) and claimed_until > now:
        held.discard(source)
        raise ClaimedElsewhere(float(claimed_until))
    with store.writing(source, create=False, wait_ms=wait_ms, move_wait=0) as handle:
        claim: list[Any] = store.internal(
            handle, "SELECT claimed_by, claimed_until, parked_version FROM _shardlite_relay WHERE id = 1").fetchall()
        claimed_by, claimed_until, marker = claim[0]
        if claimed_by not in (None, relay_id) and claimed_until > now:
            held.discard(source)
            raise ClaimedElsewhere(float(claimed_until))
        store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = ?, claimed_until = ? WHERE id = 1",
                       (relay_id, now + lease))
        held.add(source)
        found = store.internal(handle, _READ_OUTBOX.format(batch=int(batch))).fetchall()
        rows = [OutboxRow(*row) for row in found]
        return _claim(source, handle.incarnation, rows, handlers, now, now + lease, batch, marker)


def _claim(source: str, incarnation: str, rows: list[OutboxRow], handlers: dict[str, Handler], now: float,
           until: float, batch: int, marker: Any) -> Claim:
    return Claim(source, incarnation, plan(rows, handlers, now), until, read=len(rows), full=len(rows) >= batch,
                 marker=None if marker is None else int(marker))


def release_leases(store: Store, held: set[str], *, relay_id: str, wait_ms: int,
                   report: Callable[[str, str, BaseException, str], str]) -> None:
    """Give up ``relay_id``'s leases on ``held``; a source that cannot be written now keeps its lease until it
    runs out (one source never keeps the others' leases: its error is ``report``ed)."""
    for source in held:
        try:
            with store.writing(source, create=False, wait_ms=wait_ms, move_wait=0) as handle:
                store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = NULL, claimed_until = 0 "
                               "WHERE id = 1 AND claimed_by = ?", (relay_id,))
        except (UnknownTenant, Busy, TenantMoving) as exc:  # expires by itself within the lease
            log.debug("relay: could not release %r (%s)", source, exc)
        except Exception as exc:  # noqa: BLE001 - one source never keeps the others' leases
            report("source", source, exc, " (releasing its lease)")
