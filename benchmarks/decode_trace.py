"""The timeline of one decode launch, block by block: a TRACE=1 build of q8_attention_tc.cu
stamps each block's steps (its start on the global timer, then clock64 at the page ids,
q's digits, its first stages and its last landing, the end of its loop, its partials
written, the split counter taken, its end), and this prints where a launch's time goes
(medians and extremes over the blocks, us) for the decode shapes of benchmarks/kernels.py.

    python3 benchmarks/decode_trace.py [--shapes 1x1024,1x32768] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import ROTATE_BYTES, SHAPES, q8_bytes, q8_setup  # noqa: E402

from q8kv.server.backends.cupy import kernels as cupy_kernels  # noqa: E402

STEPS = {  # slot -> what the block had done when it stamped it
    3: "page ids", 4: "q digits", 5: "stage 0 landed", 6: "stage 1 landed",
    7: "stage 2 landed", 8: "last stage landed", 9: "loop done", 10: "partials written",
    11: "counter taken", 12: "end",
}  # fmt: skip


def trace_once(batch: int, length: int, rng: np.random.Generator, warm: int = 20) -> dict:
    # As benchmarks/kernels.py times it: batches over several sets of sessions in turn, so
    # the traced one's cache is not in L2 from the launch before.
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / q8_bytes(batch, length))))
    backend, _layout, batches = q8_setup(batch, length, sets, rng)
    for i in range(warm * sets):
        backend.launch_attention(batches[i % sets][1])
    plan = batches[0][1]
    (launch,) = plan.launches
    stamps = launch.kernel.module.get_global("q8_trace")  # [TRACE_BLOCKS][16] uint64
    trace = cp.ndarray((stamps.mem.size // (16 * 8), 16), cp.uint64, stamps)
    trace.fill(0)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    with backend.stream:
        start.record()
        backend.launch_attention(plan)
        stop.record()
    stop.synchronize()
    # One launch from an idle GPU: the gap from the host's launch call counts too (kernels.py
    # times the kernel itself).
    events_us = cp.cuda.get_elapsed_time(start, stop) * 1e3
    rows = trace[: launch.units].get().astype(np.int64)
    backend.close()
    t0 = rows[:, 0].min()
    clocks = rows[:, 2:13]
    # clock64 ticks per ns, from each block's span on both clocks (blocks of a few us:
    # the global timer's granularity makes this rough; the median over blocks steadies it)
    span_ns = rows[:, 14] - rows[:, 0]
    span_ticks = clocks[:, 10] - clocks[:, 0]
    ghz = float(np.median(span_ticks[span_ns > 0] / span_ns[span_ns > 0]))

    def stats(values_ns: np.ndarray) -> dict:
        us = values_ns / 1e3
        return {"min": round(float(us.min()), 2), "p50": round(float(np.median(us)), 2),
                "max": round(float(us.max()), 2)}  # fmt: skip

    out = {"batch": batch, "seq_len": length, "sets": sets, "blocks": int(launch.units),
           "stages": int(np.median(rows[:, 15])), "events_us_one_launch": round(events_us, 2),
           "clock_ghz": round(ghz, 3), "start_after_first": stats(rows[:, 0] - t0),
           "end_after_first_start": stats(rows[:, 14] - t0)}  # fmt: skip
    # Each step against the block's step before it that it stamped (a block of fewer than
    # four stages, or of one split, skips some).
    last = clocks[:, 0].copy()
    for slot, what in STEPS.items():
        col = slot - 2
        have = clocks[:, col] > 0
        if have.any():
            out[f"-> {what}"] = stats((clocks[have, col] - last[have]) / ghz)
            last[have] = clocks[have, col]
    # Blocks of one wave alone on their SM against those sharing it with another.
    if int(rows[:, 0].max() - t0) < 1000:  # every block started at once: one wave
        per_sm = np.bincount(rows[:, 1])[rows[:, 1]]
        for count in (1, 2):
            if (per_sm == count).any():
                out[f"end, blocks {count} to an SM"] = stats(rows[per_sm == count, 14] - t0)
    merged = rows[:, 13] == 1
    if merged.any():
        out["merge (merging blocks)"] = stats((clocks[merged, 10] - clocks[merged, 9]) / ghz)
        out["merging blocks end after first start"] = stats(rows[merged, 14] - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cupy_kernels.EXTRA_DEFINES = ("-DTRACE=1",)
    rng = np.random.default_rng()
    results = []
    for text in args.shapes.split(","):
        batch, length = (int(x) for x in text.split("x"))
        results.append(trace_once(batch, length, rng))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
