"""The pool's bookkeeping, checked exactly (tests and debugging; see
``SessionStore.check_invariants``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import SessionStore


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def check_pool(store: SessionStore) -> None:
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


def check_sessions(store: SessionStore, at_rest: bool) -> None:
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
