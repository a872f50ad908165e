"""The engine owns the device: one worker thread runs every operation that touches the
cache, in arrival order, so no lock is ever held across a kernel and the calls on one
session apply in the order they came.

AppendAndAttend requests queued while the device is busy are coalesced into one backend
call (the dynamic batcher), up to ``max_batch_items`` items, optionally waiting up to
``max_queue_delay_us`` for more. Each request stays all-or-nothing: one that fails
validation fails alone; if the device call fails, every request of the batch is rolled back.

Each request's changes to the store live in one ``Allocation`` (server/cache.py), which
also pins every session the request names until the request is answered: reserving pages
for a later request of a batch can evict idle or expired sessions, but never one an earlier
request already prepared. A job whose caller went away (cancelled, deadline, drain) before
the engine claimed it is never applied; one the engine claimed is applied and answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backends.base import AttendItem, Backend
from .cache import Allocation, Session, SessionStore
from .errors import (
    Aborted,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)

log = logging.getLogger("q8kv.engine")

# Largest append (new tokens over all items) that may run inline on the event loop.
INLINE_MAX_TOKENS = 64


@dataclass
class AppendRequest:
    """One item of an AppendAndAttend call, decoded and checked for dtype and finiteness."""

    session_id: str
    layer: int
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    # The layer length the caller believes it appends at; a mismatch aborts the call.
    expected_length: int | None = None


@dataclass
class EngineObserver:
    """Hooks for metrics; every one runs on the worker thread and must be cheap."""

    on_batch: Callable[[int, float], None] = lambda items, seconds: None  # items, device s
    on_queue_wait: Callable[[float], None] = lambda seconds: None
    on_append: Callable[[Session, int], None] = lambda session, tokens: None


@dataclass
class _Job:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    # Both change only under Engine._ready: the worker claims a job before running it, a
    # caller that goes away withdraws it if not yet claimed. Exactly one of them wins.
    claimed: bool = False
    withdrawn: bool = False

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
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
class _Call(_Job):
    fn: Callable[[], Any] = lambda: None


@dataclass
class _Append(_Job):
    items: Sequence[AppendRequest] = ()
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() by which the work must start


@dataclass
class _Prepared:
    """One accepted job: its backend items and the allocation that holds its changes."""

    job: _Append
    allocation: Allocation
    items: list[AttendItem]
    sessions: list[Session]


class Engine:
    def __init__(
        self,
        backend: Backend,
        store: SessionStore,
        max_batch_items: int = 64,
        max_queue_delay_us: int = 0,
        observer: EngineObserver | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.max_batch_items = max_batch_items
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.observer = observer or EngineObserver()
        self._jobs: deque[_Job | None] = deque()
        self._ready = threading.Condition()
        self._accepting = True
        self._busy = False  # a job is running, on the worker or inline on the event loop
        # A small append from the only call in flight, finding the engine idle, runs right on
        # the event loop: two thread hand-offs cost more than a decode step, and there is
        # nothing to batch it with. With other calls in flight it goes to the worker, so the
        # loop stays free to take the others and the batcher coalesces them. Off when a
        # queue delay is asked for.
        self.inline_when_idle = max_queue_delay_us == 0
        self._thread = threading.Thread(target=self._run, name="q8kv-engine", daemon=True)

    # -- public, called from the event loop ------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the worker, in order with every other operation."""
        loop = asyncio.get_running_loop()
        return await self._submit(_Call(future=loop.create_future(), loop=loop, fn=fn))

    async def append_and_attend(
        self,
        items: Sequence[AppendRequest],
        tenant: str = "",
        deadline: float | None = None,
        alone: Callable[[], bool] | None = None,
    ) -> list[tuple[np.ndarray, int]]:
        """(float32 output [n, H, D], new layer length) for each item, in order.

        ``alone()`` tells whether this is the only call in flight; if so, and the job is
        small and finds the engine idle, it runs inline on the event loop."""
        loop = asyncio.get_running_loop()
        job = _Append(
            future=loop.create_future(), loop=loop, items=items, tenant=tenant, deadline=deadline
        )
        small = sum(item.k.shape[0] for item in items) <= INLINE_MAX_TOKENS
        if alone is not None and small and self.inline_when_idle:
            return await self._submit_maybe_inline(job, alone)
        return await self._submit(job)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued work, then end the worker thread."""
        with self._ready:
            self._accepting = False
            self._jobs.append(None)
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    async def _submit(self, job: _Job) -> Any:
        with self._ready:
            if not self._accepting:
                raise Unavailable("server: shutting down, not accepting new work")
            self._jobs.append(job)
            self._ready.notify()
        return await self._outcome(job)

    async def _outcome(self, job: _Job) -> Any:
        """Wait for the job's answer. The caller going away (task cancelled) withdraws the
        job if the engine has not claimed it yet; a claimed job runs to its end and sets
        its future, whose answer then has no one to read it."""
        try:
            # Shielded: a cancelled caller must not cancel the future the worker answers.
            return await asyncio.shield(job.future)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise

    def _withdraw(self, job: _Job) -> None:
        with self._ready:
            if not job.claimed:
                job.withdrawn = True
                with contextlib.suppress(ValueError):
                    self._jobs.remove(job)
                job.future.cancel()
                return
        # Claimed: it is applied and answered; read the answer so asyncio does not warn.
        job.future.add_done_callback(_discard_outcome)

    def _claim(self, job: _Job) -> bool:
        """Whether the engine runs ``job``: not if its caller withdrew it first."""
        with self._ready:
            if job.withdrawn or job.future.done():
                return False
            job.claimed = True
            return True

    async def _submit_maybe_inline(self, job: _Job, alone: Callable[[], bool]) -> Any:
        """Queue the job (its place in line is taken now, so order holds), give the event
        loop one turn so calls that arrived meanwhile can start and queue behind it, then run
        it right here if it is still alone and the engine idle: two thread hand-offs cost
        more than a small decode step. Otherwise hand it to the worker, which batches it
        with the others."""
        with self._ready:
            if not self._accepting:
                raise Unavailable("server: shutting down, not accepting new work")
            self._jobs.append(job)  # the worker is not woken for it yet
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            self._withdraw(job)
            raise
        with self._ready:
            inline = (
                len(self._jobs) == 1 and self._jobs[0] is job and not self._busy and alone()
            )
            if inline:
                self._jobs.popleft()
                self._busy = True
            else:
                self._ready.notify()
        if inline:
            try:
                self._execute(job)
            finally:
                with self._ready:
                    self._busy = False
                    if self._jobs:  # wake the worker only when it has something to do
                        self._ready.notify()
        return await self._outcome(job)

    # -- the worker --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._jobs or self._busy:
                    self._ready.wait()
                job = self._jobs.popleft()
                if job is None:
                    return
                self._busy = True
            try:
                self._execute(job)
            finally:
                with self._ready:
                    self._busy = False

    def _execute(self, job: _Job) -> None:
        if isinstance(job, _Call):
            self._run_call(job)
            return
        batch = self._collect_batch(job)
        try:
            self._run_appends(batch)
        except Exception as exc:  # a bug: answer INTERNAL, but never let the worker die
            log.exception("append batch failed")
            for pending in batch:
                pending.resolve(error=_answer(exc))  # no-op for jobs already answered

    def _collect_batch(self, first: _Append) -> list[_Append]:
        """Take the append jobs queued right behind ``first`` (never past another kind of
        job, so order holds), waiting up to max_queue_delay for more to arrive."""
        batch, count = [first], len(first.items)
        wait_until = time.monotonic() + self.max_queue_delay
        with self._ready:
            while count < self.max_batch_items:
                if not self._jobs:
                    remaining = wait_until - time.monotonic()
                    if remaining <= 0 or not self._ready.wait(remaining):
                        break
                    continue
                nxt = self._jobs[0]
                if not isinstance(nxt, _Append) or count + len(nxt.items) > self.max_batch_items:
                    break
                batch.append(self._jobs.popleft())
                count += len(nxt.items)
        return batch

    def _run_call(self, job: _Call) -> None:
        if not self._claim(job):
            return
        try:
            job.resolve(job.fn())
        except ServiceError as exc:
            job.resolve(error=exc)
        except Exception as exc:  # a bug: log it, answer INTERNAL, keep serving
            if not isinstance(exc, MemoryError):
                log.exception("engine call failed")
            job.resolve(error=_answer(exc))

    def _run_appends(self, batch: list[_Append]) -> None:
        accepted: list[_Prepared] = []
        try:
            self._prepare_batch(batch, accepted)
            if accepted:
                self._apply(accepted)
        finally:
            # Only after a bug: nothing may stay pinned or half-applied.
            for prepared in reversed(accepted):
                if prepared.allocation.state == "open":
                    prepared.allocation.roll_back()

    def _prepare_batch(self, batch: list[_Append], accepted: list[_Prepared]) -> None:
        now = time.monotonic()
        for job in batch:
            if not self._claim(job):
                continue  # the caller went away before the work started: never applied
            self.observer.on_queue_wait(now - job.enqueued)
            if job.deadline is not None and now > job.deadline:
                job.resolve(error=DeadlineExceeded("deadline: expired before the work ran"))
                continue
            try:
                accepted.append(self._prepare(job))
            except Exception as exc:
                if not isinstance(exc, ServiceError | MemoryError):
                    log.exception("request failed in validation")
                job.resolve(error=_answer(exc))

    def _apply(self, accepted: list[_Prepared]) -> None:
        """One backend call for every accepted job; then commit and answer each, or, if
        the call fails, roll every job back (last first) and answer each with the error."""
        items = [item for prepared in accepted for item in prepared.items]
        started = time.perf_counter()
        try:
            outputs = self.backend.append_and_attend(items)
        except Exception as exc:
            if not isinstance(exc, MemoryError):
                log.exception("device call failed; rolling back %d requests", len(accepted))
            error = _answer(exc)
            for prepared in reversed(accepted):
                prepared.allocation.roll_back()
                prepared.job.resolve(error=error)
            return
        for prepared in accepted:
            prepared.allocation.commit()
        self.observer.on_batch(len(items), time.perf_counter() - started)
        position = 0
        for prepared in accepted:
            results = []
            for item, session in zip(prepared.items, prepared.sessions, strict=True):
                results.append((outputs[position], item.start + item.n))
                position += 1
                self.observer.on_append(session, item.n)
            prepared.job.resolve(results)

    def _prepare(self, job: _Append) -> _Prepared:
        """Check every item against its session, reserve pages and advance lengths in one
        allocation; on the first failure roll it back and raise."""
        allocation = self.store.begin()
        prepared = _Prepared(job, allocation, [], [])
        try:
            for index, request in enumerate(job.items):
                session, item = self._prepare_item(index, request, job.tenant, allocation)
                prepared.items.append(item)
                prepared.sessions.append(session)
        except BaseException:
            allocation.roll_back()
            raise
        return prepared

    def _prepare_item(
        self, index: int, request: AppendRequest, tenant: str, allocation: Allocation
    ) -> tuple[Session, AttendItem]:
        # The lookup touches the session (a batch's sessions never look idle) and the pin
        # keeps it from eviction until the job is answered.
        session = self.store.get(request.session_id, tenant)
        allocation.pin(session)
        layer = session.layer(request.layer)
        g = session.geometry
        n = request.q.shape[0] if request.q.ndim == 3 else -1
        prefix = f"items[{index}]"
        _check_shape(f"{prefix}.q", request.q.shape, (n, g.num_heads, g.head_dim))
        _check_shape(f"{prefix}.k", request.k.shape, (n, g.num_kv_heads, g.head_dim))
        _check_shape(f"{prefix}.v", request.v.shape, (n, g.num_kv_heads, g.head_dim))
        if n < 1:
            raise InvalidArgument(f"{prefix}.q.shape[0]: expected >= 1 tokens, got {n}")
        old_length = layer.length
        if request.expected_length is not None and request.expected_length != old_length:
            raise Aborted(
                f"{prefix}.expected_length: expected the layer's length {old_length}, "
                f"got {request.expected_length}"
            )
        allocation.grow(session, request.layer, old_length + n)
        item = AttendItem(
            layout=session.layout,
            softmax_scale=session.softmax_scale,
            page_ids=layer.page_table(),
            start=old_length,
            q=request.q,
            k=request.k,
            v=request.v,
        )
        return session, item


def _answer(exc: BaseException) -> BaseException:
    """The error a caller gets: running out of host memory is RESOURCE_EXHAUSTED (the
    call was too big for the server now), never INTERNAL."""
    if isinstance(exc, MemoryError):
        return ResourceExhausted(
            "host memory: the server ran out of memory running this call "
            "(nothing of it was applied); send fewer tokens per call"
        )
    return exc


def _discard_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks an error as retrieved


def _check_shape(field_name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        shown = ["n" if i == 0 else str(d) for i, d in enumerate(expected)]
        raise InvalidArgument(
            f"{field_name}.shape: expected [{', '.join(shown)}] with n = {expected[0]} "
            f"(q.shape[0]), got {list(actual)}"
            if expected[0] >= 0
            else f"{field_name}.shape: expected 3 dimensions, got {list(actual)}"
        )
