"""One policy for a real component a test needs and cannot have here (a browser, a PostgreSQL server, a
tmpfs mount): outside CI the test is skipped loudly, under ``CI=true`` it fails, since CI must run it all.

Loudly means three ways: the skip reason reads ``!!! <WHAT> NOT RUN: <why> !!!``; a
:class:`MissingComponentWarning` with it goes to pytest's warnings summary; and
:func:`pytest_terminal_summary` (``tests/conftest.py`` imports it as its hook) ends the run with a section
listing each such reason and how many tests it skipped, whatever the ``-r`` option says.
"""

from __future__ import annotations

import os
import warnings
from typing import NoReturn

import pytest

NOT_RUN = "NOT RUN:"
"""What every such skip reason holds (the terminal summary finds them by it)."""


class MissingComponentWarning(UserWarning):
    """A test was skipped because a real component it needs is missing here."""


def missing_component(what: str, why: str) -> NoReturn:
    """Skip the current test (or fixture) with the reason ``!!! <what> NOT RUN: <why> !!!`` and a
    :class:`MissingComponentWarning`; under ``CI=true``, fail it with that reason instead.

    ``what`` names the tests (``"POSTGRESQL TESTS"``), ``why`` says what is missing and how to get it."""
    reason = f"!!! {what} {NOT_RUN} {why} !!!"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing real component is a failure)")
    warnings.warn(MissingComponentWarning(reason), stacklevel=2)
    pytest.skip(reason)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """A closing section listing the tests :func:`missing_component` skipped, one line per reason."""
    counts: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and len(longrepr) == 3 and NOT_RUN in str(longrepr[2]):
            reason = str(longrepr[2]).removeprefix("Skipped: ")
            counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        return
    terminalreporter.section("real components missing: tests skipped", sep="!", yellow=True, bold=True)
    for reason, count in counts.items():
        terminalreporter.write_line(f"{count} test{'s' if count != 1 else ''} skipped: {reason}", yellow=True)
