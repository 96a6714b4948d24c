"""``python -m examples.chat``: serve the chat example on http://127.0.0.1:8000 (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import os

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the shardlite chat example.")
    parser.add_argument("--root", default=os.environ.get("SHARDLITE_ROOT", "./data"), help="data root (./data)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes sharing the files")
    args = parser.parse_args()
    os.environ["SHARDLITE_ROOT"] = os.path.abspath(args.root)
    print(f"shardlite chat: serving http://{args.host}:{args.port}/  (data under {os.environ['SHARDLITE_ROOT']}, "
          f"{args.workers} worker(s), outbox relay running in-process). Ctrl-C stops it.", flush=True)
    uvicorn.run("examples.chat.app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, log_level="warning")


if __name__ == "__main__":
    main()
