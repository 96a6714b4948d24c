"""An import (or restore) that keeps outbox events flags the tenant as having pending work *before* the
catalog routes to the new file, as ``tx.emit`` flags before its commit: a kill -9 right after the catalog's
commit strands no event (brief rules 9 and 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from shardlite import Router
from shardlite.core.outbox import Event

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"]

# Kills the process as soon as a global-DB transaction that wrote the tenant catalog has committed (the WAL
# hook runs after each commit): the moment the imported file becomes reachable.
# Embedded metadata only: the kill point is global.db's own WAL hook; PostgreSQL has no such hook in the
# client, and the order it relies on (pending flag before the catalog flip) is restore.py's, not the backend's.
_IMPORT = """
import os, signal
from shardlite import Router

router = Router({root!r}, schema={schema!r})
writer = router._store.meta.globaldb.writer
wrote_catalog = []

def trace(cursor, sql, bindings):
    if "INSERT INTO _shardlite_tenants" in sql or "UPDATE _shardlite_tenants" in sql:
        wrote_catalog.append(sql)
    return True

def committed(conn, name, pages):
    if wrote_catalog:
        os.kill(os.getpid(), signal.SIGKILL)
    return 0

writer.exec_trace = trace
writer.set_wal_hook(committed)
router.import_({path!r}, "src:1", keep_events=True)
print("not killed", flush=True)
"""


def test_an_import_killed_right_after_the_catalog_commit_strands_no_event(root: str, tmp_path: Path) -> None:
    applied: list[int] = []

    def apply(tx: Any, event: Event) -> None:
        tx.execute("INSERT INTO applied(n) VALUES (?)", (event.payload["n"],))
        applied.append(event.payload["n"])

    exported = os.fspath(tmp_path / "src1.db")
    with Router(root, schema=SCHEMA) as router:
        with router.transaction("src:1") as tx:
            tx.emit("dst:1", "t", {"n": 1})  # no handler yet: it stays in the outbox
        router.export("src:1", exported)
        router.drop("src:1")
        router.relay.drain(timeout=30)  # the dropped source's flag is forgotten
        assert router._store.meta.pending.all() == []

    script = tmp_path / "import.py"
    script.write_text(textwrap.dedent(_IMPORT.format(root=root, schema=SCHEMA, path=exported)))
    killed = subprocess.run([sys.executable, os.fspath(script)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)

    with Router(root, schema=SCHEMA) as router:
        assert router.locate("src:1").state == "active"  # the import's catalog write committed
        router.handler("t")(apply)
        router.relay.drain(timeout=30)
        assert applied == [1], "the imported event was stranded (no pending-work flag)"
        assert router.query("dst:1", "SELECT n FROM applied") == [(1,)]
        assert [r for r in router._store.meta.pending.all() if r.parked is None] == []  # drained: parked
