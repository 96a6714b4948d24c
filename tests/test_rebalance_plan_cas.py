"""Plan-state compare-and-sets in the rebalancer (issue 15, gap F6): a plan is recorded only if no apply
started meanwhile, and ``apply``/``cancel`` notice when the plan's state changed under them instead of going
on silently.

Each race is made deterministic with a :class:`Rebalancer` subclass whose hook (``compute``,
``_current_fingerprint``, ``_cancellable``) lets a second, real rebalancer act at the worst moment.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers_rebalance import populate

from shardlite import ConfigurationError, Router
from shardlite.core.planning import Plan
from shardlite.services.rebalance import Rebalancer

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]


@pytest.fixture
def router(make_router: Any) -> Router:
    router: Router = make_router(nodes=["n1", "n2"], schema=SCHEMA)
    populate(router, 12)
    router.nodes.add("n3")
    return router


def test_a_plan_is_not_recorded_when_an_apply_starts_while_it_is_computed(router: Router) -> None:
    other = router.rebalance
    first, _ = other.plan()

    class Racing(Rebalancer):
        def compute(self) -> Plan:
            plan = super().compute()
            # The first plan starts being applied after `plan` checked there was none applying.
            assert other.journal.set_plan_state(first, "applying", only_from=("planned",)) is not False
            return plan

    with pytest.raises(ConfigurationError, match="being applied"):
        Racing(router._store).plan()
    assert other.status()["plan"] == first and other.status()["state"] == "applying"
    assert [p["id"] for p in other.plans()] == [first]


def test_apply_refuses_a_plan_superseded_while_it_was_checked(router: Router) -> None:
    other = router.rebalance
    first, plan = other.plan()
    assert plan.moves
    newer: list[int] = []

    class Racing(Rebalancer):
        def _current_fingerprint(self, plan_id: int) -> str:
            found = super()._current_fingerprint(plan_id)
            newer.append(other.plan()[0])  # supersedes the plan being applied
            return found

    with pytest.raises(ConfigurationError, match=f"plan {first} is superseded"):
        Racing(router._store).apply(first)
    assert other.status(first)["state"] == "superseded" and other.status(first)["steps"] == {"pending": len(plan.moves)}
    assert other.status(newer[0])["state"] == "planned"


def test_cancel_does_not_overwrite_a_plan_that_finished_meanwhile(router: Router) -> None:
    other = router.rebalance
    first, _ = other.plan()

    class Racing(Rebalancer):
        def _cancellable(self, plan_id: int | None) -> int:
            found = super()._cancellable(plan_id)
            other.journal.set_plan_state(found, "done")  # e.g. its last move finished meanwhile
            return found

    with pytest.raises(ConfigurationError, match=f"plan {first} is done now"):
        Racing(router._store).cancel(first, wait=0)
    assert other.status(first)["state"] == "done"


def test_two_rebalancers_applying_one_plan_work_alongside(router: Router) -> None:
    """The apply CAS loses when another rebalancer started the same plan: that one is not an error."""
    other = router.rebalance
    first, plan = other.plan()

    class Racing(Rebalancer):
        def _current_fingerprint(self, plan_id: int) -> str:
            found = super()._current_fingerprint(plan_id)
            other.journal.set_plan_state(plan_id, "applying", only_from=("planned",))
            return found

    status = Racing(router._store).apply(first)
    assert status["state"] == "done" and sum(status["steps"].values()) == len(plan.moves)
