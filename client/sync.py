"""The blocking client: Client, its Session handles and the AppendAndAttendStream helper."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .channel import (
    ClientCore,
    call_metadata,
    make_sync_channel,
)
from .errors import Q8KVError, from_rpc_error, invalid_argument
from .types import AttendResult, SessionInfo


class Client(ClientCore):
    """A connection to one q8kv server (or a router in front of several).

    ``timeout`` is the deadline of each call in seconds (None: none). ``token`` is sent as
    ``authorization: Bearer <token>``. ``tls``: None/False plaintext, True system roots, a
    CA bundle path, or ``(ca, client_cert, client_key)`` paths for mutual TLS.
    Thread-safe: one Client may serve many threads (a Stream may not).
    """

    make_channel = staticmethod(make_sync_channel)

    # The one place where RPCs run and grpc.RpcError becomes Q8KVError.
    def _call(self, method: Callable[..., Any], request: Any, session_id: str | None = None):
        try:
            return method(
                request,
                timeout=self.timeout,
                metadata=call_metadata(self._metadata, session_id),
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # --- sessions ----------------------------------------------------------------------

    def create_session(
        self,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        session_id: str | None = None,
        ttl_seconds: float | None = None,
        softmax_scale: float | None = None,
    ) -> Session:
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
        response = self._call(self._stub.CreateSession, request, request.session_id)
        return Session(self, response.session.session_id or request.session_id)

    def session(self, session_id: str) -> Session:
        """A handle for an existing id, without a round trip (see get_session)."""
        return Session(self, m.session_id_of(session_id, "session_id"))

    def get_session(self, session_id: str) -> Session:
        """A handle for an existing session; NOT_FOUND if there is none."""
        handle = self.session(session_id)
        handle.info()
        return handle

    def session_info(self, session_id: str) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=session_id)
        response = self._call(self._stub.GetSession, request, session_id)
        return SessionInfo.from_proto(response.session)

    def list_sessions(self, page_size: int = 0) -> list[SessionInfo]:
        """Every session the server shows this caller, following pages until the last."""
        sessions: list[SessionInfo] = []
        token = ""
        while True:
            request = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            response = self._call(self._stub.ListSessions, request)
            sessions.extend(SessionInfo.from_proto(s) for s in response.sessions)
            token = response.next_page_token
            if not token:
                return sessions

    def delete_session(self, session: Any) -> int:
        """Delete a session (handle or id); returns the bytes freed."""
        sid = m.session_id_of(session)
        request = pb.DeleteSessionRequest(session_id=sid)
        return int(self._call(self._stub.DeleteSession, request, sid).freed_bytes)

    def truncate_session(self, session: Any, length: int) -> SessionInfo:
        sid = m.session_id_of(session)
        request = pb.TruncateSessionRequest(session_id=sid, length=m.as_int(length, "length"))
        return SessionInfo.from_proto(self._call(self._stub.TruncateSession, request, sid).session)

    def dequantize(
        self, session: Any, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        sid = m.session_id_of(session)
        request = m.dequantize_request(sid, layer, start, end)
        return m.decode_dequantize(self._call(self._stub.Dequantize, request, sid))

    def export_session(self, session: Any) -> list[pb.SessionChunk]:
        """A session's Q8 cache as chunks (header, tokens per layer, checksum trailer), for
        ``import_session`` on another server. The session stays here."""
        sid = m.session_id_of(session)
        request = pb.ExportSessionRequest(session_id=sid)
        try:
            return list(
                self._stub.ExportSession(
                    request,
                    timeout=self.timeout,
                    metadata=call_metadata(self._metadata, sid),
                    wait_for_ready=self.wait_for_ready,
                )
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def import_session(
        self, chunks: Iterable[pb.SessionChunk], max_message_bytes: int | None = None
    ) -> Session:
        """Recreate an exported session here, owned by this caller's tenant; nothing is
        created unless every chunk arrived and the checksum matches. Token chunks larger
        than ``max_message_bytes`` (default: this client's limit; pass the server's
        --max-message-bytes when it is smaller) are split first, their checksum checked
        and recomputed."""
        sent, sid = m.import_chunks(chunks)
        sent = m.fit_chunks(sent, max_message_bytes or self.max_message_bytes)
        try:
            response = self._stub.ImportSession(
                iter(sent),
                timeout=self.timeout,
                metadata=call_metadata(self._metadata, sid),
                wait_for_ready=self.wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return Session(self, m.imported_session_id(response))

    # --- attention ---------------------------------------------------------------------

    def append_and_attend_batch(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False, retries: int = 0
    ) -> list[np.ndarray] | list[AttendResult]:
        """One call for many (session, layer) items, all or none. Items: ``(session handle
        or id, layer, q, k, v)``, or AppendItem / the same with ``expected_length`` last (a
        conditional append: ABORTED, nothing applied, if the layer's length differs).
        Returns the outputs in order, or (output, new length) pairs with
        ``with_lengths=True``. The call routes by the first item's session.

        ``retries``: how often to resend after an ambiguous failure (UNAVAILABLE,
        DEADLINE_EXCEEDED, CANCELLED: the call may have applied), with a short backoff.
        Needs every item conditional (INVALID_ARGUMENT otherwise): a resend then appends
        at most once. If a resend answers ABORTED and every layer is at expected_length + n
        (an earlier attempt applied), AlreadyApplied is raised: the tokens are cached but
        their outputs are lost. Any other ABORTED is raised as it is."""
        request_items = m.batch_items(items)
        m.check_retries(request_items, retries)
        if not request_items:
            return []
        request = pb.AppendAndAttendRequest(items=request_items)
        response = self._append_retrying(request, retries)
        m.check_result_count(len(request_items), len(response.results))
        results = m.decode_results(response.results)
        return results if with_lengths else [r.output for r in results]

    def _append_retrying(
        self, request: pb.AppendAndAttendRequest, retries: int
    ) -> pb.AppendAndAttendResponse:
        """Send, and resend after ambiguous failures (``retries`` times at most)."""
        attempt = 0
        while True:
            try:
                return self._call(self._stub.AppendAndAttend, request, request.items[0].session_id)
            except Q8KVError as exc:
                if attempt and exc.code == grpc.StatusCode.ABORTED:  # after an ambiguous one
                    lengths = self._lengths(request.items)
                    raise m.already_applied(request.items, lengths, exc) from None
                if exc.code not in m.AMBIGUOUS or attempt == retries:
                    raise
            time.sleep(m.retry_delay(attempt))
            attempt += 1

    def _lengths(self, items: Iterable[pb.AttendItem]) -> dict[tuple[str, int], int]:
        """The current length of each (session id, layer) of ``items``."""
        infos = {sid: self.session_info(sid) for sid in {item.session_id for item in items}}
        return {
            (item.session_id, item.layer): m.length_of(infos[item.session_id], item.layer)
            for item in items
        }

    def applied(self, items: Iterable[m.BatchItem]) -> bool:
        """Whether conditional ``items`` were applied: every (session, layer) they touch is
        at expected_length + n. For a stream message resent after a broken stream and
        answered ABORTED (one writer per layer assumed, as expected_length is for)."""
        request_items = m.batch_items(items)
        m.require_conditional(request_items, "to tell whether they applied")
        return self._lengths(request_items) == m.applied_lengths(request_items)

    def stream(self, session_id: str | None = None) -> Stream:
        """An AppendAndAttendStream; routed by ``session_id``, else by the first item sent."""
        return Stream(self, session_id)

    # --- health and lifetime -----------------------------------------------------------

    def health(self, service: str = "") -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"


class Session:
    """A handle on one session of a Client: cheap, holds only the id."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.id = session_id

    def append_and_attend(
        self,
        layer: int,
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        with_length: bool = False,
        expected_length: int | None = None,
        retries: int = 0,
    ) -> np.ndarray | AttendResult:
        """Append k/v [n, KVH, D] to ``layer`` and attend q [n, H, D] over the cache.
        Returns [n, H, D] in q's dtype, or (output, new length) with ``with_length``.

        ``expected_length``: append only if the layer holds that many tokens (else ABORTED,
        nothing appended). With it, ``retries`` > 0 resends after an ambiguous failure and
        raises AlreadyApplied if an earlier attempt turns out to have applied (see
        Client.append_and_attend_batch)."""
        item = (self.id, layer, q, k, v, expected_length)
        (result,) = self.client.append_and_attend_batch(
            [item], with_lengths=True, retries=retries
        )
        return result if with_length else result.output

    def dequantize(
        self, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens [start, end) as float32 [KVH, end - start, D]."""
        return self.client.dequantize(self.id, layer, start, end)

    def truncate(self, length: int) -> SessionInfo:
        """Cut every layer to at most ``length`` tokens."""
        return self.client.truncate_session(self.id, length)

    def info(self) -> SessionInfo:
        return self.client.session_info(self.id)

    def length(self, layer: int) -> int:
        """Tokens cached in ``layer`` (one GetSession round trip)."""
        return self.info().layer_lengths[layer]

    def delete(self) -> int:
        """Delete the session; returns the bytes freed."""
        return self.client.delete_session(self.id)

    def export(self) -> list[pb.SessionChunk]:
        """As Client.export_session."""
        return self.client.export_session(self.id)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Session) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"Session({self.id!r})"


_END = object()


class Stream:
    """One AppendAndAttendStream: many AppendAndAttend messages over one HTTP/2 stream.

    ``send(items)`` returns a request id; ``recv(request_id=None)`` waits for that id's
    answer (default: the oldest outstanding one), keeping others that arrive first;
    ``attend(items)`` does both. A failed message raises Q8KVError (with ``request_id``)
    for that message only; the stream stays open. Use from one thread at a time. The
    stream has no deadline (it lives as long as the decode loop); close() ends it.

    Items may carry ``expected_length`` (AppendItem). If the stream breaks (UNAVAILABLE,
    CANCELLED), its outstanding messages may or may not have applied: resend them on a new
    stream only if conditional; an ABORTED answer then means applied exactly when
    ``client.applied(items)`` says so.
    """

    def __init__(self, client: Client, session_id: str | None = None) -> None:
        self._client = client
        self._routing_id = session_id
        self._book = m.StreamBook()
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._call: Any = None  # opened at the first send, so it can route by its items
        self._closed = False

    def _outgoing(self) -> Iterator[pb.AppendAndAttendStreamRequest]:
        while (request := self._requests.get()) is not _END:
            yield request

    def send(self, items: Iterable[m.BatchItem]) -> int:
        if self._closed:
            raise Q8KVError(grpc.StatusCode.CANCELLED, "stream: already closed")
        request_id, request = self._book.build(items)
        if not request.items:
            raise invalid_argument("items: expected at least one item")
        if self._call is None:
            metadata = call_metadata(
                self._client._metadata, self._routing_id or request.items[0].session_id
            )
            self._call = self._client._stub.AppendAndAttendStream(
                self._outgoing(), metadata=metadata, wait_for_ready=self._client.wait_for_ready
            )
        self._requests.put(request)
        self._book.sent(request_id)
        return request_id

    def recv(
        self, request_id: int | None = None, with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        wanted = self._book.wanted(request_id)
        while (results := self._book.take(wanted)) is None:
            try:
                response = next(self._call)
            except StopIteration:
                self._closed = True
                raise Q8KVError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"stream: ended by the server before request_id {wanted} was answered",
                ) from None
            except grpc.RpcError as exc:
                self._closed = True
                raise from_rpc_error(exc) from None
            self._book.arrived[int(response.request_id)] = response
        return results if with_lengths else [r.output for r in results]

    def attend(
        self, items: Iterable[m.BatchItem], with_lengths: bool = False
    ) -> list[np.ndarray] | list[AttendResult]:
        """Send one message and wait for its answer."""
        return self.recv(self.send(items), with_lengths)

    def close(self) -> None:
        """Half-close; wait for the server to end the stream, or cancel if answers are
        still outstanding (nobody would read them)."""
        if self._closed:
            return
        self._closed = True
        self._requests.put(_END)
        if self._call is None:
            return
        if self._book.pending:
            self._call.cancel()
            return
        try:
            for _ in self._call:
                pass
        except grpc.RpcError:
            pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
