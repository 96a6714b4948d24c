"""A node's staging file is written by several processes (the replicator, an erase, a compaction): every
write transaction of :class:`~shardlite.files.staging.Staging` begins as one, so one that reads before it
writes waits its turn instead of failing at its first write whenever another process committed since its
read began (SQLITE_BUSY_SNAPSHOT: no busy handler runs for it). This was a flaky failure of an erase beside
a running replicator (`Busy: node 'n1''s staging stayed locked by its replicator`)."""

from __future__ import annotations

import os
from pathlib import Path

from helpers_procs import spawn, write_script

from shardlite.files.staging import Staging

WRITER = """
import sys
from shardlite.files.staging import Staging
staging = Staging(sys.argv[1])
print("ready", flush=True)
n = 0
while True:  # a replicator's short commits, back to back, until killed
    n += 1
    staging.set_notes_offsets({"w.notes": n}, [])
"""


def test_an_erase_beside_a_process_that_keeps_committing_never_fails_busy(tmp_path: Path) -> None:
    node = os.fspath(tmp_path / "n1")
    os.makedirs(node, mode=0o700)
    Staging(node).close()
    writer = spawn(write_script(tmp_path, "writer.py", WRITER), node)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        staging = Staging(node)
        try:
            for n in range(300):  # each reads the key's rows, then writes: the window the race needs
                erased = staging.erase(f"user:{n}", [f"inc{n}"], n)
                assert erased.captures == 0 and not erased.cursor
                assert staging.forget_packs([]) == 0
            assert {f"inc{n}" for n in range(300)} <= staging.erased()
            assert staging.notes_offsets()["w.notes"] > 0  # the writer did commit meanwhile
        finally:
            staging.close()
    finally:
        writer.kill()
        writer.wait()
        for stream in (writer.stdout, writer.stderr):
            assert stream is not None
            stream.close()
