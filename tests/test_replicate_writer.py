"""The writer side of replication (docs/replication.md): ``replicate=`` recorded in the root's metadata
(first writer wins, over both metadata backends), writers of a replicated root never checkpoint a tenant,
and every commit leaves one change note in the committing process's notes file of the tenant's node.

Nothing here opens a tenant's ``-shm`` or database file in this process (which holds SQLite connections
to them: closing any descriptor of them would drop SQLite's POSIX locks): a separate process reads the
wal-index (``mxFrame``, ``nBackfill``) and hashes the database file (:func:`probe`).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_cli import run_script
from helpers_procs import LineReader, close_pipes, kill9, spawn, write_script

from shardlite import AsyncRouter, ConfigurationError, Router
from shardlite.core import notes
from shardlite.files import notesfile
from shardlite.files.checkpoints import INLINE_FRAMES
from shardlite.files.noteswriter import notes_dir
from shardlite.meta.replica_record import REPLICATE_NAME

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)"]
K = "room:replicated"
BLOB = b"x" * 5000  # a row with overflow pages: at least two frames per commit

_PROBE = r"""
import hashlib, os, struct, sys
path = sys.argv[1]
with open(path + "-shm", "rb") as f:
    shm = f.read(136)
mx_frame = struct.unpack_from("=I", shm, 16)[0]      # the wal-index header's mxFrame
backfill = struct.unpack_from("=I", shm, 96)[0]      # the checkpoint info's nBackfill
with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
print(mx_frame, backfill, os.path.getsize(path + "-wal"), digest)
"""


def probe(path: str) -> tuple[int, int, int, str]:
    """(mxFrame, nBackfill, -wal bytes, sha256 of the database file), read by a separate process."""
    out = subprocess.run([sys.executable, "-c", _PROBE, path], capture_output=True, text=True, check=True).stdout
    mx, backfill, wal, digest = out.split()
    return int(mx), int(backfill), int(wal), digest


def replica_url(tmp_path: Path, name: str = "replica") -> str:
    return "file://" + os.fspath(tmp_path / name)


def all_notes(node_path: str) -> list[notes.Note]:
    found: list[notes.Note] = []
    for name in notesfile.list_notes(node_path):
        read = notesfile.read_notes(node_path, name)
        assert not read.bad
        found += read.notes
    return found


# -- recording the location -------------------------------------------------------------------------------------

def test_the_location_is_recorded_and_found_by_later_routers(any_meta: str, root: str, tmp_path: Path) -> None:
    url = "s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9"
    with Router(root, replicate=url) as router:
        assert router._store.replicate == "s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9"
        assert router.status()["replicate"] == router._store.replicate
        assert router._store.meta.kv.get(REPLICATE_NAME) == router._store.replicate
    with Router(root) as later:
        assert later._store.replicate == "s3://my-bucket/some/prefix?endpoint=http://127.0.0.1:9"
        assert later._store.notes is not None and later._store.checkpoints is None
    with Router(root, replicate="s3://my-bucket/some/prefix/?endpoint=http://127.0.0.1:9") as same:  # same, spelt
        assert same._store.replicate == url


def test_a_disagreeing_location_is_refused_naming_both_and_no_secret(any_meta: str, root: str,
                                                                     tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Router(root, replicate="s3://AKIAEXAMPLE:t0p-s3cret@my-bucket/p")
    assert "t0p-s3cret" not in str(refused.value) and "AKIAEXAMPLE" not in str(refused.value)
    with Router(root) as plain:
        assert plain._store.meta.kv.get(REPLICATE_NAME) is None  # nothing recorded by the refused one
    first = replica_url(tmp_path, "first")
    Router(root, replicate=first).close()
    with pytest.raises(ConfigurationError) as refused:
        Router(root, replicate=replica_url(tmp_path, "second"))
    assert first in str(refused.value) and replica_url(tmp_path, "second") in str(refused.value)
    with pytest.raises(ConfigurationError) as refused:
        AsyncRouter(root, replicate="s3://AKIAEXAMPLE:t0p-s3cret@my-bucket/p")
    assert "t0p-s3cret" not in str(refused.value)


_RACER = """
import sys
from shardlite import ConfigurationError, Router
try:
    with Router(sys.argv[1], replicate=sys.argv[2]) as router:
        print("ok", router._store.replicate)
except ConfigurationError:
    print("refused")
"""


def test_the_first_router_wins_across_processes(any_meta: str, root: str, tmp_path: Path) -> None:
    Router(root).close()  # the root exists; the race is on the location
    urls = [replica_url(tmp_path, f"r{i}") for i in range(5)]
    script = write_script(tmp_path, "racer.py", _RACER)
    procs = [spawn(script, root, url) for url in urls]
    answers = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    winners = {a[1] for a in answers if a[0] == "ok"}
    assert len(winners) == 1 and winners <= set(urls)
    (winner,) = winners
    assert sum(a == ["ok", winner] for a in answers) == 1 and answers.count(["refused"]) == len(urls) - 1
    with Router(root) as later:
        assert later._store.replicate == winner


def test_cli_init_replicate_and_status(any_meta: str, tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "R")
    url = "s3://my-bucket/pre?endpoint=http://127.0.0.1:9"
    done = run_script("--root", root, "init", "--replicate", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"; replicated to {url}")
    done = run_script("--root", root, "--json", "status")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["replicate"] == url
    done = run_script("--root", root, "status", env={"COLUMNS": "200"})
    assert f"replica: {url}" in done.stdout
    done = run_script("--root", root, "init", "--replicate", "s3://other-bucket/pre")
    assert done.returncode != 0 and url in done.stderr and "s3://other-bucket/pre" in done.stderr
    done = run_script("--root", root, "init", "--replicate", "s3://KEY:pass-word-9@my-bucket/pre")
    assert done.returncode != 0 and "pass-word-9" not in done.stderr + done.stdout
    plain = os.fspath(tmp_path / "P")
    embedded = {"SHARDLITE_META": ""}  # a database holds one root: the plain one keeps its metadata in global.db
    assert run_script("--root", plain, "init", env=embedded).returncode == 0
    assert json.loads(run_script("--root", plain, "--json", "status", env=embedded).stdout)["replicate"] is None


# -- a plain root is unchanged --------------------------------------------------------------------------------

def test_a_plain_root_notes_nothing_and_checkpoints_as_before(any_meta: str, root: str) -> None:
    with Router(root, schema=SCHEMA) as router:
        for _ in range(2200):
            with router.transaction(K) as tx:
                tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
        assert router._store.replicate is None and router._store.notes is None
        assert router._store.meta.kv.get(REPLICATE_NAME) is None
        path = router.locate(K).path
        assert path is not None
        mx_frame, _backfill, _wal, _digest = probe(path)
        assert mx_frame < INLINE_FRAMES  # SQLite's autocheckpoint restarted the log
        node = router._store.node_path("n1")
    assert not os.path.exists(os.path.join(node, ".replica"))
    out = subprocess.run([sys.executable, "-c", "import sys, shardlite; r = shardlite.Router(sys.argv[1]); "
                          "r.close(); print('boto3' in sys.modules)", root], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


# -- writers of a replicated root never checkpoint ---------------------------------------------------------------

def test_sync_writers_of_a_replicated_root_never_checkpoint(root: str, tmp_path: Path) -> None:
    with Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as router:
        with router.transaction(K) as tx:
            tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
        path = router.locate(K).path
        assert path is not None
        _mx, _backfill, wal_before, digest = probe(path)
        for _ in range(2200):
            with router.transaction(K) as tx:
                tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
        assert router.query(K, "SELECT count(*) FROM t") == [(2201,)]
        mx_frame, backfill, wal_after, digest_after = probe(path)
    assert mx_frame > INLINE_FRAMES  # past where the Checkpointer checkpoints inline and autocheckpoint far earlier
    assert backfill == 0  # no frame of this log was ever copied into the database
    assert wal_after > wal_before and digest_after == digest  # the log grew, the database file is untouched
    assert probe(path)[:2] == (mx_frame, backfill)  # closing the router checkpointed nothing either


def test_async_writers_of_a_replicated_root_never_checkpoint(root: str, tmp_path: Path) -> None:
    async def main() -> tuple[str, int, int]:
        async with AsyncRouter(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as ar:
            assert ar._store.checkpoints is None  # no worker rounds, no inline checkpoints
            for _ in range(1100):  # sequential: one commit each
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))

            async def one() -> None:
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
            for _ in range(10):  # group-committed batches
                await asyncio.gather(*(one() for _ in range(64)))
            path = (await ar.locate(K)).path
            assert path is not None
            mx_frame, backfill, _wal, _digest = probe(path)
            return path, mx_frame, backfill

    path, mx_frame, backfill = asyncio.run(main())
    assert mx_frame > INLINE_FRAMES and backfill == 0
    assert probe(path)[:2] == (mx_frame, 0)  # closing the router checkpointed nothing either


def test_async_writers_of_a_plain_root_still_checkpoint(root: str) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            assert ar._store.checkpoints is not None
            for _ in range(2200):
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
            path = (await ar.locate(K)).path
            assert path is not None
            mx_frame, backfill, _wal, _digest = probe(path)
            return mx_frame, backfill + ar._store.checkpoints.worker_runs + ar._store.checkpoints.restart_runs

    mx_frame, copied_or_runs = asyncio.run(main())
    assert mx_frame < INLINE_FRAMES + 100 and copied_or_runs > 0


# -- change notes -------------------------------------------------------------------------------------------------

def test_each_commit_leaves_one_note(root: str, tmp_path: Path) -> None:
    with Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as router:
        spans = []
        for i in range(50):
            key = K if i % 2 else "user:other"
            before = time.time_ns()
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(body) VALUES (?)", (b"x" * (i * 100),))
            spans.append((key, before, time.time_ns()))
        router.query(K, "SELECT count(*) FROM t")  # reads note nothing
        node = router._store.node_path("n1")
        mine = router._store.notes.files()  # type: ignore[union-attr]
        assert list(mine) == [node]
        path = router.locate(K).path
        assert path is not None
        last_frames = probe(path)[0]
        found = all_notes(node)
        directory = notes_dir(node)
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(os.path.dirname(directory)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(mine[node]).st_mode) == 0o600
    assert [n.key for n in found] == [key for key, _, _ in spans]
    for note, (_key, before, after) in zip(found, spans, strict=True):
        assert before <= note.time_ns <= after
    for key in (K, "user:other"):
        frames = [n.frames for n in found if n.key == key]
        assert all(b > a for a, b in zip(frames, frames[1:], strict=False))  # each commit adds frames
    assert [n.frames for n in found if n.key == K][-1] == last_frames  # what the log holds after the last commit


def test_async_batches_note_once_per_commit(root: str, tmp_path: Path) -> None:
    async def main() -> tuple[str, int]:
        async with AsyncRouter(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as ar:
            async def one() -> None:
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(body) VALUES (?)", (b"y",))
            await asyncio.gather(*(one() for _ in range(200)))
            path = (await ar.locate(K)).path
            assert path is not None
            return ar._store.node_path("n1"), probe(path)[0]

    node, mx_frame = asyncio.run(main())
    found = [n for n in all_notes(node) if n.key == K]
    assert 1 <= len(found) < 200  # group commit: one note per batch's commit
    assert found[-1].frames == mx_frame


_WRITER = """
{prelude}
from shardlite import Router
root, url = sys.argv[1], sys.argv[2]
router = Router(root, schema=["CREATE TABLE t(id INTEGER PRIMARY KEY, body BLOB)"], replicate=url)
i = 0
while True:
    key = "tenant:%d" % (i % 7)
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO t(body) VALUES (?)", (b"z" * (i % 300),))
    ack(i, key)
    i += 1
    if i == 200:
        ack("steady")
    if sys.argv[3] == "stop" and i == 50:
        break
router.close()
"""


def test_a_writer_killed_mid_stream_leaves_a_readable_notes_file(root: str, tmp_path: Path) -> None:
    Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)).close()
    script = write_script(tmp_path, "writer.py", _WRITER)
    proc = spawn(script, root, replica_url(tmp_path), "run")
    lines = LineReader(proc.stdout)  # type: ignore[arg-type]
    acked = 0
    while True:
        line = lines.next()
        assert line is not None, proc.stderr.read() if proc.stderr else ""
        if line.strip() == "steady":
            break
        acked += 1
    node = os.path.join(root, "n1")
    (name,) = notesfile.list_notes(node)
    assert notesfile.read_notes(node, name).dead is False  # alive: it holds the lock
    kill9(proc)
    lines.rest()  # the reader thread ends at the pipe's end
    close_pipes(proc)
    read = notesfile.read_notes(node, name)
    assert read.dead and read.finished and not read.bad
    assert len(read.notes) >= acked and all(n.key.startswith("tenant:") for n in read.notes)
    # a torn note at the end (a writer killed inside its write) is left for later, and the file is still done
    with open(os.path.join(notes_dir(node), name), "ab") as f:
        f.write(notes.encode("tenant:1", 9, 9)[:7])
    again = notesfile.read_notes(node, name, read.offset)
    assert again.notes == [] and again.offset == read.offset and again.finished and not again.bad
    notesfile.remove(node, name)
    assert notesfile.list_notes(node) == []


def test_dead_and_live_writers(root: str, tmp_path: Path) -> None:
    url = replica_url(tmp_path)
    script = write_script(tmp_path, "writer.py", _WRITER)
    Router(root, schema=SCHEMA, replicate=url).close()
    proc = spawn(script, root, url, "stop")
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    node = os.path.join(root, "n1")
    with Router(root, schema=SCHEMA) as router:  # a live writer in this process
        with router.transaction(K) as tx:
            tx.execute("INSERT INTO t(body) VALUES (?)", (b"",))
        live = os.path.basename(router._store.notes.files()[node])  # type: ignore[union-attr]
        states = {name: notesfile.read_notes(node, name) for name in notesfile.list_notes(node)}
        assert len(states) == 2
        assert not states[live].dead and not states[live].finished  # another descriptor of ours: still locked
        (gone,) = set(states) - {live}
        assert states[gone].dead and states[gone].finished and len(states[gone].notes) == 50
    closed = notesfile.read_notes(node, live)  # a closed router's file is a dead writer's
    assert closed.dead and closed.finished and [n.key for n in closed.notes] == [K]


def test_a_forked_child_notes_into_its_own_file(root: str, tmp_path: Path) -> None:
    with Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as router:
        with router.transaction(K) as tx:
            tx.execute("INSERT INTO t(body) VALUES (?)", (b"parent",))
        node = router._store.node_path("n1")
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit code is the result
            try:
                with Router(root, schema=SCHEMA) as child:
                    with child.transaction("user:child") as tx:
                        tx.execute("INSERT INTO t(body) VALUES (?)", (b"child",))
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        parent_file = os.path.basename(router._store.notes.files()[node])  # type: ignore[union-attr]
        names = notesfile.list_notes(node)
        assert len(names) == 2
        by_name = {name: notesfile.read_notes(node, name) for name in names}
        assert not by_name[parent_file].dead  # the child's exit left the parent's lock in place
        assert [n.key for n in by_name[parent_file].notes] == [K]
        (child_file,) = set(names) - {parent_file}
        assert by_name[child_file].dead and [n.key for n in by_name[child_file].notes] == ["user:child"]


def test_fences_and_copies_never_checkpoint_a_live_tenant(root: str, tmp_path: Path) -> None:
    """shardlite's own write transactions on a live file (a move's fence, a lifted fence, a drop's marker)
    run on ``open_source`` connections, which never checkpoint: the log keeps what the replicator has not
    captured yet."""
    from shardlite.errors import Busy
    from shardlite.files.copying import write_locked

    with Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as router:
        for _ in range(700):  # more than SQLite's autocheckpoint threshold (1,000 frames)
            with router.transaction(K) as tx:
                tx.execute("INSERT INTO t(body) VALUES (?)", (BLOB,))
        path = router.locate(K).path
        assert path is not None
        mx_frame, backfill, _wal, digest = probe(path)
        assert mx_frame > 1000 and backfill == 0
        with write_locked(path, busy_timeout_ms=5000, busy=lambda exc: Busy(str(exc))) as conn:
            conn.execute("UPDATE _shardlite_meta SET created = created + 1 WHERE id = 1")
        after, backfill, _wal, digest_after = probe(path)
        assert after > mx_frame and backfill == 0 and digest_after == digest


def test_shardlites_own_commits_on_a_live_tenant_are_noted_too(root: str, tmp_path: Path) -> None:
    """A drop's retired marker (and a move's fence, through the same ``write_locked``) is a commit of the
    tenant like any other: it is noted, so the replicator learns of it and of its time."""
    with Router(root, schema=SCHEMA, replicate=replica_url(tmp_path)) as router:
        with router.transaction(K) as tx:
            tx.execute("INSERT INTO t(body) VALUES (?)", (b"",))
        node = router._store.node_path("n1")
        before = time.time_ns()
        router.drop(K)
        found = [n for n in all_notes(node) if n.key == K]
    assert len(found) == 2 and found[1].frames > found[0].frames and found[1].time_ns >= before
