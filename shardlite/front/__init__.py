"""The front ends: the store both share, Router (sync) and AsyncRouter (async), transactions, accounts, sessions,
the app's global tables, feeds."""
