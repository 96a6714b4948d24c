"""shardlite's metadata tables on both backends, side by side (pure data): what ``meta copy`` moves from
``global.db`` to PostgreSQL, and what a backup of a PostgreSQL root exports back into a SQLite file of
``global.db``'s own schema (so backups restore the same way whichever backend made them)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Table", "TABLES"]


@dataclass(frozen=True, slots=True)
class Table:
    """One table's copy: SQLite name, PostgreSQL name, the columns (same names on both sides), the primary
    key (the order both sides are compared in) and the identity column whose sequence carries over."""

    sqlite: str
    pg: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    sequence: str | None = None


#: Every table of global.db that ``meta copy`` moves, parents before children (foreign keys).
TABLES: tuple[Table, ...] = (
    Table("_shardlite_catalog_meta", "kv", ("name", "value"), ("name",)),
    Table("_shardlite_nodes", "nodes", ("name", "path", "weight", "state", "added"), ("name",)),
    Table("_shardlite_tenants", "tenants", ("key", "node", "generation", "epoch", "state", "incarnation",
                                            "schema_version", "created", "updated"), ("key",)),
    Table("_shardlite_generations", "generations", ("generation", "key", "node", "purpose", "at"),
          ("generation",), "generation"),
    Table("_shardlite_accounts", "accounts", ("id", "email", "email_key", "name_key", "profile", "created",
                                              "updated"), ("id",), "id"),
    Table("_shardlite_credentials", "credentials", ("account_id", "scheme", "salt", "hash", "updated"),
          ("account_id",)),
    Table("_shardlite_sessions", "sessions", ("token_hash", "account_id", "created", "expires", "idle_ttl",
                                              "last_seen", "revoked"), ("token_hash",)),
    Table("_shardlite_pending", "pending", ("key", "version", "due", "since", "parked"), ("key",)),
    Table("_shardlite_dead_letters", "dead_letters", ("source", "incarnation", "seq", "dest", "topic", "payload",
                                                      "created", "attempts", "error", "died"),
          ("source", "incarnation", "seq")),
    Table("_shardlite_rebalance", "plans", ("id", "created", "state", "fingerprint", "summary"), ("id",), "id"),
    Table("_shardlite_moves", "moves", ("plan_id", "key", "source", "target", "source_generation",
                                        "target_generation", "size", "step", "owner", "lease", "error", "pause_ms",
                                        "updated"), ("plan_id", "key")),
)
