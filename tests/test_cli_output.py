"""Text a tenant, a user or an event controls is printed literally by every command: rich markup is never
interpreted (a key holding ``[/]`` used to crash ``shardlite tenants``), emoji codes stay text, and
characters that could act on a terminal (escape sequences, C1 controls, bidi overrides, line separators)
are shown escaped; ``--json`` output escapes them as JSON does and decodes to the exact values."""

from __future__ import annotations

import json
import logging
import os
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_routers import run_cli

from shardlite import Router
from shardlite.cli.common import _LiteralFormatter, json_line, literal
from shardlite.core.outbox import Event, RetryPolicy

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
MARKUP_KEYS = ["acct:[/]", "acct:[bold]x", "acct:[link=https://evil.example]y[/link]", "acct::smile:"]
#: terminal escapes (OSC title, CSI via C1), a bidi override, a line separator, a newline, a tab, DEL, a BOM
HOSTILE = "\x1b]0;pwned\x07 \x9b31m \u202eevil\u202c \u2028 two\nlines\tend\x7f\ufeff"
HOSTILE_SHOWN = "\\x1b]0;pwned\\x07 \\x9b31m \\u202eevil\\u202c \\u2028 two\\nlines\\tend\\x7f\\ufeff"
#: characters no output line may carry raw
RAW = ["\x1b", "\x07", "\x9b", "\u202e", "\u202c", "\u2028", "\x7f", "\ufeff", "\t"]


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Router]:
    monkeypatch.setenv("COLUMNS", "400")  # wide tables: one row per line, nothing folded
    with Router(tmp_path / "data", schema=SCHEMA, retry=RetryPolicy(max_attempts=2, backoff_base=0.001,
                                                                     backoff_cap=0.01)) as router:
        for key in MARKUP_KEYS:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(v) VALUES (?)", (HOSTILE,))
        yield router


def assert_clean(text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"raw {ch!r} in the output"
    assert "\U0001f604" not in text  # :smile: was not turned into an emoji


def test_literal_escapes_every_unprintable_character_and_nothing_else() -> None:
    assert literal(HOSTILE) == HOSTILE_SHOWN
    assert literal("[bold]x[/] :smile: é 中文 \\x") == "[bold]x[/] :smile: é 中文 \\x"
    assert literal(42) == "42" and literal(b"\x1b") == "b'\\x1b'"
    for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, 0x202E, 0x2066, 0x200B, 0xFEFF, 0xD800,
                 0xE0001, 0xE000]:
        shown = literal(chr(code))
        assert shown.isprintable() and shown.isascii() and shown.startswith("\\"), hex(code)
    assert literal("\U000e0001") == "\\U000e0001"


def test_json_lines_escape_what_could_act_on_a_terminal_and_decode_to_the_same_values() -> None:
    values = {"text": HOSTILE, "surrogate": "\ud800", "tag": "\U000e0041", "fine": "é 中文 [bold]"}
    line = json_line(values)
    assert line.isprintable() and "\n" not in line
    assert_clean(line)
    assert json.loads(line) == values
    assert "é 中文 [bold]" in line  # printable text stays readable
    for ch in ("\u2028", "\u2029", "\x85", "\x9b", "\u202e"):
        assert json_line(ch) == f'"\\u{ord(ch):04x}"'
    assert json_line("\U000e0041") == '"\\udb40\\udc41"'


def test_json_lines_are_strict_json_even_for_infinite_numbers(root: Router,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    def strict(text: str) -> Any:
        def refuse(name: str) -> None:
            raise AssertionError(f"{name} is not JSON")
        return json.loads(text, parse_constant=refuse)

    assert strict(json_line({"rows": [[float("inf"), float("-inf"), float("nan"), 1.5]]})) == {
        "rows": [["Infinity", "-Infinity", "NaN", 1.5]]}
    code, out, err = run_cli(capsys, "query", "--root", root.root, "--json", "--all", "SELECT 1e999, -1e999, 2.5")
    assert code == 0, err
    lines = [strict(line) for line in out.splitlines()]
    assert lines and all(line["rows"] == [["Infinity", "-Infinity", 2.5]] for line in lines)


def test_markup_in_keys_is_shown_as_it_is(root: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "tenants", "--root", root.root)
    assert code == 0, err
    for key in MARKUP_KEYS:
        assert f"│ {key} " in out, key
    assert_clean(out)
    code, out, err = run_cli(capsys, "locate", "acct:[link=https://evil.example]y[/link]", "--root", root.root)
    assert code == 0, err
    assert "locate acct:[link=https://evil.example]y[/link]" in out
    code, out, _ = run_cli(capsys, "tenants", "--json", "--root", root.root)
    assert [json.loads(line)["key"] for line in out.splitlines()] == sorted(MARKUP_KEYS)


def test_query_shows_rows_and_column_names_literally(root: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "query", "--all", 'SELECT v AS "[red]col", v || char(27) AS x FROM t',
                             "--root", root.root)
    assert code == 0, err
    assert_clean(out)
    assert "[red]col" in out and out.count(HOSTILE_SHOWN) == 2 * len(MARKUP_KEYS)
    code, out, err = run_cli(capsys, "query", "--all", "SELECT v FROM t", "--json", "--root", root.root)
    assert code == 0, err
    assert_clean(out)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [obj["rows"] for obj in lines] == [[[HOSTILE]]] * len(MARKUP_KEYS)


def test_query_errors_on_stderr_are_literal(root: Router, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "query", "--all", "SELECT nope FROM t", "--root", root.root)
    assert code == 1 and len(err.splitlines()) == len(MARKUP_KEYS)
    assert "error: acct:[/]: " in err


def test_relay_status_and_dead_letters_show_topics_and_errors_literally(root: Router,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    @root.handler("[bold]t")
    def failing(tx: Any, event: Event) -> None:
        raise RuntimeError(f"boom {event.payload['text']}")

    with root.transaction("src:1") as tx:
        tx.emit("acct:[/]", "[bold]t", {"text": HOSTILE})  # dies: its error quotes the payload
        tx.emit("acct:[bold]x", "[link=https://evil.example]u[/link]", {"text": HOSTILE})  # no handler
    root.relay.drain(timeout=0.5)
    # what a relay records when it logs an error line (shown by `relay status` in any process)
    root.relay._record_error({"at": time.time(), "tenant": "acct:[/]", "error": "boom " + HOSTILE})

    code, out, err = run_cli(capsys, "relay", "status", "--root", root.root)
    assert code == 0, err
    assert_clean(out)
    assert "[link=https://evil.example]u[/link] 1" in out
    (last,) = [line for line in out.splitlines() if line.startswith("last relay error")]
    assert "boom " + HOSTILE_SHOWN in last  # its newline escaped too: one line

    code, out, err = run_cli(capsys, "relay", "dead", "--root", root.root)
    assert code == 0, err
    assert_clean(out)
    assert "acct:[/]" in out and "[bold]t" in out and "boom \\x1b]0;pwned" in out

    code, out, err = run_cli(capsys, "relay", "dead", "--json", "--root", root.root)
    assert_clean(out)
    (letter,) = [json.loads(line) for line in out.splitlines()]
    assert letter["topic"] == "[bold]t" and HOSTILE in letter["error"]
    code, out, err = run_cli(capsys, "relay", "status", "--json", "--root", root.root)
    assert_clean(out)
    assert HOSTILE in json.loads(out)["last_error"]["error"]


def test_account_fields_are_shown_literally(root: Router, capsys: pytest.CaptureFixture[str]) -> None:
    root.accounts.register("someone@example.org", name="[bold]Evil[/bold] " + HOSTILE)
    code, out, err = run_cli(capsys, "accounts", "show", "someone@example.org", "--root", root.root)
    assert code == 0, err
    assert_clean(out)
    assert "[bold]Evil[/bold] " + HOSTILE_SHOWN in out
    code, out, err = run_cli(capsys, "accounts", "show", "someone@example.org", "--json", "--root", root.root)
    assert_clean(out)
    assert json.loads(out)["profile"]["name"] == "[bold]Evil[/bold] " + HOSTILE


def test_relay_log_lines_under_relay_run_are_literal() -> None:
    record = logging.LogRecord("shardlite.services.relay", logging.WARNING, __file__, 1, "tenant %s failed: %s",
                               ("acct:[/]", HOSTILE), None)
    line = _LiteralFormatter("%(levelname)s %(message)s").format(record)
    assert line == f"WARNING tenant acct:[/] failed: {HOSTILE_SHOWN}"


def test_node_paths_with_markup_are_shown_as_they_are(root: Router, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    odd = tmp_path / "[bold]disk[/]"
    code, out, err = run_cli(capsys, "nodes", "add", "n2", "--path", os.fspath(odd), "--root", root.root)
    assert code == 0 and os.fspath(odd) in out, err
    for command in (["status"], ["nodes", "list"]):
        code, out, err = run_cli(capsys, *command, "--root", root.root)
        assert code == 0 and os.fspath(odd) in out, (command, err)


def test_an_error_quoting_hostile_input_stays_one_escaped_line(root: Router,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "accounts", "show", "\x1b[2J\u202e@example.org\nX", "--root", root.root)
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert_clean(err)
    code, out, err = run_cli(capsys, "status", "--root", root.root, "\x1b]0;title\x07")  # argparse's own error
    assert code == 2 and "Traceback" not in err
    assert_clean(err)


@pytest.mark.parametrize("category", ["Cc", "Cf", "Zl", "Zp"])
def test_every_control_and_format_character_is_escaped(category: str) -> None:
    found = [chr(c) for c in range(0x110000) if unicodedata.category(chr(c)) == category]
    assert found
    for ch in found:
        assert literal(ch).startswith("\\") and literal(ch).isprintable(), hex(ord(ch))
        assert json.loads(json_line(ch)) == ch and json_line(ch).isascii()
