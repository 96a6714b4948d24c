"""The replication locks of a node and of a root: ``flock`` on files of their own in ``.replica/``.

- :data:`ERASE_LOCK` (``<node>/.replica/erase.lock``, and the root's own): held by an erase while it removes
  a tenant from the staging and rewrites the replica's packs, and by a node's replicator from reading what is
  staged to recording the pack as shipped, so no pack is built from rows an erase is removing
  (docs/replication.md, "Erase").
- :data:`META_UPLOAD_LOCK` (``<root>/.replica/meta-upload.lock``): held while the metadata's snapshots and
  deltas are read and uploaded, and by an erase, which rewrites them.
"""

from __future__ import annotations

import fcntl
import os
import time

from .engine import ensure_private_dir

__all__ = ["STAGING_DIR", "ERASE_LOCK", "META_UPLOAD_LOCK", "erase_lock"]

#: The folder of a node (and of the root) holding its replication files: staging, notes, locks.
STAGING_DIR = ".replica"
#: The node's erase lock (``<node>/.replica/erase.lock``): an erase holds it while it removes a tenant from the
#: staging and rewrites the replica's packs; the replicator holds it from reading what is staged to recording
#: the pack as shipped, so no pack is built from rows an erase is removing (docs/replication.md, "Erase").
ERASE_LOCK = "erase.lock"
#: The root's lock held while the metadata's snapshots and deltas are read and uploaded, and by an erase, which
#: rewrites them (services/replica_meta.py); a compaction does not take it.
META_UPLOAD_LOCK = "meta-upload.lock"


def erase_lock(node_path: str, *, wait: float | None, name: str = ERASE_LOCK) -> int | None:
    """A descriptor holding ``flock(LOCK_EX)`` on the node's erase lock (or the lock file ``name`` beside it:
    :data:`META_UPLOAD_LOCK`), or None when another process holds it and ``wait`` seconds went by
    (``wait=None``: do not wait). Closing the descriptor releases it. The lock file is a file of its own:
    ``flock`` never touches a tenant's files nor SQLite's POSIX locks."""
    directory = os.path.join(node_path, STAGING_DIR)
    ensure_private_dir(directory)
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    deadline = None if wait is None else time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    os.close(fd)
                    return None
                time.sleep(0.02)
    except BaseException:
        os.close(fd)
        raise
