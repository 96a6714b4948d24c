"""Conformance: :class:`~shardlite.meta.accounts.AccountStore` and :class:`~shardlite.meta.accounts.CredentialStore`
over every metadata backend (the ``meta`` fixture), through the contracts only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from helpers_meta import open_meta
from helpers_procs import FileBarrier, finish_all, spawn, write_script
from helpers_threads import race

from shardlite import EmailTaken, InvalidEmail, UnknownAccount
from shardlite.meta import MetaStore
from shardlite.meta.accounts import AccountRows, Credential, Login

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("accounts", "credentials", "sessions")


T0 = 1_700_000_000.0
CRED = Credential("scrypt:n=16,r=1,p=1", b"s" * 16, b"h" * 32)


def make(meta: MetaStore, key: str, *, name: str = "", email: str | None = None, now: float = T0,
         credential: Credential | None = None) -> int:
    profile = json.dumps({"name": name} if name else {})
    return meta.accounts.create(email or key, key, name.casefold(), profile, now, credential)


# -- create, read ------------------------------------------------------------------------------------------


def test_create_stores_the_row_as_given(meta: MetaStore) -> None:
    uid = meta.accounts.create("Ann@Example.com", "ann@example.com", "ann", '{"name": "Ann"}', T0)
    account = meta.accounts.get(uid)
    assert account is not None
    assert (account.id, account.email, account.profile, account.created, account.updated) == (
        uid, "Ann@Example.com", {"name": "Ann"}, T0, T0)
    assert meta.accounts.by_email_key("ann@example.com") == account
    assert meta.accounts.by_email_key("Ann@Example.com") is None  # exact key, no policy here
    assert meta.accounts.get(uid + 1) is None
    assert not meta.credentials.has(uid)
    assert meta.credentials.for_login("ann@example.com") == Login(uid, None)
    assert meta.credentials.for_login("nobody@example.com") is None


def test_create_with_a_credential_is_one_unit(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io", credential=CRED)
    assert meta.credentials.has(uid)
    assert meta.credentials.for_login("a@x.io") == Login(uid, CRED)
    with pytest.raises(EmailTaken):
        make(meta, "a@x.io", credential=Credential("other", b"1", b"2"))
    assert meta.credentials.for_login("a@x.io") == Login(uid, CRED)  # the loser wrote nothing


def test_a_taken_email_key_writes_nothing(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io")
    with pytest.raises(EmailTaken):
        meta.accounts.create("A@X.IO", "a@x.io", "other", '{"name": "other"}', T0 + 1)
    assert meta.accounts.search("", 10) == [meta.accounts.get(uid)]
    assert make(meta, "b@x.io") > uid


def test_threads_racing_for_one_email_key_end_with_one_account(meta: MetaStore) -> None:
    results = race(8, lambda i: make(meta, "same@x.io", email=f"Same{i}@x.io"))
    winners = [r for r in results if isinstance(r, int)]
    assert len(winners) == 1, results
    assert all(isinstance(r, EmailTaken) for r in results if not isinstance(r, int)), results
    account = meta.accounts.by_email_key("same@x.io")
    assert account is not None and account.id == winners[0]
    assert [a.id for a in meta.accounts.search("", 100)] == winners


WORKER = """
{prelude}
sys.path.insert(0, sys.argv[1])
from helpers_meta import open_meta
from shardlite import EmailTaken
backend, root, sync, name = sys.argv[2:6]
store = open_meta(backend, root, create=False)
barrier(sync, name)
out = []
for i in range(20):
    try:
        out.append(store.accounts.create(f"K{i}@x.io", f"k{i}@x.io", "", "{}", 1.0))
    except EmailTaken:
        out.append("taken")
store.close()
print(" ".join(map(str, out)))
"""


def test_processes_racing_for_the_same_email_keys_end_with_one_account_each(meta_backend: str, meta: MetaStore,
                                                                             root: str, tmp_path: Path) -> None:
    script = write_script(tmp_path, "signup.py", WORKER)
    sync = FileBarrier(tmp_path / "sync")
    tests = os.path.dirname(os.path.abspath(__file__))
    procs = [spawn(script, tests, meta_backend, root, sync, n) for n in range(3)]
    sync.wait_ready(procs, range(3))
    sync.go()
    columns = list(zip(*(out.split() for out in finish_all(procs)), strict=True))
    for i, column in enumerate(columns):
        assert sorted(column).count("taken") == 2, (i, column)
        account = meta.accounts.by_email_key(f"k{i}@x.io")
        assert account is not None and str(account.id) in column
    assert len(meta.accounts.search("k", 100)) == 20


# -- ids -----------------------------------------------------------------------------------------------------


def test_ids_are_never_reused_after_delete(meta: MetaStore) -> None:
    first = make(meta, "a@x.io")
    second = make(meta, "b@x.io")
    meta.accounts.delete(second)  # the highest id goes
    third = make(meta, "c@x.io")
    assert first < second < third
    meta.accounts.clear()
    assert make(meta, "d@x.io") > third


def test_imported_ids_move_the_counter(meta: MetaStore) -> None:
    meta.accounts.import_rows(AccountRows([(500, "i@x.io", "i@x.io", "", "{}", T0, T0)], [], []))
    assert make(meta, "n@x.io") > 500


# -- search --------------------------------------------------------------------------------------------------


def test_search_is_by_name_key_then_id_in_code_point_order(meta: MetaStore) -> None:
    names = ["zoe", "émile", "ève", "eve", "Ωmega", "ａｌｉ", "ali", "ali", "𝔞lpha", "bob", "\u00e9mile b"]
    ids = [make(meta, f"u{i}@x.io", name=name) for i, name in enumerate(names)]
    found = meta.accounts.search("", 100)
    expected = sorted(zip((n.casefold() for n in names), ids, strict=True))
    assert [(a.profile["name"].casefold(), a.id) for a in found] == expected
    assert [a.profile["name"] for a in meta.accounts.search("é", 100)] == ["émile", "\u00e9mile b"]
    assert [a.id for a in meta.accounts.search("ali", 100)] == [ids[6], ids[7]]
    assert len(meta.accounts.search("", 3)) == 3
    assert meta.accounts.search("", 0) == []


def test_search_matches_email_keys_and_lists_each_account_once(meta: MetaStore) -> None:
    both = make(meta, "dana@x.io", name="dana")
    key_only = make(meta, "danube@x.io", name="river")
    make(meta, "zed@x.io", name="zed")
    assert [a.id for a in meta.accounts.search("dan", 10)] == [both, key_only]


# -- update_profile ------------------------------------------------------------------------------------------


def test_update_profile_merges_atomically_and_returns_the_row(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io", name="ann")

    def merge(profile: dict[str, Any]) -> tuple[str, str]:
        return json.dumps({**profile, "city": "Oslo", "name": "Anne"}), "anne"

    account = meta.accounts.update_profile(uid, merge, T0 + 5)
    assert account.profile == {"name": "Anne", "city": "Oslo"} and account.updated == T0 + 5
    assert account.created == T0 and account.email == "a@x.io"
    assert meta.accounts.get(uid) == account
    assert [a.id for a in meta.accounts.search("anne", 10)] == [uid]  # the name key moved with it


def test_update_profile_of_an_unknown_account(meta: MetaStore) -> None:
    called: list[object] = []
    with pytest.raises(UnknownAccount):
        meta.accounts.update_profile(12345, lambda p: called.append(p) or ("{}", ""), T0)  # type: ignore[func-returns-value]
    assert called == []


def test_a_failing_merge_writes_nothing(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io", name="ann")

    def boom(profile: dict[str, Any]) -> tuple[str, str]:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        meta.accounts.update_profile(uid, boom, T0 + 1)
    account = meta.accounts.get(uid)
    assert account is not None and account.profile == {"name": "ann"} and account.updated == T0


def test_concurrent_profile_updates_lose_no_increment(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io")

    def bump(profile: dict[str, Any]) -> tuple[str, str]:
        return json.dumps({"n": profile.get("n", 0) + 1}), ""

    results = race(8, lambda i: [meta.accounts.update_profile(uid, bump, T0) for _ in range(5)])
    assert not [r for r in results if isinstance(r, Exception)], results
    account = meta.accounts.get(uid)
    assert account is not None and account.profile == {"n": 40}


# -- change_email, delete ------------------------------------------------------------------------------------


def test_change_email(meta: MetaStore) -> None:
    a = make(meta, "a@x.io")
    b = make(meta, "b@x.io")
    with pytest.raises(EmailTaken):
        meta.accounts.change_email(a, "B@x.io", "b@x.io", T0 + 1)
    account = meta.accounts.get(a)
    assert account is not None and (account.email, account.updated) == ("a@x.io", T0)  # nothing written
    meta.accounts.change_email(a, "A@X.io", "a@x.io", T0 + 2)  # its own key again
    meta.accounts.change_email(a, "C@x.io", "c@x.io", T0 + 3)
    account = meta.accounts.get(a)
    assert account is not None and (account.email, account.updated) == ("C@x.io", T0 + 3)
    assert meta.accounts.by_email_key("a@x.io") is None
    make(meta, "a@x.io")  # the old key is free again
    with pytest.raises(UnknownAccount):
        meta.accounts.change_email(b + 100, "z@x.io", "z@x.io", T0)
    with pytest.raises(UnknownAccount):
        meta.accounts.change_email(b + 100, "b@x.io", "b@x.io", T0)  # absent wins over taken


def test_threads_changing_onto_one_free_address_end_with_one_owner(meta: MetaStore) -> None:
    ids = [make(meta, f"u{i}@x.io") for i in range(6)]
    results = race(6, lambda i: meta.accounts.change_email(ids[i], "free@x.io", "free@x.io", T0 + 1))
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, EmailTaken) for r in results if r is not None)
    owner = meta.accounts.by_email_key("free@x.io")
    assert owner is not None and results[ids.index(owner.id)] is None


def test_delete_cascades_to_credentials_and_sessions(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io", credential=CRED)
    other = make(meta, "b@x.io", credential=CRED)
    meta.sessions.insert(b"1" * 32, uid, T0, T0 + 100, None)
    meta.sessions.insert(b"2" * 32, other, T0, T0 + 100, None)
    meta.accounts.delete(uid)
    assert meta.accounts.get(uid) is None and not meta.credentials.has(uid)
    assert meta.sessions.live(b"1" * 32) is None and not meta.sessions.known(b"1" * 32)
    assert meta.sessions.count_live(uid) == 0
    assert meta.credentials.has(other) and meta.sessions.live(b"2" * 32) is not None
    with pytest.raises(UnknownAccount):
        meta.accounts.delete(uid)
    make(meta, "a@x.io")  # its key is free again


# -- credentials ---------------------------------------------------------------------------------------------


def test_set_password(meta: MetaStore) -> None:
    uid = make(meta, "a@x.io")
    meta.credentials.set(uid, CRED, T0)
    assert meta.credentials.for_login("a@x.io") == Login(uid, CRED)
    new = Credential("scrypt:n=32,r=1,p=1", b"t" * 16, b"g" * 32)
    meta.credentials.set(uid, new, T0 + 1)  # replaced, still one
    assert meta.credentials.for_login("a@x.io") == Login(uid, new)
    with pytest.raises(UnknownAccount):
        meta.credentials.set(uid + 1, CRED, T0)
    assert not meta.credentials.has(uid + 1)


def test_set_password_racing_delete_never_leaves_an_orphan(meta: MetaStore) -> None:
    for round_ in range(10):
        uid = make(meta, f"r{round_}@x.io")
        results = race(2, lambda i, uid=uid: meta.accounts.delete(uid) if i == 0  # type: ignore[misc]
                       else meta.credentials.set(uid, CRED, T0))
        assert results[0] is None
        assert results[1] is None or isinstance(results[1], UnknownAccount)
        assert not meta.credentials.has(uid)


# -- NUL -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["email", "email_key", "name_key", "profile"])
def test_text_with_nul_is_refused_before_anything_is_written(meta: MetaStore, field: str) -> None:
    values = {"email": "a@x.io", "email_key": "a@x.io", "name_key": "a", "profile": "{}"}
    values[field] = values[field][:1] + "\0" + values[field][1:]
    address = field.startswith("email")
    with pytest.raises(InvalidEmail if address else ValueError):
        meta.accounts.create(values["email"], values["email_key"], values["name_key"], values["profile"], T0)
    assert meta.accounts.search("", 10) == []
    uid = make(meta, "b@x.io")
    before = meta.accounts.get(uid)
    if address:
        with pytest.raises(InvalidEmail):
            meta.accounts.change_email(uid, values["email"], values["email_key"], T0 + 1)
    else:
        with pytest.raises(ValueError):
            meta.accounts.update_profile(uid, lambda _: (values["profile"], values["name_key"]), T0 + 1)
    assert meta.accounts.get(uid) == before


def test_a_credential_with_nul_is_refused(meta: MetaStore) -> None:
    uid = make(meta, "b@x.io")
    with pytest.raises(ValueError):
        meta.credentials.set(uid, Credential("scrypt\0", b"", b""), T0)
    with pytest.raises(ValueError):
        make(meta, "c@x.io", credential=Credential("scrypt\0", b"", b""))
    assert not meta.credentials.has(uid) and meta.accounts.by_email_key("c@x.io") is None


def test_lookups_by_a_key_with_nul_find_nothing(meta: MetaStore) -> None:
    make(meta, "a@x.io", name="ann")
    assert meta.accounts.by_email_key("a\0@x.io") is None
    assert meta.credentials.for_login("a\0@x.io") is None
    assert meta.accounts.search("a\0", 10) == []


# -- restore: has_rows, clear, import_rows -------------------------------------------------------------------


def test_has_rows_and_clear(meta: MetaStore) -> None:
    assert not meta.accounts.has_rows()
    uid = make(meta, "a@x.io", credential=CRED)
    meta.sessions.insert(b"1" * 32, uid, T0, T0 + 10, None)
    assert meta.accounts.has_rows()
    meta.accounts.clear()
    assert not meta.accounts.has_rows()
    assert meta.accounts.get(uid) is None and not meta.credentials.has(uid) and not meta.sessions.known(b"1" * 32)


def test_import_rows(meta: MetaStore) -> None:
    kept = make(meta, "keep@x.io")
    clash = make(meta, "clash@x.io")
    rows = AccountRows(
        accounts=[(kept + 10, "Clash@x.io", "clash@x.io", "c", '{"name": "C"}', T0, T0 + 1),
                  (kept + 11, "new@x.io", "new@x.io", "", "{}", 1, 2)],
        credentials=[(kept + 10, "scrypt:n=16,r=1,p=1", b"s", b"h", T0)],
        sessions=[(b"d" * 32, kept + 11, T0, T0 + 60, 30.0, T0, None),
                  (b"r" * 32, kept + 10, T0, T0 + 60, None, T0, T0)])
    copied = meta.accounts.import_rows(rows)
    assert copied == {"_shardlite_accounts": 2, "_shardlite_credentials": 1, "_shardlite_sessions": 2}
    assert meta.accounts.get(clash) is None  # replaced: same e-mail key
    account = meta.accounts.by_email_key("clash@x.io")
    assert account is not None and account.id == kept + 10 and account.profile == {"name": "C"}
    assert meta.accounts.get(kept) is not None
    assert meta.credentials.for_login("clash@x.io") == Login(kept + 10, Credential("scrypt:n=16,r=1,p=1", b"s", b"h"))
    session = meta.sessions.live(b"d" * 32)
    assert session is not None and (session.account_id, session.idle_ttl) == (kept + 11, 30.0)
    assert meta.sessions.live(b"r" * 32) is None and meta.sessions.known(b"r" * 32)


@pytest.mark.parametrize("rows", [
    AccountRows([(1, "a\0@x.io", "a@x.io", "", "{}", T0, T0)], [], []),
    AccountRows([(1, "a@x.io", "a@x.io", "", "{}", "soon", T0)], [], []),
    AccountRows([(True, "a@x.io", "a@x.io", "", "{}", T0, T0)], [], []),
    AccountRows([(1, "a@x.io", "a@x.io", "", "{}", T0)], [], []),
    AccountRows([(1, "a@x.io", "a@x.io", "", "{}", T0, T0)], [(1, "s", "salt-as-text", b"h", T0)], []),
    AccountRows([(1, "a@x.io", "a@x.io", "", "{}", T0, T0)], [], [(b"d", 1, T0, T0, None, T0, "no")]),
])
def test_import_rows_refuses_wrong_types_whole(meta: MetaStore, rows: AccountRows) -> None:
    with pytest.raises(ValueError):
        meta.accounts.import_rows(rows)
    assert not meta.accounts.has_rows()


def test_import_rows_refuses_orphans_whole(meta: MetaStore) -> None:
    rows = AccountRows([(7, "a@x.io", "a@x.io", "", "{}", T0, T0)], [], [(b"d" * 32, 8, T0, T0 + 9, None, T0, None)])
    with pytest.raises(UnknownAccount):
        meta.accounts.import_rows(rows)
    assert not meta.accounts.has_rows() and meta.accounts.get(7) is None


def test_import_rows_keeping_existing_accounts_adds_only_the_missing_ones(meta: MetaStore) -> None:
    """A restore into a shared account space: the store's accounts (newer) stay with their credentials and
    sessions; the backup's session of a kept account does not come back (it may have been revoked)."""
    ours = make(meta, "ours@x.io", name="now", credential=CRED)
    meta.sessions.insert(b"o" * 32, ours, T0, T0 + 60, None)
    meta.sessions.revoke(b"o" * 32, T0 + 1)
    rows = AccountRows(
        accounts=[(ours, "ours@x.io", "ours@x.io", "then", '{"name": "then"}', 1, 2),
                  (ours + 50, "new@x.io", "new@x.io", "", "{}", 1, 2)],
        credentials=[(ours, "scrypt:n=16,r=1,p=1", b"old", b"old", 1),
                     (ours + 50, "scrypt:n=16,r=1,p=1", b"n", b"n", 1)],
        sessions=[(b"o" * 32, ours, T0, T0 + 60, None, T0, None), (b"b" * 32, ours, T0, T0 + 60, None, T0, None),
                  (b"n" * 32, ours + 50, T0, T0 + 60, None, T0, None)])
    copied = meta.accounts.import_rows(rows, keep_existing=True)
    assert copied == {"_shardlite_accounts": 1, "_shardlite_credentials": 1, "_shardlite_sessions": 1,
                      "_shardlite_accounts_kept": 1}
    account = meta.accounts.get(ours)
    assert account is not None and account.profile == {"name": "now"}
    assert meta.credentials.for_login("ours@x.io") == Login(ours, CRED)
    assert meta.sessions.live(b"o" * 32) is None and not meta.sessions.known(b"b" * 32)
    session = meta.sessions.live(b"n" * 32)
    assert session is not None and session.account_id == ours + 50
    assert make(meta, "later@x.io") > ours + 50  # the counter moved past the imported id


def test_import_rows_keeping_existing_refuses_an_email_key_of_another_account_whole(meta: MetaStore) -> None:
    theirs = make(meta, "taken@x.io")
    rows = AccountRows([(theirs + 7, "new@x.io", "new@x.io", "", "{}", 1, 2),
                        (theirs + 9, "Taken@x.io", "taken@x.io", "", "{}", 1, 2)], [], [])
    with pytest.raises(EmailTaken, match=f"account {theirs}\\b") as caught:
        meta.accounts.import_rows(rows, keep_existing=True)
    assert "@" not in str(caught.value)  # ids only: an error message is no place for addresses
    assert meta.accounts.get(theirs + 7) is None and meta.accounts.get(theirs + 9) is None
    assert meta.accounts.import_rows(AccountRows([], [], []), keep_existing=True)["_shardlite_accounts_kept"] == 0


def test_the_store_reopens_with_its_rows(meta_backend: str, root: str, meta: MetaStore) -> None:
    uid = make(meta, "a@x.io", credential=CRED)
    other = open_meta(meta_backend, root, create=False)
    try:
        assert other.credentials.for_login("a@x.io") == Login(uid, CRED)
        with pytest.raises(EmailTaken):
            make(other, "a@x.io")
    finally:
        other.close()
