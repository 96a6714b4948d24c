"""Partition keys (brief rule 1): hostile keys never escape a node directory; canonical form; pair_key."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from helpers_routers import internal_rows
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardlite
import shardlite.core.keys as keys_mod
from shardlite import MAX_KEY_BYTES, InvalidKey, Router, UnknownTenant, canonical, pair_key
from shardlite.core.keys import key_digest

NODES = ("n1", "n2", "n3")
GLOBAL_RE = re.compile(r"^(app_)?global\.db(-wal|-shm|-journal)?$")
TENANT_RE = re.compile(r"^(?P<digest>[0-9a-f]{32})\.(?P<gen>[1-9][0-9]*)\.db(-wal|-shm|-journal)?$")

# Pieces that hostile keys are assembled from.
HOSTILE_PARTS = [
    "../", "..", ".", "/", "//", "\\", "..\\", "~", "/etc/passwd", "/tmp/x", "C:\\Windows",
    "\x00", "\n", "\r", "\x1b", "\x7f",
    "\u2024",          # ONE DOT LEADER (looks like '.')
    "\u2025", "\uff0e",  # TWO DOT LEADER, FULLWIDTH FULL STOP
    "\uff0f", "\u2215", "\u2044",  # FULLWIDTH SOLIDUS, DIVISION SLASH, FRACTION SLASH
    "\u200f", "\u200e", "\u202e", "\u2066",  # RTL/LTR marks, RLO, LRI
    "\u200b", "\u200d", "\ufeff",  # zero-width space/joiner, BOM
    "\u0301", "e", "\u00e9", "\u3000", "\U0001f600", "\ud800",
    ":", "%", "%2e%2e%2f", "user", "dm:", "*", "?", "<", ">", "|", "\"", "'", " ",
]

text_keys = st.text(max_size=60)
assembled_keys = st.lists(st.sampled_from(HOSTILE_PARTS), min_size=0, max_size=12).map("".join)
long_keys = st.builds(lambda part, n: part * n, st.sampled_from(HOSTILE_PARTS + ["a", "\u00e9", "\u6771"]),
                      st.integers(min_value=1, max_value=10_240))
hostile_keys = st.one_of(text_keys, assembled_keys, long_keys,
                         st.builds(lambda a, b: a + b, assembled_keys, text_keys))

FIXED_HOSTILE = [
    "../escape", "../../../../../../../../etc/passwd", "/etc/passwd", "/absolute/key", "..", ".", "",
    "a\x00b", "\x00", "user:\x00../x", "\u2024\u2024/\u2024\u2024/x", "\uff0e\uff0e\uff0fx", "\uff0e\uff0e",
    "x" * 10 * 1024, "user:" + "\u00e9" * 5000, "\u200fuser:1", "user:1\u200f", "\u202eevil", "user:\u200b",
    "C:\\Windows\\system32", "~/x", "user:../../x", "%2e%2e%2fescape", "a/b/c", "\\..\\..\\x",
    "e\u0301", "\u00e9", "\ud800", "x" * MAX_KEY_BYTES, "x" * (MAX_KEY_BYTES + 1),
]


def _snapshot(top: str) -> set[str]:
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), top))
    return found


def assert_layout(root: str, nodes: tuple[str, ...] = NODES) -> None:
    """No file anywhere but ``<root>/global.db*`` and ``<root>/<node>/xx/<32hex>.<gen>.db*``."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = PurePosixPath(os.path.relpath(dirpath, root))
        depth = 0 if str(rel) == "." else len(rel.parts)
        for d in dirnames:
            assert not os.path.islink(os.path.join(dirpath, d)), f"symlink {rel / d}"
            if depth == 0:
                assert d in nodes, f"unexpected directory {d!r} in the data root"
            elif depth == 1:
                assert re.fullmatch(r"[0-9a-f]{2}", d), f"unexpected directory {rel / d}"
            else:
                raise AssertionError(f"unexpected directory {rel / d}")
        for f in filenames:
            full = os.path.join(dirpath, f)
            assert not os.path.islink(full), f"symlink {rel / f}"
            if depth == 0:
                assert GLOBAL_RE.match(f), f"unexpected file {f!r} in the data root"
            elif depth == 2:
                m = TENANT_RE.match(f)
                assert m is not None, f"unexpected file {rel / f}"
                assert m["digest"][:2] == rel.parts[1], f"{rel / f} is in the wrong fan-out directory"
                assert rel.parts[0] in nodes
            else:
                raise AssertionError(f"unexpected file {rel / f}")


class Harness:
    """One Router over a 3-node root, with a watched parent directory and cwd (module-scoped)."""

    def __init__(self, parent: Path) -> None:
        self.parent = str(parent)
        self.root = str(parent / "data")
        self.router = Router(self.root, nodes=list(NODES), schema=["CREATE TABLE kv(k TEXT)"])

    def check(self, key: Any) -> None:
        router = self.router
        before_files = _snapshot(self.parent)
        before_tenants = list(router.tenants())
        try:
            canon = canonical(key)
        except InvalidKey:
            for call in (
                lambda: router.transaction(key).__enter__(),
                lambda: router.query(key, "SELECT 1"),
                lambda: router.locate(key),
                lambda: router.exists(key),
                lambda: router.run(key, lambda tx: None),
            ):
                with pytest.raises(InvalidKey):
                    call()
            assert _snapshot(self.parent) == before_files, "an invalid key created something"
            assert list(router.tenants()) == before_tenants
            return
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO kv VALUES (?)", (key,))
        loc = router.locate(key)
        assert loc.state == "active" and loc.path is not None
        assert loc.key == canon
        node_dir = os.path.realpath(os.path.join(self.root, loc.node))
        real = os.path.realpath(loc.path)
        assert os.path.commonpath([node_dir, real]) == node_dir
        digest = key_digest(canon)
        assert real == os.path.join(node_dir, digest[:2], f"{digest}.{loc.generation}.db")
        assert os.path.isfile(real)
        assert internal_rows(router, key, "SELECT key FROM _shardlite_meta") == [(canon,)]
        assert (key,) in router.query(key, "SELECT k FROM kv")
        assert_layout(self.root)
        # nothing appeared next to the data root (relative "../" escapes would land here or in cwd)
        assert {p for p in _snapshot(self.parent) if not p.startswith("data")} == set()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    parent = tmp_path_factory.mktemp("keys")
    old_cwd = os.getcwd()
    os.chdir(parent)  # relative escapes would show up in the watched directory
    h = Harness(parent)
    try:
        yield h
    finally:
        h.router.close()
        os.chdir(old_cwd)


@pytest.mark.parametrize("key", FIXED_HOSTILE, ids=lambda k: ascii(k)[:40])
def test_fixed_hostile_keys_stay_inside_their_node(harness: Harness, key: str) -> None:
    harness.check(key)


@pytest.mark.parametrize("key", [b"../x", 42, None, Path("../x"), ("user", "1"), 1.5])
def test_non_text_keys_are_invalid_and_create_nothing(harness: Harness, key: Any) -> None:
    with pytest.raises(InvalidKey):
        canonical(key)
    harness.check(key)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=hostile_keys)
def test_hostile_keys_property(harness: Harness, key: str) -> None:
    harness.check(key)


def test_known_invalid_keys_are_rejected() -> None:
    for key in ["", "a\x00b", "\u200fuser", "user\u202e", "x" * 10 * 1024, "\ud800", "a\nb", "user:\u200b",
                "x" * (MAX_KEY_BYTES + 1), "\u00e9" * (MAX_KEY_BYTES // 2 + 1)]:
        with pytest.raises(InvalidKey):
            canonical(key)
    assert issubclass(InvalidKey, shardlite.ShardliteError)
    # the limit is in UTF-8 bytes, after NFC
    assert canonical("x" * MAX_KEY_BYTES) == "x" * MAX_KEY_BYTES
    assert canonical("e\u0301" * (MAX_KEY_BYTES // 2)) == "\u00e9" * (MAX_KEY_BYTES // 2)


def test_nfc_equivalent_keys_address_one_tenant(make_router: Any) -> None:
    router = make_router(schema=["CREATE TABLE kv(k TEXT)"])
    with router.transaction("user:e\u0301l\u0065\u0300ve") as tx:  # decomposed
        tx.execute("INSERT INTO kv VALUES ('decomposed')")
    with router.transaction("user:\u00e9l\u00e8ve") as tx:  # precomposed
        tx.execute("INSERT INTO kv VALUES ('precomposed')")
    assert list(router.tenants()) == ["user:\u00e9l\u00e8ve"]
    assert sorted(router.query("user:e\u0301le\u0300ve", "SELECT k FROM kv")) == [("decomposed",), ("precomposed",)]
    # the stored key is the canonical (NFC) form
    stored = internal_rows(router, "user:\u00e9l\u00e8ve", "SELECT key FROM _shardlite_meta")
    assert stored == [("user:\u00e9l\u00e8ve",)]


def test_unknown_valid_key_is_not_created_by_reads(harness: Harness) -> None:
    router = harness.router
    before = _snapshot(harness.parent)
    with pytest.raises(UnknownTenant):
        router.query("user:never-written-\u2024", "SELECT 1")
    assert router.locate("user:never-written-\u2024").state == "absent"
    assert _snapshot(harness.parent) == before


# -- canonical() ----------------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(key=st.one_of(st.text(max_size=80), assembled_keys,
                     st.text(alphabet=st.sampled_from("e\u0301\u0300\u00e9a\u1100\u1161\u11a8\uac00\u212b\u00c5A\u030a"),
                             max_size=40)))
def test_canonical_is_nfc_and_idempotent(key: str) -> None:
    try:
        canon = canonical(key)
    except InvalidKey:
        # rejection does not depend on the normal form the caller happened to use
        try:
            nfd = unicodedata.normalize("NFD", key)
        except Exception:  # pragma: no cover - lone surrogates normalise fine, but be safe
            return
        with pytest.raises(InvalidKey):
            canonical(nfd)
        return
    assert canon == unicodedata.normalize("NFC", key)
    assert canonical(canon) == canon
    assert canonical(unicodedata.normalize("NFD", key)) == canon
    assert canon and len(canon.encode("utf-8")) <= MAX_KEY_BYTES
    assert all(unicodedata.category(ch) not in {"Cc", "Cf", "Cs"} for ch in canon)
    assert isinstance(canon, str) and type(canon) is str


def test_canonical_str_subclass_is_plain_str() -> None:
    class K(str):
        pass

    out = canonical(K("user:1"))
    assert out == "user:1" and type(out) is str


# -- pair_key ---------------------------------------------------------------------------------------------------


def test_pair_key_pinned_example() -> None:
    assert pair_key("dm", "bob", "alice") == "dm:alice:bob"
    assert pair_key("dm", "alice", "bob") == "dm:alice:bob"


def _decode(part: str) -> str:
    # The whole key is NFC'ed after escaping, so an escape's "A" may have composed with a following
    # combining mark ("%3A" + U+0301 -> "%3\u00c1"): undo that before unescaping.
    nfd = unicodedata.normalize("NFD", part)
    return unicodedata.normalize("NFC", nfd.replace("%3A", ":").replace("%25", "%"))


ids = st.lists(st.sampled_from(["a", "b", ":", "%", "3", "A", "2", "5", "e\u0301", "\u0301", "\u0306", "\u0308",
                                "\u00e9", "z", "%3A", "%25"]), min_size=1, max_size=8).map("".join)
plain_ids = st.text(alphabet=st.sampled_from("ab:%3A25z\u00e9"), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(a=ids, b=ids)
def test_pair_key_is_order_free_and_decodable(a: str, b: str) -> None:
    key = pair_key("dm", a, b)
    assert key == pair_key("dm", b, a)
    assert canonical(key) == key
    parts = key.split(":")
    assert len(parts) == 3, "escaped ids must not contain a raw ':'"
    assert parts[0] == "dm"
    assert sorted([_decode(parts[1]), _decode(parts[2])]) == sorted(
        unicodedata.normalize("NFC", x) for x in (a, b))


@settings(max_examples=200, deadline=None)
@given(a=plain_ids, b=plain_ids)
def test_pair_key_parts_are_sorted(a: str, b: str) -> None:
    parts = pair_key("dm", a, b).split(":")
    assert len(parts) == 3
    assert parts[1] <= parts[2]


@settings(max_examples=300, deadline=None)
@given(a=st.integers(min_value=-(2**70), max_value=2**70), b=st.integers(min_value=-(2**70), max_value=2**70),
       c=ids)
def test_pair_key_of_int_ids_is_the_key_of_their_text(a: int, b: int, c: str) -> None:
    """Integer ids (user ids) take a shortcut: the same key as their decimal text, mixed or not."""
    assert pair_key("dm", a, b) == pair_key("dm", str(a), str(b)) == pair_key("dm", b, a)
    assert pair_key("dm", a, c) == pair_key("dm", str(a), c)
    with pytest.raises(InvalidKey):
        pair_key("dm", True, b)


def test_pair_key_parts_are_sorted_with_combining_marks_after_colon() -> None:
    parts = pair_key("dm", ":\u0306", ":\u0308").split(":")
    assert parts[1] <= parts[2]


@settings(max_examples=300, deadline=None)
@given(a=ids, b=ids, c=ids, d=ids)
def test_pair_key_is_injective(a: str, b: str, c: str, d: str) -> None:
    def nfc(s: str) -> str:
        return unicodedata.normalize("NFC", s)

    same_pair = sorted([nfc(a), nfc(b)]) == sorted([nfc(c), nfc(d)])
    assert (pair_key("dm", a, b) == pair_key("dm", c, d)) == same_pair


def test_pair_key_classic_collisions_are_avoided() -> None:
    assert pair_key("dm", "a:b", "c") != pair_key("dm", "a", "b:c")
    assert pair_key("dm", "a%3Ab", "c") != pair_key("dm", "a:b", "c")
    assert pair_key("dm", "a%", "b") != pair_key("dm", "a", "%b")
    assert pair_key("dm", 7, "alice") == pair_key("dm", "alice", "7")


@pytest.mark.parametrize("args", [("", "a", "b"), ("d:m", "a", "b"), ("dm", "", "b"), ("dm", "a", None),
                                  ("dm", b"a", "b"), ("dm", True, "b"), ("dm", "a\x00", "b")])
def test_pair_key_rejects_bad_input(args: tuple[Any, Any, Any]) -> None:
    with pytest.raises(InvalidKey):
        pair_key(*args)


def test_query_with_unhashable_key_raises_invalid_key(harness: Harness) -> None:
    with pytest.raises(InvalidKey):
        harness.router.query(["user", "1"], "SELECT 1")


# -- invisible and look-alike characters --------------------------------------------------------------------

# Independent of shardlite.core.keys: the characters a reader cannot tell apart from nothing or from a space, by
# class, with their Unicode names (the error message must name them).
LOOKALIKES: dict[str, list[str]] = {
    "variation selector": ["\ufe00", "\ufe0e", "\ufe0f", "\U000e0100", "\U000e01ef", "\u180b", "\u180f"],
    "combining grapheme joiner": ["\u034f"],
    "hangul filler": ["\u115f", "\u1160", "\u3164", "\uffa0"],
    "braille blank": ["\u2800"],
    "space separator": [chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) == "Zs" and c != 0x20],
    "other default-ignorable": ["\u00ad", "\u17b4", "\u17b5", "\u2065", "\ufff0", "\U000e0020", "\U000e0fff"],
    "format": ["\u200b", "\u200c", "\u200d", "\u200e", "\u2060", "\u2066", "\ufeff", "\u061c", "\u180e"],
    "control": ["\x00", "\t", "\n", "\x7f", "\x85"],
    "line or paragraph separator": ["\u2028", "\u2029"],
    "private use or unassigned": ["\ue000", "\U000f0000", "\u0378"],
}
LOOKALIKE_CHARS = [ch for chars in LOOKALIKES.values() for ch in chars]
# The variation-selector ranges and the rest of Default_Ignorable_Code_Point, as named in the Unicode data.
VARIATION_SELECTORS = [chr(c) for c in [*range(0x180B, 0x180E), 0x180F, *range(0xFE00, 0xFE10),
                                        *range(0xE0100, 0xE01F0)]]


def is_lookalike(ch: str) -> bool:
    """The test's own statement of what no key may contain (the table is checked separately below)."""
    return (unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
            or (unicodedata.category(ch) == "Zs" and ch != " ")
            or ch in VARIATION_SELECTORS or ch in "\u034f\u115f\u1160\u3164\uffa0\u2800\u17b4\u17b5"
            or keys_mod.is_default_ignorable(ch))


def expected_name(ch: str) -> str:
    """How the message names ``ch`` once the key is NFC (U+2000/U+2001 have canonical singletons)."""
    nfc = unicodedata.normalize("NFC", ch)
    return f"U+{ord(nfc):04X}" + (f" {unicodedata.name(nfc)}" if unicodedata.name(nfc, "") else "")


@pytest.mark.parametrize("ch", LOOKALIKE_CHARS, ids=lambda c: f"U+{ord(c):04X}")
def test_lookalike_characters_are_refused_anywhere_in_a_key_and_named(ch: str) -> None:
    assert canonical("user:alice") == "user:alice"
    for key in (f"user:ali{ch}ce", f"user:alice{ch}", f"{ch}user:alice"):
        with pytest.raises(InvalidKey) as err:
            canonical(key)
        assert expected_name(ch) in str(err.value)


def test_message_names_the_character() -> None:
    with pytest.raises(InvalidKey, match="U\\+00A0 NO-BREAK SPACE"):
        canonical("user:alice\u00a0smith")
    with pytest.raises(InvalidKey, match="U\\+FE0F VARIATION SELECTOR-16"):
        canonical("user:\u2764\ufe0f")
    with pytest.raises(InvalidKey, match="U\\+3164 HANGUL FILLER"):
        canonical("user:\u3164")
    with pytest.raises(InvalidKey, match="U\\+0000 \\(a control character\\)"):
        canonical("a\x00b")


@pytest.mark.parametrize("key", [" user:1", "user:1 ", "  ", " ", "user:1\u3000", "\u00a0user:1", "user:1\t",
                                 "\nuser:1", "user:1\u2028", "user:1\x1f"], ids=ascii)
def test_leading_and_trailing_whitespace_is_refused(key: str) -> None:
    with pytest.raises(InvalidKey):
        canonical(key)


def test_inner_ascii_space_and_visible_unicode_stay_valid() -> None:
    for key in ["org:Acme Inc", "user:a b c", "user:\u00e9l\u00e8ve", "user:\u6771\u4eac", "dm:\u0430\u0431",
                "user:\u2764", "user:\U0001f600", "room:\uac00\ub098", "user:\u1100\u1161",  # Hangul jamo, not fillers
                "x:\u2801", "user:\u00b7", "user:\u2024"]:
        assert canonical(key) == unicodedata.normalize("NFC", key)


def test_lookalike_keys_never_reach_a_tenant(make_router: Any) -> None:
    router = make_router(schema=["CREATE TABLE kv(k TEXT)"])
    with router.transaction("user:alice") as tx:
        tx.execute("INSERT INTO kv VALUES ('real')")
    for twin in ["user:alice\u00a0", "user:alice ", " user:alice", "user:ali\u034fce", "user:alice\ufe0f",
                 "user:alice\u3164", "user:alice\u2800", "user:\u2800alice", "user:alice\U000e0101"]:
        with pytest.raises(InvalidKey):
            with router.transaction(twin) as tx:
                tx.execute("INSERT INTO kv VALUES ('twin')")
        with pytest.raises(InvalidKey):
            router.locate(twin)
    assert list(router.tenants()) == ["user:alice"]
    assert router.query("user:alice", "SELECT k FROM kv") == [("real",)]


def test_default_ignorable_table_agrees_with_this_pythons_unicode_data() -> None:
    """The hard-coded Default_Ignorable_Code_Point table against ``unicodedata`` (which lacks the property)."""
    table = keys_mod._DEFAULT_IGNORABLE
    assert all(lo <= hi for lo, hi in table)
    assert all(a[1] < b[0] for a, b in zip(table, table[1:], strict=False)), "sorted, disjoint ranges"
    members = {cp for lo, hi in table for cp in range(lo, hi + 1)}
    if unicodedata.unidata_version == "14.0.0":
        assert len(members) == 4174  # "Total code points" in DerivedCoreProperties-14.0.0.txt
    # Derivation: Other_Default_Ignorable_Code_Point + Cf + Variation_Selector - White_Space - FFF9..FFFB
    # - Egyptian hieroglyph format controls - Prepended_Concatenation_Mark.
    not_ignorable_cf = {*range(0xFFF9, 0xFFFC), *range(0x13430, 0x13440), *range(0x0600, 0x0606), 0x06DD, 0x070F,
                        0x0890, 0x0891, 0x08E2, 0x110BD, 0x110CD}
    for cp in range(0x110000):
        if unicodedata.category(chr(cp)) == "Cf":
            assert (cp in members) == (cp not in not_ignorable_cf), f"U+{cp:04X}"
    assert {ord(ch) for ch in VARIATION_SELECTORS} <= members
    assert {0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0} <= members
    assert not any(chr(cp).isspace() for cp in members)
    for cp in members:
        assert unicodedata.category(chr(cp)) in {"Cf", "Mn", "Lo", "Cn"}, f"U+{cp:04X}"
        assert keys_mod.is_default_ignorable(chr(cp))
    for cp in (0x00AC, 0x00AE, 0x034E, 0x0350, 0x115E, 0x1161, 0x3163, 0x3165, 0xFFF9, 0xE1000, 0x10FFFF, 0):
        assert not keys_mod.is_default_ignorable(chr(cp)), f"U+{cp:04X}"


def test_every_whitespace_but_space_is_refused_as_invisible() -> None:
    """``_validate`` checks only U+0020 at the ends of a key: every other whitespace is refused as a character."""
    spaces = [chr(cp) for cp in range(0x110000) if chr(cp).isspace()]
    assert " " in spaces and len(spaces) > 20
    for ch in spaces:
        assert (keys_mod.invisible_character(ch) is None) == (ch == " "), f"U+{ord(ch):04X}"


ordinary = st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S"])
refused = st.sampled_from(LOOKALIKE_CHARS) | st.characters(categories=["Cc", "Cf", "Co", "Cn", "Cs", "Zs", "Zl",
                                                                        "Zp"], exclude_characters=" ")
mixed_keys = st.text(alphabet=ordinary | refused | st.just(" ") | st.just(":"), max_size=30)


@settings(max_examples=400, deadline=None)
@given(key=st.one_of(mixed_keys, st.text(max_size=40), hostile_keys))
def test_valid_keys_are_free_of_every_lookalike_and_stable(key: str) -> None:
    try:
        canon = canonical(key)
    except InvalidKey:
        return
    assert not any(is_lookalike(ch) for ch in canon), ascii(canon)
    assert canon[0] != " " and canon[-1] != " "
    assert canonical(canon) == canon
    assert keys_mod.invisible_character(canon) is None


valid_keys = st.text(alphabet=ordinary | st.just(" ") | st.just(":"), min_size=1, max_size=30).filter(
    lambda k: k.strip() == k and k.strip() != "")


@settings(max_examples=400, deadline=None)
@given(key=valid_keys, ch=refused, where=st.integers(min_value=0, max_value=30))
def test_inserting_a_lookalike_makes_any_valid_key_invalid(key: str, ch: str, where: int) -> None:
    try:
        canonical(key)
    except InvalidKey:
        return  # e.g. too long after NFC: not a valid key to start from
    where = min(where, len(key))
    with pytest.raises(InvalidKey) as err:
        canonical(key[:where] + ch + key[where:])
    if unicodedata.category(ch) != "Cs":
        assert expected_name(ch) in str(err.value)


@pytest.mark.parametrize("bad_id", [" bob", "bob ", "bob\u00a0", "b\ufe0fob", "\u3164"], ids=ascii)
def test_pair_key_ids_follow_the_key_rules_in_either_order(bad_id: str) -> None:
    for args in (("dm", bad_id, "alice"), ("dm", "alice", bad_id), ("dm", bad_id, "zed"), ("dm", "zed", bad_id)):
        with pytest.raises(InvalidKey):
            pair_key(*args)
    assert pair_key("dm", "bob smith", "alice") == "dm:alice:bob smith"
