"""One call's changes to the store, kept or undone as a whole."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from . import sharing
from .session import Session

if TYPE_CHECKING:
    from .store import SessionStore


_NO_PAGES: list[int] = []  # the pages a step that only moved a length added (never changed)


class Allocation:
    """What one call changes in the store, kept or undone as a whole.

    Made by ``SessionStore.begin()``. Every session the call looks up is pinned (never
    evicted, by TTL or LRU) until the allocation ends, so nothing the call prepared can be
    taken from under it. ``grow`` takes pages and advances a layer's length (first copying a
    shared, partly filled last page it would write into: ``sharing.py``); the allocation
    then ends exactly once: ``commit()`` keeps every change, ``roll_back()`` undoes them in
    reverse order. Ending it twice is a bug and raises AssertionError. Used as a context
    manager it commits on success and rolls back on an exception.
    """

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._pinned: dict[int, Session] = {}  # by id(): each session pinned once
        # (session, layer, length before, pages added, shared page copied or None), in the
        # order they happened.
        self._steps: list[tuple[Session, int, int, list[int], sharing.Unshared | None]] = []
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

    def pin_all(self, sessions: Iterable[Session]) -> None:
        """``pin`` each of ``sessions``."""
        self._require_open("pin")
        pinned = self._pinned
        for session in sessions:
            if id(session) not in pinned:
                session.pins += 1
                pinned[id(session)] = session

    def grow(self, session: Session, index: int, new_length: int) -> None:
        """Cover ``new_length`` tokens of layer ``index`` and make that its length. On an
        error (past max_len, no memory) nothing of this step is changed."""
        self._require_open("grow")
        self.pin(session)
        store = self._store
        with store.lock:
            old_length = int(session.lengths[index])
            store._check_max_len(session, index, new_length)  # before copying anything
            unshared = None
            if new_length > old_length:
                unshared = sharing.unshare_tail(store, session, index)
            try:
                added = store._take_pages(session, index, new_length)
            except BaseException:
                if unshared is not None:
                    sharing.undo_unshare(store, session, unshared)
                raise
            store._set_length(session, index, new_length)
        self._steps.append((session, index, old_length, added, unshared))

    def extend_in_place(self, sessions: Sequence[Session], index: int, tokens: int) -> list[int]:
        """``grow`` layer ``index`` of each of ``sessions`` by ``tokens`` where that only
        moves the length (the packed decode step): the new tokens fit the layer's pages, its
        last page is private (or full) and max_len holds. Returns the positions in
        ``sessions`` it left unchanged, for ``grow`` (new pages, a shared page to copy, an
        error to raise). Every session must be pinned by this allocation. One hold of the
        store's lock for all of them: at B = 64 the per-session ``grow`` was most of a
        packed call's engine time."""
        self._require_open("extend_in_place")
        # Checked before anything changes.
        if not self._pinned.keys() >= set(map(id, sessions)):
            raise AssertionError("allocation: extend_in_place of an unpinned session")
        store = self._store
        refs = memoryview(store.pool.refs)  # its items are ints: cheaper than numpy's
        left: list[int] = []
        moved: list[tuple[Session, int]] = []
        with store.lock:
            for position, session in enumerate(sessions):
                old = session.lengths.item(index)
                new = old + tokens
                table = session.page_lists.get(index)
                per_page = session.layout.tokens_per_page
                if (
                    tokens < 1
                    or new > session.geometry.max_len
                    or table is None
                    or new > len(table) * per_page
                    or (old % per_page and refs[table[old // per_page]] > 1)
                ):
                    left.append(position)
                else:
                    moved.append((session, old))
            store._advance_lengths(moved, index, tokens)
        self._steps += [(session, index, old, _NO_PAGES, None) for session, old in moved]
        return left

    def commit(self) -> None:
        self._require_open("commit")
        with self._store.lock:
            for session, _, _, _, unshared in self._steps:
                if unshared is not None:
                    sharing.keep_unshared(self._store, session, unshared)
        self._end("committed")

    def roll_back(self) -> None:
        self._require_open("roll_back")
        store = self._store
        with store.lock:
            for session, index, old_length, added, unshared in reversed(self._steps):
                store._set_length(session, index, old_length)
                store._drop_last_pages(session, index, added)
                if unshared is not None:
                    sharing.undo_unshare(store, session, unshared)
        self._end("rolled back")

    def _end(self, state: str) -> None:
        self.state = state
        for session in self._pinned.values():
            session.pins -= 1
        self._pinned.clear()

    def _require_open(self, what: str) -> None:
        if self.state != "open":
            raise AssertionError(f"allocation: {what} after it was {self.state}")
