"""The one retry policy of Router.run and AsyncRouter.run (shardlite.core.retrying)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import shardlite
from shardlite import Busy, TenantMoving
from shardlite.core.retrying import CAP, FIRST, Backoff


@given(seed=st.integers(0, 2**32), budget=st.floats(0.0, 5.0), start=st.floats(0.0, 1e6))
def test_pauses_double_with_jitter_and_never_pass_the_deadline(seed: int, budget: float, start: float) -> None:
    backoff = Backoff(start + budget, rng=random.Random(seed))
    now, base, pauses = start, FIRST, []
    while (pause := backoff.pause(now)) is not None:
        assert 0.5 * base <= pause < 1.5 * base, (pause, base)
        base = min(base * 2, CAP)
        now += pause
        pauses.append(pause)
        assert len(pauses) < 10_000
    assert now <= start + budget  # every pause ends before the deadline
    assert len(pauses) >= (1 if budget >= 1.5 * FIRST else 0)


def test_jitter_spreads_processes_that_failed_together() -> None:
    firsts = {Backoff(10.0, rng=random.Random(seed)).pause(0.0) for seed in range(20)}
    assert len(firsts) == 20


def test_no_pause_once_the_deadline_has_passed() -> None:
    assert Backoff(1.0).pause(1.0) is None
    assert Backoff(1.0).pause(2.0) is None


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    """Every pause either run() loop asked the policy for (a spy over the real Backoff.pause)."""
    seen: list[float | None] = []
    real = Backoff.pause

    def spy(self: Backoff, now: float) -> float | None:
        seen.append(real(self, now))
        return seen[-1]

    monkeypatch.setattr(Backoff, "pause", spy)
    return seen


def flaky(failures: list[type[Exception]]) -> Any:
    def fn(tx: Any) -> str:
        if failures:
            raise failures.pop(0)("simulated")
        return "done"
    return fn


def test_both_run_loops_retry_through_the_same_policy(root: str, pauses: list[float | None]) -> None:
    with shardlite.Router(root) as router:
        assert router.run("user:1", flaky([Busy, TenantMoving])) == "done"
    sync_pauses = list(pauses)
    pauses.clear()

    async def main() -> str:
        async with shardlite.AsyncRouter(root) as ar:
            return await ar.run("user:1", flaky([TenantMoving, Busy]))

    assert asyncio.run(main()) == "done"
    assert len(sync_pauses) == len(pauses) == 2
    for pause in (*sync_pauses, *pauses):
        assert pause is not None and 0.5 * FIRST <= pause < 3 * FIRST


def test_both_run_loops_give_up_with_the_last_error(root: str, pauses: list[float | None]) -> None:
    with shardlite.Router(root) as router:
        with pytest.raises(TenantMoving):
            router.run("user:1", flaky([TenantMoving] * 10_000), timeout=0.0)
    assert pauses == [None]
    pauses.clear()

    async def main() -> None:
        async with shardlite.AsyncRouter(root) as ar:
            await ar.run("user:1", flaky([Busy] * 10_000), timeout=0.0)

    with pytest.raises(Busy):
        asyncio.run(main())
    assert pauses == [None]


def test_other_errors_are_not_retried(root: str, pauses: list[float | None]) -> None:
    with shardlite.Router(root) as router:
        with pytest.raises(ValueError):
            router.run("user:1", flaky([ValueError]))
    assert pauses == []
