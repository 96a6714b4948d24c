"""Restoring tenants from a root's replica: the latest state, or any commit inside the retention window.

``restore_tenant`` reads one tenant's captures from the replica (:mod:`shardlite.services.replica_read`),
rebuilds its database image at the requested time (:func:`shardlite.core.timeline.image_at`: its last commit
at or before that time) and installs it the way a restore from a backup does
(:func:`shardlite.services.restore.install_image`: checked whole, shardlite's tables rebuilt, a new
generation and incarnation, events kept only under the tenant's own key). Nothing is registered when any
step fails.

Times are ISO 8601 with a time zone (``2026-12-06T18:00:00Z``, ``...+01:00``): a time without one is
refused rather than guessed.
"""

from __future__ import annotations

import datetime
from typing import Any

from ..core import timeline
from ..core.keys import canonical
from ..errors import ConfigurationError, UnknownTenant
from ..front.store import Store
from ..replica.target import ReplicaTarget
from . import replica_read
from .restore import install_image

__all__ = ["restore_tenant", "parse_time", "format_time"]


def parse_time(text: str) -> int:
    """An ISO 8601 time with a time zone, as nanoseconds since the epoch (:class:`ConfigurationError`
    otherwise)."""
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise ConfigurationError(f"--at {text[:64]!r} is not an ISO 8601 time (e.g. 2026-12-06T18:00:00Z)") from None
    if when.tzinfo is None:
        raise ConfigurationError(f"--at {text[:64]!r} has no time zone: add one (e.g. Z for UTC, or +01:00)")
    delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def format_time(ns: int) -> str:
    """``ns`` since the epoch as ISO 8601 UTC with microseconds."""
    when = datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def restore_tenant(store: Store, target: ReplicaTarget, key: object, *, as_key: object | None = None,
                   at_ns: int | None = None, force: bool = False) -> dict[str, Any]:
    """Restore tenant ``key`` (as ``as_key`` when given) from ``target`` at its last commit at or before
    ``at_ns`` (None: the latest). Returns what was restored: the key, the commit's time and frame, the
    history it came from, the new generation and incarnation. :class:`~shardlite.UnknownTenant` when the
    replica holds no commit of ``key`` at that time."""
    canon = canonical(key)
    captures = replica_read.captures_of(target, [canon])[canon]
    found = timeline.image_at(captures, at_ns)
    if found is None:
        when = "" if at_ns is None else f" at or before {format_time(at_ns)}"
        raise UnknownTenant(f"the replica {target.url} holds no commit of tenant {canon!r}{when}; "
                            "`shardlite replicate status` lists what it holds")
    image, point = found
    record = install_image(store, bytes(image), canon, as_key=as_key, force=force,
                           label=f"the replica of {canon!r} at {format_time(point.time_ns)}")
    return {"key": record.key, "from_key": canon, "commit_time": format_time(point.time_ns),
            "commit_ns": point.time_ns, "frame": point.frame, "from_incarnation": point.incarnation,
            "from_generation": point.generation, "generation": record.generation,
            "incarnation": record.incarnation}
