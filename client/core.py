"""What Client and AsyncClient share: everything that is not I/O.

As in httpx and tritonclient, a base class holds the settings, the channel and the stubs,
builds each call and decodes its answer (``Unary``), and decides about retries; Client
(sync.py) and AsyncClient (aio.py) are shells that only run calls, blocking or awaited.
Every RPC runs inside ``errors.rpc_errors()``, the one point where grpc.RpcError becomes
Q8KVError. The same split holds for the handles (SessionCore) and the streams (StreamCore).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc
from q8kv.wire import TensorError, wire_dtype

from . import messages as m
from .channel import (
    DEFAULT_KEEPALIVE_SECONDS,
    DEFAULT_MAX_MESSAGE_BYTES,
    TLSConfig,
    base_metadata,
    call_metadata,
    channel_options,
)
from .errors import AlreadyApplied, Q8KVError, invalid_argument
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


# --- packed batches (AttendBatch): checked, and cut into calls that fit the limit -------

# Per session of a call, besides its tokens: the id's tag and length, a packed varint of
# expected_lengths, and in the answer a varint of lengths (the id's own bytes are added).
ROW_OVERHEAD_BYTES = 16
# An error of a part names indices of that part; these prefixes are the caller's rows.
_ROW_FIELD = re.compile(r"^(batch|session_ids|expected_lengths)\[(\d+)\]")


@dataclass(frozen=True, slots=True)
class BatchPart:
    """One call of a batch: sessions ``rows`` x tokens ``tokens`` of the caller's arrays."""

    index: int
    rows: slice
    tokens: slice


class BatchPlan:
    """A packed batch (one layer, B sessions, n new tokens each), checked before anything
    is sent and cut into ``parts`` that each fit ``max_message_bytes`` (request and answer,
    with a margin for the envelope): one part when it fits; else groups of sessions; else,
    when one session's row alone is too large (a long prefill), chunks of the tokens too,
    the chunks of each session in order (causal attention: chunked appends give the same
    outputs). Parts are sent one after another; ``put`` places each answer, ``result``
    gives the whole. Pure: the shells run the calls."""

    def __init__(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: Any,
        k: Any,
        v: Any,
        expected_lengths: Iterable[int] | None,
        max_message_bytes: int,
    ) -> None:
        if isinstance(sessions, str | bytes) or not isinstance(sessions, Iterable):
            raise invalid_argument(
                f"sessions: expected a sequence of session handles or ids, got "
                f"{type(sessions).__name__}"
            )
        self.ids = [m.session_id_of(s, f"sessions[{b}]") for b, s in enumerate(sessions)]
        self.layer = m.as_int(layer, "layer")
        self.q, self.k, self.v = (np.asarray(a) for a in (q, k, v))
        _check_batch_shapes(self.ids, self.q, self.k, self.v)
        _check_distinct(self.ids)
        self.expected = _expected_lengths(expected_lengths, len(self.ids))
        self.limit = int(max_message_bytes)
        # q, k and v bytes of one token of one session (the output's are q's: fewer), and
        # a session's bytes besides its tokens (the longest id and the framing).
        self.token_bytes = sum(
            a.itemsize * a.shape[2] * a.shape[3] for a in (self.q, self.k, self.v)
        )
        longest_id = max((len(sid.encode()) for sid in self.ids), default=0)
        self.row_overhead = longest_id + ROW_OVERHEAD_BYTES
        self.parts = self._cut()
        self._whole: BatchResult | None = None  # the answer of a call that was not split
        self._output: np.ndarray | None = None
        self._lengths = [0] * len(self.ids)

    def message_bytes(self, rows: int, tokens: int) -> int:
        """An upper bound of the request of a call of ``rows`` sessions of ``tokens`` tokens
        each, envelope included (its answer is smaller: the output has q's bytes)."""
        return rows * (tokens * self.token_bytes + self.row_overhead) + m.ENVELOPE_BYTES

    def _cut(self) -> list[BatchPart]:
        sessions, n = self.q.shape[:2]
        if sessions == 0 or n == 0 or self.message_bytes(sessions, n) <= self.limit:
            return [BatchPart(0, slice(0, sessions), slice(0, n))]  # the server judges it
        if self.message_bytes(1, 1) > self.limit:
            raise Q8KVError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"max_message_bytes: expected at least {self.message_bytes(1, 1)} bytes (one "
                f"token of one session: {self.token_bytes} bytes of q, k and v, and the "
                f"message's envelope), got {self.limit}; this call needs "
                f"{self.message_bytes(sessions, n)} bytes unsplit: raise the client's "
                "max_message_bytes (and the server's --max-message-bytes)",
            )
        room = self.limit - m.ENVELOPE_BYTES  # for the rows
        tokens = min(n, (room - self.row_overhead) // max(1, self.token_bytes))
        tokens = math.ceil(n / math.ceil(n / tokens))  # even chunks, none larger
        rows = min(sessions, room // (tokens * self.token_bytes + self.row_overhead))
        rows = math.ceil(sessions / math.ceil(sessions / rows))  # even groups
        spans = [(t0, r0) for t0 in range(0, n, tokens) for r0 in range(0, sessions, rows)]
        return [
            BatchPart(i, slice(r0, min(sessions, r0 + rows)), slice(t0, min(n, t0 + tokens)))
            for i, (t0, r0) in enumerate(spans)
        ]

    def request(self, part: BatchPart) -> pb.AttendBatchRequest:
        """The AttendBatch message of ``part``, built when it is sent (a split prefill is
        never encoded all at once). A part's expected_lengths are the caller's plus the
        tokens the earlier chunks of the same sessions appended."""
        r, t = part.rows, part.tokens
        expected = None if self.expected is None else [e + t.start for e in self.expected[r]]
        return m.batch_request(
            self.ids[r], self.layer, self.q[r, t], self.k[r, t], self.v[r, t], expected
        )

    def put(self, part: BatchPart, result: Any) -> None:
        """Check a part's answer and place it."""
        r, t = part.rows, part.tokens
        rows, tokens = r.stop - r.start, t.stop - t.start
        if not isinstance(result, BatchResult):
            raise Q8KVError(
                grpc.StatusCode.INTERNAL,
                f"batch: expected the answer of a batch, got {type(result).__name__}",
            )
        want = [rows, tokens, *self.q.shape[2:]]
        if list(result.output.shape) != want or len(result.lengths) != rows:
            raise Q8KVError(
                grpc.StatusCode.INTERNAL,
                f"output.shape, lengths: expected {want} and {rows} lengths (one per "
                f"session), got {list(result.output.shape)} and {len(result.lengths)}",
            )
        if len(self.parts) == 1:
            self._whole = result
            return
        if self._output is None:
            self._output = np.empty(self.q.shape, result.output.dtype)
        self._output[r, t] = result.output
        self._lengths[r] = result.lengths  # a later chunk of the same sessions overwrites

    def result(self, with_lengths: bool) -> np.ndarray | BatchResult:
        whole = self._whole
        if whole is None:
            whole = BatchResult(self._output, self._lengths)
        return whole if with_lengths else whole.output

    def failed(self, part: BatchPart, error: Q8KVError) -> Q8KVError:
        """``error`` of ``part``, saying for a split call which part failed, with its rows'
        indices those of the caller's batch, and what had applied."""
        if len(self.parts) == 1:
            return error
        r, t, i = part.rows, part.tokens, part.index
        applied = "nothing applied" if i == 0 else f"parts 1-{i} applied"
        message = _ROW_FIELD.sub(
            lambda match: f"{match[1]}[{int(match[2]) + r.start}]", error.message
        )
        message = (
            f"attend_batch: part {i + 1} of {len(self.parts)} (sessions[{r.start}:{r.stop}], "
            f"tokens[{t.start}:{t.stop}]) of a call split to fit max_message_bytes "
            f"{self.limit} failed ({applied}, later parts not sent): {message}"
        )
        if isinstance(error, AlreadyApplied):
            return AlreadyApplied(message, error.lengths)
        return Q8KVError(error.code, message, error.request_id)

    def one_message(self) -> pb.AttendBatchRequest:
        """The whole batch as one message, or RESOURCE_EXHAUSTED naming the limit."""
        if len(self.parts) > 1:
            sessions, n = self.q.shape[:2]
            raise Q8KVError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"batch: expected at most max_message_bytes {self.limit} bytes in one "
                f"message, got {self.message_bytes(sessions, n)}; attend_batch splits it "
                f"into {len(self.parts)} messages",
            )
        return self.request(self.parts[0])


def _check_batch_shapes(ids: list[str], q: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    """q [B, n, H, D], k and v [B, n, KVH, D], B = len(ids), in dtypes the wire carries:
    what cutting the batch needs (the server checks the rest against each session)."""
    for name, array in (("q", q), ("k", k), ("v", v)):
        try:
            wire_dtype(array.dtype)
        except TensorError as exc:
            raise invalid_argument(f"{name}.{exc}") from None
        if array.ndim != 4:
            raise invalid_argument(
                f"{name}.shape: expected 4 dimensions [B, n, heads, head_dim], got "
                f"{list(array.shape)}"
            )
    b, n, _, d = q.shape
    for name, array in (("k", k), ("v", v)):
        if array.shape[:2] != (b, n) or array.shape[3] != d or array.shape != k.shape:
            raise invalid_argument(
                f"{name}.shape: expected [{b}, {n}, num_kv_heads, {d}] (from q.shape and "
                f"k.shape), got {list(array.shape)}"
            )
    if b != len(ids):
        raise invalid_argument(
            f"q.shape[0]: expected {len(ids)} (one row per session), got {b}"
        )


def _check_distinct(ids: list[str]) -> None:
    """Each session once: a split call's parts could not tell a repeat (the server can)."""
    if len(set(ids)) == len(ids):
        return
    seen: dict[str, int] = {}
    for b, sid in enumerate(ids):
        if sid in seen:
            raise invalid_argument(
                f"sessions[{b}]: expected each session once, got {sid!r} again "
                f"(first at sessions[{seen[sid]}])"
            )
        seen[sid] = b


def _expected_lengths(expected: Iterable[int] | None, count: int) -> list[int] | None:
    if expected is None:
        return None
    values = [m.as_int(e, f"expected_lengths[{b}]") for b, e in enumerate(expected)]
    if len(values) != count:
        raise invalid_argument(
            f"expected_lengths: expected none or {count} (one per session), got {len(values)}"
        )
    return values


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

    def _handle(self, session_id: str) -> Any:
        return self._session_type(self, session_id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # --- the calls: built here, run by the shells -----------------------------------------
    # The stub's method is looked up when a call is built, so a replaced stub (tests) counts.

    def _create_call(self, **geometry_and_options: Any) -> Unary[Any]:
        request = m.create_request(**geometry_and_options)
        sid = request.session_id
        return Unary(
            self._stub.CreateSession,
            request,
            sid,
            lambda r: self._handle(r.session.session_id or sid),
        )

    def _info_call(self, session_id: str) -> Unary[SessionInfo]:
        request = pb.GetSessionRequest(session_id=session_id)
        return Unary(
            self._stub.GetSession, request, session_id, lambda r: SessionInfo.from_proto(r.session)
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
        return Unary(self._stub.DeleteSession, request, sid, lambda r: int(r.freed_bytes))

    def _truncate_call(self, session: Any, length: int) -> Unary[SessionInfo]:
        sid = m.session_id_of(session)
        request = pb.TruncateSessionRequest(session_id=sid, length=m.as_int(length, "length"))
        return Unary(
            self._stub.TruncateSession, request, sid, lambda r: SessionInfo.from_proto(r.session)
        )

    def _dequantize_call(
        self, session: Any, layer: int, start: int, end: int | None
    ) -> Unary[tuple[np.ndarray, np.ndarray]]:
        sid = m.session_id_of(session)
        request = m.dequantize_request(sid, layer, start, end)
        return Unary(self._stub.Dequantize, request, sid, m.decode_dequantize)

    def _export_call(self, session: Any) -> Unary[list[pb.SessionChunk]]:
        """Server streaming: the shell collects the chunks into a list."""
        sid = m.session_id_of(session)
        request = pb.ExportSessionRequest(session_id=sid)
        return Unary(self._stub.ExportSession, request, sid, lambda chunks: chunks)

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
        self, items: Iterable[m.BatchItem], with_lengths: bool, retries: int
    ) -> Unary[list[Any]] | None:
        """The AppendAndAttend of a batch, routed by its first item; None for no items."""
        request_items = m.batch_items(items)
        m.check_retries(request_items, retries)
        if not request_items:
            return None
        request = pb.AppendAndAttendRequest(items=request_items)

        def decode(response: pb.AppendAndAttendResponse) -> list[Any]:
            m.check_result_count(len(request_items), len(response.results))
            return outputs(m.decode_results(response.results), with_lengths)

        return Unary(self._stub.AppendAndAttend, request, request_items[0].session_id, decode)

    def _batch_plan(
        self,
        layer: int,
        sessions: Iterable[Any],
        q: Any,
        k: Any,
        v: Any,
        expected_lengths: Iterable[int] | None,
        retries: int = 0,
    ) -> BatchPlan:
        """An attend_batch checked and cut to this client's max_message_bytes."""
        plan = BatchPlan(layer, sessions, q, k, v, expected_lengths, self.max_message_bytes)
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
        """One part's AttendBatch, routed by its first session."""
        request = plan.request(part)
        sid = request.session_ids[0] if request.session_ids else None
        return Unary(self._stub.AttendBatch, request, sid, m.decode_batch_response)

    def _health_call(self, service: str) -> Unary[str]:
        request = health_pb2.HealthCheckRequest(service=service)
        return Unary(
            self._health.Check,
            request,
            None,
            lambda r: health_pb2.HealthCheckResponse.ServingStatus.Name(r.status),
        )


class SessionCore:
    """What Session and AsyncSession share: the id, and equality and hashing by it."""

    def __init__(self, client: Any, session_id: str) -> None:
        self.client = client
        self.id = session_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, type(self)) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


class StreamCore:
    """What Stream and AsyncStream share: request ids, the checks before a message goes,
    and how the stream is opened (routed by ``session_id``, else the first item's)."""

    def __init__(self, client: ClientCore, session_id: str | None = None) -> None:
        self._client = client
        self._routing_id = session_id
        self._book = m.StreamBook()
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
        return BatchPlan(
            layer, sessions, q, k, v, expected_lengths, self._client.max_message_bytes
        )

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
