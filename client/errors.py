"""The one exception the client raises: Q8KVError, carrying a gRPC status code.

Failed RPCs are converted here and nowhere else: every RPC of the client, unary or
streaming, sync or asyncio, runs inside ``with rpc_errors():``, so every caller catches one
type. Bad input the client can see before sending (a dtype it cannot encode,
a malformed batch item) raises the same type with INVALID_ARGUMENT, the code the server
would have answered with: callers need not tell the two apart.
"""

from __future__ import annotations

import grpc


class Q8KVError(Exception):
    """A q8kv call failed. ``code`` is a ``grpc.StatusCode``; ``message`` the details.

    ``request_id`` is set for a failed message of an AppendAndAttendStream (the stream
    itself stays usable); it is None otherwise.
    """

    def __init__(self, code: grpc.StatusCode, message: str, request_id: int | None = None) -> None:
        # args = (code, message, request_id) keeps the exception picklable (multiprocessing).
        super().__init__(code, message, request_id)
        self.code = code
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def __repr__(self) -> str:
        extra = "" if self.request_id is None else f", request_id={self.request_id}"
        return f"Q8KVError({self.code.name}, {self.message!r}{extra})"


class AlreadyApplied(Q8KVError):
    """A retried conditional append found its tokens already in the cache: an attempt that
    failed ambiguously (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) did apply, and its
    outputs are lost. ``lengths`` maps each (session id, layer) of the call to its length
    now. The code is ABORTED (the retry's answer), so ``except Q8KVError`` still sees it.
    """

    def __init__(self, message: str, lengths: dict[tuple[str, int], int]) -> None:
        super().__init__(grpc.StatusCode.ABORTED, message)
        self.lengths = lengths

    def __reduce__(self):  # picklable despite the other constructor
        return (type(self), (self.message, self.lengths))


def invalid_argument(message: str) -> Q8KVError:
    """A client-side validation failure, reported as the server would report it."""
    return Q8KVError(grpc.StatusCode.INVALID_ARGUMENT, message)


def from_rpc_error(error: grpc.RpcError) -> Q8KVError:
    """grpc.RpcError (sync or aio) -> Q8KVError with the status code and the details."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    return Q8KVError(code, details or str(error) or code.name)


class _RpcErrors:
    """The context manager behind ``rpc_errors()``: a class, not @contextmanager, as it
    wraps every call (no generator per call) and lets StopIteration pass untouched."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> bool:
        if isinstance(error, grpc.RpcError):
            raise from_rpc_error(error) from None
        return False


_RPC_ERRORS = _RpcErrors()  # stateless: one serves every call, nested or concurrent


def rpc_errors() -> _RpcErrors:
    """``with rpc_errors(): <an RPC, or iterating its responses>``: the one point where
    grpc.RpcError becomes Q8KVError (anything else passes through unchanged)."""
    return _RPC_ERRORS


_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """An integer status code (as in a stream response's ``error_code``) -> grpc.StatusCode."""
    return _CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
