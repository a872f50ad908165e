"""Plain Python values the client returns instead of protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from q8kv.v1 import kvcache_pb2 as pb


@dataclass
class SessionInfo:
    """A session as the server reports it (GetSession, ListSessions, TruncateSession)."""

    id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int
    softmax_scale: float
    layer_lengths: list[int]
    cache_bytes: int  # codes + scales of the cached tokens
    reserved_bytes: int  # bytes of the pages the session holds
    ttl_seconds: float  # idle time before expiry; 0 = never
    created_at: float  # unix seconds
    last_used_at: float  # unix seconds

    @classmethod
    def from_proto(cls, info: pb.SessionInfo) -> SessionInfo:
        g = info.geometry
        return cls(
            id=info.session_id,
            num_layers=int(g.num_layers),
            num_heads=int(g.num_heads),
            num_kv_heads=int(g.num_kv_heads),
            head_dim=int(g.head_dim),
            max_len=int(g.max_len),
            softmax_scale=float(info.softmax_scale),
            layer_lengths=[int(n) for n in info.layer_lengths],
            cache_bytes=int(info.cache_bytes),
            reserved_bytes=int(info.reserved_bytes),
            ttl_seconds=float(info.ttl_seconds),
            created_at=float(info.created_at),
            last_used_at=float(info.last_used_at),
        )


class AttendResult(NamedTuple):
    """One item's answer: the attention output ([n, H, D], q's dtype) and the layer's
    length after the append. A tuple, so ``out, length = result`` works."""

    output: np.ndarray
    length: int


class BatchResult(NamedTuple):
    """A packed batch's answer (attend_batch): the outputs [B, n, H, D] in q's dtype and
    each session's layer length after the append, in the order of the call's sessions.
    A tuple, so ``out, lengths = result`` works."""

    output: np.ndarray
    lengths: list[int]


class AppendItem(NamedTuple):
    """One item of ``append_and_attend_batch`` or of a stream message; a plain tuple of the
    first five fields (or all six) works as well.

    ``expected_length`` makes the append conditional: the layer's length the caller
    believes it appends at (for a second item on the same layer: the length after the
    first). If the layer's length differs the server answers ABORTED and applies nothing
    of the call. None: append unconditionally."""

    session: Any  # a session handle or id
    layer: int
    q: np.ndarray  # [n, H, D]
    k: np.ndarray  # [n, KVH, D]
    v: np.ndarray  # [n, KVH, D]
    expected_length: int | None = None
