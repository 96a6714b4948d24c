"""kill -9 of an AsyncRouter writer while a worker thread checkpoints a tenant's WAL (brief rules 12, 13).

``shardlite.files.checkpoints`` moves an AsyncRouter's checkpoints to worker threads with connections of their
own, so a crash can land while a worker copies the log into the database file and the event loop keeps
committing to the same log. A writer subprocess commits large rows (a checkpoint every ~1,000 of them)
from 16 tasks over two tenants and acknowledges each row after its ``async with`` block returned; the
worker's checkpoints announce themselves ("ckpt+" before, "ckpt-" after). The test kills the writer right
after a "ckpt+", several rounds in a row on the same files, and checks after every round that each file
passes ``integrity_check`` and that every acknowledged row is present exactly once; at the end, that at
least one kill landed while a worker checkpoint was in flight (its "ckpt-" never came).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from helpers_procs import LineReader, assert_all_files_sound, close_pipes, kill9, spawn, write_script

from shardlite import Router

pytestmark = pytest.mark.slow

SCHEMA = ["CREATE TABLE r(wid INTEGER NOT NULL, body BLOB NOT NULL)"]
KEYS = ["ckpt:a", "ckpt:b"]

_WRITER = """
{prelude}
import asyncio
import json

import shardlite.files.checkpoints as checkpoints
from shardlite import AsyncRouter

root, round_no, schema, keys = sys.argv[1], int(sys.argv[2]), *map(json.loads, sys.argv[3:5])
real_run = checkpoints.Checkpointer._run


def announced_run(self, handle, watch):  # the worker's checkpoint, announced around the real one
    ack("ckpt+", handle.key)
    real_run(self, handle, watch)
    ack("ckpt-", handle.key)


checkpoints.Checkpointer._run = announced_run


async def writer(ar, t):
    key = keys[t % len(keys)]
    i = 0
    while True:
        i += 1
        wid = round_no * 1_000_000 + t * 10_000 + i
        async with ar.transaction(key) as tx:
            await tx.execute("INSERT INTO r(wid, body) VALUES (?, randomblob(3500))", (wid,))
        ack(wid, key)  # only after the block returned, i.e. after its COMMIT


async def main():
    async with AsyncRouter(root, schema=schema, synchronous="NORMAL") as ar:
        ack("ready")
        await asyncio.gather(*(writer(ar, t) for t in range(16)))


asyncio.run(main())
"""


def test_kill9_during_worker_checkpoints_loses_nothing_acknowledged(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "data")
    rng = random.Random()
    with Router(root, schema=SCHEMA):
        pass
    script = write_script(tmp_path, "writer_ckpt.py", _WRITER)
    acked: dict[int, str] = {}
    kills_in_flight = 0
    rounds = 4
    for round_no in range(1, rounds + 1):
        proc = spawn(script, root, round_no, json.dumps(SCHEMA), json.dumps(KEYS))
        reader = LineReader(proc.stdout)  # type: ignore[arg-type]
        lines: list[str] = []
        first = reader.next()
        if first != "ready":
            kill9(proc)
            pytest.fail(f"writer did not start ({first!r}): {close_pipes(proc)}")
        skip = rng.randrange(2)  # kill at the first or the second worker checkpoint of the round
        while True:
            line = reader.next()
            if line is None:
                pytest.fail(f"round {round_no}: the writer died by itself:\n{close_pipes(proc)}")
            lines.append(line)
            if line.startswith("ckpt+"):
                if skip == 0:
                    break
                skip -= 1
        kill9(proc)
        lines += reader.rest()
        close_pipes(proc)
        announced = [line for line in lines if line.startswith("ckpt")]
        if announced and announced[-1].startswith("ckpt+"):
            kills_in_flight += 1  # the last checkpoint started never finished: the kill landed inside it
        for line in lines:
            if not line.startswith("ckpt"):
                wid_text, key = line.split()
                assert int(wid_text) not in acked
                acked[int(wid_text)] = key
        assert_all_files_sound(root)  # after every kill, before the next writer recovers anything

    with Router(root, schema=SCHEMA) as router:
        present: Counter[tuple[int, str]] = Counter()
        for key in KEYS:
            for (wid,) in router.query(key, "SELECT wid FROM r"):
                present[(wid, key)] += 1
            assert router.query(key, "PRAGMA integrity_check") == [("ok",)]
    assert len(acked) > 1000, "too few writes for checkpoints to have run"
    missing = [wid for wid, key in acked.items() if present[(wid, key)] != 1]
    assert not missing, f"{len(missing)} acknowledged rows missing or duplicated, e.g. {missing[:5]}"
    assert all(n == 1 for n in present.values()), "a row is duplicated"
    assert kills_in_flight >= 1, "no kill landed inside a worker checkpoint: the test proved nothing here"
