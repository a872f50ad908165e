"""Which sessions give their pages back when an append finds too few free ones.

The policy:
  1. sessions past their TTL are dropped, whoever owns them;
  2. then, only if ``evict_idle_seconds`` > 0, sessions idle at least that long, the
     appending tenant's own first (least recently used first), other tenants' after them;
     sessions holding no pages are never LRU victims (they free nothing), and nothing is
     evicted unless the eviction frees enough pages for the append. A page shared with
     forks is freed only with its last holder, so the count is of pages really freed.
Sessions pinned by a call in flight are never evicted, by either rule.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import SessionStore


def evict_expired(store: SessionStore) -> int:
    """Drop every unpinned session past its TTL; returns how many."""
    now = time.monotonic()
    expired = [s for s in store.sessions() if not s.pins and s.expired(now)]
    for session in expired:
        store.evict(session, "ttl")
    return len(expired)


def make_room(store: SessionStore, pages: int, tenant: str = "") -> None:
    """Free ``pages`` pages for an append of ``tenant`` by the policy above."""
    evict_expired(store)
    pool = store.pool
    if pool.free_pages >= pages or store.evict_idle_seconds <= 0:
        return
    now = time.monotonic()
    idle = sorted(
        (
            s
            for s in store.sessions()
            if not s.pins and s.pages_held and now - s.last_used_mono >= store.evict_idle_seconds
        ),
        key=lambda s: (s.tenant != tenant, s.last_used_mono),
    )
    victims, freed = [], pool.free_pages
    dropped: Counter[int] = Counter()  # references the victims so far would drop, per page
    for session in idle:
        if freed >= pages:
            break
        victims.append(session)
        for table in session.page_lists.values():
            for page in table:
                dropped[page] += 1
                # A shared page is freed only when its last holder is a victim too.
                freed += int(dropped[page] == pool.refs[page])
    if freed < pages:
        return  # evicting cannot make enough room: keep everyone, the append fails
    for session in victims:
        store.evict(session, "lru")
