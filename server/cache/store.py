"""Sessions, their page tables, and the page pool's bookkeeping (not the page contents:
those live in the backend). Only the engine changes the store, one operation at a time;
readers on other threads take ``SessionStore.lock`` (see ``SessionStore``).
"""

from __future__ import annotations

import heapq
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .backends.base import BYTES_PER_BLOCK, QBLOCK, LayerLayout, page_bytes, tokens_per_page
from .errors import AlreadyExists, InvalidArgument, NotFound, OutOfRange, ResourceExhausted

SESSION_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_SESSION_ID_LEN = 128
# A client's ttl_seconds below this is raised to it (a near-zero ttl made a session expire
# between the two halves of one call); above the server's --session-ttl it is clamped.
MIN_TTL_SECONDS = 1.0
MAX_SOFTMAX_SCALE = 1e3


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


class LayerCache:
    """A view of one layer of a session: its length and page table. Views are made on
    demand (a session stores its layers compactly, see ``Session``); two views of the same
    layer compare equal."""

    __slots__ = ("session", "index")

    def __init__(self, session: Session, index: int) -> None:
        self.session = session
        self.index = index

    @property
    def length(self) -> int:
        return int(self.session.lengths[self.index])

    @property
    def pages(self) -> list[int]:
        """A copy: only the store changes a page table."""
        return list(self.session.page_lists.get(self.index, ()))

    def page_table(self) -> np.ndarray:
        return np.asarray(self.session.page_lists.get(self.index, ()), dtype=np.int32)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, LayerCache)
            and other.session is self.session
            and other.index == self.index
        )

    def __hash__(self) -> int:
        return hash((id(self.session), self.index))


class _Layers(Sequence[LayerCache]):
    """``session.layers``: views made on demand, so an idle layer costs 4 bytes."""

    __slots__ = ("_session",)

    def __init__(self, session: Session) -> None:
        self._session = session

    def __len__(self) -> int:
        return len(self._session.lengths)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return LayerCache(self._session, index)


@dataclass(eq=False)
class Session:
    """One session's metadata, kept small (item 13 of the hostile-tenant review): the layer
    lengths are one int32 array and page lists exist only for layers that hold pages, so
    an empty 4,096-layer session costs ~17 KiB, not one object per layer.

    ``pins`` counts the calls in flight that reference the session: a pinned session is
    never evicted (TTL or LRU), so a batch never loses a session it already prepared."""

    id: str
    tenant: str
    geometry: Geometry
    layout: LayerLayout
    softmax_scale: float
    ttl_seconds: float
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    page_lists: dict[int, list[int]] = field(default_factory=dict)
    pages_held: int = 0
    pins: int = 0
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    last_used_mono: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_used_at = time.time()
        self.last_used_mono = time.monotonic()

    def expired(self, now_mono: float) -> bool:
        return self.ttl_seconds > 0 and now_mono - self.last_used_mono > self.ttl_seconds

    @property
    def layers(self) -> _Layers:
        return _Layers(self)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def layer(self, index: int) -> LayerCache:
        if not 0 <= index < len(self.lengths):
            raise InvalidArgument(
                f"layer: expected 0..{len(self.lengths) - 1} for session {self.id!r}, got {index}"
            )
        return LayerCache(self, index)


@dataclass(frozen=True)
class SessionSnapshot:
    """A consistent copy of a session's metadata, for readers off the engine worker."""

    id: str
    tenant: str
    geometry: Geometry
    softmax_scale: float
    ttl_seconds: float
    layer_lengths: list[int]
    tokens: int
    pages_held: int
    created_at: float
    last_used_at: float


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


class Allocation:
    """What one call changes in the store, kept or undone as a whole.

    Made by ``SessionStore.begin()``. Every session the call looks up is pinned (never
    evicted, by TTL or LRU) until the allocation ends, so nothing the call prepared can be
    taken from under it. ``grow`` takes pages and advances a layer's length; the allocation
    then ends exactly once: ``commit()`` keeps every change, ``roll_back()`` undoes them in
    reverse order. Ending it twice is a bug and raises AssertionError. Used as a context
    manager it commits on success and rolls back on an exception.
    """

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._pinned: dict[int, Session] = {}  # by id(): each session pinned once
        # (session, layer, length before, pages added), in the order they happened.
        self._steps: list[tuple[Session, int, int, list[int]]] = []
        self.state = "open"

    def __enter__(self) -> Allocation:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        """As a context: commit on success, roll back on an exception (if still open)."""
        if self.state != "open":
            return
        if exc_type is None:
            self.commit()
        else:
            self.roll_back()

    def pin(self, session: Session) -> None:
        """Keep ``session`` from eviction until the allocation ends (idempotent)."""
        self._require_open("pin")
        if id(session) not in self._pinned:
            session.pins += 1
            self._pinned[id(session)] = session

    def grow(self, session: Session, index: int, new_length: int) -> None:
        """Cover ``new_length`` tokens of layer ``index`` and make that its length. On an
        error (past max_len, no memory) nothing of this step is changed."""
        self._require_open("grow")
        self.pin(session)
        store = self._store
        with store.lock:
            old_length = int(session.lengths[index])
            added = store._take_pages(session, index, new_length)
            store._set_length(session, index, new_length)
        self._steps.append((session, index, old_length, added))

    def commit(self) -> None:
        self._require_open("commit")
        self._end("committed")

    def roll_back(self) -> None:
        self._require_open("roll_back")
        store = self._store
        with store.lock:
            for session, index, old_length, added in reversed(self._steps):
                store._set_length(session, index, old_length)
                store._drop_last_pages(session, index, added)
        self._end("rolled back")

    def _end(self, state: str) -> None:
        self.state = state
        for session in self._pinned.values():
            session.pins -= 1
        self._pinned.clear()

    def _require_open(self, what: str) -> None:
        if self.state != "open":
            raise AssertionError(f"allocation: {what} after it was {self.state}")


class SessionStore:
    """All live sessions and the page pool they draw from.

    Threads: only the engine (its worker, or a call it runs inline on the event loop)
    changes the store, one operation at a time; every change happens under ``lock``, so
    readers on other threads (ListSessions, GetSession) take it to copy a consistent
    snapshot without waiting for the engine.

    TTL: a session's ttl is the client's, clamped to [MIN_TTL_SECONDS, the server's
    default] (0 asks for the default; a default of 0 means "never" and no upper bound).
    Any use by id (append, read, export, truncate) restarts its idle clock.

    Eviction policy, when an append finds too few free pages:
      1. sessions past their TTL are dropped, whoever owns them;
      2. then, only if ``evict_idle_seconds`` > 0, sessions idle at least that long, the
         appending tenant's own first (least recently used first), other tenants' after
         them; sessions holding no pages are never LRU victims (they free nothing), and
         nothing is evicted unless the eviction frees enough pages for the append.
    Sessions pinned by a call in flight are never evicted, by either rule.
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
        # Held by every change and by readers off the engine's thread; reentrant because
        # an eviction runs inside a reservation.
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        with self.lock:
            return iter(list(self._sessions.values()))

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

    def delete(self, session_id: str, tenant: str = "") -> int:
        """Drop a session; returns the bytes of pages it gave back."""
        session = self.get(session_id, tenant, touch=False)
        return self._drop(session)

    def _drop(self, session: Session) -> int:
        if session.pins:
            raise AssertionError(f"session {session.id!r}: dropped while pinned by a call")
        with self.lock:
            freed = session.pages_held
            for index, pages in list(session.page_lists.items()):
                self._drop_last_pages(session, index, pages)
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

    def _take_pages(self, session: Session, index: int, new_length: int) -> list[int]:
        length = int(session.lengths[index])
        if new_length > session.geometry.max_len:
            raise OutOfRange(
                f"k.shape[0]: appending to length {length} would reach {new_length}, "
                f"past max_len {session.geometry.max_len} of session {session.id!r}"
            )
        pages = session.page_lists.get(index, [])
        needed = -(-new_length // session.layout.tokens_per_page) - len(pages)
        if needed <= 0:
            return []
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
        session.page_lists.setdefault(index, []).extend(added)
        session.pages_held += needed
        self.tenant_pages[session.tenant] += needed
        return added

    def _drop_last_pages(self, session: Session, index: int, pages: list[int]) -> None:
        """Give back ``pages``, which must be the last ones of the layer's page table."""
        if not pages:
            return
        table = session.page_lists.get(index, [])
        if table[len(table) - len(pages) :] != list(pages):
            raise AssertionError(
                f"session {session.id!r} layer {index}: giving back pages it does not end with"
            )
        pages = list(pages)  # may alias the table, which is cut next
        del table[len(table) - len(pages) :]
        if not table:
            session.page_lists.pop(index, None)
        session.pages_held -= len(pages)
        self.pool.give_back(pages)
        self.tenant_pages[session.tenant] -= len(pages)

    # -- eviction --------------------------------------------------------------------------

    def evict_expired(self) -> int:
        now = time.monotonic()
        expired = [s for s in self._sessions.values() if not s.pins and s.expired(now)]
        for session in expired:
            self._evict(session, "ttl")
        return len(expired)

    def make_room(self, pages: int, tenant: str = "") -> None:
        """Free ``pages`` pages by the eviction policy of the class docstring."""
        self.evict_expired()
        if self.pool.free_pages >= pages or self.evict_idle_seconds <= 0:
            return
        now = time.monotonic()
        idle = sorted(
            (
                s
                for s in self._sessions.values()
                if not s.pins
                and s.pages_held
                and now - s.last_used_mono >= self.evict_idle_seconds
            ),
            key=lambda s: (s.tenant != tenant, s.last_used_mono),
        )
        victims, freed = [], self.pool.free_pages
        for session in idle:
            if freed >= pages:
                break
            victims.append(session)
            freed += session.pages_held
        if freed < pages:
            return  # evicting cannot make enough room: keep everyone, the append fails
        for session in victims:
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

    def check_invariants(self, at_rest: bool = True) -> None:
        """Raise AssertionError unless the bookkeeping is exact: every page is free or held
        by exactly one session-layer; used + free = capacity; each layer holds exactly
        ceil(length / T) pages; per-session, per-tenant and value counters match the page
        tables and lengths. ``at_rest``: no call is in flight, so no session is pinned."""
        with self.lock:
            _check_pool(self)
            _check_sessions(self, at_rest)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _check_pool(store: SessionStore) -> None:
    pool = store.pool
    free = pool._free
    held = [p for s in store._sessions.values() for t in s.page_lists.values() for p in t]
    _require(len(set(free)) == len(free), "pool: a page is on the free list twice")
    _require(len(set(held)) == len(held), "pool: a page is held by two session-layers")
    _require(not set(free) & set(held), "pool: a page is both free and held")
    _require(
        sorted(free + held) == list(range(pool.num_pages)),
        f"pool: {len(free)} free + {len(held)} held != {pool.num_pages} pages",
    )
    _require(pool.used_pages + pool.free_pages == pool.num_pages, "pool: used + free")


def _check_sessions(store: SessionStore, at_rest: bool) -> None:
    values, tenant_pages, tenant_sessions = 0, Counter(), Counter()
    for (tenant, sid), s in store._sessions.items():
        _require((s.tenant, s.id) == (tenant, sid), f"session {sid!r}: filed under another key")
        _require(not (at_rest and s.pins), f"session {sid!r}: pinned ({s.pins}) at rest")
        _require(s.pins >= 0, f"session {sid!r}: negative pin count")
        tpp = s.layout.tokens_per_page
        lengths = s.lengths
        _require(
            bool((lengths >= 0).all() and (lengths <= s.geometry.max_len).all()),
            f"session {sid!r}: a length outside 0..max_len",
        )
        for index in range(len(lengths)):
            table = s.page_lists.get(index)
            _require(table is None or len(table) > 0, f"session {sid!r}: empty page list")
            want = -(-int(lengths[index]) // tpp)
            _require(
                len(table or ()) == want,
                f"session {sid!r} layer {index}: {len(table or ())} pages for "
                f"length {int(lengths[index])} (want {want})",
            )
        _require(
            s.pages_held == sum(len(t) for t in s.page_lists.values()),
            f"session {sid!r}: pages_held {s.pages_held} disagrees with its page tables",
        )
        values += s.tokens * store._values_per_token(s)
        tenant_pages[tenant] += s.pages_held
        tenant_sessions[tenant] += 1
    _require(store.cached_values == values, f"cached_values {store.cached_values} != {values}")
    for name, counted, counter in (
        ("tenant_pages", tenant_pages, store.tenant_pages),
        ("tenant_sessions", tenant_sessions, store.tenant_sessions),
    ):
        kept = {k: v for k, v in counter.items() if v}  # a negative count must show
        want = {k: v for k, v in counted.items() if v}
        _require(kept == want, f"{name}: {kept} != the sessions' {want}")
