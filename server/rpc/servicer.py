"""The gRPC servicer: decode and validate requests, hand the work to the engine, map errors
to status codes. Nothing here touches the cache directly: every read or change of it runs
on the engine's worker, in order."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from q8kv.client import codec
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

from . import transfer
from .cache import Geometry, Session, SessionSnapshot, SessionStore
from .drain import draining
from .engine import AppendRequest, Engine
from .errors import (
    FailedPrecondition,
    InvalidArgument,
    OutOfRange,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from .logs import event

log = logging.getLogger("q8kv.service")

# Who is calling; the auth layer replaces this (no auth: every caller is tenant "").
TenantOf = Callable[[grpc.aio.ServicerContext], str]


def _no_tenant(context: grpc.aio.ServicerContext) -> str:
    return ""


def handles_errors(method):
    """Answer a ServiceError with its status code and message; anything else is a bug:
    log it and answer INTERNAL without the details (they may hold internals)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            event(log, "rpc_error", rpc=method.__name__, code=exc.code.name, detail=exc.message)
            await context.abort(exc.code, exc.message)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("rpc_failed", extra={"q8kv_fields": {"rpc": method.__name__}})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error (logged by the server)")

    return wrapper


def session_info(session: Session | SessionSnapshot, store: SessionStore) -> pb.SessionInfo:
    snap = session if isinstance(session, SessionSnapshot) else store.snapshot(session)
    g = snap.geometry
    return pb.SessionInfo(
        session_id=snap.id,
        geometry=pb.Geometry(
            num_layers=g.num_layers,
            num_heads=g.num_heads,
            num_kv_heads=g.num_kv_heads,
            head_dim=g.head_dim,
            max_len=g.max_len,
        ),
        softmax_scale=snap.softmax_scale,
        layer_lengths=snap.layer_lengths,
        cache_bytes=snap.tokens * g.token_bytes(),
        reserved_bytes=snap.pages_held * store.pool.page_bytes,
        ttl_seconds=snap.ttl_seconds,
        created_at=snap.created_at,
        last_used_at=snap.last_used_at,
    )


# ListSessions pages: page_size 0 means this many, and larger ones are cut to it, so one
# call holds the store's lock (and the event loop) only briefly.
LIST_PAGE_SIZE = 100


@dataclass(frozen=True)
class CallLimits:
    max_items: int = 1024
    max_tokens: int = 65536
    # The server's gRPC message limit (--max-message-bytes): ExportSession's chunks fit it.
    max_message_bytes: int = 512 * 1024 * 1024


# Largest |value| of q, k and v: attention then cannot overflow float32 (max 3.4e38). With
# head_dim <= 1024 and softmax_scale <= 1e3, a score is at most 1e3 * 1024 * (1e15)^2 ~ 1e36;
# Q8 keeps |dequantized k, v| <= max |k, v|, and the output, a convex combination of v, too.
MAX_ABS_VALUE = 1e15
# The output travels in q's dtype: float16 q needs |v| within float16's range (65504).
_OUTPUT_MAX = {np.dtype("<f2"): float(np.finfo(np.float16).max)}


def decode_items(items, limits: CallLimits = CallLimits()) -> list[AppendRequest]:
    """Decode every item's tensors without copying; reject what no session could take."""
    if not items:
        raise InvalidArgument("items: expected at least 1 item, got 0")
    if len(items) > limits.max_items:
        raise InvalidArgument(
            f"items: expected at most {limits.max_items} items per call, got {len(items)}"
        )
    new_tokens = sum(item.k.shape[0] if item.k.shape else 0 for item in items)
    if new_tokens > limits.max_tokens:
        raise InvalidArgument(
            f"items: expected at most {limits.max_tokens} new tokens per call, got {new_tokens}"
        )
    return [_decode_item(f"items[{index}]", item) for index, item in enumerate(items)]


def _decode_item(prefix: str, item) -> AppendRequest:
    tensors = {
        name: _decode_tensor(f"{prefix}.{name}", getattr(item, name)) for name in ("q", "k", "v")
    }
    for name, array in tensors.items():
        bound, why = MAX_ABS_VALUE, "so attention cannot overflow float32"
        if name == "v" and tensors["q"].dtype in _OUTPUT_MAX:
            bound, why = _OUTPUT_MAX[tensors["q"].dtype], "the output travels in q's float16"
        _check_values(f"{prefix}.{name}", array, bound, why)
    if not item.session_id:
        raise InvalidArgument(f"{prefix}.session_id: expected a session id, got ''")
    expected = item.expected_length if item.HasField("expected_length") else None
    if expected is not None and expected < 0:
        raise InvalidArgument(f"{prefix}.expected_length: expected >= 0, got {expected}")
    return AppendRequest(item.session_id, item.layer, **tensors, expected_length=expected)


def _decode_tensor(field: str, tensor) -> np.ndarray:
    try:
        array = codec.decode(tensor, field)
    except codec.TensorError as exc:
        raise InvalidArgument(str(exc)) from None
    if array.ndim != 3:
        raise InvalidArgument(
            f"{field}.shape: expected 3 dimensions [n, heads, head_dim], got {list(array.shape)}"
        )
    return array


def _check_values(field: str, array: np.ndarray, bound: float, why: str) -> None:
    """Finite and |x| <= bound, in one pass over the bits."""
    largest = codec.largest_magnitude(array)
    if not np.isfinite(largest):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InvalidArgument(f"{field}: expected finite values, got {bad} NaN/Inf of {array.size}")
    if largest > bound:
        raise InvalidArgument(
            f"{field}: expected |values| <= {bound:g} ({why}), got a largest |value| of "
            f"{largest:g}"
        )


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class KVCacheService(kvcache_pb2_grpc.KVCacheServiceServicer):
    def __init__(
        self,
        engine: Engine,
        tenant_of: TenantOf = _no_tenant,
        on_items: Callable[[list[AppendRequest]], None] | None = None,
        limits: CallLimits = CallLimits(),
    ) -> None:
        self.limits = limits
        self._attending = 0  # AppendAndAttend calls (and stream messages) in flight
        self.engine = engine
        self.store = engine.store
        self.tenant_of = tenant_of
        # Sees the items of every AppendAndAttend that landed (the quantization-error sampler).
        self.on_items = on_items or (lambda requests: None)

    @handles_errors
    async def CreateSession(self, request, context):
        g = request.geometry
        geometry = Geometry(g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_len)
        scale = request.softmax_scale if request.HasField("softmax_scale") else None
        tenant = self.tenant_of(context)

        def create() -> pb.SessionInfo:
            session = self.store.create(
                geometry, request.session_id, request.ttl_seconds, scale, tenant
            )
            return session_info(session, self.store)

        info = await self.engine.call(create)
        event(
            log, "session_created", session=info.session_id, layers=g.num_layers,
            heads=g.num_heads, kv_heads=g.num_kv_heads, head_dim=g.head_dim, max_len=g.max_len,
        )
        return pb.CreateSessionResponse(session=info)

    # GetSession and ListSessions read a snapshot under the store's lock, right on the
    # event loop: they never queue behind appends on the engine's worker.

    @handles_errors
    async def GetSession(self, request, context):
        snap = self.store.read(request.session_id, self.tenant_of(context))
        return pb.GetSessionResponse(session=session_info(snap, self.store))

    @handles_errors
    async def ListSessions(self, request, context):
        if request.page_size < 0:
            raise InvalidArgument(f"page_size: expected >= 0, got {request.page_size}")
        size = min(request.page_size or LIST_PAGE_SIZE, LIST_PAGE_SIZE)
        chosen, more = self.store.list_page(self.tenant_of(context), request.page_token, size)
        return pb.ListSessionsResponse(
            sessions=[session_info(snap, self.store) for snap in chosen],
            next_page_token=chosen[-1].id if more and chosen else "",
        )

    @handles_errors
    async def DeleteSession(self, request, context):
        tenant = self.tenant_of(context)  # here: the tenant lives in this task's context
        freed = await self.engine.call(lambda: self.store.delete(request.session_id, tenant))
        event(log, "session_deleted", session=request.session_id, freed_bytes=freed)
        return pb.DeleteSessionResponse(freed_bytes=freed)

    @handles_errors
    async def TruncateSession(self, request, context):
        tenant = self.tenant_of(context)

        def truncate() -> pb.SessionInfo:
            session = self.store.get(request.session_id, tenant)
            self.store.truncate(session, request.length)
            return session_info(session, self.store)

        return pb.TruncateSessionResponse(session=await self.engine.call(truncate))

    async def _append_and_attend(self, items, context) -> list[pb.AttendResult]:
        requests = decode_items(items, self.limits)
        self._attending += 1
        try:
            results = await self.engine.append_and_attend(
                requests,
                tenant=self.tenant_of(context),
                deadline=deadline_of(context),
                alone=lambda: self._attending == 1,
            )
        finally:
            self._attending -= 1
        self.on_items(requests)  # only appends that landed (their shapes are checked)
        return [
            pb.AttendResult(output=codec.encode(out, request.q.dtype), length=length)
            for request, (out, length) in zip(requests, results, strict=True)
        ]

    @handles_errors
    async def AppendAndAttend(self, request, context):
        return pb.AppendAndAttendResponse(
            results=await self._append_and_attend(request.items, context)
        )

    async def AppendAndAttendStream(self, request_iterator, context):
        """Each message is one AppendAndAttend; an error answers that message alone."""
        async for message in request_iterator:
            try:
                if draining():  # shutting down: apply nothing more, each message is told
                    raise Unavailable("server: shutting down, message not applied")
                results = await self._append_and_attend(message.items, context)
                yield pb.AppendAndAttendStreamResponse(
                    request_id=message.request_id, results=results
                )
            except ServiceError as exc:
                yield pb.AppendAndAttendStreamResponse(
                    request_id=message.request_id,
                    error_code=exc.code.value[0],
                    error_message=exc.message,
                )
            except Exception:
                log.exception("rpc_failed", extra={"q8kv_fields": {"rpc": "AppendAndAttendStream"}})
                yield pb.AppendAndAttendStreamResponse(
                    request_id=message.request_id,
                    error_code=grpc.StatusCode.INTERNAL.value[0],
                    error_message="internal error (logged by the server)",
                )

    @handles_errors
    async def Dequantize(self, request, context):
        tenant = self.tenant_of(context)

        def read():
            session = self.store.get(request.session_id, tenant)
            layer = session.layer(request.layer)
            end = request.end if request.HasField("end") else layer.length
            for name, value in (("end", end), ("start", request.start)):
                if value > layer.length:
                    raise OutOfRange(
                        f"{name}: expected <= the layer's length {layer.length}, got {value}"
                    )
            if not 0 <= request.start <= end:
                raise InvalidArgument(
                    f"start: expected 0 <= start <= end ({end}), got {request.start}"
                )
            k, v = self.engine.backend.dequantize(
                session.layout, layer.page_table(), request.start, end
            )
            return k, v, layer.length

        k, v, length = await self.engine.call(read)
        return pb.DequantizeResponse(k=codec.encode(k), v=codec.encode(v), length=length)

    async def ExportSession(self, request, context):
        """Header, then each layer read in its own engine call (appends to other sessions
        keep flowing between them), then the checksum."""
        tenant = self.tenant_of(context)
        try:
            header = await self.engine.call(
                lambda: transfer.header_of(self.store.get(request.session_id, tenant))
            )
            checksum = transfer.Checksum()
            first = pb.SessionChunk(header=header)
            checksum.add(first)
            yield first
            for index, length in enumerate(header.layer_lengths):
                for tokens in await self.engine.call(
                    functools.partial(self._export_layer, request.session_id, tenant, index,
                                      length)
                ):
                    chunk = pb.SessionChunk(tokens=tokens)
                    checksum.add(chunk)
                    yield chunk
            yield checksum.trailer()
        except ServiceError as exc:
            event(log, "rpc_error", rpc="ExportSession", code=exc.code.name, detail=exc.message)
            await context.abort(exc.code, exc.message)

    def _export_layer(self, session_id: str, tenant: str, index: int, length: int):
        session = self.store.get(session_id, tenant)
        if session.layers[index].length < length:
            raise FailedPrecondition(
                f"session_id: {session_id!r} was truncated during the export (layer {index} "
                f"has {session.layers[index].length} tokens, the header said {length})"
            )
        return transfer.layer_chunks(
            self.engine.backend, session, index, length, self.limits.max_message_bytes
        )

    @handles_errors
    async def ImportSession(self, request_iterator, context):
        # Bounded by the pool: a stream larger than every page could hold is refused
        # before it fills the host's memory.
        limit = self.store.pool.num_pages * self.store.pool.page_bytes
        chunks, received = [], 0
        async for chunk in request_iterator:
            received += chunk.ByteSize()
            if received > limit:
                raise ResourceExhausted(
                    f"chunks: expected at most {limit} bytes (the memory budget), got more"
                )
            chunks.append(chunk)
        imported = transfer.assemble(chunks)
        tenant = self.tenant_of(context)
        info = await self.engine.call(
            lambda: session_info(
                transfer.install(self.store, self.engine.backend, imported, tenant), self.store
            )
        )
        event(log, "session_imported", session=info.session_id, tokens=sum(info.layer_lengths))
        return pb.ImportSessionResponse(session=info)

