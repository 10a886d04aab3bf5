"""Whether the SQLite store can still write: the checks behind ``SqliteStore.check_writable``
(``/healthz`` answers 503 when one fails, so a load balancer stops sending webhooks that would
fail; DESIGN.md "Hostile input").

- The file at the configured path is still the one opened: deleted or replaced, every commit
  would go to an unlinked file and a restart would start empty.
- The disk has room: below ``MIN_FREE_BYTES`` free, commits fail (or soon will).
- A real write commits (the probe, see ``sqlite.py``): read-only or failing disks, a stuck writer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MIN_FREE_BYTES = 1 << 20  # 1 MiB: a group-committed batch with its WAL frames fits easily


@dataclass(slots=True, frozen=True)
class FileIdentity:
    device: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        stat = os.stat(path)
        return cls(stat.st_dev, stat.st_ino)


def file_problem(path: Path, opened: FileIdentity | None) -> str | None:
    """Why the database file at ``path`` is not the one the store opened, or None."""
    try:
        current = FileIdentity.of(path)
    except FileNotFoundError:
        return f"database file {path} is gone"
    except OSError as exc:
        return f"database file {path} cannot be read: {exc.strerror or exc}"
    if opened is not None and current != opened:
        return f"database file {path} was replaced"
    return None


def space_problem(path: Path) -> str | None:
    """Why the disk of ``path`` is too full to write, or None."""
    try:
        stats = os.statvfs(path.parent)
    except OSError as exc:
        return f"cannot check free space for {path}: {exc.strerror or exc}"
    free = stats.f_bavail * stats.f_frsize
    if free < MIN_FREE_BYTES:
        return f"disk full: {free} bytes free for {path}"
    return None
