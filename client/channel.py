"""Channel set-up shared by the sync and asyncio clients: options, TLS, call metadata.

The calls themselves are built in core.py (ClientCore) and run in sync.py / aio.py.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc

from .errors import invalid_argument

DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024

# Keepalive pings find a dead connection (a replica gone without a FIN, a NAT that dropped
# the flow) instead of letting calls hang until their deadline. 5 minutes is the shortest
# interval a gRPC server accepts by default (grpc.http2.min_ping_interval_without_data_ms):
# pinging more often on an idle stream gets the connection closed with "too_many_pings".
DEFAULT_KEEPALIVE_SECONDS = 300.0
KEEPALIVE_TIMEOUT_MS = 20_000

# True: system roots; str/Path: a CA bundle; (ca, cert, key): mutual TLS (ca may be None).
TLSConfig: TypeAlias = (
    bool
    | str
    | os.PathLike
    | tuple[str | os.PathLike | None, str | os.PathLike, str | os.PathLike]
    | None
)
Metadata: TypeAlias = tuple[tuple[str, str], ...]

SESSION_HEADER = "x-session-id"  # what a session-affine router hashes on
# What the server takes as a session id (1-128 of these characters; server/cache.py). Any
# other string is no session, and may not fit a header at all (non-ASCII, a newline, over
# 16 KiB fail the call before it is sent): it goes without the header, in the message only,
# so the server gives its own answer (NOT_FOUND, INVALID_ARGUMENT).
ROUTABLE_SESSION_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def checked_routing_key(key: Any) -> str | None:
    """A caller's ``routing_key`` checked: None, or what the header can carry (the id
    alphabet), else INVALID_ARGUMENT before anything is sent (a key silently dropped would
    scatter the calls it was meant to keep together)."""
    if key is None or (isinstance(key, str) and ROUTABLE_SESSION_ID.fullmatch(key)):
        return key
    raise invalid_argument(
        f"routing_key: expected 1-128 characters of [A-Za-z0-9._:-], got {key!r}"
    )


def route_of(session: Any) -> Any:
    """What a per-session call routes by: a handle's routing_key, else the id."""
    return getattr(session, "routing_key", None) or getattr(session, "id", session)


def channel_options(
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_seconds: float | None = DEFAULT_KEEPALIVE_SECONDS,
    extra: Sequence[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """gRPC channel arguments; ``extra`` ones override the defaults of the same name."""
    options: dict[str, Any] = {
        "grpc.max_send_message_length": int(max_message_bytes),
        "grpc.max_receive_message_length": int(max_message_bytes),
    }
    if keepalive_seconds:
        options.update(
            {
                "grpc.keepalive_time_ms": int(keepalive_seconds * 1000),
                "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
                # No pings without calls: an idle client costs the server nothing.
                "grpc.keepalive_permit_without_calls": 0,
                "grpc.http2.max_pings_without_data": 0,
            }
        )
    options.update(dict(extra))
    return list(options.items())


def _read(path: str | os.PathLike | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials | None:
    """``tls=`` -> credentials, or None for a plaintext channel."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, str | os.PathLike):
        return grpc.ssl_channel_credentials(root_certificates=_read(tls))
    if isinstance(tls, tuple) and len(tls) == 3:
        ca, cert, key = tls
        return grpc.ssl_channel_credentials(
            root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
        )
    raise TypeError(
        f"tls: expected None/False, True, a CA bundle path or (ca, cert, key) paths, got {tls!r}"
    )


def base_metadata(token: str | None) -> Metadata:
    """Metadata sent with every call. The token travels as metadata, not call credentials,
    so it also works on plaintext channels (tests, a TLS-terminating router in front)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def call_metadata(base: Metadata, session_id: str | None = None) -> Metadata:
    """``base`` plus the routing header of a per-session call, if the id can be a session's."""
    if isinstance(session_id, str) and ROUTABLE_SESSION_ID.fullmatch(session_id):
        return base + ((SESSION_HEADER, session_id),)
    return base


def make_sync_channel(target: str, tls: TLSConfig, options: list[tuple[str, Any]]) -> grpc.Channel:
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def make_aio_channel(
    target: str, tls: TLSConfig, options: list[tuple[str, Any]]
) -> grpc.aio.Channel:
    creds = channel_credentials(tls)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)
