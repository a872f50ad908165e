"""One large prefill item through the GPU in token chunks (server/backends/cupy/chunked.py):
the host copies chunk c + 1 while the device runs chunk c, and chunk c's output comes back
while later chunks run. Each chunk is the item with a later start and fewer new tokens, so
the chunks together must give exactly the whole call: every output row bit for bit what
the same call gives in one piece (a row's attention reads the same 16-bit K/V tiles in the
same order either way), the cache's codes and scales identical, and the output within the
route's tolerance of the numpy backend and float64 (gpu_pairs.run_and_check).

Small chunks (128 tokens) force 3 chunks, the last partial, after a cache that is not a
whole number of pages or tiles; float16 and bfloat16 wires; float32 outputs (the kernel's
own) and outputs narrowed to the wire's type on the device. Marked ``gpu``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from q8kv.server.backends import cuda_available
from q8kv.server.backends.base import AttendItem

pytest.importorskip("cupy", reason="CuPy is not installed: GPU backend tests skipped")
if not cuda_available():
    pytest.skip("no CUDA device visible to CuPy: GPU tests skipped", allow_module_level=True)

from gpu_pairs import Pair, rand, run_and_check  # noqa: E402

from q8kv.server.backends.cupy import planning  # noqa: E402

pytestmark = pytest.mark.gpu

PCB = 16384
START, N = 777, 333  # 3 chunks of 128 tokens: [0, 128), [128, 256), [256, 333)


def one_call(chunked: bool, dtype, out_dtype, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """The same item (same seed, same pages) through a fresh pair; returns the GPU output and
    the cache's codes after it."""
    monkeypatch.setattr(planning, "PIPELINE_BYTES", 0 if chunked else 1 << 62)
    monkeypatch.setattr(planning, "CHUNK_BYTES", 128 * (32 + 2 * 8) * 128 * 2)
    rng = np.random.default_rng(17)
    pair = Pair(512, PCB, rng)
    try:
        lay = pair.layout(32, 8, 128)
        ids = pair.pages(lay, START + N)
        pair.prefill(lay, ids, START, rng, dtype)
        q = rand(rng, (N, 32, 128), dtype, spread=0)
        k, v = rand(rng, (N, 8, 128), dtype), rand(rng, (N, 8, 128), dtype)
        item = AttendItem(lay, 128**-0.5, ids, START, q, k, v, np.dtype(out_dtype))
        assert planning.takes_chunks([item]) == chunked
        assert len(planning.chunk_bounds(N, planning.input_bytes(item))) == 3
        if np.dtype(out_dtype) == np.float32:
            (out, _ref64), = run_and_check(pair, [item], [ids])
        else:
            out = pair.gpu.append_and_attend([item])[0]
            assert out.dtype == np.dtype(out_dtype) and out.shape == (N, 32, 128)
        codes, scales = pair.gpu.read_pages(ids)
        return out, np.concatenate([codes.view(np.uint8).ravel(), scales.view(np.uint8).ravel()])
    finally:
        pair.close()


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(np.float16, np.float32), (ml_dtypes.bfloat16, np.float32),
     (np.float16, np.float16), (ml_dtypes.bfloat16, ml_dtypes.bfloat16)],
    ids=["f16", "bf16", "f16-narrowed", "bf16-narrowed"],
)  # fmt: skip
def test_chunks_give_the_whole_call_bit_for_bit(dtype, out_dtype, monkeypatch):
    chunked, chunked_cache = one_call(True, dtype, out_dtype, monkeypatch)
    whole, whole_cache = one_call(False, dtype, out_dtype, monkeypatch)
    assert np.all(np.isfinite(chunked.astype(np.float32)))
    bits = np.uint32 if chunked.dtype == np.float32 else np.uint16
    np.testing.assert_array_equal(chunked.view(bits), whole.view(bits))
    np.testing.assert_array_equal(chunked_cache, whole_cache)
