"""How long `tenants drop KEY --erase` takes on a replica of N packs that each hold the erased tenant and three
others, to a directory and to a real S3 server (SeaweedFS on loopback), in one run.

Usage::

    .venv/bin/python benchmarks/erase.py                 # 50 and 200 packs, 3 rounds, both targets
    .venv/bin/python benchmarks/erase.py --packs 500 --rounds 1

Each measurement builds its own root in a child process: four tenants written once per round, one pack per
round by an in-process ``NodeReplicator`` (so every pack holds the victim), then times
``Router.drop("user:victim", erase=True)``: one header GET per pack, then GET + PUT + GET (read back) per pack
holding the victim. Prints one line per measurement; run under ``uptime`` to read it.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
KEYS = ["user:victim", "user:o1", "user:o2", "user:o3"]


def measure(url: str, packs: int) -> str:
    import shardlite
    from shardlite.replica.target import open_target
    from shardlite.services.replicator import NodeReplicator

    rng = random.Random(1)
    with shardlite.Router(os.path.join(tempfile.mkdtemp(), "root"), schema=SCHEMA, replicate=url) as router:
        target = open_target(url)
        replicator = NodeReplicator(router._store, "n1", target)
        try:
            for _ in range(packs):
                for key in KEYS:
                    with router.transaction(key) as tx:
                        tx.execute("INSERT INTO notes(body) VALUES (?)", ("x" * rng.randrange(4000),))
                    replicator.mark(key)
                replicator.reconcile()
                replicator.run_round()
        finally:
            replicator.close()
        sizes = [size for _name, size in target.list("v1/packs/")]
        started = time.perf_counter()
        receipt = router.drop("user:victim", erase=True)
        took = time.perf_counter() - started
        target.close()
    totals = receipt["totals"]
    return (f"{url.split(':')[0]:4} packs={len(sizes)} avg_pack={sum(sizes) // len(sizes)} B erase={took:.3f} s "
            f"rewritten={totals['objects_rewritten']} captures_removed={totals['captures_removed']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packs", type=int, action="append", help="packs in the replica (repeatable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("URL", "PACKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], int(args.child[1])), flush=True)
        return
    from shardlite.testing.s3 import seaweedfs

    with seaweedfs() as server:
        env = dict(os.environ)
        env.update(server.env())
        for round_ in range(args.rounds):  # alternating targets and sizes: the machine's load hits both
            for packs in args.packs or [50, 200]:
                for url in ("file://" + os.path.join(tempfile.mkdtemp(), "replica"),
                            server.url(f"erase{round_}-{packs}")):
                    subprocess.run([sys.executable, __file__, "--child", url, str(packs)], env=env, check=True)


if __name__ == "__main__":
    main()
