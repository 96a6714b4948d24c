"""Where a root's tenants are replicated, as its metadata records it (I/O: reads and writes the kv store).

The rules, in the words of the public API (``Router(root, replicate=...)``):

* the first router (or ``shardlite init --replicate``) given a replica location records it in the root's
  metadata (the kv value ``replicate``, in ``global.db`` or PostgreSQL); the first writer wins when
  several processes race (:meth:`~shardlite.meta.kv.MetaKV.put_if_absent`);
* every later ``Router(root)`` and CLI command finds it there without being told;
* a ``replicate=`` naming another location raises :class:`~shardlite.ConfigurationError` naming both;
* what is recorded and printed is the canonical URL (:func:`shardlite.replica.parse_target`), which never
  holds a secret: a URL with credentials is refused, access keys come from the AWS environment.

A root that was never given a location records nothing and reads one kv value when a router opens it.

The replica's retention windows (:mod:`shardlite.core.retention`: a default, 7 days unless set, and per key
prefix overrides) are the kv value ``replicate_retention`` (JSON; last writer wins; absent: the defaults).
A recorded value is read back as hostile input: a damaged one is a :class:`ConfigurationError`, never a
window silently shorter than the one set.

The root's replica owner id (the kv value ``replicate_owner``, 32 hex digits, made by the first process that
replicates the root) names it in its replica's owner marker, and ``replicate_adopted`` (JSON list) holds the
owner ids of the roots this one continues (recorded by a restore from their replica, or by
``replicate adopt``), whose replica it takes over (:mod:`shardlite.core.replica_owner`).
"""

from __future__ import annotations

import json
import secrets

from ..core import retention
from ..core.replica_owner import valid_owner
from ..errors import ConfigurationError
from ..replica.target import parse_target
from .kv import MetaKV

__all__ = ["REPLICATE_NAME", "RETENTION_NAME", "OWNER_NAME", "ADOPTED_NAME", "recorded_replica", "record_replica",
           "recorded_windows", "record_windows", "replica_owner", "adopted_owners", "record_adopted"]

#: The kv name of the root's replica location.
REPLICATE_NAME = "replicate"
#: The kv name of the replica's retention windows.
RETENTION_NAME = "replicate_retention"
#: The kv name of the root's replica owner id.
OWNER_NAME = "replicate_owner"
#: The kv name of the owner ids of the roots this root continues.
ADOPTED_NAME = "replicate_adopted"


def recorded_windows(kv: MetaKV) -> retention.Windows:
    """The root's retention windows (the defaults when none were recorded)."""
    try:
        return retention.decode_windows(kv.get(RETENTION_NAME))
    except retention.RetentionError as exc:
        raise ConfigurationError(f"{exc}: set them again with `shardlite replicate retention --default 7d`") from None


def record_windows(kv: MetaKV, windows: retention.Windows) -> retention.Windows:
    """Record ``windows`` (checked first: :class:`ConfigurationError`, nothing written) and return them."""
    try:
        text = retention.encode_windows(windows)
    except retention.RetentionError as exc:
        raise ConfigurationError(str(exc)) from None
    kv.put(RETENTION_NAME, text)
    return windows


def recorded_replica(kv: MetaKV) -> str | None:
    """The root's recorded replica location (canonical URL), or None when it does not replicate."""
    return kv.get(REPLICATE_NAME)


def record_replica(kv: MetaKV, root: str, replicate: str | None) -> str | None:
    """The root's replica location after recording ``replicate`` if none was recorded yet (None: record
    nothing, return what is recorded). :class:`ConfigurationError` for an invalid location or one that
    disagrees with the recorded one; neither message ever shows a credential."""
    recorded = kv.get(REPLICATE_NAME)
    if replicate is None:
        return recorded
    wanted = parse_target(replicate).url  # refuses credentials in the URL before anything is written
    stored = recorded if recorded is not None else kv.put_if_absent(REPLICATE_NAME, wanted)
    if stored != wanted:
        raise ConfigurationError(
            f"{root} replicates to {stored} (recorded in its metadata), but replicate= (--replicate) names "
            f"{wanted}: leave it out, or give the recorded location")
    return stored


def replica_owner(kv: MetaKV) -> str:
    """The root's replica owner id, made now if it has none (the first writer wins a race)."""
    owner = kv.get(OWNER_NAME)
    if owner is None:
        owner = kv.put_if_absent(OWNER_NAME, secrets.token_hex(16))
    if not valid_owner(owner):
        raise ConfigurationError(f"the root's recorded replica owner id {owner!r} is damaged (32 hex digits "
                                 "expected): nothing is uploaded until it is repaired: `shardlite replicate adopt` "
                                 "gives the root a new one and takes its replica over")
    return owner


def adopted_owners(kv: MetaKV) -> frozenset[str]:
    """The owner ids of the roots this root continues (empty when none was recorded)."""
    text = kv.get(ADOPTED_NAME)
    if text is None:
        return frozenset()
    try:
        found = json.loads(text)
    except ValueError:
        found = None
    if not isinstance(found, list) or not all(valid_owner(o) for o in found):
        raise ConfigurationError("the root's record of the replica histories it continues is damaged: record them "
                                 "again with `shardlite replicate adopt`")
    return frozenset(found)


def record_adopted(kv: MetaKV, owners: frozenset[str], *, repair: bool = False) -> frozenset[str]:
    """Add ``owners`` to the roots this root continues (their replica becomes this root's at its next
    replication start); returns every one recorded. ``repair``: a damaged record is replaced, not refused."""
    if not all(valid_owner(o) for o in owners):
        raise ConfigurationError("not owner ids: " + ", ".join(sorted(map(repr, owners))))
    try:
        earlier = adopted_owners(kv)
    except ConfigurationError:
        if not repair:
            raise
        earlier = frozenset()
    every = earlier | owners
    kv.put(ADOPTED_NAME, json.dumps(sorted(every)))
    return every
