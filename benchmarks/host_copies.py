"""How fast this host can bring a call's pageable bytes to the GPU: the floor under one
prefill call's wall time. A call's q/k/v arrive in ordinary (pageable) memory, and every
way to the device is measured here for a few sizes:

- a copy into pinned memory (numpy's copyto and libc's memmove, 1 to 8 threads; against
  the same copy into pageable memory, to see whether a pinned destination costs);
- the driver's H2D from pageable memory, and from pinned memory (PCIe); the D2H back into
  pageable memory (reused, or fresh as a new answer's) and into pinned memory;
- pinning the bytes in place: cudaHostRegister, H2D, cudaHostUnregister;
- a kernel reading the pageable bytes itself, where the device can
  (cudaDevAttrPageableMemoryAccess: HMM).

Prints one JSON line per measurement (median of --reps, GB/s of the size) and writes
``host_copies-<card>.json``.

    python3 benchmarks/host_copies.py [--mib 6,96] [--out DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cupy as cp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import card_slug, machine, median_us, write_json  # noqa: E402

THREADS = (1, 2, 4, 8)
PAGEABLE_ACCESS = 88  # cudaDevAttrPageableMemoryAccess
PAGEABLE_VIA_HOST_TABLES = 100  # cudaDevAttrPageableMemoryAccessUsesHostPageTables (ATS)
_SUM = cp.RawKernel(
    r"""
extern "C" __global__ void sum_u4(const uint4* p, long long n, unsigned* out) {
  unsigned s = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
       i += (long long)gridDim.x * blockDim.x) {
    const uint4 v = p[i];
    s += v.x ^ v.y ^ v.z ^ v.w;
  }
  if (s == 0x9e3779b9u) out[0] = s;  // keeps the loads
}
""",
    "sum_u4",
)


def split_copy(pool: ThreadPoolExecutor, threads: int, dst: np.ndarray, src: np.ndarray,
               memmove: bool) -> None:  # fmt: skip
    """``src`` into ``dst`` in ``threads`` equal parts at once (both release the GIL)."""
    step = -(-src.size // threads)

    def part(i: int) -> None:
        lo, hi = i * step, min(src.size, (i + 1) * step)
        if memmove:
            ctypes.memmove(dst.ctypes.data + lo, src.ctypes.data + lo, hi - lo)
        else:
            np.copyto(dst[lo:hi], src[lo:hi])

    for f in [pool.submit(part, i) for i in range(threads)]:
        f.result()


def measure(nbytes: int, reps: int, pool: ThreadPoolExecutor) -> list[dict]:
    """Every route for ``nbytes``, each printed as a JSON line as it is measured."""
    rows: list[dict] = []

    def row(what: str, us: float, **extra) -> None:
        rows.append({"mib": nbytes / 2**20, "what": what, "us": round(us, 1),
                     "gb_s": round(nbytes / us / 1e3, 2), **extra})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    src = np.random.default_rng(0).integers(0, 255, nbytes, np.uint8)  # resident, pageable
    pinned = np.frombuffer(cp.cuda.alloc_pinned_memory(nbytes), np.uint8, nbytes)
    pageable = np.empty(nbytes, np.uint8)
    pageable[:] = 1  # faulted in
    dev = cp.empty(nbytes, cp.uint8)
    for threads in THREADS:
        for memmove in (False, True):
            how = "memmove" if memmove else "numpy"
            us = median_us(lambda t=threads, m=memmove: split_copy(pool, t, pinned, src, m), reps)
            row("copy to pinned", us, threads=threads, how=how)
            us = median_us(lambda t=threads, m=memmove: split_copy(pool, t, pageable, src, m), reps)
            row("copy to pageable", us, threads=threads, how=how)

    def h2d(host: np.ndarray) -> None:
        dev.data.copy_from_host(host.ctypes.data, nbytes)
        cp.cuda.Device().synchronize()

    row("H2D from pageable", median_us(lambda: h2d(src), reps))
    row("H2D from pinned", median_us(lambda: h2d(pinned), reps))

    def d2h(host: np.ndarray) -> None:
        dev.data.copy_to_host(host.ctypes.data, nbytes)

    row("D2H to pageable", median_us(lambda: d2h(pageable), reps))
    row("D2H to fresh pageable", median_us(lambda: d2h(np.empty(nbytes, np.uint8)), reps))
    row("D2H to pinned", median_us(lambda: d2h(pinned), reps))

    def pin_in_place() -> None:
        cp.cuda.runtime.hostRegister(src.ctypes.data, nbytes, 0)
        try:
            h2d(src)
        finally:
            cp.cuda.runtime.hostUnregister(src.ctypes.data)

    row("register, H2D, unregister", median_us(pin_in_place, reps))
    dev_id = cp.cuda.Device().id
    if cp.cuda.runtime.deviceGetAttribute(PAGEABLE_ACCESS, dev_id):
        out = cp.zeros(1, cp.uint32)
        fresh = [src.copy() for _ in range(reps)]  # pages the GPU has not touched yet

        def read_pageable() -> None:
            host = fresh.pop()
            _SUM((264,), (512,), (host.ctypes.data, np.int64(nbytes // 16), out))
            cp.cuda.Device().synchronize()

        row("kernel reads pageable memory", median_us(read_pageable, reps))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", default="6,96", help="sizes in MiB (6: 0 + 512's q/k/v)")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    dev_id = cp.cuda.Device().id
    props = cp.cuda.runtime.getDeviceProperties(dev_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    access = {
        "pageable_memory_access": cp.cuda.runtime.deviceGetAttribute(PAGEABLE_ACCESS, dev_id),
        "uses_host_page_tables": cp.cuda.runtime.deviceGetAttribute(
            PAGEABLE_VIA_HOST_TABLES, dev_id),
    }  # fmt: skip
    print(json.dumps(access), flush=True)
    rows = []
    with ThreadPoolExecutor(max(THREADS)) as pool:
        for mib in (float(m) for m in args.mib.split(",")):
            rows += measure(int(mib * 2**20), args.reps, pool)
    result = {"machine": machine("cupy", name), "command": "python3 benchmarks/host_copies.py "
              + " ".join(sys.argv[1:]), "device_access": access, "rows": rows}  # fmt: skip
    write_json(args.out, f"host_copies-{card_slug('cupy', name)}.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
