"""kill -9 of a writer process (brief rules 12 and 13: crashes lose nothing acknowledged, at NORMAL).

A writer subprocess writes to several tenants in a loop and prints each write id on stdout, flushed, only
after the transaction holding it committed (after the ``with`` / ``async with`` block returned): a printed
id is an *acknowledged* write. The test kills it with SIGKILL at a random moment, several rounds in a row
(each round's writer starts on the files the previous one left), and then checks:

* every file under the root (global DB and tenants) passes ``PRAGMA integrity_check`` after every round;
* every acknowledged id is present exactly once, in the tenant the writer named, and whole (each
  transaction writes two rows: both or neither, never one);
* an id that is present but was not acknowledged is at most the one transaction in flight at the kill;
* tenants created during the rounds (some kills land inside creation) are in the catalog and readable;
* every event emitted by an acknowledged transaction is still delivered by the relay exactly once (no event
  stranded by a kill between the pending flag and the commit).

``synchronous="NORMAL"``: an acknowledged write survives a process crash (not necessarily power loss).
The sleeps only pick a random moment for the kill; nothing is asserted about timing.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers_procs import LineReader, assert_all_files_sound, close_pipes, kill9, spawn, write_script

from shardlite import Router

pytestmark = pytest.mark.slow

SCHEMA = [
    "CREATE TABLE w(wid INTEGER NOT NULL, part INTEGER NOT NULL, body BLOB)",  # no UNIQUE: duplicates show
    "CREATE INDEX w_wid ON w(wid)",
    "CREATE TABLE notes(wid INTEGER NOT NULL, source TEXT NOT NULL)",
]
KEYS = [f"crash:{i}" for i in range(5)]

_SYNC_WRITER = """
{prelude}
import json
import random

from shardlite import Router

root, round_no, seed, schema, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(json.loads, sys.argv[4:6])
rng = random.Random(seed)
router = Router(root, schema=schema, synchronous="NORMAL")
ack("ready")
i = 0
while True:
    i += 1
    wid = round_no * 1_000_000 + i
    key = f"crash:new:{round_no}:{i}" if i % 40 == 0 else rng.choice(keys)  # some kills land in a create
    emit_to = rng.choice(keys) if i % 7 == 0 else None
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO w(wid, part, body) VALUES (?, 0, ?)", (wid, os.urandom(rng.randint(0, 3000))))
        if emit_to is not None:
            tx.emit(emit_to, "note", {"wid": wid})
        tx.execute("INSERT INTO w(wid, part, body) VALUES (?, 1, NULL)", (wid,))
    ack(wid, key, emit_to or "-")
"""

_ASYNC_WRITER = """
{prelude}
import asyncio
import json
import random

from shardlite import AsyncRouter

root, round_no, seed, schema, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *map(json.loads, sys.argv[4:6])


async def writer(ar, t):
    rng = random.Random(seed * 100 + t)
    i = 0
    while True:
        i += 1
        wid = round_no * 1_000_000 + t * 10_000 + i
        key = rng.choice(keys)
        emit_to = rng.choice(keys) if i % 7 == 0 else None
        async with ar.transaction(key) as tx:  # group-committed with the other tasks' transactions
            await tx.execute("INSERT INTO w(wid, part, body) VALUES (?, 0, ?)", (wid, os.urandom(rng.randint(0, 2000))))
            if emit_to is not None:
                await tx.emit(emit_to, "note", {"wid": wid})
            await tx.execute("INSERT INTO w(wid, part, body) VALUES (?, 1, NULL)", (wid,))
        ack(wid, key, emit_to or "-")  # only after the block returned, i.e. after its COMMIT


async def main():
    async with AsyncRouter(root, schema=schema, synchronous="NORMAL") as ar:
        ack("ready")
        await asyncio.gather(*(writer(ar, t) for t in range(24)))


asyncio.run(main())
"""


def _note(tx: Any, event: Any) -> None:
    tx.execute("INSERT INTO notes(wid, source) VALUES (?, ?)", (event.payload["wid"], event.source))


@pytest.mark.parametrize("kind, rounds", [("sync", 7), ("async", 5)])
def test_kill9_writer_loses_nothing_acknowledged(tmp_path: Path, kind: str, rounds: int) -> None:
    root = os.fspath(tmp_path / "data")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    with Router(root, schema=SCHEMA):
        pass  # the root exists before the first writer
    script = write_script(tmp_path, f"writer_{kind}.py", _SYNC_WRITER if kind == "sync" else _ASYNC_WRITER)

    acked: dict[int, tuple[str, str]] = {}  # wid -> (tenant key, event destination or "-")
    for round_no in range(1, rounds + 1):
        proc = spawn(script, root, round_no, rng.randrange(1 << 30), json.dumps(SCHEMA), json.dumps(KEYS))
        reader = LineReader(proc.stdout)  # type: ignore[arg-type]
        first = reader.next()
        if first != "ready":
            kill9(proc)
            reader.rest()
            pytest.fail(f"writer did not start ({first!r}): {close_pipes(proc)}")
        time.sleep(rng.uniform(0.0, 0.4))  # the crash lands at a random moment (not a timing assertion)
        died_early = proc.poll()
        kill9(proc)
        lines = reader.rest()
        err = close_pipes(proc)
        assert died_early is None, f"round {round_no}: the writer died by itself ({died_early}):\n{err}"
        for line in lines:
            wid_text, key, dest = line.split()
            assert int(wid_text) not in acked
            acked[int(wid_text)] = (key, dest)
        assert_all_files_sound(root)  # after every kill, before the next writer recovers anything
    assert len(acked) > rounds, f"too few writes acknowledged to mean anything (seed {seed})"

    with Router(root, schema=SCHEMA) as router:
        keys = list(router.tenants())
        created = {key for key, _ in acked.values() if key.startswith("crash:new:")}
        assert created <= set(keys), "an acknowledged create is missing from the catalog"
        where: dict[int, list[str]] = {}
        parts: Counter[tuple[int, int]] = Counter()
        for key in keys:
            for row_wid, part, count in router.query(key, "SELECT wid, part, count(*) FROM w GROUP BY wid, part"):
                where.setdefault(row_wid, []).append(key)
                parts[(row_wid, part)] += count
        for wid, (key, _) in acked.items():
            assert parts[(wid, 0)] == 1 and parts[(wid, 1)] == 1, f"acknowledged write {wid} not present once"
            assert set(where[wid]) == {key}, f"write {wid} found in {where[wid]}, acknowledged on {key}"
        for wid in where:
            assert parts[(wid, 0)] == parts[(wid, 1)] == 1, f"write {wid} is torn or duplicated"
        unacknowledged = [wid for wid in where if wid not in acked]
        in_flight = Counter(wid // 1_000_000 for wid in unacknowledged)
        limit = 1 if kind == "sync" else 64  # sync: one transaction in flight; async: one batch
        assert all(n <= limit for n in in_flight.values()), f"unacknowledged writes present: {in_flight}"

        # events emitted by acknowledged transactions are delivered, exactly once (nothing stranded)
        router.handler("note")(_note)
        router.relay.drain(timeout=30)
        notes: Counter[tuple[int, str]] = Counter()
        for key in KEYS:
            for note_wid, source in router.query(key, "SELECT wid, source FROM notes"):
                notes[(note_wid, key)] += 1
                assert source in where.get(note_wid, []), f"note {note_wid} delivered but its write is absent"
        for wid, (_, dest) in acked.items():
            if dest != "-":
                assert notes[(wid, dest)] == 1, f"event of acknowledged write {wid} -> {dest} not delivered once"
        assert all(n == 1 for n in notes.values())
    assert_all_files_sound(root)
