"""The break-even behind the cupy backend's FRESH_OUTPUT_BYTES (server/backends/cupy/
transfers.py): taking a block of CuPy's pinned pool for an output and giving it back,
against copying the output out of the reused pinned buffer, per size. Median microseconds
of --reps on the GPU machine's host.

    python3 benchmarks/pinned_outputs.py
"""

from __future__ import annotations

import argparse

from bench_util import median_us

from q8kv.server.backends.cupy.transfers import pooled_pinned

SIZES = (64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    args = ap.parse_args()
    print(f"{'KiB':>6} | pool block taken and freed | copy out of the reused buffer (us)")
    for nbytes in SIZES:
        reused = pooled_pinned(nbytes)
        reused[:] = 1
        block = median_us(lambda n=nbytes: pooled_pinned(n), args.reps)
        copy = median_us(lambda r=reused: r.copy(), args.reps)  # as attend_packed copies
        print(f"{nbytes >> 10:>6} | {block:26.1f} | {copy:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
