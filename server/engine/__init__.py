"""The engine owns the device and the cache: an ordered worker, the dynamic batcher, the
append transaction, and every other operation as a named method (``Engine``)."""

from ..cache import Geometry, SessionSnapshot
from .jobs import AppendRequest, EngineObserver, PackedBatch
from .operations import Engine
from .worker import INLINE_MAX_TOKENS

__all__ = [
    "INLINE_MAX_TOKENS",
    "AppendRequest",
    "Engine",
    "EngineObserver",
    "PackedBatch",
    "Geometry",
    "SessionSnapshot",
]
