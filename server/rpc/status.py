"""The one mapping from what an RPC raised to what its caller sees, used by the front door
for every call and by the stream servicer for each failed message."""

from __future__ import annotations

import logging

import grpc

from ..errors import ServiceError
from ..observability.logs import event

log = logging.getLogger("q8kv.service")

INTERNAL_MESSAGE = "internal error (logged by the server)"


def status_of(exc: BaseException, rpc: str) -> tuple[grpc.StatusCode, str]:
    """A ServiceError answers its own code and message; anything else is a bug: logged
    with its traceback and answered INTERNAL without details (they may hold internals)."""
    if isinstance(exc, ServiceError):
        event(log, "rpc_error", rpc=rpc, code=exc.code.name, detail=exc.message)
        return exc.code, exc.message
    log.error("rpc_failed", exc_info=exc, extra={"q8kv_fields": {"rpc": rpc}})
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
