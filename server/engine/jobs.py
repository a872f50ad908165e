"""What travels through the engine's queue: jobs (a function to run, or a batchable append)
and the answer each caller waits for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ResourceExhausted


@dataclass
class AppendRequest:
    """One item of an AppendAndAttend call, decoded and checked for dtype and finiteness."""

    session_id: str
    layer: int
    q: np.ndarray  # [n, H, D]
    k: np.ndarray  # [n, KVH, D]
    v: np.ndarray  # [n, KVH, D]
    # The layer length the caller believes it appends at; a mismatch aborts the call.
    expected_length: int | None = None


@dataclass
class PackedBatch:
    """One layer of one step for B sessions (AttendBatch), decoded and checked: same n,
    heads and head_dim for all; each session's own geometry is checked by the engine."""

    session_ids: list[str]  # [B], distinct
    layer: int
    q: np.ndarray  # [B, n, H, D]
    k: np.ndarray  # [B, n, KVH, D]
    v: np.ndarray  # [B, n, KVH, D]
    expected_lengths: list[int] | None = None  # [B], or None: unconditional


@dataclass
class EngineObserver:
    """Hooks for metrics; every one runs on the worker thread and must be cheap."""

    on_batch: Callable[[int, float], None] = lambda items, seconds: None  # items, device s
    on_queue_wait: Callable[[float], None] = lambda seconds: None
    on_append: Callable[[int], None] = lambda tokens: None  # tokens one job appended


@dataclass
class Job:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    # Both change only under the queue's lock: the worker claims a job before running it, a
    # caller that goes away withdraws it if not yet claimed. Exactly one of them wins.
    claimed: bool = False
    withdrawn: bool = False

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Answer the caller, from the worker thread or the event loop."""

        def settle() -> None:
            if self.future.done():  # the caller went away (cancelled, deadline)
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:  # the worker thread has no running loop
            on_loop = False
        if on_loop:
            settle()
        else:
            self.loop.call_soon_threadsafe(settle)


@dataclass
class CallJob(Job):
    """Run ``fn`` on the worker, in order with everything else."""

    fn: Callable[[], Any] = lambda: None


@dataclass
class AppendJob(Job):
    """One AppendAndAttend call: all of its items apply, or none."""

    items: Sequence[AppendRequest] = ()
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() by which the work must start
    # How errors name an item: "items[i]" for AppendAndAttend, "batch[i]" for AttendBatch
    # (whose errors also name the item's session).
    label: str = "items"
    tokens: int = field(init=False)  # new tokens over all items

    def __post_init__(self) -> None:
        # Here, on the caller's side: an item too broken to count fails its own call.
        self.tokens = sum(item.k.shape[0] for item in self.items)

    @property
    def count(self) -> int:
        """Items (session-layers) the job appends to."""
        return len(self.items)

    def session_ids(self) -> list[str]:
        return [item.session_id for item in self.items]


@dataclass
class PackedJob(AppendJob):
    """One AttendBatch call: its q/k/v stay [B, n, ...] arrays all the way to the backend.
    Answered with (output [B, n, H, D] in q's dtype, new layer lengths)."""

    batch: PackedBatch | None = None
    label: str = "batch"

    def __post_init__(self) -> None:
        assert self.batch is not None
        self.tokens = self.batch.k.shape[0] * self.batch.k.shape[1]

    @property
    def count(self) -> int:
        assert self.batch is not None
        return len(self.batch.session_ids)

    def session_ids(self) -> list[str]:
        assert self.batch is not None
        return self.batch.session_ids


def answer(exc: BaseException) -> BaseException:
    """The error a caller gets: running out of host memory is RESOURCE_EXHAUSTED (the call
    was too big for the server now), never INTERNAL."""
    if isinstance(exc, MemoryError):
        return ResourceExhausted(
            "host memory: the server ran out of memory running this call "
            "(nothing of it was applied); send fewer tokens per call"
        )
    return exc


def discard_outcome(future: asyncio.Future) -> None:
    """Mark a future's error as read (its caller is gone), so asyncio does not warn."""
    if not future.cancelled():
        future.exception()
