"""Shared pages: forks, and the copy-on-write of a shared page before a write into it.

A fork names the source's pages in its own page tables and adds a reference to each; no
page is taken and nothing is copied. A page is written only by a session whose table is
its only reference: before an append writes into a layer's last, partly filled page while
other references to it exist, the appending session gets a private copy of that page
(``unshare_tail``). Full pages are never written again, so they are never copied.

The copy happens inside the append's ``Allocation``, all or nothing: the session's
reference to the original page is kept (``SessionStore.deferred``) until the allocation
commits, so another writer sees the page still shared and never writes into it in place,
and a roll back can put the original back into the table, exactly as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidArgument

if TYPE_CHECKING:
    from .session import Session
    from .store import SessionStore

# (layer index, slot in its page table, the shared page, its private copy)
Unshared = tuple[int, int, int, int]


def fork(
    store: SessionStore,
    source: Session,
    session_id: str,
    length: int | None,
    ttl_seconds: float,
) -> Session:
    """A new session of ``source``'s tenant, geometry and scale whose layers share the
    source's pages: each layer keeps its length (``length`` None), or exactly ``length``
    tokens (0 to the source's shortest layer, else INVALID_ARGUMENT). Takes no pages, so
    it needs no free memory; the session limits apply as to a create. Costs a copy of the
    page ids and one reference count per page."""
    lengths = source.lengths.copy()
    if length is not None:
        shortest = int(lengths.min())
        if not 0 <= length <= shortest:
            raise InvalidArgument(
                f"length: expected 0..{shortest} (the shortest layer of session "
                f"{source.id!r}), got {length}"
            )
        lengths[:] = length
    source.pins += 1  # a create at max_sessions evicts expired sessions: never the source
    try:
        session = store.create(
            source.geometry, session_id, ttl_seconds, source.softmax_scale, source.tenant
        )
    finally:
        source.pins -= 1
    tpp = source.layout.tokens_per_page
    with store.lock:
        tables = {}
        for index, table in source.page_lists.items():
            keep = -(-int(lengths[index]) // tpp)
            if keep:
                tables[index] = table[:keep]
        ids = (
            np.concatenate([np.frombuffer(t, dtype=np.int32) for t in tables.values()])
            if tables
            else np.zeros(0, dtype=np.int32)
        )
        store.pool.share(ids)
        session.page_lists = tables
        session.pages_held = int(ids.size)
        session.lengths[:] = lengths
        store.cached_values += session.tokens * store._values_per_token(session)
    return session


def unshare_tail(store: SessionStore, session: Session, index: int) -> Unshared | None:
    """Before an append into layer ``index``: if it would write into a last, partly filled
    page that other references share, put a private copy of that page in the session's
    table (taking one page: RESOURCE_EXHAUSTED when none can be had, nothing changed).
    Returns what to undo or commit, or None when the page is already private."""
    length = int(session.lengths[index])
    tpp = session.layout.tokens_per_page
    if length % tpp == 0:
        return None  # the append starts a new page
    table = session.page_lists[index]
    slot = length // tpp
    shared = table[slot]
    if store.pool.refs[shared] <= 1:
        return None
    if store.copy_page is None:
        raise AssertionError("cache: a shared page must be copied, but no copy_page is set")
    (private,) = store._take(session, 1)
    try:
        store.copy_page(shared, private)
    except BaseException:
        store._release(session.tenant, [private])
        raise
    table[slot] = private
    store.deferred[(session.tenant, shared)] += 1
    return index, slot, shared, private


def keep_unshared(store: SessionStore, session: Session, step: Unshared) -> None:
    """Commit: the session lets go of the shared page for good."""
    _end_deferral(store, session.tenant, step[2])
    store._release(session.tenant, [step[2]])


def undo_unshare(store: SessionStore, session: Session, step: Unshared) -> None:
    """Roll back: the shared page is back in the table, its copy back in the pool."""
    index, slot, shared, private = step
    table = session.page_lists[index]
    if table[slot] != private:
        raise AssertionError(f"session {session.id!r} layer {index}: copied page moved")
    table[slot] = shared
    _end_deferral(store, session.tenant, shared)
    store._release(session.tenant, [private])


def _end_deferral(store: SessionStore, tenant: str, page: int) -> None:
    key = (tenant, page)
    store.deferred[key] -= 1
    if store.deferred[key] <= 0:
        del store.deferred[key]
