"""Forks and copy-on-write on the CuPy backend: ``copy_page`` copies a page exactly, and
branches of a fork tree diverging through the Engine compute what from-scratch sessions
compute (the same harness as the numpy test, tests/test_fork_engine.py). Marked ``gpu``;
the module skips where CuPy or a CUDA device is missing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from harness.forks import Branches
from reference import rel_l2

from q8kv.server.backends import cuda_available
from q8kv.server.cache import Geometry, PagePool, SessionStore
from q8kv.server.engine import Engine

pytest.importorskip("cupy", reason="CuPy is not installed: GPU backend tests skipped")
if not cuda_available():
    pytest.skip("no CUDA device visible to CuPy: GPU tests skipped", allow_module_level=True)

from q8kv.server.backends.cupy.backend import CupyBackend  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = 1e-5
PCB = 16384  # geometry (8, 2, 128): 32 tokens per page
GEO = Geometry(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=128, max_len=4096)


def test_copy_page_is_exact() -> None:
    rng = np.random.default_rng(1)
    backend = CupyBackend(8, PCB)
    try:
        codes = rng.integers(-127, 128, (8, PCB), dtype=np.int8)
        scales = rng.random((8, PCB // 32), dtype=np.float32)
        backend.write_pages(np.arange(8, dtype=np.int32), codes, scales)
        backend.copy_page(3, 6)
        got_codes, got_scales = backend.read_pages(np.arange(8, dtype=np.int32))
        want_codes, want_scales = codes.copy(), scales.copy()
        want_codes[6], want_scales[6] = codes[3], scales[3]
        np.testing.assert_array_equal(got_codes, want_codes)
        np.testing.assert_array_equal(got_scales, want_scales)
    finally:
        backend.close()


def test_fork_then_diverge_matches_sessions_built_from_scratch() -> None:
    """Forks, a fork of a fork, the source appending too, branches copying one shared page
    in one batch, a truncate into the shared region, the source deleted: every output
    within TOL of the from-scratch session's, every cache bit-identical; the pool empty
    at the end."""
    store = SessionStore(PagePool(512, PCB), max_sessions=64)
    engine = Engine(CupyBackend(512, PCB), store, max_queue_delay_us=100)
    engine.start()

    def close(mine: np.ndarray, theirs: np.ndarray) -> None:
        assert rel_l2(mine, theirs) <= TOL

    async def body(b: Branches) -> None:
        await b.create("src")
        await b.append("src", 1000)  # 31 full pages + 8 tokens per layer
        await b.fork("a", "src")
        await b.fork("b", "src", length=990)
        await b.append("a", 1)
        await b.append("b", 17)
        await b.append("src", 1)
        await b.fork("c", "a", length=1001)
        await b.append_together(["a", "b", "c", "src"], 1)
        await b.truncate("b", 700)
        await b.append("b", 3)
        await b.delete("src")
        await b.append("c", 40)
        assert await b.check(close) > 0
        for name in list(b.history):
            await b.delete(name)
        assert store.pool.used_pages == 0 and store.pool.references == 0

    try:
        asyncio.run(body(Branches(engine, GEO, np.random.default_rng(2))))
        store.check_invariants()
    finally:
        engine.stop(timeout=5)
        engine.backend.close()
