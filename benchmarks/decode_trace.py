"""The timeline of one decode launch, block by block: a TRACE=1 build of q8_attention_tc.cu
stamps each block's steps (its start on the global timer, then clock64 at the page ids,
q's digits, its first stages and its last landing, the end of its loop, its partials
written, the split counter taken, its end), and this prints where a launch's time goes
(medians and extremes over the blocks, us) for the decode shapes of benchmarks/kernels.py,
and how evenly the blocks end over ``--launches`` launches of one plan (the spread of the
split ends within a row tile; whether the same SMs are slow each time).

    python3 benchmarks/decode_trace.py [--shapes 1x1024,1x32768] [--launches 3] [--json FILE]
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


def stats_us(us: np.ndarray, *keys: str) -> dict:
    """``keys`` (of min, p50, max) of microsecond values, rounded to 0.01 us."""
    pick = {"min": np.min, "p50": np.median, "max": np.max}
    return {k: round(float(pick[k](us)), 2) for k in keys}


def trace_rows(launch) -> cp.ndarray:
    """The kernel's q8_trace global as a [TRACE_BLOCKS, 16] uint64 array."""
    module = launch.kernel.module
    blocks = int(cp.ndarray((1,), cp.int32, module.get_global("q8_trace_blocks")).get()[0])
    return cp.ndarray((blocks, 16), cp.uint64, module.get_global("q8_trace"))


def trace_once(
    batch: int, length: int, rng: np.random.Generator, warm: int = 20, launches: int = 3
) -> dict:
    # As benchmarks/kernels.py times it: batches over several sets of sessions in turn, so
    # the traced one's cache is not in L2 from the launch before.
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / q8_bytes(batch, length))))
    backend, _layout, batches = q8_setup(batch, length, sets, rng)
    for i in range(warm * sets):
        backend.launch_attention(batches[i % sets][1])
    plan = batches[0][1]
    (launch,) = plan.launches
    trace = trace_rows(launch)
    traced = []
    for _ in range(launches):
        for i in range(1, sets):  # the other sets in between: the cache leaves L2
            backend.launch_attention(batches[i][1])
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        with backend.stream:  # the stamps cleared after those launches, before this one
            trace.fill(0)
            backend.stream.synchronize()
            start.record()
            backend.launch_attention(plan)
            stop.record()
        stop.synchronize()
        # One launch from an idle GPU: the gap from the host's launch call counts too
        # (kernels.py times the kernel itself).
        events_us = cp.cuda.get_elapsed_time(start, stop) * 1e3
        traced.append(trace[: min(launch.units, len(trace))].get().astype(np.int64))
    backend.close()
    out = timeline(traced[-1], batch, length, sets, events_us)  # the launch events_us timed
    out.update(balance(traced))
    return out


def timeline(rows: np.ndarray, batch: int, length: int, sets: int, events_us: float) -> dict:
    """Where one launch's time goes, step by step (medians and extremes over its blocks)."""
    t0 = rows[:, 0].min()
    clocks = rows[:, 2:13]
    # clock64 ticks per ns, from each block's span on both clocks (blocks of a few us:
    # the global timer's granularity makes this rough; the median over blocks steadies it)
    span_ns = rows[:, 14] - rows[:, 0]
    span_ticks = clocks[:, 10] - clocks[:, 0]
    ghz = float(np.median(span_ticks[span_ns > 0] / span_ns[span_ns > 0]))

    def stats(values_ns: np.ndarray) -> dict:
        return stats_us(values_ns / 1e3, "min", "p50", "max")

    out = {"batch": batch, "seq_len": length, "sets": sets, "blocks": len(rows),
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


def balance(traced: list[np.ndarray]) -> dict:
    """How evenly the blocks of a launch end, over several launches of the same plan: the
    spread of the split ends within each row tile (the tile's merge waits for its slowest
    split), and whether the same SMs are slow every time (the correlation, across launches,
    of each SM's mean block end). Tiles are counted by their merging blocks (one each); a
    plan's sessions all have one length (kernels.py's shapes), so every tile has as many
    splits."""
    spreads, tile_ends, per_sm = [], [], []
    for rows in traced:
        ends = (rows[:, 14] - rows[:, 0].min()) / 1e3
        tiles = int((rows[:, 13] == 1).sum())
        sm = rows[:, 1]
        sums = np.bincount(sm, weights=ends, minlength=int(sm.max()) + 1)
        per_sm.append(sums / np.maximum(np.bincount(sm, minlength=len(sums)), 1))
        if tiles and len(rows) % tiles == 0:
            split_ends = ends.reshape(tiles, -1)  # a tile's splits are adjacent units
            spreads.append(split_ends.max(1) - split_ends.min(1))
            tile_ends.append(split_ends.max(1))
    out: dict = {"launches": len(traced)}
    if spreads:
        spread, last = np.concatenate(spreads), np.concatenate(tile_ends)
        out["split ends within a tile: spread"] = stats_us(spread, "p50", "max")
        out["tile ends (slowest split)"] = stats_us(last, "min", "max")
    width = min(len(s) for s in per_sm)
    seen = np.all([s[:width] > 0 for s in per_sm], axis=0)
    if len(per_sm) > 1 and seen.sum() > 2:
        corr = np.corrcoef(np.array([s[:width][seen] for s in per_sm]))
        pairs = corr[np.triu_indices(len(per_sm), 1)]
        out["SM mean end: correlation across launches"] = round(float(pairs.mean()), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES))
    ap.add_argument("--launches", type=int, default=3, help="launches traced per shape [3]")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    cupy_kernels.EXTRA_DEFINES = ("-DTRACE=1",)
    rng = np.random.default_rng()
    results = []
    for text in args.shapes.split(","):
        batch, length = (int(x) for x in text.split("x"))
        results.append(trace_once(batch, length, rng, launches=args.launches))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
