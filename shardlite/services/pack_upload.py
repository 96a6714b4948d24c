"""The upload half of a node's replicator: what is staged goes to the replica as one pack per round.

:class:`PackUploader` builds one pack (:mod:`shardlite.core.pack`) from the node's oldest staged captures
(at most :data:`PACK_BYTES`) and the drop records that may ship with them, names it
``v1/packs/<node>/<seq>.pack`` (:func:`pack_name`), uploads it, and only then records it as shipped in the
staging, which deletes the staged rows in the same transaction. It holds the node's erase lock
(:func:`~shardlite.files.replica_locks.erase_lock`) from reading what is staged to that record (skipped for
the round while an erase holds it) and first drops staged captures of erased incarnations
(:mod:`shardlite.services.erase`). A target that cannot be reached (:class:`~shardlite.ReplicaUnavailable`)
leaves everything staged for the next round: writes go on, the backlog ships when the target is back.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import xxhash

from ..core import keyindex, pack, rollup
from ..errors import ReplicaObjectMissing, ReplicaUnavailable
from ..files.replica_locks import erase_lock
from ..files.staging import Staged, StagedDrop, Staging
from ..replica.target import ReplicaTarget

if TYPE_CHECKING:
    from .replicator import RoundStats

__all__ = ["PackUploader", "pack_name", "PACK_BYTES", "MAX_SEQ"]

log = logging.getLogger("shardlite.replicate")

#: Staged bytes per pack (a larger backlog ships in several packs, one per round). A pack is built in memory
#: (the staged rows, then the encoded pack: about twice this): 16 MiB keeps a replicator draining a backlog
#: within issue 16's 200 MB, and still drains 32 MiB a second at the 0.5 s interval.
PACK_BYTES = 16 * 1024 * 1024
#: Node names usable as they are in an object name (the replica's names are lowercase: module doc of
#: shardlite.replica.target); any other is hashed.
_SAFE_NODE = re.compile(r"[a-z0-9_][a-z0-9._-]{0,63}")
#: The highest pack sequence number taken from a replica's listing (two packs a second for fifteen million years):
#: a name past it is not a replicator's.
MAX_SEQ = 10**15


def pack_name(node: str, seq: int) -> str:
    """The object name of pack ``seq`` of ``node`` (a node name outside the safe characters is hashed)."""
    safe = _SAFE_NODE.fullmatch(node)
    part = node if safe else "x-" + xxhash.xxh3_64_hexdigest(node.encode("utf-8"))
    return f"v1/packs/{part}/{seq:020d}.pack"


class PackUploader:
    """Uploads the staged captures of node ``node`` (staging ``staging`` in ``node_path``) to ``target``
    (module docstring). One per :class:`~shardlite.services.replicator.NodeReplicator`."""

    def __init__(self, node: str, target: ReplicaTarget, staging: Staging, node_path: str,
                 clock: Callable[[], int]) -> None:
        self.node, self.target, self.staging, self.node_path, self.clock = node, target, staging, node_path, clock
        #: the lowest sequence number this process uploads under (:meth:`_sequence_floor`; None: not read yet)
        self.floor: int | None = None

    def upload(self, stats: RoundStats) -> None:
        """Upload what is staged as one pack (module docstring); ``stats`` receives the upload's figures and
        error."""
        if not self.staging.has_staged():
            return
        lock = erase_lock(self.node_path, wait=None)
        if lock is None:
            stats.upload_error = "an erase holds the node's erase lock; the captures stay staged for the next round"
            stats.upload_blocked = True
            return
        try:
            # A capture in flight when an erase ran may have staged frames of the erased tenant after it:
            # they are dropped here, under the erase lock, never uploaded (docs/replication.md, "Erase").
            self.staging.discard_erased()
            self._upload_staged(stats)
        finally:
            os.close(lock)

    def _sequence_floor(self, staged: list[Staged], drops: list[StagedDrop]) -> int:
        """The lowest sequence number this node's next pack may take: past every numbered pack (and rollup run) in
        the node's folder of the replica that this staging did not write. A root restored from a replica, then
        replicating to it again, starts a new staging at sequence 1: uploading under those names would overwrite
        the first root's packs, its history. The one pack this staging may have uploaded without recording it (a
        crash between the two: it is uploaded again under the same name, with more captures) is told apart by
        its captures: every one of them is still staged here."""
        top = self.staging.next_seq() - 1
        folder = pack_name(self.node, 0).rsplit("/", 1)[0] + "/"
        seqs: dict[int, int] = {}  # numbered pack -> size
        joined = 0  # the highest sequence number a rollup run joined (runs join recorded packs only)
        for name, size in self.target.list(folder):
            numbered = keyindex.pack_seq(name)
            run = rollup.parse(name) if numbered is None else None
            if (numbered[1] if numbered is not None else run.last if run is not None else 0) > MAX_SEQ:
                log.warning("replicate: node %r: %r names a sequence number no replicator reaches; ignored",
                            self.node, name)  # a crafted name must not push the numbering past what SQLite holds
            elif numbered is not None:
                seqs[numbered[1]] = size
            elif run is not None:
                joined = max(joined, run.last)
        foreign = max([seq for seq in seqs if seq > top + 1] + [joined if joined > top else 0])
        if top + 1 in seqs and not self._ours(pack_name(self.node, top + 1), seqs[top + 1], staged, drops):
            foreign = max(foreign, top + 1)
        if foreign:
            log.warning("replicate: node %r: the replica holds packs up to %d this node's staging did not write "
                        "(a root restored from this replica?); its packs continue at %d", self.node, foreign,
                        foreign + 1)
        return max(top + 1, foreign + 1)

    def _ours(self, name: str, size: int, staged: list[Staged], drops: list[StagedDrop]) -> bool:
        """Whether pack ``name`` holds only captures and drop records staged here (module doc: an upload this
        staging did not record)."""
        from .replica_read import read_header  # replica_read imports this module (through replica_index)

        try:
            header = read_header(self.target, name, size).header
        except (pack.PackError, ReplicaObjectMissing):
            return False
        mine = {(s.key, s.incarnation, s.generation, s.first, s.last) for s in staged}
        mine_drops = {(d.key, d.incarnation, d.generation) for d in drops}
        return bool(header.entries or header.drops) and all(
            (e.key, e.incarnation, e.generation, e.first, e.last) in mine for e in header.entries) and all(
            (d.key, d.incarnation, d.generation) in mine_drops for d in header.drops)

    def _put(self, name: str, blob: bytes, staged: list[Staged], drops: list[StagedDrop]) -> bool:
        """Upload ``blob`` as ``name`` unless that name holds another writer's pack: False then, nothing
        written. A pack is never overwritten but by its own staging's upload again (an upload not recorded
        before a crash, :meth:`_ours`), so two writers numbering packs in one folder (two roots replicating
        to one location under the same node name) can lose neither's history, whatever their timing."""
        if self.target.put_if_absent(name, blob):
            return True
        sizes = [size for listed, size in self.target.list(name) if listed == name]
        if not sizes or not self._ours(name, sizes[0], staged, drops):
            return False
        self.target.put(name, blob)
        return True

    def _upload_staged(self, stats: RoundStats) -> None:
        t = time.perf_counter()
        staged = self.staging.staged(PACK_BYTES)
        # drop records of plain drops (files/staging.py, "Drops") go in the same pack as their key's last captures
        drops = self.staging.staged_drops(staged)
        t = stats.timed("upload.read", t)
        if not staged and not drops:
            return
        if self.floor is None:
            try:
                self.floor = self._sequence_floor(staged, drops)
            except ReplicaUnavailable as exc:
                stats.upload_error = str(exc)
                log.warning("replicate: node %r: the replica could not be listed (%s); %d captures stay staged",
                            self.node, exc, len(staged))
                return
        seq, created = max(self.staging.next_seq(), self.floor), self.clock()
        items = [(pack.Entry(s.key, s.incarnation, s.generation, "snapshot" if s.kind == "snapshot" else "frames",
                             s.page_size, s.salt, s.first, s.last, s.commits, s.captured_ns, 0, 0), s.data)
                 for s in staged]
        blob = pack.encode(self.node, seq, created, items,
                           [pack.Drop(d.key, d.incarnation, d.generation, d.dropped_ns) for d in drops])
        name = pack_name(self.node, seq)
        t = stats.timed("upload.encode", t)
        try:
            stored = self._put(name, blob, staged, drops)
        except ReplicaUnavailable as exc:
            stats.upload_error = str(exc)
            log.warning("replicate: node %r: upload of %s failed (%s); %d captures stay staged", self.node,
                        name, exc, len(staged))
            return
        if not stored:
            self.floor = None  # the next round lists the folder again and continues past it
            stats.upload_error = (f"{name} in the replica was uploaded by another writer (or deleted as this "
                                  "upload was refused): is another root replicating to this location with the "
                                  "same node name? Its packs are left as they are; this node's captures stay "
                                  "staged and ship under the next free number")
            log.error("replicate: node %r: %s", self.node, stats.upload_error)
            return
        t = stats.timed("upload.put", t)
        self.staging.shipped(seq, name, created, self.clock(), len(blob), [s.id for s in staged],
                             [d.id for d in drops])
        stats.timed("upload.shipped", t)
        stats.uploaded_packs += 1
        stats.uploaded_bytes += len(blob)
