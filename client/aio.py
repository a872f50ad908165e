"""The asyncio client (grpc.aio): AsyncClient and AsyncSession (AsyncStream: aio_stream.py).

Mirrors sync.py method for method; only the I/O differs (await instead of blocking): the
calls are built and decoded by ClientCore (core.py), and the retry decisions are its too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .aio_stream import AsyncStream
from .channel import checked_routing_key, make_aio_channel
from .core import (
    ClientCore,
    Lengths,
    RetryStep,
    SessionCore,
    Unary,
    conditional_items,
    lengths_of,
    retry_items,
    retry_step,
    session_ids,
)
from .errors import Q8KVError, rpc_errors
from .forks import fork_call
from .types import AttendResult, BatchResult, SessionInfo

T = TypeVar("T")


class AsyncSession(SessionCore):
    """A handle on one session of an AsyncClient: cheap, holds only the id."""

    client: AsyncClient

    async def append_and_attend(
        self,
        layer: int,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        with_length: bool = False,
        expected_length: int | None = None,
        retries: int = 0,
    ) -> np.ndarray | AttendResult:
        """As Session.append_and_attend (``expected_length`` and ``retries`` included)."""
        item = (self.id, layer, q, k, v, expected_length)
        (result,) = await self.client.append_and_attend_batch(
            [item], with_lengths=True, retries=retries, routing_key=self.routing_key
        )
        return result if with_length else result.output

    async def dequantize(
        self, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return await self.client.dequantize(self, layer, start, end)

    async def truncate(self, length: int) -> SessionInfo:
        return await self.client.truncate_session(self, length)

    async def info(self) -> SessionInfo:
        return await self.client.session_info(self)

    async def length(self, layer: int) -> int:
        return (await self.info()).layer_lengths[layer]

    async def fork(
        self,
        session_id: str | None = None,
        length: int | None = None,
        ttl_seconds: float | None = None,
    ) -> AsyncSession:
        """As AsyncClient.fork_session: a new session sharing this one's tokens."""
        return await self.client.fork_session(self, session_id, length, ttl_seconds)

    async def delete(self) -> int:
        return await self.client.delete_session(self)

    async def export(self) -> list[pb.SessionChunk]:
        return await self.client.export_session(self)


class AsyncClient(ClientCore):
    """The asyncio twin of Client; create it inside a running event loop.

    ``async with AsyncClient("host:50051", timeout=10.0) as c: s = await c.create_session(...)``
    """

    _make_channel = staticmethod(make_aio_channel)
    _session_type = AsyncSession

    # The I/O: a unary (or client-streaming) call, and a server-streaming one collected.
    async def _unary(self, call: Unary[T]) -> T:
        with rpc_errors():
            response = await call.method(call.request, **self._options(call.session_id))
        return call.decode(response)

    async def _collect(self, call: Unary[T]) -> T:
        with rpc_errors():
            stream = call.method(call.request, **self._options(call.session_id))
            messages = [message async for message in stream]
        return call.decode(messages)

    # --- sessions ----------------------------------------------------------------------

    async def create_session(
        self,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        session_id: str | None = None,
        ttl_seconds: float | None = None,
        softmax_scale: float | None = None,
        *,
        routing_key: str | None = None,
    ) -> AsyncSession:
        """As Client.create_session (``routing_key`` included)."""
        return await self._unary(
            self._create_call(
                routing_key,
                num_layers=num_layers,
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                max_len=max_len,
                session_id=session_id,
                ttl_seconds=ttl_seconds,
                softmax_scale=softmax_scale,
            )
        )

    def session(self, session_id: str, *, routing_key: str | None = None) -> AsyncSession:
        """A handle for an existing id, without a round trip (see get_session); its calls
        are routed by ``routing_key`` (the one it was created under), else by the id."""
        return AsyncSession(self, m.session_id_of(session_id, "session_id"), routing_key)

    async def get_session(self, session_id: str, *, routing_key: str | None = None) -> AsyncSession:
        """A handle for an existing session; NOT_FOUND if there is none."""
        handle = self.session(session_id, routing_key=routing_key)
        await handle.info()
        return handle

    async def session_info(self, session_id: Any) -> SessionInfo:
        return await self._unary(self._info_call(session_id))

    async def list_sessions(self, page_size: int = 0) -> list[SessionInfo]:
        """Every session the server shows this caller, following pages until the last."""
        sessions, token = await self._unary(self._list_call(page_size, ""))
        while token:
            page, token = await self._unary(self._list_call(page_size, token))
            sessions.extend(page)
        return sessions

    async def delete_session(self, session: Any) -> int:
        """Delete a session (handle or id); returns the bytes freed."""
        return await self._unary(self._delete_call(session))

    async def truncate_session(self, session: Any, length: int) -> SessionInfo:
        return await self._unary(self._truncate_call(session, length))

    async def fork_session(
        self,
        source: Any,
        session_id: str | None = None,
        length: int | None = None,
        ttl_seconds: float | None = None,
    ) -> AsyncSession:
        """As Client.fork_session."""
        return await self._unary(fork_call(self, source, session_id, length, ttl_seconds))

    async def dequantize(
        self, session: Any, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return await self._unary(self._dequantize_call(session, layer, start, end))

    async def export_session(self, session: Any) -> list[pb.SessionChunk]:
        """As Client.export_session."""
        return await self._collect(self._export_call(session))

    async def import_session(
        self, chunks: Iterable[pb.SessionChunk], max_message_bytes: int | None = None
    ) -> AsyncSession:
        """As Client.import_session."""
        return await self._unary(self._import_call(chunks, max_message_bytes))

    # --- attention ---------------------------------------------------------------------

    async def append_and_attend_batch(
        self,
        items: Iterable[m.BatchItem],
        with_lengths: bool = False,
        retries: int = 0,
        *,
        routing_key: str | None = None,
    ) -> list[np.ndarray] | list[AttendResult]:
        """As Client.append_and_attend_batch (``retries`` and AlreadyApplied included)."""
        call = self._attend_call(items, with_lengths, retries, routing_key)
        return [] if call is None else await self._append_retrying(call, retries)

    async def _append_retrying(self, call: Unary[T], retries: int) -> T:
        """Send, and resend after ambiguous failures (core.retry_step decides)."""
        attempt = 0
        while True:
            try:
                return await self._unary(call)
            except Q8KVError as exc:
                step = retry_step(attempt, retries, exc)
                if step is RetryStep.RAISE:
                    raise
                if step is RetryStep.CHECK:
                    items = retry_items(call.request)
                    lengths = await self._lengths(items, call.session_id)  # where it went
                    raise m.already_applied(items, lengths, exc) from None
            await asyncio.sleep(m.retry_delay(attempt))
            attempt += 1

    async def attend_batch(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        expected_lengths: Iterable[int] | None = None,
        with_lengths: bool = False,
        retries: int = 0,
        *,
        routing_key: str | None = None,
    ) -> np.ndarray | BatchResult:
        """As Client.attend_batch (splitting to max_message_bytes included). Several may
        be in flight at once (micro-batches of distinct sessions)."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths, retries, routing_key)
        for part in plan.parts:
            try:
                call = self._batch_call(plan, part)
                plan.put(part, await self._append_retrying(call, retries))
            except Q8KVError as exc:
                raise plan.failed(part, exc) from None
        return plan.result(with_lengths)

    async def _lengths(self, items: Sequence[pb.AttendItem], route: str | None = None) -> Lengths:
        infos = {sid: await self._unary(self._info_call(sid, route)) for sid in session_ids(items)}
        return lengths_of(items, infos)

    async def applied(
        self, items: Iterable[m.BatchItem], *, routing_key: str | None = None
    ) -> bool:
        """As Client.applied."""
        request_items = conditional_items(items)
        lengths = await self._lengths(request_items, checked_routing_key(routing_key))
        return lengths == m.applied_lengths(request_items)

    def stream(self, session_id: str | None = None) -> AsyncStream:
        """An AppendAndAttendStream; routed by ``session_id``, else by the first item sent."""
        return AsyncStream(self, session_id)

    # --- health and lifetime -----------------------------------------------------------

    async def health(self, service: str = "") -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        return await self._unary(self._health_call(service))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
