"""Pure logic, no I/O: keys, the ring, placement and move planning, the outbox's encoding, e-mail
canonicalisation, retry backoff, move steps."""
