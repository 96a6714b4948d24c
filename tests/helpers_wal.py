"""Helpers for the WAL capture and replication tests: a connection that never checkpoints by itself, and
the rows of a database image."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import apsw


def open_wal(path: str, page_size: int | None = None) -> apsw.Connection:
    """A WAL-mode connection with no autocheckpoint and no checkpoint on close (only the test checkpoints)."""
    conn = apsw.Connection(path)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    if page_size is not None:
        conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.set_busy_timeout(5000)
    return conn


def rows_of(image: bytes | bytearray, sql: str = "SELECT id, v FROM t ORDER BY id") -> list[tuple[object, ...]]:
    """``sql``'s rows on a database image, after checking it passes integrity_check. A WAL-mode image is
    opened in memory as a rollback-journal one (header bytes 18-19), its content unchanged."""
    data = bytearray(image)
    data[18:20] = b"\x01\x01"
    conn = apsw.Connection(":memory:")
    try:
        conn.deserialize("main", bytes(data))
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return list(conn.execute(sql))
    finally:
        conn.close()


def beside_writer(code: str, args: list[str], step: Callable[[int], None]) -> int:
    """Start ``python -c code *args`` (a writer that prints ``done`` when it has made its commits) and call
    ``step(round)`` until it exits; checks it said ``done``, and kills it if a step raised. How many rounds."""
    writer = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    rounds = 0
    try:
        while writer.poll() is None:
            step(rounds)
            rounds += 1
        assert writer.stdout is not None and writer.stdout.read().strip() == "done"
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.wait()
        assert writer.stdout is not None
        writer.stdout.close()
    return rounds
