"""The path a new user takes, through the installed ``shardlite`` console script in subprocesses: init,
status, tenants written from Python, backup, the root lost, restore into a new root, a query over all
tenants; and hostile text printed literally on the way."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from helpers_cli import run_script

from shardlite import Router

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
ROWS = {"user:1": 3, "user:2": 1, "org:acme": 5, "acct:[/]": 2, "acct:[bold]loud": 1}
HOSTILE = "\x1b]0;pwned\x07\x9b31m\u202e\u2028end"


def test_init_status_backup_restore_into_a_new_root_query(tmp_path: Path) -> None:
    root, backup, new = tmp_path / "R", tmp_path / "B", tmp_path / "R2"
    env = {"COLUMNS": "200"}

    done = run_script("--root", os.fspath(root), "init", env=env)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout == f"created data root {root} with nodes: n1\n"

    done = run_script("--root", os.fspath(root), "--json", "status", env=env)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["root"] == os.fspath(root) and [n["name"] for n in status["nodes"]] == ["n1"]
    assert status["tenants_per_node"] == {"n1": 0}

    with Router(root, schema=SCHEMA) as router:
        for key, count in ROWS.items():
            with router.transaction(key) as tx:
                for n in range(count):
                    tx.execute("INSERT INTO t(v) VALUES (?)", (f"{HOSTILE} {n}",))

    done = run_script("--root", os.fspath(root), "backup", os.fspath(backup), env=env)
    assert done.returncode == 0, done.stderr
    assert f"backed up {len(ROWS)} tenants" in done.stdout
    shutil.rmtree(root)

    done = run_script("restore", os.fspath(backup), "--root", os.fspath(new), env=env)
    assert done.returncode == 0, done.stderr
    assert f"created data root {new} with the backup's node layout (1 node)" in done.stdout
    assert f"restored {len(ROWS)} tenants" in done.stdout and "restored the global data" in done.stdout

    done = run_script("--root", os.fspath(new), "query", "--all", "SELECT count(*) FROM t", env=env)
    assert done.returncode == 0, done.stderr
    assert f"{len(ROWS)} tenants" in done.stdout
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in done.stdout.splitlines() if "│" in line]
    assert sorted(cells) == sorted([key, str(count)] for key, count in ROWS.items())

    done = run_script("--root", os.fspath(new), "query", "--all", "SELECT count(*) FROM t", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert {obj["key"]: obj["rows"][0][0] for obj in map(json.loads, done.stdout.splitlines())} == ROWS

    # hostile text on the way: keys with markup, rows with escape sequences
    done = run_script("tenants", "--root", os.fspath(new), env=env)
    assert done.returncode == 0, done.stderr
    assert "acct:[/]" in done.stdout and "acct:[bold]loud" in done.stdout
    done = run_script("--root", os.fspath(new), "query", "--key", "acct:[/]", "SELECT v FROM t ORDER BY id",
                      env=env)
    assert done.returncode == 0, done.stderr
    assert "\\x1b]0;pwned\\x07\\x9b31m\\u202e\\u2028end 0" in done.stdout
    for raw in ("\x1b", "\x07", "\x9b", "\u202e", "\u2028"):
        assert raw not in done.stdout
    done = run_script("--root", os.fspath(new), "--json", "query", "--key", "acct:[/]", "SELECT v FROM t", env=env)
    assert [row[0] for row in json.loads(done.stdout)["rows"]] == [f"{HOSTILE} 0", f"{HOSTILE} 1"]
    assert "\u2028" not in done.stdout and "\x9b" not in done.stdout

    done = run_script("--root", os.fspath(new), "locate", "acct:\u202e1", env=env)  # and errors: one line
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
