"""q8kv client: sync (Client) and asyncio (AsyncClient) access to a q8kv server.

    from q8kv.client import Client
    with Client("127.0.0.1:50051", timeout=10.0) as c:
        s = c.create_session(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64,
                             max_len=4096)
        out = s.append_and_attend(0, q, k, v)   # q [n, H, D], k/v [n, KVH, D]

Every failure raises Q8KVError (``.code`` a grpc.StatusCode, ``.message`` the details).
"""

from __future__ import annotations

from .aio import AsyncClient, AsyncSession, AsyncStream
from .errors import Q8KVError
from .sync import Client, Session, Stream
from .types import AttendResult, SessionInfo

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "AsyncStream",
    "AttendResult",
    "Client",
    "Q8KVError",
    "Session",
    "SessionInfo",
    "Stream",
]
