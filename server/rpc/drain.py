"""Graceful shutdown: once draining, new calls get UNAVAILABLE from us (a clear message,
before gRPC's own shutdown could cancel them), further messages of open streams are
answered UNAVAILABLE unapplied (``draining()``, checked by the service per message), and
the server waits for the calls in flight to finish. The health service is exempt: it must
keep answering NOT_SERVING."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar

import grpc

from .interceptors import handler_kind, rebuild, stream_responses

EXEMPT_PREFIX = "/grpc.health.v1.Health/"

# The drain state of the server running the current call (None outside one).
_current: ContextVar[DrainInterceptor | None] = ContextVar("q8kv_drain", default=None)


def draining() -> bool:
    """True once the server running this call began to drain."""
    drain = _current.get()
    return drain is not None and drain.draining


class DrainInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Start draining; True if every call in flight finished within ``timeout``."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(EXEMPT_PREFIX):
            return handler
        kind = handler_kind(handler)
        inner = getattr(handler, kind)
        drain = self

        async def unary(request, context):
            if drain.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server: shutting down")
            _current.set(drain)
            drain._enter()
            try:
                return await inner(request, context)
            finally:
                drain._leave()

        async def streaming(request, context):
            if drain.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "server: shutting down")
            _current.set(drain)
            drain._enter()
            # Leave when the RPC ends, however it ends. A generator abandoned at its
            # `yield` (the client cancelled or went away while a response was being written)
            # is never resumed, so a `finally` here ran only when it was garbage-collected:
            # until then every shutdown waited the whole grace for a call long gone.
            context.add_done_callback(lambda _: drain._leave())
            async for response in stream_responses(inner(request, context)):
                yield response

        return rebuild(handler, streaming if kind.endswith("_stream") else unary)
