"""Load generator for the chat example over HTTP: N simulated users sending and reading messages.

    python -m examples.chat.load --url http://127.0.0.1:8000 --users 50 --duration 20

Against a running server (``make demo``, or ``python -m examples.chat --root /tmp/chat``). Each simulated
user has its own ``httpx.AsyncClient`` (its own session cookie). Setup, untimed: every user signs up with
an e-mail address unique to this run and logs in; the first user creates a room ``load <run id>`` and
the others join it. Then, until ``--duration`` seconds have passed, every user loops over: send a DM to a
random other user (40%), read the DM history with a random other user (30%), read their activity feed
(20%), post to the shared room (10%). At the end it prints ops/s and p50/p99 latency per kind of
operation and overall, and the errors, if any (a non-2xx answer counts as an error, not as an operation).
Every request names the server's own origin in its Origin header, as a browser would: the server refuses
state-changing requests from elsewhere.

The library-level benchmark of the same workload (no HTTP) is ``benchmarks/chat_workload.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import sys
import time
from urllib.parse import urlsplit

import httpx

KINDS = ("send_dm", "dm_history", "feed", "post_room")
WEIGHTS = (40, 30, 20, 10)
PASSWORD = "load-test-password"
WORDS = "hello there how are you the meeting moved see you at lunch ok thanks ship it coffee later".split()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]  # nearest rank


def origin(base: str) -> str:
    """``scheme://host[:port]`` of the server's URL: the Origin header the server requires on every POST
    (browsers send it by themselves; see examples/chat/security.py)."""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}"


class SimUser:
    def __init__(self, base: str, index: int, run: str) -> None:
        self.client = httpx.AsyncClient(base_url=base, timeout=30.0, headers={"Origin": origin(base)})
        self.email = f"load-{run}-{index}@example.com"
        self.name = f"load{index}-{run}"
        self.id = 0

    async def signup_and_login(self) -> None:
        r = await self.client.post("/api/signup", json={"email": self.email, "password": PASSWORD, "name": self.name})
        r.raise_for_status()
        r = await self.client.post("/api/login", json={"email": self.email, "password": PASSWORD})
        r.raise_for_status()
        self.id = int(r.json()["id"])


async def setup(base: str, n: int, concurrency: int) -> tuple[list[SimUser], int, str]:
    run = secrets.token_hex(4)
    users = [SimUser(base, i, run) for i in range(n)]
    gate = asyncio.Semaphore(concurrency)  # scrypt makes sign-up deliberately slow: do not flood the server

    async def one(user: SimUser) -> None:
        async with gate:
            await user.signup_and_login()

    await asyncio.gather(*(one(u) for u in users))
    r = await users[0].client.post("/api/rooms", json={"name": f"load {run}"})
    r.raise_for_status()
    room = int(r.json()["id"])

    async def join(user: SimUser) -> None:
        async with gate:
            (await user.client.post(f"/api/rooms/{room}/join")).raise_for_status()

    await asyncio.gather(*(join(u) for u in users[1:]))
    return users, room, run


async def simulate(user: SimUser, others: list[SimUser], room: int, deadline: float, seed: int,
                   lat: dict[str, list[float]], errors: dict[str, int]) -> None:
    rng = random.Random(seed)
    c = user.client
    while time.perf_counter() < deadline:
        kind = rng.choices(KINDS, WEIGHTS)[0]
        other = rng.choice(others)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 15)))
        t0 = time.perf_counter()
        try:
            if kind == "send_dm":
                r = await c.post(f"/api/dm/{other.id}", json={"text": text})
            elif kind == "dm_history":
                r = await c.get(f"/api/dm/{other.id}", params={"limit": 50})
            elif kind == "feed":
                r = await c.get("/api/feed", params={"limit": 50})
            else:
                r = await c.post(f"/api/rooms/{room}/messages", json={"text": text})
            elapsed = time.perf_counter() - t0
            if r.status_code >= 300:
                key = f"{kind}: HTTP {r.status_code}"
                errors[key] = errors.get(key, 0) + 1
                continue
        except httpx.HTTPError as exc:
            key = f"{kind}: {type(exc).__name__}"
            errors[key] = errors.get(key, 0) + 1
            continue
        lat[kind].append(elapsed)


async def main_async(args: argparse.Namespace) -> int:
    if args.users < 2:
        print("--users must be at least 2 (users send each other DMs)", file=sys.stderr)
        return 2
    print(f"setting up {args.users} users on {args.url} (sign-up + login, a shared room)...", flush=True)
    t0 = time.perf_counter()
    try:
        users, room, run = await setup(args.url, args.users, args.setup_concurrency)
    except httpx.HTTPError as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 1
    print(f"ready in {time.perf_counter() - t0:.1f} s (run {run}, room {room}); "
          f"running for {args.duration:.0f} s...", flush=True)
    lat: dict[str, list[float]] = {k: [] for k in KINDS}
    errors: dict[str, int] = {}
    start = time.perf_counter()
    deadline = start + args.duration
    try:
        await asyncio.gather(*(simulate(u, [o for o in users if o is not u], room, deadline, args.seed + i, lat,
                                        errors) for i, u in enumerate(users)))
    finally:
        elapsed = time.perf_counter() - start
        await asyncio.gather(*(u.client.aclose() for u in users), return_exceptions=True)
    total = sum(len(v) for v in lat.values())
    print(f"\n{args.users} users, {elapsed:.1f} s, {total} operations ({total / elapsed:.0f} ops/s)\n")
    print(f"{'operation':<12} {'count':>8} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    rows: list[tuple[str, list[float]]] = [(k, lat[k]) for k in KINDS]
    rows.append(("all", [x for k in KINDS for x in lat[k]]))
    for name, values in rows:
        print(f"{name:<12} {len(values):>8} {len(values) / elapsed:>8.0f} {percentile(values, 0.5) * 1e3:>8.2f} "
              f"{percentile(values, 0.99) * 1e3:>8.2f}")
    if errors:
        print("\nerrors: " + ", ".join(f"{k} ×{v}" for k, v in sorted(errors.items())))
    return 1 if errors and not total else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Load generator for the shardlite chat example (over HTTP).")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (http://127.0.0.1:8000)")
    parser.add_argument("--users", type=int, default=20, help="simulated users, each with its own client (20)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load after setup (10)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--setup-concurrency", type=int, default=8, help="parallel sign-ups during setup (8)")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
