"""``python -m tests.webchat_memory_child serve --config PATH``: the real gateway app on the
config's host and port, for the memory test, with two differences:

- ``GET /_memory`` answers the process's RSS and SQLite's own heap, read after a full garbage
  collection and ``malloc_trim``, so that what is measured is memory still held, not the
  allocator's high-water mark.
- The SQLite writer's page cache is held at ``CACHE_KIB`` (1 MiB; the gateway sets 64 MiB).
  That cache keeps the pages of the database file a connection last touched, up to its size,
  whatever they hold: 5,000 conversations write ~10 MB of rows, which a 64 MiB cache keeps.
  Held small, it is full after the warm-up, and the RSS shows what the gateway itself keeps.
"""

from __future__ import annotations

import _sqlite3
import ctypes
import gc
import sqlite3
import sys
from pathlib import Path

from aiohttp import web

import gateway.store.sqlite as sqlite_store
from gateway.app import create_app
from gateway.config import load_settings

CACHE_KIB = 1024


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def prepare_writer_small_cache(conn: sqlite3.Connection) -> None:
    """The gateway's own writer preparation, then a small page cache."""
    prepare_writer(conn)
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")


prepare_writer = sqlite_store.prepare_writer


def main() -> None:
    sqlite_store.prepare_writer = prepare_writer_small_cache
    settings = load_settings(Path(sys.argv[sys.argv.index("--config") + 1]))
    app = create_app(settings)
    libc = ctypes.CDLL("libc.so.6")
    # The sqlite3 library Python's own module is linked with (dlsym searches its dependencies).
    sqlite = ctypes.CDLL(_sqlite3.__file__)
    sqlite.sqlite3_memory_used.restype = ctypes.c_int64

    async def memory(request: web.Request) -> web.StreamResponse:
        gc.collect()
        libc.malloc_trim(0)
        return web.json_response({"rss_kb": rss_kb(), "sqlite_kb": sqlite.sqlite3_memory_used() // 1024})

    app.router.add_get("/_memory", memory)
    web.run_app(app, host=settings.server.host, port=settings.server.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
