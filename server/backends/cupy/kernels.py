"""The CUDA kernels of the GPU backend: sources, compile options and the compiled-kernel cache.

q8_pages.cu (quantize-append, dequantize) compiles once per device; q8_attention_tc.cu once
per device, head_dim and pipeline tuning (CuPy also keeps the binaries in its on-disk
cache). Both inline q8_common.cuh, the metadata row layout shared with packing.py.

CuPy is imported where a kernel is compiled, so the arithmetic here (and packing.py) runs
without a GPU: the server checks its tuning and the tests plan launches on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from q8kv.format import QBLOCK

from .tuning import GpuTuning

if TYPE_CHECKING:
    import cupy as cp

_SRC = Path(__file__).resolve().parent
MAX_HEAD_DIM = 256  # the attention kernel keeps a head's q slice in registers
NWARPS = 4
MAXP = 512  # page ids per split held in shared memory (MAXP in q8_attention_tc.cu)
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


# Experiments only (benchmarks/kernel_variants.py, decode_profile.py): extra -D options of
# the attention kernel, e.g. ("-DSTAGING_ONLY=1",); part of the compiled-kernel cache key.
EXTRA_DEFINES: tuple[str, ...] = ()

# Compiled once per process and device.
_PAGES_MODULES: dict[int, cp.RawModule] = {}
_ATTN_KERNELS: dict[tuple[int, ...], AttnKernel] = {}


def source(name: str) -> str:
    """A .cu file with its local header inlined, so CuPy's cache key covers both."""
    text = (_SRC / name).read_text()
    header = (_SRC / "q8_common.cuh").read_text().replace("#pragma once", "")
    return text.replace('#include "q8_common.cuh"', header)


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
        f"-DNSTAGES={tuning.tc_nstages}",
        f"-DSTAGE_CODE_TARGET={tuning.tc_stage_bytes}",
        f"-DMINBLOCKS={tuning.tc_minblocks if head_dim <= 128 else 1}",
        # Past D = 128 the q digits would spill from registers: shared memory holds them.
        f"-DQD_SMEM={int(head_dim > 128)}",
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
           EXTRA_DEFINES)  # fmt: skip
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
                _blocks_per_sm(fn, smem),
            )
        _ATTN_KERNELS[key] = kern
    return kern


def _blocks_per_sm(fn: cp.RawKernel, smem: int) -> int:
    """Resident blocks per SM, bounded by registers, shared memory and threads."""
    threads = 32 * NWARPS
    regs_per_warp = -(-fn.num_regs * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * NWARPS)
    by_smem = _SMEM_PER_SM // (smem + fn.shared_size_bytes + 1024)
    return max(1, min(by_regs, by_smem, 2048 // threads, 32))
