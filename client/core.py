"""What Client and AsyncClient share: everything that is not I/O.

As in httpx and tritonclient, a base class holds the settings, the channel and the stubs,
builds each call and decodes its answer (``Unary``), and decides about retries; Client
(sync.py) and AsyncClient (aio.py) are shells that only run calls, blocking or awaited.
Every RPC runs inside ``errors.rpc_errors()``, the one point where grpc.RpcError becomes
Q8KVError. The same split holds for the handles (SessionCore) and the streams (StreamCore).
A packed batch is planned (checked, cut to the message limit) in batching.py.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

from . import messages as m
from .batching import BatchPart, BatchPlan
from .channel import (
    DEFAULT_KEEPALIVE_SECONDS,
    DEFAULT_MAX_MESSAGE_BYTES,
    TLSConfig,
    base_metadata,
    call_metadata,
    channel_options,
    checked_routing_key,
    route_of,
)
from .errors import Q8KVError, invalid_argument
from .stream_messages import StreamBook
from .types import AttendResult, BatchResult, SessionInfo

DEFAULT_TIMEOUT = 30.0
T = TypeVar("T")
Lengths = dict[tuple[str, int], int]


@dataclass(frozen=True, slots=True)
class Unary(Generic[T]):
    """One call as data: ``method(request, timeout=, metadata=, wait_for_ready=)`` on a
    stub, routed by ``session_id``; ``decode`` turns the answer into the return value.
    ``request`` is a message, or an iterator of them for a client-streaming method; for
    a server-streaming one the shell hands ``decode`` the list of messages."""

    method: Callable[..., Any]
    request: Any
    session_id: str | None
    decode: Callable[[Any], T]


# --- retries of conditional appends: the decisions; the shells sleep and resend ---------


class RetryStep(enum.Enum):
    RETRY = "retry"  # resend after m.retry_delay(attempt)
    CHECK = "check"  # look the lengths up: AlreadyApplied, or the ABORTED itself
    RAISE = "raise"  # the failure is the answer


def retry_step(attempt: int, retries: int, error: Q8KVError) -> RetryStep:
    """What follows the failure of attempt ``attempt`` (0: the first) of an append."""
    if attempt and error.code == grpc.StatusCode.ABORTED:  # after an ambiguous one
        return RetryStep.CHECK
    if error.code not in m.AMBIGUOUS or attempt == retries:
        return RetryStep.RAISE
    return RetryStep.RETRY


def retry_items(request: Any) -> Sequence[pb.AttendItem]:
    """What ``already_applied`` checks of a conditional call: its items, or for an
    AttendBatch one stand-in item per session (id, layer, expected_length, and a k that
    carries only its token count: no data)."""
    if not isinstance(request, pb.AttendBatchRequest):
        return request.items
    n = request.k.shape[1] if len(request.k.shape) > 1 else 0
    return [
        pb.AttendItem(
            session_id=sid, layer=request.layer, expected_length=e, k=pb.Tensor(shape=[n])
        )
        for sid, e in zip(request.session_ids, request.expected_lengths, strict=True)
    ]


def session_ids(items: Iterable[pb.AttendItem]) -> list[str]:
    """The distinct session ids of ``items``, in order: one GetSession each."""
    return list(dict.fromkeys(item.session_id for item in items))


def lengths_of(items: Iterable[pb.AttendItem], infos: dict[str, SessionInfo]) -> Lengths:
    """The current length of each (session id, layer) of ``items``, from their sessions."""
    return {
        (item.session_id, item.layer): m.length_of(infos[item.session_id], item.layer)
        for item in items
    }


def conditional_items(items: Iterable[m.BatchItem]) -> list[pb.AttendItem]:
    """The items of an ``applied()`` question; each needs an expected_length."""
    request_items = m.batch_items(items)
    m.require_conditional(request_items, "to tell whether they applied")
    return request_items


def outputs(results: list[AttendResult] | BatchResult, with_lengths: bool) -> Any:
    """What an attend returns: (output, length) pairs, or the outputs alone; for a batch
    message, its BatchResult or its output array."""
    if isinstance(results, BatchResult):
        return results if with_lengths else results.output
    return results if with_lengths else [r.output for r in results]


class ClientCore:
    """Settings, channel, stubs, and every call built and decoded. A subclass names its
    channel factory and handle type, and runs the calls (``_unary``: blocking or awaited).
    """

    _make_channel: Callable[[str, TLSConfig, list[tuple[str, Any]]], Any]
    _session_type: type[SessionCore]  # what create_session, import_session, session return

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        token: str | None = None,
        tls: TLSConfig = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive_seconds: float | None = DEFAULT_KEEPALIVE_SECONDS,
        wait_for_ready: bool = False,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.max_message_bytes = int(max_message_bytes)  # import_session splits chunks to it
        self._metadata = base_metadata(token)
        opts = channel_options(max_message_bytes, keepalive_seconds, options)
        self._channel = type(self)._make_channel(target, tls, opts)
        self._stub = kvcache_pb2_grpc.KVCacheServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _options(self, session_id: str | None) -> dict[str, Any]:
        """The keyword arguments of every call: deadline, metadata (routing), waiting."""
        return {
            "timeout": self.timeout,
            "metadata": call_metadata(self._metadata, session_id),
            "wait_for_ready": self.wait_for_ready,
        }

    def _handle(self, session_id: str, routing_key: str | None = None) -> Any:
        return self._session_type(self, session_id, routing_key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # --- the calls: built here, run by the shells -----------------------------------------
    # The stub's method is looked up when a call is built, so a replaced stub (tests) counts.

    def _create_call(self, routing_key: str | None, **geometry: Any) -> Unary[Any]:
        """Routed by ``routing_key`` when given (the handle keeps it), else by the id."""
        key = checked_routing_key(routing_key)
        request = m.create_request(**geometry)
        sid = request.session_id
        return Unary(
            self._stub.CreateSession,
            request,
            key or sid,
            lambda r: self._handle(r.session.session_id or sid, key),
        )

    def _info_call(self, session: Any, route: str | None = None) -> Unary[SessionInfo]:
        """A handle or an id (unchecked: the server answers a bad one); routed by
        ``route``, else the handle's key, else the id."""
        sid = session if isinstance(session, str) else m.session_id_of(session)
        request = pb.GetSessionRequest(session_id=sid)
        return Unary(
            self._stub.GetSession,
            request,
            route or route_of(session),
            lambda r: SessionInfo.from_proto(r.session),
        )

    def _list_call(self, page_size: int, page_token: str) -> Unary[tuple[list[SessionInfo], str]]:
        """One page of ListSessions -> (its sessions, the next page's token or '')."""
        request = pb.ListSessionsRequest(page_size=page_size, page_token=page_token)
        return Unary(
            self._stub.ListSessions,
            request,
            None,
            lambda r: ([SessionInfo.from_proto(s) for s in r.sessions], r.next_page_token),
        )

    def _delete_call(self, session: Any) -> Unary[int]:
        sid = m.session_id_of(session)
        request = pb.DeleteSessionRequest(session_id=sid)
        return Unary(
            self._stub.DeleteSession, request, route_of(session), lambda r: int(r.freed_bytes)
        )

    def _truncate_call(self, session: Any, length: int) -> Unary[SessionInfo]:
        sid = m.session_id_of(session)
        request = pb.TruncateSessionRequest(session_id=sid, length=m.as_int(length, "length"))
        return Unary(
            self._stub.TruncateSession,
            request,
            route_of(session),
            lambda r: SessionInfo.from_proto(r.session),
        )

    def _dequantize_call(
        self, session: Any, layer: int, start: int, end: int | None
    ) -> Unary[tuple[np.ndarray, np.ndarray]]:
        sid = m.session_id_of(session)
        request = m.dequantize_request(sid, layer, start, end)
        return Unary(self._stub.Dequantize, request, route_of(session), m.decode_dequantize)

    def _export_call(self, session: Any) -> Unary[list[pb.SessionChunk]]:
        """Server streaming: the shell collects the chunks into a list."""
        sid = m.session_id_of(session)
        request = pb.ExportSessionRequest(session_id=sid)
        return Unary(self._stub.ExportSession, request, route_of(session), lambda chunks: chunks)

    def _import_call(
        self, chunks: Iterable[pb.SessionChunk], max_message_bytes: int | None
    ) -> Unary[Any]:
        """Client streaming: every chunk checked, split to the limit, then sent in order."""
        sent, sid = m.import_chunks(chunks)
        sent = m.fit_chunks(sent, max_message_bytes or self.max_message_bytes)
        return Unary(
            self._stub.ImportSession,
            iter(sent),
            sid,
            lambda r: self._handle(m.imported_session_id(r)),
        )

    def _attend_call(
        self,
        items: Iterable[m.BatchItem],
        with_lengths: bool,
        retries: int,
        routing_key: str | None = None,
    ) -> Unary[list[Any]] | None:
        """The AppendAndAttend of a batch, routed by ``routing_key``, else by its first
        item; None for no items."""
        key = checked_routing_key(routing_key)
        request = pb.AppendAndAttendRequest()
        request_items = m.batch_items(items, request.items)
        m.check_retries(request_items, retries)
        if not request_items:
            return None

        def decode(response: pb.AppendAndAttendResponse) -> list[Any]:
            m.check_result_count(len(request_items), len(response.results))
            return outputs(m.decode_results(response.results), with_lengths)

        route = key or request_items[0].session_id
        return Unary(self._stub.AppendAndAttend, request, route, decode)

    def _batch_plan(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: Any,
        k: Any,
        v: Any,
        expected_lengths: Iterable[int] | None,
        retries: int = 0,
        routing_key: str | None = None,
    ) -> BatchPlan:
        """An attend_batch checked and cut to this client's max_message_bytes; every part
        routed by ``routing_key`` when given."""
        key = checked_routing_key(routing_key)
        plan = BatchPlan(layer, sessions, q, k, v, expected_lengths, self.max_message_bytes)
        plan.routing_key = key
        retries = m.as_int(retries, "retries")
        if retries < 0:
            raise invalid_argument(f"retries: expected >= 0, got {retries}")
        if retries and plan.expected is None:
            raise invalid_argument(
                f"expected_lengths: expected one per session with retries={retries} (a retry "
                "without them may append the tokens twice), got none"
            )
        return plan

    def _batch_call(self, plan: BatchPlan, part: BatchPart) -> Unary[BatchResult]:
        """One part's AttendBatch, routed by the plan's routing_key, else its first session."""
        request = plan.request(part)
        sid = request.session_ids[0] if request.session_ids else None
        route = plan.routing_key or sid
        return Unary(self._stub.AttendBatch, request, route, m.decode_batch_response)

    def _health_call(self, service: str) -> Unary[str]:
        request = health_pb2.HealthCheckRequest(service=service)
        return Unary(
            self._health.Check,
            request,
            None,
            lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
        )


class SessionCore:
    """What Session and AsyncSession share: the id, and equality and hashing by it; and
    the routing_key its calls are routed by (None: by the id)."""

    def __init__(self, client: Any, session_id: str, routing_key: str | None = None) -> None:
        self.client = client
        self.id = session_id
        self.routing_key = checked_routing_key(routing_key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        key = f", routing_key={self.routing_key!r}" if self.routing_key else ""
        return f"{type(self).__name__}({self.id!r}{key})"


class StreamCore:
    """What Stream and AsyncStream share: request ids, the checks before a message goes,
    and how the stream is opened (routed by ``session_id``, else the first item's)."""

    def __init__(self, client: ClientCore, session_id: str | None = None) -> None:
        self._client = client
        self._routing_id = session_id
        self._book = StreamBook()
        self._call: Any = None  # opened at the first send, so it can route by its items
        self._closed = False
        self._failure: Q8KVError | None = None  # why the stream broke, once it did

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise Q8KVError(grpc.StatusCode.CANCELLED, "stream: already closed")

    def _build(self, items: Iterable[m.BatchItem]) -> tuple[int, pb.AppendAndAttendStreamRequest]:
        self._check_open()
        return self._book.build(items)

    def _build_batch(
        self, batch: pb.AttendBatchRequest
    ) -> tuple[int, pb.AppendAndAttendStreamRequest]:
        self._check_open()
        return self._book.build_batch(batch)

    def _batch_plan(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: Any,
        k: Any,
        v: Any,
        expected_lengths: Iterable[int] | None,
    ) -> BatchPlan:
        """A batch message checked and cut to the client's max_message_bytes."""
        return BatchPlan(layer, sessions, q, k, v, expected_lengths, self._client.max_message_bytes)

    def _open_options(self, request: pb.AppendAndAttendStreamRequest) -> dict[str, Any]:
        """The stream's keyword arguments: no deadline (it lives as long as the decode
        loop), the routing header, waiting for the channel as the client does."""
        if request.HasField("batch"):
            first = request.batch.session_ids[:1]
        else:
            first = [item.session_id for item in request.items[:1]]
        sid = self._routing_id or next(iter(first), None)
        return {
            "metadata": call_metadata(self._client._metadata, sid),
            "wait_for_ready": self._client.wait_for_ready,
        }

    def _closing(self) -> bool:
        """Mark the stream closed; whether there is an open call left to end."""
        if self._closed:
            return False
        self._closed = True
        return self._call is not None

    @staticmethod
    def _ended(request_id: int | None = None) -> Q8KVError:
        """The server ended the stream (OK, no answer) while answers were still owed."""
        owed = "" if request_id is None else f" before request_id {request_id} was answered"
        return Q8KVError(grpc.StatusCode.UNAVAILABLE, f"stream: ended by the server{owed}")
