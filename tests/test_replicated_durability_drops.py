"""``durability="replicated"`` when the tenant is dropped right after the write (shardlite/services/
confirm_answers.py, docs/replication.md "durability=replicated"): the drop stages the file's uncaptured log tail
with its drop record (services/drop_tail.py), so the write reaches the replica with the drop's pack, and the
writer's confirmation is answered by that pack: acknowledged once it is uploaded; TenantErased after a drop with
erase; ReplicationUnavailable when the upload fails (the S3 server down). Both front ends, file:// and SeaweedFS
targets, real replicator processes, kill -9 of a dropping process, several writer processes. The ordering is
made, never timed: the write waits while no replicator runs, the drop happens, then a replicator starts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_procs import DEADLINE, child_env, close_pipes, kill9, spawn, write_script
from helpers_s3 import TargetFactory, separate_s3_server

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.services import replica_read
from shardlite.services.replica_restore import restore_tenant

SCHEMA = {"user": ["CREATE TABLE log(n INTEGER PRIMARY KEY)"]}
FRONTS = ("sync", "async")


def _until(what: str, cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"not within {DEADLINE} s: {what}"
        time.sleep(0.02)


class Writer(threading.Thread):
    """One replicated write on a router of its own (``kind``: sync or async front), on a thread: ``error``
    is what it raised (None: acknowledged)."""

    def __init__(self, kind: str, root: Path, key: str, n: int, timeout: float = DEADLINE) -> None:
        super().__init__(daemon=True)
        self.kind, self.root, self.key, self.n, self.timeout = kind, root, key, n, timeout
        self.error: BaseException | None = None
        self.done = False

    def run(self) -> None:
        try:
            if self.kind == "sync":
                with shardlite.Router(self.root, schema=SCHEMA, durability="replicated",
                                      durability_timeout=self.timeout) as router:
                    with router.transaction(self.key) as tx:
                        tx.execute("INSERT INTO log(n) VALUES (?)", (self.n,))
            else:
                async def main() -> None:
                    async with shardlite.AsyncRouter(self.root, schema=SCHEMA, durability="replicated",
                                                     durability_timeout=self.timeout) as router:
                        async with router.transaction(self.key) as tx:
                            await tx.execute("INSERT INTO log(n) VALUES (?)", (self.n,))
                asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc
        self.done = True

    def outcome(self) -> BaseException | None:
        self.join(DEADLINE + self.timeout)
        assert self.done, "the writer hangs"
        return self.error


def _committed(admin: shardlite.Router, key: str, n: int) -> bool:
    try:
        return n in {m for (m,) in admin.query(key, "SELECT n FROM log")}
    except (shardlite.UnknownTenant, apsw.SQLError):
        return False  # not created yet, or created and its table not committed yet


def _replicator(root: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shardlite", "--root", str(root), "replicate", "run", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows_by_incarnation(target: ReplicaTarget, key: str) -> dict[str, set[int]]:
    """Per incarnation of ``key`` in the replica, the rows of its latest state (as a restore replays them)."""
    history = replica_read.captures_of(target, [key]).get(key, [])
    out: dict[str, set[int]] = {}
    for incarnation in {c.entry.incarnation for c in history}:
        found = timeline.image_at([c for c in history if c.entry.incarnation == incarnation])
        assert found is not None
        data = bytearray(found[0])
        data[18:20] = b"\x01\x01"  # a rollback-journal image: deserialized without its log
        conn = apsw.Connection(":memory:")
        conn.deserialize("main", bytes(data))
        out[incarnation] = {n for (n,) in conn.execute("SELECT n FROM log")}
    return out


def _write_then_drop(root: Path, url: str, kind: str, drop: Callable[[shardlite.Router], object],
                     timeout: float = DEADLINE) -> tuple[Writer, shardlite.Router, int]:
    """A replicated write of row 7 to ``user:a`` waits (no replicator runs yet); once it is committed the
    tenant is dropped by ``drop`` (another router). Returns the writer (still waiting), that router and the
    time just before the drop."""
    admin = shardlite.Router(root, schema=SCHEMA, replicate=url)
    try:
        writer = Writer(kind, root, "user:a", 7, timeout)
        writer.start()
        _until("the write is committed", lambda: _committed(admin, "user:a", 7))
        assert not writer.done  # it waits for its confirmation: no replicator runs
        before = time.time_ns()
        drop(admin)
        return writer, admin, before
    except BaseException:
        admin.close()
        raise


@pytest.mark.parametrize("kind", FRONTS)
def test_a_write_then_an_immediate_drop_is_acknowledged_and_in_the_replica(
        tmp_path: Path, make_replica_target: TargetFactory, kind: str) -> None:
    """The drop staged the write (its tail) with the drop record; the replicator that starts afterwards ships
    them and answers the waiting writer: acknowledged, not 'not on node', and a restore of the tenant at a time
    before the drop holds the write. Waiting again afterwards (the catalog's tombstone names the dropped file)
    is confirmed too."""
    root, url = tmp_path / "root", make_replica_target.url()
    writer, admin, before = _write_then_drop(root, url, kind, lambda r: r.drop("user:a"))
    replicator = _replicator(root)
    try:
        assert writer.outcome() is None
        admin.wait_replicated("user:a", timeout=DEADLINE)
        target = make_replica_target()
        restore_tenant(admin._store, target, "user:a", as_key="user:back", at_ns=before)
        assert {n for (n,) in admin.query("user:back", "SELECT n FROM log")} == {7}
        # a later tenant under the same key: its own writes are confirmed by its own captures, and the dropped
        # one's history stays apart in the replica
        with shardlite.Router(root, schema=SCHEMA, durability="replicated", durability_timeout=DEADLINE) as again:
            with again.transaction("user:a") as tx:
                tx.execute("INSERT INTO log(n) VALUES (8)")
        assert sorted(_rows_by_incarnation(target, "user:a").values(), key=min) == [{7}, {8}]
    finally:
        _stop(replicator)
        admin.close()


@pytest.mark.parametrize("kind", FRONTS)
def test_a_write_then_an_immediate_drop_with_erase_is_answered_erased(
        tmp_path: Path, make_replica_target: TargetFactory, kind: str) -> None:
    """drop --erase removes the write from the replica on purpose: the writer gets TenantErased (final, it
    says so), never a confirmation, and the replica holds nothing of the key."""
    root, url = tmp_path / "root", make_replica_target.url()
    receipts: list[Any] = []
    writer, admin, _before = _write_then_drop(root, url, kind,
                                              lambda r: receipts.append(r.drop("user:a", erase=True)))
    replicator = _replicator(root)
    try:
        error = writer.outcome()
        assert isinstance(error, shardlite.TenantErased), error
        assert not isinstance(error, shardlite.ReplicationUnavailable)
        assert "erase" in str(error) and "on purpose" in str(error) and "final" in str(error)
        assert receipts[0]["complete"] is True
        with pytest.raises(shardlite.TenantErased):
            admin.wait_replicated("user:a", timeout=DEADLINE)  # waiting again: the same answer
        assert replica_read.captures_of(make_replica_target(), ["user:a"]).get("user:a", []) == []
    finally:
        _stop(replicator)
        admin.close()


DROP_KILLED = '''
import os, signal, sys
import shardlite
router = shardlite.Router(sys.argv[1])
tenants = router._store.meta.tenants
set_state = tenants.set_state
def killed_at_the_tombstone(key, state, **kw):
    if state == "dropped":  # the tail and the drop record are staged: killed before the catalog says so
        os.kill(os.getpid(), signal.SIGKILL)
    return set_state(key, state, **kw)
tenants.set_state = killed_at_the_tombstone
router.drop(sys.argv[2])
'''


def test_kill_9_of_the_dropping_process_after_its_staging(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The dropping process is killed -9 after it staged the tail and the drop record, before the catalog's
    tombstone: the tenant stays 'dropping', the replicator ships what was staged, and the waiting writer is
    acknowledged; the drop run again finishes it, and the write is in a restore."""
    root, url = tmp_path / "root", make_replica_target.url()
    script = write_script(tmp_path, "drop_killed.py", DROP_KILLED)

    def killed_drop(admin: shardlite.Router) -> None:
        proc = spawn(script, root, "user:a", env=child_env())
        _out, err = proc.communicate(timeout=DEADLINE)
        assert proc.returncode == -9, err[-2000:]

    writer, admin, before = _write_then_drop(root, url, "sync", killed_drop)
    replicator = _replicator(root)
    try:
        record = admin._store.meta.tenants.lookup("user:a")
        assert record is not None and record.state == "dropping"
        assert writer.outcome() is None
        admin.drop("user:a")  # a drop killed half-way is finished by dropping again
        admin.wait_replicated("user:a", timeout=DEADLINE)
        restore_tenant(admin._store, make_replica_target(), "user:a", as_key="user:back", at_ns=before)
        assert {n for (n,) in admin.query("user:back", "SELECT n FROM log")} == {7}
    finally:
        _stop(replicator)
        admin.close()


def test_a_drop_whose_tail_cannot_ship_fails_within_the_bound_then_confirms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 server is down: the replicator cannot upload the drop's pack, so the waiting writer gets
    ReplicationUnavailable (committed, not confirmed; retryable) within its bound, saying why. Once the
    server is back, waiting again confirms it and the write is in a restore."""
    with separate_s3_server() as server:  # a server of its own: stopping it disturbs no other test
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = server.url("dropdown")
        root = tmp_path / "root"
        timeout = 20.0  # the replicator's start and the S3 client's retries of the failing upload fit in it
        writer, admin, before = _write_then_drop(root, url, "sync", lambda r: r.drop("user:a"), timeout)
        server.stop()  # the drop needs no replica; the upload of its pack does
        replicator = _replicator(root)
        try:
            began = time.monotonic()
            error = writer.outcome()
            assert isinstance(error, shardlite.ReplicationUnavailable), error
            assert time.monotonic() - began < timeout + 10  # a clear error, not a hang (margin: a loaded machine)
            text = str(error)
            assert "committed locally" in text and "not confirmed" in text
            assert "upload" in text and "drop record" in text, text  # the tail is staged; its upload failed
            server.start()
            admin.wait_replicated("user:a", timeout=DEADLINE)  # the retry that is safe
            target = open_target(url)
            try:
                restore_tenant(admin._store, target, "user:a", as_key="user:back", at_ns=before)
            finally:
                target.close()
            assert {n for (n,) in admin.query("user:back", "SELECT n FROM log")} == {7}
        finally:
            _stop(replicator)
            admin.close()


WRITER = '''
import sys, time
import shardlite
root, key, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
schema = {"user": ["CREATE TABLE log(n INTEGER PRIMARY KEY)"]}
with shardlite.Router(root, schema=schema, durability="replicated", durability_timeout=60.0) as router:
    n, retries, failing_since = first, 0, None
    while n < first + count:
        if failing_since is not None and time.monotonic() - failing_since > 60:  # a drop lasts a moment
            sys.exit("the writes kept failing")
        if retries:
            time.sleep(0.01)  # a back-off while the drop is under way (it fences the file), not a timing check
        try:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO log(n) VALUES (?)", (n,))
        except shardlite.ReplicationUnavailable as exc:  # committed, not confirmed: the test fails on it
            print("unconfirmed", n, str(exc).replace("\\n", " "), flush=True)
        except shardlite.ShardliteError as exc:  # not committed (the drop fenced the file): again
            print("retry", n, type(exc).__name__, flush=True)
            retries += 1
            failing_since = failing_since or time.monotonic()
            continue
        else:
            retries, failing_since = 0, None
            print("ack", n, flush=True)
        n += 1
'''


def test_several_writer_processes_and_a_drop_meanwhile(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """Three writer processes write to one tenant with durability='replicated' while a replicator runs; the
    tenant is dropped while they write, and their next writes create a new tenant under the same key. Every
    committed write is acknowledged (none 'not confirmed'), and each acknowledged row is in exactly one of the
    two incarnations' histories in the replica: the old one's (shipped with its drop) or the new one's."""
    root, url = tmp_path / "root", make_replica_target.url()
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as admin:
        with admin.transaction("user:s") as tx:
            tx.execute("INSERT INTO log(n) VALUES (0)")
    replicator = _replicator(root, "--interval", "0.5")
    script = write_script(tmp_path, "writer.py", WRITER)
    writers = [spawn(script, root, "user:s", 1000 * (w + 1), 40, env=child_env()) for w in range(3)]
    lines: dict[int, list[list[str]]] = {w: [] for w in range(3)}

    def read(w: int, upto: int) -> None:
        stdout = writers[w].stdout
        assert stdout is not None
        while sum(line[0] == "ack" for line in lines[w]) < upto:
            line = stdout.readline().split(maxsplit=2)
            assert line, f"writer {w} ended early: {writers[w].stderr.read() if writers[w].stderr else ''}"
            lines[w].append(line)

    try:
        for w in range(3):
            read(w, 10)
        with shardlite.Router(root, schema=SCHEMA) as admin:
            admin.drop("user:s")
        for w in range(3):
            read(w, 40)
            assert writers[w].wait(DEADLINE) == 0
        with shardlite.Router(root, schema=SCHEMA) as admin:
            admin.wait_replicated("user:s", timeout=DEADLINE)
    finally:
        for proc in writers:
            kill9(proc)
            close_pipes(proc)
        _stop(replicator)
    unconfirmed = [line for w in lines.values() for line in w if line[0] == "unconfirmed"]
    assert unconfirmed == []
    acked = {int(line[1]) for w in lines.values() for line in w if line[0] == "ack"}
    assert len(acked) == 120
    histories = _rows_by_incarnation(make_replica_target(), "user:s")
    assert len(histories) == 2, sorted(map(len, histories.values()))
    old, new = sorted(histories.values(), key=lambda rows: 0 in rows, reverse=True)
    assert 0 in old and not old & new
    assert acked <= old | new
    assert acked & old and acked & new  # the drop came while they wrote


def test_a_request_is_confirmed_only_for_the_file_it_names(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """A replicator in this process answers requests naming a file: the dropped file by its shipped drop, the
    later tenant under the same key by its own captures; a request naming a file that is neither (another
    incarnation, another generation of the live one) is not confirmed, although the key is live and captured."""
    import socket

    from shardlite.services.confirmations import Identity, Request
    from shardlite.services.replication import Replication

    def ask(run: Replication, node: str, key: str, identity: Identity) -> bytes:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            run.nodes[node].waiting.append(Request(key, theirs, identity))
            for _ in range(20):
                run.run_round()
                if not run.nodes[node].waiting:
                    return ours.recv(4096)
        raise AssertionError("no answer within 20 rounds")

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        with router.transaction("user:x") as tx:
            tx.execute("INSERT INTO log(n) VALUES (1)")
        first = router._store.meta.tenants.lookup("user:x")
        assert first is not None
        router.drop("user:x")  # its tail (never captured) is staged with the drop record
        with router.transaction("user:x") as tx:
            tx.execute("INSERT INTO log(n) VALUES (2)")
        second = router._store.meta.tenants.lookup("user:x")
        assert second is not None and second.incarnation != first.incarnation
        run = Replication(router._store)
        try:
            run.run_round()  # takes the node
            old = Identity(first.incarnation, first.generation)
            new = Identity(second.incarnation, second.generation)
            assert ask(run, first.node, "user:x", old) == b"\x00"  # its drop's pack shipped
            assert ask(run, second.node, "user:x", new) == b"\x00"  # captured, as any live file
            for other in (Identity("0" * 32, first.generation), Identity(second.incarnation, second.generation + 1),
                          Identity(first.incarnation, second.generation)):
                answer = ask(run, second.node, "user:x", other)
                assert answer[:1] == b"\x01" and b"not on node" in answer, (other, answer)
        finally:
            run.close()
        assert sorted(_rows_by_incarnation(make_replica_target(), "user:x").values(), key=min) == [{1}, {2}]



def test_a_request_for_a_file_whose_drop_is_under_way_waits_for_it(
        tmp_path: Path, make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tenant is 'dropping' and its drop has staged nothing yet (fencing, or killed before its staging): a
    request naming its file is neither confirmed nor refused at once, since the drop will stage the write; it
    waits for the drop's pack, and gets an error naming the fix once it has waited LATER_LIMIT."""
    import socket

    from shardlite.services import confirm_answers
    from shardlite.services.confirmations import Identity, Request
    from shardlite.services.replication import Replication

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        with router.transaction("user:d") as tx:
            tx.execute("INSERT INTO log(n) VALUES (1)")
        record = router._store.meta.tenants.lookup("user:d")
        assert record is not None
        run = Replication(router._store)
        try:
            run.run_round()
            router._store.meta.tenants.set_state("user:d", "dropping", expect_generation=record.generation,
                                                 expect_states=("active",))  # a drop killed after this step
            node = run.nodes[record.node]
            ours, theirs = socket.socketpair()
            with ours, theirs:
                ours.setblocking(False)
                node.waiting.append(Request("user:d", theirs, Identity(record.incarnation, record.generation)))
                for _ in range(3):
                    run.run_round()
                    assert len(node.waiting) == 1  # kept: the drop stages the write when it goes on
                    with pytest.raises(BlockingIOError):
                        ours.recv(4096)
                monkeypatch.setattr(confirm_answers, "LATER_LIMIT", 0.0)
                run.run_round()
                assert node.waiting == []
                ours.setblocking(True)
                answer = ours.recv(4096)
                assert answer[:1] == b"\x01" and b"run the drop again" in answer, answer
        finally:
            run.close()
