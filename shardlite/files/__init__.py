"""The SQLite engine: tenant files and the embedded global DBs (connections, pragmas, the authorizer, schemas,
templates, the seed WAL, checkpoints, the handle pool, copies, result limits)."""
