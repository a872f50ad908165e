"""What the CuPy backend tests share: a numpy and a GPU backend over pools of one shape
(``Pair``), random inputs, and ``run_and_check``, which runs one batch on both and checks
every item against the numpy output and float64 attention at the tolerance of its route.

Routes and tolerances (relative L2, ``||out - ref|| / ||ref||``, against the numpy backend
AND against float64 attention over the same dequantized cache):

- the 16-bit tensor-core prefill kernel (``takes_prefill_kernel``: a float16 or bfloat16
  wire, n >= 2, n * group >= 64 query rows): 2e-3 for float16, 1.6e-2 for bfloat16. It
  computes at the wire's precision: K and V dequantized to 16 bits, P rounded to 16 bits.
- everything else (float32 wire, decode n = 1, fewer than 64 query rows): 1e-5.

Import it only after the module-level CuPy/CUDA skip: it imports the CuPy backend.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from reference import attention_ref, rel_l2

from q8kv.server.backends import GpuTuning
from q8kv.server.backends.base import AttendItem, LayerLayout, tokens_per_page
from q8kv.server.backends.cupy.backend import CupyBackend
from q8kv.server.backends.cupy.planning import takes_prefill_kernel
from q8kv.server.backends.numpy_backend import NumpyBackend

TOL_F32 = 1e-5
TOL_16 = {np.dtype(np.float16): 2e-3, np.dtype(ml_dtypes.bfloat16): 1.6e-2}
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def on_16bit_route(item: AttendItem) -> bool:
    group = item.layout.num_heads // item.layout.num_kv_heads
    return takes_prefill_kernel(item.n, group, np.dtype(item.q.dtype))


def tolerance(item: AttendItem) -> float:
    """The relative L2 bound of an item's output, by the kernel that serves it."""
    return TOL_16[np.dtype(item.q.dtype)] if on_16bit_route(item) else TOL_F32


class Pair:
    """A numpy reference backend and a GPU backend over pools of the same shape."""

    def __init__(
        self,
        num_pages: int,
        page_code_bytes: int,
        rng: np.random.Generator,
        tuning: GpuTuning | None = None,
    ):
        self.ref = NumpyBackend(num_pages, page_code_bytes)
        self.gpu = CupyBackend(num_pages, page_code_bytes, tuning=tuning)
        self.gpu.poison_outputs = True  # NaN in every output before a launch
        self.pcb = page_code_bytes
        self.free = list(rng.permutation(num_pages))  # scattered pages, as a real pool

    def layout(self, h: int, kvh: int, d: int) -> LayerLayout:
        return LayerLayout(h, kvh, d, tokens_per_page(self.pcb, kvh, d))

    def pages(self, layout: LayerLayout, tokens: int) -> np.ndarray:
        count = -(-tokens // layout.tokens_per_page)
        ids, self.free = self.free[:count], self.free[count:]
        assert len(ids) == count, "test pool too small"
        return np.asarray(ids, np.int32)

    def prefill(self, layout, page_ids, length, rng, dtype=np.float32) -> None:
        """Put ``length`` random tokens in both caches (numpy quantizes, pages are copied)."""
        if length == 0:
            return
        h, kvh, d = layout.num_heads, layout.num_kv_heads, layout.head_dim
        for s in range(0, length, 4096):
            e = min(length, s + 4096)
            k = rand(rng, (e - s, kvh, d), dtype)
            v = rand(rng, (e - s, kvh, d), dtype)
            q = rand(rng, (e - s, h, d), dtype)
            self.ref._append(AttendItem(layout, 1.0, page_ids, s, q, k, v))
        used = page_ids[: -(-length // layout.tokens_per_page)]
        self.gpu.write_pages(used, *self.ref.read_pages(used))

    def close(self) -> None:
        self.gpu.close()


def rand(rng: np.random.Generator, shape, dtype, spread: int = 2) -> np.ndarray:
    """Normal values times 2^[-spread, spread) per row, so blocks have varied scales.

    Queries use spread 0: with row scales up to 4 on both q and k, scores reach ~30 and
    float32 rounding of the scores alone moves the softmax by ~1e-5 in any implementation.
    """
    x = rng.standard_normal(shape, dtype=np.float32)
    if spread:
        x *= np.exp2(rng.integers(-spread, spread, size=shape[:-1] + (1,))).astype(np.float32)
    return x.astype(dtype)


def case(pair, rng, h, kvh, d, lengths, n, dtype, scale=None):
    """One batch: a session per length, each appending n tokens after ``length``."""
    lay = pair.layout(h, kvh, d)
    items, pages = [], []
    for length in lengths:
        ids = pair.pages(lay, length + n)
        pair.prefill(lay, ids, length, rng, dtype)
        q = rand(rng, (n, h, d), dtype, spread=0)
        k, v = rand(rng, (n, kvh, d), dtype), rand(rng, (n, kvh, d), dtype)
        items.append(AttendItem(lay, scale or d**-0.5, ids, length, q, k, v))
        pages.append(ids)
    return items, pages


def run_and_check(
    pair: Pair, items: list[AttendItem], final_pages: list[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Run both backends on ``items``; check the codes written, and each output against
    numpy and float64 at ``tolerance(item)``. Returns (GPU output, float64 reference) per
    item."""
    out_gpu = pair.gpu.append_and_attend(items)
    out_ref = pair.ref.append_and_attend(items)
    checked = []
    for it, og, orf in zip(items, out_gpu, out_ref, strict=True):
        assert og.shape == orf.shape and og.dtype == np.float32
        assert np.all(np.isfinite(og)), "non-finite output (unwritten element?)"
        err_ref = rel_l2(og, orf)
        keys, values = pair.ref.dequantize(it.layout, it.page_ids, 0, it.start + it.n)
        ref64 = attention_ref(it.q.astype(np.float32), keys, values, it.start, it.softmax_scale)
        err64 = rel_l2(og, ref64)
        tol = tolerance(it)
        where = f"start={it.start} n={it.n} {np.dtype(it.q.dtype)} layout={it.layout}"
        msg = f"vs numpy {err_ref:.2e}, vs float64 {err64:.2e}, tolerance {tol:g} ({where})"
        assert err_ref <= tol and err64 <= tol, msg
        checked.append((og, ref64))
    for page_ids in final_pages:
        gc, gs = pair.gpu.read_pages(page_ids)
        rc, rs = pair.ref.read_pages(page_ids)
        np.testing.assert_array_equal(gc, rc)
        np.testing.assert_array_equal(gs.view(np.int32), rs.view(np.int32))
    return checked
