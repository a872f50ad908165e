"""Shared plumbing for server interceptors: rebuild an RPC handler around a new behavior
of the same kind (unary or streaming)."""

from __future__ import annotations

from collections.abc import Callable

import grpc

RPC_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_BUILDERS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def handler_kind(handler: grpc.RpcMethodHandler) -> str:
    return next(kind for kind in RPC_KINDS if getattr(handler, kind) is not None)


def rebuild(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler like ``handler`` (same kind, same (de)serializers) running ``behavior``."""
    return _BUILDERS[handler_kind(handler)](
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
