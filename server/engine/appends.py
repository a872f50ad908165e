"""The append transaction of one batch: check every job's items against their sessions,
grow the sessions in one ``Allocation`` per job, run one backend call for the whole batch,
then commit and answer each job, or roll every job back and answer each with the error.

Each job's allocation pins every session the job names until it is answered: reserving
pages for a later job of a batch can evict idle or expired sessions, but never one an
earlier job already prepared. A job whose caller went away before the engine claimed it is
never applied; one the engine claimed is applied and answered. Each job stays
all-or-nothing: one that fails validation fails alone.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..backends.base import AttendItem, Backend, PackedItems
from ..cache import Allocation, Session, SessionStore
from ..errors import Aborted, DeadlineExceeded, InvalidArgument, ServiceError
from .jobs import AppendJob, AppendRequest, EngineObserver, PackedJob, answer
from .packed import attend_packed_in_chunks, check_shape, prepare_packed

log = logging.getLogger("q8kv.engine")


@dataclass(frozen=True)
class Chunking:
    """How a large job runs: ``tokens`` new tokens per backend call, and ``between(keys)``
    called after each chunk with the (tenant, session id) keys the job holds."""

    tokens: int
    between: Callable[[set[tuple[str, str]]], None]


@dataclass
class _Prepared:
    """One accepted job: its backend items (or its packed batch) and the allocation that
    holds its changes."""

    job: AppendJob
    allocation: Allocation
    items: list[AttendItem]
    sessions: list[Session]
    packed: PackedItems | None = None


class AppendTransaction:
    def __init__(
        self,
        store: SessionStore,
        backend: Backend,
        claim: Callable[[AppendJob], bool],
        observer: Callable[[], EngineObserver],
    ) -> None:
        self.store = store
        self.backend = backend
        self._claim = claim
        self._observer = observer  # read per batch: metrics may be attached after start

    def run(self, batch: list[AppendJob], chunks: Chunking | None = None) -> None:
        """Apply ``batch``; with ``chunks``, its one large job runs in chunks of tokens,
        other work interleaved between them (see ``Chunking``)."""
        accepted: list[_Prepared] = []
        try:
            self._prepare_batch(batch, accepted)
            if accepted:
                self._apply(accepted, chunks)
        finally:
            # Only after a bug: nothing may stay pinned or half-applied.
            for prepared in reversed(accepted):
                if prepared.allocation.state == "open":
                    prepared.allocation.roll_back()

    def _prepare_batch(self, batch: list[AppendJob], accepted: list[_Prepared]) -> None:
        now = time.monotonic()
        for job in batch:
            if not self._claim(job):
                continue  # the caller went away before the work started: never applied
            self._observer().on_queue_wait(now - job.enqueued)
            if job.deadline is not None and now > job.deadline:
                job.resolve(error=DeadlineExceeded("deadline: expired before the work ran"))
                continue
            try:
                accepted.append(self._prepare(job))
            except Exception as exc:
                if not isinstance(exc, ServiceError | MemoryError):
                    log.exception("request failed in validation")
                job.resolve(error=answer(exc))

    def _apply(self, accepted: list[_Prepared], chunks: Chunking | None = None) -> None:
        started = time.perf_counter()
        try:
            if chunks is None:
                outputs = self._device_calls(accepted)
            else:
                (prepared,) = accepted  # a chunked job runs alone
                keys = {(prepared.job.tenant, s.id) for s in prepared.sessions}
                if prepared.packed is not None:
                    out = attend_packed_in_chunks(
                        self.backend, prepared.packed, chunks.tokens, chunks.between, keys
                    )
                    outputs = [out]
                else:
                    outputs = [self._attend_in_chunks(prepared.items, chunks, keys)]
        except Exception as exc:
            if not isinstance(exc, MemoryError):
                log.exception("device call failed; rolling back %d requests", len(accepted))
            error = answer(exc)
            for prepared in reversed(accepted):
                prepared.allocation.roll_back()
                prepared.job.resolve(error=error)
            return
        for prepared in accepted:
            prepared.allocation.commit()
        observer = self._observer()
        observer.on_batch(sum(p.job.count for p in accepted), time.perf_counter() - started)
        for prepared, output in zip(accepted, outputs, strict=True):
            if prepared.packed is not None:
                n = prepared.packed.n
                observer.on_append(n * prepared.packed.size)
                prepared.job.resolve((output, (prepared.packed.starts + n).tolist()))
                continue
            items = prepared.items
            results = [(out, it.start + it.n) for out, it in zip(output, items, strict=True)]
            observer.on_append(sum(it.n for it in items))
            prepared.job.resolve(results)

    def _device_calls(self, accepted: list[_Prepared]) -> list:
        """Per job, in order: its outputs (a list per item, or a packed job's one array).
        Adjacent item jobs share one backend call; a packed job has its own."""
        outputs: list = []
        run: list[_Prepared] = []

        def flush() -> None:
            if run:
                flat = self.backend.append_and_attend([it for p in run for it in p.items])
                for p in run:
                    outputs.append(flat[: len(p.items)])
                    del flat[: len(p.items)]
                run.clear()

        for prepared in accepted:
            if prepared.packed is None:
                run.append(prepared)
                continue
            flush()
            outputs.append(self.backend.attend_packed(prepared.packed))
        flush()
        return outputs

    def _attend_in_chunks(
        self, items: list[AttendItem], chunks: Chunking, keys: set[tuple[str, str]]
    ) -> list[np.ndarray]:
        """Append and attend each item ``chunks.tokens`` new tokens at a time. Causal
        attention makes this exact: a chunk's queries read the cache up to their own
        position, which earlier chunks wrote. Between chunks, ``chunks.between(keys)`` runs
        work for other sessions; the job's own sessions (``keys``) wait."""
        outputs = []
        for item in items:
            out = np.empty((item.n, item.layout.num_heads, item.layout.head_dim), item.out_dtype)
            for first in range(0, item.n, chunks.tokens):
                last = min(item.n, first + chunks.tokens)
                pages = -(-(item.start + last) // item.layout.tokens_per_page)
                part = dataclasses.replace(
                    item, page_ids=item.page_ids[:pages], start=item.start + first,
                    q=item.q[first:last], k=item.k[first:last], v=item.v[first:last],
                )
                out[first:last] = self.backend.append_and_attend([part])[0]
                if last < item.n or item is not items[-1]:
                    chunks.between(keys)
            outputs.append(out)
        return outputs

    def _prepare(self, job: AppendJob) -> _Prepared:
        """Check every item against its session, reserve pages and advance lengths in one
        allocation; on the first failure roll it back and raise."""
        allocation = self.store.begin()
        prepared = _Prepared(job, allocation, [], [])
        try:
            if isinstance(job, PackedJob):
                assert job.batch is not None
                prepared.packed = prepare_packed(
                    self.store, job.batch, job.tenant, allocation, prepared.sessions
                )
                return prepared
            for index, request in enumerate(job.items):
                try:
                    session, item = self._prepare_item(index, request, job, allocation)
                except ServiceError as exc:
                    if job.label == "batch":  # name the batch index and the session
                        raise type(exc)(
                            f"batch[{index}] (session {request.session_id!r}): {exc.message}"
                        ) from None
                    raise
                prepared.items.append(item)
                prepared.sessions.append(session)
        except BaseException:
            allocation.roll_back()
            raise
        return prepared

    def _prepare_item(
        self, index: int, request: AppendRequest, job: AppendJob, allocation: Allocation
    ) -> tuple[Session, AttendItem]:
        # The lookup touches the session (a batch's sessions never look idle) and the pin
        # keeps it from eviction until the job is answered.
        session = self.store.get(request.session_id, job.tenant)
        allocation.pin(session)
        layer = session.layer(request.layer)
        g = session.geometry
        n = request.q.shape[0] if request.q.ndim == 3 else -1
        prefix = "" if job.label == "batch" else f"items[{index}]."
        check_shape(f"{prefix}q", request.q.shape, (n, g.num_heads, g.head_dim))
        check_shape(f"{prefix}k", request.k.shape, (n, g.num_kv_heads, g.head_dim))
        check_shape(f"{prefix}v", request.v.shape, (n, g.num_kv_heads, g.head_dim))
        if n < 1:
            raise InvalidArgument(f"{prefix}q.shape[0]: expected >= 1 tokens, got {n}")
        old_length = layer.length
        if request.expected_length is not None and request.expected_length != old_length:
            raise Aborted(
                f"{prefix}expected_length: expected the layer's length {old_length}, "
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
            out_dtype=request.q.dtype,  # the answer goes back in q's wire dtype
        )
        return session, item

