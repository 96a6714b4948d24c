"""`shardlite replicate retention` and `replicate compact`: windows recorded in the root and read back by every
process, hostile input refused with what is accepted, output literal, a compaction while another runs
refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from helpers_routers import run_cli

from shardlite import Router
from shardlite.core import retention
from shardlite.meta.replica_record import RETENTION_NAME, recorded_windows
from shardlite.services import replica_retention


@pytest.fixture
def root(tmp_path: Path) -> str:
    path = str(tmp_path / "root")
    Router(path, replicate=f"file://{tmp_path / 'replica'}").close()
    return path


def test_windows_are_recorded_and_shown(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(capsys, "--root", root, "--json", "replicate", "retention")
    assert code == 0 and json.loads(out) == {"default": "7d", "prefixes": {}}
    code, out, _err = run_cli(capsys, "--root", root, "replicate", "retention", "--default", "14d",
                              "--prefix", "dm:", "30d", "--prefix", "dm:vip:", "2w")
    assert code == 0 and "14d" in out and "dm:vip:" in out
    router = Router(root)
    try:
        windows = recorded_windows(router._store.meta.kv)
    finally:
        router.close()
    assert windows == retention.Windows(14 * retention.DAY_NS, {"dm:": 30 * retention.DAY_NS,
                                                                "dm:vip:": 14 * retention.DAY_NS})
    code, out, _err = run_cli(capsys, "--root", root, "--json", "replicate", "retention", "--remove-prefix", "dm:")
    assert code == 0 and json.loads(out) == {"default": "14d", "prefixes": {"dm:vip:": "14d"}}


@pytest.mark.parametrize("argv,message", [
    (["--default", "7"], "not a duration"),
    (["--default", "0d"], "between 1m and 3650d"),
    (["--default", "99999d"], "between 1m and 3650d"),
    (["--prefix", "\x1b[2Jdm:", "30d"], "cannot begin a key"),
    (["--prefix", " dm:", "30d"], "cannot begin a key"),
    (["--prefix", "dm:", "\x1b[2J"], "not a duration"),
    (["--remove-prefix", "nope:"], "no window is set"),
])
def test_hostile_settings_are_refused(root: str, capsys: pytest.CaptureFixture[str], argv: list[str],
                                      message: str) -> None:
    code, out, err = run_cli(capsys, "--root", root, "replicate", "retention", *argv)
    assert code != 0 and message in err and "\x1b" not in err + out
    router = Router(root)
    try:
        assert router._store.meta.kv.get(RETENTION_NAME) is None  # nothing written
    finally:
        router.close()


def test_a_damaged_record_is_an_error_not_a_shorter_window(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    router = Router(root)
    try:
        router._store.meta.kv.put(RETENTION_NAME, '{"default": 1}')
    finally:
        router.close()
    code, _out, err = run_cli(capsys, "--root", root, "replicate", "compact")
    assert code != 0 and "set them again" in err


def test_compact_runs_once_at_a_time(root: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_cli(capsys, "--root", root, "--json", "replicate", "compact")
    assert code == 0 and json.loads(out)["deleted_packs"] == 0
    router = Router(root)
    fd = replica_retention.compact_lock(router._store)
    try:
        assert fd is not None
        code, _out, err = run_cli(capsys, "--root", root, "replicate", "compact")
        assert code != 0 and "compaction" in err and "running" in err
    finally:
        if fd is not None:
            os.close(fd)
        router.close()
