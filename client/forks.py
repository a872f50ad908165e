"""ForkSession as a call (``Unary``) both clients run: the request built and checked, the
answer decoded into a handle. Kept apart from core.py, which is at its size limit."""

from __future__ import annotations

from typing import Any

from q8kv.v1 import kvcache_pb2 as pb

from . import messages as m
from .channel import route_of
from .core import ClientCore, Unary


def fork_request(
    source_id: str,
    session_id: str | None = None,
    length: int | None = None,
    ttl_seconds: float | None = None,
) -> pb.ForkSessionRequest:
    """The request; without ``session_id`` the client makes a UUID4, so a retry after an
    ambiguous failure answers ALREADY_EXISTS instead of making a second fork."""
    request = pb.ForkSessionRequest(
        source_session_id=source_id,
        session_id=session_id or m.new_session_id(),
        ttl_seconds=float(ttl_seconds or 0.0),
    )
    if length is not None:  # unset (not 0): every layer as the source's
        request.length = m.as_int(length, "length")
    return request


def fork_call(
    client: ClientCore,
    source: Any,
    session_id: str | None,
    length: int | None,
    ttl_seconds: float | None,
) -> Unary[Any]:
    """Routed as the source, and the fork's handle keeps that route: a fork lives on its
    source's replica, so a session-affine router must send its calls there too."""
    route = route_of(source)
    request = fork_request(m.session_id_of(source), session_id, length, ttl_seconds)
    return Unary(
        client._stub.ForkSession,
        request,
        route,
        lambda r: client._handle(r.session.session_id or request.session_id, route),
    )
