"""The chat example's outbox relay as its own process::

    SHARDLITE_ROOT=./data shardlite relay run --app examples.chat.relay:router

With ``create_app(relay=False)`` (or ``python -m examples.chat --relay-process``) the web processes only
emit, and this process delivers every feed entry. Under the GIL a relay thread and the event loop of a web
process share one core; in its own process the relay has a core of its own (the headline benchmark's
"relay process" row measures the difference). With the metadata on PostgreSQL it is slower today than the
in-process relay: each pass parks every source it empties with one round trip to the server, under that
source's write lock, and the web processes wake those flags again at their next message (README, rows
m7d/m7e and the note "m7a, chat"). Importing this module starts nothing.
"""

from __future__ import annotations

import os

from shardlite import Router

from .domain import GLOBAL_SCHEMA, SCHEMA

__all__ = ["router"]


def router() -> Router:
    """A Router on ``$SHARDLITE_ROOT`` (default ``./data``) with the chat's schemas and the feed handler.
    ``$CHAT_MAX_OPEN`` sizes its connection pool (default 1024: the relay writes every source and feed)."""
    r = Router(os.environ.get("SHARDLITE_ROOT", "./data"), schema=SCHEMA, global_schema=GLOBAL_SCHEMA,
               max_open=int(os.environ.get("CHAT_MAX_OPEN", "1024")))
    r.use_feed("message")
    return r
