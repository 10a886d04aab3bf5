"""The garbage-collector pacer (gateway/collector.py), on CPython's real collector: long-lived
objects leave the collector's walks, dead cycles among them are still reclaimed once the frozen
heap has grown, and ``chat-gateway serve`` installs it."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.collector import CollectorPacer
from tests.conftest import write_config
from tests.gateway_process import GatewayProcess, free_port


class Node:
    """A tracked object that can sit in a cycle."""

    __slots__ = ("other", "__weakref__")

    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> Node:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return a


def tracked_ids() -> set[int]:
    """The ids of every object the collector still walks (frozen ones are not listed)."""
    return {id(o) for o in gc.get_objects()}


class Memory:
    """The process's size as the pacer sees it, set by the test (the real one, peak RSS, only
    grows, and by how much depends on every test that ran before)."""

    def __init__(self) -> None:
        self.bytes = 100 * 1024 * 1024

    def __call__(self) -> int:
        return self.bytes


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def memory() -> Memory:
    return Memory()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pacer(memory: Memory, clock: Clock) -> Iterator[CollectorPacer]:
    """An installed pacer with small thresholds. Automatic collections are off: each test says
    which generation is collected when (the pacer acts after every collection, automatic or not)."""
    before = gc.get_threshold()
    paced = CollectorPacer(
        young=200,
        middle=2,
        regrowth=0.5,
        min_regrowth_bytes=1024 * 1024,
        min_pass_interval_s=600,
        memory=memory,
        clock=clock,
    )
    paced.install()
    gc.disable()
    try:
        yield paced
    finally:
        gc.enable()
        paced.uninstall()
        assert gc.get_threshold() == before


def test_survivors_of_a_middle_collection_are_frozen_and_no_longer_walked(pacer: CollectorPacer) -> None:
    kept = [Node() for _ in range(5_000)]
    assert id(kept[0]) in tracked_ids()
    frozen_before = gc.get_freeze_count()
    gc.collect(1)
    assert gc.get_freeze_count() >= frozen_before + len(kept)
    walked = tracked_ids()
    assert not any(id(node) in walked for node in kept)
    # Frozen objects are still freed by reference counting.
    probe = weakref.ref(kept[-1])
    del kept[-1]
    assert probe() is None


def test_dead_cycles_among_frozen_objects_are_freed_once_the_process_grows(
    pacer: CollectorPacer, memory: Memory, clock: Clock
) -> None:
    cycles = [cycle() for _ in range(100)]
    gc.collect(1)  # alive: frozen
    probes = [weakref.ref(node) for node in cycles]
    del cycles
    gc.collect()  # a full collection does not walk the frozen heap: the dead cycles stay
    assert all(probe() is not None for probe in probes)
    assert pacer.stats.whole_heap_passes == 0

    memory.bytes += 48 * 1024 * 1024  # less than half more: nothing yet
    clock.now += 3600
    gc.collect(1)
    gc.collect()
    assert all(probe() is not None for probe in probes)
    assert pacer.stats.whole_heap_passes == 0

    grown = [Node() for _ in range(1_000)]
    memory.bytes += 4 * 1024 * 1024  # past half of the 100 MiB measured at install
    gc.collect(1)  # frozen too; past the limit, the frozen heap is released to the next full pass
    assert all(probe() is not None for probe in probes)
    gc.collect()
    assert all(probe() is None for probe in probes)
    assert pacer.stats.whole_heap_passes == 1
    assert pacer.stats.last_unreachable >= 200
    # The survivors are frozen again, and the next pass waits for another half of growth...
    walked = tracked_ids()
    assert not any(id(node) in walked for node in grown)
    memory.bytes += 60 * 1024 * 1024  # < 50% of 152 MiB
    gc.collect(1)
    gc.collect()
    assert pacer.stats.whole_heap_passes == 1
    # ...and for ten minutes since the last pass, however fast the process grows.
    memory.bytes += 200 * 1024 * 1024
    clock.now += 599
    gc.collect(1)
    gc.collect()
    assert pacer.stats.whole_heap_passes == 1
    clock.now += 2
    gc.collect(1)
    gc.collect()
    assert pacer.stats.whole_heap_passes == 2


def test_automatic_collections_follow_the_pacers_thresholds(pacer: CollectorPacer) -> None:
    assert gc.get_threshold()[:2] == (200, 2)
    gc.enable()
    frozen_before = gc.get_freeze_count()
    kept = [Node() for _ in range(5_000)]
    # Every second young collection is a middle one, whose survivors are frozen: most of these.
    assert gc.get_freeze_count() >= frozen_before + 4_000
    assert pacer.stats.freezes >= 2
    assert len(kept) == 5_000


def test_uninstall_gives_the_collector_back_its_own_pacing() -> None:
    before = gc.get_threshold()
    paced = CollectorPacer(young=300)
    paced.install()
    assert gc.get_threshold()[0] == 300 and gc.get_freeze_count() > 0
    paced.uninstall()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert paced._on_collection not in gc.callbacks


async def test_serve_paces_the_collector(tmp_path: Path) -> None:
    port = free_port()
    endpoints = [{"name": "web", "channel": "webchat", "session": {"expiration_minutes": 30}}]
    process = GatewayProcess(write_config(tmp_path, endpoints, server={"port": port}), port)
    process.start()
    try:
        await process.wait_healthy()
    finally:
        process.stop()
    log = process.log_path.read_text()
    assert "garbage collector paced:" in log
    assert "young collections every 5000 new objects" in log


async def test_a_whole_heap_pass_is_logged_through_the_loop(
    memory: Memory, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.collector")
    paced = CollectorPacer(
        loop=asyncio.get_running_loop(), min_regrowth_bytes=1024, min_pass_interval_s=0, memory=memory, clock=clock
    )
    paced.install()
    gc.disable()
    try:
        memory.bytes *= 2
        gc.collect(1)  # past the limit: released to the next full pass
        gc.collect()
        assert paced.stats.whole_heap_passes == 1
        assert "whole-heap pass" not in caplog.text  # not from inside the collector
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert "garbage collector: whole-heap pass in" in caplog.text
    finally:
        gc.enable()
        paced.uninstall()
