"""Metrics: ``router.stats()`` (what ``shardlite status --json`` prints) and a Prometheus text rendering.

``prometheus_text(router)`` returns the text exposition format; ``wsgi_app(router)`` wraps it as a tiny
WSGI application to mount on ``/metrics`` (an optional helper: nothing is served unless you mount it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..front.router import Router
    from ..front.store import Store
    from .rebalance import Rebalancer
    from .relay import Relay

__all__ = ["status", "stats", "prometheus_text", "wsgi_app", "node_bytes"]


def node_bytes(path: str) -> int:
    """Bytes of every database-family file under a node directory."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            if ".db" in name:
                try:
                    total += os.path.getsize(os.path.join(directory, name))
                except FileNotFoundError:
                    pass
    return total


def status(store: Store) -> dict[str, Any]:
    """Tenants per node and per schema version, and this process's open connections (``router.status()``)."""
    tenants = store.meta.tenants
    nodes = store.meta.nodes.list()
    return {
        "root": store.root,
        "nodes": [{"name": n.name, "path": n.path, "weight": n.weight, "state": n.state} for n in nodes],
        "tenants_per_node": {n.name: 0 for n in nodes} | tenants.count_by_node(),
        "schema_versions": tenants.schema_versions(),
        "open_connections": len(store.pool),
        "synchronous": store.settings.synchronous,
        "replicate": store.replicate,  # the recorded replica location (no secret), None when not replicated
    }


def stats(store: Store, relay: Relay, rebalancer: Rebalancer) -> dict[str, Any]:
    """:func:`status` with bytes per node, relay lag and the rebalance state (``router.stats()``, what
    ``shardlite status --json`` prints): the services, not a router, so both front ends use it."""
    first = status(store)  # before the relay's status, so open_connections counts only the application's
    relay_status = relay.status()
    rebalance = rebalancer.status()
    return first | {
        "bytes_per_node": {n.name: node_bytes(n.path) for n in store.meta.nodes.list()},
        "relay": {"pending": relay_status["pending"], "lag_seconds": relay_status["oldest_age"],
                  "dead_letters": relay_status["dead_letters"], "topics": relay_status["topics"]},
        "rebalance": {"plan": rebalance.get("plan"), "state": rebalance.get("state"),
                      "steps": rebalance.get("steps", {})},
    }


def prometheus_text(router: Router) -> str:
    """The Prometheus text exposition of ``router.stats()`` (a sync :class:`~shardlite.Router`)."""
    s = router.stats()
    lines = [
        "# HELP shardlite_tenants Live tenants per node.", "# TYPE shardlite_tenants gauge",
        *(f'shardlite_tenants{{node="{n}"}} {v}' for n, v in s["tenants_per_node"].items()),
        "# HELP shardlite_node_bytes Bytes of tenant files per node.", "# TYPE shardlite_node_bytes gauge",
        *(f'shardlite_node_bytes{{node="{n}"}} {v}' for n, v in s["bytes_per_node"].items()),
        "# HELP shardlite_open_connections Tenant connections open in this process.",
        "# TYPE shardlite_open_connections gauge", f"shardlite_open_connections {s['open_connections']}",
        "# HELP shardlite_schema_tenants Live tenants per app schema version.",
        "# TYPE shardlite_schema_tenants gauge",
        *(f'shardlite_schema_tenants{{version="{v}"}} {c}' for v, c in s["schema_versions"].items()),
        "# HELP shardlite_relay_pending Outbox events not yet applied.", "# TYPE shardlite_relay_pending gauge",
        f"shardlite_relay_pending {s['relay']['pending']}",
        "# HELP shardlite_relay_lag_seconds Age of the oldest pending event.",
        "# TYPE shardlite_relay_lag_seconds gauge", f"shardlite_relay_lag_seconds {s['relay']['lag_seconds']:.6f}",
        "# HELP shardlite_relay_dead_letters Events in the dead-letter table.",
        "# TYPE shardlite_relay_dead_letters gauge", f"shardlite_relay_dead_letters {s['relay']['dead_letters']}",
    ]
    return "\n".join(lines) + "\n"


def wsgi_app(router: Router) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """A WSGI app answering every request with :func:`prometheus_text`."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = prometheus_text(router).encode()
        start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4"),
                                  ("Content-Length", str(len(body)))])
        return [body]
    return app
