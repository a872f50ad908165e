"""NumpyBackend attention against a float64 reference on the dequantized cache.

Pages are small (page_code_bytes = 4096, so a page holds 1 to 32 tokens) and handed out in a
scrambled order, so every length crosses page boundaries on a non-contiguous page table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np
import pytest
from harness.tensors import qkv, random_tensor
from reference import attention_ref, dequantize_ref, quantize_ref, rel_l2

from q8kv.server.backends.base import AttendItem
from q8kv.server.backends.numpy_backend import NumpyBackend
from q8kv.server.cache import Geometry, PagePool, Session, SessionStore

PAGE_CODE_BYTES = 4096
TOLERANCE = 1e-5


@dataclass
class Shadow:
    """What one (session, layer) should hold: every appended k / v token, in order."""

    k: list[np.ndarray] = field(default_factory=list)  # each [n, KVH, D] in its input dtype
    v: list[np.ndarray] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(a.shape[0] for a in self.k)

    def cache(self) -> tuple[np.ndarray, np.ndarray]:
        """The dequantized cache by the reference quantizer: float64 [KVH, L, D] each."""
        out = []
        for parts in (self.k, self.v):
            x = np.concatenate([p.astype(np.float32) for p in parts])  # [L, KVH, D]
            out.append(dequantize_ref(*quantize_ref(x)).transpose(1, 0, 2))
        return out[0], out[1]

    def truncate(self, length: int) -> None:
        for parts in (self.k, self.v):
            x = np.concatenate(parts)[:length] if parts else None
            parts.clear()
            if x is not None and length:
                parts.append(x)


class Driver:
    """A SessionStore + NumpyBackend driven the way the engine drives them (reserve pages,
    advance lengths, build AttendItems), with a float64 shadow of every layer."""

    def __init__(self, seed: int, num_pages: int = 1024) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = PagePool(num_pages, PAGE_CODE_BYTES)
        self.store = SessionStore(self.pool, max_sessions=64)
        self.backend = NumpyBackend(num_pages, PAGE_CODE_BYTES)
        # Scramble the free list so page tables are not runs of consecutive ids.
        pages = self.pool.take(num_pages)
        self.rng.shuffle(pages)
        self.pool.give_back(pages)
        self.shadows: dict[tuple[str, int], Shadow] = {}

    def create(self, geometry: Geometry, softmax_scale: float | None = None) -> Session:
        session = self.store.create(geometry, softmax_scale=softmax_scale)
        for layer in range(geometry.num_layers):
            self.shadows[session.id, layer] = Shadow()
        return session

    def tensors(self, session: Session, n: int, dtype=np.float32):
        return qkv(self.rng, n, session.geometry, dtype, tensor=random_tensor)

    def run(self, requests: list[tuple[Session, int, np.ndarray, np.ndarray, np.ndarray]]):
        """One backend call for all requests; checks each output against the reference
        (computed as if the requests ran one after the other) and returns the outputs."""
        items, expected = [], []
        for session, index, q, k, v in requests:
            layer = session.layers[index]
            start = layer.length
            self.store.reserve(session, layer, start + q.shape[0])
            self.store.set_length(session, layer, start + q.shape[0])
            items.append(
                AttendItem(
                    session.layout, session.softmax_scale, layer.page_table(), start, q, k, v
                )
            )
            shadow = self.shadows[session.id, index]
            shadow.k.append(k)
            shadow.v.append(v)
            keys, values = shadow.cache()
            expected.append(attention_ref(q, keys, values, start, session.softmax_scale))
        outputs = self.backend.append_and_attend(items)
        assert len(outputs) == len(items)
        for (_, _, q, _, _), out, want in zip(requests, outputs, expected, strict=True):
            check_output(out, want, q.shape)
        return outputs

    def append(self, session: Session, layer: int, n: int, dtype=np.float32) -> np.ndarray:
        return self.run([(session, layer, *self.tensors(session, n, dtype))])[0]

    def check_cache(self) -> None:
        """Every layer of every session dequantizes to exactly the reference cache."""
        for session in self.store:
            for index, layer in enumerate(session.layers):
                shadow = self.shadows[session.id, index]
                assert layer.length == shadow.length
                assert len(layer.pages) == -(-layer.length // session.layout.tokens_per_page)
                if not layer.length:
                    continue
                keys, values = self.backend.dequantize(
                    session.layout, layer.page_table(), 0, layer.length
                )
                want_k, want_v = shadow.cache()
                np.testing.assert_array_equal(keys, want_k.astype(np.float32))
                np.testing.assert_array_equal(values, want_v.astype(np.float32))


def check_output(out: np.ndarray, want: np.ndarray, q_shape: tuple[int, ...]) -> None:
    """Output is float32 [n, H, D], every element finite, and within TOLERANCE of the
    float64 reference overall and per (token, head) row (so no row is left unwritten)."""
    assert out.dtype == np.float32 and out.shape == tuple(q_shape)
    assert np.all(np.isfinite(out))
    assert rel_l2(out, want) < TOLERANCE, rel_l2(out, want)
    row_err = np.linalg.norm(out - want, axis=-1) / np.linalg.norm(want, axis=-1)
    assert row_err.max() < 10 * TOLERANCE, row_err.max()


def geometry(heads: int, kv_heads: int, head_dim: int, layers: int = 1) -> Geometry:
    return Geometry(layers, heads, kv_heads, head_dim, max_len=4096)


# -- decode and prefill ------------------------------------------------------------------


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_decode_and_prefill(n: int, heads: int, kv_heads: int, head_dim: int) -> None:
    """Prefill into an empty layer, then calls of n tokens on a cache of odd length that
    spans several pages: each matches the float64 reference on the dequantized cache."""
    driver = Driver(seed=n * 1000 + heads * 100 + kv_heads * 10 + head_dim)
    session = driver.create(geometry(heads, kv_heads, head_dim))
    tpp = session.layout.tokens_per_page
    assert tpp == 2 ** int(math.log2(PAGE_CODE_BYTES // (2 * kv_heads * head_dim)))
    driver.append(session, 0, n)  # from an empty layer
    driver.append(session, 0, 2 * tpp + 3)  # cross into a partly filled page
    for _ in range(2):
        driver.append(session, 0, n)
    assert session.layers[0].length > 2 * tpp
    driver.check_cache()


def test_long_decode_crosses_many_pages() -> None:
    """Decode steps one token at a time across many page boundaries (T = 2)."""
    driver = Driver(seed=42)
    session = driver.create(geometry(16, 8, 128))
    assert session.layout.tokens_per_page == 2
    driver.append(session, 0, 37)
    for _ in range(12):
        driver.append(session, 0, 1)
    assert session.layers[0].length == 49 and len(session.layers[0].pages) == 25
    driver.check_cache()


def test_one_token_per_page() -> None:
    """KVH * D so large that a page holds one token: every token is on its own page."""
    driver = Driver(seed=43)
    session = driver.create(geometry(8, 8, 256))
    assert session.layout.tokens_per_page == 1
    driver.append(session, 0, 5)
    driver.append(session, 0, 1)
    assert len(session.layers[0].pages) == 6
    driver.check_cache()


# -- layers, sessions, truncation --------------------------------------------------------


def test_layers_with_different_lengths() -> None:
    """Layers of one session keep their own lengths and pages; appends to one never touch
    another layer or another session."""
    driver = Driver(seed=7)
    a = driver.create(geometry(4, 2, 64, layers=3))
    b = driver.create(geometry(6, 3, 128, layers=2))
    plan = [
        (a, 0, 5),
        (a, 1, 17),
        (b, 1, 9),
        (a, 2, 1),
        (a, 0, 33),
        (b, 0, 40),
        (a, 1, 1),
        (b, 1, 7),
        (a, 0, 1),
        (a, 2, 30),
    ]
    for session, layer, n in plan:
        driver.append(session, layer, n)
    assert [layer.length for layer in a.layers] == [39, 18, 31]
    assert [layer.length for layer in b.layers] == [40, 16]
    driver.check_cache()


@pytest.mark.parametrize("cut", [0, 1, 16, 17, 31, 45])
def test_truncate_then_append(cut: int) -> None:
    """Truncating (to 0, mid-page and on a page boundary; T = 16 here) then appending
    gives the attention of the shortened cache plus the new tokens; the stale slots of a
    kept partial page are overwritten, not read."""
    driver = Driver(seed=100 + cut)
    session = driver.create(geometry(4, 2, 64, layers=2))
    assert session.layout.tokens_per_page == 16
    driver.append(session, 0, 40)
    driver.append(session, 1, 12)
    driver.store.truncate(session, cut)
    for index in range(2):
        driver.shadows[session.id, index].truncate(cut)
    assert session.layers[0].length == min(40, cut) and session.layers[1].length == min(12, cut)
    driver.check_cache()
    driver.append(session, 0, 7)
    driver.append(session, 1, 1)
    driver.append(session, 0, 1)
    driver.check_cache()


# -- scale and dtypes --------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.01, 0.5, 1.0 / 3.0])
def test_custom_softmax_scale(scale: float) -> None:
    """A session's own softmax_scale is what the scores are multiplied by."""
    driver = Driver(seed=int(scale * 1000))
    session = driver.create(geometry(4, 1, 64), softmax_scale=scale)
    assert session.softmax_scale == float(np.float32(scale))
    q, k, v = driver.tensors(session, 9)
    out = driver.run([(session, 0, q, k, v)])[0]
    # And it differs from what the default 1/sqrt(D) would give on the same cache.
    keys, values = driver.shadows[session.id, 0].cache()
    default = attention_ref(q, keys, values, 0, 1 / math.sqrt(64))
    assert rel_l2(out, default) > 1e-3


def test_default_softmax_scale() -> None:
    """Without softmax_scale the session uses float32(1/sqrt(head_dim))."""
    driver = Driver(seed=8)
    session = driver.create(geometry(4, 4, 128))
    assert session.softmax_scale == float(np.float32(1 / math.sqrt(128)))
    driver.append(session, 0, 5)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
def test_low_precision_inputs(dtype) -> None:
    """float16 and bfloat16 q/k/v are upcast exactly; math and output stay float32."""
    driver = Driver(seed=16 if dtype is np.float16 else 17)
    session = driver.create(geometry(8, 2, 128, layers=2))
    for n in (7, 1, 33):
        q, k, v = driver.tensors(session, n, dtype)
        assert q.dtype == dtype
        driver.run([(session, 1, q, k, v)])
    driver.check_cache()


# -- batches -----------------------------------------------------------------------------


def test_same_session_layer_twice_in_one_batch() -> None:
    """One call with (s, 0) three times and other items between: each item sees what the
    earlier ones appended, and none sees what a later one appends."""
    driver = Driver(seed=21)
    s = driver.create(geometry(8, 2, 64, layers=2))
    other = driver.create(geometry(4, 4, 64))
    driver.append(s, 0, 10)
    driver.append(other, 0, 3)
    requests = [
        (s, 0, *driver.tensors(s, 3)),
        (other, 0, *driver.tensors(other, 5)),
        (s, 0, *driver.tensors(s, 20)),
        (s, 1, *driver.tensors(s, 2)),
        (s, 0, *driver.tensors(s, 1)),
    ]
    outputs = driver.run(requests)
    assert s.layers[0].length == 34 and s.layers[1].length == 2
    # The test can tell: the first item attending as if the whole batch were cached differs.
    q = requests[0][2]
    keys, values = driver.shadows[s.id, 0].cache()
    assert rel_l2(outputs[0], attention_ref(q, keys, values, 31, s.softmax_scale)) > 1e-2
    driver.check_cache()


def test_mixed_geometries_in_one_batch() -> None:
    """One backend call serves sessions of different geometry and dtype together."""
    driver = Driver(seed=33)
    sessions = [
        driver.create(geometry(8, 8, 64)),
        driver.create(geometry(8, 1, 256)),
        driver.create(geometry(12, 4, 128, layers=2)),
    ]
    for s in sessions:
        driver.append(s, 0, 11)
    requests = [
        (sessions[0], 0, *driver.tensors(sessions[0], 1)),
        (sessions[1], 0, *driver.tensors(sessions[1], 7, np.float16)),
        (sessions[2], 1, *driver.tensors(sessions[2], 33, ml_dtypes.bfloat16)),
        (sessions[2], 0, *driver.tensors(sessions[2], 1)),
    ]
    driver.run(requests)
    driver.check_cache()


# -- dequantize, raw pages ---------------------------------------------------------------


def test_dequantize_subranges() -> None:
    """dequantize(start, end) is the [start, end) slice of the whole cache, for ranges
    inside a page, across pages, empty, and the whole layer."""
    driver = Driver(seed=55)
    session = driver.create(geometry(4, 2, 64))
    driver.append(session, 0, 50)
    layer = session.layers[0]
    keys, values = driver.backend.dequantize(session.layout, layer.page_table(), 0, 50)
    for start, end in [(0, 1), (3, 9), (15, 17), (16, 32), (5, 50), (49, 50), (20, 20), (0, 50)]:
        k, v = driver.backend.dequantize(session.layout, layer.page_table(), start, end)
        assert k.shape == (2, end - start, 64) and k.dtype == np.float32
        np.testing.assert_array_equal(k, keys[:, start:end])
        np.testing.assert_array_equal(v, values[:, start:end])


def test_read_write_pages_copy_a_layer() -> None:
    """Raw pages read from one page table and written into other pages hold the same cache:
    dequantize and attention through the new table give identical results."""
    driver = Driver(seed=77)
    session = driver.create(geometry(8, 2, 128))
    driver.append(session, 0, 45)
    layout, table = session.layout, session.layers[0].page_table()
    codes, scales = driver.backend.read_pages(table)
    assert codes.shape == (len(table), PAGE_CODE_BYTES) and codes.dtype == np.int8
    assert scales.shape == (len(table), PAGE_CODE_BYTES // 32) and scales.dtype == np.float32
    copy = np.asarray(driver.pool.take(len(table)), dtype=np.int32)
    driver.backend.write_pages(copy, codes, scales)
    for a, b in zip(
        driver.backend.dequantize(layout, table, 0, 45),
        driver.backend.dequantize(layout, copy, 0, 45),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    # Append 3 tokens through each table (45 + 3 fits the 6 pages of T = 8): same output.
    assert len(table) * layout.tokens_per_page >= 48
    q, k, v = driver.tensors(session, 3)
    outs = [
        driver.backend.append_and_attend(
            [AttendItem(layout, session.softmax_scale, pages, 45, q, k, v)]
        )[0]
        for pages in (table, copy)
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
