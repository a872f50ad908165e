"""One decode-attention shape launched a few times, for a profiler (Nsight Compute) to pick
a launch: the same pool, pages and inputs as benchmarks/kernels.py.

    ncu --clock-control none -k q8_attend -s 3 -c 1 --section SpeedOfLight \
        python3 benchmarks/decode_profile.py --shape 64x16384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import parse_tunings, q8_setup  # noqa: E402

from q8kv.server.backends.cupy import kernels as cupy_kernels  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="64x16384", help="batch x cache length")
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--tuning", default="", help="minblocks:nstages:stage_bytes")
    ap.add_argument("--define", action="append", default=[], help="NAME=VALUE for the kernel")
    args = ap.parse_args()
    cupy_kernels.EXTRA_DEFINES = tuple(f"-D{d}" for d in args.define)
    batch, length = (int(x) for x in args.shape.split("x"))
    tunings = parse_tunings(args.tuning)
    backend, _layout, batches = q8_setup(
        batch, length, 1, np.random.default_rng(0), tunings[0] if tunings else None
    )
    for _ in range(args.launches):
        backend.launch_attention(batches[0][1])
    backend.stream.synchronize()
    backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
