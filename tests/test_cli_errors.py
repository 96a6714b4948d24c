"""Every error of the CLI is one line on stderr that says what to do, with exit status 2 (argparse's own
usage errors: its usage line and one error line, also 2), never a traceback; Ctrl-C is one line and 130.
Bad roots, bad JSON, bad keys, malformed manifests, bad files and unknown commands and options, run
in-process; a few again through the installed console script; Ctrl-C through a real SIGINT."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest
from helpers_cli import EMAIL, SCHEMA, leaves, populated_root, run_script, shardlite_command
from helpers_routers import run_cli

from shardlite import Router
from shardlite.cli import build_parser, walk

DEADLINE = 60.0  # generous bound for waiting loops; never a timing assertion


class Scene:
    """A populated root, a backup of it, a regular file, a missing directory."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.root = populated_root(tmp_path / "root")
        self.backup = tmp_path / "backup"
        with Router(self.root, schema=SCHEMA) as router:
            router.backup(self.backup)
            router.export("acct:1", tmp_path / "acct1.db")
        self.file = tmp_path / "a-file"
        self.file.write_text("not a directory")
        self.missing = tmp_path / "missing" / "root"

    def fill(self, argv: list[str]) -> list[str]:
        return [arg.format(root=self.root, backup=self.backup, file=self.file, missing=self.missing, tmp=self.tmp)
                for arg in argv]


@pytest.fixture
def scene(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Scene:
    monkeypatch.delenv("SHARDLITE_ROOT", raising=False)
    return Scene(tmp_path)


def assert_one_line_error(code: int, out: str, err: str) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    if lines and lines[0].startswith("usage:"):  # argparse: its usage, then one error line
        assert lines[-1].startswith("shardlite") and ": error: " in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("shardlite "), err
    for ch in ("\x1b", "\u202e", "\x9b", "\u2028"):
        assert ch not in err


BAD = {
    # roots
    "init into a regular file": ["init", "--root", "{file}"],
    "init under a regular file": ["init", "--root", "{file}/sub"],
    "status of a regular file": ["status", "--root", "{file}"],
    "restore into a regular file": ["restore", "{backup}", "--root", "{file}"],
    "no root at all": ["status"],
    "an empty root": ["status", "--root", ""],
    "two roots": ["--root", "{root}", "status", "--root", "{tmp}"],
    # JSON
    "params: not JSON": ["query", "--key", "acct:1", "SELECT ?", "--params", "[1"],
    "params: not a list": ["query", "--key", "acct:1", "SELECT ?", "--params", '"one"'],
    "params: infinity": ["query", "--key", "acct:1", "SELECT ?", "--params", "1e999999"],
    "params: too deep": ["query", "--key", "acct:1", "SELECT ?", "--params", "[" * 100_000],
    # keys
    "locate: a bidi override": ["locate", "acct:\u202e1"],
    "locate: an escape sequence": ["locate", "acct:\x1b[2J"],
    "locate: empty": ["locate", ""],
    "locate: too long": ["locate", "acct:" + "x" * 600],
    "drop: a zero-width space": ["tenants", "drop", "acct:\u200b1"],
    "drop: unknown": ["tenants", "drop", "acct:404"],
    "query: a bidi override": ["query", "--key", "acct:\u202e1", "SELECT 1"],
    "restore: a bidi override": ["restore", "{backup}", "--key", "acct:\u202e1"],
    "export: a C1 control": ["tenants", "export", "acct:\x9b1", "{tmp}/out.db"],
    # files
    "import: a missing file": ["tenants", "import", "{tmp}/nothing.db", "acct:9"],
    "import: not SQLite": ["tenants", "import", "{file}", "acct:9"],
    "export: over an existing file": ["tenants", "export", "acct:1", "{file}"],
    "export: into a missing directory": ["tenants", "export", "acct:1", "{tmp}/nowhere/out.db"],
    "backup: into the root": ["backup", "{root}/inside"],
    "backup: onto a regular file": ["backup", "{file}"],
    "restore: a regular file": ["restore", "{file}"],
    "restore: a directory without a manifest": ["restore", "{tmp}"],
    "restore: a missing directory": ["restore", "{tmp}/nope"],
    # arguments the commands check
    "accounts: unknown": ["accounts", "show", "nobody@example.org"],
    "accounts: not an address": ["accounts", "show", "\x1b[31m"],
    "migrate: not module:attr": ["migrate", "--app", "nocolon"],
    "migrate: no such module": ["migrate", "--app", "no_such_module_here:x"],
    "migrate: not a router": ["migrate", "--app", "os:getcwd"],
    "nodes: a bad name": ["nodes", "add", "../x"],
    "nodes: a bad weight": ["nodes", "add", "n9", "--weight", "0"],
    "init: a bad node name": ["init", "--root", "{tmp}/fresh", "--nodes", "a b"],
    "restore: --as without --key": ["restore", "{backup}", "--as", "acct:9"],
    "restore: a bad --node-path": ["restore", "{backup}", "--root", "{tmp}/fresh", "--node-path", "n1"],
    "query: a write": ["query", "--key", "acct:1", "DELETE FROM t"],
    "query: bad parallel": ["query", "--all", "SELECT 1", "--parallel", "0"],
    "backup: bad parallel": ["backup", "{tmp}/b2", "--parallel", "0"],
    "rebalance: nothing to apply": ["rebalance", "apply", "--yes"],
    # usage errors (argparse)
    "an unknown command": ["bogus"],
    "an unknown option": ["status", "--bogus"],
    "an unknown action": ["nodes", "bogus"],
    "a missing action": ["rebalance"],
    "a missing argument": ["locate"],
    "not a number": ["tenants", "--limit", "many"],
    "no command": [],
    "an escape in an unknown argument": ["status", "\x1b]0;title\x07"],
}
NEEDS_ROOT = {"status of a regular file", "restore into a regular file", "no root at all", "an empty root",
              "two roots", "init into a regular file", "init under a regular file", "init: a bad node name",
              "restore: a bad --node-path"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arguments_and_inputs_are_one_line_and_exit_2(case: str, scene: Scene,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = scene.fill(BAD[case])
    if case not in NEEDS_ROOT and "--root" not in argv and argv and argv[0] != "bogus":
        argv += ["--root", scene.root]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, out, err)
    with Router(scene.root, create=False, schema=SCHEMA) as router:  # nothing happened to the root
        assert sorted(router.tenants()) == ["acct:1", "acct:2", "victim:1"]


MANIFESTS: dict[str, Callable[[dict[str, object]], bytes]] = {
    "truncated": lambda m: json.dumps(m).encode()[:40],
    "a list": lambda m: b"[]",
    "another format": lambda m: json.dumps(m | {"format": 2}).encode(),
    "a duplicate field": lambda m: b'{"format": 1, "format": 1, "tenants": {}, "global": {}}',
    "a huge integer": lambda m: b'{"format": 1' + b"0" * 5000 + b"}",
    "deep nesting": lambda m: b"[" * 100_000,
    "not UTF-8": lambda m: b'{"format": "\xff"}',
    "a NaN": lambda m: json.dumps(m | {"created": float("nan")}).encode(),
    "a key with a bidi override": lambda m: json.dumps(m | {"tenants": {"acct:\u202e": {}}}).encode(),
    "a file outside": lambda m: json.dumps(m | {"global": {"file": "../global.db", "checksum": "0" * 32}}).encode(),
    "empty": lambda m: b"",
}


@pytest.mark.parametrize("into", ["the live root", "a new root", "a backup over it"])
@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_a_malformed_manifest_is_one_line(case: str, into: str, scene: Scene,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = scene.backup / "manifest.json"
    path.write_bytes(MANIFESTS[case](json.loads(path.read_text())))
    new = scene.tmp / "new"
    argv = {"the live root": ["restore", os.fspath(scene.backup), "--root", scene.root],
            "a new root": ["restore", os.fspath(scene.backup), "--root", os.fspath(new)],
            "a backup over it": ["backup", os.fspath(scene.backup), "--root", scene.root]}[into]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, out, err)
    assert "manifest" in err and not new.exists()


def test_a_manifest_that_is_a_directory_or_a_symlink_is_one_line(scene: Scene,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = scene.backup / "manifest.json"
    path.unlink()
    path.mkdir()
    code, out, err = run_cli(capsys, "restore", os.fspath(scene.backup), "--root", os.fspath(scene.tmp / "new"))
    assert_one_line_error(code, out, err)
    path.rmdir()
    path.symlink_to(scene.tmp / "elsewhere.json")
    code, out, err = run_cli(capsys, "restore", os.fspath(scene.backup), "--root", scene.root)
    assert_one_line_error(code, out, err)


def test_a_root_that_is_not_a_data_root_is_one_line_for_every_command(scene: Scene,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Every command but `init` (which creates it), `restore` (which fills it), `meta roots`/`forget` (a
    database's, not a root's) and those taking the root of an ``--app`` against a missing directory;
    arguments are placeholders read from the parser."""
    parser = build_parser()
    parsers = {path: each for _depth, path, each in walk(parser)}
    checked = 0
    for path in leaves(parser):
        takes_app = any("--app" in action.option_strings for action in parsers[path]._actions)
        if path in (("init",), ("restore",), ("meta", "roots"), ("meta", "forget")) or takes_app:  # no root used
            continue
        argv = [*path, *_placeholders(parsers[path]), "--root", os.fspath(scene.missing)]
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, out, err)
        assert "no shardlite data root" in err and "shardlite init" in err, (argv, err)
        checked += 1
    assert checked >= 20
    assert not scene.missing.exists()


def _placeholders(parser: argparse.ArgumentParser) -> list[str]:
    """Values for ``parser``'s required arguments: a key-like word for each, the first choice of each
    required group."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            argv.append("acct:1")
        elif action.required:
            argv += [action.option_strings[0], "acct:1"]
    for group in parser._mutually_exclusive_groups:
        if group.required:
            first = group._group_actions[0]
            argv += [first.option_strings[0]] + ([] if first.nargs == 0 else ["acct:1"])
    return argv


def test_the_console_script_exits_2_with_one_line(scene: Scene) -> None:
    for argv in (["init", "--root", os.fspath(scene.file)],
                 ["--root", scene.root, "query", "--key", "acct:1", "SELECT ?", "--params", "{oops"],
                 ["restore", os.fspath(scene.tmp), "--root", os.fspath(scene.tmp / "new")],
                 ["--root", scene.root, "locate", "acct:\u202e1"]):
        proc = run_script(*argv)
        assert_one_line_error(proc.returncode, proc.stdout, proc.stderr)


def test_ctrl_c_is_one_line_and_exit_130(scene: Scene, tmp_path: Path) -> None:
    """`relay run --once` waiting out a retry that is a minute away, interrupted by a real SIGINT."""
    (tmp_path / "slowapp.py").write_text(
        "import os\n"
        "from shardlite import Router\n"
        "from shardlite.core.outbox import RetryPolicy\n"
        "def make():\n"
        f"    router = Router({scene.root!r}, schema={SCHEMA!r}, retry=RetryPolicy(backoff_base=60, backoff_cap=60))\n"
        "    router.handler('note')(lambda tx, event: 1 / 0)\n"
        "    return router\n")
    with Router(scene.root, schema=SCHEMA) as router:
        with router.transaction("acct:1") as tx:
            tx.emit("acct:2", "note", {"n": 1})
    proc = subprocess.Popen([*shardlite_command(), "relay", "run", "--app", "slowapp:make", "--once"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "SHARDLITE_ROOT"})
    try:
        end = time.monotonic() + DEADLINE
        while _attempts(scene.root, "acct:1") < 1:  # the first attempt failed: now it waits for the retry
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("shardlite ")]
    assert line.startswith("shardlite relay run: interrupted")


def _attempts(root: str, key: str) -> int:
    with Router(root, create=False) as router:
        path = router.locate(key).path
    assert path is not None
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT max(attempts) FROM _shardlite_outbox").fetchall()
    finally:
        conn.close()
    return int(rows[0][0] or 0)


def test_an_account_that_exists_is_no_error(scene: Scene, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "accounts", "show", EMAIL, "--root", scene.root, "--json")
    assert code == 0 and json.loads(out)["email"] == EMAIL


def test_a_warning_is_one_line_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    code, out, err = run_cli(capsys, "init", "--root", os.fspath(shared))
    assert code == 0 and out.startswith("created data root")
    (line,) = err.splitlines()
    assert line.startswith("shardlite init: warning: ") and "0755" in line and "chmod 0700" in line
