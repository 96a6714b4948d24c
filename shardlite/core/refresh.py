"""When the replicator takes a new snapshot of a tenant whose history runs on in frames.

A restore replays a tenant file's captures from its last snapshot at or before the time asked for
(:func:`shardlite.core.timeline.plan_replay`). Without a newer snapshot, a busy tenant's restore would
read and replay every frame written since its history began (or since the base snapshot a compaction
keeps at the retention start): a 2 MB tenant rewriting one page a second writes ~2.4 GB of frames a week.
So the replicator *refreshes* a tenant's snapshot when the frames staged since its last one reach
:data:`REFRESH_RATIO` times that snapshot's size, and at least :data:`REFRESH_FLOOR` bytes: a restore
at the latest commit then reads at most about ``(REFRESH_RATIO + 1) x`` the database's size plus the
frames of the log's open generation, and the snapshots add at most ``1 / REFRESH_RATIO`` to the bytes
uploaded (the floor keeps small tenants from a snapshot every few commits).

A refresh is taken only right after a checkpoint that copied the whole log (a closed log generation,
:func:`shardlite.files.walcapture.checkpoint_briefly_locked`): the database file then is exactly the image
at the cursor, and it is read under a read transaction begun while the write lock was still held, so
writers wait for none of it. It is an extra capture at a position the history already reached: replaying
from it gives the same image as replaying the frames before it, so every restore point stays what it was.

Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["REFRESH_RATIO", "REFRESH_FLOOR", "snapshot_due"]

#: Frames staged since the last snapshot, as a multiple of that snapshot's size, after which a new one is due.
REFRESH_RATIO = 4
#: Frames staged since the last snapshot (bytes) below which none is due, however small the database.
REFRESH_FLOOR = 4 * 1024 * 1024


def snapshot_due(frame_bytes: int, image_bytes: int, *, ratio: int = REFRESH_RATIO,
                 floor: int = REFRESH_FLOOR) -> bool:
    """Whether a tenant file whose last snapshot held ``image_bytes`` (0: unknown) and which has staged
    ``frame_bytes`` of frames since should get a new snapshot at its next closed log generation."""
    return frame_bytes >= max(ratio * image_bytes, floor)
