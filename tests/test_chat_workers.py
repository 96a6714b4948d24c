"""The chat example served by ``python -m examples.chat --workers 2``: two uvicorn worker processes on the
same files, each running its own relay. Several HTTP clients sign up, log in and exchange direct messages
concurrently; every acknowledged message must be listed exactly once in its pair's history, and every
participant's feed must fill with it exactly once. Then the server stops on SIGINT (and SIGTERM)."""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"
DEADLINE = 30.0

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], what: str, deadline: float = DEADLINE) -> Any:
    end = time.monotonic() + deadline
    while True:
        try:
            value = fetch()
        except httpx.TransportError as exc:
            value = exc
        if not isinstance(value, Exception) and done(value):
            return value
        if time.monotonic() > end:
            pytest.fail(f"{what}: not reached within {deadline}s; last value {value!r}")
        time.sleep(0.05)


class Server:
    """``python -m examples.chat --root root --workers workers *args`` on a free port, its output in ``log``."""

    def __init__(self, root: pathlib.Path, log: pathlib.Path, workers: int, args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("SHARDLITE_ROOT", None)
        env.pop("CHAT_SECURE_COOKIES", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "examples.chat", "--root", str(root), "--port", str(self.port),
             "--workers", str(workers), *args],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        def fetch() -> int:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode} before answering:\n{self.log()}")
            return httpx.get(self.url + "/api/me", timeout=2).status_code

        poll(fetch, lambda status: status == 401, "server answering")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int | None:
        """Send ``sig``; the exit code, or None when it had to be killed."""
        code: int | None = None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own process group (start_new_session)
                self.proc.wait(10)
        else:
            code = self.proc.returncode
        self._log.close()
        return code

    def workers(self) -> list[int]:
        """The uvicorn worker processes (multiprocessing spawn children; not its resource tracker)."""
        path = pathlib.Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        found = []
        try:
            for pid in path.read_text().split():
                if b"spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
        except OSError:
            pass
        return found


@pytest.fixture
def server(tmp_path: pathlib.Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data", tmp_path / "server.log", workers=2)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_two_workers_share_the_files(server: Server) -> None:
    if pathlib.Path(f"/proc/{server.proc.pid}/task").is_dir():
        assert len(server.workers()) == 2, f"expected two uvicorn workers:\n{server.log()}"

    n = 4
    clients = [httpx.Client(base_url=server.url, timeout=30, headers={"Origin": server.url}) for _ in range(n)]
    try:
        ids: list[int] = []
        for i, c in enumerate(clients):
            r = c.post("/api/signup", json={"email": f"user{i}@example.com", "password": PASSWORD,
                                           "name": f"User{i}"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            assert c.post("/api/login", json={"email": f"user{i}@example.com",
                                              "password": PASSWORD}).status_code == 200
        assert len(set(ids)) == n
        # the same address on another worker is still a conflict
        for variant in ("USER0@example.com", "\uff55\uff53\uff45\uff52\uff10@example.com"):
            r = clients[1].post("/api/signup", json={"email": variant, "password": PASSWORD, "name": "Dup"})
            assert r.status_code == 409, r.text
        for i, c in enumerate(clients):  # every session works whichever worker answers
            for _ in range(3):
                assert c.get("/api/me").json() == {"id": ids[i], "name": f"User{i}"}

        # every user writes to every other user, all clients at once
        per_pair = 3

        def send(i: int) -> list[tuple[int, int, dict[str, Any]]]:
            acked = []
            for round_, j in itertools.product(range(per_pair), range(n)):
                if j == i:
                    continue
                r = clients[i].post(f"/api/dm/{ids[j]}", json={"text": f"{i}->{j} #{round_}"})
                assert r.status_code == 201, r.text
                acked.append((i, j, r.json()))
            return acked

        with ThreadPoolExecutor(n) as pool:
            acked = [a for batch in pool.map(send, range(n)) for a in batch]
        assert len(acked) == n * (n - 1) * per_pair

        # histories: each acknowledged message exactly once, in its own pair only, seen alike from both sides
        for i, j in itertools.combinations(range(n), 2):
            mine = clients[i].get(f"/api/dm/{ids[j]}", params={"limit": 200}).json()
            theirs = clients[j].get(f"/api/dm/{ids[i]}", params={"limit": 200}).json()
            assert mine == theirs
            expected = sorted(m["text"] for a, b, m in acked if {a, b} == {i, j})
            assert sorted(m["text"] for m in mine) == expected
            listed = Counter(m["id"] for m in mine)
            assert all(count == 1 for count in listed.values())
            assert set(listed) == {m["id"] for a, b, m in acked if {a, b} == {i, j}}
            assert [m["id"] for m in mine] == sorted(listed, reverse=True)

        # feeds: every message its user sent or received, exactly once, whichever worker's relay carried it
        for k, c in enumerate(clients):
            want = Counter((min(a, b), max(a, b), m["id"]) for a, b, m in acked if k in (a, b))

            def seen(c: httpx.Client = c, k: int = k) -> Counter[tuple[int, int, int]]:
                items = c.get("/api/feed", params={"limit": 200}).json()
                index = {uid: pos for pos, uid in enumerate(ids)}
                got: Counter[tuple[int, int, int]] = Counter()
                for it in items:  # peer_id is the other participant, from_id the author
                    other = index[it["peer_id"]]
                    assert it["kind"] == "dm" and index[it["from_id"]] in (k, other), it
                    got[(min(k, other), max(k, other), it["message_id"])] += 1
                return got

            got = poll(seen, functools.partial(covers, want), f"feed of user {k}")
            assert got == want, f"feed of user {k}: duplicates or strangers {got - want}"
    finally:
        for c in clients:
            c.close()
    check_stops(server, signal.SIGINT)  # Ctrl-C, as `make demo` is stopped


def covers(want: Counter[tuple[int, int, int]], got: Counter[tuple[int, int, int]]) -> bool:
    return set(got) >= set(want)


def check_stops(srv: Server, sig: int) -> None:
    workers = srv.workers()
    code = srv.stop(sig)
    assert code is not None, f"server ignored {signal.Signals(sig).name} and had to be killed:\n{srv.log()}"
    assert code in (0, -sig, 128 + sig), f"exit code {code}:\n{srv.log()}"
    for pid in workers:
        assert not pathlib.Path(f"/proc/{pid}").exists() or "zombie" in _state(pid), f"worker {pid} still alive"
    assert "Traceback" not in srv.log(), srv.log()


def test_server_stops_on_sigterm(tmp_path: pathlib.Path) -> None:
    sig = signal.SIGTERM
    srv = Server(tmp_path / "data", tmp_path / "server.log", workers=2)
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=30, headers={"Origin": srv.url}) as c:
            assert c.post("/api/signup", json={"email": "a@example.com", "password": PASSWORD,
                                              "name": "A"}).status_code == 201
        check_stops(srv, sig)
    finally:
        srv.stop(signal.SIGKILL, timeout=10)


def _state(pid: int) -> str:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line
    except OSError:
        pass
    return "zombie"  # gone while we looked
