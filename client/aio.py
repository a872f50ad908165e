"""The asyncio client (grpc.aio): AsyncClient, AsyncSession, AsyncStream.

Mirrors sync.py method for method; only the I/O differs, the messages are built and
decoded by the same functions (messages.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .channel import (
    ClientCore,
    call_metadata,
    make_aio_channel,
)
from .errors import Q8KVError, from_rpc_error, invalid_argument
from .types import AttendResult, SessionInfo


class AsyncClient(ClientCore):
    """The asyncio twin of Client; create it inside a running event loop.

    ``async with AsyncClient("host:50051", timeout=10.0) as c: s = await c.create_session(...)``
    """

    make_channel = staticmethod(make_aio_channel)

    # The one place where RPCs run and grpc.RpcError becomes Q8KVError.
    async def _call(
        self, method: Callable[..., Any], request: Any, session_id: str | None = None
    ) -> Any:
        try:
            return await method(
                request,
                timeout=self.timeout,
                metadata=call_metadata(self._metadata, session_id),
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

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
        request = m.create_request(
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_len=max_len,
            session_id=session_id,
            ttl_seconds=ttl_seconds,
            softmax_scale=softmax_scale,
        )
        response = await self._call(self._stub.CreateSession, request, request.session_id)
        return AsyncSession(self, response.session.session_id or request.session_id)

    def session(self, session_id: str) -> AsyncSession:
        """A handle for an existing id, without a round trip (see get_session)."""
        return AsyncSession(self, m.session_id_of(session_id, "session_id"))

    async def get_session(self, session_id: str) -> AsyncSession:
        """A handle for an existing session; NOT_FOUND if there is none."""
        handle = self.session(session_id)
        await handle.info()
        return handle

    async def session_info(self, session_id: str) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=session_id)
        response = await self._call(self._stub.GetSession, request, session_id)
        return SessionInfo.from_proto(response.session)

    async def list_sessions(self, page_size: int = 0) -> list[SessionInfo]:
        """Every session the server shows this caller, following pages until the last."""
        sessions: list[SessionInfo] = []
        token = ""
        while True:
            request = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            response = await self._call(self._stub.ListSessions, request)
            sessions.extend(SessionInfo.from_proto(s) for s in response.sessions)
            token = response.next_page_token
            if not token:
                return sessions

    async def delete_session(self, session: Any) -> int:
        """Delete a session (handle or id); returns the bytes freed."""
        sid = m.session_id_of(session)
        request = pb.DeleteSessionRequest(session_id=sid)
        return int((await self._call(self._stub.DeleteSession, request, sid)).freed_bytes)

    async def truncate_session(self, session: Any, length: int) -> SessionInfo:
        sid = m.session_id_of(session)
        request = pb.TruncateSessionRequest(session_id=sid, length=m.as_int(length, "length"))
        response = await self._call(self._stub.TruncateSession, request, sid)
        return SessionInfo.from_proto(response.session)

    async def dequantize(
        self, session: Any, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        sid = m.session_id_of(session)
        request = m.dequantize_request(sid, layer, start, end)
        return m.decode_dequantize(await self._call(self._stub.Dequantize, request, sid))

    async def export_session(self, session: Any) -> list[pb.SessionChunk]:
        """As Client.export_session."""
        sid = m.session_id_of(session)
        request = pb.ExportSessionRequest(session_id=sid)
        call = self._stub.ExportSession(
            request,
            timeout=self.timeout,
            metadata=call_metadata(self._metadata, sid),
            wait_for_ready=self.wait_for_ready,
        )
        try:
            return [chunk async for chunk in call]
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    async def import_session(
        self, chunks: Iterable[pb.SessionChunk], max_message_bytes: int | None = None
    ) -> AsyncSession:
        """As Client.import_session."""
        sent, sid = m.import_chunks(chunks)
        sent = m.fit_chunks(sent, max_message_bytes or self.max_message_bytes)
        try:
            response = await self._stub.ImportSession(
                iter(sent),
                timeout=self.timeout,
                metadata=call_metadata(self._metadata, sid),
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return AsyncSession(self, m.imported_session_id(response))

    # --- attention ---------------------------------------------------------------------

    async def append_and_attend_batch(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False, retries: int = 0
    ) -> list[np.ndarray] | list[AttendResult]:
        """As Client.append_and_attend_batch (``retries`` and AlreadyApplied included)."""
        request_items = m.batch_items(items)
        m.check_retries(request_items, retries)
        if not request_items:
            return []
        request = pb.AppendAndAttendRequest(items=request_items)
        response = await self._append_retrying(request, retries)
        m.check_result_count(len(request_items), len(response.results))
        results = m.decode_results(response.results)
        return results if with_lengths else [r.output for r in results]

    async def _append_retrying(
        self, request: pb.AppendAndAttendRequest, retries: int
    ) -> pb.AppendAndAttendResponse:
        """Send, and resend after ambiguous failures (``retries`` times at most)."""
        attempt = 0
        while True:
            try:
                return await self._call(
                    self._stub.AppendAndAttend, request, request.items[0].session_id
                )
            except Q8KVError as exc:
                if attempt and exc.code == grpc.StatusCode.ABORTED:  # after an ambiguous one
                    lengths = await self._lengths(request.items)
                    raise m.already_applied(request.items, lengths, exc) from None
                if exc.code not in m.AMBIGUOUS or attempt == retries:
                    raise
            await asyncio.sleep(m.retry_delay(attempt))
            attempt += 1

    async def _lengths(self, items: Iterable[pb.AttendItem]) -> dict[tuple[str, int], int]:
        infos = {sid: await self.session_info(sid) for sid in {item.session_id for item in items}}
        return {
            (item.session_id, item.layer): m.length_of(infos[item.session_id], item.layer)
            for item in items
        }

    async def applied(self, items: Iterable[m.BatchItem]) -> bool:
        """As Client.applied."""
        request_items = m.batch_items(items)
        m.require_conditional(request_items, "to tell whether they applied")
        return await self._lengths(request_items) == m.applied_lengths(request_items)

    def stream(self, session_id: str | None = None) -> AsyncStream:
        """An AppendAndAttendStream; routed by ``session_id``, else by the first item sent."""
        return AsyncStream(self, session_id)

    # --- health and lifetime -----------------------------------------------------------

    async def health(self, service: str = "") -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(self._health.Check, request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncClient({self.target!r})"


class AsyncSession:
    """A handle on one session of an AsyncClient: cheap, holds only the id."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.id = session_id

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

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncSession) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r})"


class AsyncStream:
    """One AppendAndAttendStream for asyncio. Unlike the sync Stream, many tasks may share
    it: a reader task hands each response to the future of its request_id.

    ``await send(items)`` -> request id; ``await recv(request_id=None)`` (default: the
    oldest outstanding); ``await attend(items)`` does both. A failed message raises
    Q8KVError (with ``request_id``) for that message only. Resending after a broken
    stream: as for Stream (``expected_length`` items, ``await client.applied(items)``).
    """

    def __init__(self, client: AsyncClient, session_id: str | None = None) -> None:
        self._client = client
        self._routing_id = session_id
        self._next_id = 1
        self._futures: dict[int, asyncio.Future[pb.AppendAndAttendStreamResponse]] = {}
        self._call: Any = None  # opened at the first send, so it can route by its items
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()  # grpc.aio allows one write in flight
        self._closed = False
        self._failure: Q8KVError | None = None

    async def send(self, items: Iterable[m.BatchItem]) -> int:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise Q8KVError(grpc.StatusCode.CANCELLED, "stream: already closed")
        request = m.stream_request(self._next_id, items)
        if not request.items:
            raise invalid_argument("items: expected at least one item")
        request_id = self._next_id
        self._next_id += 1
        if self._call is None:
            metadata = call_metadata(
                self._client._metadata, self._routing_id or request.items[0].session_id
            )
            self._call = self._client._stub.AppendAndAttendStream(
                metadata=metadata, wait_for_ready=self._client.wait_for_ready
            )
            self._reader = asyncio.get_running_loop().create_task(self._read())
        self._futures[request_id] = asyncio.get_running_loop().create_future()
        try:
            async with self._write_lock:
                await self._call.write(request)
        except grpc.RpcError as exc:
            self._futures.pop(request_id, None)
            raise from_rpc_error(exc) from None
        except asyncio.InvalidStateError:  # the call already finished (server ended it)
            self._futures.pop(request_id, None)
            raise self._failure or Q8KVError(
                grpc.StatusCode.UNAVAILABLE, "stream: ended by the server"
            ) from None
        return request_id

    async def recv(
        self, request_id: int | None = None, with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        if request_id is None:
            if not self._futures:
                raise invalid_argument("recv: no request outstanding on this stream")
            request_id = next(iter(self._futures))
        future = self._futures.get(request_id)
        if future is None:
            raise invalid_argument(f"request_id: {request_id} is not outstanding")
        try:
            response = await future
        finally:
            self._futures.pop(request_id, None)
        results = m.stream_results(response)
        return results if with_lengths else [r.output for r in results]

    async def attend(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        """Send one message and wait for its answer."""
        return await self.recv(await self.send(items), with_lengths)

    async def _read(self) -> None:
        failure = Q8KVError(grpc.StatusCode.UNAVAILABLE, "stream: ended by the server")
        try:
            while (response := await self._call.read()) is not grpc.aio.EOF:
                future = self._futures.get(int(response.request_id))
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.RpcError as exc:
            failure = from_rpc_error(exc)
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
        if self._closed:
            return
        self._closed = True
        if self._call is None:
            return
        if any(not f.done() for f in self._futures.values()):
            self._call.cancel()
        else:
            try:
                async with self._write_lock:
                    await self._call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
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
