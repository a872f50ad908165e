"""Decode-attention kernels on the GPU: the fused Q8 kernel vs torch SDPA over an fp16 cache
vs the original design's fp32 path (dequantize the whole cache, then attend), and the
read-bandwidth floor.

H=32, KVH=8, D=128, one query token, B x L in {1x1024, 1x32768, 16x16384, 64x16384}; the
Q8 cache sits in the same paged pool the service uses (64 KiB pages, scattered page ids).
Device time by CUDA events, median of --reps samples after warm-up, with a GPU spin kernel
queued before each sample so host launch gaps stay out (the same for every column); the
"with launch" figures start from an idle GPU (what one service call sees). Inputs rotate
over several copies where one would fit in L2. The floor is the Q8 bytes over the
bandwidth of a read-only probe (a vectorized reduction over 4 GiB, far larger than L2):
a read-only stream runs faster than half of a copy, so a copy-based floor is too low.

    python3 benchmarks/kernels.py [--out DIR] [--reps 50]
    python3 benchmarks/kernels.py --q8-only --tunings 2:2:32768,3:2:32768 --waves-sweep 1,2
        (time our kernel only, for each minblocks:nstages:stage_bytes; nothing written)

Writes DIR/kernels-<card>.json (default benchmarks/results) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
from pathlib import Path

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from q8kv.server.backends.base import AttendItem, LayerLayout, tokens_per_page
from q8kv.server.backends.cupy.backend import CupyBackend
from q8kv.server.backends.cupy.tuning import GpuTuning

H, KVH, D = 32, 8, 128
SHAPES = [(1, 1024), (1, 32768), (16, 16384), (64, 16384)]
PAGE_CODE_BYTES = 64 * 1024
ROTATE_BYTES = 256 << 20  # rotate input copies until this much is touched (L2 is 50 MB)

_SPIN = cp.RawKernel(
    r"""
extern "C" __global__ void spin(long long cycles) {
  long long t0 = clock64();
  while (clock64() - t0 < cycles) { }
}""",
    "spin",
)
_READ = cp.RawKernel(
    r"""
extern "C" __global__ void read_probe(const int4* __restrict__ src, long long n16,
                                      unsigned* __restrict__ sink) {
  unsigned acc = 0;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    int4 a = __ldcs(src + i), b = __ldcs(src + i + stride);
    int4 c = __ldcs(src + i + 2 * stride), d = __ldcs(src + i + 3 * stride);
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
           d.z ^ d.w;
  }
  for (; i < n16; i += stride) { int4 a = __ldcs(src + i); acc ^= a.x ^ a.y ^ a.z ^ a.w; }
  if (acc == 0x9e3779b9u) sink[0] = acc;  // never true in practice; keeps the loads
}""",
    "read_probe",
)
_FILL = cp.RawKernel(
    r"""
extern "C" __global__ void fill(signed char* codes, long long ncodes, float* scales,
                                long long nscales, unsigned seed) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned h = (unsigned)i * 2654435761u ^ seed;
  h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
  if (i < ncodes) codes[i] = (signed char)((int)(h % 255u) - 127);
  if (i < nscales) scales[i] = 0.01f + 0.04f * (float)(h >> 8) * (1.0f / 16777216.0f);
}""",
    "fill",
)


def card_slug(name: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,3}[A-Za-z]?)\b", name)
    return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "-", name)).lower()


def median_us(times_ms: list[float]) -> float:
    return float(np.median(times_ms) * 1000.0)


def copy_bandwidth(stream: cp.cuda.Stream) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    nbytes = 1 << 30
    a, b = cp.empty(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    a.fill(1)
    times = []
    with stream:
        for i in range(25):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            b.data.copy_from_device_async(a.data, nbytes, stream)
            e1.record(stream)
            e1.synchronize()
            if i >= 5:
                times.append(cp.cuda.get_elapsed_time(e0, e1))
    del a, b
    return 2 * nbytes / (np.median(times) / 1000.0)


def read_bandwidth(stream: cp.cuda.Stream, sm_count: int) -> tuple[float, dict]:
    """Bytes/s of the best read-only pass over 4 GiB (int4 streaming loads, 4 in flight per
    thread), over a few grid sizes; and every configuration's figure."""
    nbytes = 4 << 30
    buf = cp.empty(nbytes, cp.uint8)
    buf.fill(3)
    sink = cp.zeros(1, cp.uint32)
    figures = {}
    with stream:
        for blocks_per_sm, threads in ((4, 256), (8, 256), (16, 128), (2, 1024)):
            grid = sm_count * blocks_per_sm
            args = (buf, np.int64(nbytes // 16), sink)
            times = []
            for i in range(15):
                e0, e1 = cp.cuda.Event(), cp.cuda.Event()
                e0.record(stream)
                _READ((grid,), (threads,), args)
                e1.record(stream)
                e1.synchronize()
                if i >= 3:
                    times.append(cp.cuda.get_elapsed_time(e0, e1))
            figures[f"{blocks_per_sm}x{threads}"] = round(
                nbytes / (np.median(times) / 1e3) / 1e12, 3
            )
    del buf
    cp.get_default_memory_pool().free_all_blocks()
    return max(figures.values()) * 1e12, figures


def time_cupy(launch, stream, reps: int, spin_cycles: int, spin: bool) -> float:
    """Median event time of ``launch(i)`` on ``stream``."""
    for i in range(5):
        launch(i)
    stream.synchronize()
    times = []
    with stream:
        for i in range(reps):
            if spin:
                _SPIN((1,), (1,), (np.int64(spin_cycles),))
            else:
                stream.synchronize()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(stream)
            launch(i)
            e1.record(stream)
            if not spin:
                e1.synchronize()
            times.append((e0, e1))
        stream.synchronize()
    return median_us([cp.cuda.get_elapsed_time(a, b) for a, b in times])


def time_torch(fn, reps: int, spin_cycles: int, spin: bool) -> float:
    for i in range(5):
        fn(i)
    torch.cuda.synchronize()
    pairs = []
    for i in range(reps):
        if spin:
            torch.cuda._sleep(spin_cycles)
        else:
            torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(i)
        e1.record()
        if not spin:
            e1.synchronize()
        pairs.append((e0, e1))
    torch.cuda.synchronize()
    return median_us([a.elapsed_time(b) for a, b in pairs])


def q8_setup(
    batch: int, length: int, sets: int, rng: np.random.Generator, tuning: GpuTuning | None = None
):
    """A pool holding ``sets`` x ``batch`` sessions of ``length`` random Q8 tokens."""
    t = tokens_per_page(PAGE_CODE_BYTES, KVH, D)
    layout = LayerLayout(H, KVH, D, t)
    per = -(-length // t)
    num_pages = per * batch * sets
    backend = CupyBackend(num_pages, PAGE_CODE_BYTES, tuning=tuning)
    with backend.stream:
        # Pseudo-random codes and positive scales over the whole pool: real data, not zeros.
        n = backend.codes.size
        _FILL(
            (-(-n // 256),),
            (256,),
            (backend.codes, np.int64(n), backend.scales, np.int64(backend.scales.size),
             np.uint32(rng.integers(1 << 31))),
        )  # fmt: skip
    perm = rng.permutation(num_pages).astype(np.int32)  # scattered, as in a used pool
    batches, tables = [], []
    for s in range(sets):
        items = []
        for b in range(batch):
            ids = perm[(s * batch + b) * per : (s * batch + b + 1) * per]
            q = rng.standard_normal((1, H, D), dtype=np.float32).astype(np.float16)
            k = rng.standard_normal((1, KVH, D), dtype=np.float32).astype(np.float16)
            items.append(AttendItem(layout, D**-0.5, ids, length - 1, q, k, k.copy()))
            tables.append(ids)
        batches.append((items, backend.prepare(items, own_device_copy=True)))
    backend.stream.synchronize()
    return backend, layout, batches


def q8_bytes(batch: int, length: int) -> float:
    """Bytes of Q8 cache one decode step reads: K and V codes plus a float32 scale per 32."""
    return 2 * batch * KVH * length * D * (1 + 4 / 32)


def bench_q8(batch, length, reps, spin_cycles, rng, waves_sweep, q8_only=False, tuning=None):
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / q8_bytes(batch, length))))
    backend, layout, batches = q8_setup(batch, length, sets, rng, tuning)
    stream = backend.stream

    def launch(i):
        backend.launch_attention(batches[i % sets][1])

    res = {}
    # One real call first: append + attend + download, checked against numpy on session 0.
    items = batches[0][0]
    out = backend.append_and_attend(items)
    res["check_rel_l2"], res["sdpa_fp16_rel_l2"] = check_against_numpy(
        backend, layout, items[0], out[0]
    )
    res["q8kv_us"] = time_cupy(launch, stream, reps, spin_cycles, spin=True)
    res["q8kv_with_launch_us"] = time_cupy(launch, stream, reps, spin_cycles, spin=False)
    sweep = {}
    default_waves = backend.split_waves
    for w in waves_sweep:
        backend.split_waves = w
        plans = [backend.prepare(its, own_device_copy=True) for its, _ in batches]
        sweep[str(w)] = round(
            time_cupy(
                lambda i, plans=plans: backend.launch_attention(plans[i % sets]),
                stream,
                reps,
                spin_cycles,
                spin=True,
            ),
            1,
        )
    backend.split_waves = default_waves
    res["split_waves_sweep_us"] = sweep

    if q8_only:
        backend.close()
        res["fp32_dequant_path_us"] = float("nan")
        return res
    # The original design's path: dequantize every session to fp32, then attend (CuPy).
    items = batches[0][0]
    tables = [cp.asarray(it.page_ids) for it in items]
    qs = [cp.asarray(it.q.astype(np.float32)).reshape(KVH, H // KVH, D) for it in items]
    scale = np.float32(D**-0.5)

    def fp32_path(_i):
        with stream:
            for tab, q in zip(tables, qs, strict=True):
                kv = backend.dequantize_device(layout, tab, 0, length)
                s = cp.matmul(q, kv[0].transpose(0, 2, 1)) * scale  # [KVH, G, L]
                s -= s.max(axis=-1, keepdims=True)
                p = cp.exp(s)
                p /= p.sum(axis=-1, keepdims=True)
                cp.matmul(p, kv[1])

    res["fp32_dequant_path_us"] = time_cupy(fp32_path, stream, reps, spin_cycles, spin=False)
    backend.close()
    return res


def check_against_numpy(backend, layout, item, out) -> tuple[float, float]:
    """Relative L2 vs float64 over the dequantized cache of one output, and of torch SDPA in
    fp16 on the same q and cache (the yardstick of the 16-bit wires' precision)."""
    k, v = backend.dequantize(layout, item.page_ids, 0, item.start + 1)
    g = H // KVH
    q = item.q.astype(np.float64)[0].reshape(KVH, g, D)
    s = np.einsum("hgd,htd->hgt", q, k.astype(np.float64)) * D**-0.5
    s -= s.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("hgt,htd->hgd", p, v.astype(np.float64)).reshape(H, D)
    dev = torch.device("cuda")
    tq = torch.from_numpy(item.q.astype(np.float16)).to(dev).reshape(1, 1, H, D).transpose(1, 2)
    tk, tv = (torch.from_numpy(x.astype(np.float16)).to(dev)[None] for x in (k, v))
    with torch.no_grad():
        sdpa = F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True, scale=D**-0.5)
    sdpa = sdpa.float().cpu().numpy().reshape(H, D)
    norm = np.linalg.norm(ref)
    return float(np.linalg.norm(out[0] - ref) / norm), float(np.linalg.norm(sdpa - ref) / norm)


def bench_sdpa(batch, length, reps, spin_cycles):
    fp16_bytes = 2 * batch * KVH * length * D * 2
    sets = max(1, min(32, math.ceil(ROTATE_BYTES / fp16_bytes)))
    dev = torch.device("cuda")
    qs = [torch.randn(batch, H, 1, D, device=dev, dtype=torch.float16) for _ in range(sets)]
    ks = [torch.randn(batch, KVH, length, D, device=dev, dtype=torch.float16) for _ in range(sets)]
    vs = [torch.randn(batch, KVH, length, D, device=dev, dtype=torch.float16) for _ in range(sets)]

    def fn(i):
        j = i % sets
        F.scaled_dot_product_attention(qs[j], ks[j], vs[j], enable_gqa=True)

    with torch.no_grad():
        spun = time_torch(fn, reps, spin_cycles, spin=True)
        plain = time_torch(fn, reps, spin_cycles, spin=False)
    for lst in (qs, ks, vs):
        lst.clear()
    torch.cuda.empty_cache()
    return spun, plain


def parse_tunings(text: str) -> list[GpuTuning]:
    """``minblocks:nstages:stage_bytes,...`` -> tunings (empty: the default only)."""
    out = []
    for spec in filter(None, text.split(",")):
        mb, ns, sb = (int(x) for x in spec.split(":"))
        out.append(GpuTuning(tc_minblocks=mb, tc_nstages=ns, tc_stage_bytes=sb))
    return out


def tuning_sweep(shapes, tunings, reps, spin_cycles, rng, waves) -> list[dict]:
    """Our kernel alone under each tuning and split_waves (pipeline and occupancy search)."""
    rows = []
    for tuning in tunings:
        for batch, length in shapes:
            q8 = bench_q8(batch, length, reps, spin_cycles, rng, waves, True, tuning)
            cp.get_default_memory_pool().free_all_blocks()
            row = {"tuning": tuning.__dict__, "batch": batch, "seq_len": length,
                   "q8kv_us": round(q8["q8kv_us"], 2),
                   "split_waves_sweep_us": q8["split_waves_sweep_us"]}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(f"{b}x{n}" for b, n in SHAPES))
    ap.add_argument("--waves-sweep", default="1,2,4")
    ap.add_argument("--q8-only", action="store_true", help="time only our kernel (tuning)")
    ap.add_argument("--tunings", default="", help="minblocks:nstages:stage_bytes,... (sweep)")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    sweep = [float(w) for w in args.waves_sweep.split(",") if w]

    dev_id = cp.cuda.runtime.getDevice()
    props = cp.cuda.runtime.getDeviceProperties(dev_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    spin_cycles = int(props["clockRate"] * 1000 * 300e-6)  # ~300 us at the base clock
    rng = np.random.default_rng()
    stream = cp.cuda.Stream(non_blocking=True)
    read_bw, read_figures = read_bandwidth(stream, int(props["multiProcessorCount"]))
    copy_bw = copy_bandwidth(stream)
    print(
        f"device: {name}; read-only probe {read_bw / 1e12:.2f} TB/s {read_figures}; "
        f"copy {copy_bw / 1e12:.2f} TB/s (read + write)",
        flush=True,
    )
    if args.tunings:
        tuning_sweep(shapes, parse_tunings(args.tunings), args.reps, spin_cycles, rng, sweep)
        return 0

    rows, extra = [], []
    for batch, length in shapes:
        q8 = bench_q8(batch, length, args.reps, spin_cycles, rng, sweep, args.q8_only)
        cp.get_default_memory_pool().free_all_blocks()
        if args.q8_only:
            sdpa = sdpa_plain = float("nan")
        else:
            sdpa, sdpa_plain = bench_sdpa(batch, length, args.reps, spin_cycles)
        nbytes = q8_bytes(batch, length)
        row = {
            "batch": batch,
            "seq_len": length,
            "n": 1,
            "q8kv_us": round(q8["q8kv_us"], 2),
            "q8kv_with_launch_us": round(q8["q8kv_with_launch_us"], 2),
            "torch_sdpa_fp16_us": round(sdpa, 2),
            "torch_sdpa_fp16_with_launch_us": round(sdpa_plain, 2),
            "read_floor_us": round(nbytes / read_bw * 1e6, 2),
            "read_bw_tb_s": round(nbytes / (q8["q8kv_us"] * 1e-6) / 1e12, 3),
            "device": name,
        }
        rows.append(row)
        extra.append(
            {
                "batch": batch,
                "seq_len": length,
                "fraction_of_read_probe": round(row["read_floor_us"] / row["q8kv_us"], 3),
                "speedup_vs_sdpa": round(sdpa / row["q8kv_us"], 2),
                "fp32_dequant_path_us": round(q8["fp32_dequant_path_us"], 1),
                "speedup_vs_fp32_path": round(q8["fp32_dequant_path_us"] / row["q8kv_us"], 1),
                "split_waves_sweep_us": q8["split_waves_sweep_us"],
                "check_rel_l2_vs_float64": q8["check_rel_l2"],
                "sdpa_fp16_rel_l2_vs_float64": q8["sdpa_fp16_rel_l2"],
            }
        )
        print(json.dumps(row), flush=True)
        print(f"split_waves sweep {batch}x{length}: {q8['split_waves_sweep_us']}", flush=True)

    result = {
        "device": name,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 " + " ".join(sys.argv),
        "torch": torch.__version__,
        "cupy": cp.__version__,
        "geometry": {"H": H, "KVH": KVH, "D": D, "n": 1, "page_code_bytes": PAGE_CODE_BYTES},
        "read_probe_tb_s": round(read_bw / 1e12, 3),
        "read_probe_configs_tb_s": read_figures,
        "copy_bandwidth_tb_s": round(copy_bw / 1e12, 3),
        "reps": args.reps,
        "rows": rows,
        "extra": extra,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{card_slug(name)}.json"
    if not args.q8_only:
        path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{name}, {result['date']}, read probe {read_bw / 1e12:.2f} TB/s; times in us")
    print(
        f"{'B x L':>12} {'floor':>8} {'q8kv':>8} {'q8kv+launch':>12} {'sdpa fp16':>10} "
        f"{'sdpa+launch':>12} {'vs sdpa':>8} {'TB/s':>6} {'of probe':>9}"
    )
    for r, e in zip(rows, extra, strict=True):
        print(
            f"{r['batch']:>4} x {r['seq_len']:<6} {r['read_floor_us']:>8.1f} {r['q8kv_us']:>8.1f} "
            f"{r['q8kv_with_launch_us']:>12.1f} {r['torch_sdpa_fp16_us']:>10.1f} "
            f"{r['torch_sdpa_fp16_with_launch_us']:>12.1f} {e['speedup_vs_sdpa']:>7.2f}x "
            f"{r['read_bw_tb_s']:>6.2f} {e['fraction_of_read_probe']:>8.0%}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
