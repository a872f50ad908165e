"""The gRPC servicer: decode requests, call the engine's operations, encode the answers.
Errors are raised, never answered here: the front door (front.py) maps them to a status
for the whole call; a failed message of a stream is answered alone, through the same
mapping (status.py)."""

from __future__ import annotations

import logging

from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

from ..engine import Engine
from ..errors import InvalidArgument, ResourceExhausted, Unavailable
from ..observability.logs import event
from .auth import current_tenant
from .drain import Drain
from .messages import (
    CallLimits,
    Parts,
    attend_batch_response,
    attend_response,
    deadline_of,
    decode_batch,
    decode_items,
    dequantize_response,
    geometry_of,
    session_info,
    stream_response,
)
from .status import status_of

log = logging.getLogger("q8kv.service")

# ListSessions pages: page_size 0 means this many, and larger ones are cut to it, so one
# call holds the store's lock (and the event loop) only briefly.
LIST_PAGE_SIZE = 100


class KVCacheService(kvcache_pb2_grpc.KVCacheServiceServicer):
    def __init__(
        self,
        engine: Engine,
        drain: Drain | None = None,
        on_appended=None,
        limits: CallLimits | None = None,
    ) -> None:
        self.engine = engine
        self.drain = drain or Drain()
        self.limits = limits or CallLimits()
        # Sees the k and v of every append that landed (the quantization-error sampler):
        # on_appended(k, v), item i's being k[i] and v[i].
        self.on_appended = on_appended or (lambda k, v: None)

    def _info(self, snap) -> pb.SessionInfo:
        return session_info(snap, self.engine.page_bytes)

    async def CreateSession(self, request, context):
        g = request.geometry
        scale = request.softmax_scale if request.HasField("softmax_scale") else None
        snap = await self.engine.create_session(
            geometry_of(g), request.session_id, request.ttl_seconds, scale, current_tenant.get()
        )
        event(
            log, "session_created", session=snap.id, layers=g.num_layers,
            heads=g.num_heads, kv_heads=g.num_kv_heads, head_dim=g.head_dim, max_len=g.max_len,
        )
        return pb.CreateSessionResponse(session=self._info(snap))

    async def GetSession(self, request, context):
        snap = self.engine.read_session(request.session_id, current_tenant.get())
        return pb.GetSessionResponse(session=self._info(snap))

    async def ListSessions(self, request, context):
        if request.page_size < 0:
            raise InvalidArgument(f"page_size: expected >= 0, got {request.page_size}")
        size = min(request.page_size or LIST_PAGE_SIZE, LIST_PAGE_SIZE)
        chosen, more = self.engine.list_sessions(current_tenant.get(), request.page_token, size)
        return pb.ListSessionsResponse(
            sessions=[self._info(snap) for snap in chosen],
            next_page_token=chosen[-1].id if more and chosen else "",
        )

    async def DeleteSession(self, request, context):
        freed = await self.engine.delete_session(request.session_id, current_tenant.get())
        event(log, "session_deleted", session=request.session_id, freed_bytes=freed)
        return pb.DeleteSessionResponse(freed_bytes=freed)

    async def TruncateSession(self, request, context):
        snap = await self.engine.truncate_session(
            request.session_id, current_tenant.get(), request.length
        )
        return pb.TruncateSessionResponse(session=self._info(snap))

    async def ForkSession(self, request, context):
        length = request.length if request.HasField("length") else None
        snap = await self.engine.fork_session(
            request.source_session_id, current_tenant.get(), request.session_id, length,
            request.ttl_seconds,
        )
        event(
            log, "session_forked", session=snap.id, source=request.source_session_id,
            tokens=snap.tokens,
        )
        return pb.ForkSessionResponse(session=self._info(snap))

    # The answers carrying tensors go back serialized (bytes, passed through by the front
    # door): each is copied once into the response's bytes, not into a message and then out
    # of it (messages.attend_response, attend_batch_response, dequantize_response).

    async def _append_and_attend(self, items, context, field: int = 1) -> Parts:
        """The results, serialized as field ``field`` (see ``attend_response``)."""
        requests = decode_items(items, self.limits)
        results = await self.engine.append_and_attend(
            requests, tenant=current_tenant.get(), deadline=deadline_of(context)
        )
        # Only appends that landed (their shapes are checked).
        self.on_appended([r.k for r in requests], [r.v for r in requests])
        return attend_response(requests, results, field)

    async def AppendAndAttend(self, request, context):
        return b"".join(await self._append_and_attend(request.items, context))

    async def _attend_batch(self, request, context) -> Parts:
        batch = decode_batch(request, self.limits)
        output, lengths = await self.engine.attend_batch(
            batch, tenant=current_tenant.get(), deadline=deadline_of(context)
        )
        self.on_appended(batch.k, batch.v)
        return attend_batch_response(output, lengths)

    async def AttendBatch(self, request, context):
        return b"".join(await self._attend_batch(request, context))

    async def AppendAndAttendStream(self, request_iterator, context):
        """Each message is one AppendAndAttend (items) or one AttendBatch (batch); an error
        answers that message alone."""
        async for message in request_iterator:
            try:
                if self.drain.draining:  # shutting down: apply nothing more, say so
                    raise Unavailable("server: shutting down, message not applied")
                if message.HasField("batch"):
                    if message.items:
                        raise InvalidArgument(
                            f"items: expected none in a message that carries a batch, got "
                            f"{len(message.items)}"
                        )
                    batch = await self._attend_batch(message.batch, context)
                    yield stream_response(message.request_id, batch=batch)
                    continue
                results = await self._append_and_attend(message.items, context, field=2)
                yield stream_response(message.request_id, results=results)
            except Exception as exc:
                code, text = status_of(exc, "AppendAndAttendStream")
                yield pb.AppendAndAttendStreamResponse(
                    request_id=message.request_id, error_code=code.value[0], error_message=text
                )

    async def Dequantize(self, request, context):
        end = request.end if request.HasField("end") else None
        k, v, length = await self.engine.dequantize(
            request.session_id, current_tenant.get(), request.layer, request.start, end
        )
        return b"".join(dequantize_response(k, v, length))

    async def ExportSession(self, request, context):
        async for chunk in self.engine.export_session(
            request.session_id, current_tenant.get(), self.limits.max_message_bytes
        ):
            yield chunk

    async def ImportSession(self, request_iterator, context):
        # Bounded by the pool: a stream larger than every page could hold is refused
        # before it fills the host's memory.
        limit = self.engine.budget_bytes
        chunks, received = [], 0
        async for chunk in request_iterator:
            received += chunk.ByteSize()
            if received > limit:
                raise ResourceExhausted(
                    f"chunks: expected at most {limit} bytes (the memory budget), got more"
                )
            chunks.append(chunk)
        snap = await self.engine.import_session(chunks, current_tenant.get())
        event(log, "session_imported", session=snap.id, tokens=snap.tokens)
        return pb.ImportSessionResponse(session=self._info(snap))
