"""Which metadata store a root uses (``shardlite.meta.choose``): the root's record, ``meta=`` and
``SHARDLITE_META`` must agree, and nothing opens the wrong metadata silently. Nothing here connects."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardlite import ConfigurationError, Settings
from shardlite.meta.choose import ENV_VAR, locate_store, store_for
from shardlite.meta.postgres import PgMeta
from shardlite.meta.record import RECORD_NAME, read_record
from shardlite.meta.sqlite import SqliteMeta
from shardlite.meta.store import PARTS

URL = "postgresql://app:s3cret@127.0.0.1:6543/meta"


def test_default_is_embedded_and_writes_nothing(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "r")
    assert isinstance(locate_store(root, Settings(), environ={}), SqliteMeta)
    assert isinstance(locate_store(root, Settings(), "sqlite", environ={}), SqliteMeta)
    assert not os.path.exists(root)


def test_a_new_root_records_the_url_without_its_password(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "r")
    store = locate_store(root, Settings(), URL, environ={})
    assert isinstance(store, PgMeta) and store.location == "postgresql://app@127.0.0.1:6543/meta"
    record = read_record(root)
    assert record is not None and record.root_id == store.root_id
    assert "s3cret" not in (Path(root) / RECORD_NAME).read_text()
    later = locate_store(root, Settings(), environ={})  # found without being told
    assert isinstance(later, PgMeta) and later.root_id == store.root_id
    same = locate_store(root, Settings(), "postgresql://app:other@127.0.0.1:6543/meta", environ={})
    assert isinstance(same, PgMeta) and same.root_id == store.root_id


def test_the_environment_variable_counts_as_meta(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "r")
    assert isinstance(locate_store(root, Settings(), environ={ENV_VAR: URL}), PgMeta)
    with pytest.raises(ConfigurationError, match=ENV_VAR):
        locate_store(root, Settings(), environ={ENV_VAR: "postgresql://app@127.0.0.1:6543/elsewhere"})


@pytest.mark.parametrize("other", ["postgresql://app@127.0.0.1:6543/elsewhere", "postgresql://app@10.0.0.1:6543/meta",
                                   "sqlite"])
def test_a_disagreeing_meta_is_refused_and_names_both(tmp_path: Path, other: str) -> None:
    root = os.fspath(tmp_path / "r")
    locate_store(root, Settings(), URL, environ={})
    with pytest.raises(ConfigurationError) as info:
        locate_store(root, Settings(), other, environ={})
    assert "127.0.0.1:6543/meta" in str(info.value) and "s3cret" not in str(info.value)


def test_an_embedded_root_is_not_switched_silently(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / "global.db").write_bytes(b"")
    with pytest.raises(ConfigurationError, match="embedded"):
        locate_store(os.fspath(root), Settings(), URL, environ={})
    assert not (root / RECORD_NAME).exists()


def test_create_false_does_not_make_a_root(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "r")
    with pytest.raises(ConfigurationError, match="not a shardlite root"):
        locate_store(root, Settings(), URL, create=False, environ={})
    assert not os.path.exists(root)


def test_store_for_never_binds_a_root_to_an_incomplete_backend(tmp_path: Path) -> None:
    """A Router's choice (``store_for``): every part of the contract, or a refusal naming the missing ones,
    before ``meta.json`` is written."""
    root = os.fspath(tmp_path / "r")
    probe = locate_store(os.fspath(tmp_path / "probe"), Settings(), URL, environ={})
    missing = [name for name in PARTS if not hasattr(probe, name)]
    if missing:
        with pytest.raises(ConfigurationError, match=f"does not implement meta.{missing[0]}"):
            store_for(root, Settings(), URL, environ={})
        assert not os.path.exists(os.path.join(root, RECORD_NAME))
    else:
        store = store_for(root, Settings(), URL, environ={})
        assert all(hasattr(store, name) for name in PARTS) and os.path.exists(os.path.join(root, RECORD_NAME))


def test_an_embedded_root_never_loads_psycopg(tmp_path: Path) -> None:
    """psycopg takes about 0.1 s to import: a process whose roots are embedded (and the CLI) never pays it."""
    code = ("import sys, shardlite, shardlite.cli; from shardlite import Router\n"
            f"Router({os.fspath(tmp_path / 'r')!r}).close()\n"
            "assert 'psycopg' not in sys.modules, 'psycopg was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != ENV_VAR})
    assert done.returncode == 0, done.stderr
