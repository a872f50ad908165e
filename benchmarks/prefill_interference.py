"""Does a long prompt stall everyone else's decode? Decode latency of many single-item
decoders, without and with one long prefill arriving every second, on a server with
chunked prefill (--prefill-chunk-tokens, default 512) and on one without (0), in one run.

    .venv/bin/python benchmarks/prefill_interference.py --backend numpy --out benchmarks/results
    python3 benchmarks/prefill_interference.py --backend cupy --decoders 64 --prompt 8192 \\
        --heads 32 --kv-heads 8 --head-dim 128 --length 1024 --out $OUT

Each decoder owns a session of --length cached tokens and sends one-token decode steps of
one layer back to back (truncated back every 64 steps, not timed). The prompter sends one
--prompt-token prefill into a fresh session each second (deleted after). Target of the
issue: decode p99 with prompts at most 2x p99 without.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import time
from datetime import UTC, datetime

import numpy as np
from bench_util import ServerProcess, write_json

from q8kv.client import AsyncClient


def _tensors(rng, n: int, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def one(heads: int) -> np.ndarray:
        return rng.standard_normal((n, heads, args.head_dim)).astype(np.float16)

    return one(args.heads), one(args.kv_heads), one(args.kv_heads)


async def _decoder(client, args, seconds: float, latencies: list[float], seed: int) -> None:
    rng = np.random.default_rng(seed)
    s = await client.create_session(1, args.heads, args.kv_heads, args.head_dim, args.length + 128)
    await s.append_and_attend(0, *_tensors(rng, args.length, args))
    step = _tensors(rng, 1, args)
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        started = time.perf_counter()
        await s.append_and_attend(0, *step)
        latencies.append(time.perf_counter() - started)
        count += 1
        if count % 64 == 0:
            await s.truncate(args.length)
    await s.delete()


async def _prompter(client, args, seconds: float, prefill_seconds: list[float]) -> None:
    rng = np.random.default_rng(7)
    prompt = _tensors(rng, args.prompt, args)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        tick = time.monotonic()
        s = await client.create_session(1, args.heads, args.kv_heads, args.head_dim, args.prompt)
        await s.append_and_attend(0, *prompt)
        prefill_seconds.append(time.monotonic() - tick)
        await s.delete()
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))


async def _phase(address: str, args, prompts: bool) -> dict:
    latencies: list[float] = []
    prefills: list[float] = []
    async with AsyncClient(address, timeout=120.0) as client:
        tasks = [
            _decoder(client, args, args.seconds, latencies, seed) for seed in range(args.decoders)
        ]
        if prompts:
            tasks.append(_prompter(client, args, args.seconds, prefills))
        await asyncio.gather(*tasks)
    ms = sorted(x * 1e3 for x in latencies)
    return {
        "steps": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 2),
        "prefills": len(prefills),
        "prefill_ms_median": round(statistics.median(prefills) * 1e3, 1) if prefills else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--decoders", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=2048, help="prefill tokens")
    parser.add_argument("--length", type=int, default=64, help="decoders' cache tokens")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=8.0, help="per phase")
    parser.add_argument(
        "--chunks",
        type=int,
        nargs="+",
        default=[512, 0],
        help="--prefill-chunk-tokens of the servers compared",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for chunk in args.chunks:
        server = ServerProcess(
            [
                "--backend",
                args.backend,
                "--memory-budget",
                "2GiB",
                "--prefill-chunk-tokens",
                str(chunk),
            ],
            metrics=False,
        )
        try:
            alone = asyncio.run(_phase(server.address, args, prompts=False))
            loaded = asyncio.run(_phase(server.address, args, prompts=True))
        finally:
            server.stop()
        rows.append(
            {
                "prefill_chunk_tokens": chunk,
                "without_prompts": alone,
                "with_prompts": loaded,
                "p99_ratio": round(loaded["p99_ms"] / alone["p99_ms"], 2),
            }
        )
    print(
        f"{'chunk':>6} {'p50 alone':>10} {'p99 alone':>10} {'p50 +prompts':>13} "
        f"{'p99 +prompts':>13} {'p99 ratio':>10} {'prefill ms':>11}"
    )
    for r in rows:
        a, w = r["without_prompts"], r["with_prompts"]
        print(
            f"{r['prefill_chunk_tokens']:>6} {a['p50_ms']:>10} {a['p99_ms']:>10} "
            f"{w['p50_ms']:>13} {w['p99_ms']:>13} {r['p99_ratio']:>10} "
            f"{w['prefill_ms_median']!s:>11}"
        )
    if args.out:
        device = platform.processor() or platform.machine()
        if args.backend == "cupy":
            import cupy

            device = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        result = {
            "benchmark": "prefill_interference",
            "device": device,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": "python benchmarks/prefill_interference.py "
            + " ".join(
                f"--{k.replace('_', '-')} {v}"
                for k, v in vars(args).items()
                if k not in ("out", "chunks")
            )
            + " --chunks "
            + " ".join(map(str, args.chunks)),
            "rows": rows,
        }
        name = "cpu" if args.backend == "numpy" else device.replace(" ", "-").lower()
        write_json(args.out, f"prefill_interference-{name}.json", result)


if __name__ == "__main__":
    main()
