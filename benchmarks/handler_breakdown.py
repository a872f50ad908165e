"""Where one decode step's server time goes, in-process (no network): decoding and checks,
the backend's append and attention, the engine run inline on the event loop vs handed to
its worker thread, encoding the output. Median microseconds over --iters calls.

    .venv/bin/python benchmarks/handler_breakdown.py [--backend numpy] [--length 16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import numpy as np

from q8kv import wire
from q8kv.server.app import build_engine
from q8kv.server.backends.base import AttendItem
from q8kv.server.config import load_config
from q8kv.server.rpc.messages import decode_items
from q8kv.server.rpc.servicer import KVCacheService
from q8kv.v1 import kvcache_pb2 as pb

H, KVH, D = 32, 8, 128


class _Context:
    def time_remaining(self) -> float:
        return 30.0


def _median_us(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def _median_us_async(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def run(args: argparse.Namespace) -> dict[str, float]:
    engine = build_engine(load_config(["--backend", args.backend, "--memory-budget", "256MiB"]))
    engine.start()
    service = KVCacheService(engine)
    geometry = pb.Geometry(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D,
                           max_len=args.length + 8)
    created = await service.CreateSession(pb.CreateSessionRequest(geometry=geometry), _Context())
    sid = created.session.session_id
    rng = np.random.default_rng(0)

    def request(n: int) -> pb.AppendAndAttendRequest:
        def tensor(heads: int) -> pb.Tensor:
            return wire.encode(rng.standard_normal((n, heads, D)), args.dtype)

        item = pb.AttendItem(session_id=sid, layer=0, q=tensor(H), k=tensor(KVH), v=tensor(KVH))
        return pb.AppendAndAttendRequest(items=[item])

    await service.AppendAndAttend(request(args.length), _Context())
    step = request(1)
    store, backend = engine.store, engine.backend
    session = store.get(sid)

    def rewind() -> None:  # keep the cache at --length tokens
        store.truncate(session, args.length)

    decoded = decode_items(step.items)
    item = AttendItem(session.layout, session.softmax_scale, session.layers[0].page_table(),
                      args.length, decoded[0].q, decoded[0].k, decoded[0].v)
    out = np.zeros((1, H, D), np.float32)

    async def handler() -> None:
        await service.AppendAndAttend(step, _Context())
        rewind()

    async def worker_path() -> None:
        engine.worker.inline_when_idle = False  # always the worker thread
        try:
            await engine.append_and_attend(decoded)
        finally:
            engine.worker.inline_when_idle = True
        rewind()

    # The backend rewrites the same slot each time: the cache length stays --length.
    figures = {
        "decode + checks": _median_us(lambda: decode_items(step.items), args.iters),
        "backend append+attend": _median_us(lambda: backend.append_and_attend([item]),
                                            args.iters),
        "encode output": _median_us(lambda: wire.encode(out, args.dtype), args.iters),
        "handler, inline": await _median_us_async(handler, args.iters),
        "engine via worker": await _median_us_async(worker_path, args.iters),
    }
    engine.stop()
    backend.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--length", type=int, default=16, help="cache tokens")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--iters", type=int, default=2000)
    args = parser.parse_args()
    for name, us in asyncio.run(run(args)).items():
        print(f"{name:24s} {us:8.1f} us")


if __name__ == "__main__":
    main()
