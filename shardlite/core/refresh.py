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

A tenant that writes little but often never reaches that bound, and its restore would read the header of one
rollup part per hour it was active since its last snapshot (168 over a week). So a snapshot also becomes due
once the last one is :data:`REFRESH_AGE_NS` old (a day) and the frames since reach ``1 / AGE_DIVISOR`` of it
(:func:`aged_snapshot_due`): at most one image a day per tenant that writes, restores read at most about a
day of parts, and a large tenant that writes a little a day is not copied whole each day for it. That one is
taken right after a capture that reached the log's end (:func:`shardlite.files.walcapture.snapshot_at_cursor`:
the write lock held only to check that and begin a read transaction).

A ratio refresh is taken only right after a checkpoint that copied the whole log (a closed log generation,
:func:`shardlite.files.walcapture.checkpoint_briefly_locked`): the database file then is exactly the image
at the cursor, and it is read under a read transaction begun while the write lock was still held, so
writers wait for none of it. It is an extra capture at a position the history already reached: replaying
from it gives the same image as replaying the frames before it, so every restore point stays what it was.

Pure: no I/O.
"""

from __future__ import annotations

__all__ = ["REFRESH_RATIO", "REFRESH_FLOOR", "REFRESH_AGE_NS", "AGE_DIVISOR", "snapshot_due", "aged_snapshot_due"]

#: Frames staged since the last snapshot, as a multiple of that snapshot's size, after which a new one is due.
REFRESH_RATIO = 4
#: Frames staged since the last snapshot (bytes) below which none is due, however small the database.
REFRESH_FLOOR = 4 * 1024 * 1024


def snapshot_due(frame_bytes: int, image_bytes: int, *, ratio: int = REFRESH_RATIO,
                 floor: int = REFRESH_FLOOR) -> bool:
    """Whether a tenant file whose last snapshot held ``image_bytes`` (0: unknown) and which has staged
    ``frame_bytes`` of frames since should get a new snapshot at its next closed log generation."""
    return frame_bytes >= max(ratio * image_bytes, floor)


#: How old a tenant file's last snapshot may get (ns) before a new one is due for its next capture, whatever the
#: frames since weigh against the ratio bound (:func:`aged_snapshot_due`).
REFRESH_AGE_NS = 24 * 3600 * 1_000_000_000
#: ... provided the frames staged since reach this fraction (1/n) of the last snapshot's size.
AGE_DIVISOR = 4


def aged_snapshot_due(now_ns: int, snapshot_ns: int, frame_bytes: int, image_bytes: int, *,
                      age_ns: int = REFRESH_AGE_NS, divisor: int = AGE_DIVISOR) -> bool:
    """Whether a tenant file whose last snapshot (``image_bytes``, 0: unknown) was staged at ``snapshot_ns``
    (0: unknown, none due) and which has staged ``frame_bytes`` of frames since should get a new snapshot
    now (module docstring)."""
    return (frame_bytes > 0 and snapshot_ns > 0 and now_ns - snapshot_ns >= age_ns
            and frame_bytes * divisor >= image_bytes)
