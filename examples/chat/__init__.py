"""The chat example: FastAPI + a static page over shardlite (see README.md in this folder)."""
