"""The pool's bookkeeping, checked exactly (tests and debugging; see
``SessionStore.check_invariants``)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .store import SessionStore


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def _holders(store: SessionStore) -> tuple[Counter, dict[int, str]]:
    """References to each page (session-layers naming it, plus those open allocations
    keep) and each referenced page's tenant."""
    refs: Counter[int] = Counter()
    tenant_of: dict[int, str] = {}
    keyed = [
        (s.tenant, p, 1) for s in store._sessions.values() for t in s.page_lists.values()
        for p in t
    ] + [(tenant, p, n) for (tenant, p), n in store.deferred.items()]
    for tenant, page, count in keyed:
        _require(count > 0, f"pool: page {page}: {count} deferred references")
        refs[page] += count
        _require(
            tenant_of.setdefault(page, tenant) == tenant,
            f"pool: page {page} is held by two tenants ({tenant_of[page]!r}, {tenant!r})",
        )
    return refs, tenant_of


def check_pool(store: SessionStore) -> None:
    pool = store.pool
    free = pool._free
    for s in store._sessions.values():
        named = [p for t in s.page_lists.values() for p in t]
        _require(
            len(set(named)) == len(named), f"session {s.id!r}: a page in two of its layers"
        )
    refs, _ = _holders(store)
    _require(len(set(free)) == len(free), "pool: a page is on the free list twice")
    _require(not set(free) & set(refs), "pool: a page is both free and held")
    _require(
        sorted(free + list(refs)) == list(range(pool.num_pages)),
        f"pool: {len(free)} free + {len(refs)} held != {pool.num_pages} pages",
    )
    want = np.zeros(pool.num_pages, dtype=np.int64)
    for page, count in refs.items():
        want[page] = count
    wrong = np.flatnonzero(pool.refs != want)
    _require(
        not wrong.size,
        f"pool: page {wrong[:1].tolist()} has {pool.refs[wrong[:1]].tolist()} references, "
        f"its holders {want[wrong[:1]].tolist()}",
    )
    _require(pool.references == int(want.sum()), "pool: the reference total drifted")
    _require(pool.used_pages + pool.free_pages == pool.num_pages, "pool: used + free")


def check_sessions(store: SessionStore, at_rest: bool) -> None:
    _require(not (at_rest and store.deferred), f"deferred references at rest: {store.deferred}")
    values, tenant_sessions = 0, Counter()
    # A tenant is charged for each page it references once, however many tables name it.
    tenant_pages = Counter(_holders(store)[1].values())
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
        tenant_sessions[tenant] += 1
    _require(store.cached_values == values, f"cached_values {store.cached_values} != {values}")
    for name, counted, counter in (
        ("tenant_pages", tenant_pages, store.tenant_pages),
        ("tenant_sessions", tenant_sessions, store.tenant_sessions),
    ):
        kept = {k: v for k, v in counter.items() if v}  # a negative count must show
        want = {k: v for k, v in counted.items() if v}
        _require(kept == want, f"{name}: {kept} != the sessions' {want}")
