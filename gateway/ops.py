"""Operator commands beside ``serve``: ``backup``, ``settings``, ``healthcheck``, and the
checks of ``check-config`` that look outside the file (a Redis server's reachability).

They run in their own process, never on the gateway's event loop, so they use blocking calls
(sqlite3, urllib, redis's sync client) freely. None takes the gateway's database lock: they
work while it runs.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from channels.registry import entry_path
from gateway.runtime_settings import RuntimeSettings, to_json
from gateway.settings import Settings, StorageBackend
from gateway.store import sqlite_reads

MASK = "***"
BUSY_TIMEOUT_MS = 5000


class OpsError(Exception):
    """The command cannot do its job; the message is its one line on stderr."""


def mask_url(url: str | None) -> str | None:
    """``url`` with its password (if any) shown as ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}{port}"))


# -- backup -------------------------------------------------------------------------------------


def _sqlite_path(settings: Settings) -> Path:
    if settings.storage.backend is not StorageBackend.SQLITE:
        raise OpsError(f"storage.backend is {settings.storage.backend}: use the Redis server's own tools (RDB/AOF)")
    path = settings.storage.path
    if not path.exists():
        raise OpsError(f"database {path} does not exist (has the gateway ever run with this configuration?)")
    return path


def backup(settings: Settings, dest: Path) -> str:
    """Copy the SQLite database to ``dest`` with SQLite's online backup API, on a connection of
    its own: one consistent snapshot even while the gateway writes (WAL lets the copy read
    while commits go on). The copy is a single self-contained file (journal mode DELETE),
    checked with ``PRAGMA integrity_check``; it appears at ``dest`` only when complete.
    Returns the line to print. Refuses to overwrite ``dest``."""
    source = _sqlite_path(settings)
    if dest.exists():
        raise OpsError(f"{dest} exists already; choose a new file")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with _connect(source) as src, sqlite3.connect(partial) as copy:
            src.backup(copy)  # in one step: the whole database as of one moment
            copy.execute("PRAGMA journal_mode = DELETE")
            verdict = copy.execute("PRAGMA integrity_check").fetchone()[0]
            if verdict != "ok":
                raise OpsError(f"the copy failed its integrity check: {verdict}")
            version = copy.execute("PRAGMA user_version").fetchone()[0]
            sessions, open_sessions = copy.execute(
                "SELECT count(*), count(*) FILTER (WHERE state = 'open') FROM sessions"
            ).fetchone()
        os.replace(partial, dest)
    except sqlite3.Error as exc:
        raise OpsError(f"backup of {source} failed: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return f"{dest}: backup of {source}, schema version {version}, {sessions} sessions ({open_sessions} open)"


def _connect(path: Path) -> sqlite3.Connection:
    """A connection that only reads (the database must exist: sqlite3 would create it)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")
    return conn


# -- settings -----------------------------------------------------------------------------------


def stored_overrides(settings: Settings) -> tuple[dict[str, dict[str, Any]], str]:
    """The runtime overrides the store holds, and where they came from (said in the report)."""
    if settings.storage.backend is not StorageBackend.SQLITE:
        return {}, f"not read: the {settings.storage.backend} backend is not read by this command"
    path = settings.storage.path
    if not path.exists():
        return {}, f"none: database {path} does not exist yet"
    try:
        conn = _connect(path)
        try:
            return sqlite_reads.select_overrides(conn), f"read from {path}"
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise OpsError(f"cannot read runtime settings from {path}: {exc}") from exc


def effective_settings(settings: Settings) -> str:
    """The settings in force (the file's, runtime overrides applied) as YAML; secrets masked."""
    overrides, origin = stored_overrides(settings)
    runtime = RuntimeSettings(settings, overrides)
    storage: dict[str, Any] = {"backend": str(settings.storage.backend)}
    if settings.storage.backend is StorageBackend.SQLITE:
        storage["path"] = str(settings.storage.path)
    else:
        storage["url"] = mask_url(settings.storage.url)
    report: dict[str, Any] = {
        "source": str(settings.source),
        "runtime_overrides": origin,
        "server": {**to_json(settings.server), "public_url": mask_url(settings.server.public_url)},
        "storage": storage,
        "admin": {"token": MASK if settings.admin.token else "", "enabled": bool(settings.admin.token)},
        "logging": {"level": settings.log_level, "format": str(settings.log_format)},
        "retention": to_json(settings.retention),
        "flow": {**to_json(settings.flow), "url": mask_url(settings.flow.url)},
        "delivery": to_json(settings.delivery),
        "organisation": {"session": to_json(runtime.organisation), "override": runtime.organisation_override},
        "endpoints": [],
    }
    for endpoint in settings.endpoints:
        applied = runtime.endpoints[endpoint.name]
        entry: dict[str, Any] = {
            "name": endpoint.name,
            "channel": str(endpoint.channel),
            "path": entry_path(endpoint),
            "developer": endpoint.developer,
            "api_base_url": mask_url(endpoint.api_base_url),
            "credentials": {key: MASK if secret else "" for key, secret in endpoint.credentials.items()},
            "rate_limit": to_json(endpoint.rate_limit),
            "effective_expiration_minutes": applied.policy.expiration_minutes,
            "session": to_json(applied.session),
            "override": applied.override,
        }
        if applied.ignored is not None:
            entry["ignored_override"] = {"value": applied.ignored.value, "reason": applied.ignored.reason}
        report["endpoints"].append(entry)
    return yaml.safe_dump(report, sort_keys=False, allow_unicode=True)


# -- healthcheck ----------------------------------------------------------------------------------


def healthcheck(settings: Settings, timeout_s: float = 3.0) -> str:
    """``GET /healthz`` on the configured port (the wildcard host asked on 127.0.0.1); the
    line to print when it answers 200, ``OpsError`` otherwise."""
    host = settings.server.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{settings.server.port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        raise OpsError(f"{url}: {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise OpsError(f"{url}: {getattr(exc, 'reason', exc)}") from None


# -- check-config: what only a connection tells -------------------------------------------------------


def redis_problem(url: str, timeout_s: float = 2.0) -> str | None:
    """Why the Redis server at ``url`` cannot be used (None: it answered PING)."""
    try:
        import redis
    except ImportError:
        return "cannot be checked: the Python package 'redis' is not installed (the redis backend needs it)"
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{mask_url(url)} is not reachable: {exc}"
    finally:
        client.close()
    return None
