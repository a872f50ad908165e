"""The GPU backend: the page pool in device memory, the math in CUDA kernels (CuPy RawModule).

Kernels live beside this file as .cu sources (q8_pages.cu: quantize-append, dequantize;
q8_attention_tc.cu: fused paged attention on tensor cores), compiled once per process per
head_dim (CuPy also keeps them in its on-disk kernel cache). One ``append_and_attend`` call is:
pack every item's metadata, page table and raw q/k/v bytes into one pinned host buffer ->
one H2D copy -> one quantize-append launch -> one attention launch per head_dim
(normally one) -> one D2H copy of all outputs -> one stream synchronize.

The backend is driven from one worker thread (base.Backend); it holds no locks.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cupy as cp
import ml_dtypes
import numpy as np

from ..base import DEFAULT_PAGE_CODE_BYTES, QBLOCK, AttendItem, Backend, LayerLayout

_SRC = Path(__file__).resolve().parent
_META = 32  # int32 per item row (META_STRIDE in q8_common.cuh)
(M_Q, M_K, M_V, M_DT, M_PT, M_START, M_N, M_H, M_KVH, M_LOGT, M_OUT, M_SCALE, M_UNIT,
 M_NSPLIT, M_CHUNK, M_RT, M_G, M_CNT, M_QB, M_D) = range(20)  # fmt: skip
_LOG2E = 1.4426950408889634
_DTYPE_CODE = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
_NWARPS = 4
_MAXP = 512  # page ids per split held in shared memory (MAXP in q8_attention_tc.cu)
# Splits per row tile, bounded so the last block's merge stays short (48 x 8 kv heads fills
# one wave of an H100 at batch 1).
_MAX_SPLITS = int(os.environ.get("Q8KV_MAX_SPLITS", "48"))
_SMEM_PER_SM = 228 * 1024
_ROWS_PER_TILE = 8  # GT of q8_attention_tc.cu: the N of both tensor-core products
# Register cap (blocks per SM) and pipeline of the attention kernel; the env overrides exist
# for tuning runs (benchmarks/kernels.py). Two 32 KiB stages (128 tokens at D = 128) ran 1%
# faster than three of 16 KiB at 64 x 16384 on an H100.
_TC_MINBLOCKS = int(os.environ.get("Q8KV_TC_MINBLOCKS", "2"))
_TC_NSTAGES = int(os.environ.get("Q8KV_TC_NSTAGES", "2"))
_TC_STAGE_CODE_TARGET = int(os.environ.get("Q8KV_TC_STAGE_BYTES", "32768"))


def _source(name: str) -> str:
    """A .cu file with its local header inlined, so CuPy's cache key covers both."""
    text = (_SRC / name).read_text()
    header = (_SRC / "q8_common.cuh").read_text().replace("#pragma once", "")
    return text.replace('#include "q8_common.cuh"', header)


def _tokens_per_stage(head_dim: int) -> int:
    """TOK in q8_attention_tc.cu, for split sizing."""
    per = max(1, (_TC_STAGE_CODE_TARGET // (2 * head_dim)) // (_NWARPS * 16))
    return per * _NWARPS * 16


@dataclass
class _AttnKernel:
    kernel: cp.RawKernel
    tok: int
    gt: int
    smem: int
    blocks_per_sm: int


@dataclass
class _Launch:
    kernel: _AttnKernel
    meta_row: int  # first meta row of the launch
    nitems: int
    units: int
    head_dim: int


@dataclass
class Batch:
    """A packed batch: host buffer layout, kernel launches and where each output lands."""

    nbytes: int
    nitems: int
    ptab_off: int
    q_blocks: int
    launches: list[_Launch]
    outputs: list[tuple[int, tuple[int, int, int]]]  # (float offset, shape) per caller item
    out_floats: int
    part_floats: int
    counters: int
    dev: cp.ndarray | None = None  # own device copy of the inputs (benchmarks)
    extra: dict = field(default_factory=dict)


# Compiled once per process and device (CuPy also caches the binaries on disk).
_PAGES_MODULES: dict[int, cp.RawModule] = {}
_ATTN_KERNELS: dict[int, dict[tuple[int, int, int], _AttnKernel]] = {}


class _Pinned:
    """A growing page-locked host buffer (viewed as uint8)."""

    def __init__(self) -> None:
        self.mem = None
        self.view = np.empty(0, np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if nbytes > self.view.size:
            size = max(nbytes, 2 * self.view.size, 1 << 20)
            self.mem = cp.cuda.alloc_pinned_memory(size)
            self.view = np.frombuffer(self.mem, dtype=np.uint8, count=size)
        return self.view


def _grow(arr: cp.ndarray | None, size: int, dtype, zero: bool = False) -> cp.ndarray:
    if arr is not None and arr.size >= size:
        return arr
    size = max(size, 2 * (arr.size if arr is not None else 0), 1024)
    return cp.zeros(size, dtype) if zero else cp.empty(size, dtype)


class CupyBackend(Backend):
    name = "cupy"
    max_head_dim = 256  # the attention kernel keeps a head's q slice in registers

    def __init__(
        self,
        num_pages: int,
        page_code_bytes: int = DEFAULT_PAGE_CODE_BYTES,
        device_id: int | None = None,
    ) -> None:
        super().__init__(num_pages, page_code_bytes)
        dev_id = cp.cuda.runtime.getDevice() if device_id is None else device_id
        self._device = cp.cuda.Device(dev_id)
        props = cp.cuda.runtime.getDeviceProperties(dev_id)
        self._name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self._sm_count = int(props["multiProcessorCount"])
        # Splits per launch aim at this many waves of resident blocks (tunable for benchmarks).
        self.split_waves = float(os.environ.get("Q8KV_SPLIT_WAVES", "1"))
        # Tests set this: outputs and split partials are filled with NaN before each launch,
        # so an element the kernels fail to write cannot pass as a stale right answer.
        self.poison_outputs = False
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            self.codes = cp.zeros((num_pages, page_code_bytes), dtype=cp.int8)
            self.scales = cp.zeros((num_pages, page_code_bytes // QBLOCK), dtype=cp.float32)
            mod = _PAGES_MODULES.get(dev_id)
            if mod is None:
                # CuPy appends -ftz=true to every compile, so q8_pages.cu handles subnormals
                # itself; IEEE division and no FMA contraction keep the codes bit-exact.
                mod = cp.RawModule(
                    code=_source("q8_pages.cu"),
                    options=("--std=c++17", "--prec-div=true", "--fmad=false"),
                )
                _PAGES_MODULES[dev_id] = mod
            # Reused CUDA events around each kernel: device time for the metrics.
            self._marks = [cp.cuda.Event() for _ in range(3)]
            self._append_k = mod.get_function("q8_append")
            self._dequant_k = mod.get_function("q8_dequantize")
        self._attn = _ATTN_KERNELS.setdefault(dev_id, {})
        self._host_in = _Pinned()
        self._host_out = _Pinned()
        self._dev_in: cp.ndarray | None = None
        self._dev_out: cp.ndarray | None = None
        self._part: cp.ndarray | None = None
        self._counters: cp.ndarray | None = None

    # -- properties and helpers for the server --------------------------------------------

    @property
    def device_name(self) -> str:
        return self._name

    @property
    def stream(self) -> cp.cuda.Stream:
        return self._stream

    @staticmethod
    def free_device_bytes(device_id: int | None = None) -> int:
        """Free device memory now, counting blocks CuPy's pool holds but does not use."""
        dev = cp.cuda.Device(cp.cuda.runtime.getDevice() if device_id is None else device_id)
        with dev:
            free, _total = cp.cuda.runtime.memGetInfo()
            return int(free) + int(cp.get_default_memory_pool().free_bytes())

    def close(self) -> None:
        with self._device:
            self._stream.synchronize()
            for attr in ("codes", "scales", "_dev_in", "_dev_out", "_part", "_counters"):
                setattr(self, attr, None)
            self._host_in = _Pinned()
            self._host_out = _Pinned()
            cp.get_default_memory_pool().free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()

    def _attn_kernel(self, head_dim: int) -> _AttnKernel:
        k = self._attn.get(head_dim)
        if k is None:
            gt = _ROWS_PER_TILE
            opts = (
                "--std=c++17",
                f"-DHEAD_DIM={head_dim}",
                f"-DGT={gt}",
                f"-DNWARPS={_NWARPS}",
                f"-DNSTAGES={_TC_NSTAGES}",
                f"-DSTAGE_CODE_TARGET={_TC_STAGE_CODE_TARGET}",
                f"-DMINBLOCKS={_TC_MINBLOCKS if head_dim <= 128 else 1}",
            )
            with self._device:
                mod = cp.RawModule(code=_source("q8_attention_tc.cu"), options=opts)
                fn = mod.get_function("q8_attend")
            tok = _tokens_per_stage(head_dim)
            row = head_dim + 16  # shared-memory rows are padded against bank conflicts
            stage = 2 * tok * row + 2 * tok * (head_dim // QBLOCK) * 4
            smem = _TC_NSTAGES * stage
            fn.max_dynamic_shared_size_bytes = smem
            threads = 32 * _NWARPS
            regs_per_warp = -(-fn.num_regs * 32 // 256) * 256
            by_regs = 65536 // (regs_per_warp * _NWARPS)
            by_smem = _SMEM_PER_SM // (smem + fn.shared_size_bytes + 1024)
            bps = max(1, min(by_regs, by_smem, 2048 // threads, 32))
            k = _AttnKernel(fn, tok, gt, smem, bps)
            self._attn[head_dim] = k
        return k

    # -- packing ---------------------------------------------------------------------------

    def prepare(self, items: Sequence[AttendItem], own_device_copy: bool = False) -> Batch:
        """Pack ``items`` into the pinned host buffer and plan the launches."""
        live = [j for j, it in enumerate(items) if it.n > 0]
        keys = {}
        for j in live:
            lay = items[j].layout
            if (
                lay.head_dim % QBLOCK
                or lay.head_dim > 256
                or lay.tokens_per_page & (lay.tokens_per_page - 1)
            ):
                raise ValueError(f"cupy backend: unsupported layout {lay} (head_dim <= 256)")
            keys[j] = (lay.head_dim,)
        order = sorted(live, key=lambda j: keys[j])  # items of one kernel variant adjacent

        # Arrays, dtypes (mixed dtypes in one item fall back to float32 on the host).
        arrays = []
        for j in order:
            it = items[j]
            q, k, v = it.q, it.k, it.v
            if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPE_CODE:
                q, k, v = (a.astype(np.float32) for a in (q, k, v))
            arrays.append([np.ascontiguousarray(a) for a in (q, k, v)])

        nrows = len(order)
        meta_bytes = nrows * _META * 4
        ptab_off = meta_bytes
        pt_sizes = [len(items[j].page_ids) for j in order]
        off = ptab_off + 4 * sum(pt_sizes)
        in_offs = []
        for qkv in arrays:
            offs = []
            for a in qkv:
                off = -(-off // 16) * 16
                offs.append(off)
                off += a.nbytes
            in_offs.append(offs)
        nbytes = -(-off // 16) * 16
        if nbytes >= 2**31:
            raise ValueError(f"batch too large for one launch: {nbytes} bytes of inputs")
        host = self._host_in.get(nbytes)
        meta = host[:meta_bytes].view(np.int32).reshape(nrows, _META)
        meta[:] = 0

        outputs: list[tuple[int, tuple[int, int, int]]] = [(0, (0, 0, 0))] * len(items)
        out_off = 0
        qb = 0
        pt_pos = 0
        for row, j in enumerate(order):
            it, lay = items[j], items[j].layout
            m = meta[row]
            q, k, v = arrays[row]
            for a, o in zip((q, k, v), in_offs[row], strict=True):
                host[o : o + a.nbytes] = a.reshape(-1).view(np.uint8)
            ids = np.asarray(it.page_ids, dtype=np.int32)
            host[ptab_off + 4 * pt_pos : ptab_off + 4 * (pt_pos + ids.size)] = ids.view(np.uint8)
            m[M_Q], m[M_K], m[M_V] = in_offs[row]
            m[M_DT] = _DTYPE_CODE[q.dtype]
            m[M_PT] = pt_pos
            m[M_START], m[M_N] = it.start, it.n
            m[M_H], m[M_KVH] = lay.num_heads, lay.num_kv_heads
            m[M_LOGT] = lay.tokens_per_page.bit_length() - 1
            m[M_OUT] = out_off
            m[M_SCALE] = np.float32(it.softmax_scale * _LOG2E).view(np.int32)
            m[M_G] = lay.group
            m[M_QB] = qb
            m[M_D] = lay.head_dim
            outputs[j] = (out_off, (it.n, lay.num_heads, lay.head_dim))
            out_off += it.n * lay.num_heads * lay.head_dim
            qb += 2 * it.n * lay.num_kv_heads * lay.blocks
            pt_pos += ids.size
        for j, it in enumerate(items):
            if it.n == 0:
                outputs[j] = (-1, (0, it.layout.num_heads, it.layout.head_dim))

        launches, part_floats, counters = self._plan_attention(items, order, keys, meta)
        batch = Batch(nbytes, nrows, ptab_off, qb, launches, outputs, out_off, part_floats,
                      counters)  # fmt: skip
        if own_device_copy:
            with self._device:
                batch.dev = cp.empty(nbytes, cp.uint8)
                batch.dev.set(host[:nbytes])
        return batch

    def _plan_attention(self, items, order, keys, meta) -> tuple[list[_Launch], int, int]:
        """Split sizes, unit and counter prefixes per kernel variant (one launch each)."""
        launches = []
        part_floats = 0
        max_counters = 0
        row = 0
        while row < len(order):
            key = keys[order[row]]
            end = row
            while end < len(order) and keys[order[end]] == key:
                end += 1
            kern = self._attn_kernel(*key)
            gt, tok = kern.gt, kern.tok
            tiles, lens = [], []
            for r in range(row, end):
                it = items[order[r]]
                rt = -(-it.n * it.layout.group // gt)
                tiles.append(it.layout.num_kv_heads * rt)
                lens.append(it.start + it.n)
            work = sum(t * n for t, n in zip(tiles, lens, strict=True))
            slots = self._sm_count * kern.blocks_per_sm * self.split_waves
            # Splits as short as one stage: at batch 1 the per-stage compute latency, not the
            # merge, dominates (4-stage minimum measured 21 us vs 16 us at 1 x 1024).
            ideal = max(tok, math.ceil(work / slots))
            units = 0
            cnt = 0
            for r in range(row, end):
                it = items[order[r]]
                length = lens[r - row]
                t_page = it.layout.tokens_per_page
                max_chunk = max(tok, ((_MAXP - 1) * t_page // tok) * tok)
                nsplit = min(_MAX_SPLITS, max(1, round(length / ideal)))
                nsplit = max(nsplit, -(-length // max_chunk))  # page ids must fit smem
                chunk = -(-math.ceil(length / nsplit) // tok) * tok  # balanced splits
                nsplit = -(-length // chunk)
                m = meta[r]
                m[M_RT] = -(-it.n * it.layout.group // gt)
                m[M_NSPLIT], m[M_CHUNK] = nsplit, chunk
                m[M_UNIT], m[M_CNT] = units, cnt
                units += tiles[r - row] * nsplit
                cnt += tiles[r - row]
            launches.append(_Launch(kern, row, end - row, units, key[0]))
            part_floats = max(part_floats, units * gt * (key[0] + 2))
            max_counters = max(max_counters, cnt)
            row = end
        return launches, part_floats, max_counters

    # -- device work -----------------------------------------------------------------------

    def _ensure(self, batch: Batch) -> None:
        self._dev_out = _grow(self._dev_out, max(batch.out_floats, 1), cp.float32)
        self._part = _grow(self._part, max(batch.part_floats, 1), cp.float32)
        self._counters = _grow(self._counters, max(batch.counters, 1), cp.int32, zero=True)
        if self.poison_outputs:
            self._dev_out.fill(np.nan)
            self._part.fill(np.nan)

    def upload(self, batch: Batch) -> None:
        """One H2D copy of the packed inputs (async on the backend's stream)."""
        self._dev_in = _grow(self._dev_in, batch.nbytes, cp.uint8)
        if batch.nbytes:
            self._dev_in.data.copy_from_host_async(
                ctypes.c_void_p(self._host_in.mem.ptr), batch.nbytes, self._stream
            )

    def _in_ptr(self, batch: Batch) -> int:
        return (batch.dev if batch.dev is not None else self._dev_in).data.ptr

    def launch_append(self, batch: Batch) -> None:
        if not batch.q_blocks:
            return
        base = self._in_ptr(batch)
        threads = 128
        with self._device, self._stream:
            self._launch_append(batch, base, threads)

    def _launch_append(self, batch: Batch, base: int, threads: int) -> None:
        self._append_k(
            (-(-batch.q_blocks // threads),),
            (threads,),
            (
                np.uint64(base),
                np.int32(batch.nitems),
                np.int32(batch.q_blocks),
                np.uint64(base + batch.ptab_off),
                np.uint64(base),
                self.codes,
                self.scales,
                np.int32(self.page_code_bytes),
            ),
        )

    def launch_attention(self, batch: Batch) -> None:
        with self._device, self._stream:
            self._launch_attention(batch)

    def _launch_attention(self, batch: Batch) -> None:
        self._ensure(batch)
        base = self._in_ptr(batch)
        part = self._part.data.ptr
        for ln in batch.launches:
            # Partials: acc [units, GT, D] floats, then (max, sum) pairs [units, GT, 2].
            ml_ptr = part + 4 * ln.units * ln.kernel.gt * ln.head_dim
            ln.kernel.kernel(
                (ln.units,),
                (32 * _NWARPS,),
                (
                    np.uint64(base + ln.meta_row * _META * 4),
                    np.int32(ln.nitems),
                    np.uint64(base + batch.ptab_off),
                    np.uint64(base),
                    self.codes,
                    self.scales,
                    np.int32(self.page_code_bytes),
                    self._dev_out,
                    np.uint64(part),
                    np.uint64(ml_ptr),
                    self._counters,
                ),
                shared_mem=ln.kernel.smem,
            )

    def download(self, batch: Batch) -> list[np.ndarray]:
        """One D2H copy of all outputs, one synchronize, then per-item arrays."""
        host = self._host_out.get(4 * max(batch.out_floats, 1))
        if batch.out_floats:
            self._dev_out.data.copy_to_host_async(
                ctypes.c_void_p(self._host_out.mem.ptr), 4 * batch.out_floats, self._stream
            )
        self._stream.synchronize()
        flat = host[: 4 * batch.out_floats].view(np.float32)
        result = []
        for off, shape in batch.outputs:
            if off < 0:
                result.append(np.empty(shape, np.float32))
            else:
                size = shape[0] * shape[1] * shape[2]
                result.append(flat[off : off + size].reshape(shape).copy())
        return result

    # -- Backend ---------------------------------------------------------------------------

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if not items:
            return []
        with self._device:
            batch = self.prepare(items)
            self.upload(batch)
            marks = self._marks
            marks[0].record(self._stream)
            started = time.perf_counter()
            self.launch_append(batch)
            appended = time.perf_counter()
            marks[1].record(self._stream)
            self.launch_attention(batch)
            attended = time.perf_counter()
            marks[2].record(self._stream)
            outputs = self.download(batch)  # synchronizes: the events below are complete
        elapsed = cp.cuda.get_elapsed_time
        self.on_kernel("quantize_append", appended - started, elapsed(marks[0], marks[1]) / 1e3)
        self.on_kernel("attention", attended - appended, elapsed(marks[1], marks[2]) / 1e3)
        return outputs

    def dequantize_device(self, layout: LayerLayout, page_ids, start: int, end: int) -> cp.ndarray:
        """K and V of tokens [start, end) as a device float32 array [2, KVH, end-start, D].

        ``page_ids`` may be a numpy or a device int32 array. Runs on the backend's stream.
        """
        kvh, d = layout.num_kv_heads, layout.head_dim
        length = max(0, end - start)
        with self._device, self._stream:
            ptab = cp.asarray(page_ids, dtype=cp.int32)
            out = cp.empty((2, kvh, length, d), cp.float32)
            total = 2 * kvh * length * (d // 16)
            if total:
                self._dequant_k(
                    (-(-total // 256),),
                    (256,),
                    (
                        ptab,
                        np.int32(layout.tokens_per_page.bit_length() - 1),
                        np.int32(kvh),
                        np.int32(d),
                        np.int32(start),
                        np.int32(length),
                        self.codes,
                        self.scales,
                        np.int32(self.page_code_bytes),
                        out,
                    ),
                )
        return out

    def dequantize(
        self, layout: LayerLayout, page_ids: np.ndarray, start: int, end: int
    ) -> tuple[np.ndarray, np.ndarray]:
        marks = self._marks
        with self._device:
            marks[0].record(self._stream)
        started = time.perf_counter()
        out = self.dequantize_device(layout, np.asarray(page_ids, dtype=np.int32), start, end)
        launched = time.perf_counter()
        with self._device:
            marks[1].record(self._stream)
            host = out.get(stream=self._stream)
            # An empty read copies nothing and so does not wait for the stream.
            marks[1].synchronize()
        seconds = cp.cuda.get_elapsed_time(marks[0], marks[1]) / 1e3
        self.on_kernel("dequantize", launched - started, seconds)
        return np.ascontiguousarray(host[0]), np.ascontiguousarray(host[1])

    def read_pages(self, page_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._device, self._stream:
            ids = cp.asarray(np.asarray(page_ids, dtype=np.int64))
            return self.codes[ids].get(stream=self._stream), self.scales[ids].get(
                stream=self._stream
            )

    def write_pages(self, page_ids: np.ndarray, codes: np.ndarray, scales: np.ndarray) -> None:
        with self._device, self._stream:
            ids = cp.asarray(np.asarray(page_ids, dtype=np.int64))
            self.codes[ids] = cp.asarray(np.asarray(codes, dtype=np.int8))
            self.scales[ids] = cp.asarray(np.asarray(scales, dtype=np.float32))
            self._stream.synchronize()
