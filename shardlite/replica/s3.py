"""The S3 replica target (``s3://bucket/prefix``): one object per name, key ``<prefix>/<name>``.

The client is boto3 (botocore underneath), chosen over minio-py and aiobotocore because:

* it is synchronous and thread-safe: the replicator uploads from its own threads, like every shardlite
  service, so an asyncio client (aiobotocore) would need a loop of its own in a thread; aiobotocore also pins
  exact botocore versions, which conflicts with anything else in the application that uses boto3;
* it reads credentials, region and endpoint from the standard AWS chain (environment, ``~/.aws/config`` and
  ``credentials``, profiles, SSO, web identity, instance roles) with no code of ours; minio-py has its own
  smaller chain and does not read AWS profiles;
* it talks to every S3-compatible server (AWS, R2, MinIO, SeaweedFS) through ``endpoint_url`` and path-style
  addressing, has bounded retries with backoff for throttling and 5xx built in, and AWS maintains it.

The dependency is boto3 (botocore, plus s3transfer for multipart uploads should objects outgrow one PUT);
clients are made from botocore sessions directly (:func:`_session`). Its cost is about 0.2 s and 20-30 MB to
import, so this module is imported only for an ``s3://`` location
(:func:`~shardlite.replica.target.open_target`) and imports botocore only when a target is made.

Bounded waits: a 2 s connect timeout, a 5 s read timeout (for each read or write on the socket, not for the
whole body) and at most 3 attempts per request (botocore's ``standard`` retry mode, with its jittered backoff
of at most 1 s then 2 s: connection errors, 5xx, throttling). A server that is down (connection refused)
answers :class:`~shardlite.ReplicaUnavailable` within about 3 s, an unroutable one within about 9 s, one that
accepts and never answers within about 18 s; none hangs.

Errors are translated (:meth:`S3Target._translate`): messages carry the target's :attr:`~S3Target.url`
(which never holds credentials), the operation, the name, and the server's error code and HTTP status;
never the server's message text, nor the request.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import ConfigurationError, ReplicaError, ReplicaObjectMissing, ReplicaUnavailable
from .target import TargetLocation, check_name, check_prefix, is_name

__all__ = ["S3Target", "CONNECT_TIMEOUT", "READ_TIMEOUT", "MAX_ATTEMPTS", "DELETE_BATCH"]

CONNECT_TIMEOUT = 2.0
"""Seconds to open a connection to the S3 server."""
READ_TIMEOUT = 5.0
"""Seconds the S3 server may stay silent while answering."""
MAX_ATTEMPTS = 3
"""Attempts per request, the first included."""
DELETE_BATCH = 1000
"""Names per DeleteObjects request (the S3 API's limit)."""

_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                     "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
                     "InvalidSecurity", "403"})
_BUSY = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
                   "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                   "OperationAborted", "ConditionalRequestConflict"})


_LOCK = threading.Lock()
_LOADER: Any = None


def _session() -> Any:
    """A new botocore session sharing one loader of the service models (creating a client takes ~15 ms
    instead of ~85 ms: the models are parsed once per process). A botocore session is enough for a client;
    boto3's own ``Session`` would append its data path to a shared loader every time."""
    global _LOADER
    import botocore.loaders
    import botocore.session

    with _LOCK:
        if _LOADER is None:
            _LOADER = botocore.loaders.create_loader()
        session = botocore.session.get_session()
        session.register_component("data_loader", _LOADER)
        return session


class S3Target:
    """A replica target on an S3 bucket (see the module doc). Opening it makes no request."""

    def __init__(self, location: TargetLocation, *, connect_timeout: float = CONNECT_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, max_attempts: int = MAX_ATTEMPTS) -> None:
        if location.scheme != "s3":
            raise ConfigurationError(f"{location.url} is not an s3:// location")
        from botocore.config import Config

        self._location = location
        self._bucket = location.bucket
        self._base = f"{location.prefix}/" if location.prefix else ""
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "retries": {"total_max_attempts": max_attempts, "mode": "standard"},  # the first one included
            "max_pool_connections": 16,
            "user_agent_extra": "shardlite",
        }
        if location.endpoint is not None:  # S3-compatible servers on a host:port seldom resolve bucket.host
            options["s3"] = {"addressing_style": "path"}
        try:
            session = _session()  # one of its own: credentials are read afresh for every target
            region = (location.region or session.get_config_variable("region")
                      or ("us-east-1" if location.endpoint else None))
            self._client: Any = session.create_client("s3", region_name=region, endpoint_url=location.endpoint,
                                                      config=Config(**options))
        except Exception as exc:  # botocore's configuration errors (an invalid AWS config file, ...)
            raise ConfigurationError(f"the S3 client for {self.url} cannot be set up: {type(exc).__name__} "
                                     "(check the AWS environment variables and ~/.aws/config)") from None

    @property
    def url(self) -> str:
        return self._location.url

    def __repr__(self) -> str:
        return f"S3Target({self.url!r})"

    def _key(self, name: str) -> str:
        return self._base + check_name(name)

    # -- errors ----------------------------------------------------------------------------------------------

    @contextmanager
    def _call(self, op: str, name: str) -> Iterator[None]:
        try:
            yield
        except (ReplicaError, ConfigurationError, ValueError):
            raise
        except Exception as exc:
            mapped = self._translate(exc, op, name)
            if mapped is None:
                raise
            raise mapped from exc

    def _translate(self, exc: Exception, op: str, name: str) -> Exception | None:
        """The contract's error for a client exception (``None``: not one of the client's, left as it is)."""
        from botocore import exceptions as bx

        where = f"{op} {name!r} on the replica target {self.url}"
        if isinstance(exc, bx.ClientError):
            error = exc.response.get("Error") or {}
            code = str(error.get("Code") or "")
            status = int((exc.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
            what = f"{code or 'error'}, HTTP {status}"
            if code in _MISSING or status == 404 and code != "NoSuchBucket":
                return ReplicaObjectMissing(f"no object {name!r} on the replica target {self.url}")
            if code == "NoSuchBucket":
                return ConfigurationError(f"the bucket of the replica target {self.url} does not exist ({what}): "
                                          "create it, or fix the URL")
            if code in _DENIED or status in (401, 403):
                return ConfigurationError(
                    f"the S3 server refused the credentials for {where} ({what}): check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, ~/.aws/credentials) and the bucket's permissions")
            if status >= 500 or status in (408, 429) or code in _BUSY:
                return ReplicaUnavailable(f"the S3 server failed to {where} ({what}): retry later (repeating it "
                                          "is harmless)")
            return ReplicaError(f"the S3 server refused to {where} ({what})")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError,
                            bx.UnknownCredentialError)):
            return ConfigurationError(
                f"no usable AWS credentials to {where} ({type(exc).__name__}): set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials")
        if isinstance(exc, (bx.NoRegionError, bx.InvalidRegionError)):
            return ConfigurationError(f"no valid AWS region to {where}: set AWS_REGION or add &region= to the URL")
        if isinstance(exc, (bx.HTTPClientError, bx.ConnectionError, bx.ResponseStreamingError,
                            bx.IncompleteReadError, OSError)):
            return ReplicaUnavailable(f"the replica target {self.url} is unreachable ({type(exc).__name__}) to "
                                      f"{op} {name!r}: retry later (repeating it is harmless)")
        if isinstance(exc, bx.BotoCoreError):
            return ReplicaError(f"the S3 client failed to {where} ({type(exc).__name__})")
        return None

    # -- the contract ----------------------------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> None:
        key = self._key(name)
        with self._call("put", name):
            self._client.put_object(Bucket=self._bucket, Key=key, Body=bytes(data))

    def put_if_absent(self, name: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        key = self._key(name)
        data = bytes(data)
        for attempt in range(MAX_ATTEMPTS):
            with self._call("put", name):
                try:
                    # ``If-None-Match: *``: the server stores it only when the key is free, atomically
                    self._client.put_object(Bucket=self._bucket, Key=key, Body=data, IfNoneMatch="*")
                    return True
                except ClientError as exc:
                    code = (exc.response.get("Error") or {}).get("Code")
                    if code == "PreconditionFailed":
                        break  # 412: the key holds something
                    if code == "ConditionalRequestConflict" and attempt < MAX_ATTEMPTS - 1:
                        continue  # 409: a racing conditional write on the key; AWS asks to try again
                    raise
        try:
            return self.get(name) == data
        except ReplicaObjectMissing:
            return False  # deleted meanwhile: it held something when the server refused

    def get(self, name: str) -> bytes:
        key = self._key(name)
        with self._call("get", name):
            response = self._client.get_object(Bucket=self._bucket, Key=key)
            return bytes(response["Body"].read())

    def get_range(self, name: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"a range starts at 0 or later and has a length of 0 or more, not {start}, {length}")
        key = self._key(name)
        if length == 0:
            if self.head(name) is None:
                raise ReplicaObjectMissing(f"no object {name!r} on the replica target {self.url}")
            return b""
        from botocore.exceptions import ClientError

        with self._call("get", name):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=key,
                                                   Range=f"bytes={start}-{start + length - 1}")
            except ClientError as exc:
                if (exc.response.get("Error") or {}).get("Code") == "InvalidRange":
                    return b""  # 416: the object exists and ends before ``start``
                raise
            body = bytes(response["Body"].read())
        if "ContentRange" not in response:  # a server that ignored the Range header sent the whole object
            return body[start:start + length]
        return body[:length]

    def head(self, name: str) -> int | None:
        key = self._key(name)
        try:
            with self._call("head", name):
                response = self._client.head_object(Bucket=self._bucket, Key=key)
        except ReplicaObjectMissing:
            return None
        return int(response["ContentLength"])

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        prefix = check_prefix(prefix)
        found: list[tuple[str, int]] = []
        skip = len(self._base)
        with self._call("list", prefix):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._base + prefix, PaginationConfig={"PageSize": DELETE_BATCH})
            for page in pages:
                for item in page.get("Contents") or ():
                    name = str(item["Key"])[skip:]
                    if is_name(name):  # anything else under the prefix (a folder marker, a stranger's key) is not ours
                        found.append((name, int(item["Size"])))
        found.sort()  # SeaweedFS and MinIO list folder by folder: "a/b" before "a-b"; S3 sorts by code point
        return iter(found)

    def delete_many(self, names: Iterable[str]) -> None:
        keys = [self._key(name) for name in names]  # every name checked before anything goes
        iterator = iter(keys)
        while batch := list(itertools.islice(iterator, DELETE_BATCH)):
            first = batch[0][len(self._base):]
            with self._call("delete", first):
                response = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            errors = [e for e in response.get("Errors") or () if e.get("Code") not in _MISSING]
            if errors:
                code = str(errors[0].get("Code") or "error")
                name = str(errors[0].get("Key") or "")[len(self._base):]
                where = f"delete {name!r} (and {len(errors) - 1} more) on the replica target {self.url}"
                if code in _DENIED:
                    raise ConfigurationError(f"the S3 server refused the credentials to {where} ({code})")
                if code in _BUSY:
                    raise ReplicaUnavailable(f"the S3 server failed to {where} ({code}): retry later")
                raise ReplicaError(f"the S3 server refused to {where} ({code})")

    def close(self) -> None:
        self._client.close()
