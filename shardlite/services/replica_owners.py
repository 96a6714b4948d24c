"""The root a replica location belongs to, checked before a root writes to it (I/O over
:mod:`shardlite.core.replica_owner`).

The location's owner marker, ``v1/owner``, names the root that replicates there. The replication service
checks it before its first upload (:func:`claim`): it is written when absent (atomically: of two roots
starting at once, one wins), taken over when it is a root this one adopted, and otherwise refuses the root
with :class:`~shardlite.ConfigurationError`, before any pack, metadata snapshot or compaction of this root
lands among another root's; a running process checks it again every
:data:`~shardlite.services.replication.OWNER_RECHECK` seconds (:func:`still_ours`) and stops once another root
took the location over. Compactions and erases claim it too. :func:`adopt` records the location's owner as a
root this one continues (``replicate adopt``, and every whole-root restore from a replica).
"""

from __future__ import annotations

import logging
import secrets

from ..core import replica_owner as ro
from ..core.replica_owner import valid_owner
from ..errors import ConfigurationError, ReplicaObjectMissing, ReplicaUnavailable
from ..meta.kv import MetaKV
from ..meta.replica_record import OWNER_NAME, adopted_owners, record_adopted, replica_owner
from ..replica.target import ReplicaTarget

__all__ = ["OWNER_MARKER", "claim", "still_ours", "owner_of", "adopt"]

log = logging.getLogger("shardlite.replicate")

#: The location's owner marker.
OWNER_MARKER = "v1/owner"
#: Bytes of a marker read at most (a marker is 57 bytes; anything longer is not one).
_READ = 256


def owner_of(target: ReplicaTarget) -> tuple[bool, str | None]:
    """(whether the location has an owner marker, the owner id it names: None when it holds no owner id)."""
    try:
        data = target.get_range(OWNER_MARKER, 0, _READ)
    except ReplicaObjectMissing:
        return False, None
    return True, ro.owner_in(data)


def claim(target: ReplicaTarget, kv: MetaKV, url: str) -> str:
    """Make sure this root (its metadata ``kv``) may write to the replica ``target`` at ``url``: returns its
    owner id. :class:`ConfigurationError` when the location belongs to another root (module docstring);
    :class:`~shardlite.ReplicaUnavailable` when it cannot be reached (nothing decided: try again later)."""
    owner = replica_owner(kv)
    ours = ro.marker(owner)
    for _attempt in range(3):
        if target.put_if_absent(OWNER_MARKER, ours):
            return owner
        try:
            data = target.get_range(OWNER_MARKER, 0, _READ)
        except ReplicaObjectMissing:
            continue  # deleted since it was refused: claim it again
        judged = ro.judge(data, owner, adopted_owners(kv))
        if judged.verdict is ro.Verdict.OURS:
            return owner
        if judged.verdict is ro.Verdict.TAKE:
            target.put(OWNER_MARKER, ours)
            log.info("replicate: this root takes over the replica %s from the root it continues (owner %s)", url,
                     judged.found)
            return owner
        raise ConfigurationError(ro.refusal(url, judged.found))
    raise ReplicaUnavailable(f"the owner marker of the replica {url} kept changing while it was read (another root "
                             "starting to replicate there?): try again")


def still_ours(target: ReplicaTarget, owner: str, url: str) -> None:
    """Check again that the replica ``target`` at ``url`` is root ``owner``'s: :class:`ConfigurationError` when
    its marker names another root now (a root that continues this one took the location over), so this root
    stops writing there; :class:`~shardlite.ReplicaUnavailable` when it cannot be read. A marker gone is
    written again."""
    try:
        data = target.get_range(OWNER_MARKER, 0, _READ)
    except ReplicaObjectMissing:
        target.put_if_absent(OWNER_MARKER, ro.marker(owner))
        return
    found = ro.owner_in(data)
    if found != owner:
        raise ConfigurationError(ro.refusal(url, found) + " (it was taken over while this root replicated there)")


def adopt(target: ReplicaTarget, kv: MetaKV) -> str | None:
    """Record the root that owns the replica ``target`` as one this root continues, so this root takes the
    location over at its next replication start; returns that root's owner id (None: the location has no
    owner, or it is this root's). :class:`ConfigurationError` when the marker names no owner id. It also
    repairs this root's records: a damaged owner id is replaced by a new one, a damaged list of adopted roots
    by this one."""
    if not valid_owner(kv.get(OWNER_NAME) or "0" * 32):
        kv.put(OWNER_NAME, secrets.token_hex(16))
    present, found = owner_of(target)
    if not present:
        return None
    if found is None:
        raise ConfigurationError(f"the replica's {OWNER_MARKER} is not a shardlite owner marker; nothing adopted")
    if found == kv.get(OWNER_NAME):
        return None
    record_adopted(kv, frozenset({found}), repair=True)
    return found
