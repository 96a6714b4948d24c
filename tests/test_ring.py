"""Stable routing (brief rule 2): golden vectors, PYTHONHASHSEED independence, minimal movement, weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core.keys import key_digest
from shardlite.core.placement import parse_tenant_name, tenant_relpath
from shardlite.core.ring import Ring

# Pinned once from the implementation: changing any of these silently re-routes every existing deployment.
GOLDEN_3 = {  # Ring({"n1": 1, "n2": 1, "n3": 1})
    "user:1": "n2",
    "user:2": "n3",
    "user:42": "n3",
    "org:acme": "n2",
    "dm:alice:bob": "n3",
    "chat:room:7": "n1",
    "user:\u00e9l\u00e8ve": "n1",
    "org:\u6771\u4eac": "n3",
    "a": "n3",
    "tenant:9999": "n1",
}
GOLDEN_WEIGHTED = {  # Ring({"a": 1, "b": 2, "c": 3})
    "user:1": "c",
    "user:2": "c",
    "user:42": "b",
    "org:acme": "c",
    "dm:alice:bob": "a",
    "chat:room:7": "a",
    "user:\u00e9l\u00e8ve": "a",
    "org:\u6771\u4eac": "c",
    "a": "c",
    "tenant:9999": "c",
}
GOLDEN_DIGESTS = {  # xxh3-128 of the UTF-8 canonical key: names every tenant file
    "user:1": "b3ce4d642bd86c75568dc3fbb5023b0c",
    "user:2": "aff6584f3bf0d8d7714c3ff9c80e7657",
    "user:42": "8763cfe7e8dd227b54c6a0eba0ce373f",
    "org:acme": "f960dac60b9a241e1d090f0925f726bd",
    "dm:alice:bob": "ff699b81c8f84bc3106cb80c1af148d1",
    "chat:room:7": "6042cf28256fe1b44ae940d5a4e78916",
    "user:\u00e9l\u00e8ve": "cded246a8639a99820c911d970ecc3ff",
    "org:\u6771\u4eac": "57073ffc0d2e318738bd432fb5c720cc",
    "a": "a96faf705af16834e6c632b61e964e1f",
    "tenant:9999": "65001f24e159a2c4401226eb9bc6f334",
}
THREE = {"n1": 1, "n2": 1, "n3": 1}


def test_golden_ring_vectors() -> None:
    ring = Ring(THREE)
    assert {k: ring.node_for(k) for k in GOLDEN_3} == GOLDEN_3
    weighted = Ring({"a": 1, "b": 2, "c": 3})
    assert {k: weighted.node_for(k) for k in GOLDEN_WEIGHTED} == GOLDEN_WEIGHTED


def test_golden_digests_and_paths() -> None:
    assert {k: key_digest(k) for k in GOLDEN_DIGESTS} == GOLDEN_DIGESTS
    digest = GOLDEN_DIGESTS["user:1"]
    assert tenant_relpath("user:1", 7) == f"{digest[:2]}/{digest}.7.db"
    assert parse_tenant_name(f"{digest}.7.db") == (digest, 7)
    assert parse_tenant_name(f"{digest}.7.db-wal") is None
    assert parse_tenant_name("../x.1.db") is None
    with pytest.raises(ValueError):
        tenant_relpath("user:1", 0)


def test_ring_ignores_insertion_order() -> None:
    a = Ring({"n1": 1, "n2": 1, "n3": 1})
    b = Ring({"n3": 1, "n1": 1, "n2": 1})
    keys = [f"k:{i}" for i in range(2000)]
    assert [a.node_for(k) for k in keys] == [b.node_for(k) for k in keys]


def test_router_proposals_match_golden_vectors(make_router: Any) -> None:
    router = make_router(nodes=["n1", "n2", "n3"])
    for key, node in GOLDEN_3.items():
        loc = router.locate(key)
        assert (loc.state, loc.path, loc.node) == ("absent", None, node)


_CHILD = textwrap.dedent(
    """
    import json, sys
    from shardlite import Router
    from shardlite.core.keys import key_digest
    from shardlite.core.ring import Ring
    keys = json.loads(sys.argv[1])
    ring = Ring({"n1": 1, "n2": 1, "n3": 1})
    with Router(sys.argv[2]) as router:
        located = {k: router.locate(k).node for k in keys}
    print(json.dumps({"ring": {k: ring.node_for(k) for k in keys},
                      "digest": {k: key_digest(k) for k in keys},
                      "located": located,
                      "hash_of_probe": hash("probe")}))
    """
)


def test_routing_is_identical_whatever_pythonhashseed(make_router: Any, root: str) -> None:
    make_router(nodes=["n1", "n2", "n3"]).close()  # create the 3-node root once
    keys = list(GOLDEN_3) + [f"user:{i}" for i in range(300)] + ["dm:\u00e9:\u6771", "org:\U0001f600"]
    outputs = []
    for seed in ("0", "1", "random", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(keys), root], env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    # the children really had different str hashes (otherwise the test proves nothing)
    assert len({o["hash_of_probe"] for o in outputs}) > 1
    first = outputs[0]
    for other in outputs[1:]:
        assert other["ring"] == first["ring"]
        assert other["digest"] == first["digest"]
        assert other["located"] == first["located"]
    assert first["located"] == first["ring"]
    here = Ring(THREE)
    assert first["ring"] == {k: here.node_for(k) for k in keys}
    assert {k: first["ring"][k] for k in GOLDEN_3} == GOLDEN_3
    assert set(first["ring"].values()) == {"n1", "n2", "n3"}


node_names = st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_."), min_size=1, max_size=10)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(node_names, min_size=2, max_size=9, unique=True), salt=st.integers(0, 10**9))
def test_adding_a_node_moves_about_one_share_all_onto_it(names: list[str], salt: int) -> None:
    *old_names, new = names
    n = len(old_names)
    before = Ring({name: 1 for name in old_names})
    after = Ring({name: 1 for name in names})
    keys = [f"t{salt}:{i}" for i in range(5000)]
    moved = [k for k in keys if before.node_for(k) != after.node_for(k)]
    assert all(after.node_for(k) == new for k in moved), "a key moved between two old nodes"
    assert all(before.node_for(k) != new for k in keys)
    fraction = len(moved) / len(keys)
    expected = 1 / (n + 1)
    # 160 vnodes per node: the share's spread is ~8% of the expected share; allow ~6 sigma.
    assert abs(fraction - expected) <= 0.5 * expected, (n, fraction, expected)


@settings(max_examples=40, deadline=None)
@given(names=st.lists(node_names, min_size=2, max_size=6, unique=True), salt=st.integers(0, 10**9))
def test_removing_a_node_only_moves_its_own_keys(names: list[str], salt: int) -> None:
    full = Ring({name: 1 for name in names})
    gone = names[0]
    smaller = Ring({name: 1 for name in names[1:]})
    for i in range(2000):
        key = f"r{salt}:{i}"
        if full.node_for(key) != gone:
            assert smaller.node_for(key) == full.node_for(key)


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 4), min_size=2, max_size=5), salt=st.integers(0, 10**9))
def test_weights_are_roughly_proportional(weights: list[int], salt: int) -> None:
    ring = Ring({f"node{i}": w for i, w in enumerate(weights)})
    keys = [f"w{salt}:{i}" for i in range(8000)]
    counts = Counter(ring.node_for(k) for k in keys)
    total = sum(weights)
    for i, w in enumerate(weights):
        expected = w / total
        share = counts[f"node{i}"] / len(keys)
        assert abs(share - expected) <= 0.45 * expected, (weights, i, share, expected)


def test_heavier_node_gets_more_keys() -> None:
    ring = Ring({"small": 1, "big": 4})
    counts = Counter(ring.node_for(f"k:{i}") for i in range(5000))
    assert counts["big"] > 3 * counts["small"]


@pytest.mark.parametrize("weights", [{}, {"n1": 0}, {"n1": -1}, {"n1": 1.5}])
def test_ring_rejects_bad_weights(weights: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Ring(weights)
