"""The front door: one wrapper around every RPC handler, applied once when the services are
registered (no interceptor chain runs per call). For each call, in order:

1. metrics: count it, time it, and record its final status code;
2. drain: refuse it with UNAVAILABLE once the server is shutting down (health is exempt);
3. auth: find the caller's tenant from the call's metadata, before the request body is
   read (with auth on, unary-request methods are request-streaming on the wire, because
   grpc.aio receives a unary request before it calls the handler: an unauthenticated
   caller could make the server hold a message of up to the size limit); streams re-check
   the token at each message, so a revoked token ends them;
4. decode: bytes that are not a request message answer INVALID_ARGUMENT (grpc.aio would
   answer UNKNOWN with the parser's text); a response may be bytes already serialized;
5. the method itself, and whatever it raised mapped to a status by ``status_of``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..observability.metrics import MethodMetrics, Metrics
from .auth import OPEN_METHODS, Grant, TokenTable, authenticate, current_tenant
from .drain import EXEMPT_PREFIX, Drain
from .status import status_of

_BUILDERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return next(kind for kind in _BUILDERS if getattr(handler, kind) is not None)


async def stream_responses(result) -> AsyncIterator:
    """The responses of a response-streaming behavior's ``result``, in either shape grpc.aio
    accepts: an async generator yields them; a coroutine (the reader/writer API, e.g.
    grpcio-health-checking's Watch) writes them itself with ``context.write``."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, size: int) -> None:
        self.size = size


def _tolerant(deserializer: Callable | None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # protobuf's DecodeError (and anything else it raises)
            return _Undecodable(len(data))

    return parse


def _passing_bytes(serializer: Callable | None) -> Callable | None:
    """A method may answer with its response already serialized (bytes: the attention
    answers, whose tensors are copied once that way, rpc/messages.py); anything else is a
    message for the method's own serializer."""
    if serializer is None:
        return None

    def serialize(response) -> bytes:
        return response if type(response) is bytes else serializer(response)

    return serialize


class _Registrar:
    """Stands in for the server in generated ``add_*_to_server`` functions, so the front
    door sees every method handler before the real server does."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Generated code passes the same handlers to both calls; the named ones are kept."""

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.services[service] = handlers


@dataclass
class _Method:
    """What the front door knows of one method, resolved once at registration."""

    path: str
    name: str
    kind: str  # as declared: unary_unary, unary_stream, stream_unary, stream_stream
    inner: Callable
    metrics: MethodMetrics | None
    drained: bool  # False for health: it must answer NOT_SERVING while draining
    authenticated: bool


class Front:
    def __init__(
        self, drain: Drain, tokens: TokenTable | None = None, metrics: Metrics | None = None
    ) -> None:
        self.drain = drain
        self.tokens = tokens if tokens is not None and tokens.enabled else None
        self.metrics = metrics

    def register(self, server: grpc.aio.Server, *adders: Callable[[Any], None]) -> None:
        """``adders``: functions that add services to a server (``lambda s:
        add_FooServicer_to_server(servicer, s)``); each method is wrapped, then added."""
        registrar = _Registrar()
        for add in adders:
            add(registrar)
        for service, handlers in registrar.services.items():
            wrapped = {name: self.wrap(f"/{service}/{name}", h) for name, h in handlers.items()}
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, wrapped),)
            )
            server.add_registered_method_handlers(service, wrapped)

    def wrap(self, path: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kind = handler_kind(handler)
        method = _Method(
            path=path,
            name=path.rsplit("/", 1)[-1],
            kind=kind,
            inner=getattr(handler, kind),
            metrics=self.metrics.rpc_method(path, kind) if self.metrics else None,
            drained=not path.startswith(EXEMPT_PREFIX),
            authenticated=self.tokens is not None and path not in OPEN_METHODS,
        )
        # Authenticated unary requests are read by us, after the check: request-streaming.
        request_streaming = kind.startswith("stream") or method.authenticated
        read_one = method.authenticated and not kind.startswith("stream")
        if kind.endswith("_stream"):
            behavior = self._streaming_response(method, read_one)
            wire_kind = "stream_stream" if request_streaming else "unary_stream"
        else:
            behavior = self._unary_response(method, read_one)
            wire_kind = "stream_unary" if request_streaming else "unary_unary"
        return _BUILDERS[wire_kind](
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=_passing_bytes(handler.response_serializer),
        )

    # -- the two shapes of behavior ----------------------------------------------------------

    def _unary_response(self, method: _Method, read_one: bool):
        async def behavior(request, context):
            mm = method.metrics
            started, failed = time.perf_counter(), None
            if mm is not None:
                mm.started.inc()
            try:
                grant = await self._admit(method, context)
                try:
                    request = await self._request(method, request, context, grant, read_one)
                    return await method.inner(request, context)
                finally:
                    if method.drained:
                        self.drain.leave()
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                failed = exc
                await _answer_error(context, exc, method.name)
            except BaseException as exc:  # cancelled: counted, then on its way
                failed = exc
                raise
            finally:
                if mm is not None:
                    mm.finish(context, started, failed)

        return behavior

    def _streaming_response(self, method: _Method, read_one: bool):
        async def behavior(request, context):
            mm = method.metrics
            outcome: dict[str, BaseException | None] = {"failed": None}
            if mm is not None:
                mm.started.inc()
                started = time.perf_counter()
                # Counted when the RPC ends, however it ends: a generator abandoned at its
                # `yield` (client gone mid-stream) runs no `finally` until collected.
                context.add_done_callback(lambda _: mm.finish(context, started, outcome["failed"]))
            try:
                grant = await self._admit(method, context)
                if method.drained:
                    context.add_done_callback(lambda _: self.drain.leave())
                request = await self._request(method, request, context, grant, read_one)
                async for response in stream_responses(method.inner(request, context)):
                    if grant is not None:
                        await grant.check(context)
                    if mm is not None:
                        mm.sent.inc()
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                outcome["failed"] = exc
                await _answer_error(context, exc, method.name)
            except BaseException as exc:
                outcome["failed"] = exc
                raise

        return behavior

    # -- the steps ---------------------------------------------------------------------------

    async def _admit(self, method: _Method, context) -> Grant | None:
        """Drain and auth checks; enters the drain's count (the caller leaves it)."""
        if method.drained and self.drain.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server: shutting down")
        grant = None
        if method.authenticated:
            grant = await authenticate(self.tokens, method.path, context)
            current_tenant.set(grant.tenant)
        if method.drained:
            self.drain.enter()
        return grant

    async def _request(self, method: _Method, request, context, grant, read_one: bool):
        """The request as the method takes it: one parsed message, or an iterator of them."""
        if read_one:
            request = await _first(request, context, method)
        if not method.kind.startswith("stream"):
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            return request
        return self._checked(method, request, context, grant)

    async def _checked(self, method: _Method, requests, context, grant: Grant | None):
        mm = method.metrics if method.kind == "stream_stream" else None
        async for request in requests:
            if mm is not None:
                mm.received.inc()
            if isinstance(request, _Undecodable):
                await _refuse(context, method, request)
            if grant is not None:
                await grant.check(context)  # before the message reaches the service
            yield request


async def _answer_error(context, exc: Exception, rpc: str) -> None:
    """End the call with the status ``exc`` maps to. An error of gRPC's own machinery (the
    client went away while we answered it) is no error of ours: nothing is left to answer."""
    if type(exc).__module__.startswith("grpc._cython"):
        raise exc
    await context.abort(*status_of(exc, rpc))


async def _first(requests, context, method: _Method):
    async for request in requests:
        return request
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: expected one request message of {method.path}, got none",
    )


async def _refuse(context, method: _Method, request: _Undecodable) -> None:
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"request: expected a serialized request message of {method.path}, got "
        f"{request.size} bytes that do not parse",
    )
