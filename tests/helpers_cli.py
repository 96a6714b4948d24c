"""Helpers shared by the CLI tests (``test_cli_*.py``): the command tree read from the real parser, a
populated data root, an importable ``--app`` module, and the console script run as a subprocess."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from shardlite import Router
from shardlite.cli import build_parser, walk

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
KEYS = ["acct:1", "acct:2", "victim:1"]
EMAIL = "someone@example.org"


def leaves(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, ...]]:
    """Every runnable command path of the CLI (``("status",)``, ``("tenants",)``, ``("tenants", "drop")``),
    read from the parser: the parsers that name a function to run."""
    parser = parser or build_parser()
    return [path for _depth, path, each in walk(parser) if path and each.get_default("func") is not None]


def populated_root(path: Path, *, nodes: Sequence[str] = ("n1", "n2"), spare: bool = False) -> str:
    """A data root at ``path`` with the tenants :data:`KEYS` (two rows each in ``t``) and an account;
    with ``spare`` an extra node ``spare`` (weight 100) added after the tenants were placed: it holds none,
    and a rebalance plan moves tenants there. Closed."""
    with Router(path, nodes=list(nodes), schema=SCHEMA) as router:
        for key in KEYS:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(v) VALUES (?), (?)", (f"{key}/a", f"{key}/b"))
        router.accounts.register(EMAIL, name="Someone")
        if spare:
            router.nodes.add("spare", weight=100)  # a plan moves most tenants there
        return router.root


def app_module(directory: Path, name: str, root_env: str) -> str:
    """Write ``<directory>/<name>.py`` whose ``make()`` returns a Router (schema :data:`SCHEMA`) on the root
    named by the environment variable ``root_env``; returns ``name:make`` for ``--app``."""
    (directory / f"{name}.py").write_text(
        "import os\n"
        "from shardlite import Router\n"
        f"SCHEMA = {SCHEMA!r}\n"
        "def make():\n"
        f"    return Router(os.environ[{root_env!r}], schema=SCHEMA)\n")
    return f"{name}:make"


def shardlite_command() -> list[str]:
    """The installed console script when there is one next to this Python, else ``python -m shardlite``."""
    script = Path(sys.executable).with_name("shardlite")
    return [os.fspath(script)] if script.exists() else [sys.executable, "-m", "shardlite"]


def run_script(*argv: str, env: dict[str, str] | None = None, cwd: Path | None = None,
               timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``shardlite argv...`` in a subprocess: its exit code, stdout and stderr."""
    full = dict(os.environ)
    full.pop("SHARDLITE_ROOT", None)
    full.update(env or {})
    return subprocess.run([*shardlite_command(), *argv], capture_output=True, text=True, env=full, cwd=cwd,
                          timeout=timeout, check=False)
