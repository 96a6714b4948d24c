"""``python -m examples.chat``: serve the chat example on http://127.0.0.1:8000 (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import uvicorn


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the shardlite chat example.")
    parser.add_argument("--root", default=os.environ.get("SHARDLITE_ROOT", "./data"), help="data root (./data)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes sharing the files")
    parser.add_argument("--relay-process", action="store_true",
                        help="run the outbox relay as its own process (`shardlite relay run --app "
                             "examples.chat.relay:router`) instead of inside each web worker")
    parser.add_argument("--secure-cookies", action="store_true",
                        default=os.environ.get("CHAT_SECURE_COOKIES", "0") == "1",
                        help="mark the session cookie Secure (HTTPS only): for deployments behind TLS "
                             "(also CHAT_SECURE_COOKIES=1)")
    args = parser.parse_args()
    os.environ["SHARDLITE_ROOT"] = os.path.abspath(args.root)
    os.environ["CHAT_SECURE_COOKIES"] = "1" if args.secure_cookies else "0"  # read by create_app in each worker
    where = "in its own process" if args.relay_process else "in-process"
    cookies = "; session cookie Secure: serve it through HTTPS" if args.secure_cookies else ""
    print(f"shardlite chat: serving http://{args.host}:{args.port}/  (data under {os.environ['SHARDLITE_ROOT']}, "
          f"{args.workers} worker(s), outbox relay running {where}{cookies}). Ctrl-C stops it.", flush=True)
    if not args.relay_process:
        uvicorn.run("examples.chat.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")
        return
    os.environ["CHAT_RELAY"] = "0"
    from shardlite import Router  # the root must exist before the relay process opens it

    from .domain import GLOBAL_SCHEMA, SCHEMA

    Router(os.environ["SHARDLITE_ROOT"], schema=SCHEMA, global_schema=GLOBAL_SCHEMA).close()
    relay = subprocess.Popen([sys.executable, "-m", "shardlite", "relay", "run", "--app", "examples.chat.relay:router"])
    try:
        uvicorn.run("examples.chat.app:create_app", factory=True, host=args.host, port=args.port,
                    workers=args.workers, log_level="warning")
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=60)


if __name__ == "__main__":
    main()
