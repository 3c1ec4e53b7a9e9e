"""Group commit: finished messages from many sessions share disk flushes.

Sessions hand their finished message to ``BatchCommitter.submit`` and get a
future.  While a batch is being committed in a worker thread, new messages
wait; when it is done, everything that arrived meanwhile goes out as the
next batch.  Under load a batch holds many messages and costs about as much
as one (see ``MaildirStorage.commit_many``); alone, a message goes out at
once, so an idle server answers as fast as before.

Up to ``max_batches`` batches run at the same time: a little overlap keeps
the disk busy while the next batch is being written, and the journal still
merges their flushes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from .storage import MessageWriter, Storage


class BatchCommitter:
    def __init__(self, storage: Storage, executor: Executor, *, max_batches: int = 1,
                 max_batch: int = 256) -> None:
        self._storage = storage
        self._executor = executor
        self._max_batches = max_batches
        self._max_batch = max_batch
        self._pending: list[tuple[MessageWriter, asyncio.Future[None]]] = []
        self._running = 0
        self._drained: asyncio.Event | None = None
        self.batches = 0  # batches committed (for tests and the log)

    def submit(self, writer: MessageWriter) -> asyncio.Future[None]:
        """Commit ``writer``; the future is done when it is durable."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append((writer, fut))
        if self._running < self._max_batches:
            self._start(loop)
        return fut

    async def drain(self) -> None:
        """Wait until nothing is pending or running."""
        while self._pending or self._running:
            self._drained = asyncio.Event()
            await self._drained.wait()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        writers = [w for w, _ in batch]
        self._running += 1
        self.batches += 1
        try:
            job = loop.run_in_executor(self._executor, _commit_all, self._storage, writers)
        except RuntimeError as exc:  # executor shut down
            self._running -= 1
            self._settle(batch, [exc] * len(batch))
            return
        job.add_done_callback(lambda j: self._done(loop, batch, j))

    def _done(self, loop: asyncio.AbstractEventLoop,
              batch: list[tuple[MessageWriter, asyncio.Future[None]]],
              job: asyncio.Future[list[BaseException | None]]) -> None:
        self._running -= 1
        exc = job.exception()
        results = job.result() if exc is None else [exc] * len(batch)
        self._settle(batch, results)
        if self._pending and self._running < self._max_batches:
            self._start(loop)
        elif not self._pending and not self._running and self._drained is not None:
            self._drained.set()

    @staticmethod
    def _settle(batch: list[tuple[MessageWriter, asyncio.Future[None]]],
                results: Sequence[BaseException | None]) -> None:
        for (_, fut), error in zip(batch, results, strict=True):
            if fut.done():
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)


def _commit_all(storage: Any, writers: list[MessageWriter]) -> list[BaseException | None]:
    """Worker thread: the storage's batch commit, or one commit per writer."""
    many = getattr(storage, "commit_many", None)
    if many is not None:
        return list(many(writers))
    errors: list[BaseException | None] = []
    for w in writers:
        try:
            w.commit()
        except Exception as exc:
            errors.append(exc)
        else:
            errors.append(None)
    return errors
