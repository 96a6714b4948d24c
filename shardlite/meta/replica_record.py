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
"""

from __future__ import annotations

from ..core import retention
from ..errors import ConfigurationError
from ..replica.target import parse_target
from .kv import MetaKV

__all__ = ["REPLICATE_NAME", "RETENTION_NAME", "recorded_replica", "record_replica", "recorded_windows",
           "record_windows"]

#: The kv name of the root's replica location.
REPLICATE_NAME = "replicate"
#: The kv name of the replica's retention windows.
RETENTION_NAME = "replicate_retention"


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
