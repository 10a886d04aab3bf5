"""Persistence: the ``Store`` interface and its backends (SQLite embedded, Redis scale-out)."""
