"""All live sessions and the page pool they draw from: lifecycle (create, fork, get,
delete, truncate), per-tenant quotas, consistent snapshots for readers off the engine's
thread, and the page-level primitives an ``Allocation`` builds on."""

from __future__ import annotations

import array
import heapq
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from q8kv.format import BYTES_PER_BLOCK, QBLOCK, LayerLayout, tokens_per_page

from ..errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted
from . import eviction, invariants, sharing
from .allocation import Allocation
from .pool import PagePool
from .session import (
    MAX_SESSION_ID_LEN,
    Geometry,
    LayerCache,
    Session,
    SessionSnapshot,
    validate_geometry,
    validate_session_id,
)

# A client's ttl_seconds below this is raised to it (a near-zero ttl made a session expire
# between the two halves of one call); above the server's --session-ttl it is clamped.
MIN_TTL_SECONDS = 1.0
MAX_SOFTMAX_SCALE = 1e3

EvictionListener = Callable[[Session, str], None]


class SessionStore:
    """All live sessions and the page pool they draw from.

    Threads: only the engine (its worker, or a call it runs inline on the event loop)
    changes the store, one operation at a time; every change happens under ``lock``, so
    readers on other threads (ListSessions, GetSession) take it to copy a consistent
    snapshot without waiting for the engine.

    TTL: a session's ttl is the client's, clamped to [MIN_TTL_SECONDS, the server's
    default] (0 asks for the default; a default of 0 means "never" and no upper bound).
    Any use by id (append, read, export, truncate) restarts its idle clock. Eviction, when
    an append finds too few free pages: the policy in ``eviction.py``.
    """

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
        self.default_ttl = default_ttl  # also the upper bound of a client's ttl (0: none)
        self.evict_idle_seconds = evict_idle_seconds
        # Keyed by (tenant, id): each tenant has its own namespace of ids, so one tenant
        # can neither see nor block (ALREADY_EXISTS) an id another tenant uses.
        self._sessions: dict[tuple[str, str], Session] = {}
        # Scalars (K and V, every head and dim) of all cached tokens, kept current on every
        # change so the memory gauges cost O(1) to read.
        self.cached_values = 0
        self.listeners: list[EvictionListener] = []  # called as (session, reason) on eviction
        # Copies one page's contents to another (the backend's copy_page; the engine sets
        # it): the copy-on-write of a shared page (sharing.py).
        self.copy_page: Callable[[int, int], None] | None = None
        # References that open allocations still hold to pages their sessions copied away
        # from, by (tenant, page): given back at commit, put back in place on roll back.
        self.deferred: Counter[tuple[str, int]] = Counter()
        # Held by every change and by readers off the engine's thread; reentrant because
        # an eviction runs inside a reservation.
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(self.sessions())

    def sessions(self) -> list[Session]:
        """Every live session, copied (the store may change while the caller iterates)."""
        with self.lock:
            return list(self._sessions.values())

    # -- lifecycle -------------------------------------------------------------------------

    def effective_ttl(self, requested: float) -> float:
        """The ttl a session gets for a client's ``requested`` one (see the class doc)."""
        if requested == 0:
            return self.default_ttl
        ttl = max(requested, MIN_TTL_SECONDS)
        return min(ttl, self.default_ttl) if self.default_ttl > 0 else ttl

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
            math.isfinite(softmax_scale) and 0 < softmax_scale <= MAX_SOFTMAX_SCALE
        ):
            raise InvalidArgument(
                f"softmax_scale: expected a finite value > 0 and <= {MAX_SOFTMAX_SCALE:g}, "
                f"got {softmax_scale}"
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
            ttl_seconds=self.effective_ttl(ttl_seconds),
            lengths=np.zeros(geometry.num_layers, dtype=np.int32),
        )
        with self.lock:
            self._sessions[(tenant, session_id)] = session
            self.tenant_sessions[tenant] += 1
        return session

    def get(self, session_id: str, tenant: str = "", touch: bool = True) -> Session:
        """The session, by id; a lookup is a use (restarts the idle clock) unless
        ``touch`` is False."""
        session = self._sessions.get((tenant, session_id))
        # Another tenant's session answers exactly like one that does not exist.
        if session is None:
            # No id that long exists; echoing it whole could exceed the client's limit on
            # the size of the status message (16 KiB), failing the call with another code.
            shown = session_id if len(session_id) <= MAX_SESSION_ID_LEN else (
                session_id[:40] + f"... ({len(session_id)} characters)"
            )
            raise NotFound(f"session_id: no session {shown!r}")
        if touch:
            session.touch()
        return session

    def find(self, session_ids: Sequence[str], tenant: str = "") -> list[Session | None]:
        """Each of ``session_ids``' sessions, None for one that does not exist; no use."""
        keys = zip([tenant] * len(session_ids), session_ids, strict=True)
        return list(map(self._sessions.get, keys))

    def fork(
        self,
        source: Session,
        session_id: str = "",
        length: int | None = None,
        ttl_seconds: float = 0.0,
    ) -> Session:
        """A new session of the source's tenant sharing the source's pages up to
        ``length`` tokens per layer (None: every layer as it is); see ``sharing.fork``."""
        return sharing.fork(self, source, session_id, length, ttl_seconds)

    def delete(self, session_id: str, tenant: str = "") -> int:
        """Drop a session; returns the bytes of pages that went back to the pool (a page
        still named by another session's table stays)."""
        session = self.get(session_id, tenant, touch=False)
        return self._drop(session)

    def _drop(self, session: Session) -> int:
        if session.pins:
            raise AssertionError(f"session {session.id!r}: dropped while pinned by a call")
        with self.lock:
            freed = 0
            for index, pages in list(session.page_lists.items()):
                freed += self._drop_last_pages(session, index, pages)
            self.cached_values -= session.tokens * self._values_per_token(session)
            session.lengths[:] = 0
            del self._sessions[(session.tenant, session.id)]
            self.tenant_sessions[session.tenant] -= 1
        return freed * self.pool.page_bytes

    def truncate(self, session: Session, length: int) -> None:
        if length < 0:
            raise InvalidArgument(f"length: expected >= 0, got {length}")
        keep = -(-length // session.layout.tokens_per_page)
        with self.lock:
            for index in np.flatnonzero(session.lengths > length).tolist():
                pages = session.page_lists.get(index, [])
                self._drop_last_pages(session, index, pages[keep:])
                self._set_length(session, index, length)
        session.touch()

    # -- snapshots for readers off the engine's thread -------------------------------------

    def snapshot(self, session: Session) -> SessionSnapshot:
        with self.lock:
            return SessionSnapshot(
                id=session.id,
                tenant=session.tenant,
                geometry=session.geometry,
                softmax_scale=session.softmax_scale,
                ttl_seconds=session.ttl_seconds,
                layer_lengths=session.lengths.tolist(),
                tokens=session.tokens,
                pages_held=session.pages_held,
                created_at=session.created_at,
                last_used_at=session.last_used_at,
            )

    def read(self, session_id: str, tenant: str = "") -> SessionSnapshot:
        """GetSession: a snapshot of one session, counted as a use."""
        with self.lock:
            return self.snapshot(self.get(session_id, tenant))

    def list_page(
        self, tenant: str, after: str, size: int
    ) -> tuple[list[SessionSnapshot], bool]:
        """ListSessions: snapshots of the tenant's first ``size`` sessions (by id) after
        ``after``, and whether more follow. Not a use: listing keeps nothing alive."""
        with self.lock:
            ids = heapq.nsmallest(
                size + 1, (i for (t, i) in self._sessions if t == tenant and i > after)
            )
            chosen = [self.snapshot(self._sessions[(tenant, i)]) for i in ids[:size]]
        return chosen, len(ids) > size

    # -- appends ---------------------------------------------------------------------------

    def begin(self) -> Allocation:
        """An allocation for one call (see ``Allocation``): the only way a call grows
        sessions, so a failed call undoes exactly what it did."""
        return Allocation(self)

    def reserve(self, session: Session, layer: LayerCache, new_length: int) -> list[int]:
        """Make the layer's page table cover ``new_length`` tokens at once (no undo); for
        building a whole session that is dropped whole on failure (import, tests). Calls
        use ``begin()`` instead. Returns the pages added."""
        with self.lock:
            return self._take_pages(session, layer.index, new_length)

    def set_length(self, session: Session, layer: LayerCache, length: int) -> None:
        """Set a layer's length within its pages (with ``reserve``, for whole sessions)."""
        with self.lock:
            self._set_length(session, layer.index, length)

    def _values_per_token(self, session: Session) -> int:
        return 2 * session.geometry.num_kv_heads * session.geometry.head_dim

    def _set_length(self, session: Session, index: int, length: int) -> None:
        """The one place a layer's length changes, so the byte counters stay exact."""
        old = int(session.lengths[index])
        self.cached_values += (length - old) * self._values_per_token(session)
        session.lengths[index] = length

    def _advance_lengths(self, moved: list[tuple[Session, int]], index: int, tokens: int) -> None:
        """``_set_length`` of many layers at once: layer ``index`` of each session goes from
        the given length to ``tokens`` more (within its pages), the counter once."""
        values = 0
        for session, old in moved:
            session.lengths[index] = old + tokens
            values += session.geometry.num_kv_heads * session.geometry.head_dim
        self.cached_values += 2 * tokens * values  # _values_per_token, not called B times

    def _check_max_len(self, session: Session, index: int, new_length: int) -> None:
        if new_length > session.geometry.max_len:
            raise OutOfRange(
                f"k.shape[0]: appending to length {int(session.lengths[index])} would reach "
                f"{new_length}, past max_len {session.geometry.max_len} of session "
                f"{session.id!r}"
            )

    def _take_pages(self, session: Session, index: int, new_length: int) -> list[int]:
        self._check_max_len(session, index, new_length)
        pages = session.page_lists.get(index, [])
        needed = -(-new_length // session.layout.tokens_per_page) - len(pages)
        if needed <= 0:
            return []
        added = self._take(session, needed)
        session.page_lists.setdefault(index, array.array("i")).extend(added)
        session.pages_held += needed
        return added

    def _take(self, session: Session, needed: int) -> list[int]:
        """``needed`` free pages charged to the session's tenant (evicting by the policy
        when the pool is short; the session itself is never the victim)."""
        held = self.tenant_pages[session.tenant]
        if 0 < self.tenant_max_pages < held + needed:
            raise ResourceExhausted(
                f"tenant memory: needed {needed} more pages of {self.pool.page_bytes} bytes, "
                f"the tenant holds {held} of its {self.tenant_max_pages}"
            )
        if needed > self.pool.free_pages:
            session.pins += 1  # never its own victim, even outside a call
            try:
                self.make_room(needed, session.tenant)
            finally:
                session.pins -= 1
        added = self.pool.take(needed)
        self.tenant_pages[session.tenant] += needed
        return added

    def _release(self, tenant: str, pages) -> int:
        """Drop one reference to each of ``pages`` (of ``tenant``); returns how many went
        back to the pool. A page's tenant is charged from its first reference to its last."""
        freed = len(self.pool.give_back(pages))
        self.tenant_pages[tenant] -= freed
        return freed

    def _drop_last_pages(self, session: Session, index: int, pages) -> int:
        """Drop the references of ``pages``, which must be the last ones of the layer's page
        table; returns how many pages went back to the pool."""
        if not len(pages):
            return 0
        table = session.page_lists.get(index, array.array("i"))
        tail = table[len(table) - len(pages) :]  # a copy: the table is cut next
        if tail != (pages if isinstance(pages, array.array) else array.array("i", pages)):
            raise AssertionError(
                f"session {session.id!r} layer {index}: giving back pages it does not end with"
            )
        del table[len(table) - len(tail) :]
        if not table:
            session.page_lists.pop(index, None)
        session.pages_held -= len(tail)
        return self._release(session.tenant, tail)

    # -- eviction (the policy: eviction.py) -------------------------------------------------

    def evict_expired(self) -> int:
        return eviction.evict_expired(self)

    def make_room(self, pages: int, tenant: str = "") -> None:
        eviction.make_room(self, pages, tenant)

    def evict(self, session: Session, reason: str) -> None:
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

    def check_invariants(self, at_rest: bool = True) -> None:
        """Raise AssertionError unless the bookkeeping is exact: every page is free or has
        as many references as session-layers naming it (plus those open allocations keep,
        see ``deferred``), all of one tenant; used + free = capacity; each layer holds
        exactly ceil(length / T) pages; per-session, per-tenant (distinct pages) and value
        counters match the page tables and lengths. ``at_rest``: no call is in flight, so
        no session is pinned and no reference is deferred."""
        with self.lock:
            invariants.check_pool(self)
            invariants.check_sessions(self, at_rest)
