"""The blocking client: Client and its Session handles (its Stream: sync_stream.py).

A shell over core.py: ClientCore builds every call and decodes its answer; this module only
runs calls (blocking) and loops where a method makes several (pages, retries, the parts of
a split batch). aio.py is its asyncio twin, method for method.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .channel import checked_routing_key, make_sync_channel
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
from .sync_stream import Stream
from .types import AttendResult, BatchResult, SessionInfo

T = TypeVar("T")


class Session(SessionCore):
    """A handle on one session of a Client: cheap, holds only the id."""

    client: Client

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
            [item], with_lengths=True, retries=retries, routing_key=self.routing_key
        )
        return result if with_length else result.output

    def dequantize(
        self, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens [start, end) as float32 [KVH, end - start, D]."""
        return self.client.dequantize(self, layer, start, end)

    def truncate(self, length: int) -> SessionInfo:
        """Cut every layer to at most ``length`` tokens."""
        return self.client.truncate_session(self, length)

    def info(self) -> SessionInfo:
        return self.client.session_info(self)

    def length(self, layer: int) -> int:
        """Tokens cached in ``layer`` (one GetSession round trip)."""
        return self.info().layer_lengths[layer]

    def delete(self) -> int:
        """Delete the session; returns the bytes freed."""
        return self.client.delete_session(self)

    def fork(
        self,
        session_id: str | None = None,
        length: int | None = None,
        ttl_seconds: float | None = None,
    ) -> Session:
        """As Client.fork_session: a new session sharing this one's tokens."""
        return self.client.fork_session(self, session_id, length, ttl_seconds)

    def export(self) -> list[pb.SessionChunk]:
        """As Client.export_session."""
        return self.client.export_session(self)


class Client(ClientCore):
    """A connection to one q8kv server (or a router in front of several).

    ``timeout`` is the deadline of each call in seconds (None: none). ``token`` is sent as
    ``authorization: Bearer <token>``. ``tls``: None/False plaintext, True system roots, a
    CA bundle path, or ``(ca, client_cert, client_key)`` paths for mutual TLS.
    Thread-safe: one Client may serve many threads (a Stream may not).
    """

    _make_channel = staticmethod(make_sync_channel)
    _session_type = Session

    # The I/O: a unary (or client-streaming) call, and a server-streaming one collected.
    def _unary(self, call: Unary[T]) -> T:
        with rpc_errors():
            response = call.method(call.request, **self._options(call.session_id))
        return call.decode(response)

    def _collect(self, call: Unary[T]) -> T:
        with rpc_errors():
            messages = list(call.method(call.request, **self._options(call.session_id)))
        return call.decode(messages)

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
        *,
        routing_key: str | None = None,
    ) -> Session:
        """Create a session; without ``session_id`` the client makes a UUID4.

        ``routing_key``: route the call by it instead of the id (the ``x-session-id``
        header a session-affine router hashes on; 1-128 of [A-Za-z0-9._:-], else
        INVALID_ARGUMENT). The handle keeps it for all its own calls; create every session
        of one attend_batch under the same key so they live on the same replica."""
        return self._unary(
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

    def session(self, session_id: str, *, routing_key: str | None = None) -> Session:
        """A handle for an existing id, without a round trip (see get_session); its calls
        are routed by ``routing_key`` (the one it was created under), else by the id."""
        return Session(self, m.session_id_of(session_id, "session_id"), routing_key)

    def get_session(self, session_id: str, *, routing_key: str | None = None) -> Session:
        """A handle for an existing session; NOT_FOUND if there is none."""
        handle = self.session(session_id, routing_key=routing_key)
        handle.info()
        return handle

    def session_info(self, session_id: Any) -> SessionInfo:
        return self._unary(self._info_call(session_id))

    def list_sessions(self, page_size: int = 0) -> list[SessionInfo]:
        """Every session the server shows this caller, following pages until the last."""
        sessions, token = self._unary(self._list_call(page_size, ""))
        while token:
            page, token = self._unary(self._list_call(page_size, token))
            sessions.extend(page)
        return sessions

    def delete_session(self, session: Any) -> int:
        """Delete a session (handle or id); returns the bytes freed."""
        return self._unary(self._delete_call(session))

    def truncate_session(self, session: Any, length: int) -> SessionInfo:
        return self._unary(self._truncate_call(session, length))

    def fork_session(
        self,
        source: Any,
        session_id: str | None = None,
        length: int | None = None,
        ttl_seconds: float | None = None,
    ) -> Session:
        """A new session (``session_id``, else a UUID4) sharing the first ``length`` tokens
        of every layer of ``source`` (None: all of each), copy-on-write; see
        docs/design.md#forks. Routed as the source, and the handle keeps that route."""
        return self._unary(fork_call(self, source, session_id, length, ttl_seconds))

    def dequantize(
        self, session: Any, layer: int, start: int = 0, end: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._unary(self._dequantize_call(session, layer, start, end))

    def export_session(self, session: Any) -> list[pb.SessionChunk]:
        """A session's Q8 cache as chunks (header, tokens per layer, checksum trailer), for
        ``import_session`` on another server. The session stays here."""
        return self._collect(self._export_call(session))

    def import_session(
        self, chunks: Iterable[pb.SessionChunk], max_message_bytes: int | None = None
    ) -> Session:
        """Recreate an exported session here, owned by this caller's tenant; nothing is
        created unless every chunk arrived and the checksum matches. Token chunks larger
        than ``max_message_bytes`` (default: this client's limit; pass the server's
        --max-message-bytes when it is smaller) are split first, their checksum checked
        and recomputed."""
        return self._unary(self._import_call(chunks, max_message_bytes))

    # --- attention ---------------------------------------------------------------------

    def append_and_attend_batch(
        self,
        items: Iterable[m.BatchItem],
        with_lengths: bool = False,
        retries: int = 0,
        *,
        routing_key: str | None = None,
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
        call = self._attend_call(items, with_lengths, retries, routing_key)
        return [] if call is None else self._append_retrying(call, retries)

    def _append_retrying(self, call: Unary[T], retries: int) -> T:
        """Send, and resend after ambiguous failures (core.retry_step decides)."""
        attempt = 0
        while True:
            try:
                return self._unary(call)
            except Q8KVError as exc:
                step = retry_step(attempt, retries, exc)
                if step is RetryStep.RAISE:
                    raise
                if step is RetryStep.CHECK:
                    items = retry_items(call.request)
                    lengths = self._lengths(items, call.session_id)  # where it went
                    raise m.already_applied(items, lengths, exc) from None
            time.sleep(m.retry_delay(attempt))
            attempt += 1

    def attend_batch(
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
        """One layer of one step for B sessions as one packed AttendBatch: ``sessions``
        [B] (handles or ids, each once), q [B, n, H, D], k and v [B, n, KVH, D] (the same
        n for all; the sessions' lengths may differ). Appends each session's k/v to
        ``layer`` and attends its q over its cache. Returns the outputs [B, n, H, D] in
        q's dtype, or BatchResult(output, lengths) with ``with_lengths=True`` (each
        session's layer length after the append). Routed by ``routing_key`` (the
        ``x-session-id`` header, every part of a split call too) when given, else by the
        first session: behind a session-affine router all B sessions must live on the
        replica the header reaches, so create them with create_session(...,
        routing_key=the same key). An invalid key is INVALID_ARGUMENT, nothing sent.

        One call is all or none. ``expected_lengths`` [B] makes it conditional (ABORTED,
        nothing applied, if a layer's length differs); ``retries`` as in
        append_and_attend_batch (needs ``expected_lengths``).

        A call over this client's ``max_message_bytes`` (request, or the answer's
        B*n*H*D*itemsize bytes of output) is split before sending into calls that fit,
        sent in order: by sessions, and for a prefill too long for one session's row, by
        tokens as well (each session's chunks in order: causal attention makes chunked
        appends give the same outputs). A split call is NOT all or none across its
        parts: when a part fails, the earlier parts have applied and later ones are not
        sent; the error names the part, its sessions and tokens. Each part carries
        expected_lengths[b] + the tokens of session b's earlier chunks, so resending
        the same call (or ``retries``) never appends a token twice: a part that had
        applied answers ABORTED. If even one token of one session cannot fit,
        RESOURCE_EXHAUSTED naming the limit is raised before anything is sent."""
        plan = self._batch_plan(layer, sessions, q, k, v, expected_lengths, retries, routing_key)
        for part in plan.parts:
            try:
                plan.put(part, self._append_retrying(self._batch_call(plan, part), retries))
            except Q8KVError as exc:
                raise plan.failed(part, exc) from None
        return plan.result(with_lengths)

    def _lengths(self, items: Sequence[pb.AttendItem], route: str | None = None) -> Lengths:
        """The current length of each (session id, layer) of ``items``, each asked of the
        replica ``route`` reaches (the one a call of them went to), else by its id."""
        infos = {sid: self._unary(self._info_call(sid, route)) for sid in session_ids(items)}
        return lengths_of(items, infos)

    def applied(self, items: Iterable[m.BatchItem], *, routing_key: str | None = None) -> bool:
        """Whether conditional ``items`` were applied: every (session, layer) they touch is
        at expected_length + n. For a stream message resent after a broken stream and
        answered ABORTED (one writer per layer assumed, as expected_length is for)."""
        request_items = conditional_items(items)
        lengths = self._lengths(request_items, checked_routing_key(routing_key))
        return lengths == m.applied_lengths(request_items)

    def stream(self, session_id: str | None = None) -> Stream:
        """An AppendAndAttendStream; routed by ``session_id``, else by the first item sent."""
        return Stream(self, session_id)

    # --- health and lifetime -----------------------------------------------------------

    def health(self, service: str = "") -> str:
        """The gRPC health status: "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN"."""
        return self._unary(self._health_call(service))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
