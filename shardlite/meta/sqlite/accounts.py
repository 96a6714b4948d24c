"""Accounts and credentials in ``<root>/global.db``: the SQLite :class:`~shardlite.meta.accounts.AccountStore`
and :class:`~shardlite.meta.accounts.CredentialStore`.

Every write is one ``BEGIN IMMEDIATE`` transaction on the global writer (:class:`~shardlite.files.globaldb.GlobalDB`),
which also serialises the read-modify-write of :meth:`SqliteAccounts.update_profile`. E-mail uniqueness is
the ``UNIQUE`` constraint on ``_shardlite_accounts.email_key``; a violation is told from others by the
constraint it names (SQLite reports ``UNIQUE constraint failed: _shardlite_accounts.email_key``, the
table and column of the constraint, never caller text). ``ON DELETE CASCADE`` (with ``PRAGMA foreign_keys``
on every global connection) deletes credentials and sessions with their account; ``AUTOINCREMENT`` keeps
ids never reused.
"""

from __future__ import annotations

import json
from typing import Any

import apsw

from ...errors import EmailTaken, UnknownAccount
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.globaldb import GlobalDB
from ...front.accounts import Account
from ..accounts import (
    ACCOUNT_COLUMNS,
    CREDENTIAL_COLUMNS,
    KEPT,
    SESSION_COLUMNS,
    AccountRows,
    AccountStore,
    Credential,
    CredentialStore,
    Login,
    ProfileMerge,
    checked_account,
    checked_credential,
    checked_rows,
    refuse_nul,
    without_present,
)

__all__ = ["SqliteAccounts", "SqliteCredentials"]

_COLUMNS = "id, email, profile, created, updated"
#: The constraint that decides e-mail uniqueness, as SQLite identifies it in a violation: the extended
#: result code of a UNIQUE constraint, and the table and column of its index (SQLite's own text).
_UNIQUE = apsw.mapping_extended_result_codes["SQLITE_CONSTRAINT_UNIQUE"]
_EMAIL_CONSTRAINT = "UNIQUE constraint failed: _shardlite_accounts.email_key"
_FOREIGN_KEY = apsw.mapping_extended_result_codes["SQLITE_CONSTRAINT_FOREIGNKEY"]


def _account(row: tuple[Any, ...]) -> Account:
    return Account(int(row[0]), str(row[1]), json.loads(row[2]), float(row[3]), float(row[4]))


def _email_taken(exc: apsw.ConstraintError) -> bool:
    """Whether ``exc`` is a violation of the e-mail key's UNIQUE constraint: by its identity (the UNIQUE
    result code, and exactly SQLite's description of that index), not by a word in a message (gap F5)."""
    return getattr(exc, "extendedresult", None) == _UNIQUE and bool(exc.args) and str(exc.args[0]) == _EMAIL_CONSTRAINT


class SqliteAccounts:
    """``meta.accounts`` on ``global.db`` (see :class:`~shardlite.meta.accounts.AccountStore`)."""

    def __init__(self, db: GlobalDB) -> None:
        self._db = db

    def create(self, email: str, email_key: str, name_key: str, profile: str, now: float,
               credential: Credential | None = None) -> int:
        checked_account(email, email_key, name_key, profile)
        if credential is not None:
            checked_credential(credential)
        try:
            with self._db.write() as conn:
                conn.execute(_I + "INSERT INTO _shardlite_accounts(email, email_key, name_key, profile, created, "
                             "updated) VALUES (?, ?, ?, ?, ?, ?)", (email, email_key, name_key, profile, now, now))
                account_id = int(conn.last_insert_rowid())
                if credential is not None:
                    conn.execute(_I + "INSERT INTO _shardlite_credentials(account_id, scheme, salt, hash, updated) "
                                 "VALUES (?, ?, ?, ?, ?)", (account_id, *credential, now))
        except apsw.ConstraintError as exc:
            if _email_taken(exc):
                raise EmailTaken("an account with this e-mail address already exists") from None
            raise
        return account_id

    def get(self, account_id: int) -> Account | None:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM _shardlite_accounts WHERE id = ?", (account_id,))
        return _account(rows[0]) if rows else None

    def by_email_key(self, email_key: str) -> Account | None:
        rows = self._db.read(f"SELECT {_COLUMNS} FROM _shardlite_accounts WHERE email_key = ?", (email_key,))
        return _account(rows[0]) if rows else None

    def search(self, prefix: str, limit: int) -> list[Account]:
        upper = prefix + "\U0010ffff"
        rows = self._db.read(
            f"SELECT {_COLUMNS}, name_key FROM _shardlite_accounts WHERE name_key >= ? AND name_key < ? "
            f"UNION SELECT {_COLUMNS}, name_key FROM _shardlite_accounts WHERE email_key >= ? AND email_key < ? "
            "ORDER BY name_key, id LIMIT ?", (prefix, upper, prefix, upper, limit))
        return [_account(row) for row in rows]

    def update_profile(self, account_id: int, merge: ProfileMerge, now: float) -> Account:
        # F8: atomic only because BEGIN IMMEDIATE admits one writer to global.db at a time
        with self._db.write() as conn:
            rows: list[Any] = conn.execute(f"SELECT {_COLUMNS} FROM _shardlite_accounts WHERE id = ?",
                                           (account_id,)).fetchall()
            if not rows:
                raise UnknownAccount(f"no account {account_id!r}")
            document, name_key = merge(json.loads(rows[0][2]))
            refuse_nul(name_key, "name")
            refuse_nul(document, "profile")
            conn.execute(_I + "UPDATE _shardlite_accounts SET profile = ?, name_key = ?, updated = ? WHERE id = ?",
                         (document, name_key, now, account_id))
        return Account(account_id, str(rows[0][1]), json.loads(document), float(rows[0][3]), now)

    def change_email(self, account_id: int, email: str, email_key: str, now: float) -> None:
        refuse_nul(email, "address", email=True)
        refuse_nul(email_key, "address key", email=True)
        try:
            with self._db.write() as conn:
                conn.execute(_I + "UPDATE _shardlite_accounts SET email = ?, email_key = ?, updated = ? WHERE id = ?",
                             (email, email_key, now, account_id))
                if conn.changes() == 0:
                    raise UnknownAccount(f"no account {account_id!r}")
        except apsw.ConstraintError as exc:
            if _email_taken(exc):
                raise EmailTaken("an account with this e-mail address already exists") from None
            raise

    def delete(self, account_id: int) -> None:
        with self._db.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_accounts WHERE id = ?", (account_id,))
            if conn.changes() == 0:
                raise UnknownAccount(f"no account {account_id!r}")

    def has_rows(self) -> bool:
        return bool(self._db.read("SELECT 1 FROM _shardlite_accounts UNION ALL SELECT 1 FROM _shardlite_sessions "
                                  "LIMIT 1"))

    def clear(self) -> None:
        with self._db.write() as conn:
            for table in ("_shardlite_sessions", "_shardlite_credentials", "_shardlite_accounts"):
                conn.execute(f"{_I}DELETE FROM {table}")

    def import_rows(self, rows: AccountRows, *, keep_existing: bool = False) -> dict[str, int]:
        checked_rows(rows)
        copied: dict[str, int] = {}
        try:
            with self._db.write() as conn:
                if keep_existing:
                    present = conn.execute(
                        f"{_I}SELECT id, email_key FROM _shardlite_accounts WHERE id IN (SELECT value FROM "
                        "json_each(?)) OR email_key IN (SELECT value FROM json_each(?))",
                        (json.dumps([row[0] for row in rows.accounts]),
                         json.dumps([row[2] for row in rows.accounts]))).fetchall()
                    rows, copied[KEPT] = without_present(rows, present)
                for table, columns, found in (("_shardlite_accounts", ACCOUNT_COLUMNS, rows.accounts),
                                              ("_shardlite_credentials", CREDENTIAL_COLUMNS, rows.credentials),
                                              ("_shardlite_sessions", SESSION_COLUMNS, rows.sessions)):
                    if found:
                        # OR REPLACE: a row with the same primary key, or (accounts) the same e-mail key, goes;
                        # an explicit id past the AUTOINCREMENT counter moves the counter (sqlite_sequence)
                        conn.executemany(f"{_I}INSERT OR REPLACE INTO {table}({', '.join(columns)}) "
                                         f"VALUES ({', '.join('?' for _ in columns)})", found)
                    copied[table] = len(found)
        except apsw.ConstraintError as exc:
            if getattr(exc, "extendedresult", None) == _FOREIGN_KEY:
                raise UnknownAccount("a credential or session to import names an account that does not "
                                     "exist; nothing was imported") from None
            raise
        return copied


class SqliteCredentials:
    """``meta.credentials`` on ``global.db`` (see :class:`~shardlite.meta.accounts.CredentialStore`)."""

    def __init__(self, db: GlobalDB) -> None:
        self._db = db

    def set(self, account_id: int, credential: Credential, now: float) -> None:
        checked_credential(credential)
        with self._db.write() as conn:
            if not conn.execute("SELECT 1 FROM _shardlite_accounts WHERE id = ?", (account_id,)).fetchall():
                raise UnknownAccount(f"no account {account_id!r}")
            conn.execute(_I + "INSERT INTO _shardlite_credentials(account_id, scheme, salt, hash, updated) "
                         "VALUES (?, ?, ?, ?, ?) ON CONFLICT(account_id) DO UPDATE SET scheme = excluded.scheme, "
                         "salt = excluded.salt, hash = excluded.hash, updated = excluded.updated",
                         (account_id, *credential, now))

    def has(self, account_id: int) -> bool:
        return bool(self._db.read("SELECT 1 FROM _shardlite_credentials WHERE account_id = ?", (account_id,)))

    def for_login(self, email_key: str) -> Login | None:
        rows = self._db.read(
            "SELECT a.id, c.scheme, c.salt, c.hash FROM _shardlite_accounts a "
            "LEFT JOIN _shardlite_credentials c ON c.account_id = a.id WHERE a.email_key = ?", (email_key,))
        if not rows:
            return None
        account_id, scheme, salt, stored = rows[0]
        if scheme is None:
            return Login(int(account_id), None)
        return Login(int(account_id), Credential(str(scheme), bytes(salt), bytes(stored)))


def _conforms(accounts: SqliteAccounts, credentials: SqliteCredentials) -> tuple[AccountStore, CredentialStore]:
    return accounts, credentials  # mypy checks here that both satisfy their contracts
