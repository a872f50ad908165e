"""A session's metadata: geometry, layout, per-layer lengths and page tables, and the
validation of what a client may ask for. Kept small: an idle layer costs 4 bytes."""

from __future__ import annotations

import array
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from q8kv.format import MAX_LEN, QBLOCK, Geometry, LayerLayout, tokens_per_page

from ..errors import InvalidArgument

SESSION_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
MAX_SESSION_ID_LEN = 128


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
        return np.array(self.session.page_lists.get(self.index, ()), dtype=np.int32)

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


# The live LayerLayouts, each once; weak, so odd geometries leave nothing behind.
_LAYOUTS: weakref.WeakValueDictionary[LayerLayout, LayerLayout] = weakref.WeakValueDictionary()


@dataclass(eq=False)
class Session:
    """One session's metadata, kept small (a client must not hold host memory it is not
    charged for): the layer lengths are one int32 array and page lists exist only for
    layers that hold pages, so an empty 4,096-layer session costs ~17 KiB, not one object
    per layer. A page may be named by several sessions' tables (a fork shares its
    source's pages; the pool counts the references); ``pages_held`` counts the pages this
    session's tables name, shared ones included.

    ``pins`` counts the calls in flight that reference the session: a pinned session is
    never evicted (TTL or LRU), so a batch never loses a session it already prepared."""

    id: str
    tenant: str
    geometry: Geometry
    layout: LayerLayout
    softmax_scale: float
    ttl_seconds: float
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    # int32 page ids (array.array: a fork copies and counts them with memcpy speed).
    page_lists: dict[int, array.array] = field(default_factory=dict)
    pages_held: int = 0
    pins: int = 0
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    last_used_mono: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # Equal layouts as one object: a packed call checks its sessions' by identity.
        self.layout = _LAYOUTS.setdefault(self.layout, self.layout)

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


def touch_all(sessions: Iterable[Session]) -> None:
    """``touch`` each of ``sessions``, reading the clocks once (a packed call's B lookups
    count as one use each)."""
    wall, mono = time.time(), time.monotonic()
    for session in sessions:
        session.last_used_at, session.last_used_mono = wall, mono


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
        ("max_len", g.max_len, 1, MAX_LEN),
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
