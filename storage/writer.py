"""`GroupCommitWriter`: one task that commits the queued writes in batches.

Group commit
------------
One writer task owns every write. `SqlStore.send()` / `mark()` queue an op with
a future (`storage.ops`) and return that future. The writer takes the first op,
drains the ops already queued (up to `max_batch`), commits them all in ONE
transaction (the `commit` it was given: for `SqlStore`, `storage.plan` on the
writer's connection), then answers the futures in queue order. With `concurrency`
N > 1 (PostgreSQL only: N connections) up to N batches commit at once, each in a
task of its own; their row locks order the batches that touch the same people. It starts a
transaction at most once per `commit_window`: an op that finds the writer idle
for a whole window is committed at once (no added latency when the load is
light), while under load the ops of each window share one transaction (fewer
commits: less CPU and disk per message).

Failures
--------
`commit` returns one result per op: its outcome, or the exception that fails
only that op (NotAMember, UptoTooHigh). A PostgreSQL deadlock / serialization
failure / lost unique race (`RETRYABLE_SQLSTATES`) is retried a few times first.
A transaction that fails because the database refused a value
(`storage.errors.is_data_error`: SQLSTATE class 22/23, an int over 64 bits, ...)
is run again one op per transaction, so that only the refused op fails
(StorageRejected) and one bad write never fails its neighbours. Any other failed
transaction fails every op of the batch with StorageUnavailable (nothing was
stored) and the writer goes on with the next batch. `stop()` commits what is
queued; a cancelled stop fails the rest, so that no future is left pending.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import ClassVar

from storage.base import StorageUnavailable, StoreStats
from storage.errors import RETRYABLE_SQLSTATES, is_data_error, is_driver_error, sqlstate
from storage.ops import Op, answer, answer_failed, fail_ops, rejected

__all__ = ["Commit", "GroupCommitWriter"]

log = logging.getLogger("chatd.storage")

Commit = Callable[[Sequence[Op]], Awaitable[list[object]]]
"""Commit one batch in one transaction: a result per op, in order (see the module doc)."""

_RETRIES = 5


class GroupCommitWriter:
    """The queue of writes and the task that commits them in batches (module docstring).

    `max_batch`: ops per transaction at most. `commit_window`: seconds between the
    starts of two transactions at least (0: commit as soon as the writer is free).
    """

    BATCH_SIZE_BOUNDS: ClassVar[tuple[int, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    """Upper bounds of the buckets of `batch_sizes` (ops per transaction)."""
    COMMIT_BOUNDS: ClassVar[tuple[float, ...]] = (
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
    )  # fmt: skip
    """Upper bounds (seconds) of the buckets of the commit times."""

    def __init__(
        self, commit: Commit, *, max_batch: int, commit_window: float, concurrency: int = 1
    ) -> None:
        if max_batch < 1 or concurrency < 1:
            raise ValueError("max_batch and concurrency must be >= 1")
        self.commit = commit
        self.max_batch = max_batch
        self.commit_window = commit_window
        self.concurrency = concurrency
        """Batches committed at once at most (each on a connection of its own): the next
        batch starts while earlier ones commit. 1: one after the other."""
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self.queue: asyncio.Queue[Op | None] = asyncio.Queue()
        """The ops waiting for a batch; None: stop after the ops before it."""
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: Counters for metrics / tests: ops in the committed batches, and the batches
        #: by size: `batch_sizes[i]` counts those with
        #: BATCH_SIZE_BOUNDS[i-1] < ops <= BATCH_SIZE_BOUNDS[i] (the last: above all).
        self.batched_ops = 0
        self.batch_sizes = [0] * (len(self.BATCH_SIZE_BOUNDS) + 1)
        self._commit_counts = [0] * (len(self.COMMIT_BOUNDS) + 1)
        self._commit_seconds = 0.0
        self._retries = 0
        self._failures = {"unavailable": 0, "rejected": 0}

    @property
    def batches(self) -> int:
        """Batches (transactions) committed."""
        return sum(self.batch_sizes)

    def stats(self) -> StoreStats:
        return StoreStats(
            self.batched_ops,
            self.BATCH_SIZE_BOUNDS,
            tuple(self.batch_sizes),
            self.COMMIT_BOUNDS,
            tuple(self._commit_counts),
            self._commit_seconds,
            self._retries,
            tuple(self._failures.items()),
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def started(self) -> bool:
        """Started and not stopped yet (it may be stopping)."""
        return self._task is not None

    def start(self) -> None:
        self._closing = False
        self._task = asyncio.create_task(self._run(), name="chatd-storage-writer")

    async def stop(self) -> None:
        """Commit (or fail with StorageUnavailable) every queued op, then end the task."""
        task = self._task
        if task is not None and not self._closing:
            self._closing = True
            self.queue.put_nowait(None)
            try:
                await task
            finally:
                self._task = None
                self._fail_queued()  # also when this stop() is cancelled
        self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                op = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if op is not None:
                fail_ops([op], "store closed")

    def submit(self, op: Op) -> None:
        """Queue `op`; raises StorageUnavailable unless the writer runs."""
        task = self._task
        if task is None or self._closing or task.done():
            raise StorageUnavailable("store is not open")
        self.queue.put_nowait(op)

    # ------------------------------------------------------------------ batches

    async def _run(self) -> None:
        try:
            await self._form_batches()
            while self._in_flight:
                await asyncio.wait(set(self._in_flight))
        except asyncio.CancelledError:  # each cancelled batch answers its ops
            for t in list(self._in_flight):
                t.cancel()
            await asyncio.gather(*self._in_flight, return_exceptions=True)
            raise

    async def _form_batches(self) -> None:
        queue = self.queue
        loop = asyncio.get_running_loop()
        stop = False
        started = -math.inf
        while not stop:
            first = await queue.get()
            if first is None:
                break
            batch: list[Op] = [first]
            # Paced: one transaction per window at most; the ops of the rest of the
            # window join this one. After an idle window, `wait` <= 0: no delay.
            wait = started + self.commit_window - loop.time()
            if wait > 0.0 and queue.qsize() < self.max_batch:
                try:
                    await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    fail_ops(batch, "store closed")  # taken out of the queue already
                    raise
            started = loop.time()
            if self.concurrency > 1:  # wait for a free slot before the batch is formed
                try:
                    await self._slots.acquire()
                except asyncio.CancelledError:
                    fail_ops(batch, "store closed")
                    raise
            while len(batch) < self.max_batch:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            if self.concurrency == 1:
                await self._run_batch(batch)
            else:  # in a task of its own, holding its slot: the next batch forms meanwhile
                task = asyncio.create_task(self._run_batch(batch), name="chatd-storage-batch")
                self._in_flight.add(task)
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _run_batch(self, batch: list[Op]) -> None:
        """Commit `batch` and answer its ops, whatever happens."""
        started = time.perf_counter()
        try:
            results = await self._commit_retrying(batch)
        except asyncio.CancelledError:  # the writer is being stopped: answer the batch, stop
            log.warning("storage batch of %d failed: %s", len(batch), "StorageUnavailable")
            fail_ops(batch, "store closed")
            raise
        except Exception as error:
            await self._batch_failed(batch, error)
            return
        took = time.perf_counter() - started
        self._commit_seconds += took
        self._commit_counts[bisect.bisect_left(self.COMMIT_BOUNDS, took)] += 1
        self.batched_ops += len(batch)
        self.batch_sizes[bisect.bisect_left(self.BATCH_SIZE_BOUNDS, len(batch))] += 1
        answer(batch, results)

    async def _commit_retrying(self, batch: list[Op]) -> list[object]:
        """`commit(batch)`, again after a retryable failure (`_RETRIES` attempts at most)."""
        attempt = 1
        while True:
            try:
                return await self.commit(batch)
            except Exception as exc:
                code = sqlstate(exc)
                if code not in RETRYABLE_SQLSTATES or attempt >= _RETRIES:
                    raise
            self._retries += 1
            log.info("storage batch retry after %s (attempt %d)", code, attempt)
            attempt += 1

    async def _batch_failed(self, batch: list[Op], error: Exception) -> None:
        """Answer the ops of a batch whose transaction failed with `error`."""
        refused = is_data_error(error)
        self._failures["rejected" if refused else "unavailable"] += 1
        if is_driver_error(error) or isinstance(error, StorageUnavailable) or refused:
            log.warning("storage batch of %d failed: %s", len(batch), type(error).__name__)
        else:
            log.exception("storage batch of %d failed unexpectedly", len(batch), exc_info=error)
        if not refused:
            fail_ops(batch, f"transaction failed: {type(error).__name__}")
        elif len(batch) > 1:
            await self._run_alone(batch)
        else:
            answer_failed(batch, lambda: rejected(error))

    async def _run_alone(self, batch: list[Op]) -> None:
        """The database refused a value of `batch`: one transaction per op, in queue
        order, so that only the op it refuses fails (StorageRejected) and the others
        are stored as if their batch had been committed."""
        log.warning(
            "storage batch of %d refused a value: committing its writes one by one", len(batch)
        )
        for i, op in enumerate(batch):
            try:
                await self._run_batch([op])
            except asyncio.CancelledError:
                fail_ops(batch[i + 1 :], "store closed")
                raise
            fut = op.future
            if (
                fut.done()
                and not fut.cancelled()
                and isinstance(fut.exception(), StorageUnavailable)
            ):
                # The database itself failed meanwhile: one attempt per op would stall
                # the writer an outage's timeout per op. The rest fail now, unstored.
                fail_ops(batch[i + 1 :], "transaction failed")
                return
