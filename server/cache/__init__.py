"""The cache's bookkeeping: the page pool (ids only), sessions and their page tables,
per-call allocations, quotas and eviction. The page contents live in the backend."""

from .allocation import Allocation
from .pool import PagePool
from .session import (
    MAX_SESSION_ID_LEN,
    SESSION_ID_CHARS,
    Geometry,
    LayerCache,
    Session,
    SessionSnapshot,
    touch_all,
    validate_geometry,
    validate_session_id,
)
from .store import MAX_SOFTMAX_SCALE, MIN_TTL_SECONDS, EvictionListener, SessionStore

__all__ = [
    "MAX_SESSION_ID_LEN",
    "MAX_SOFTMAX_SCALE",
    "MIN_TTL_SECONDS",
    "SESSION_ID_CHARS",
    "Allocation",
    "EvictionListener",
    "Geometry",
    "LayerCache",
    "PagePool",
    "Session",
    "SessionSnapshot",
    "SessionStore",
    "touch_all",
    "validate_geometry",
    "validate_session_id",
]
