"""The asyncio AppendAndAttendStream helper: AsyncStream, opened by AsyncClient.stream().

Mirrors sync_stream.py; only the I/O differs: writes are awaited (one at a time), and a
reader task hands each response to the future of its request_id, so many tasks may share
one stream. StreamCore (core.py) checks and builds each message and opens the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .core import StreamCore, outputs
from .errors import Q8KVError, rpc_errors
from .stream_messages import stream_results
from .types import AttendResult, BatchResult

if TYPE_CHECKING:
    from .aio import AsyncClient


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
        return outputs(stream_results(response), with_lengths)

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
