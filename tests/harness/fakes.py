"""Stand-ins for gRPC objects in client tests that need no server."""

from __future__ import annotations

import grpc


class FakeRpcError(grpc.RpcError):
    """An RpcError with the given code and details, as a stub raises it."""

    def __init__(self, code: grpc.StatusCode | None, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str | None:
        return self._details


def answer(result, is_async: bool):
    """``result`` the way a fake stub's unary call gives it: raised when an exception; for
    an asyncio stub, from an awaitable."""
    if not is_async:
        if isinstance(result, Exception):
            raise result
        return result

    async def awaitable():
        if isinstance(result, Exception):
            raise result
        return result

    return awaitable()
