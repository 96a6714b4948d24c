"""The options every command shares (``--root``, ``--json``) mean the same wherever they are given:
before the subcommand, after it, after a nested action, at the end. The commands come from the parser
itself; every one runs against a root B given with ``--root`` while ``SHARDLITE_ROOT`` names a root A.
Also: every command and option has help text, and the README's CLI section names every command."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import EMAIL, KEYS, SCHEMA, app_module, leaves, populated_root
from helpers_rebalance import faulting
from helpers_routers import run_cli

from shardlite import Router
from shardlite.cli import SHARED, build_parser, walk

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclass
class Run:
    """One run of a command: its root (a fresh copy of the template), the files it may use."""

    root: str
    dir: Path
    backup: str
    export: str
    app: str


@dataclass
class Sample:
    """How to run a command against a populated root: its arguments (without the shared options), what
    to set up first (on a Router of the root), what its JSON output and the root must show afterwards."""

    args: Callable[[Run], list[str]]
    setup: Callable[[Router], Any] | None = None
    check: Callable[[Run, list[Any], Router], bool] = field(default=lambda run, out, router: True)


def _plan(router: Router) -> None:
    router.rebalance.plan()


def _interrupted_apply(router: Router) -> None:
    plan_id, _ = router.rebalance.plan()
    router.rebalance.fault = faulting("copied")
    router.rebalance.apply(plan_id)  # the move fails and is undone; the plan stays applying
    router.rebalance.fault = None


def _applied(router: Router) -> None:
    plan_id, _ = router.rebalance.plan()
    router.rebalance.apply(plan_id)


def _replicated(router: Router) -> None:
    """Record a directory replica for the root (the first router that names one records it)."""
    Router(router.root, create=False, replicate="file://" + router.root + "-replica").close()


def _nodes(router: Router) -> list[str]:
    return [n.name for n in router.nodes.list()]


#: Every command of the CLI (the test checks this covers exactly what the parser has).
SAMPLES: dict[tuple[str, ...], Sample] = {
    ("init",): Sample(lambda r: [], check=lambda r, out, router: out == [
        {"root": r.root, "nodes": ["n1", "n2", "spare"], "created": False,
         "meta": f"sqlite:{os.path.join(r.root, 'global.db')}", "replicate": None}]),
    ("status",): Sample(lambda r: [], check=lambda r, out, router: out[0]["root"] == r.root),
    ("locate",): Sample(lambda r: ["victim:1"], check=lambda r, out, router: out[0]["path"].startswith(r.root)),
    ("tenants",): Sample(lambda r: [], check=lambda r, out, router: [o["key"] for o in out] == KEYS),
    ("tenants", "drop"): Sample(lambda r: ["victim:1"], check=lambda r, out, router: not router.exists("victim:1")),
    ("tenants", "export"): Sample(lambda r: ["victim:1", os.fspath(r.dir / "out.db")],
                                  check=lambda r, out, router: (r.dir / "out.db").is_file()),
    ("tenants", "import"): Sample(lambda r: [r.export, "new:1"],
                                  check=lambda r, out, router: router.query("new:1", "SELECT count(*) FROM t")
                                  == [(2,)]),
    ("migrate",): Sample(lambda r: ["--app", r.app], check=lambda r, out, router: out[0]["failed"] == {}),
    ("nodes", "list"): Sample(lambda r: [], check=lambda r, out, router: [o["name"] for o in out] == _nodes(router)),
    ("nodes", "add"): Sample(lambda r: ["n9"], check=lambda r, out, router: "n9" in _nodes(router)),
    ("nodes", "remove"): Sample(lambda r: ["spare", "--yes"],
                                check=lambda r, out, router: _nodes(router) == ["n1", "n2"]),
    ("rebalance", "plan"): Sample(lambda r: [],
                                  check=lambda r, out, router: router.rebalance.status()["state"] == "planned"),
    ("rebalance", "apply"): Sample(lambda r: ["--yes"], setup=_plan,
                                   check=lambda r, out, router: router.rebalance.status()["state"] == "done"),
    ("rebalance", "status"): Sample(lambda r: [], setup=_plan,
                                    check=lambda r, out, router: out[0]["state"] == "planned"),
    ("rebalance", "resume"): Sample(lambda r: [], setup=_interrupted_apply,
                                    check=lambda r, out, router: router.rebalance.status()["state"] == "done"),
    ("rebalance", "cancel"): Sample(lambda r: [], setup=_plan,
                                    check=lambda r, out, router: router.rebalance.status()["state"] == "cancelled"),
    ("rebalance", "complete"): Sample(lambda r: [], setup=_applied,
                                      check=lambda r, out, router: out[0]["state"] == "completed"),
    ("relay", "run"): Sample(lambda r: ["--app", r.app, "--once"], check=lambda r, out, router: out[0]["dead"] == 0),
    ("relay", "status"): Sample(lambda r: [], check=lambda r, out, router: out[0]["pending"] == 0),
    ("relay", "dead"): Sample(lambda r: []),
    ("relay", "retry"): Sample(lambda r: [], check=lambda r, out, router: out == [{"requeued": 0}]),
    ("replicate", "run"): Sample(lambda r: ["--once"], setup=_replicated,
                                 check=lambda r, out, router: sum(
                                     n["captured"] for n in out[0]["nodes"].values()) == len(KEYS)),
    ("replicate", "status"): Sample(lambda r: [], setup=_replicated,
                                    check=lambda r, out, router: out[0]["target"] == "file://" + r.root + "-replica"),
    ("replicate", "retention"): Sample(lambda r: ["--prefix", "dm:", "30d"], setup=_replicated,
                                       check=lambda r, out, router: out == [{"default": "7d",
                                                                             "prefixes": {"dm:": "30d"}}]),
    ("replicate", "compact"): Sample(lambda r: [], setup=_replicated,
                                     check=lambda r, out, router: out[0]["deleted_packs"] == 0),
    ("replicate", "adopt"): Sample(lambda r: [], setup=_replicated,
                                   check=lambda r, out, router: out[0]["adopted"] is None),
    ("accounts", "show"): Sample(lambda r: [EMAIL], check=lambda r, out, router: out[0]["email"] == EMAIL),
    ("sessions", "purge"): Sample(lambda r: [], check=lambda r, out, router: out == [{"purged": 0}]),
    ("backup",): Sample(lambda r: [os.fspath(r.dir / "backup")],
                        check=lambda r, out, router: (r.dir / "backup" / "manifest.json").is_file()),
    ("restore",): Sample(lambda r: [r.backup, "--key", "victim:1", "--force"],
                         check=lambda r, out, router: out == [{"restored": ["victim:1"]}]
                         and router.locate("victim:1").generation > len(KEYS)),
    ("query",): Sample(lambda r: ["--key", "victim:1", "SELECT count(*) FROM t"],
                       check=lambda r, out, router: out[0]["rows"] == [[2]]),
    ("meta", "show"): Sample(lambda r: [], check=lambda r, out, router: out == [
        {"root": r.root, "backend": "sqlite", "location": "sqlite", "root_id": None}]),
}

#: Commands that need a PostgreSQL server: their options are tested where one is started
#: (tests/test_meta_copy.py, tests/test_cli_meta_roots.py), not here.
NEEDS_SERVER = {("meta", "copy"), ("meta", "roots"), ("meta", "forget")}


def positions(path: tuple[str, ...], args: list[str]) -> list[int]:
    """Where the shared options may go in ``[*path, *args]``: before the command, after each word of the
    command path (so after the subcommand and after a nested action), and at the end."""
    return sorted({*range(len(path) + 1), len(path) + len(args)})


def test_the_samples_cover_every_command_of_the_parser() -> None:
    found = leaves()
    assert set(SAMPLES) | NEEDS_SERVER == set(found), "add a Sample for each new command (drop removed ones)"
    assert ("tenants", "drop") in found and ("rebalance", "resume") in found and ("status",) in found


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("template")
    root = populated_root(base / "root", spare=True)
    with Router(root, schema=SCHEMA) as router:
        router.backup(base / "backup")
        router.export("victim:1", base / "victim.db")
    return {"root": root, "backup": os.fspath(base / "backup"), "export": os.fspath(base / "victim.db")}


@pytest.mark.parametrize("path", sorted(SAMPLES), ids=" ".join)
def test_root_and_json_act_on_the_given_root_in_every_position(
        path: tuple[str, ...], template: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = tmp_path / "A"  # SHARDLITE_ROOT: a root no command may use (or create)
    monkeypatch.setenv("SHARDLITE_ROOT", os.fspath(elsewhere))
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    app = app_module(tmp_path, f"cliapp_{'_'.join(path)}", "CLI_TEST_ROOT")
    sample = SAMPLES[path]
    for number, where in enumerate(positions(path, sample.args(_run(tmp_path, template, app, 0)))):
        run = _run(tmp_path, template, app, number)
        monkeypatch.setenv("CLI_TEST_ROOT", run.root)
        if sample.setup is not None:
            with Router(run.root, create=False) as router:
                sample.setup(router)
        argv = [*path, *sample.args(run)]
        argv[where:where] = ["--root", run.root, "--json"]
        code, out, err = run_cli(capsys, *argv)
        assert code == 0, (argv, err)
        assert not elsewhere.exists(), argv
        lines = [json.loads(line) for line in out.splitlines()]  # --json: every line is JSON
        with Router(run.root, create=False, schema=SCHEMA) as router:
            assert sample.check(run, lines, router), (argv, lines)


def _run(tmp_path: Path, template: dict[str, str], app: str, number: int) -> Run:
    directory = tmp_path / f"run{number}"
    if not directory.exists():
        directory.mkdir()
        shutil.copytree(template["root"], directory / "B")
    return Run(os.fspath(directory / "B"), directory, template["backup"], template["export"], app)


def test_root_in_the_middle_of_a_nested_action_wins_over_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    a = populated_root(tmp_path / "A")
    b = populated_root(tmp_path / "B")
    monkeypatch.setenv("SHARDLITE_ROOT", a)
    code, out, err = run_cli(capsys, "tenants", "--root", b, "drop", "victim:1")
    assert code == 0, err
    with Router(a, create=False) as in_a, Router(b, create=False) as in_b:
        assert in_a.exists("victim:1") and not in_b.exists("victim:1")
    code, out, err = run_cli(capsys, "tenants", "--json")  # no --root: the environment's
    assert [json.loads(line)["key"] for line in out.splitlines()] == KEYS


@pytest.mark.parametrize("argv", [
    ["--root", "{a}", "tenants", "--root", "{b}", "drop", "victim:1"],
    ["tenants", "--root", "{a}", "drop", "victim:1", "--root", "{b}"],
    ["--root", "{a}", "status", "--root", "{b}"],
    ["--root", "{a}", "--root", "{b}", "status"],
])
def test_two_different_roots_are_refused(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = populated_root(tmp_path / "A")
    b = populated_root(tmp_path / "B")
    code, out, err = run_cli(capsys, *(arg.format(a=a, b=b) for arg in argv))
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "two different data roots" in err and "Traceback" not in err
    for root in (a, b):
        with Router(root, create=False) as router:
            assert router.exists("victim:1")


def test_the_same_root_twice_is_one_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b = populated_root(tmp_path / "B")
    relative = os.path.relpath(b)
    code, out, err = run_cli(capsys, "--root", b, "tenants", "--root", relative, "--json", "drop", "victim:1",
                             "--root", b + "/")
    assert code == 0, err
    assert json.loads(out) == {"dropped": "victim:1"}


def _help_of(action: argparse.Action) -> str:
    return "" if action.help in (None, argparse.SUPPRESS) else str(action.help).strip()


def test_every_command_action_and_option_has_help() -> None:
    missing = []
    for _depth, path, parser in walk(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {choice.dest: _help_of(choice) for choice in action._choices_actions}
                missing += [" ".join((*path, name)) for name in action.choices if not helped.get(name)]
            elif not _help_of(action):
                missing.append(f"{' '.join(path) or 'shardlite'} {'/'.join(action.option_strings) or action.dest}")
        assert {option for action in parser._actions for option in action.option_strings} >= set(SHARED)
    assert missing == []


def _readme_cli_section() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## CLI\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert match is not None, "the README has no CLI section"
    return match.group(1)


def test_the_readme_cli_section_names_every_command() -> None:
    section = re.sub(r"\s+", " ", _readme_cli_section())
    missing = [" ".join(path) for path in leaves() if f"shardlite {' '.join(path)}" not in section]
    assert missing == [], "name these in the README's CLI section (as `shardlite COMMAND ...`)"
