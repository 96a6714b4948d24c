"""The services around the router: the outbox relay, rebalancing and moves, nodes, lifecycle (drop, migrate),
backup, restore and import, fan-out queries, metrics."""
