"""Sessions, their page tables, and the page pool's bookkeeping (not the page contents:
those live in the backend). Only the engine's worker thread calls into this module, so it
holds no locks.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .backends.base import BYTES_PER_BLOCK, QBLOCK, LayerLayout, page_bytes, tokens_per_page
from .errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted

SESSION_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_SESSION_ID_LEN = 128


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_len: int

    def token_bytes(self) -> int:
        """Q8 bytes (codes + scales, K and V) of one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim // QBLOCK * BYTES_PER_BLOCK


class PagePool:
    """Which pages are free. Pages are handed out whole and returned whole."""

    def __init__(self, num_pages: int, page_code_bytes: int) -> None:
        self.num_pages = num_pages
        self.page_code_bytes = page_code_bytes
        self.page_bytes = page_bytes(page_code_bytes)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def take(self, count: int) -> list[int]:
        if count > len(self._free):
            raise ResourceExhausted(
                f"memory budget: needed {count} free pages of {self.page_bytes} bytes, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        return taken

    def give_back(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


@dataclass
class LayerCache:
    pages: list[int] = field(default_factory=list)
    length: int = 0

    def page_table(self) -> np.ndarray:
        return np.asarray(self.pages, dtype=np.int32)


@dataclass
class Session:
    id: str
    tenant: str
    geometry: Geometry
    layout: LayerLayout
    softmax_scale: float
    ttl_seconds: float
    layers: list[LayerCache]
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    last_used_mono: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used_at = time.time()
        self.last_used_mono = time.monotonic()

    def expired(self, now_mono: float) -> bool:
        return self.ttl_seconds > 0 and now_mono - self.last_used_mono > self.ttl_seconds

    @property
    def pages_held(self) -> int:
        return sum(len(layer.pages) for layer in self.layers)

    @property
    def tokens(self) -> int:
        return sum(layer.length for layer in self.layers)

    def layer(self, index: int) -> LayerCache:
        if not 0 <= index < len(self.layers):
            raise InvalidArgument(
                f"layer: expected 0..{len(self.layers) - 1} for session {self.id!r}, got {index}"
            )
        return self.layers[index]


def validate_geometry(g: Geometry, page_code_bytes: int, max_head_dim: int = 1024) -> None:
    checks = (
        ("num_layers", g.num_layers, 1, 4096),
        ("num_heads", g.num_heads, 1, 1024),
        ("num_kv_heads", g.num_kv_heads, 1, 1024),
        ("head_dim", g.head_dim, QBLOCK, max_head_dim),
        ("max_len", g.max_len, 1, 1 << 24),
    )
    for name, value, low, high in checks:
        if not low <= value <= high:
            raise InvalidArgument(f"geometry.{name}: expected {low}..{high}, got {value}")
    if g.head_dim % QBLOCK:
        raise InvalidArgument(
            f"geometry.head_dim: expected a multiple of {QBLOCK}, got {g.head_dim}"
        )
    if g.num_heads % g.num_kv_heads:
        raise InvalidArgument(
            f"geometry.num_heads: expected a multiple of num_kv_heads ({g.num_kv_heads}), "
            f"got {g.num_heads}"
        )
    if tokens_per_page(page_code_bytes, g.num_kv_heads, g.head_dim) == 0:
        raise InvalidArgument(
            f"geometry: 2 * num_kv_heads * head_dim must fit a page of {page_code_bytes} bytes, "
            f"got 2 * {g.num_kv_heads} * {g.head_dim} = {2 * g.num_kv_heads * g.head_dim}"
        )


def validate_session_id(session_id: str) -> None:
    if not 1 <= len(session_id) <= MAX_SESSION_ID_LEN or not set(session_id) <= SESSION_ID_CHARS:
        shown = session_id if len(session_id) <= 40 else session_id[:40] + "..."
        raise InvalidArgument(
            f"session_id: expected 1-{MAX_SESSION_ID_LEN} characters of [A-Za-z0-9._:-], "
            f"got {shown!r} ({len(session_id)} characters)"
        )


EvictionListener = Callable[[Session, str], None]


class SessionStore:
    """All live sessions and the page pool they draw from."""

    def __init__(
        self,
        pool: PagePool,
        max_sessions: int,
        default_ttl: float = 0.0,
        evict_idle_seconds: float = 0.0,
        tenant_max_sessions: int = 0,
        tenant_max_pages: int = 0,
        max_head_dim: int = 1024,
    ) -> None:
        self.pool = pool
        self.max_head_dim = max_head_dim  # what the backend's kernels take
        self.tenant_max_sessions = tenant_max_sessions  # 0: no limit
        self.tenant_max_pages = tenant_max_pages  # 0: no limit
        self.tenant_sessions: Counter[str] = Counter()
        self.tenant_pages: Counter[str] = Counter()
        self.max_sessions = max_sessions
        self.default_ttl = default_ttl
        self.evict_idle_seconds = evict_idle_seconds
        # Keyed by (tenant, id): each tenant has its own namespace of ids, so one tenant
        # can neither see nor block (ALREADY_EXISTS) an id another tenant uses.
        self._sessions: dict[tuple[str, str], Session] = {}
        # Scalars (K and V, every head and dim) of all cached tokens, kept current on every
        # change so the memory gauges cost O(1) to read.
        self.cached_values = 0
        self.listeners: list[EvictionListener] = []  # called as (session, reason) on eviction

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    # -- lifecycle -------------------------------------------------------------------------

    def create(
        self,
        geometry: Geometry,
        session_id: str = "",
        ttl_seconds: float = 0.0,
        softmax_scale: float | None = None,
        tenant: str = "",
    ) -> Session:
        validate_geometry(geometry, self.pool.page_code_bytes, self.max_head_dim)
        if not (ttl_seconds >= 0 and math.isfinite(ttl_seconds)):
            raise InvalidArgument(f"ttl_seconds: expected a finite value >= 0, got {ttl_seconds}")
        if softmax_scale is not None and not (
            math.isfinite(softmax_scale) and softmax_scale > 0
        ):
            raise InvalidArgument(
                f"softmax_scale: expected a finite value > 0, got {softmax_scale}"
            )
        if session_id:
            validate_session_id(session_id)
            if (tenant, session_id) in self._sessions:
                raise AlreadyExists(f"session_id: {session_id!r} already exists")
        else:
            session_id = str(uuid.uuid4())
        if len(self._sessions) >= self.max_sessions:
            self.evict_expired()
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"sessions: the server holds its maximum of {self.max_sessions} sessions"
            )
        if 0 < self.tenant_max_sessions <= self.tenant_sessions[tenant]:
            raise ResourceExhausted(
                f"sessions: this tenant holds its maximum of {self.tenant_max_sessions} sessions"
            )
        layout = LayerLayout(
            num_heads=geometry.num_heads,
            num_kv_heads=geometry.num_kv_heads,
            head_dim=geometry.head_dim,
            tokens_per_page=tokens_per_page(
                self.pool.page_code_bytes, geometry.num_kv_heads, geometry.head_dim
            ),
        )
        session = Session(
            id=session_id,
            tenant=tenant,
            geometry=geometry,
            layout=layout,
            softmax_scale=(
                float(np.float32(softmax_scale))
                if softmax_scale is not None
                else float(np.float32(1.0 / math.sqrt(geometry.head_dim)))
            ),
            ttl_seconds=ttl_seconds or self.default_ttl,
            layers=[LayerCache() for _ in range(geometry.num_layers)],
        )
        self._sessions[(tenant, session_id)] = session
        self.tenant_sessions[tenant] += 1
        return session

    def get(self, session_id: str, tenant: str = "") -> Session:
        session = self._sessions.get((tenant, session_id))
        # Another tenant's session answers exactly like one that does not exist.
        if session is None:
            # No id that long exists; echoing it whole could exceed the client's limit on
            # the size of the status message (16 KiB), failing the call with another code.
            shown = session_id if len(session_id) <= MAX_SESSION_ID_LEN else (
                session_id[:40] + f"... ({len(session_id)} characters)"
            )
            raise NotFound(f"session_id: no session {shown!r}")
        return session

    def delete(self, session_id: str, tenant: str = "") -> int:
        """Drop a session; returns the bytes of pages it gave back."""
        session = self.get(session_id, tenant)
        return self._drop(session)

    def _drop(self, session: Session) -> int:
        freed = 0
        for layer in session.layers:
            freed += len(layer.pages)
            self._give_back(session, layer.pages)
            self.set_length(session, layer, 0)
            layer.pages = []
        del self._sessions[(session.tenant, session.id)]
        self.tenant_sessions[session.tenant] -= 1
        return freed * self.pool.page_bytes

    def truncate(self, session: Session, length: int) -> None:
        if length < 0:
            raise InvalidArgument(f"length: expected >= 0, got {length}")
        tpp = session.layout.tokens_per_page
        for layer in session.layers:
            if layer.length > length:
                keep = -(-length // tpp)
                self._give_back(session, layer.pages[keep:])
                del layer.pages[keep:]
                self.set_length(session, layer, length)
        session.touch()

    # -- appends ---------------------------------------------------------------------------

    def set_length(self, session: Session, layer: LayerCache, length: int) -> None:
        """The one place a layer's length changes, so the byte counters stay exact."""
        g = session.geometry
        self.cached_values += (length - layer.length) * 2 * g.num_kv_heads * g.head_dim
        layer.length = length

    def reserve(self, session: Session, layer: LayerCache, new_length: int) -> list[int]:
        """Make the layer's page table cover ``new_length`` tokens; returns the pages added
        (give them back with ``unreserve`` if the append does not happen)."""
        if new_length > session.geometry.max_len:
            raise OutOfRange(
                f"k.shape[0]: appending to length {layer.length} would reach {new_length}, "
                f"past max_len {session.geometry.max_len} of session {session.id!r}"
            )
        needed = -(-new_length // session.layout.tokens_per_page) - len(layer.pages)
        if needed <= 0:
            return []
        held = self.tenant_pages[session.tenant]
        if 0 < self.tenant_max_pages < held + needed:
            raise ResourceExhausted(
                f"tenant memory: needed {needed} more pages of {self.pool.page_bytes} bytes, "
                f"the tenant holds {held} of its {self.tenant_max_pages}"
            )
        if needed > self.pool.free_pages:
            self.make_room(needed, keep=session)
        added = self.pool.take(needed)
        layer.pages.extend(added)
        self.tenant_pages[session.tenant] += needed
        return added

    def unreserve(self, session: Session, layer: LayerCache, added: list[int]) -> None:
        if added:
            del layer.pages[len(layer.pages) - len(added) :]
            self._give_back(session, added)

    def _give_back(self, session: Session, pages: list[int]) -> None:
        self.pool.give_back(pages)
        self.tenant_pages[session.tenant] -= len(pages)

    # -- eviction --------------------------------------------------------------------------

    def evict_expired(self) -> int:
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if s.expired(now)]
        for session in expired:
            self._evict(session, "ttl")
        return len(expired)

    def make_room(self, pages: int, keep: Session | None = None) -> None:
        """Free ``pages`` pages by evicting expired sessions, then (if enabled) the least
        recently used ones idle for at least ``evict_idle_seconds``."""
        self.evict_expired()
        if self.pool.free_pages >= pages or self.evict_idle_seconds <= 0:
            return
        now = time.monotonic()
        idle = sorted(
            (
                s
                for s in self._sessions.values()
                if s is not keep and now - s.last_used_mono >= self.evict_idle_seconds
            ),
            key=lambda s: s.last_used_mono,
        )
        for session in idle:
            if self.pool.free_pages >= pages:
                break
            self._evict(session, "lru")

    def _evict(self, session: Session, reason: str) -> None:
        self._drop(session)
        for listener in self.listeners:
            listener(session, reason)

    # -- accounting ------------------------------------------------------------------------

    def cache_bytes(self) -> int:
        """Q8 bytes of every cached token (codes + scales), page waste not included."""
        return self.cached_values // QBLOCK * BYTES_PER_BLOCK

    def fp32_equivalent_bytes(self) -> int:
        return self.cached_values * 4

    def fp16_equivalent_bytes(self) -> int:
        return self.cached_values * 2
