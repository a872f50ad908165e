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

from q8kv.format import DEFAULT_PAGE_CODE_BYTES, QBLOCK

from ..base import AttendItem, Backend, PackedItems
from . import kernels
from .chunked import ChunkedPrefill
from .kernels import MAX_HEAD_DIM, AttnKernel
from .meta import META
from .packing import Batch, pack, pack_packed
from .page_io import PageIO
from .planning import DECODE, PREFILL_BF16, SplitPolicy, takes_chunks
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


class CupyBackend(PageIO, Backend):
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
        self._chunked = ChunkedPrefill()  # a large single prefill, copies overlapping work

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
            self._chunked.close()
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

    def _ensure(self, batch: Batch, own_out: bool = True) -> None:
        """Device buffers for the batch's outputs (unless the caller gives its own) and
        split partials; NaN-poisoned where tests ask."""
        if own_out:
            self._dev_out = grow(self._dev_out, max(batch.out_floats, 1), cp.float32)
        self._part = grow(self._part, max(batch.part_floats, 1), cp.float32)
        self._counters = grow(self._counters, max(batch.counters, 1), cp.int32, zero=True)
        if self.poison_outputs:
            if own_out:
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
                self.codes,
                self.scales,
                np.int32(self.page_code_bytes),
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

    def launch_attention(self, batch: Batch, out: cp.ndarray | None = None) -> None:
        """The batch's attention launches; the outputs into ``out`` (float32, the batch's
        out_floats) where given, else into the backend's own output buffer."""
        with self._device, self._stream:
            self._launch_attention(batch, out)

    def _launch_attention(self, batch: Batch, out: cp.ndarray | None = None) -> None:
        self._ensure(batch, own_out=out is None)
        out = self._dev_out if out is None else out
        base = self._in_ptr(batch)
        part = self._part.data.ptr
        for ln in batch.launches:
            args = (
                np.uint64(base + ln.meta_row * META * 4),
                np.int32(ln.nitems),
                np.uint64(base + batch.ptab_off),
                np.uint64(base),
                self.codes,
                self.scales,
                np.int32(self.page_code_bytes),
                out,
            )
            kern = ln.kernel
            if kern.tiles is not None and not batch.tiles_at:
                kern = kern.fallback  # no scratch: K/V dequantized in the kernel's loop
            elif kern.tiles is not None:
                tiles = np.uint64(batch.tiles_at)
                if ln.cached:  # the tiles of tokens cached before the call (q8_kv_tiles)
                    kern.tiles(
                        (4 * ln.tile_pairs,),
                        (256,),
                        (args[0], args[1], np.int32(ln.first_pair), *args[2:3], *args[4:7],
                         tiles),
                    )  # fmt: skip
                args = (args[0], args[1], args[3], tiles, out)
            if not kern.prefill:  # q8_attend: split partials and their counters too
                # Partials: acc [units, GT, D] floats, then (max, sum) pairs [units, GT, 2].
                ml_ptr = part + 4 * ln.units * kern.gt * ln.head_dim
                args += (np.uint64(part), np.uint64(ml_ptr), self._counters)
            kern.kernel((ln.units,), (kern.threads,), args, shared_mem=kern.smem)

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
            self.narrow(0, n, dtype == ml_dtypes.bfloat16)
        return self._download(self._dev_narrow, 2 * n, dtype)

    def narrow(self, first: int, count: int, bf16: bool) -> None:
        """Outputs [first, first + count) of the float32 buffer to the 16-bit one, on the
        backend's stream, after the attention: the stream is non-blocking, so a launch on
        CuPy's default stream would not wait for the outputs it reads."""
        with self._stream:
            self._narrow_k(
                (-(-count // 256),),
                (256,),
                (self._dev_out[first:], self._dev_narrow[first:], np.int64(count),
                 np.int32(bf16)),
            )  # fmt: skip

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

    def report_chunks(self, launches: list[float], marks: list) -> None:
        """Per-kernel metrics of a call run in chunks (chunked.py): launch seconds and the
        events' device seconds, added up over the chunks."""
        elapsed = cp.cuda.get_elapsed_time
        appended = sum(elapsed(a, b) for a, b, _ in marks) / 1e3
        self.on_kernel("quantize_append", launches[0], appended)
        self.on_kernel("attention", launches[1], sum(elapsed(b, c) for _, b, c in marks) / 1e3)

    def append_and_attend(self, items: Sequence[AttendItem]) -> list[np.ndarray]:
        if not items:
            return []
        if takes_chunks(items):  # one large prefill: its copies overlap its device work
            with self._device:
                return [self._chunked.run(self, items[0])]
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
