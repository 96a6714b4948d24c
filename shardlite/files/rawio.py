"""Plain reads of files that SQLite does not open for us (a tenant's ``-wal`` and ``-shm``, notes files)."""

from __future__ import annotations

import os

__all__ = ["pread_all"]


def pread_all(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes of ``fd`` from ``offset``: fewer only when the file ends first (``os.pread`` may
    return less than asked at any point; this reads on until it has all or meets the end)."""
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)
