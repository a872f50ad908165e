"""The GPU backend: the page pool in device memory, the math in CUDA kernels (CuPy RawModule).

Kernels live beside this file as .cu sources (q8_pages.cu: quantize-append, dequantize;
q8_attention_tc.cu: fused paged attention on tensor cores, float32-grade; q8_prefill*.cu:
16-bit prefill), compiled by kernels.py. One
``append_and_attend`` call is: pack every item's metadata, page table and raw q/k/v bytes
into one pinned host buffer (packing.py) -> one H2D copy -> one quantize-append launch ->
one attention launch per head_dim (normally one) -> one D2H copy of all outputs -> one
stream synchronize.

The backend is driven from one worker thread (base.Backend); it holds no locks.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

import cupy as cp
import ml_dtypes
import numpy as np

from q8kv.format import DEFAULT_PAGE_CODE_BYTES, QBLOCK, LayerLayout

from ..base import AttendItem, Backend, PackedItems
from . import kernels
from .kernels import MAX_HEAD_DIM, AttnKernel
from .meta import META
from .packing import Batch, pack, pack_packed
from .planning import DECODE, PREFILL_BF16, Launch, SplitPolicy
from .transfers import (
    FRESH_OUTPUT_BYTES,
    NARROW,
    Pinned,
    Scratch,
    Uploader,
    grow,
    one_narrow_dtype,
    pooled_pinned,
    split_outputs,
)
from .tuning import GpuTuning


class CupyBackend(Backend):
    name = "cupy"
    max_head_dim = MAX_HEAD_DIM

    def __init__(
        self,
        num_pages: int,
        page_code_bytes: int = DEFAULT_PAGE_CODE_BYTES,
        device_id: int | None = None,
        tuning: GpuTuning | None = None,
    ) -> None:
        super().__init__(num_pages, page_code_bytes)
        dev_id = cp.cuda.runtime.getDevice() if device_id is None else device_id
        self._device = cp.cuda.Device(dev_id)
        props = cp.cuda.runtime.getDeviceProperties(dev_id)
        self._name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self._sm_count = int(props["multiProcessorCount"])
        self.tuning = GpuTuning() if tuning is None else tuning
        self._smem_limit = int(props.get("sharedMemPerBlockOptin", 227 * 1024))
        kernels.check_tuning(self.tuning, self._smem_limit)
        # Benchmarks and tests sweep this one without a new backend.
        self.split_waves = self.tuning.split_waves
        # Tests set this: outputs and split partials are filled with NaN before each launch,
        # so an element the kernels fail to write cannot pass as a stale right answer.
        self.poison_outputs = False
        with self._device:
            self._stream = cp.cuda.Stream(non_blocking=True)
            self.codes = cp.zeros((num_pages, page_code_bytes), dtype=cp.int8)
            self.scales = cp.zeros((num_pages, page_code_bytes // QBLOCK), dtype=cp.float32)
            mod = kernels.pages_module(dev_id)
            # Reused CUDA events around each kernel: device time for the metrics.
            self._marks = [cp.cuda.Event() for _ in range(3)]
            self._append_k = mod.get_function("q8_append")
            self._dequant_k = mod.get_function("q8_dequantize")
            self._narrow_k = mod.get_function("q8_narrow")
        self._dev_id = dev_id
        self._host_in = Pinned()
        self._host_out = Pinned()
        self._dev_in: cp.ndarray | None = None
        self._dev_out: cp.ndarray | None = None
        self._dev_narrow: cp.ndarray | None = None  # the output in a 16-bit wire dtype
        self._part: cp.ndarray | None = None
        self._counters: cp.ndarray | None = None
        self._tiles = Scratch()  # prefill K/V in 16-bit tiles (q8_prefill_ws.cu)
        self._uploader = Uploader()

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
            for attr in ("codes", "scales", "_dev_in", "_dev_out", "_dev_narrow", "_part",
                         "_counters"):  # fmt: skip
                setattr(self, attr, None)
            self._host_in = Pinned()
            self._host_out = Pinned()
            self._tiles = Scratch()
            self._uploader.close()
            cp.get_default_memory_pool().free_all_blocks()
            cp.get_default_pinned_memory_pool().free_all_blocks()

    def _attn_kernel(self, head_dim: int, route: int = DECODE) -> AttnKernel:
        # A prefill kernel that needs more shared memory than the device gives a block
        # (D = 256 on a GPU with ~100 KiB) leaves its items to the float32-grade kernel.
        if route == DECODE or not kernels.prefill_fits(self._dev_id, head_dim, self._smem_limit):
            return kernels.attention_kernel(self._dev_id, head_dim, self.tuning)
        return kernels.prefill_kernel(self._dev_id, head_dim, route == PREFILL_BF16)

    # -- packing ---------------------------------------------------------------------------

    def _policy(self) -> SplitPolicy:
        return SplitPolicy(self._sm_count, self.split_waves, self.tuning.max_splits)

    def prepare(self, items: Sequence[AttendItem], own_device_copy: bool = False) -> Batch:
        """Pack ``items`` into the pinned host buffer and plan the launches."""
        batch = pack(items, self._host_in.get, self._attn_kernel, self._policy())
        if own_device_copy:
            batch.finish_copies(self._host_in.view)
            with self._device:
                batch.dev = cp.empty(batch.nbytes, cp.uint8)
                batch.dev.set(self._host_in.view[: batch.nbytes], stream=self._stream)
                self._stream.synchronize()  # the pinned buffer is reused by the next prepare
        return batch

    # -- device work -----------------------------------------------------------------------

    def _ensure(self, batch: Batch) -> None:
        self._dev_out = grow(self._dev_out, max(batch.out_floats, 1), cp.float32)
        self._part = grow(self._part, max(batch.part_floats, 1), cp.float32)
        self._counters = grow(self._counters, max(batch.counters, 1), cp.int32, zero=True)
        if self.poison_outputs:
            self._dev_out.fill(np.nan)
            self._part.fill(np.nan)

    def upload(self, batch: Batch) -> None:
        """The packed inputs to the device (async on the backend's stream): one H2D copy,
        or for a large batch the head and then its q/k/v in chunks (transfers.Uploader)."""
        self._dev_in = grow(self._dev_in, batch.nbytes, cp.uint8)
        self._uploader.upload(batch, self._host_in, self._dev_in, self._stream)

    def _in_ptr(self, batch: Batch) -> int:
        return (batch.dev if batch.dev is not None else self._dev_in).data.ptr

    def launch_append(self, batch: Batch) -> None:
        """Quantize-append every item's k/v (and write the new tokens' 16-bit tiles where
        a prefill launch reads them: the scratch is taken here, ``batch.tiles_at``)."""
        batch.tiles_at = self._tile_scratch(batch)
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
                *self._pool_args(),
                np.uint64(batch.tiles_at),
            ),
        )

    def _tile_scratch(self, batch: Batch) -> int:
        """Device address of the scratch for the batch's 16-bit K/V tiles (q8_prefill_ws.cu),
        or 0: none needed, more than --gpu-prefill-scratch-bytes, or no device memory for it
        (its launches then run on their fallback kernels, which dequantize in their loop)."""
        if not batch.tile_bytes:
            return 0
        with self._device, self._stream:  # a new buffer is this stream's in CuPy's pool
            return self._tiles.take(batch.tile_bytes, self.tuning.prefill_scratch_bytes)

    def launch_attention(self, batch: Batch) -> None:
        with self._device, self._stream:
            self._launch_attention(batch)

    def _launch_attention(self, batch: Batch) -> None:
        self._ensure(batch)
        part = self._part.data.ptr
        for ln in batch.launches:
            meta, inbuf, ptab = self._pointers(batch, ln)
            nitems = np.int32(ln.nitems)
            kern = ln.kernel
            if kern.tiles is not None and not batch.tiles_at:
                kern = kern.fallback  # no scratch: K/V dequantized in the kernel's loop
            if kern.tiles is not None:  # over the 16-bit tiles
                if ln.cached:
                    self.launch_cached_tiles(batch, ln)
                args = (meta, nitems, inbuf, np.uint64(batch.tiles_at), self._dev_out)
            else:
                args = (meta, nitems, ptab, inbuf, *self._pool_args(), self._dev_out)
            if not kern.prefill:  # q8_attend: split partials and their counters too
                # Partials: acc [units, GT, D] floats, then (max, sum) pairs [units, GT, 2].
                ml_ptr = part + 4 * ln.units * kern.gt * ln.head_dim
                args += (np.uint64(part), np.uint64(ml_ptr), self._counters)
            kern.kernel((ln.units,), (kern.threads,), args, shared_mem=kern.smem)

    def launch_cached_tiles(self, batch: Batch, ln: Launch) -> None:
        """q8_kv_tiles of a launch over 16-bit tiles: the tokens cached before the call, into
        the batch's scratch (``launch_append`` took it and wrote the new tokens')."""
        meta, _inbuf, ptab = self._pointers(batch, ln)
        args = (meta, np.int32(ln.nitems), np.int32(ln.first_pair), ptab, *self._pool_args(),
                np.uint64(batch.tiles_at))  # fmt: skip
        with self._device, self._stream:
            ln.kernel.tiles((kernels.TILE_PARTS * ln.tile_pairs,), (256,), args)

    def _pointers(self, batch: Batch, ln: Launch) -> tuple[np.uint64, np.uint64, np.uint64]:
        """Device addresses of the launch's meta rows, the input buffer and the page ids."""
        base = self._in_ptr(batch)
        return (np.uint64(base + ln.meta_row * META * 4), np.uint64(base),
                np.uint64(base + batch.ptab_off))  # fmt: skip

    def _pool_args(self) -> tuple:
        return self.codes, self.scales, np.int32(self.page_code_bytes)

    def _download(self, dev: cp.ndarray | None, nbytes: int, dtype) -> tuple[np.ndarray, bool]:
        """One D2H copy of ``nbytes`` of ``dev`` and one synchronize: the bytes as
        ``dtype``, and whether they are the caller's own (a pooled pinned block, from
        FRESH_OUTPUT_BYTES) or a view of the reused buffer (valid until the next call)."""
        fresh = nbytes >= FRESH_OUTPUT_BYTES
        host = pooled_pinned(nbytes) if fresh else self._host_out.get(max(nbytes, 4))
        if nbytes:
            dev.data.copy_to_host_async(ctypes.c_void_p(host.ctypes.data), nbytes, self._stream)
        self._stream.synchronize()
        return host[:nbytes].view(dtype), fresh

    def _download_flat(self, batch: Batch) -> tuple[np.ndarray, bool]:
        """All outputs as float32 [out_floats] (see ``_download``)."""
        return self._download(self._dev_out, 4 * batch.out_floats, np.float32)

    def _download_narrow(self, batch: Batch, dtype: np.dtype) -> tuple[np.ndarray, bool]:
        """All outputs narrowed to a 16-bit ``dtype`` on the device: half the bytes back,
        no host conversion (see ``_download``)."""
        n = batch.out_floats
        if n:
            self._dev_narrow = grow(self._dev_narrow, n, cp.uint16)
            to_bf16 = np.int32(dtype == ml_dtypes.bfloat16)
            # On the backend's stream, after the attention: the stream is non-blocking, so a
            # launch on CuPy's default stream would not wait for the outputs it reads.
            with self._stream:
                self._narrow_k(
                    (-(-n // 256),),
                    (256,),
                    (self._dev_out, self._dev_narrow, np.int64(n), to_bf16),
                )
        return self._download(self._dev_narrow, 2 * n, dtype)

    def download(self, batch: Batch, items: Sequence[AttendItem]) -> list[np.ndarray]:
        """Every item's output in its ``out_dtype``: narrowed on the device when all share
        one 16-bit dtype (the usual case: one wire), else float32 cast on the host."""
        one = one_narrow_dtype(items)
        if one is not None:
            flat, fresh = self._download_narrow(batch, one)
        else:
            flat, fresh = self._download_flat(batch)
        return split_outputs(batch.outputs, items, flat, fresh)

    # -- Backend ---------------------------------------------------------------------------

    def _run(self, batch: Batch) -> tuple[float, float]:
        """Upload, quantize-append, attention, with an event around each kernel; returns
        the host seconds each launch took."""
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
        return appended - started, attended - appended

    def _report(self, launches: tuple[float, float]) -> None:
        """Per-kernel metrics, once the stream is synchronized (the events are complete)."""
        marks, elapsed = self._marks, cp.cuda.get_elapsed_time
        self.on_kernel("quantize_append", launches[0], elapsed(marks[0], marks[1]) / 1e3)
        self.on_kernel("attention", launches[1], elapsed(marks[1], marks[2]) / 1e3)

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if not items:
            return []
        with self._device:
            batch = self.prepare(items)
            launches = self._run(batch)
            outputs = self.download(batch, items)  # synchronizes: the events are complete
        self._report(launches)
        return outputs

    def attend_packed(self, batch: PackedItems) -> np.ndarray:
        """The packed batch through the same launches: inputs copied once per tensor into
        the pinned buffer, one [B, n, H, D] float32 output copied back, cast once."""
        with self._device:
            packed = pack_packed(batch, self._host_in.get, self._attn_kernel, self._policy())
            launches = self._run(packed)
            dtype = np.dtype(batch.out_dtype)
            if dtype in NARROW:
                # Narrowed on the device: half the bytes back, no host conversion.
                flat, fresh = self._download_narrow(packed, dtype)  # synchronizes
            else:
                flat, fresh = self._download_flat(packed)
                if flat.dtype != dtype:
                    flat, fresh = flat.astype(dtype), True
            lay = batch.layout
            shape = (batch.size, batch.n, lay.num_heads, lay.head_dim)
            out = flat.reshape(shape)
            if not fresh:
                out = out.copy()  # the pinned buffer is reused
        self._report(launches)
        return out

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
