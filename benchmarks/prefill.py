"""Prefill on the GPU: the Q8 prefill path (append + attention over the paged cache) against
torch SDPA in fp16 over an fp16 cache, device time and the wall time of one backend call.

H=32, KVH=8, D=128, one item appending n tokens after a cache of ``start`` tokens, causal
(new token i sees positions [0, start + i]), (start, n) in (0, 512), (0, 2048), (0, 8192),
(16384, 512), (16384, 2048). Per shape, in one run:

- ``q8kv_us``: device time of the quantize-append and attention launches of a prepared
  batch (CUDA events, median of --reps, a GPU spin before each sample so launch gaps stay
  out), float16 wire: the 16-bit tensor-core prefill kernel. ``q8kv_f32_wire_us``: the same
  call with a float32 wire (the float32-grade kernel).
- ``q8kv_wall_us``: wall time of ``CupyBackend.append_and_attend([item])`` (pack, copies,
  launches, download), median of --wall-reps; ``q8kv_packed_wall_us``: the same through
  ``attend_packed`` (what AttendBatch runs: the output narrowed to fp16 on the device).
  ``pcie_us``: the H2D copy of the call's input bytes plus the D2H copy of its fp16 output,
  from pinned memory, in the same run: the wall target is 1.5x (device + pcie).
- ``torch_sdpa_fp16_us``: SDPA (fp16 q/k/v, bottom-right causal) on the same shape.
- errors (relative L2) against float64 attention over the dequantized cache: q8kv with a
  float16 wire (the answer as sent, rounded to float16, and the 16-bit kernel's float32
  output before that rounding), the float32 wire, and SDPA fp16 (its fp16 output) on the
  same q and the cache rounded to fp16.

    python3 benchmarks/prefill.py [--out DIR] [--reps 20]

Adds ``prefill_rows`` to DIR/kernels-<card>.json (written by kernels.py; created if absent).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import cupy as cp
import host_copies
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from bench_util import median_us
from kernels import _FILL, PAGE_CODE_BYTES, card_slug, time_cupy, time_torch

from q8kv.server.backends.base import AttendItem, LayerLayout, PackedItems, tokens_per_page
from q8kv.server.backends.cupy import kernels as q8_kernels
from q8kv.server.backends.cupy.backend import CupyBackend

H, KVH, D = 32, 8, 128
SHAPES = [(0, 512), (0, 2048), (0, 8192), (16384, 512), (16384, 2048)]


def causal_flops(start: int, n: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over the positions each new token sees."""
    seen = n * start + n * (n + 1) / 2
    return 4.0 * H * D * seen


def setup(start: int, n: int, rng: np.random.Generator):
    t = tokens_per_page(PAGE_CODE_BYTES, KVH, D)
    layout = LayerLayout(H, KVH, D, t)
    pages = -(-(start + n) // t)
    backend = CupyBackend(pages + 8, PAGE_CODE_BYTES)
    with backend.stream:
        size = backend.codes.size
        _FILL(
            (-(-size // 256),), (256,),
            (backend.codes, np.int64(size), backend.scales, np.int64(backend.scales.size),
             np.uint32(rng.integers(1 << 31))),
        )  # fmt: skip
    ids = rng.permutation(pages + 8)[:pages].astype(np.int32)
    backend.stream.synchronize()
    return backend, layout, ids


def item(layout, ids, start, n, rng, dtype) -> AttendItem:
    """n new tokens, the answer in the wire's dtype (as the service asks for it)."""
    q = rng.standard_normal((n, H, D), dtype=np.float32).astype(dtype)
    k = rng.standard_normal((n, KVH, D), dtype=np.float32).astype(dtype)
    v = rng.standard_normal((n, KVH, D), dtype=np.float32).astype(dtype)
    return AttendItem(layout, D**-0.5, ids, start, q, k, v, np.dtype(dtype))


def device_us(backend, it, reps, spin_cycles) -> float:
    batch = backend.prepare([it], own_device_copy=True)

    def launch(_i):
        backend.launch_append(batch)
        backend.launch_attention(batch)

    return time_cupy(launch, backend.stream, reps, spin_cycles, spin=True)


def wall_us(fn, reps: int) -> float:
    """``median_us`` after one warm-up call."""
    fn()
    return median_us(fn, reps)


def pcie_us(in_bytes: int, out_bytes: int, reps: int) -> float:
    """H2D of the inputs plus D2H of the output, pinned host memory, one stream."""
    stream = cp.cuda.Stream(non_blocking=True)
    host = cp.cuda.alloc_pinned_memory(max(in_bytes, out_bytes))
    dev = cp.empty(max(in_bytes, out_bytes), cp.uint8)

    def launch(_i):
        dev.data.copy_from_host_async(host.ptr, in_bytes, stream)
        dev.data.copy_to_host_async(host.ptr, out_bytes, stream)

    return time_cupy(launch, stream, reps, 0, spin=False)


def errors(backend, layout, it, out16, out32) -> dict:
    """Relative L2 vs float64 (on the GPU, one kv head at a time) of q8kv (16-bit and
    float32 wires) and of SDPA fp16 over the same q and the cache rounded to fp16."""
    length = it.start + it.n
    kv = torch.from_dlpack(backend.dequantize_device(layout, it.page_ids, 0, length))
    backend.stream.synchronize()
    q = torch.from_numpy(it.q.astype(np.float32)).cuda()  # [n, H, D]
    g = H // KVH
    pos = torch.arange(length, device="cuda")
    lim = it.start + torch.arange(it.n, device="cuda")
    mask = pos[None, :] > lim[:, None]  # [n, L]
    ref = torch.empty(it.n, H, D, dtype=torch.float64, device="cuda")
    sdpa = torch.empty(it.n, H, D, dtype=torch.float32, device="cuda")
    for h in range(KVH):
        k, v = kv[0, h].double(), kv[1, h].double()
        qh = q[:, h * g : (h + 1) * g].double().transpose(0, 1)  # [g, n, D]
        s = (qh @ k.T) * it.softmax_scale
        s.masked_fill_(mask, float("-inf"))
        ref[:, h * g : (h + 1) * g] = (torch.softmax(s, -1) @ v).transpose(0, 1)
        with torch.no_grad():
            o = F.scaled_dot_product_attention(
                qh.half()[None], kv[0, h].half()[None, None].expand(1, g, length, D),
                kv[1, h].half()[None, None].expand(1, g, length, D),
                attn_mask=~mask[None, None], scale=it.softmax_scale,
            )
        sdpa[:, h * g : (h + 1) * g] = o[0].float().transpose(0, 1)
    norm = torch.linalg.norm(ref).item()

    def rel(x) -> float:
        x = torch.as_tensor(np.asarray(x, np.float32)).cuda() if not torch.is_tensor(x) else x
        return float(torch.linalg.norm(x.double() - ref).item() / norm)

    return {"q8kv_fp16_wire": rel(out16), "q8kv_f32_wire": rel(out32), "sdpa_fp16": rel(sdpa)}


def bench_sdpa(start: int, n: int, reps: int, spin_cycles: int) -> tuple[float, str]:
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(1, H, n, D, device="cuda", dtype=torch.float16)
    k = torch.randn(1, KVH, start + n, D, device="cuda", dtype=torch.float16)
    v = torch.randn(1, KVH, start + n, D, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        if start == 0:
            how = "is_causal, enable_gqa"

            def fn(_i):
                F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            return time_torch(fn, reps, spin_cycles, spin=True), how
        bias = causal_lower_right(n, start + n)
        kx, vx = (x.repeat_interleave(H // KVH, dim=1) for x in (k, v))
        how = "causal_lower_right, kv heads repeated"

        def fn2(_i):
            F.scaled_dot_product_attention(q, kx, vx, attn_mask=bias)

        return time_torch(fn2, reps, spin_cycles, spin=True), how


def bench(start, n, reps, wall_reps, spin_cycles, rng) -> dict:
    backend, layout, ids = setup(start, n, rng)
    it16 = item(layout, ids, start, n, rng, np.float16)
    it32 = AttendItem(layout, it16.softmax_scale, ids, start, *(
        a.astype(np.float32) for a in (it16.q, it16.k, it16.v)), np.dtype(np.float32))  # fmt: skip
    row: dict = {"start": start, "n": n}
    row["q8kv_us"] = device_us(backend, it16, reps, spin_cycles)
    row["q8kv_f32_wire_us"] = device_us(backend, it32, max(3, reps // 4), spin_cycles)
    row["q8kv_wall_us"] = wall_us(lambda: backend.append_and_attend([it16]), wall_reps)
    packed = PackedItems(layout, np.array([it16.softmax_scale]), [ids], np.array([start]),
                         it16.q[None], it16.k[None], it16.v[None], it16.out_dtype)  # fmt: skip
    row["q8kv_packed_wall_us"] = wall_us(lambda: backend.attend_packed(packed), wall_reps)
    in_bytes = sum(a.nbytes for a in (it16.q, it16.k, it16.v))
    row["pcie_us"] = pcie_us(in_bytes, it16.q.nbytes, 10)
    out16 = backend.append_and_attend([it16])[0]  # on the wire: rounded to float16
    out32 = backend.append_and_attend([it32])[0]
    kernel_out = backend.append_and_attend([replace(it16, out_dtype=np.dtype(np.float32))])[0]
    row["rel_l2_vs_float64"] = errors(backend, layout, it16, out16, out32)
    # The 16-bit kernel's own float32 output, before the wire's rounding.
    row["rel_l2_vs_float64"]["q8kv_fp16_kernel_f32_out"] = errors(
        backend, layout, it16, kernel_out, out32)["q8kv_fp16_wire"]  # fmt: skip
    backend.close()
    cp.get_default_memory_pool().free_all_blocks()
    row["torch_sdpa_fp16_us"], row["sdpa_how"] = bench_sdpa(start, n, reps, spin_cycles)
    torch.cuda.empty_cache()
    flops = causal_flops(start, n)
    row["q8kv_tflop_s"] = flops / (row["q8kv_us"] * 1e-6) / 1e12
    row["torch_sdpa_fp16_tflop_s"] = flops / (row["torch_sdpa_fp16_us"] * 1e-6) / 1e12
    row["device_vs_sdpa"] = row["q8kv_us"] / row["torch_sdpa_fp16_us"]
    row["wall_vs_device_plus_pcie"] = row["q8kv_wall_us"] / (row["q8kv_us"] + row["pcie_us"])
    for key, value in list(row.items()):
        if isinstance(value, float):
            row[key] = round(value, 3 if value < 100 else 1)
    return row


def variants(specs: list[str], shapes, reps, spin_cycles, rng) -> None:
    """Device time of kernel variants, printed only: ``name=ws[S][:DEFINE=V...]`` (K/V
    dequantized into 16-bit tiles first, then the warp-specialized kernel with S stages),
    ``name=wg[N][:DEFINE=V...]`` (the wgmma kernel dequantizing in its loop, N warpgroups
    per block) or ``name=sync:warps:bn[:DEFINE=V...]`` (mma.sync)."""
    for start, n in shapes:
        backend, layout, ids = setup(start, n, rng)
        it = item(layout, ids, start, n, rng, np.float16)
        ref = None
        for spec in specs:
            name, _, rest = spec.partition("=")
            kind, *parts = rest.split(":")
            q8_kernels.PREFILL_WGMMA = kind.startswith(("wg", "ws"))
            q8_kernels.PREFILL_WS = kind.startswith("ws")
            q8_kernels.WGMMA_WARPGROUPS = int(kind[2:] or 2) if kind.startswith("wg") else 2
            q8_kernels.PREFILL_STAGES = int(kind[2:] or 4) if kind.startswith("ws") else 4
            if not kind.startswith(("wg", "ws")):
                warps, bn, *parts = parts
                q8_kernels.PREFILL_WARPS, q8_kernels.PREFILL_BN = int(warps), int(bn)
            q8_kernels.EXTRA_DEFINES = tuple(f"-D{d}" for d in parts)
            us = device_us(backend, it, reps, spin_cycles)
            out = backend.append_and_attend([it])[0]
            ref = out if ref is None else ref
            diff = float(np.abs(out - ref).max())
            print(f"variant {name:>10} {start:>6}+{n:<5} {us:9.1f} us  "
                  f"{causal_flops(start, n) / us / 1e6:6.0f} TF/s  max|diff| {diff:.2e}",
                  flush=True)  # fmt: skip
        q8_kernels.PREFILL_WARPS, q8_kernels.PREFILL_BN, q8_kernels.EXTRA_DEFINES = 8, None, ()
        q8_kernels.PREFILL_WGMMA, q8_kernels.WGMMA_WARPGROUPS = True, 2
        q8_kernels.PREFILL_WS, q8_kernels.PREFILL_STAGES = True, 4
        backend.close()


def launch_parts(start: int, n: int, reps: int, spin_cycles: int, rng) -> None:
    """Device time of each launch of one float16 call alone (CUDA events, each with its own
    launch cost): the quantize-append, the cached tokens' 16-bit tiles (q8_kv_tiles, where
    the kernel over tiles serves), the attention, and all of them, as device_us times them."""
    backend, layout, ids = setup(start, n, rng)
    it = item(layout, ids, start, n, rng, np.float16)
    batch = backend.prepare([it], own_device_copy=True)
    backend.launch_append(batch)  # takes the scratch (batch.tiles_at)
    ln = batch.launches[0]
    over_tiles = ln.kernel.tiles is not None and batch.tiles_at

    def attention_alone(_i):  # without the cached tokens' tiles (written once above)
        cached, ln.cached = ln.cached, False
        backend.launch_attention(batch)
        ln.cached = cached

    def every(_i):
        backend.launch_append(batch)
        backend.launch_attention(batch)

    parts = {"append": lambda _i: backend.launch_append(batch), "all": every}
    if over_tiles:
        backend.launch_attention(batch)  # the cached tokens' tiles, for attention_alone
        parts["attention"] = attention_alone
        if ln.cached:
            parts["cached_tiles"] = lambda _i: backend.launch_cached_tiles(batch, ln)
    us = {k: round(time_cupy(f, backend.stream, reps, spin_cycles, spin=True), 1)
          for k, f in parts.items()}  # fmt: skip
    print(json.dumps({"launches_us": {"start": start, "n": n, **us}}), flush=True)
    backend.close()


def host_phases(start: int, n: int, rng, reps: int = 5) -> None:
    """Where the wall time of one packed call goes, and the host's copy routes it rests on
    (``host_copies.measure`` at the size of its inputs)."""
    backend, layout, ids = setup(start, n, rng)
    it = item(layout, ids, start, n, rng, np.float16)
    packed = PackedItems(layout, np.array([it.softmax_scale]), [ids], np.array([start]),
                         it.q[None], it.k[None], it.v[None], np.dtype(np.float16))  # fmt: skip
    from q8kv.server.backends.cupy.packing import pack_packed

    def phase(fn) -> float:  # to the end of its device work
        def synced() -> None:
            fn()
            backend.stream.synchronize()

        return wall_us(synced, reps)

    with backend._device:
        pol = backend._policy()
        holder = {}
        pk = lambda: holder.__setitem__("b", pack_packed(  # noqa: E731
            packed, backend._host_in.get, backend._attn_kernel, pol))
        t_pack = phase(pk)
        t_run = phase(lambda: backend._run(holder["b"]))
        t_down = phase(lambda: backend._download_narrow(holder["b"], np.dtype(np.float16)))
        nbytes = it.q.nbytes
        t_copy_out = phase(lambda: backend._host_out.view[: nbytes].copy())
    total = phase(lambda: backend.attend_packed(packed))
    inb = sum(a.nbytes for a in (it.q, it.k, it.v))
    print(json.dumps({"host_phases_us": {
        "start": start, "n": n, "in_mb": inb / 2**20, "out_mb": nbytes / 2**20,
        "pack": t_pack, "upload_append_attend": t_run, "narrow_d2h": t_down,
        "copy_out": t_copy_out, "attend_packed_total": total}}), flush=True)
    backend.close()
    # The routes those rest on, at the size of the call's inputs (host_copies.py's rows).
    with ThreadPoolExecutor(max(host_copies.THREADS)) as pool:
        host_copies.measure(inb, reps, pool)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--wall-reps", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(f"{s}+{n}" for s, n in SHAPES),
                    help="start+n,...")  # fmt: skip
    ap.add_argument("--variant", action="append", default=[],
                    help="name=wg|sync:warps:bn[:DEFINE=V...]: kernel variants")  # fmt: skip
    ap.add_argument("--host-phases", action="store_true", help="the wall time's parts only")
    ap.add_argument("--launches", action="store_true",
                    help="device time of each launch of one call alone")  # fmt: skip
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("+")) for s in args.shapes.split(",")]
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    spin_cycles = int(props["clockRate"] * 1000 * 2e-3)  # ~2 ms: longer than any launch gap
    rng = np.random.default_rng()
    if args.variant:
        variants(args.variant, shapes, args.reps, spin_cycles, rng)
        return 0
    if args.host_phases:
        for start, n in shapes:
            host_phases(start, n, rng)
        return 0
    if args.launches:
        for start, n in shapes:
            launch_parts(start, n, args.reps, spin_cycles, rng)
        return 0
    rows = []
    for start, n in shapes:
        row = bench(start, n, args.reps, args.wall_reps, spin_cycles, rng)
        row["device"] = name
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels-{card_slug(name)}.json"
    result = json.loads(path.read_text()) if path.exists() else {"device": name}
    result["prefill"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python3 " + " ".join(sys.argv),
        "geometry": {"H": H, "KVH": KVH, "D": D, "page_code_bytes": PAGE_CODE_BYTES},
        "torch": torch.__version__,
        "cupy": cp.__version__,
    }
    result["prefill_rows"] = rows
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{name}; times in us")
    print(f"{'start+n':>12} {'q8kv':>9} {'sdpa':>9} {'ratio':>6} {'TF/s':>6} {'f32 wire':>9} "
          f"{'wall':>9} {'packed':>9} {'pcie':>8} {'err q8kv':>9} {'err sdpa':>9}")  # fmt: skip
    for r in rows:
        e = r["rel_l2_vs_float64"]
        print(
            f"{r['start']:>6}+{r['n']:<5} {r['q8kv_us']:>9.1f} {r['torch_sdpa_fp16_us']:>9.1f} "
            f"{r['device_vs_sdpa']:>6.2f} {r['q8kv_tflop_s']:>6.0f} {r['q8kv_f32_wire_us']:>9.1f} "
            f"{r['q8kv_wall_us']:>9.0f} {r['q8kv_packed_wall_us']:>9.0f} {r['pcie_us']:>8.0f} "
            f"{e['q8kv_fp16_wire']:>9.2e} {e['sdpa_fp16']:>9.2e}"
        )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
