"""What a replication round answers to the confirmation requests it took (docs/replication.md,
"durability=replicated"; the channel: :mod:`shardlite.services.confirmations`).

A request names a tenant and, from a writer of this version, the file it committed to (the tenant's
incarnation and the file's generation). Each request taken into a round gets one of:

- **shipped** when nothing of its tenant is left staged after the round and either
  - the file is still the tenant's live file on this node (the round captured it after the request came:
    the capture holds the writer's commit, and it was uploaded), or
  - the file was dropped and its drop record is recorded as shipped (:meth:`~shardlite.files.staging.Staging.
    drop_shipped`): a drop fences the file and stages, with its drop record, every commit its node's
    replicator had not captured (:mod:`shardlite.services.drop_tail`), and a drop record ships in the pack
    of its file's last captures or after it, so every commit made before the fence, the writer's included,
    is in the replica;
- **erased** when the file's incarnation was erased on this node (``drop --erase``): the write was removed
  from the replica on purpose, so the answer is not "shipped", and waiting longer would not change it;
- an **error** when the capture or the upload failed (the writer may wait again: ``wait_replicated``), or
  the file is not on this node any more and no drop of it is staged or was shipped recently (it moved: its
  commit ships from its new node);
- **no answer yet**: kept for the next round, at once when the round left something of it staged (a
  backlog of more than one pack, a busy tenant), or at the next tick when something else must happen
  first: its drop is under way (fenced, its tail not staged yet), or an erase holds the node's erase lock
  (the erase decides between shipped and erased). A writer whose bound passes first gets its error.

The identity is compared with the catalog record the answer reads anyway, so a later tenant under the same
key never confirms an earlier one's write (its capture is of another file), nor the reverse (the earlier
tenant's drop record names its own incarnation). Cost: an ordinary request, whose file is live here, is
answered as before, with one catalog lookup per key and round and one read of what is staged; the staging's
drop tables are read only for a request whose file is not live here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..files.catalog import TenantRecord
from ..front.store import Store
from .confirmations import Identity, Request
from .replicator import NodeReplicator, RoundStats

__all__ = ["Decided", "decide", "LATER_LIMIT"]

#: Seconds a request kept for "something else must happen first" waits at most before its error answer (its
#: writer stopped waiting long before, at its ``durability_timeout``, unless told to wait longer).
LATER_LIMIT = 600.0


@dataclass
class Decided:
    """The answers of one round: ``answers`` (request, error or None for shipped, erased), and the requests
    kept for the next round at once (``again``) or at the next tick (``later``)."""

    answers: list[tuple[Request, str | None, bool]] = field(default_factory=list)
    again: list[Request] = field(default_factory=list)
    later: list[Request] = field(default_factory=list)


def _live_here(record: TenantRecord | None, node: str, identity: Identity | None) -> bool:
    if record is None or record.node != node or record.state not in ("active", "moving"):
        return False
    return identity is None or (record.incarnation, record.generation) == identity


def decide(store: Store, node: str, replicator: NodeReplicator, requests: list[Request],
           stats: RoundStats) -> Decided:
    """The answer to every request of a round of ``replicator`` (module docstring)."""
    out = Decided()
    marked = set(replicator.marked())
    staged = replicator.staging.keys_staged({r.key for r in requests})
    records: dict[str, TenantRecord | None] = {}

    def record_of(key: str) -> TenantRecord | None:
        if key not in records:
            records[key] = store.meta.tenants.lookup(key)
        return records[key]

    for request in requests:
        key = request.key
        if key in stats.errors:
            out.answers.append((request, f"the capture of the tenant failed ({stats.errors[key]})", False))
        elif key in marked and key not in replicator.dropping:
            out.again.append(request)  # busy: the next round captures it
        elif key in staged:
            if stats.upload_error is None:
                out.again.append(request)  # a backlog of more than one pack: the next round ships more
            elif request.identity is not None and not _live_here(record_of(key), node, request.identity):
                # the upload failed or waits for an erase, and the file is gone from here: its drop answers
                _after_drop(out, node, replicator, request, request.identity, record_of(key), stats)
            else:
                out.answers.append((request, f"the upload to the replica failed ({stats.upload_error})", False))
        elif _live_here(record_of(key), node, request.identity):
            out.answers.append((request, None, False))
        elif request.identity is None:
            out.answers.append((request, f"the tenant is not on node {node!r} any more (moved or dropped while "
                                         "the write waited): its commit may ship from its new node", False))
        else:
            _after_drop(out, node, replicator, request, request.identity, record_of(key), stats)
    return out


def _after_drop(out: Decided, node: str, replicator: NodeReplicator, request: Request, identity: Identity,
                record: TenantRecord | None, stats: RoundStats) -> None:
    """The answer to a request whose file is not live on this node: by its drop, if it was dropped here."""
    staging = replicator.staging
    key = request.key
    if staging.is_erased(identity.incarnation):
        out.answers.append((request, "the tenant was dropped with erase before this write was confirmed: its "
                                     "whole history, this write included, was removed from the replica on "
                                     "purpose (and its file from the node)", True))
    elif staging.drop_staged(key, identity.incarnation):  # its drop record and tail wait for the next pack
        if stats.upload_error is None:
            out.again.append(request)
        elif stats.upload_blocked:
            out.later.append(request)  # an erase holds the lock: shipped or erased once it is through
        else:
            out.answers.append((request, "the tenant was dropped; its last commits, this write's included, are "
                                         "staged with its drop record, and their upload to the replica failed "
                                         f"({stats.upload_error})", False))
    elif staging.drop_shipped(key, identity.incarnation, identity.generation) is not None:
        out.answers.append((request, None, False))
    elif (record is not None and record.state == "dropping" and record.node == node
          and (record.incarnation, record.generation) == identity):
        if time.monotonic() - request.received < LATER_LIMIT:
            out.later.append(request)  # the drop is under way: it stages the file's last commits, this one's too
        else:
            out.answers.append((request, f"the tenant's drop has not staged its last commits after "
                                         f"{LATER_LIMIT:g} s (its dropping process stopped?): run the drop again",
                                False))
    else:
        out.answers.append((request, f"the tenant's file this write went to is not on node {node!r} any more "
                                     "(moved while the write waited, or dropped, or replaced, and no drop of it "
                                     "is staged or recorded as shipped here): its commit may ship from its new "
                                     "node", False))
