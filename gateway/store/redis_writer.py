"""The Redis store's writer: every state-changing script goes through one queue and leaves in
one pipeline per round trip, so writes apply in the order they were submitted (as the SQLite
store's group commit does) and a burst costs a few round trips, not one each.

Each script still runs on its own (a pipeline is not a transaction) and fails alone: its error
comes back to its caller only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

MAX_BATCH = 1000  # scripts per pipeline


@dataclass(slots=True)
class _Op:
    script: AsyncScript
    args: list[str]
    future: asyncio.Future[Any]


class RedisWriter:
    """Runs submitted scripts in submission order, everything queued in one pipeline.

    ``batches`` counts round trips and ``ops`` the scripts in them.
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._queue: deque[_Op] = deque()
        self._wakeup = asyncio.Event()
        self.batches = 0
        self.ops = 0
        self._task = asyncio.create_task(self._run(), name="redis-writer")

    def submit(self, script: AsyncScript, args: list[str]) -> asyncio.Future[Any]:
        """Queue ``script(args)``; the future gets its answer, or the exception (a redis-py
        error) that failed it."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Op(script, args, future))
        self._wakeup.set()
        return future

    async def aclose(self) -> None:
        """Stop the writer; scripts still queued fail with ``ConnectionError``."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        while self._queue:
            op = self._queue.popleft()
            if not op.future.done():
                op.future.set_exception(ConnectionError("redis store closed"))

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            try:
                # EVALSHA directly: a pipeline given Script objects checks SCRIPT EXISTS first,
                # one more round trip per batch. A Redis that lost its scripts says NOSCRIPT.
                pipe = self._client.pipeline(transaction=False)
                for op in batch:
                    pipe.evalsha(op.script.sha, 0, *op.args)
                results = await pipe.execute(raise_on_error=False)
                unknown = [op for op, result in zip(batch, results, strict=True) if isinstance(result, NoScriptError)]
                if unknown:  # restarted or flushed: load the scripts, run those again, first
                    for script in {id(op.script): op.script for op in unknown}.values():
                        await self._client.script_load(script.script)
                    self._queue.extendleft(reversed(unknown))
            except Exception as exc:  # the round trip failed (refused, timed out): so did every script in it
                for op in batch:
                    if not op.future.done():
                        op.future.set_exception(exc)
                continue
            self.batches += 1
            self.ops += len(batch)
            for op, result in zip(batch, results, strict=True):
                if op.future.done() or isinstance(result, NoScriptError):
                    continue
                if isinstance(result, Exception):
                    op.future.set_exception(result)
                else:
                    op.future.set_result(result)
