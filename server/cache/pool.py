"""The page pool: which pages are free. It holds page ids only (the contents live in the
backend); pages are handed out whole and returned whole."""

from __future__ import annotations

from q8kv.format import page_bytes

from ..errors import ResourceExhausted


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
