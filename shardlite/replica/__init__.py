"""Replica targets: where the tenants' replicas are stored, behind one contract.

:mod:`shardlite.replica.target` holds the contract, :class:`~shardlite.replica.target.ReplicaTarget` (a
:class:`typing.Protocol` whose docstrings are what every backend guarantees), the object-name rules and the
location parsing (``s3://bucket/prefix``, ``file:///path``) with :func:`~shardlite.replica.target.redact`;
one module per backend implements it:

* :mod:`shardlite.replica.directory`: ``file:///path``, one file per object;
* :mod:`shardlite.replica.s3`: ``s3://bucket/prefix`` through boto3, imported only for such a location.

Every backend passes the same conformance suite (``tests/test_replica_target.py``), the S3 one against a real
server (SeaweedFS, :mod:`shardlite.testing.s3`).
"""

from __future__ import annotations

from .target import ReplicaTarget, TargetLocation, check_name, check_prefix, open_target, parse_target, redact

__all__ = ["ReplicaTarget", "TargetLocation", "open_target", "parse_target", "redact", "check_name", "check_prefix"]
