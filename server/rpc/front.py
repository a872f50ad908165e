"""Shared plumbing for server interceptors: rebuild an RPC handler around a new behavior
of the same kind (unary or streaming), iterate a streaming behavior's responses whatever
its shape, and answer a call from its metadata alone without reading its request."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import grpc

RPC_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_BUILDERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    """The kind the handler runs as on the wire."""
    return next(kind for kind in RPC_KINDS if getattr(handler, kind) is not None)


def declared_kind(handler: grpc.RpcMethodHandler) -> str:
    """The kind the method was declared with (an unread handler runs as request-streaming
    whatever the method's kind)."""
    return getattr(handler, "declared_kind", None) or handler_kind(handler)


def rebuild(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler like ``handler`` (same kind, same (de)serializers) running ``behavior``."""
    if isinstance(handler, UnreadHandler):
        return UnreadHandler(handler.declared_kind, behavior, handler.response_serializer)
    return _BUILDERS[handler_kind(handler)](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def stream_responses(result) -> AsyncIterator:
    """The responses of a response-streaming behavior's ``result``, in either shape grpc.aio
    accepts: an async generator yields them; a coroutine (the reader/writer API, e.g.
    grpcio-health-checking's Watch) writes them itself with ``context.write``."""
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


class UnreadHandler(grpc.RpcMethodHandler):
    """A handler that answers from the call's metadata and never reads its request.

    grpc.aio receives and parses a unary request message (up to the message size limit)
    before it calls the behavior; a request-streaming behavior reads nothing until it
    iterates. So this one is request-streaming on the wire whatever the method's kind, has
    no request deserializer, and ``behavior(request_iterator, context)`` must be a
    coroutine function that does not iterate.
    """

    def __init__(self, declared: str, behavior: Callable, response_serializer) -> None:
        streaming = declared.endswith("_stream")
        self.declared_kind = declared
        self.request_streaming = True
        self.response_streaming = streaming
        self.request_deserializer = None
        self.response_serializer = response_serializer
        self.unary_unary = self.unary_stream = None
        self.stream_unary = None if streaming else behavior
        self.stream_stream = behavior if streaming else None


def unread(handler: grpc.RpcMethodHandler, behavior: Callable) -> UnreadHandler:
    return UnreadHandler(declared_kind(handler), behavior, handler.response_serializer)


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


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Bytes that are not a valid request message get INVALID_ARGUMENT. Without this,
    grpc.aio answers UNKNOWN with the parser's exception text."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        kind = handler_kind(handler)
        inner = getattr(handler, kind)
        method = handler_call_details.method

        async def refuse(context, request) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request: expected a serialized request message of {method}, got "
                f"{request.size} bytes that do not parse",
            )

        async def checked(request_iterator, context):
            async for request in request_iterator:
                if isinstance(request, _Undecodable):
                    await refuse(context, request)
                yield request

        if kind == "unary_unary":
            async def behavior(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(context, request)
                return await inner(request, context)
        elif kind == "unary_stream":
            async def behavior(request, context):
                if isinstance(request, _Undecodable):
                    await refuse(context, request)
                async for response in stream_responses(inner(request, context)):
                    yield response
        elif kind == "stream_unary":
            async def behavior(request_iterator, context):
                return await inner(checked(request_iterator, context), context)
        else:
            async def behavior(request_iterator, context):
                responses = stream_responses(inner(checked(request_iterator, context), context))
                async for response in responses:
                    yield response

        return _BUILDERS[kind](
            behavior,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
