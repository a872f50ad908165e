"""The interface every backend implements (Backend, AttendItem).

The page pool and the layout of a page are defined in ``q8kv.format`` (shared with the
client); the layout names are re-exported here for the server's modules.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from q8kv.format import (
    BYTES_PER_BLOCK,
    DEFAULT_PAGE_CODE_BYTES,
    QBLOCK,
    LayerLayout,
    page_bytes,
    tokens_per_page,
)

__all__ = [
    "BYTES_PER_BLOCK",
    "DEFAULT_PAGE_CODE_BYTES",
    "QBLOCK",
    "AttendItem",
    "Backend",
    "PackedItems",
    "LayerLayout",
    "page_bytes",
    "tokens_per_page",
]


@dataclass
class AttendItem:
    """One (session, layer) of an AppendAndAttend batch, ready for the device.

    ``page_ids`` covers ``start + n`` tokens (the caller has already reserved the pages for
    the new ones). q is [n, H, D], k and v are [n, KVH, D], each float32, float16 or
    ml_dtypes.bfloat16, C-contiguous and finite (validated before they get here). The
    output comes back in ``out_dtype`` (the service sets the wire's), computed in float32.
    """

    layout: LayerLayout
    softmax_scale: float
    page_ids: np.ndarray  # int32 [ceil((start + n) / T)]
    start: int  # tokens in the layer before this append
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    out_dtype: np.dtype = np.dtype(np.float32)

    @property
    def n(self) -> int:
        return int(self.q.shape[0])


class PageTables(Sequence[np.ndarray]):
    """B page tables as views of one joined int32 array ``ids`` (``counts[b]`` of them for
    table b), made when asked for: the backends read the joined array."""

    def __init__(self, ids: np.ndarray, counts: np.ndarray) -> None:
        self.ids = ids  # int32, every table back to back
        self.counts = counts  # int64 [B]
        self._ends: list[int] | None = None

    @classmethod
    def join(cls, tables: Sequence[np.ndarray]) -> PageTables:
        counts = np.fromiter(map(len, tables), np.int64, len(tables))
        return cls(np.concatenate(tables).astype(np.int32, copy=False), counts)

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[b] for b in range(*index.indices(len(self)))]
        if self._ends is None:
            self._ends = np.cumsum(self.counts).tolist()
        end = self._ends[index]
        return self.ids[end - int(self.counts[index]) : end]


@dataclass
class PackedItems:
    """B (session, layer) items of one layout and one n, their inputs stacked: one layer of
    one step for B distinct sessions (AttendBatch). ``page_ids[b]`` covers
    ``starts[b] + n`` tokens (reserved by the caller), n >= 1. q is [B, n, H, D], k and v
    are [B, n, KVH, D], each float32, float16 or ml_dtypes.bfloat16 (as an AttendItem's),
    C-contiguous and finite. The output comes back in ``out_dtype``, computed in float32."""

    layout: LayerLayout
    softmax_scales: np.ndarray  # float64 [B]
    # [B] of int32 [ceil((starts[b] + n) / T)]; a PageTables where the caller joined them
    # (the engine: one join instead of B arrays)
    page_ids: Sequence[np.ndarray]
    starts: np.ndarray  # int64 [B]: tokens in each layer before this append
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    out_dtype: np.dtype = np.dtype(np.float32)

    @property
    def size(self) -> int:
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        return int(self.q.shape[1])

    def page_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Every session's page ids back to back (int32) and how many each has (int64)."""
        if not isinstance(self.page_ids, PageTables):
            self.page_ids = PageTables.join(self.page_ids)  # the same tables, joined once
        return self.page_ids.ids, self.page_ids.counts

    def item(self, b: int) -> AttendItem:
        return AttendItem(self.layout, float(self.softmax_scales[b]), self.page_ids[b],
                          int(self.starts[b]), self.q[b], self.k[b], self.v[b],
                          self.out_dtype)  # fmt: skip

    def items(self) -> list[AttendItem]:
        """The same work as B separate items (the fallback of any backend)."""
        return [self.item(b) for b in range(self.size)]

    def part(self, sessions: slice, tokens: slice) -> PackedItems:
        """Sessions ``sessions`` and new tokens ``tokens`` (a chunk of a prefill: its page
        tables cut to what its last token needs)."""
        first, last, _ = tokens.indices(self.n)
        per_page = self.layout.tokens_per_page
        starts = self.starts[sessions]
        return PackedItems(
            self.layout, self.softmax_scales[sessions],
            [ids[: -(-(int(s) + last) // per_page)]
             for ids, s in zip(self.page_ids[sessions], starts, strict=True)],
            starts + first,
            *(np.ascontiguousarray(a[sessions, first:last]) for a in (self.q, self.k, self.v)),
            out_dtype=self.out_dtype,
        )


class Backend(ABC):
    """Owns the page pool on one device and runs the math on it.

    Called from one worker thread only (the engine's), so implementations need no locks.
    """

    name: str = "abstract"
    max_head_dim: int = 1024  # the largest head_dim the kernels take

    def __init__(self, num_pages: int, page_code_bytes: int = DEFAULT_PAGE_CODE_BYTES) -> None:
        if page_code_bytes % (QBLOCK * 16) != 0:
            raise ValueError(f"page_code_bytes must be a multiple of 512, got {page_code_bytes}")
        self.num_pages = num_pages
        self.page_code_bytes = page_code_bytes
        # Called as on_kernel(kernel, launch_seconds, device_seconds) after each kernel;
        # the metrics layer replaces it.
        self.on_kernel: Callable[[str, float, float], None] = lambda kernel, launch, device: None

    @property
    def device_name(self) -> str:
        """What the work runs on, for logs and build info (e.g. 'cpu', 'NVIDIA H100')."""
        return "cpu"

    @abstractmethod
    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        """Quantize every item's k/v into its pages at [start, start + n), then attend.

        Items run as if one after the other: an item sees what earlier items of the same
        (session, layer) appended (their start already counts those tokens). Returns one
        [n, H, D] array per item in its ``out_dtype``, in order.
        """

    def attend_packed(self, batch: PackedItems) -> np.ndarray:
        """``append_and_attend`` of a packed batch: [B, n, H, D] in ``batch.out_dtype``.
        This default runs it as B items; backends override it to skip the per-item work."""
        outputs = self.append_and_attend(batch.items())
        return np.stack(outputs, dtype=batch.out_dtype, casting="unsafe")

    @abstractmethod
    def dequantize(
        self, layout: LayerLayout, page_ids: np.ndarray, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """K and V of tokens [start, end) as float32 [KVH, end - start, D]."""

    @abstractmethod
    def read_pages(self, page_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw page contents (codes int8 [p, page_code_bytes], scales float32 [p, ...])."""

    @abstractmethod
    def write_pages(self, page_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        """Overwrite whole pages with raw contents from ``read_pages`` (snapshots, import)."""

    def copy_page(self, source: int, target: int) -> None:
        """Copy one whole page (the copy-on-write of a shared page). Ordered before any
        later call of this backend; the backends override it with one device copy."""
        codes, scales = self.read_pages(np.asarray([source], dtype=np.int32))
        self.write_pages(np.asarray([target], dtype=np.int32), codes, scales)

    # -- token-major access (export, import, snapshots), built on the raw page copies ------

    def read_tokens(
        self, layout: LayerLayout, page_ids: np.ndarray, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Codes int8 [2, KVH, end-start, D] and scales float32 [2, KVH, end-start, D/32]
        of tokens [start, end): the cache without its page layout."""
        t = layout.tokens_per_page
        first, last = start // t, -(-end // t)
        codes, scales = self.read_pages(np.asarray(page_ids[first:last], dtype=np.int32))
        lo, hi = start - first * t, end - first * t
        return (
            _pages_to_tokens(codes, layout, layout.head_dim)[:, :, lo:hi],
            _pages_to_tokens(scales, layout, layout.blocks)[:, :, lo:hi],
        )

    def write_tokens(
        self,
        layout: LayerLayout,
        page_ids: np.ndarray,
        start: int,
        codes: np.ndarray,
        scales: np.ndarray,
    ) -> None:
        """Store raw Q8 tokens (as ``read_tokens`` returns them) at [start, start + n)."""
        t, n = layout.tokens_per_page, codes.shape[2]
        first, last = start // t, -(-(start + n) // t)
        pages = np.asarray(page_ids[first:last], dtype=np.int32)
        page_codes, page_scales = self.read_pages(pages)  # keep what else the pages hold
        lo = start - first * t
        for pool, tokens, width in (
            (page_codes, codes, layout.head_dim),
            (page_scales, scales, layout.blocks),
        ):
            view = _pages_to_tokens(pool, layout, width)  # a copy, token-major
            view[:, :, lo : lo + n] = tokens
            used = 2 * layout.num_kv_heads * t * width
            pool[:, :used] = (
                view.reshape(2, layout.num_kv_heads, len(pages), t, width)
                .transpose(2, 0, 1, 3, 4)
                .reshape(len(pages), used)
            )
        self.write_pages(pages, page_codes, page_scales)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory (tests create many backends)."""


def _pages_to_tokens(pages: np.ndarray, layout: LayerLayout, width: int) -> np.ndarray:
    """Rows of whole pages [P, row] -> token-major [2, KVH, P * T, width] (a copy)."""
    kvh, t = layout.num_kv_heads, layout.tokens_per_page
    used = pages[:, : 2 * kvh * t * width].reshape(len(pages), 2, kvh, t, width)
    return used.transpose(1, 2, 0, 3, 4).reshape(2, kvh, len(pages) * t, width)
