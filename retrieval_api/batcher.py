"""Concurrent queries run as one batched search (`Library.query_many`): much higher throughput
for exact search, where a batch is one BLAS matrix product instead of one scan per query."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.concurrency import run_in_threadpool

from library import Library, LibraryError, Match

Key = tuple[str, str, int, str | None]  # (backbone, metric, k, recipe)
Pending = tuple[Any, "asyncio.Future[list[Match]]"]


class QueryBatcher:
    """Queues queries per (backbone, metric, k, recipe); while one batch is searched the next gathers.

    No timers: a lone query runs at once, so batching only adds latency under load. A batch
    that fails on bad input is retried query by query, so each caller gets its own error.
    """

    def __init__(self, library: Library, max_batch: int = 64) -> None:
        self.library, self.max_batch = library, max_batch
        self._pending: dict[Key, list[Pending]] = {}
        self._drains: dict[Key, asyncio.Task[None]] = {}

    async def query(
        self, prompt: Any, backbone: str, metric: str, k: int, recipe: str | None = None
    ) -> list[Match]:
        key = (backbone, metric, k, recipe)
        future: asyncio.Future[list[Match]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((prompt, future))
        if key not in self._drains:
            self._drains[key] = asyncio.create_task(self._drain(key))
        return await future

    async def _drain(self, key: Key) -> None:
        try:
            while self._pending.get(key):
                batch = self._pending[key][: self.max_batch]
                del self._pending[key][: self.max_batch]
                await self._search(key, batch)
        finally:
            self._pending.pop(key, None)
            del self._drains[key]

    async def _search(self, key: Key, batch: list[Pending]) -> None:
        backbone, metric, k, recipe = key
        try:
            results = await run_in_threadpool(
                self.library.query_many, [prompt for prompt, _ in batch], backbone, metric, k,
                recipe,
            )
        except LibraryError as err:
            if len(batch) > 1:
                for item in batch:
                    await self._search(key, [item])
                return
            results, error = None, err
        except Exception as err:  # noqa: BLE001 - handed to every waiting request
            results, error = None, err
        for i, (_, future) in enumerate(batch):
            if future.done():  # the client went away
                continue
            if results is None:
                future.set_exception(error)
            else:
                future.set_result(results[i])
