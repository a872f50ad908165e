"""The engine: every operation on the cache, as a named method. Changes run on the ordered
worker (appends through the batcher and the append transaction); reads of session
metadata take a consistent snapshot under the store's lock without queueing.

This is what the RPC layer talks to; it never reaches the store or the backend itself.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from ..backends.base import Backend
from ..cache import Geometry, SessionSnapshot, SessionStore
from ..errors import FailedPrecondition, InvalidArgument, NotFound, OutOfRange
from ..persistence import transfer
from .appends import AppendTransaction, Chunking
from .batcher import collect_batch, take_interleaved
from .jobs import (
    AppendJob,
    AppendRequest,
    EngineObserver,
    PackedBatch,
    PackedJob,
    answer,
)
from .worker import Worker, log


class Engine:
    def __init__(
        self,
        backend: Backend,
        store: SessionStore,
        max_batch_items: int = 64,
        max_queue_delay_us: int = 0,
        observer: EngineObserver | None = None,
        prefill_chunk_tokens: int = 0,
    ) -> None:
        self.backend = backend
        self.store = store
        store.copy_page = backend.copy_page  # the copy-on-write of shared pages
        self.max_batch_items = max_batch_items
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.observer = observer or EngineObserver()
        # A job of more new tokens runs in chunks of this many, other sessions' appends
        # interleaved between them (0: never chunked).
        self.prefill_chunk_tokens = prefill_chunk_tokens or 2**62
        # Inline runs are off when a queue delay is asked for: the delay exists to batch.
        self.worker = Worker(self._execute, inline_when_idle=max_queue_delay_us == 0)
        self.appends = AppendTransaction(store, backend, self.worker.claim, lambda: self.observer)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued work, then end the worker thread."""
        self.worker.stop(timeout)

    async def call(self, fn, inline: bool = False) -> object:
        """Run ``fn`` on the worker, in order with every other operation; ``inline``: a
        metadata-only ``fn`` that runs on the event loop when the engine is idle."""
        return await self.worker.call(fn, inline)

    @property
    def page_bytes(self) -> int:
        return self.store.pool.page_bytes

    @property
    def budget_bytes(self) -> int:
        return self.store.pool.num_pages * self.store.pool.page_bytes

    # -- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        geometry: Geometry,
        session_id: str,
        ttl_seconds: float,
        softmax_scale: float | None,
        tenant: str,
    ) -> SessionSnapshot:
        store = self.store
        return await self.call(
            lambda: store.snapshot(
                store.create(geometry, session_id, ttl_seconds, softmax_scale, tenant)
            ),
            inline=True,
        )

    def read_session(self, session_id: str, tenant: str) -> SessionSnapshot:
        """A snapshot of one session, without waiting for the worker; counts as a use."""
        return self.store.read(session_id, tenant)

    def list_sessions(
        self, tenant: str, after: str, size: int
    ) -> tuple[list[SessionSnapshot], bool]:
        """The tenant's sessions after ``after`` (by id), ``size`` at most, and whether more
        follow; without waiting for the worker."""
        return self.store.list_page(tenant, after, size)

    async def fork_session(
        self,
        source_id: str,
        tenant: str,
        session_id: str,
        length: int | None,
        ttl_seconds: float,
    ) -> SessionSnapshot:
        """A new session of ``tenant`` sharing ``source_id``'s pages up to ``length``
        tokens per layer (None: all); the source's lookup counts as a use."""
        store = self.store

        def fork() -> SessionSnapshot:
            try:
                source = store.get(source_id, tenant)
            except NotFound as exc:  # name the request's field
                raise NotFound(f"source_{exc.message}") from None
            return store.snapshot(store.fork(source, session_id, length, ttl_seconds))

        return await self.call(fork)

    async def delete_session(self, session_id: str, tenant: str) -> int:
        """Bytes of the pages the session gave back."""
        return await self.call(lambda: self.store.delete(session_id, tenant), inline=True)

    async def truncate_session(self, session_id: str, tenant: str, length: int) -> SessionSnapshot:
        def truncate() -> SessionSnapshot:
            session = self.store.get(session_id, tenant)
            self.store.truncate(session, length)
            return self.store.snapshot(session)

        # Inline when idle: a truncate is metadata (lengths, page references), and the
        # thread hop it took made the next decode step pay for waking the worker.
        return await self.call(truncate, inline=True)

    async def evict_expired(self) -> int:
        return await self.call(self.store.evict_expired)

    # -- attention -----------------------------------------------------------------------

    async def append_and_attend(
        self, items: Sequence[AppendRequest], tenant: str = "", deadline: float | None = None
    ) -> list[tuple[np.ndarray, int]]:
        """(float32 output [n, H, D], new layer length) for each item, in order."""
        loop = asyncio.get_running_loop()
        job = AppendJob(
            future=loop.create_future(),
            loop=loop,
            items=items,
            tenant=tenant,
            deadline=deadline,
        )
        return await self.worker.append(job)

    async def attend_batch(
        self, batch: PackedBatch, tenant: str = "", deadline: float | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """A packed batch (one layer, B sessions, n tokens each) as one job: the output
        [B, n, H, D] in q's dtype (computed in float32) and each session's new layer
        length. All or none."""
        loop = asyncio.get_running_loop()
        job = PackedJob(
            future=loop.create_future(), loop=loop, tenant=tenant, deadline=deadline,
            batch=batch,
        )
        return await self.worker.append(job)

    async def dequantize(
        self, session_id: str, tenant: str, layer: int, start: int, end: int | None
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """K and V float32 [KVH, end - start, D] of one layer, and the layer's length."""

        def read() -> tuple[np.ndarray, np.ndarray, int]:
            session = self.store.get(session_id, tenant)
            view = session.layer(layer)
            stop = view.length if end is None else end
            for name, value in (("end", stop), ("start", start)):
                if value > view.length:
                    raise OutOfRange(
                        f"{name}: expected <= the layer's length {view.length}, got {value}"
                    )
            if not 0 <= start <= stop:
                raise InvalidArgument(f"start: expected 0 <= start <= end ({stop}), got {start}")
            k, v = self.backend.dequantize(session.layout, view.page_table(), start, stop)
            return k, v, view.length

        return await self.call(read)

    # -- transfer ------------------------------------------------------------------------

    async def export_session(
        self, session_id: str, tenant: str, max_message_bytes: int
    ) -> AsyncIterator[pb.SessionChunk]:
        """The session as a chunk stream: header, each layer's tokens in chunks that fit a
        message, then the checksum. Each layer is read in an engine call of its own, so
        appends to other sessions flow between them."""
        header = await self.call(lambda: transfer.header_of(self.store.get(session_id, tenant)))
        checksum = transfer.Checksum()
        first = pb.SessionChunk(header=header)
        checksum.add(first)
        yield first
        for index, length in enumerate(header.layer_lengths):
            read = functools.partial(
                self._export_layer, session_id, tenant, index, length, max_message_bytes
            )
            for tokens in await self.call(read):
                chunk = pb.SessionChunk(tokens=tokens)
                checksum.add(chunk)
                yield chunk
        yield checksum.trailer()

    def _export_layer(
        self, session_id: str, tenant: str, index: int, length: int, max_message_bytes: int
    ) -> list[pb.TokenChunk]:
        session = self.store.get(session_id, tenant)
        held = session.layers[index].length
        if held < length:
            raise FailedPrecondition(
                f"session_id: {session_id!r} was truncated during the export (layer {index} "
                f"has {held} tokens, the header said {length})"
            )
        return transfer.layer_chunks(self.backend, session, index, length, max_message_bytes)

    async def import_session(
        self, chunks: list[pb.SessionChunk], tenant: str
    ) -> SessionSnapshot:
        """Install a session from an ExportSession stream (checked before anything changes)."""
        imported = transfer.assemble(chunks)
        store, backend = self.store, self.backend
        return await self.call(
            lambda: store.snapshot(transfer.install(store, backend, imported, tenant))
        )

    # -- the worker's dispatch -----------------------------------------------------------

    def _execute(self, job: AppendJob) -> None:
        """An append job (the worker runs calls itself: Worker.run_call)."""
        chunk = self.prefill_chunk_tokens
        if job.tokens > chunk:
            self._run_batch([job], Chunking(chunk, self._interleave))
        else:
            queue = self.worker.queue
            self._run_batch(
                collect_batch(queue, job, self.max_batch_items, self.max_queue_delay, chunk)
            )

    def _run_batch(self, batch: list[AppendJob], chunks: Chunking | None = None) -> None:
        try:
            self.appends.run(batch, chunks)
        except Exception as exc:  # a bug: answer INTERNAL, but never let the worker die
            log.exception("append batch failed")
            for pending in batch:
                pending.resolve(error=answer(exc))  # no-op for jobs already answered

    def _interleave(self, held: set[tuple[str, str]]) -> None:
        """Between two chunks of a long prefill: other sessions' queued decode steps."""
        taken = take_interleaved(
            self.worker.queue, held, max(self.max_batch_items, 1), self.prefill_chunk_tokens
        )
        if taken:
            self._run_batch(taken)
