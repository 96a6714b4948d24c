"""Where a tenant's file lives inside a node directory. Pure: no I/O.

Layout: ``<node dir>/<2 hex>/<xxh3-128 hex>.<generation>.db``. The name carries the key's digest and the
catalog-issued generation; generations are never reused, so neither is a path.
"""

from __future__ import annotations

import re

from .keys import key_digest

__all__ = ["tenant_relpath", "parse_tenant_name", "TENANT_NAME_RE"]

TENANT_NAME_RE = re.compile(r"^(?P<digest>[0-9a-f]{32})\.(?P<generation>[0-9]+)\.db$")


def tenant_relpath(canonical_key: str, generation: int) -> str:
    """Path of a tenant file relative to its node directory."""
    if generation < 1:
        raise ValueError("generations start at 1")
    digest = key_digest(canonical_key)
    return f"{digest[:2]}/{digest}.{generation}.db"


def parse_tenant_name(name: str) -> tuple[str, int] | None:
    """``(digest, generation)`` for a tenant file name, or None for anything else."""
    m = TENANT_NAME_RE.match(name)
    if m is None:
        return None
    return m["digest"], int(m["generation"])
