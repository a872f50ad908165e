"""The page pool: which pages are free, and how many references each held page has. It
holds page ids only (the contents live in the backend); pages are handed out whole and
come back whole when their last reference is given back."""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence

import numpy as np

from q8kv.format import page_bytes

from ..errors import ResourceExhausted


def as_ids(pages: Iterable[int] | np.ndarray) -> np.ndarray:
    """Page ids as an int32 array (a list, an ``array.array`` (a view: not to be resized
    while the result lives) or an array)."""
    if isinstance(pages, array.array):
        return np.frombuffer(pages, dtype=np.int32)
    return np.asarray(pages if isinstance(pages, np.ndarray | Sequence) else list(pages),
                      dtype=np.int32)


class PagePool:
    """Which pages are free, and each held page's reference count: a page is held by
    every session-layer whose page table names it (forks share pages), and it is free
    again when its last reference is given back."""

    def __init__(self, num_pages: int, page_code_bytes: int) -> None:
        self.num_pages = num_pages
        self.page_code_bytes = page_code_bytes
        self.page_bytes = page_bytes(page_code_bytes)
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self.refs = np.zeros(num_pages, dtype=np.int32)  # 0: free
        self.references = 0  # sum of refs, kept current so the sharing gauge is O(1)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def shared_saved_pages(self) -> int:
        """Pages that sharing saves: references beyond the first to every held page."""
        return self.references - self.used_pages

    def take(self, count: int) -> list[int]:
        """``count`` free pages, one reference each."""
        if count > len(self._free):
            raise ResourceExhausted(
                f"memory budget: needed {count} free pages of {self.page_bytes} bytes, "
                f"{len(self._free)} of {self.num_pages} are free"
            )
        taken = self._free[len(self._free) - count :]
        del self._free[len(self._free) - count :]
        self.refs[taken] = 1
        self.references += count
        return taken

    def share(self, pages: np.ndarray) -> None:
        """One more reference to each of ``pages`` (held, distinct ids)."""
        ids = as_ids(pages)
        if not ids.size:
            return
        refs = self.refs[ids]  # one gather and one scatter: a fork of 32k pages stays fast
        if refs.min() <= 0:
            raise AssertionError("pool: sharing a free page")
        self.refs[ids] = refs + 1
        self.references += int(ids.size)

    def give_back(self, pages: Iterable[int] | np.ndarray) -> list[int]:
        """Drop one reference to each of ``pages`` (distinct ids); returns the pages whose
        last reference that was, now free."""
        ids = as_ids(pages)
        if not ids.size:
            return []
        refs = self.refs[ids] - 1
        if refs.min() < 0:
            raise AssertionError("pool: giving back a free page")
        self.refs[ids] = refs
        self.references -= int(ids.size)
        freed = ids[refs == 0].tolist()
        self._free.extend(reversed(freed))
        return freed
