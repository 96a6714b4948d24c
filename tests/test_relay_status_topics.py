"""``relay.status()`` reads each pending source once (its events per topic and the oldest one's time in one
statement): the totals, the per-topic counts, the per-node counts and the lag agree with what was emitted,
over both metadata backends."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from shardlite import Router

pytestmark = pytest.mark.usefixtures("any_meta")  # both metadata backends


def test_status_counts_every_topic_of_every_source(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=[])
    before = time.time()
    with router.transaction("src:1") as tx:
        tx.emit("dst:1", "a", {"n": 1})
        tx.emit("dst:2", "b", {"n": 2})
        tx.emit("dst:1", "a", {"n": 3})
    with router.transaction("src:2") as tx:
        tx.emit("dst:1", "b", {"n": 4})
    status = router.relay.status()  # no handler and no relay running: everything stays pending
    assert status["pending"] == 4
    assert status["topics"] == {"a": 2, "b": 2}
    assert sorted(status["unhandled_topics"]) == ["a", "b"]
    nodes = status["nodes"]
    assert sum(entry["pending"] for entry in nodes.values()) == 4
    assert sum(entry["sources"] for entry in nodes.values()) == 2
    assert 0.0 <= status["oldest_age"] <= time.time() - before + 1.0
