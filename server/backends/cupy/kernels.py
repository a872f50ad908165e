"""The CUDA kernels of the GPU backend: sources, compile options and the compiled-kernel cache.

q8_pages.cu (quantize-append, dequantize) compiles once per device; q8_attention_tc.cu once
per device, head_dim and pipeline tuning; q8_prefill.cu once per device and head_dim (CuPy
also keeps the binaries in its on-disk cache). q8_prefill_wg.cu (wgmma) needs sm_90a, which
CuPy's compile cannot name: NVRTC builds it here and the cubin goes to CuPy's cache
directory. All inline q8_common.cuh, the metadata row layout shared with packing.py.

CuPy is imported where a kernel is compiled, so the arithmetic here (and packing.py) runs
without a GPU: the server checks its tuning and the tests plan launches on any machine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from q8kv.format import QBLOCK

from .tuning import GpuTuning
from .wgmma import wgmma_wrappers

if TYPE_CHECKING:
    import cupy as cp

_SRC = Path(__file__).resolve().parent
MAX_HEAD_DIM = 256  # the attention kernel keeps a head's q slice in registers
NWARPS = 4
MAXP = 1024  # page ids per split held in shared memory (MAXP in q8_attention_tc.cu)
ROWS_PER_TILE = 8  # GT of q8_attention_tc.cu: the N of both tensor-core products
_SMEM_PER_SM = 228 * 1024
# CuPy appends -ftz=true to every compile, so q8_pages.cu handles subnormals itself; IEEE
# division and no FMA contraction keep the codes bit-exact.
_PAGES_OPTIONS = ("--std=c++17", "--prec-div=true", "--fmad=false")


@dataclass
class AttnKernel:
    """A compiled attention kernel and what the launch planning needs to know of it."""

    kernel: Any  # cupy.RawKernel
    tok: int  # tokens per pipeline stage: splits are multiples of it
    gt: int  # rows per tile
    smem: int  # dynamic shared memory bytes per block
    blocks_per_sm: int
    prefill: bool = False  # q8_prefill.cu: one unit per (item, kv head, row tile), no splits
    threads: int = 32 * NWARPS  # per block
    max_pages: int = MAXP  # page ids a split may span (q8_attend)
    # q8_prefill_ws.cu: the kernel that dequantizes the launch's K/V into 16-bit tile pairs
    # of tile_bytes each first, and the kernel of the same units that dequantizes in its own
    # loop instead, for a launch whose tiles the scratch cannot hold.
    tiles: Any = None
    tile_bytes: int = 0
    fallback: AttnKernel | None = None
    module: Any = None  # its cupy.RawModule (diagnostics read its globals: decode_trace.py)


# Experiments only (benchmarks/kernel_variants.py, decode_profile.py): extra -D options of
# the attention kernel, e.g. ("-DSTAGING_ONLY=1",); part of the compiled-kernel cache key.
EXTRA_DEFINES: tuple[str, ...] = ()

# Compiled once per process and device.
_PAGES_MODULES: dict[int, cp.RawModule] = {}
_ATTN_KERNELS: dict[tuple[int, ...], AttnKernel] = {}
_PREFILL_KERNELS: dict[tuple, AttnKernel] = {}
_COMPUTE_CAPABILITY: dict[int, str] = {}

# q8_prefill.cu: warps per block (16 query rows each). Module state so that experiments
# (benchmarks/prefill.py --variant) can change it; part of the compiled-kernel cache key.
PREFILL_WARPS = 8  # 8 x 16 rows: measured 17-20% faster than 4 on the H200
PREFILL_BN: int | None = None  # K/V tokens per tile; None: prefill_tile_tokens(head_dim)
PREFILL_ROWS = 64  # an item takes the prefill kernel from this many query rows (planning.py)
# q8_prefill_wg.cu (wgmma, sm_90a) serves these head_dims on compute capability 9.0; the
# mma.sync kernel the rest. False: the mma.sync kernel everywhere (experiments, tests).
PREFILL_WGMMA = True
# head_dim 64 compiles but gave wrong outputs past one K/V tile on the H200 (not yet
# understood); it stays on the mma.sync kernel until a test shows it right.
WGMMA_HEAD_DIMS = (128,)
WGMMA_WARPGROUPS = 2
# q8_prefill_ws.cu (K/V dequantized once per launch into 16-bit tiles, a producer warpgroup
# streaming them with bulk copies) serves these head_dims where the wgmma kernel would;
# False: q8_prefill_wg.cu (experiments). PREFILL_STAGES: its shared-memory tile pairs.
PREFILL_WS = True
WS_HEAD_DIMS = (128,)
PREFILL_STAGES = 4
PREFILL_TILE = 64  # tokens per K/V tile of both wgmma kernels (PF_TILE in q8_common.cuh)
TILE_PARTS = 4  # q8_kv_tiles' blocks per tile pair (TILE_PARTS in q8_prefill_ws.cu)


def source(name: str) -> str:
    """A .cu file with its local headers inlined, so CuPy's cache key covers them (and the
    wgmma wrappers where the file asks for them)."""
    text = (_SRC / name).read_text()
    for header in sorted(_SRC.glob("*.cuh")):  # the local headers it includes
        body = header.read_text().replace("#pragma once", "")
        text = text.replace(f'#include "{header.name}"', body)
    return text.replace("__WGMMA_WRAPPERS__", wgmma_wrappers())


def tokens_per_stage(head_dim: int, tuning: GpuTuning) -> int:
    """TOK in q8_attention_tc.cu, for split sizing."""
    per = max(1, (tuning.tc_stage_bytes // (2 * head_dim)) // (NWARPS * 16))
    return per * NWARPS * 16


def attention_smem(head_dim: int, tuning: GpuTuning) -> int:
    """Dynamic shared memory of the attention kernel: NSTAGES stages of K/V codes (rows
    padded against bank conflicts) and their scales."""
    tok = tokens_per_stage(head_dim, tuning)
    stage = 2 * tok * (head_dim + 16) + 2 * tok * (head_dim // QBLOCK) * 4
    return tuning.tc_nstages * stage


def attention_options(head_dim: int, tuning: GpuTuning) -> tuple[str, ...]:
    """NVRTC options of the attention kernel (its compile-time constants)."""
    return (
        "--std=c++17",
        f"-DHEAD_DIM={head_dim}",
        f"-DMAX_HEAD_DIM={MAX_HEAD_DIM}",
        f"-DGT={ROWS_PER_TILE}",
        f"-DNWARPS={NWARPS}",
        f"-DMAXP={MAXP}",
        f"-DNSTAGES={tuning.tc_nstages}",
        f"-DSTAGE_CODE_TARGET={tuning.tc_stage_bytes}",
        f"-DMINBLOCKS={tuning.tc_minblocks if head_dim <= 128 else 1}",
        # Past D = 128 the q digits would spill from registers: shared memory holds them.
        f"-DQD_SMEM={int(head_dim > 128)}",
        *EXTRA_DEFINES,
    )


def prefill_tile_tokens(head_dim: int) -> int:
    """BN of q8_prefill.cu: K/V tokens per tile (fewer past D = 128, for registers)."""
    if PREFILL_BN is not None:
        return PREFILL_BN
    return 32 if head_dim > 128 else 64


def prefill_smem(head_dim: int) -> int:
    """Dynamic shared memory of q8_prefill.cu: two raw stages (K/V codes and scales), two
    16-bit K/V tiles (rows padded by 8 halves), and past D = 128 the block's q rows."""
    bn, nb, hs = prefill_tile_tokens(head_dim), head_dim // QBLOCK, head_dim + 8
    raw = 2 * (2 * bn * head_dim + 2 * bn * nb * 4)
    half = 2 * 2 * bn * hs * 2
    q = 0 if head_dim <= 128 else 16 * PREFILL_WARPS * hs * 2
    return raw + half + q


def wgmma_prefill_smem(head_dim: int) -> int:
    """Dynamic shared memory of q8_prefill_wg.cu: two raw stages and three pairs of 16-bit
    K and V tiles of 64 tokens (two with -DPF_PV_ASYNC=0)."""
    bn, nb = 64, head_dim // QBLOCK
    bufs = 2 if "-DPF_PV_ASYNC=0" in EXTRA_DEFINES else 3  # as NBUF in the .cu
    return 2 * (2 * bn * head_dim + 2 * bn * nb * 4) + bufs * 2 * bn * head_dim * 2


def ws_tile_bytes(head_dim: int) -> int:
    """One tile pair of q8_prefill_ws.cu's scratch: 64 tokens of 16-bit K, then of V."""
    return 2 * PREFILL_TILE * head_dim * 2


def ws_prefill_smem(head_dim: int) -> int:
    """Dynamic shared memory of q8_prefill_ws.cu: PREFILL_STAGES tile pairs."""
    return PREFILL_STAGES * ws_tile_bytes(head_dim)


def ws_prefill_options(head_dim: int) -> tuple[str, ...]:
    """NVRTC options of the warp-specialized prefill kernels (compiled for sm_90a)."""
    return ("--std=c++17", f"-DHEAD_DIM={head_dim}", f"-DPF_STAGES={PREFILL_STAGES}",
            *EXTRA_DEFINES)  # fmt: skip


def wgmma_prefill_options(head_dim: int) -> tuple[str, ...]:
    """NVRTC options of the wgmma prefill kernel (compiled for sm_90a)."""
    return ("--std=c++17", f"-DHEAD_DIM={head_dim}", f"-DPF_WG={WGMMA_WARPGROUPS}",
            *EXTRA_DEFINES)  # fmt: skip


def prefill_options(head_dim: int) -> tuple[str, ...]:
    """NVRTC options of the prefill kernel."""
    return (
        "--std=c++17",
        f"-DHEAD_DIM={head_dim}",
        f"-DPF_WARPS={PREFILL_WARPS}",
        f"-DPF_BN={prefill_tile_tokens(head_dim)}",
        *EXTRA_DEFINES,
    )


def check_tuning(tuning: GpuTuning, smem_limit: int) -> None:
    """Refuse at start a pipeline whose shared memory no head_dim's kernel could launch with
    (``smem_limit``: the device's opt-in bytes per block), rather than at the first call."""
    static = 4 * MAXP + 64  # the split's page ids and a few scalars
    for head_dim in range(QBLOCK, MAX_HEAD_DIM + 1, QBLOCK):
        need = attention_smem(head_dim, tuning) + static
        if need > smem_limit:
            raise ValueError(
                f"--gpu-tc-nstages {tuning.tc_nstages} x --gpu-tc-stage-bytes "
                f"{tuning.tc_stage_bytes}: expected at most {smem_limit} bytes of shared "
                f"memory per block, got {need} at head_dim {head_dim}"
            )


def pages_module(device_id: int) -> cp.RawModule:
    """q8_pages.cu (q8_append, q8_dequantize) on ``device_id``, compiled once."""
    import cupy as cp

    mod = _PAGES_MODULES.get(device_id)
    if mod is None:
        with cp.cuda.Device(device_id):
            mod = cp.RawModule(code=source("q8_pages.cu"), options=_PAGES_OPTIONS)
        _PAGES_MODULES[device_id] = mod
    return mod


def attention_kernel(device_id: int, head_dim: int, tuning: GpuTuning) -> AttnKernel:
    """q8_attend for ``head_dim`` on ``device_id``, compiled once per tuning."""
    # split_waves and max_splits only steer the planning: they do not recompile.
    key = (device_id, head_dim, tuning.tc_minblocks, tuning.tc_nstages, tuning.tc_stage_bytes,
           EXTRA_DEFINES, NWARPS, MAXP)  # fmt: skip
    kern = _ATTN_KERNELS.get(key)
    if kern is None:
        import cupy as cp

        with cp.cuda.Device(device_id):
            mod = cp.RawModule(
                code=source("q8_attention_tc.cu"), options=attention_options(head_dim, tuning)
            )
            fn = mod.get_function("q8_attend")
            smem = attention_smem(head_dim, tuning)
            fn.max_dynamic_shared_size_bytes = smem
            kern = AttnKernel(
                fn,
                tokens_per_stage(head_dim, tuning),
                ROWS_PER_TILE,
                smem,
                _blocks_per_sm(fn, smem, NWARPS),
                threads=32 * NWARPS,
                max_pages=MAXP,
                module=mod,
            )
        _ATTN_KERNELS[key] = kern
    return kern


def compute_capability(device_id: int) -> str:
    """``"90"`` for an H100/H200; asked of the driver once per device (the prefill kernel
    choice reads it on every batch)."""
    cc = _COMPUTE_CAPABILITY.get(device_id)
    if cc is None:
        import cupy as cp

        cc = _COMPUTE_CAPABILITY[device_id] = cp.cuda.Device(device_id).compute_capability
    return cc


def uses_wgmma(cc: str, head_dim: int) -> bool:
    """Whether the wgmma prefill kernel serves ``head_dim`` on a device (sm_90a code runs on
    compute capability 9.0 only)."""
    return PREFILL_WGMMA and cc == "90" and head_dim in WGMMA_HEAD_DIMS


def _sm90a_module(code: str, options: tuple[str, ...], name: str) -> cp.RawModule:
    """Compile for sm_90a with NVRTC (CuPy's own compile names plain sm_90, which has no
    wgmma) and load the cubin. It is cached in CuPy's kernel cache directory (private to
    the user, as CuPy makes it; never a shared /tmp, where another user could plant a
    file of the expected name) under the hash of its source and options; where that
    directory cannot be written, it goes to a private temporary file, deleted once loaded."""
    import cupy as cp
    from cupy_backends.cuda.libs import nvrtc

    opts = ("-arch=sm_90a", "-ftz=true", *options)  # -ftz as CuPy's own compiles
    digest = hashlib.sha256(repr((code, opts, nvrtc.getVersion())).encode()).hexdigest()[:24]
    cache = Path(os.environ.get("CUPY_CACHE_DIR") or Path.home() / ".cupy" / "kernel_cache")
    path = cache / f"q8kv-{name}-{digest}.cubin"
    if path.exists():
        return cp.RawModule(path=str(path))
    prog = nvrtc.createProgram(code, name, [], [])
    try:
        nvrtc.compileProgram(prog, list(opts))
        cubin = nvrtc.getCUBIN(prog)
    except Exception as exc:
        raise RuntimeError(f"{name}: {nvrtc.getProgramLog(prog)}") from exc
    finally:
        nvrtc.destroyProgram(prog)
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        tmp.replace(path)  # atomic: a concurrent process reads a whole file or none
        return cp.RawModule(path=str(path))
    except OSError:
        fd, private = tempfile.mkstemp(suffix=".cubin")  # mode 0600, a unique name
        try:
            os.write(fd, cubin)
            os.close(fd)
            return cp.RawModule(path=private)
        finally:
            os.unlink(private)


def uses_ws(cc: str, head_dim: int) -> bool:
    """Whether q8_prefill_ws.cu serves ``head_dim`` on a device (with q8_prefill_wg.cu as the
    fallback of its launches)."""
    return PREFILL_WS and uses_wgmma(cc, head_dim) and head_dim in WS_HEAD_DIMS


def prefill_fits(device_id: int, head_dim: int, smem_limit: int) -> bool:
    """Whether the prefill kernel that would serve ``head_dim`` (and its fallback) fits the
    device's shared memory per block (``smem_limit``, its opt-in maximum)."""
    cc = compute_capability(device_id)
    wg = uses_wgmma(cc, head_dim)
    need = wgmma_prefill_smem(head_dim) if wg else prefill_smem(head_dim)
    if uses_ws(cc, head_dim):
        need = max(need, ws_prefill_smem(head_dim))
    return need + 1024 <= smem_limit  # + the static page-id ring or mbarriers


def prefill_kernel(device_id: int, head_dim: int, bf16: bool) -> AttnKernel:
    """The 16-bit prefill kernel for ``head_dim`` on ``device_id``, compiled once: the
    warp-specialized one over pre-dequantized tiles where it serves the device and head_dim
    (the wgmma kernel as its fallback), else the wgmma kernel, else the mma.sync one."""
    if uses_ws(compute_capability(device_id), head_dim):
        return _ws_prefill_kernel(device_id, head_dim, bf16)
    return _dequantizing_prefill_kernel(device_id, head_dim, bf16)


def _ws_prefill_kernel(device_id: int, head_dim: int, bf16: bool) -> AttnKernel:
    import cupy as cp

    opts = ws_prefill_options(head_dim)
    key = (device_id, head_dim, bf16, "ws", opts)
    kern = _PREFILL_KERNELS.get(key)
    if kern is None:
        kind = "bf16" if bf16 else "f16"
        with cp.cuda.Device(device_id):
            mod = _sm90a_module(source("q8_prefill_ws.cu"), opts, "q8_prefill_ws")
            fn = mod.get_function(f"q8_prefill_ws_{kind}")
            smem = ws_prefill_smem(head_dim)
            fn.max_dynamic_shared_size_bytes = smem
            kern = AttnKernel(
                fn, PREFILL_TILE, 128, smem, 1, prefill=True, threads=384,
                tiles=mod.get_function(f"q8_kv_tiles_{kind}"),
                tile_bytes=ws_tile_bytes(head_dim),
                fallback=_dequantizing_prefill_kernel(device_id, head_dim, bf16),
            )  # fmt: skip
        _PREFILL_KERNELS[key] = kern
    return kern


def _dequantizing_prefill_kernel(device_id: int, head_dim: int, bf16: bool) -> AttnKernel:
    """q8_prefill_f16 or q8_prefill_bf16: the wgmma kernel where it serves the device and
    head_dim, else the mma.sync one; both dequantize K/V in their own loop."""
    import cupy as cp

    wg = uses_wgmma(compute_capability(device_id), head_dim)
    opts = wgmma_prefill_options(head_dim) if wg else prefill_options(head_dim)
    key = (device_id, head_dim, bf16, wg, opts)
    kern = _PREFILL_KERNELS.get(key)
    if kern is None:
        name = "q8_prefill_bf16" if bf16 else "q8_prefill_f16"
        if wg:
            with cp.cuda.Device(device_id):
                mod = _sm90a_module(source("q8_prefill_wg.cu"), opts, "q8_prefill_wg")
                fn = mod.get_function(name)
                smem = wgmma_prefill_smem(head_dim)
                fn.max_dynamic_shared_size_bytes = smem
                warps = 4 * WGMMA_WARPGROUPS
                kern = AttnKernel(fn, 64, 16 * warps, smem, _blocks_per_sm(fn, smem, warps),
                                  prefill=True, threads=32 * warps)  # fmt: skip
            _PREFILL_KERNELS[key] = kern
            return kern
        with cp.cuda.Device(device_id):
            mod = cp.RawModule(code=source("q8_prefill.cu"), options=opts)
            fn = mod.get_function(name)
            smem = prefill_smem(head_dim)
            fn.max_dynamic_shared_size_bytes = smem
            warps = PREFILL_WARPS
            kern = AttnKernel(
                fn, prefill_tile_tokens(head_dim), 16 * warps, smem,
                _blocks_per_sm(fn, smem, warps), prefill=True, threads=32 * warps,
            )
        _PREFILL_KERNELS[key] = kern
    return kern


def _blocks_per_sm(fn: cp.RawKernel, smem: int, warps: int = NWARPS) -> int:
    """Resident blocks per SM, bounded by registers, shared memory and threads."""
    threads = 32 * warps
    regs_per_warp = -(-fn.num_regs * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_smem = _SMEM_PER_SM // (smem + fn.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32))
