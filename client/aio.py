"""The asyncio client (grpc.aio): AsyncClient, AsyncSession, AsyncStream.

Mirrors sync.py method for method; only the I/O differs (await instead of blocking): the
calls are built and decoded by ClientCore (core.py), and the retry decisions are its too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import grpc
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .channel import make_aio_channel
from .core import (
    ClientCore,
    Lengths,
    RetryStep,
    SessionCore,
    StreamCore,
    Unary,
    conditional_items,
    lengths_of,
    outputs,
    retry_items,
    retry_step,
    session_ids,
)
from .errors import Q8KVError, rpc_errors
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
            [item], with_lengths=True, retries=retries
        )
        return result if with_length else result.output

    async def dequantize(
        self, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return await self.client.dequantize(self.id, layer, start, end)

    async def truncate(self, length: int) -> SessionInfo:
        return await self.client.truncate_session(self.id, length)

    async def info(self) -> SessionInfo:
        return await self.client.session_info(self.id)

    async def length(self, layer: int) -> int:
        return (await self.info()).layer_lengths[layer]

    async def delete(self) -> int:
        return await self.client.delete_session(self.id)

    async def export(self) -> list[pb.SessionChunk]:
        return await self.client.export_session(self.id)


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
    ) -> AsyncSession:
        """Create a session; without ``session_id`` the client makes a UUID4."""
        return await self._unary(
            self._create_call(
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

    def session(self, session_id: str) -> AsyncSession:
        """A handle for an existing id, without a round trip (see get_session)."""
        return AsyncSession(self, m.session_id_of(session_id, "session_id"))

    async def get_session(self, session_id: str) -> AsyncSession:
        """A handle for an existing session; NOT_FOUND if there is none."""
        handle = self.session(session_id)
        await handle.info()
        return handle

    async def session_info(self, session_id: str) -> SessionInfo:
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
        self, items: Iterable[m.BatchItem], with_lengths: bool = False, retries: int = 0
    ) -> list[np.ndarray] | list[AttendResult]:
        """As Client.append_and_attend_batch (``retries`` and AlreadyApplied included)."""
        call = self._attend_call(items, with_lengths, retries)
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
                    raise m.already_applied(items, await self._lengths(items), exc) from None
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
    ) -> np.ndarray | BatchResult:
        """As Client.attend_batch (splitting to max_message_bytes included). Several may
        be in flight at once (micro-batches of distinct sessions)."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths, retries)
        for part in plan.parts:
            try:
                call = self._batch_call(plan, part)
                plan.put(part, await self._append_retrying(call, retries))
            except Q8KVError as exc:
                raise plan.failed(part, exc) from None
        return plan.result(with_lengths)

    async def _lengths(self, items: Sequence[pb.AttendItem]) -> Lengths:
        infos = {sid: await self.session_info(sid) for sid in session_ids(items)}
        return lengths_of(items, infos)

    async def applied(self, items: Iterable[m.BatchItem]) -> bool:
        """As Client.applied."""
        request_items = conditional_items(items)
        return await self._lengths(request_items) == m.applied_lengths(request_items)

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


class AsyncStream(StreamCore):
    """One AppendAndAttendStream for asyncio. Unlike the sync Stream, many tasks may share
    it: a reader task hands each response to the future of its request_id.

    ``await send(items)`` -> request id; ``await recv(request_id=None)`` (default: the
    oldest outstanding); ``await attend(items)`` does both; ``send_batch`` and
    ``attend_batch`` as on Stream (micro-batches from several tasks may share the stream).
    A failed message raises Q8KVError (with ``request_id``) for that message only.
    Resending after a broken stream: as for Stream (``expected_length`` items,
    ``await client.applied(items)``).
    """

    def __init__(self, client: AsyncClient, session_id: str | None = None) -> None:
        super().__init__(client, session_id)
        self._futures: dict[int, asyncio.Future[pb.AppendAndAttendStreamResponse]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight

    async def send(self, items: Iterable[m.BatchItem]) -> int:
        return await self._send(*self._build(items))

    async def send_batch(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        expected_lengths: Iterable[int] | None = None,
    ) -> int:
        """As Stream.send_batch."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths)
        return await self._send(*self._build_batch(plan.one_message()))

    async def attend_batch(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        expected_lengths: Iterable[int] | None = None,
        with_lengths: bool = False,
    ) -> np.ndarray | BatchResult:
        """As Stream.attend_batch."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths)
        for part in plan.parts:
            try:
                request_id = await self._send(*self._build_batch(plan.request(part)))
                plan.put(part, await self.recv(request_id, with_lengths=True))
            except Q8KVError as exc:
                raise plan.failed(part, exc) from None
        return plan.result(with_lengths)

    async def _send(self, request_id: int, request: pb.AppendAndAttendStreamRequest) -> int:
        loop = asyncio.get_running_loop()
        if self._call is None:
            self._call = self._client._stub.AppendAndAttendStream(**self._open_options(request))
            self._reader = loop.create_task(self._read())
        self._futures[request_id] = loop.create_future()
        self._book.sent(request_id)
        try:
            async with self._write_lock:
                with rpc_errors():
                    await self._call.write(request)
        except Q8KVError:
            self._forget(request_id)
            raise
        except asyncio.InvalidStateError:  # the call already finished (server ended it)
            self._forget(request_id)
            raise self._failure or self._ended() from None
        return request_id

    async def recv(
        self, request_id: int | None = None, with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult] | np.ndarray | BatchResult:
        """As Stream.recv."""
        wanted = self._book.wanted(request_id)
        try:
            response = await self._futures[wanted]
        finally:
            self._forget(wanted)
        return outputs(m.stream_results(response), with_lengths)

    def _forget(self, request_id: int) -> None:
        self._futures.pop(request_id, None)
        self._book.forget(request_id)

    async def attend(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        """Send one message and wait for its answer."""
        return await self.recv(await self.send(items), with_lengths)

    async def _read(self) -> None:
        """The reader task: each response to its future; at the end, the reason to all
        still waiting (and to later sends, unless the stream was closed here)."""
        failure = self._ended()
        try:
            with rpc_errors():
                while (response := await self._call.read()) is not grpc.aio.EOF:
                    future = self._futures.get(int(response.request_id))
                    if future is not None and not future.done():
                        future.set_result(response)
        except Q8KVError as exc:
            failure = exc
        except asyncio.CancelledError:
            failure = Q8KVError(grpc.StatusCode.CANCELLED, "stream: closed")
        if not self._closed:
            self._failure = failure
        for future in self._futures.values():
            if not future.done():
                future.set_exception(failure)

    async def close(self) -> None:
        """Half-close and let the server end the stream; cancel if answers are still
        outstanding (nobody would read them)."""
        if not self._closing():
            return
        if any(not f.done() for f in self._futures.values()):
            self._call.cancel()
        else:
            try:
                async with self._write_lock:
                    with rpc_errors():
                        await self._call.done_writing()
            except (Q8KVError, asyncio.InvalidStateError):
                self._call.cancel()
        if self._reader is not None:
            await self._reader  # it ends itself: EOF, or the cancel above
        for future in self._futures.values():
            if future.done() and not future.cancelled():
                future.exception()  # mark retrieved: no "never retrieved" warnings

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
