"""The writes queued for the group commit (`SendOp`, `MarkOp`), and how they are answered.

An op carries its arguments and the future its caller holds. The writer
(`storage.writer`) answers the future once the op's transaction has committed
or failed; `storage.plan` computes what each op writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from storage.base import MarkKind, MarkOutcome, SendOutcome, StorageRejected, StorageUnavailable

__all__ = ["MarkOp", "Op", "SendOp", "answer", "answer_failed", "fail_ops", "rejected"]


@dataclass(slots=True)
class SendOp:
    sender: str
    recipient: str
    cmid: str
    body: str | bytes
    type: str
    ts: int
    future: asyncio.Future[SendOutcome]


@dataclass(slots=True)
class MarkOp:
    user: str
    conv: str
    kind: MarkKind
    upto: int
    ts: int
    future: asyncio.Future[MarkOutcome]


Op = SendOp | MarkOp


def answer(ops: Sequence[Op], results: Sequence[object]) -> None:
    """Answer every op of `ops` not answered yet with its result of a committed batch:
    `results[i]` is the outcome of `ops[i]`, or the exception that failed it alone."""
    for op, res in zip(ops, results, strict=True):
        if op.future.done():
            continue
        if isinstance(res, BaseException):
            op.future.set_exception(res)
        else:
            op.future.set_result(res)  # type: ignore[arg-type]


def answer_failed(ops: Sequence[Op], make: Callable[[], BaseException]) -> None:
    """Answer every op of `ops` not answered yet with a new exception from `make`."""
    for op in ops:
        if not op.future.done():
            op.future.set_exception(make())


def fail_ops(ops: Sequence[Op], why: str) -> None:
    """Answer every op of `ops` not answered yet with StorageUnavailable(why)."""
    answer_failed(ops, lambda: StorageUnavailable(why))


def rejected(error: BaseException) -> StorageRejected:
    """StorageRejected for a write whose data the database refused with `error`."""
    refused = StorageRejected(f"the database refused the write: {type(error).__name__}")
    refused.__cause__ = error
    return refused
