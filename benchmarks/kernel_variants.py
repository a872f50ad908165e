"""The attention kernel compiled with extra defines (experimental switches in
q8_attention_tc.cu), each timed on the decode shapes of benchmarks/kernels.py and checked
against float64: a kernel experiment costs one GPU call, not a code change per variant.

    python3 benchmarks/kernel_variants.py \
        --variant base=2:2:32768 --variant qd=2:2:32768:QD_SMEM=1 [--shapes 64x16384] \
        [--page-bytes 262144]

A variant is NAME=minblocks:nstages:stage_bytes[:DEFINE=VALUE...][:waves=W][:warps=N]
[:maxp=N][@SRC_DIR] (waves: the split policy's --gpu-split-waves; warps: per block; maxp:
page ids per split); with @SRC_DIR
its .cu/.cuh files come from that directory (e.g. a previous commit's, written there with
`git show REV:server/backends/cupy/q8_attention_tc.cu`), so a change and its baseline are
timed in the same run. Prints one JSON line per (variant, shape): median device time
(spin-hidden launch gaps) and the relative L2 error
of session 0's output against float64.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as bench_kernels  # noqa: E402
from kernels import SHAPES, bench_q8, parse_tunings  # noqa: E402

from q8kv.server.backends.cupy import kernels as cupy_kernels  # noqa: E402
from q8kv.server.backends.cupy.tuning import GpuTuning  # noqa: E402

SOURCES = cupy_kernels._SRC  # noqa: SLF001 - the installed kernels' directory
NWARPS, MAXP = cupy_kernels.NWARPS, cupy_kernels.MAXP


def parse_variant(text: str) -> tuple[str, GpuTuning, tuple[str, ...], Path]:
    name, spec = text.split("=", 1)
    spec, _, src = spec.partition("@")
    parts = spec.split(":")
    (tuning,) = parse_tunings(":".join(parts[:3]))
    # Lower-case settings are the host's, not defines: waves=W (the split policy's waves),
    # warps=N (warps per block, kernels.NWARPS), maxp=N (page ids per split, kernels.MAXP).
    host = dict(p.split("=", 1) for p in parts[3:] if p[:1].islower())
    if "waves" in host:
        tuning = dataclasses.replace(tuning, split_waves=float(host["waves"]))
    defines = tuple(f"-D{d}" for d in parts[3:] if not d[:1].islower())
    sizes = {"NWARPS": int(host.get("warps", NWARPS)), "MAXP": int(host.get("maxp", MAXP))}
    return name, tuning, defines, Path(src) if src else SOURCES, sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--page-bytes", type=int, default=bench_kernels.PAGE_CODE_BYTES,
                    help="code bytes per cache page (the server's --page-bytes)")
    args = ap.parse_args()
    bench_kernels.PAGE_CODE_BYTES = args.page_bytes  # q8_setup reads it per call
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    spin_cycles = int(props["clockRate"] * 1000 * 300e-6)
    rng = np.random.default_rng()
    for text in args.variant:
        name, tuning, defines, src, sizes = parse_variant(text)
        for attr, value in sizes.items():
            setattr(cupy_kernels, attr, value)
        cupy_kernels.EXTRA_DEFINES = defines
        cupy_kernels._SRC = src  # noqa: SLF001 - the sources this variant compiles
        cupy_kernels._ATTN_KERNELS.clear()  # noqa: SLF001 - the cache key omits the sources
        for batch, length in shapes:
            res = bench_q8(batch, length, args.reps, spin_cycles, rng, [1.0], True, tuning)
            cp.get_default_memory_pool().free_all_blocks()
            kern = cupy_kernels.attention_kernel(0, 128, tuning)
            row = {"variant": name, "defines": defines, "src": str(src),
                   "batch": batch, "seq_len": length, "page_bytes": args.page_bytes, **sizes,
                   "q8kv_us": round(res["q8kv_us"], 2),
                   "with_launch_us": round(res["q8kv_with_launch_us"], 2),
                   "rel_l2_vs_float64": res["check_rel_l2"],
                   "sdpa_fp16_rel_l2_vs_float64": res["sdpa_fp16_rel_l2"],
                   "regs": kern.kernel.num_regs,
                   "blocks_per_sm": kern.blocks_per_sm}  # fmt: skip
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
