"""Contention between threads for the conformance tests: :func:`race`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def race(n: int, body: Callable[[int], Any]) -> list[Any]:
    """Run ``body(i)`` for ``i`` in ``range(n)`` on ``n`` threads released together by a barrier; each
    result, or the exception it raised, in order."""
    gate = threading.Barrier(n)
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        gate.wait()
        try:
            results[i] = body(i)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
