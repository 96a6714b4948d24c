"""A drop keeps its tenant's last commits in the replica (services/drop_tail.py): the drop captures what the
replicator had not captured yet, under the write lock of its fence, and stages it with the drop record. So a
one-tenant restore at a time before the drop (how a drop is undone) holds every write acknowledged until then,
replicator stopped, running or never run; with kill -9 of the dropping process anywhere and the drop run
again; and an erase still leaves nothing of the key. On both targets (file:// and SeaweedFS)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers_drops import SCHEMA, bodies, write
from helpers_drops import snapshots_stay_old as snapshots_stay_old
from helpers_procs import child_env, spawn, write_script
from helpers_s3 import TargetFactory

import shardlite
from shardlite.core import timeline
from shardlite.files import walcapture as wc
from shardlite.files.staging import Staging, StaleCursor
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read, replication
from shardlite.services.replica_restore import restore_tenant
from shardlite.services.replication import Replication


def _ship(router: shardlite.Router) -> None:
    """Rounds of a replicator in this process until nothing is staged."""
    run = Replication(router._store)
    try:
        for _ in range(20):
            run.run_round()
            if not replication.status(router._store)["total"]["staged"] and not replication.status(
                    router._store)["total"]["drops_staged"]:
                return
        raise AssertionError("the replicator did not ship what was staged")
    finally:
        run.close()


def _restored_rows(router: shardlite.Router, target: ReplicaTarget, key: str, at_ns: int | None,
                   as_key: str) -> list[str]:
    restore_tenant(router._store, target, key, as_key=as_key, at_ns=at_ns)
    return bodies(router, as_key)


def _kinds(target: ReplicaTarget, key: str) -> list[str]:
    """The kinds of ``key``'s captures in the replica, oldest first; their history is checked continuous."""
    captures = replica_read.captures_of(target, [key])[key]
    assert timeline.plan_replay(captures) is not None  # frames continue their cursor: no gap, no repeat
    return [c.entry.kind for c in captures]


def test_a_drop_with_the_replicator_stopped_keeps_every_write(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The replicator captured the tenant once, then stopped; writes go on, the tenant is dropped, a replicator
    starts: a restore at a time just before the drop holds every write, and one between two writes holds
    exactly those before it (each commit keeps its acknowledged time, from the writers' notes)."""
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        write(router, "user:a", "a one")
        write(router, "user:gone", "captured")
        _ship(router)
        write(router, "user:gone", "captured as frames")
        _ship(router)
        acked = [write(router, "user:gone", f"uncaptured {i}") for i in range(5)]
        expected = bodies(router, "user:gone")
        before_drop = time.time_ns()
        router.drop("user:gone")
        total = replication.status(router._store)["total"]
        assert total["drops_staged"] == 1 and total["staged"] == 1  # the tail, staged by the drop itself
        target = make_replica_target()
        _ship(router)
        assert _kinds(target, "user:gone") == ["snapshot", "frames", "frames"]  # the replicator's, then the drop's
        assert _restored_rows(router, target, "user:gone", before_drop, "user:back1") == expected
        assert _restored_rows(router, target, "user:gone", None, "user:back2") == expected
        assert _restored_rows(router, target, "user:gone", acked[2], "user:back3") == expected[:5]
        assert bodies(router, "user:a") == ["a one"]


def test_a_tenant_never_captured_is_staged_as_a_snapshot(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """No replicator ever ran: the drop's capture is the tenant's first, a snapshot, timed at its last
    commit (its note): a restore at a time before the drop holds every write."""
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        for i in range(4):
            write(router, "user:new", f"write {i}")
        expected = bodies(router, "user:new")
        before_drop = time.time_ns()
        router.drop("user:new")
        target = make_replica_target()
        _ship(router)
        assert _kinds(target, "user:new") == ["snapshot"]
        assert _restored_rows(router, target, "user:new", before_drop, "user:backnew") == expected


def test_a_drop_with_the_replicator_running_keeps_every_write(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """A replicator process (interval 0.02 s) captures while this process writes to tenants and drops them
    right after their last write: whichever of the two stages a tenant's last commits (the drop reads them
    again when the replicator staged first), a restore of each at a time just before its drop record, and
    at its latest commit, holds every write, and its history repeats no frame."""
    url = make_replica_target.url()
    root = str(tmp_path / "root")
    keys = [f"user:{i}" for i in range(12)]
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        for key in keys:
            write(router, key, f"{key} first")
    replicator = subprocess.Popen([sys.executable, "-m", "shardlite", "--root", root, "replicate", "run",
                                   "--interval", "0.02"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, env=child_env())
    rng = random.Random(16)
    expected: dict[str, list[str]] = {}
    before: dict[str, int] = {}
    try:
        with shardlite.Router(root, schema=SCHEMA) as router:
            deadline = time.monotonic() + 60
            while len(replication.status(router._store)["tenants"]) < len(keys):
                assert time.monotonic() < deadline and replicator.poll() is None
                time.sleep(0.02)
            for key in keys:
                for i in range(rng.randint(1, 30)):
                    write(router, key, f"{key} {i}")
                    if rng.random() < 0.2:
                        time.sleep(0.01)
                expected[key] = bodies(router, key)
                before[key] = time.time_ns()
                router.drop(key)
            deadline = time.monotonic() + 60
            while replication.status(router._store)["total"]["drops_staged"]:
                assert time.monotonic() < deadline and replicator.poll() is None
                time.sleep(0.05)
    finally:
        replicator.send_signal(signal.SIGTERM)
        _out, err = replicator.communicate(timeout=60)
    assert replicator.returncode == 0, err[-2000:]
    target = make_replica_target()
    with shardlite.Router(root, schema=SCHEMA) as router:
        dropped = {d.key: d.dropped_ns for name, size in replica_read.list_packs(target)
                   for d in replica_read.read_header(target, name, size).header.drops}
        assert sorted(dropped) == sorted(keys)
        for n, key in enumerate(keys):
            _kinds(target, key)
            # every commit lies before the drop record's time: the replicator times a commit whose note it had
            # not read yet at its capture (later than the commit), so the acknowledgement times are not the
            # bound here; the drop's own tail is timed from the notes (test above)
            assert _restored_rows(router, target, key, dropped[key] - 1, f"user:back{n}") == expected[key], key
            assert _restored_rows(router, target, key, None, f"user:latest{n}") == expected[key], key
            assert before[key] < dropped[key]


DROPPER = """
import sys, time
import shardlite
router = shardlite.Router(sys.argv[1], schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]})
for key in sys.argv[2].split(","):
    for i in range(int(sys.argv[3])):
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO notes(body) VALUES (?)", (f"{key} late {i}",))
    sys.stdout.write(f"wrote {key} {time.time_ns()}\\n")
    sys.stdout.flush()
    router.drop(key)
    sys.stdout.write(f"dropped {key} {time.time_ns()}\\n")
    sys.stdout.flush()
sys.stdout.write("done\\n")
sys.stdout.flush()
time.sleep(60)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_of_a_dropping_process_and_a_rerun_keep_every_write(
        tmp_path: Path, make_replica_target: TargetFactory, seed: int) -> None:
    """No replicator runs. A process writes to tenants and drops each after its writes; it is killed -9 at a
    random moment (inside a drop, often: the capture, the fence, the staging); the drops it left half-done
    are run again; a replicator ships. Every tenant whose writes were acknowledged is restorable with all of
    them at a time after its last write (a dropped one, or one still live), its history staged once."""
    rng = random.Random(seed)
    url = make_replica_target.url()
    root = str(tmp_path / "root")
    keys = [f"user:{i}" for i in range(10)]
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        for key in keys[:5]:  # half captured before, half never
            write(router, key, f"{key} early")
        _ship(router)
        for key in keys[5:]:
            write(router, key, f"{key} early")
    writes = 20
    dropper = spawn(write_script(tmp_path, "dropper.py", DROPPER), root, ",".join(keys), str(writes),
                    env=child_env())
    written: dict[str, int] = {}
    try:
        assert dropper.stdout is not None
        for _ in range(rng.randint(1, 6)):
            kind, key, at = dropper.stdout.readline().split()
            if kind == "wrote":
                written[key] = int(at)
        line = dropper.stdout.readline().split()  # the next drop begins now
        if line and line[0] == "wrote":
            written[line[1]] = int(line[2])
        time.sleep(rng.uniform(0.0, 0.03))
        dropper.send_signal(signal.SIGKILL)
        dropper.wait()
    finally:
        if dropper.poll() is None:
            dropper.kill()
            dropper.wait()
        for stream in (dropper.stdout, dropper.stderr):
            if stream is not None:
                stream.close()
    assert written
    with shardlite.Router(root, schema=SCHEMA) as router:
        for key in keys:
            record = router._store.meta.tenants.lookup(key)
            assert record is not None
            if record.state == "dropping":
                router.drop(key)  # a drop killed half-way is finished by dropping again
        _ship(router)
        target = make_replica_target()
        for n, key in enumerate(sorted(written)):
            kinds = _kinds(target, key)
            assert kinds.count("snapshot") == 1, kinds  # staged once: no second first capture
            want = [f"{key} early"] + [f"{key} late {i}" for i in range(writes)]
            assert _restored_rows(router, target, key, written[key], f"user:back{n}") == want, key


def test_erase_after_a_drop_with_the_replicator_stopped_leaves_nothing(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The tail a drop stages is staging data of the key like any capture: an erase takes it away, from the
    staging and from the replica, whether the drop came first or the erase dropped the tenant itself."""
    marker = f"ERASE-ME-{uuid.uuid4().hex}"
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        for key in ("user:x", "user:y", "user:keep"):
            write(router, key, f"{key} first {marker if key != 'user:keep' else 'plain'}")
        _ship(router)
        for key in ("user:x", "user:y"):
            write(router, key, f"{key} uncaptured {marker}")
        router.drop("user:x")  # its tail staged; then erased
        router.drop("user:x", erase=True)
        router.drop("user:y", erase=True)  # the erase drops it: its tail staged, then erased
        _ship(router)
        target = make_replica_target()
        holders = [name for name, _size in target.list("") if marker.encode() in target.get(name)]
        assert holders == []
        node = router._store.node_path(router._store.meta.tenants.lookup("user:keep").node)  # type: ignore[union-attr]
        for path in Path(node, ".replica").glob("staging.db*"):
            assert marker.encode() not in path.read_bytes()
        for key in ("user:x", "user:y"):
            assert replica_read.captures_of(target, [key])[key] == []


def test_a_stale_capture_is_not_staged(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """Two processes capturing one tenant: a capture staged against a cursor that moved meanwhile, or after
    the tenant's drop record, raises StaleCursor and stages nothing."""
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        write(router, "user:s", "one")
        _ship(router)
        record = router._store.meta.tenants.lookup("user:s")
        assert record is not None
        staging = Staging(router._store.node_path(record.node))
        try:
            stored = staging.cursor("user:s")
            assert stored is not None
            moved = stored.cursor._replace(frame=stored.cursor.frame + 1)
            got = wc.Capture([], b"\0" * 512, moved, 512)
            with pytest.raises(StaleCursor):
                staging.stage("user:s", record.incarnation, record.generation, got, [(1, 1)], 1, expect=moved)
            staging.stage_drop("user:s", record.incarnation, record.generation, time.time_ns())
            with pytest.raises(StaleCursor):
                staging.stage("user:s", record.incarnation, record.generation, got, [(1, 1)], 1,
                              expect=wc.NO_CURSOR)
            assert staging.staged_count() == (0, 0)
        finally:
            staging.close()


def test_a_drop_outrun_by_the_replicator_reads_its_tail_again(
        tmp_path: Path, make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicator stages the tenant's last commits between the drop's read of its log and its staging
    transaction (as an in-flight capture does): the drop's staging is refused (StaleCursor), the drop reads
    the log again from the new cursor (its second fence writes no frame), and the history holds each commit
    once."""
    from shardlite.services import drop_tail

    real = drop_tail._fence_and_read
    outrun: list[int] = []

    def read_then_outrun(store, record, path, cursor, previous, staging):  # type: ignore[no-untyped-def]
        tail = real(store, record, path, cursor, previous, staging)
        if not outrun and tail is not None and not tail.capture.empty:
            other = Staging(store.node_path(record.node))  # the replicator's own connection of the staging
            try:
                other.stage(record.key, record.incarnation, record.generation, tail.capture, tail.commits,
                            tail.captured_ns, expect=tail.expect)
            finally:
                other.close()
            outrun.append(len(tail.capture.frames))
        return tail

    monkeypatch.setattr(drop_tail, "_fence_and_read", read_then_outrun)
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        write(router, "user:r", "captured")
        _ship(router)
        for i in range(3):
            write(router, "user:r", f"late {i}")
        expected = bodies(router, "user:r")
        before_drop = time.time_ns()
        router.drop("user:r")
        assert outrun and outrun[0] >= 3
        target = make_replica_target()
        _ship(router)
        # the outrunning capture, then the drop's second read: the first fence's commit only
        assert _kinds(target, "user:r") == ["snapshot", "frames", "frames"]
        assert _restored_rows(router, target, "user:r", before_drop, "user:back") == expected


def test_a_drop_killed_after_its_fence_stages_the_tail_when_run_again(
        tmp_path: Path, make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drop dies between its fence and its staging transaction (an exception standing for kill -9 there):
    the tenant stays 'dropping', nothing is staged; the drop run again finds the file fenced (its fence writes
    no frame), reads every commit after the cursor up to the end of the log's checksum chain, the first fence
    included, and stages them once with the record."""
    class Killed(BaseException):
        pass

    def killed(*_args: object, **_kwargs: object) -> bool:
        raise Killed

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        write(router, "user:k", "captured")
        _ship(router)
        acked = [write(router, "user:k", f"late {i}") for i in range(4)]
        expected = bodies(router, "user:k")
        with monkeypatch.context() as patched:
            patched.setattr(Staging, "stage_drop", killed)
            with pytest.raises(Killed):
                router.drop("user:k")
        record = router._store.meta.tenants.lookup("user:k")
        assert record is not None and record.state == "dropping"
        assert replication.status(router._store)["total"]["staged"] == 0
        router.drop("user:k")
        target = make_replica_target()
        _ship(router)
        assert _kinds(target, "user:k") == ["snapshot", "frames"]
        assert _restored_rows(router, target, "user:k", acked[-1], "user:back") == expected
        assert _restored_rows(router, target, "user:k", None, "user:latest") == expected


def test_a_confirmation_for_a_tenant_left_dropping_is_answered(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The replicator keeps a 'dropping' tenant marked (so its notes offsets wait for the drop), but a
    durability confirmation for it is answered (the tenant is no longer on the node), not kept waiting round
    after round while a killed drop leaves it 'dropping'."""
    import socket

    from shardlite.services.confirmations import Request

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        write(router, "user:d", "one")
        run = Replication(router._store)
        try:
            run.run_round()
            record = router._store.meta.tenants.lookup("user:d")
            assert record is not None
            router._store.meta.tenants.set_state("user:d", "dropping", expect_generation=record.generation,
                                                 expect_states=("active",))  # a drop killed after this step
            node = run.nodes[record.node]
            node.replicator.mark("user:d")
            ours, theirs = socket.socketpair()
            with ours, theirs:
                node.waiting.append(Request("user:d", theirs))
                run.run_round()
                assert "user:d" in node.replicator.marked()  # still marked: the drop is not through
                assert node.waiting == []
                answer = ours.recv(4096)
                assert answer[:1] == b"\x01" and b"any more" in answer
        finally:
            run.close()
