"""``meta copy`` (``shardlite.meta.copy``): a root's embedded metadata moves to PostgreSQL whole and
verified, counters carried over, global.db fenced, the record written; refusals change nothing; a re-run
after a kill -9 at any point ends with one authoritative store holding everything."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import psycopg
import pytest
from helpers_routers import run_cli

from shardlite import ConfigurationError, Router, Settings
from shardlite.core.outbox import Event
from shardlite.meta.choose import locate_store
from shardlite.meta.copy import POINTS, TABLES, copy_to_postgres
from shardlite.meta.location import parse_location
from shardlite.meta.record import read_record


def _fill(root: str, tenants: int = 30, accounts: int = 10) -> None:
    with Router(root, nodes=["n1", "n2"]) as router:
        for i in range(tenants):
            with router.transaction(f"u:{i}é") as tx:
                tx.execute("CREATE TABLE IF NOT EXISTS t(x)")
                tx.execute("INSERT INTO t VALUES (?)", (i,))
                if i % 3 == 0:
                    tx.emit(f"u:{(i + 1) % tenants}é", "hello", {"i": i})
        router.drop(f"u:{tenants - 1}é")
        for i in range(accounts):
            aid = router.accounts.register(f"user{i}@example.com", password="pw-123456", name=f"Ünï {i}")
            router.sessions.create(aid)
        router.accounts.delete(aid)  # the highest id is burnt: never handed out again


@contextmanager
def _db(path: str) -> Iterator[apsw.Connection]:
    """A connection to a live shardlite file through APSW, the SQLite library shardlite uses: a second copy
    of SQLite in one process (Python's sqlite3) would release the other's POSIX locks when it closes a file
    (https://www.sqlite.org/howtocorrupt.html, 2.2.1)."""
    conn = apsw.Connection(path)
    try:
        yield conn
    finally:
        conn.close()


def _sqlite_rows(root: str) -> dict[str, list[tuple[object, ...]]]:
    with _db(os.path.join(root, "global.db")) as db:
        mine = " WHERE name NOT IN ('meta_copy_root_id', 'moved_to')"  # meta copy's own marks stay behind
        return {t.pg: db.execute(f"SELECT count(*) FROM {t.sqlite}{mine if t.pg == 'kv' else ''}").fetchall()
                for t in TABLES}


def test_copy_moves_everything_verified_and_fences_global_db(pg_dsn: str, root: str) -> None:
    _fill(root)
    before = _sqlite_rows(root)
    report = copy_to_postgres(root, pg_dsn)
    assert not report.resumed
    assert report.rows["tenants"] == before["tenants"][0][0] == 30
    assert report.rows == {name: rows[0][0] for name, rows in before.items()}  # our own marks stay behind
    record = read_record(root)
    assert record is not None and record.root_id == report.root_id
    with psycopg.connect(pg_dsn) as conn:
        burnt = conn.execute("SELECT max(id) FROM shardlite.accounts").fetchone()
        nxt = conn.execute("INSERT INTO shardlite.accounts(email, email_key, created, updated) "
                           "VALUES ('x', 'x', 0, 0) RETURNING id").fetchone()
        assert burnt and nxt and nxt[0] == burnt[0] + 2  # the deleted account's id is not reused
        gens = conn.execute("SELECT max(generation) FROM shardlite.generations").fetchone()
        assert gens and gens[0] >= 30
    with _db(os.path.join(root, "global.db")) as db, pytest.raises(apsw.ConstraintError, match="moved to PostgreSQL"):
        db.execute("DELETE FROM _shardlite_sessions")
    again = copy_to_postgres(root, pg_dsn)  # idempotent once done
    assert again.resumed and again.root_id == report.root_id


def test_refusals_change_nothing(pg_dsn: str, root: str, tmp_path: Path) -> None:
    _fill(root, tenants=3, accounts=1)
    with pytest.raises(ConfigurationError, match="postgresql://"):
        copy_to_postgres(root, "sqlite")
    other = os.fspath(tmp_path / "other")
    _fill(other, tenants=2, accounts=1)
    copy_to_postgres(other, pg_dsn)
    with pytest.raises(ConfigurationError, match="another root"):
        copy_to_postgres(root, pg_dsn)
    assert read_record(root) is None
    with _db(os.path.join(root, "global.db")) as db:  # not fenced
        db.execute("DELETE FROM _shardlite_sessions")
    with pytest.raises(ConfigurationError, match="not a shardlite root"):
        copy_to_postgres(os.fspath(tmp_path / "nothing"), pg_dsn)


def test_a_rebalance_in_flight_is_refused(pg_dsn: str, root: str) -> None:
    _fill(root, tenants=2, accounts=2)
    with _db(os.path.join(root, "global.db")) as db:  # a rebalancer died mid-move
        db.execute("INSERT INTO _shardlite_rebalance(id, created, state, fingerprint, summary) "
                   "VALUES (7, 0, 'applying', '', '{}')")
        db.execute("INSERT INTO _shardlite_moves(plan_id, key, source, target, source_generation, size, step, "
                   "updated) VALUES (7, 'u:0é', 'n1', 'n2', 1, 0, 'copying', 0)")
    with pytest.raises(ConfigurationError, match="plan 7 is applying.*rebalance resume"):
        copy_to_postgres(root, pg_dsn)
    assert read_record(root) is None


def test_nul_in_a_row_is_refused_by_name(pg_dsn: str, root: str) -> None:
    _fill(root, tenants=1, accounts=2)
    with _db(os.path.join(root, "global.db")) as db:
        db.execute("UPDATE _shardlite_accounts SET name_key = 'a' || char(0) || 'b'")
    with pytest.raises(ConfigurationError, match="NUL character in name_key"):
        copy_to_postgres(root, pg_dsn)
    assert read_record(root) is None


_RUN = """
import os, signal, sys
from shardlite.meta.copy import copy_to_postgres
step = sys.argv[3] if len(sys.argv) > 3 else None
copy_to_postgres(sys.argv[1], sys.argv[2],
                 fault=lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None)
"""


def _state(root: str) -> tuple[bool, bool]:
    """(the record names PostgreSQL, global.db is fenced)"""
    with _db(os.path.join(root, "global.db")) as db:
        fenced = db.execute("SELECT count(*) FROM sqlite_schema WHERE name LIKE '_shardlite_moved_%'").fetchone()
    return read_record(root) is not None, bool(fenced[0])


@pytest.mark.parametrize("step", POINTS)
def test_killed_at_each_point_then_rerun_ends_with_one_store(pg_dsn: str, root: str, step: str) -> None:
    _fill(root, tenants=20, accounts=5)
    expected = _sqlite_rows(root)
    done = subprocess.run([sys.executable, "-c", _RUN, root, pg_dsn, step], capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    recorded, fenced = _state(root)
    assert not recorded  # every point comes before the record
    assert fenced == (step == "fenced")
    if not fenced:  # the old store is still the authority, and writable
        with Router(root) as router:
            router.accounts.register("late@example.com")
        expected = _sqlite_rows(root)
    copy_to_postgres(root, pg_dsn)
    assert _state(root) == (True, True)
    with psycopg.connect(pg_dsn) as conn:
        for table in TABLES:
            count = conn.execute(f"SELECT count(*) FROM shardlite.{table.pg}").fetchone()
            assert count and count[0] == expected[table.pg][0][0], table.pg
        assert conn.execute("SELECT count(*) FROM shardlite.roots").fetchone() == (1,)


def test_cli_meta_copy_and_show(pg_dsn: str, root: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    _fill(root, tenants=3, accounts=2)
    code, out, err = run_cli(capsys, "meta", "copy", "--root", root)
    assert code == 2 and "no target" in err and "SHARDLITE_META" in err
    monkeypatch.setenv("SHARDLITE_META", pg_dsn)
    password = str(psycopg.conninfo.conninfo_to_dict(pg_dsn)["password"])
    code, out, err = run_cli(capsys, "--json", "meta", "copy", "--root", root)
    assert code == 0, err
    (report,) = [json.loads(line) for line in out.splitlines()]
    assert report["rows"]["tenants"] == 3 and not report["resumed"] and password not in out
    code, out, err = run_cli(capsys, "meta", "show", "--root", root, "--json")
    (shown,) = [json.loads(line) for line in out.splitlines()]
    assert shown["backend"] == "postgresql" and shown["location"] == report["location"] and password not in out
    code, out, err = run_cli(capsys, "meta", "copy", "--root", root)
    assert code == 0 and "already" in out


def test_a_postgresql_root_exports_global_db_as_it_was(pg_dsn: str, root: str, tmp_path: Path) -> None:
    """What a backup of a PostgreSQL root copies: a global.db file with the same rows and counters as the
    embedded store the metadata came from."""
    _fill(root, tenants=12, accounts=4)
    mine = "WHERE name NOT IN ('meta_copy_root_id', 'moved_to')"

    def dump(path: str) -> dict[str, list[tuple[object, ...]]]:
        with _db(path) as db:
            found = {t.pg: db.execute(f"SELECT {', '.join(t.columns)} FROM {t.sqlite} "
                                      f"{mine if t.pg == 'kv' else ''} ORDER BY {', '.join(t.key)}").fetchall()
                     for t in TABLES}
            found["sqlite_sequence"] = db.execute("SELECT name, seq FROM sqlite_sequence ORDER BY name").fetchall()
            return found

    before = dump(os.path.join(root, "global.db"))
    copy_to_postgres(root, pg_dsn)
    store = locate_store(root, Settings(), pg_dsn)
    store.open(create=False)
    try:
        with store.export_global(os.fspath(tmp_path)) as path:
            assert dump(path) == before
            assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".meta-export")]
    finally:
        store.close()


def test_cli_init_meta_refuses_an_incomplete_backend_or_records_it(pg_dsn: str, root: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """`shardlite init --meta URL`: a new root on PostgreSQL (recorded without the password), or, while the
    backend lacks parts, one line naming them and no root bound to it."""
    password = str(psycopg.conninfo.conninfo_to_dict(pg_dsn)["password"])
    code, out, err = run_cli(capsys, "init", "--root", root, "--meta", pg_dsn, "--json")
    assert password not in out + err
    if code == 0:
        (made,) = [json.loads(line) for line in out.splitlines()]
        assert made["created"] and made["meta"].startswith("postgresql://")
        record = read_record(root)
        assert record is not None and record.location.same_store(parse_location(pg_dsn))
    else:
        assert "does not implement meta." in err and read_record(root) is None


def test_parked_flags_stay_parked_and_their_markers_valid_after_the_copy(pg_dsn: str, root: str) -> None:
    """A drained source's flag is parked with its version recorded in the file: the copy keeps the flag's
    version and parked state, so the marker still names it and the next emit on PostgreSQL writes no flag."""
    applied: list[int] = []

    def record(tx: object, event: Event) -> None:
        applied.append(event.payload["n"])

    with Router(root) as router:
        router.handler("t")(record)
        with router.transaction("src:1") as tx:
            tx.emit("dst:1", "t", {"n": 0})
        router.relay.drain(timeout=30)
        before = router._store.meta.pending.row("src:1")
        assert before is not None and before.parked is not None
    copy_to_postgres(root, pg_dsn)
    with Router(root, meta=pg_dsn) as router:
        assert router._store.meta.location.startswith("postgresql://")
        assert router._store.meta.pending.row("src:1") == before
        router.handler("t")(record)
        flags: list[list[str]] = []
        real = router._store.emitter._flag_many
        router._store.emitter._flag_many = lambda keys: (flags.append(list(keys)), real(keys))[1]
        with router.transaction("src:1") as tx:
            tx.emit("dst:1", "t", {"n": 1})
        assert flags == [], "the copied parked flag stands in for the flag write"
        router.relay.drain(timeout=30)
    assert applied == [0, 1]
