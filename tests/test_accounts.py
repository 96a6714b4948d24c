"""Accounts in the global DB (brief §4, rule 10): canonical e-mail keys, concurrent sign-ups, passwords,
bad input, the ``accounts show`` CLI.

The e-mail policy under test is the one documented in ``shardlite/emails.py``: the uniqueness key is
NFKC(casefold(NFKC(address))) with the domain in its ASCII (A-label) form, the address is stored as given,
case/fullwidth/compatibility variants and the Unicode and punycode forms of a domain share a key, the dotless
``ı`` and dotted capital ``İ`` are *not* folded onto ``i``, plus-addressing is folded only when ``fold_plus``
is on, invisible and look-alike characters are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import global_rows

import shardlite.cli
from shardlite import (
    AuthenticationFailed,
    EmailTaken,
    InvalidEmail,
    InvalidPassword,
    Router,
    UnknownAccount,
)
from shardlite.core.emails import email_key
from shardlite.front.accounts import Account, ScryptParams

FAST = ScryptParams(n=2**8)
GLOBAL_TABLES = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")


def fullwidth(text: str) -> str:
    """ASCII -> FULLWIDTH forms (U+FF01..U+FF5E); NFKC maps them back."""
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else c for c in text)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def router(make_router: Callable[..., Router], clock: Clock) -> Router:
    r = make_router(clock=clock)
    r.accounts.scrypt = FAST
    return r


def snapshot(router: Router) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the account/credential/session tables (committed data)."""
    return {t: global_rows(router, f"SELECT * FROM {t} ORDER BY 1") for t in GLOBAL_TABLES}


def root_bytes(root: str) -> dict[str, bytes]:
    """Contents of every file under the data root (read-only, for grepping)."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                found[path] = fh.read()
    return found


# -- canonical keys and the documented confusables policy ---------------------------------------------------


def test_address_is_stored_as_given_and_found_by_any_variant(router: Router, clock: Clock) -> None:
    uid = router.accounts.register("Alice@Example.COM", name="Alice", city="Paris")
    account = router.accounts.get(uid)
    assert isinstance(account, Account)
    assert account.id == uid
    assert account.email == "Alice@Example.COM"  # as given, not the key
    assert account.profile == {"name": "Alice", "city": "Paris"}
    assert account.name == "Alice"
    assert account.created == account.updated == clock.now
    for variant in ("alice@example.com", "ALICE@EXAMPLE.COM", fullwidth("alice@example.com"),
                    "ａｌｉｃｅ@example.com", "alice@ＥＸＡＭＰＬＥ.com"):
        found = router.accounts.by_email(variant)
        assert found is not None and found.id == uid, variant
    assert router.accounts.by_email("bob@example.com") is None
    assert router.accounts.key("Alice@Example.COM") == "alice@example.com"


@pytest.mark.parametrize("variant", [
    "alice@example.com",
    "ALICE@EXAMPLE.COM",
    "aLiCe@eXaMpLe.CoM",
    fullwidth("alice@example.com"),         # fullwidth letters, ＠ and ．
    fullwidth("ALICE@EXAMPLE.COM"),
    "alice\uff20example\uff0ecom",           # only the @ and the dot fullwidth
    "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e@example.com",  # mathematical bold letters (NFKC)
])
def test_case_and_compatibility_variants_are_taken(router: Router, variant: str) -> None:
    uid = router.accounts.register("Alice@Example.com")
    before = snapshot(router)
    with pytest.raises(EmailTaken):
        router.accounts.register(variant)
    assert snapshot(router) == before
    assert router.accounts.by_email(variant).id == uid  # type: ignore[union-attr]


def test_kelvin_sign_sharp_s_and_ligatures_fold(router: Router) -> None:
    router.accounts.register("kate@example.com")
    with pytest.raises(EmailTaken):
        router.accounts.register("\u212aATE@example.com")  # KELVIN SIGN -> K -> k
    router.accounts.register("strasse@example.com")
    with pytest.raises(EmailTaken):
        router.accounts.register("STRAẞE@example.com")  # capital sharp s casefolds to ss
    with pytest.raises(EmailTaken):
        router.accounts.register("straße@example.com")
    router.accounts.register("office@example.com")
    with pytest.raises(EmailTaken):
        router.accounts.register("o\ufb03ce@example.com")  # LATIN SMALL LIGATURE FFI
    router.accounts.register("caf\u00e9@example.com")
    with pytest.raises(EmailTaken):
        router.accounts.register("cafe\u0301@example.com")  # decomposed é


def test_dotless_and_dotted_i_are_distinct_accounts(router: Router) -> None:
    """Policy: U+0131 (ı) and U+0130 (İ -> i + U+0307) are different letters from i; not folded."""
    plain = router.accounts.register("alice@x.org")
    dotless = router.accounts.register("alıce@x.org")
    dotted = router.accounts.register("ALİCE@x.org")
    assert len({plain, dotless, dotted}) == 3
    assert router.accounts.key("alıce@x.org") == "al\u0131ce@x.org"
    assert router.accounts.key("ALİCE@x.org") == "ali\u0307ce@x.org"
    # but each of them is still case-insensitive within its own key
    with pytest.raises(EmailTaken):
        router.accounts.register("ALıCE@X.ORG")  # ı upper-cased by hand stays ı
    with pytest.raises(EmailTaken):
        router.accounts.register("alİce@x.org")
    with pytest.raises(EmailTaken):
        router.accounts.register(fullwidth("ALICE@x.org"))
    assert router.accounts.by_email("alıce@X.org").id == dotless  # type: ignore[union-attr]
    assert router.accounts.by_email("ALİCE@x.org").id == dotted  # type: ignore[union-attr]
    assert router.accounts.by_email("Alice@x.org").id == plain  # type: ignore[union-attr]
    assert len(global_rows(router, "SELECT * FROM _shardlite_accounts")) == 3


def test_unicode_and_punycode_forms_of_one_domain_are_one_account(router: Router) -> None:
    """Policy: the domain's key is its ASCII (A-label) form, so an IDN address is one account however the
    domain is spelled; the address is stored as given."""
    uid = router.accounts.register("Alice@B\u00fccher.example", password="correct horse")
    assert router.accounts.get(uid).email == "Alice@B\u00fccher.example"  # type: ignore[union-attr]
    assert router.accounts.key("Alice@B\u00fccher.example") == "alice@xn--bcher-kva.example"
    before = snapshot(router)
    for variant in ("alice@xn--bcher-kva.example", "ALICE@XN--BCHER-KVA.EXAMPLE", "alice@B\u00dcCHER.example",
                    "alice@bu\u0308cher.example", fullwidth("alice@") + "b\u00fccher.example"):
        with pytest.raises(EmailTaken):
            router.accounts.register(variant)
        assert router.accounts.by_email(variant).id == uid  # type: ignore[union-attr]
        assert router.accounts.authenticate(variant, "correct horse") == uid
    assert snapshot(router) == before
    other = router.accounts.register("bob@xn--bcher-kva.example")
    with pytest.raises(EmailTaken):
        router.accounts.change_email(other, "ALICE@b\u00fccher.example")
    rows = global_rows(router, "SELECT email, email_key FROM _shardlite_accounts ORDER BY id")
    assert rows == [("Alice@B\u00fccher.example", "alice@xn--bcher-kva.example"),
                    ("bob@xn--bcher-kva.example", "bob@xn--bcher-kva.example")]


def test_lookalike_addresses_are_not_a_second_account(router: Router) -> None:
    router.accounts.register("alice@example.com")
    for twin in ("alice\u00a0@example.com", "alice\ufe0f@example.com", "alice@example\u034f.com",
                 "alice\u2800@example.com", "alice@exampl\u3164e.com"):
        with pytest.raises(InvalidEmail):
            router.accounts.register(twin)
    assert len(global_rows(router, "SELECT * FROM _shardlite_accounts")) == 1


def test_plus_addressing_is_not_folded_by_default(router: Router) -> None:
    a = router.accounts.register("alice@x.org")
    b = router.accounts.register("alice+news@x.org")
    assert a != b
    router.accounts.fold_plus = True
    with pytest.raises(EmailTaken):
        router.accounts.register("Alice+other@x.org")
    assert router.accounts.key("alice+news@x.org") == "alice@x.org"
    assert email_key("alice+news@x.org") == "alice+news@x.org"
    assert email_key("alice+news@x.org", fold_plus=True) == "alice@x.org"


def test_change_email_checks_the_canonical_key(router: Router) -> None:
    a = router.accounts.register("a@x.org")
    b = router.accounts.register("b@x.org")
    before = snapshot(router)
    with pytest.raises(EmailTaken):
        router.accounts.change_email(b, "A@X.ORG")
    with pytest.raises(InvalidEmail):
        router.accounts.change_email(b, "not an address")
    with pytest.raises(UnknownAccount):
        router.accounts.change_email(b + 100, "c@x.org")
    assert snapshot(router) == before
    router.accounts.change_email(a, "New.A@X.org")
    assert router.accounts.get(a).email == "New.A@X.org"  # type: ignore[union-attr]
    assert router.accounts.by_email("new.a@x.org").id == a  # type: ignore[union-attr]
    assert router.accounts.by_email("a@x.org") is None
    router.accounts.register("a@x.org")  # the old address is free again


# -- concurrent sign-ups from four processes --------------------------------------------------------------

CHILD = r'''
import json, os, random, sys, time
from shardlite import EmailTaken, Router

root, proc, go, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
N = int(sys.argv[5])

def fullwidth(t):
    return "".join(chr(ord(c) + 0xFEE0) if 0x21 <= ord(c) <= 0x7E else c for c in t)

BOLD_DIGITS = {str(d): chr(0x1D7CE + d) for d in range(10)}  # MATHEMATICAL BOLD DIGIT d

def variant(i, v):
    base = f"kim.{i}@example.com"
    if v == 0:
        return base
    if v == 1:
        return base.upper()
    if v == 2:
        return fullwidth(base)
    # KELVIN SIGN for k, bold digits, alternating case
    out = []
    for n, c in enumerate(base):
        if c == "k":
            out.append("\u212a")
        elif c in BOLD_DIGITS:
            out.append(BOLD_DIGITS[c])
        else:
            out.append(c.upper() if n % 2 else c)
    return "".join(out)

router = Router(root, create=False)
order = list(range(N))
random.Random(1000 + proc).shuffle(order)
with open(ready, "w"):
    pass
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit(3)
    time.sleep(0.0005)
results = []
for i in order:
    address = variant(i, (proc + i) % 4)
    try:
        results.append([i, address, router.accounts.register(address)])
    except EmailTaken:
        results.append([i, address, "taken"])
router.close()
print(json.dumps(results))
'''


@pytest.mark.slow
@pytest.mark.usefixtures("any_meta")  # the UNIQUE key decides on both metadata backends (issue 15)
def test_four_processes_sign_up_variants_concurrently(tmp_path: Path, make_router: Callable[..., Router],
                                                      root: str) -> None:
    n, procs = 150, 4
    make_router().close()  # create the data root first: the race under test is the sign-up, not init
    script = tmp_path / "signup.py"
    script.write_text(CHILD)
    go = tmp_path / "go"
    readies = [tmp_path / f"ready{p}" for p in range(procs)]
    children = [
        subprocess.Popen([sys.executable, str(script), root, str(p), str(go), str(readies[p]), str(n)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in range(procs)
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(r.exists() for r in readies):
            assert all(c.poll() is None for c in children), "a child died before the barrier"
            assert time.monotonic() < deadline, "children never reached the barrier"
            time.sleep(0.005)
        go.touch()  # release all four at once
        outputs = [c.communicate(timeout=120) for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    for c, (_, err) in zip(children, outputs, strict=True):
        assert c.returncode == 0, err  # any error other than EmailTaken fails the child
    results = [json.loads(out) for out, _ in outputs]

    wins: dict[int, list[tuple[int, str, int]]] = {}
    losers = 0
    for p, rows in enumerate(results):
        assert sorted(i for i, _, _ in rows) == list(range(n)), "every process tried every address once"
        for i, address, outcome in rows:
            if outcome == "taken":
                losers += 1
            else:
                assert isinstance(outcome, int)
                wins.setdefault(i, []).append((p, address, outcome))
    winners = sum(len(v) for v in wins.values())
    assert winners == n and losers == (procs - 1) * n and winners + losers == procs * n
    assert sorted(wins) == list(range(n)) and all(len(v) == 1 for v in wins.values())

    # four distinct spellings per address, one canonical key
    for i in range(n):
        spellings = {address for rows in results for j, address, _ in rows if j == i}
        assert len(spellings) == procs
        assert len({email_key(s) for s in spellings}) == 1

    router = make_router()
    rows = global_rows(router, "SELECT id, email, email_key FROM _shardlite_accounts")
    assert len(rows) == n
    stored = {row[0]: (row[1], row[2]) for row in rows}
    for i, [(_, address, uid)] in wins.items():
        assert stored[uid] == (address, f"kim.{i}@example.com")  # stored exactly as the winner spelled it


# -- passwords --------------------------------------------------------------------------------------------


def test_password_is_hashed_never_stored_in_profile_or_files(router: Router, root: str) -> None:
    password = "correct horse battery staple"
    uid = router.accounts.register("p@x.org", password=password, name="P")
    other = router.accounts.register("q@x.org", password=password)
    account = router.accounts.get(uid)
    assert account is not None
    assert account.profile == {"name": "P"}
    assert password not in json.dumps(account.profile)
    assert password not in repr(account)
    rows = global_rows(router, "SELECT account_id, scheme, salt, hash FROM _shardlite_credentials ORDER BY 1")
    assert [r[0] for r in rows] == [uid, other]
    for _, scheme, salt, digest in rows:
        assert scheme == FAST.scheme and scheme.startswith("scrypt:")
        assert len(salt) == 16 and len(digest) == 32
        assert digest != password.encode() and password.encode() not in digest
        assert digest == FAST.derive(password, salt)  # the documented KDF, not the password
    assert rows[0][2] != rows[1][2] and rows[0][3] != rows[1][3]  # per-account salt
    for path, data in root_bytes(root).items():
        assert password.encode() not in data, path


def test_password_never_goes_into_the_profile(router: Router) -> None:
    uid = router.accounts.register("p@x.org", password="password-1")
    before = snapshot(router)
    with pytest.raises(InvalidPassword) as info:
        router.accounts.update_profile(uid, password="password-2", name="x")
    assert "password-2" not in str(info.value)
    assert snapshot(router) == before  # rolled back whole: not even the name changed
    after = snapshot(router)
    assert all("password" not in json.loads(row[4]) for row in after["_shardlite_accounts"])


def test_authenticate(router: Router) -> None:
    uid = router.accounts.register("Auth@Example.com", password="s3cret-pass")
    nopw = router.accounts.register("nopw@example.com")
    assert router.accounts.authenticate("Auth@Example.com", "s3cret-pass") == uid
    assert router.accounts.authenticate(fullwidth("AUTH@example.com"), "s3cret-pass") == uid
    before = snapshot(router)
    failures = [
        ("auth@example.com", "wrong-password"),
        ("auth@example.com", "S3CRET-PASS"),
        ("auth@example.com", "s3cret-pass "),
        ("unknown@example.com", "s3cret-pass"),
        ("nopw@example.com", "anything-at-all"),
        ("not an address", "s3cret-pass"),
        ("auth@example.com", ""),
        ("auth@example.com", "short"),
        ("auth@example.com", "x" * 5000),
        ("auth@example.com", None),
        (None, "s3cret-pass"),
        ("auth@example.com", "\ud800" * 10),
    ]
    for email, password in failures:
        with pytest.raises(AuthenticationFailed) as info:
            router.accounts.authenticate(email, password)  # type: ignore[arg-type]
        message = str(info.value)
        assert "s3cret" not in message and (not isinstance(password, str) or len(password) < 4
                                           or password not in message)
        assert info.value.__cause__ is None
        assert not isinstance(info.value.__context__, apsw.Error)


    assert snapshot(router) == before
    assert nopw != uid


def test_set_password(router: Router) -> None:
    uid = router.accounts.register("sp@x.org", password="first-password")
    nopw = router.accounts.register("np@x.org")
    router.accounts.set_password(uid, "second-password")
    assert router.accounts.authenticate("sp@x.org", "second-password") == uid
    with pytest.raises(AuthenticationFailed):
        router.accounts.authenticate("sp@x.org", "first-password")
    with pytest.raises(AuthenticationFailed):
        router.accounts.authenticate("np@x.org", "later-password")
    router.accounts.set_password(nopw, "later-password")
    assert router.accounts.authenticate("NP@X.ORG", "later-password") == nopw
    stored = global_rows(router, "SELECT hash FROM _shardlite_credentials WHERE account_id = ?", (nopw,))
    assert stored[0][0] != b"later-password"

    before = snapshot(router)
    for bad in ("", "short", "x" * 1025, "€" * 342, None, 12345678, b"bytes-password", "\udc80" * 9):
        with pytest.raises(InvalidPassword) as info:
            router.accounts.set_password(uid, bad)  # type: ignore[arg-type]
        if isinstance(bad, str) and len(bad) >= 4:
            assert bad not in str(info.value)
    with pytest.raises(UnknownAccount):
        router.accounts.set_password(uid + 1000, "valid-password")
    assert snapshot(router) == before
    assert router.accounts.authenticate("sp@x.org", "second-password") == uid


def test_password_length_limits_are_in_bytes(router: Router) -> None:
    router.accounts.register("a@x.org", password="€" * 341)  # 1023 bytes
    router.accounts.register("b@x.org", password="x" * 1024)
    router.accounts.register("c@x.org", password="12345678")
    assert router.accounts.authenticate("a@x.org", "€" * 341)


# -- bad input: typed errors, nothing changed -------------------------------------------------------------

MALFORMED = [
    "", "plain", "@", "a@", "@x.org", "a@@x.org", "a@b@x.org", "a@x", "a b@x.org", " a@x.org", "a@x.org ",
    ".a@x.org", "a.@x.org", "a..b@x.org", "a@-x.org", "a@x-.org", "a@x..org", "a@x.org.", "a@.x.org",
    '"a"@x.org', "a@[127.0.0.1]", "a\x00@x.org", "a\n@x.org", "a@x.org\n", "a@x.o_rg", "a@x.o rg",
    "a" * 65 + "@x.org", "a@" + "b" * 64 + ".org", "a@" + ("b" * 60 + ".") * 5 + "org", "x" * 2000,
    "a" * 100_000 + "@x.org", "a\u200b@x.org", "a\u202e@x.org", "a@x.org\u200b", "\ud800@x.org",
    "a@\udfff.org", "a(b)@x.org", "a<b>@x.org", "a,b@x.org", "a;b@x.org", "a:b@x.org", "a\\b@x.org",
    "a[b]@x.org", "a@x\u3002org", "\u3000@x.org", "a\u00a0@x.org", "a@x.org\x7f",
    # invisible and look-alike characters, invalid internationalized domains
    "a\ufe0f@x.org", "a@x\ufe0f.org", "a@x\U000e0100.org", "a@b\u034fc.org", "a\u034f@x.org", "a@\u3164.org",
    "a@x\uffa0.org", "a\u115f@x.org", "a\u2800@x.org", "a@x.org\u2800", "a\u2007@x.org", "a@xn--zz.org",
    "a@\u0301x.org", "a@1\u05d0.org",
]


@pytest.mark.parametrize("address", MALFORMED, ids=lambda a: repr(a)[:40])
def test_malformed_addresses_are_refused_and_change_nothing(router: Router, address: str) -> None:
    uid = router.accounts.register("keep@x.org", password="keep-password")
    before = snapshot(router)
    with pytest.raises(InvalidEmail):
        router.accounts.register(address, password="some-password")
    with pytest.raises(InvalidEmail):
        router.accounts.register(address)
    with pytest.raises(InvalidEmail):
        router.accounts.by_email(address)
    with pytest.raises(InvalidEmail):
        router.accounts.change_email(uid, address)
    with pytest.raises(AuthenticationFailed):
        router.accounts.authenticate(address, "keep-password")
    assert snapshot(router) == before


@pytest.mark.parametrize("address", [None, 5, 3.5, b"a@x.org", ["a@x.org"], object()],
                         ids=lambda a: type(a).__name__ if type(a) is object else repr(a))  # same ids in every worker
def test_non_text_addresses_are_invalid(router: Router, address: object) -> None:
    before = snapshot(router)
    with pytest.raises(InvalidEmail):
        router.accounts.register(address)  # type: ignore[arg-type]
    assert snapshot(router) == before


@pytest.mark.parametrize("password", ["", "1234567", "x" * 1025, "€" * 342, "\ud800" * 8, 12345678,
                                      b"bytes-password", 0.5], ids=lambda p: repr(p)[:20])
def test_bad_passwords_register_nothing(router: Router, password: object) -> None:
    router.accounts.register("keep@x.org")
    before = snapshot(router)
    with pytest.raises(InvalidPassword):
        router.accounts.register("new@x.org", password=password)  # type: ignore[arg-type]
    assert snapshot(router) == before
    assert router.accounts.by_email("new@x.org") is None


def test_email_taken_changes_nothing(router: Router) -> None:
    router.accounts.register("t@x.org", password="password-1", name="first")
    before = snapshot(router)
    with pytest.raises(EmailTaken) as info:
        router.accounts.register("T@X.ORG", password="password-2", name="second")
    assert "password-2" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no engine traceback shown
    assert snapshot(router) == before
    assert router.accounts.authenticate("t@x.org", "password-1")


@pytest.mark.parametrize("bad_id", [0, -1, 999_999, 2**63 - 1, None, 1.5, "nope"], ids=repr)
def test_unknown_ids_give_none_or_unknown_account(router: Router, bad_id: object) -> None:
    router.accounts.register("keep@x.org", password="keep-password")
    before = snapshot(router)
    assert router.accounts.get(bad_id) is None  # type: ignore[arg-type]
    for call in (lambda: router.accounts.update_profile(bad_id, name="x"),  # type: ignore[arg-type]
                 lambda: router.accounts.delete(bad_id),  # type: ignore[arg-type]
                 lambda: router.accounts.set_password(bad_id, "new-password"),  # type: ignore[arg-type]
                 lambda: router.accounts.change_email(bad_id, "other@x.org")):  # type: ignore[arg-type]
        with pytest.raises(UnknownAccount):
            call()
    assert snapshot(router) == before


def id_calls(router: Router, account_id: Any) -> list[Callable[[], object]]:
    """Every call that takes an account id and must refuse an unknown one with UnknownAccount."""
    return [lambda: router.accounts.delete(account_id), lambda: router.accounts.update_profile(account_id, x=1),
            lambda: router.accounts.set_password(account_id, "new-password"),
            lambda: router.accounts.change_email(account_id, "other@x.org"),
            lambda: router.sessions.create(account_id)]


def test_huge_ids_are_unknown_not_engine_errors(router: Router) -> None:
    """Regression: ids beyond 64 bits used to leak APSW's OverflowError."""
    router.accounts.register("keep@x.org")
    before = snapshot(router)
    for huge in (2**63, 2**70, -(2**70)):
        assert router.accounts.get(huge) is None
        for call in id_calls(router, huge):
            with pytest.raises(UnknownAccount):
                call()
        assert router.sessions.revoke_all(huge) == 0
    assert snapshot(router) == before


def test_text_id_does_not_update_an_account(router: Router) -> None:
    """Regression: update_profile('1') matched account 1 through SQLite's integer affinity, committed the
    change, then failed with AssertionError because get('1') is None."""
    uid = router.accounts.register("keep@x.org", name="before")
    assert uid == 1
    before = snapshot(router)
    assert router.accounts.get("1") is None  # type: ignore[arg-type]  # get treats text ids as unknown
    with pytest.raises(UnknownAccount):
        router.accounts.update_profile("1", name="after")  # type: ignore[arg-type]
    assert snapshot(router) == before


def test_text_and_bool_ids_do_not_reach_account_1(router: Router) -> None:
    """Regression: delete('1') deleted account 1 (SQLite integer affinity) although get('1') reported no such
    account; True is not an id either."""
    uid = router.accounts.register("keep@x.org", password="keep-password")
    token = router.sessions.create(uid)
    assert uid == 1
    before = snapshot(router)
    for fake in ("1", "01", " 1", "1.0", True, 1.0):
        assert router.accounts.get(fake) is None  # type: ignore[arg-type]
        for call in id_calls(router, fake):
            with pytest.raises(UnknownAccount):
                call()
        assert router.sessions.revoke_all(fake) == 0  # type: ignore[arg-type]
    assert snapshot(router) == before
    assert router.sessions.resolve(token) is not None


def test_profile_update_and_delete_cascade(router: Router, clock: Clock) -> None:
    uid = router.accounts.register("u@x.org", password="password-1", name="Ann", city="Oslo")
    token = router.sessions.create(uid)
    clock.now += 10
    account = router.accounts.update_profile(uid, name="Anna", city=None, lang="nb")
    assert account.profile == {"name": "Anna", "lang": "nb"}
    assert account.updated == clock.now and account.created == clock.now - 10
    assert [a.id for a in router.accounts.search("ann")] == [uid]
    router.accounts.delete(uid)
    assert router.accounts.get(uid) is None
    assert router.sessions.resolve(token) is None
    for table in GLOBAL_TABLES:
        assert global_rows(router, f"SELECT count(*) FROM {table}") == [(0,)]
    with pytest.raises(UnknownAccount):
        router.accounts.delete(uid)
    with pytest.raises(AuthenticationFailed):
        router.accounts.authenticate("u@x.org", "password-1")


# -- CLI --------------------------------------------------------------------------------------------------


def test_cli_accounts_show_json(router: Router, root: str, capsys: pytest.CaptureFixture[str]) -> None:
    uid = router.accounts.register("Show.Me@Example.com", password="cli-password", name="Shown")
    router.sessions.create(uid)
    revoked = router.sessions.create(uid)
    router.sessions.revoke(revoked)
    router.accounts.register("other@example.com")
    router.close()
    capsys.readouterr()

    assert shardlite.cli.main(["accounts", "show", "SHOW.ME@example.com", "--root", root, "--json"]) == 0
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["id"] == uid
    assert info["email"] == "Show.Me@Example.com"
    assert info["email_key"] == "show.me@example.com"
    assert info["profile"] == {"name": "Shown"}
    assert info["sessions"] == 1
    assert info["has_password"] is True
    assert "cli-password" not in out and revoked not in out

    code = shardlite.cli.main(["accounts", "show", "nobody@example.com", "--root", root, "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert "nobody@example.com" in err and "Traceback" not in err and err.count("\n") == 1

    code = shardlite.cli.main(["accounts", "show", "not an address", "--root", root, "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err and err.strip()


def test_cli_accounts_show_subprocess(router: Router, root: str) -> None:
    router.accounts.register("sub@example.com", name="Sub")
    router.close()
    exe = os.path.join(os.path.dirname(sys.executable), "shardlite")
    command = [exe] if os.path.exists(exe) else [sys.executable, "-m", "shardlite"]
    done = subprocess.run(command + ["accounts", "show", "SUB@EXAMPLE.COM", "--root", root, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["email"] == "sub@example.com"
    done = subprocess.run(command + ["accounts", "show", "missing@example.com", "--root", root, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert "missing@example.com" in done.stderr and "Traceback" not in done.stderr


def test_cli_accounts_show_without_root_or_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHARDLITE_ROOT", raising=False)
    assert shardlite.cli.main(["accounts", "show", "a@x.org", "--json"]) == 2
    assert "root" in capsys.readouterr().err
    missing = tmp_path / "nothing-here"
    assert shardlite.cli.main(["accounts", "show", "a@x.org", "--root", str(missing), "--json"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not missing.exists()  # the CLI never creates a root


def test_concurrent_connections_see_constraint_not_precheck(router: Router, root: str) -> None:
    """The UNIQUE constraint, not a read-then-write, decides: a row inserted behind the API's back (another
    process's committed write) still makes register() fail with EmailTaken."""
    conn = apsw.Connection(os.path.join(root, "global.db"))
    try:
        conn.setbusytimeout(5000)
        conn.execute("INSERT INTO _shardlite_accounts(email, email_key, created, updated) "
                     "VALUES ('Ghost@X.org', 'ghost@x.org', 0, 0)")
    finally:
        conn.close()
    with pytest.raises(EmailTaken):
        router.accounts.register("GHOST@x.org")


def test_stored_keys_of_idn_domains_are_upgraded_on_open(make_router: Callable[..., Router], root: str) -> None:
    """Accounts registered before keys used the domain's ASCII form get it when a root at global schema
    version 5 is opened: the Unicode and punycode spellings then find the same account; two accounts whose
    keys now coincide keep the older one on the shared key."""
    router = make_router()
    router.accounts.scrypt = FAST
    unicode_id = router.accounts.register("alice@bücher.example", password="alice-password")
    ascii_id = router.accounts.register("bob@example.org")
    later = router.accounts.register("carol@xn--bcher-kva.example")
    twin = router.accounts.register("dave@example.net")
    router.close()
    conn = apsw.Connection(os.path.join(root, "global.db"))
    try:  # the keys as the rules before version 6 stored them
        for account_id, old in ((unicode_id, "alice@bücher.example"), (later, "carol@xn--bcher-kva.example"),
                                (twin, "carol@bücher.example")):
            conn.execute("UPDATE _shardlite_accounts SET email_key = ? WHERE id = ?", (old, account_id))
        conn.execute("PRAGMA user_version = 5")
    finally:
        conn.close()
    again = make_router()
    again.accounts.scrypt = FAST
    assert again.accounts.authenticate("alice@xn--bcher-kva.example", "alice-password") == unicode_id
    assert again.accounts.authenticate("ALICE@BÜCHER.example", "alice-password") == unicode_id
    assert again.accounts.by_email("bob@example.org").id == ascii_id  # type: ignore[union-attr]
    assert again.accounts.by_email("carol@bücher.example").id == later  # type: ignore[union-attr]
    keys = dict(global_rows(again, "SELECT id, email_key FROM _shardlite_accounts"))
    assert keys[unicode_id] == "alice@xn--bcher-kva.example"
    assert keys[twin] == "carol@bücher.example"  # the older account (later) holds the shared key
    with pytest.raises(EmailTaken):
        again.accounts.register("Alice@xn--BCHER-kva.example")
