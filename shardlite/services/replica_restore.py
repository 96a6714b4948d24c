"""Restoring tenants from a root's replica: the latest state, or any commit inside the retention window.

``restore_tenant`` reads one tenant's captures from the replica (:mod:`shardlite.services.replica_read`),
rebuilds its database image at the requested time (:func:`shardlite.core.timeline.image_at`: its last commit
at or before that time) and installs it the way a restore from a backup does
(:func:`shardlite.services.restore.install_image`: checked whole, shardlite's tables rebuilt, a new
generation and incarnation, events kept only under the tenant's own key). Nothing is registered when any
step fails.

``restore_root_from_replica`` restores a whole root into a new or empty directory: it writes the replica's
state at the requested time as a backup directory (:func:`materialize`: the metadata at its newest restore
point at or before the time (a snapshot, or a delta applied to one: :mod:`shardlite.services.replica_meta_read`),
each tenant live at that time at its last commit at or before it) and restores that with
every check of a restore from a backup (:func:`shardlite.services.restore.restore_root`). Which tenants were
live at the time is :func:`live_at`'s: the snapshot's catalog, corrected by what happened between the
snapshot and the time: tenants created since, and tenants dropped since (the drop records a plain drop
ships in the node's packs, :class:`shardlite.core.pack.Drop`).

A one-tenant restore (``restore_tenant``) ignores drop records: it finds a dropped tenant's history (inside
the retention window) at its last commit before the drop, which is how a drop is undone.

Times are ISO 8601 with a time zone (``2026-12-06T18:00:00Z``, ``...+01:00``): a time without one is
refused rather than guessed.
"""

from __future__ import annotations

import datetime
import json
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import apsw
import xxhash

from ..core import pack, timeline
from ..core.keys import canonical
from ..errors import ConfigurationError, ReplicaObjectMissing, ShardliteError, UnknownTenant
from ..front.store import Store
from ..meta.replica_record import record_adopted
from ..replica.target import ReplicaTarget
from . import manifest as mf
from . import replica_index, replica_meta_read, replica_owners, replica_read, replica_since
from .restore import RootRestore, install_image, open_image, restore_root

__all__ = ["restore_tenant", "restore_root_from_replica", "materialize", "live_at", "parse_time", "format_time"]


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


def _image_at(target: ReplicaTarget, captures: list[timeline.Capture], at_ns: int | None,
              key: str) -> tuple[bytearray, timeline.Point] | None:
    """:func:`shardlite.core.timeline.image_at` over captures read lazily: only the bytes of the captures the
    replay needs (from the last snapshot at or before the time on) are fetched; a damaged history is
    reported as what to do next. :class:`~shardlite.ReplicaObjectMissing` when a pack went since its header
    was read."""
    try:
        plan = timeline.plan_replay(captures, at_ns)
        if plan is None:
            return None
        needed = [plan.base, *(step[0] for step in plan.steps)]
        fetched = dict(zip(needed, replica_read.fill(target, [plan.chosen[i] for i in needed]), strict=True))
        chosen = [fetched.get(i, got) for i, got in enumerate(plan.chosen)]
        return timeline.replay(plan._replace(chosen=chosen)), plan.point
    except timeline.TimelineError as exc:
        raise ShardliteError(f"the replica's history of {key!r} cannot be replayed ({exc}); nothing was restored: "
                             "restore an earlier time with --at, or from a backup") from None


def restore_tenant(store: Store, target: ReplicaTarget, key: object, *, as_key: object | None = None,
                   at_ns: int | None = None, force: bool = False, skip_damaged: bool = False) -> dict[str, Any]:
    """Restore tenant ``key`` (as ``as_key`` when given) from ``target`` at its last commit at or before
    ``at_ns`` (None: the latest). Returns what was restored: the key, the commit's time and frame, the
    history it came from, the new generation and incarnation. :class:`~shardlite.UnknownTenant` when the
    replica holds no commit of ``key`` at that time; :class:`~shardlite.ConfigurationError` when the time lies
    before the key's retention window as of the replica's last compaction. A pack it needed that fails its
    checks raises :class:`~shardlite.ReplicaDamaged`; with ``skip_damaged`` it is left out and listed under
    ``damaged`` (object, what is wrong) in what is returned."""
    canon = canonical(key)
    damaged: list[tuple[str, str]] = []
    # the retention horizon is read beside the captures (a time before the window is refused all the same)
    checked = replica_index.readers().submit(replica_index.check_time, target, canon, at_ns,
                                             format_time(at_ns) if at_ns is not None else "")
    found: tuple[bytearray, timeline.Point] | None = None
    for lazy in (True, False):  # a pack deleted between its header's read and its bytes': read again, whole
        try:
            since = None
            if lazy:  # from the last snapshot at or before the time on (a restore needs nothing older)
                since = replica_since.captures_since_snapshot(
                    target, canon, at_ns, lambda got: bool(replica_index.without_expired(checked.result(), [got])))
            found_captures = since[0] if since is not None else replica_read.captures_of(
                target, [canon], lazy=lazy, damaged=damaged if skip_damaged else None)[canon]
        except BaseException:
            checked.result()  # a refused time is the answer before a damaged replica's
            raise
        captures = replica_index.without_expired(checked.result(), found_captures)
        try:
            found = _image_at(target, captures, at_ns, canon)
        except (pack.PackError, ReplicaObjectMissing):
            if not lazy:
                raise
            continue
        break
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
            "incarnation": record.incarnation, "damaged": _listed(damaged)}


def _listed(damaged: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"object": name, "error": reason} for name, reason in sorted(set(damaged))]


def _catalog(global_db: bytes) -> dict[str, tuple[str, int, str, int, str]]:
    """key -> (node, generation, incarnation, schema_version, state) of the snapshot's catalog."""
    conn = open_image(global_db)
    try:
        return {key: (node, gen, inc, version, state) for key, node, gen, inc, version, state in conn.execute(
            "SELECT key, node, generation, incarnation, schema_version, state FROM _shardlite_tenants")}
    except apsw.Error as exc:
        raise ConfigurationError(f"the replica's metadata snapshot is not a shardlite catalog ({exc})") from None
    finally:
        conn.close()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def live_at(row: tuple[str, int, str, int, str] | None, incarnation: str, started_ns: int, snapshot_ns: int,
            drops: list[pack.Drop], at_ns: int) -> bool:
    """Whether a whole-root restore at ``at_ns`` holds a key whose history to replay there is incarnation
    ``incarnation`` (first restorable at ``started_ns``), given the key's row in the metadata snapshot whose
    reading began at ``snapshot_ns`` (``row``: node, generation, incarnation, schema version, state; None: no
    row) and the key's drop records in the replica (``drops``):

    * a drop record of that incarnation at or before the time: dropped then, so absent (a drop after the
      snapshot, which its catalog cannot show);
    * else the snapshot's row of that incarnation decides: live (``active``, ``moving``) or not;
    * no row at all: registered after the snapshot's catalog was read, so present;
    * a row of another incarnation: present when the history started after the snapshot (created again, or
      restored, since), absent when it started before (superseded before the snapshot)."""
    if any(drop.incarnation == incarnation and drop.dropped_ns <= at_ns for drop in drops):
        return False
    if row is None:
        return True
    if row[2] == incarnation:
        return row[4] in ("active", "moving")
    return started_ns > snapshot_ns


def _plan(captures: list[timeline.Capture], at_ns: int, key: str) -> timeline.Replay | None:
    """:func:`shardlite.core.timeline.plan_replay`, a damaged history reported as what to do next."""
    try:
        return timeline.plan_replay(captures, at_ns)
    except timeline.TimelineError as exc:
        raise ShardliteError(f"the replica's history of {key!r} cannot be replayed ({exc}); nothing was restored: "
                             "restore an earlier time with --at, or from a backup") from None


def _replay(plan: timeline.Replay, key: str) -> bytearray:
    try:
        return timeline.replay(plan)
    except timeline.TimelineError as exc:
        raise ShardliteError(f"the replica's history of {key!r} cannot be replayed ({exc}); nothing was restored: "
                             "restore an earlier time with --at, or from a backup") from None


def materialize(target: ReplicaTarget, dest: str, at_ns: int | None = None,
                damaged: list[tuple[str, str]] | None = None,
                left_out: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Write into the empty directory ``dest`` a backup (the layout :mod:`shardlite.services.manifest`
    reads) of the root as the replica holds it at ``at_ns`` (None: the latest): the metadata at its newest
    restore point at or before that time (:func:`~shardlite.services.replica_meta_read.meta_at`), and every tenant
    live at that time (:func:`live_at`: that metadata's catalog, the histories created since, and the drop
    records of plain drops, also those after it) at its last commit at or before it, on the node whose
    replicator captured that commit. Returns the manifest. A pack that fails its checks raises
    :class:`~shardlite.ReplicaDamaged`; with ``damaged`` (a list) it is left out and appended to it. A tenant
    whose history cannot be replayed raises; with ``left_out`` (a list) it is left out and appended to it as
    (key, why)."""
    horizon = replica_index.check_time(target, None, at_ns, format_time(at_ns) if at_ns is not None else "")
    meta = replica_meta_read.meta_at(target, at_ns, format_time)
    global_db, app_global_db = meta.global_db, meta.app_global_db
    catalog = _catalog(global_db)
    limit = at_ns if at_ns is not None else time.time_ns()
    drops: dict[str, list[pack.Drop]] = {}

    def drops_in(info: replica_read.PackInfo) -> None:
        for drop in info.header.drops:
            drops.setdefault(drop.key, []).append(drop)

    everything = replica_read.captures_of(target, None, on_pack=drops_in, damaged=damaged)
    entries: dict[str, Any] = {}
    for key, captures in sorted(everything.items()):
        try:
            plan = _plan(replica_index.without_expired(horizon, captures), limit, key)
        except ShardliteError as exc:
            if left_out is None:
                raise
            left_out.append((key, str(exc)))
            continue
        if plan is None:
            continue
        point = plan.point
        started = next(c.entry.commits[0][1] for c in plan.chosen if c.entry.kind == "snapshot")
        row = catalog.get(key)
        if not live_at(row, point.incarnation, started, meta.read_ns, drops.get(key, []), limit):
            continue
        try:
            image = _replay(plan, key)
        except ShardliteError as exc:
            if left_out is None:
                raise
            left_out.append((key, str(exc)))
            continue
        checksum = xxhash.xxh3_128_hexdigest(bytes(image))
        name = mf.tenant_file(key, checksum)
        os.makedirs(os.path.join(dest, os.path.dirname(name)), mode=0o700, exist_ok=True)
        _write(os.path.join(dest, name), bytes(image))
        # where the history lived at that time (a move since the snapshot: the new node); the restore places
        # it there while that node is active in the snapshot's node list, else where the ring proposes
        node = next((c.node for c in reversed(plan.chosen) if c.node), row[0] if row is not None else "")
        same = row is not None and row[2] == point.incarnation
        version = row[3] if same and row is not None else int.from_bytes(bytes(image[60:64]), "big")
        entries[key] = {"file": name, "node": node, "generation": point.generation,
                        "incarnation": point.incarnation, "schema_version": version, "size": len(image),
                        "checksum": checksum, "signature": [point.generation, 0, 0, 0, 0]}
    parts = {}
    for stem, data in (("global", global_db), ("app_global", app_global_db)):
        checksum = xxhash.xxh3_128_hexdigest(data)
        _write(os.path.join(dest, mf.global_file(checksum, stem)), data)
        parts[stem] = {"file": mf.global_file(checksum, stem), "checksum": checksum}
    manifest = {"format": mf.FORMAT, "created": meta.created_ns / 1e9, "root": meta.root, "tenants": entries,
                "global": parts["global"], "app_global": parts["app_global"], "copied": len(entries), "skipped": 0}
    _write(os.path.join(dest, mf.MANIFEST), json.dumps(manifest, sort_keys=True).encode("utf-8"))
    return manifest


def restore_root_from_replica(target: ReplicaTarget, root: str, *, at_ns: int | None = None,
                              node_paths: Mapping[str, str] | None = None, skip_damaged: bool = False) -> RootRestore:
    """Restore a whole root (nodes, metadata, the app's global tables, every tenant) from the replica into
    ``root``, a new or empty data root, as it was at ``at_ns`` (None: the latest; :func:`materialize`), with
    every check of a restore from a backup (:func:`shardlite.services.restore.restore_root`). A pack that
    fails its checks raises :class:`~shardlite.ReplicaDamaged` before anything is written, and so does a
    tenant whose history cannot be replayed (a ShardliteError naming it); with ``skip_damaged`` such a pack is
    left out and listed in ``damaged`` of what is returned, such a tenant in ``left_out`` (restore it alone at
    an earlier time: ``restore_tenant(..., at_ns=..., skip_damaged=True)``)."""
    damaged: list[tuple[str, str]] = []
    left_out: list[tuple[str, str]] = []
    root = os.path.abspath(root)
    # the new root continues the one that owns this replica: it may take the location over
    # (services/replica_owners.py) if it is given it to replicate to
    _present, owner = replica_owners.owner_of(target)

    def adopt(store: Store) -> None:
        if owner is not None:
            record_adopted(store.meta.kv, frozenset({owner}))

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".shardlite-replica-restore-", dir=parent) as scratch:
        os.chmod(scratch, 0o700)
        materialize(target, scratch, at_ns, damaged if skip_damaged else None, left_out if skip_damaged else None)
        done = restore_root(scratch, root, node_paths=node_paths, finish=adopt)
        done.damaged = _listed(damaged)
        done.left_out = [{"key": key, "error": reason} for key, reason in left_out]
        return done
