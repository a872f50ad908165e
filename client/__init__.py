"""q8kv client: sync (Client) and asyncio (AsyncClient) access to a q8kv server.

    from q8kv.client import Client
    with Client("127.0.0.1:50051", timeout=10.0) as c:
        s = c.create_session(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                             max_len=4096)
        out = s.append_and_attend(0, q, k, v)   # q [n, H, D], k/v [n, KVH, D]

One layer of a step for B sessions in one packed call (split by the client into calls
that fit ``max_message_bytes`` when it is larger; see Client.attend_batch):

    out = c.attend_batch(0, sessions, q, k, v)  # q [B, n, H, D], k/v [B, n, KVH, D]

Every failure raises Q8KVError (``.code`` a grpc.StatusCode, ``.message`` the details).

Retrying appends: UNAVAILABLE, DEADLINE_EXCEEDED and CANCELLED are ambiguous (the append may
have applied; its answer was lost), so resend an append only when it is conditional:

    out = s.append_and_attend(0, q, k, v, expected_length=n, retries=3)

A resend then appends at most once; if an earlier attempt had applied, AlreadyApplied (an
ABORTED Q8KVError) says so instead of returning nothing. For streams: resend the messages
that were outstanding on a new stream with expected_length; on ABORTED, ``client.applied``
tells whether the first attempt applied.

Inside: core.py holds what is not I/O (ClientCore builds each call and decodes its answer,
and decides retries; batching.py plans packed batches; messages.py and stream_messages.py
build and decode the messages); sync.py and aio.py (and their streams, sync_stream.py and
aio_stream.py) are thin shells that run the calls, blocking or awaited;
errors.rpc_errors() is the one point where grpc.RpcError becomes Q8KVError; tensors go
through q8kv.wire, which the server shares.
"""

from __future__ import annotations

from .aio import AsyncClient, AsyncSession, AsyncStream
from .errors import AlreadyApplied, Q8KVError
from .sync import Client, Session, Stream
from .types import AppendItem, AttendResult, BatchResult, SessionInfo

__all__ = [
    "AlreadyApplied",
    "AppendItem",
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "AttendResult",
    "BatchResult",
    "Client",
    "Q8KVError",
    "Session",
    "SessionInfo",
    "Stream",
]
