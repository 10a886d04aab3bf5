"""``/healthz`` follows the store (DESIGN.md "Hostile input", issue #11 item 11): 503 when the
database file is gone or the disk is full, checked at most once a second, 200 again once the
store can write. Real SQLite files; the full disk is a real (small) tmpfs."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store.sqlite import SqliteStore
from tests.conftest import Gateway, make_settings, webchat_endpoint


async def wait_health(gateway: Gateway, status: int, timeout_s: float = 5.0) -> dict[str, Any]:
    """Poll /healthz until it answers ``status`` (it re-checks the store once a second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        response = await gateway.client.get("/healthz")
        body: dict[str, Any] = await response.json()
        if response.status == status:
            return body
        if loop.time() > deadline:
            raise AssertionError(f"/healthz stayed {response.status}: {body}")
        await asyncio.sleep(0.05)


async def test_healthz_is_503_once_the_database_file_is_deleted(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    await wait_health(gateway, 200)
    (tmp_path / "gateway.db").unlink()
    body = await wait_health(gateway, 503)
    assert body["status"] == "store cannot write" and "is gone" in body["reason"]


async def test_healthz_probes_the_store_at_most_once_a_second(tmp_path: Path, start_gateway: Any) -> None:
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint()]))
    store = gateway.store
    assert isinstance(store, SqliteStore)
    await wait_health(gateway, 200)
    before = store.batches_committed
    started = asyncio.get_running_loop().time()
    answers = await asyncio.gather(*(gateway.client.get("/healthz") for _ in range(50)))
    elapsed_s = asyncio.get_running_loop().time() - started
    assert [a.status for a in answers] == [200] * 50
    # One probe per second at most (the first second's boundary may add one).
    assert store.batches_committed - before <= int(elapsed_s) + 2


def _mount(source: str, target: str, fstype: str, options: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(source.encode(), target.encode(), fstype.encode(), 0, options.encode()) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


def _umount(target: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.umount2(target.encode(), 2)  # MNT_DETACH


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test (needs root, as the project's machines and CI run)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        _mount("tmpfs", str(disk), "tmpfs", "size=4m")
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield disk
    finally:
        _umount(str(disk))


async def test_healthz_is_503_while_the_disk_is_full(tmp_path: Path, small_disk: Path, start_gateway: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint()], storage={"path": str(small_disk / "gateway.db")})
    gateway = await start_gateway(settings)
    await wait_health(gateway, 200)
    filler = small_disk / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass  # ENOSPC: the disk is full
    body = await wait_health(gateway, 503)
    assert "disk full" in body["reason"] or "full" in body["reason"].lower()
    filler.unlink()
    await wait_health(gateway, 200)
