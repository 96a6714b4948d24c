"""``shardlite replicate run`` with its S3 requests counted (``benchmarks/replication.py`` runs the
replicator through this).

Usage: ``python benchmarks/replication_counted.py COUNTS_FILE shardlite-arguments...``. It runs
``shardlite.cli.main`` with the arguments, unchanged, after wrapping ``shardlite.replica.s3._session`` so
every botocore session the S3 target makes counts the requests it sends (the ``before-send`` event, one per
HTTP request, retries included) by kind: ``PUT``, ``GET`` (object reads, ranged or not), ``LIST``, ``HEAD``,
``DELETE`` (a multi-object delete ``POST``), ``OTHER``. After each request the counts are written to
COUNTS_FILE as JSON (a temporary file renamed over it); the replicator sends at most a few requests a
second, so this costs nothing measurable.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Any

COUNTS: dict[str, int] = {"PUT": 0, "GET": 0, "LIST": 0, "HEAD": 0, "DELETE": 0, "OTHER": 0}
_LOCK = threading.Lock()


def _kind(request: Any) -> str:
    method = str(getattr(request, "method", "")).upper()
    url = str(getattr(request, "url", ""))
    if method == "GET":
        return "LIST" if "list-type=" in url or url.rstrip("/").count("/") <= 3 else "GET"
    if method == "POST" and "delete" in url:
        return "DELETE"
    return method if method in COUNTS else "OTHER"


def install(path: str) -> None:
    import shardlite.replica.s3 as s3

    original = s3._session

    def write() -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(COUNTS, f)
        os.replace(tmp, path)

    def counted(request: Any, **_kwargs: Any) -> None:
        with _LOCK:
            COUNTS[_kind(request)] += 1
            write()

    def session() -> Any:
        made = original()
        made.register("before-send.s3", counted)
        return made

    s3._session = session
    write()


def main() -> int:
    install(sys.argv[1])
    # the replicator's "slow round" lines (where a round longer than its interval went) are INFO
    logging.getLogger("shardlite.replicate").setLevel(logging.INFO)
    from shardlite.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
