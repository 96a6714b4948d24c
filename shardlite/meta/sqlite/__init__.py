"""The embedded metadata backend (the default): SQLite files in the data root, through APSW.

``<root>/global.db`` holds shardlite's own tables (only shardlite's statements ever run on it) and
``<root>/app_global.db`` the app's global tables (user SQL, under the authorizer); see
:mod:`shardlite.files.globaldb`.
"""

from __future__ import annotations

from .meta import SqliteMeta

__all__ = ["SqliteMeta"]
