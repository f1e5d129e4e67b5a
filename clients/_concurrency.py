"""How a split call (`infer_batch`, the task clients) keeps several requests in flight.

The one place where the blocking and the asyncio clients differ beyond their transports:
`SyncFanOut` runs the requests on a thread pool, `AsyncFanOut` as tasks on the event loop; both
keep at most `concurrency` in flight and return the results in job order. `scripts/unasync.py`
turns `AsyncFanOut` into `SyncFanOut` when it writes the sync client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
Job = tuple[range, "str | None"]


class SyncFanOut:
    """Runs jobs on a thread pool of `concurrency` threads, created on first use.

    Args:
        concurrency: Jobs in flight at once.
        check_open: Raises when the client is closed (no new pool after `close`).
    """

    def __init__(self, concurrency: int, check_open: Callable[[], None]) -> None:
        self.concurrency = concurrency
        self._check_open = check_open
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kiln-client")
            return self._executor

    def map(self, send: Callable[[range, str | None], T], jobs: Sequence[Job]) -> list[T]:
        """`send(items, request_id)` for every job, results in job order."""
        if len(jobs) == 1 or self.concurrency == 1:
            return [send(items, rid) for items, rid in jobs]
        futures = [self._pool().submit(send, items, rid) for items, rid in jobs]
        return [future.result() for future in futures]

    def close(self) -> None:
        """Waits for the jobs in flight and stops the pool."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)


class AsyncFanOut:
    """Runs jobs as coroutines on the running event loop, at most `concurrency` at once.

    Args:
        concurrency: Jobs in flight at once.
        check_open: Raises when the client is closed.
    """

    def __init__(self, concurrency: int, check_open: Callable[[], None]) -> None:
        self.concurrency = concurrency
        self._check_open = check_open

    async def map(self, send: Callable[[range, str | None], Awaitable[T]], jobs: Sequence[Job]) -> list[T]:
        """`await send(items, request_id)` for every job, results in job order."""
        self._check_open()
        limit = asyncio.Semaphore(self.concurrency)  # per call: a client may outlive an event loop

        async def limited(items: range, rid: str | None) -> T:
            async with limit:
                return await send(items, rid)

        return list(await asyncio.gather(*(limited(items, rid) for items, rid in jobs)))

    async def close(self) -> None:
        """Nothing to stop: the jobs are the caller's tasks."""
