"""Forks: what a ForkSession costs on the server, and what sharing saves.

1. Fork time: a source of ``--fork-tokens`` tokens in each of ``--fork-layers`` layers
   (default 32,768 x 32, Llama-3-8B's KVH = 8, D = 128, 64 KiB pages: 32,768 pages) is
   built as bookkeeping only (its pages are never written: a fork never reads them), then
   forked ``--repeats`` times through the Engine's worker (the server-side work of one
   ForkSession: the store's fork and the snapshot of its answer) and through the store
   alone. Each fork is deleted before the next.
2. Pool bytes: a ``--prompt``-token source (random Q8 codes written straight into its
   pages, as an ImportSession would), ``--forks`` forks of it, each decoding ``--decode``
   tokens through the Engine (all forks' items of a step in one call: the real append
   transaction, copy-on-write and quantize-append into the pages; attention only with
   ``--attend``: it changes no pool byte and takes the numpy backend ~10 minutes here).
   The pool's used bytes against: one prompt plus the tails (the ideal), and ``--forks``
   independent sessions of prompt + decode tokens.

    .venv/bin/python benchmarks/fork.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_util import machine, write_json  # noqa: E402

from q8kv.format import tokens_per_page  # noqa: E402
from q8kv.server.backends.numpy_backend import NumpyBackend  # noqa: E402
from q8kv.server.cache import Geometry, PagePool, SessionStore  # noqa: E402
from q8kv.server.engine import AppendRequest, Engine  # noqa: E402


class AppendOnly(NumpyBackend):
    """Quantize-append only (the pool-bytes part without ``--attend``): the pages are
    written as by a real append; the outputs are zeros."""

    def append_and_attend(self, items):
        for item in items:
            self._append(item)
        return [np.zeros(item.q.shape, np.float32) for item in items]


def built(store: SessionStore, geometry: Geometry, tokens: int, sid: str = "src"):
    """A session of ``tokens`` tokens per layer, pages reserved (bookkeeping only)."""
    session = store.create(geometry, sid)
    for layer in session.layers:
        store.reserve(session, layer, tokens)
        store.set_length(session, layer, tokens)
    return session


def fork_time(args) -> dict:
    geo = Geometry(args.fork_layers, args.heads, args.kv_heads, args.head_dim, args.fork_tokens)
    tpp = tokens_per_page(args.page_bytes, args.kv_heads, args.head_dim)
    pages = args.fork_layers * -(-args.fork_tokens // tpp)
    store = SessionStore(PagePool(pages, args.page_bytes), max_sessions=4)
    engine = Engine(NumpyBackend(1, args.page_bytes), store)  # the fork never reads pages
    source = built(store, geo, args.fork_tokens)
    engine.start()
    worker, alone = [], []

    async def run() -> None:
        for _ in range(args.repeats):
            started = time.perf_counter()
            await engine.fork_session("src", "", "f", None, 0)
            worker.append(time.perf_counter() - started)
            await engine.delete_session("f", "")
            started = time.perf_counter()
            store.fork(source, "f")
            alone.append(time.perf_counter() - started)
            store.delete("f")

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    store.check_invariants()
    ms = lambda xs: {  # noqa: E731
        "p50": statistics.median(xs) * 1e3,
        "p90": float(np.percentile(xs, 90)) * 1e3,
        "min": min(xs) * 1e3,
    }
    return {
        "geometry": {
            "layers": args.fork_layers,
            "tokens_per_layer": args.fork_tokens,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "page_bytes": args.page_bytes,
            "tokens_per_page": tpp,
            "pages_shared": pages,
        },
        "repeats": args.repeats,
        "engine_call_ms": ms(worker),
        "store_fork_ms": ms(alone),
    }


def pool_bytes(args) -> dict:
    geo = Geometry(
        args.layers,
        args.heads_small,
        args.kv_heads_small,
        args.head_dim_small,
        args.prompt + args.decode,
    )
    tpp = tokens_per_page(args.page_bytes_small, geo.num_kv_heads, geo.head_dim)
    per_session = args.layers * -(-(args.prompt + args.decode) // tpp)
    num_pages = args.layers * -(-args.prompt // tpp) + args.forks * per_session
    store = SessionStore(PagePool(num_pages, args.page_bytes_small), max_sessions=64)
    backend = (NumpyBackend if args.attend else AppendOnly)(num_pages, args.page_bytes_small)
    engine = Engine(backend, store, max_batch_items=4096)
    rng = np.random.default_rng(0)
    source = built(store, geo, args.prompt)
    for layer in source.layers:  # random Q8 tokens, as an import writes them
        shape = (2, geo.num_kv_heads, args.prompt)
        codes = rng.integers(-127, 128, (*shape, geo.head_dim), dtype=np.int8)
        scales = (rng.random((*shape, geo.head_dim // 32), dtype=np.float32) + 0.5) / 127
        backend.write_tokens(source.layout, layer.page_table(), 0, codes, scales)
    engine.start()
    page = store.pool.page_bytes
    prompt_pages = store.pool.used_pages

    async def run() -> float:
        for i in range(args.forks):
            await engine.fork_session("src", "", f"f{i}", None, 0)
        started = time.perf_counter()
        for _ in range(args.decode):
            items = [
                AppendRequest(
                    f"f{i}",
                    layer,
                    *(
                        rng.standard_normal((1, h, geo.head_dim), dtype=np.float32)
                        for h in (geo.num_heads, geo.num_kv_heads, geo.num_kv_heads)
                    ),
                )
                for i in range(args.forks)
                for layer in range(args.layers)
            ]
            await engine.append_and_attend(items, "")
        return time.perf_counter() - started

    try:
        seconds = asyncio.run(run())
    finally:
        engine.stop()
    store.check_invariants()
    used = store.pool.used_pages * page
    # The tail of a fork: its decoded tokens' pages, plus the copy of the prompt's last
    # page when the prompt ends inside one.
    tail_pages = args.layers * (-(-(args.prompt + args.decode) // tpp) - args.prompt // tpp)
    ideal = (prompt_pages + args.forks * tail_pages) * page
    independent = args.forks * per_session * page
    return {
        "geometry": {
            "layers": args.layers,
            "heads": geo.num_heads,
            "kv_heads": geo.num_kv_heads,
            "head_dim": geo.head_dim,
            "page_bytes": args.page_bytes_small,
            "tokens_per_page": tpp,
        },
        "attention": bool(args.attend),
        "prompt_tokens": args.prompt,
        "forks": args.forks,
        "decode_tokens": args.decode,
        "pool_used_bytes": used,
        "shared_saved_bytes": store.pool.shared_saved_pages * page,
        "one_prompt_plus_tails_bytes": ideal,
        "independent_sessions_bytes": independent,
        "used_over_prompt_plus_tails": used / ideal,
        "independent_over_used": independent / used,
        "decode_seconds": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fork-layers", type=int, default=32)
    p.add_argument("--fork-tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-bytes", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--layers", type=int, default=2, help="pool-bytes part: layers")
    p.add_argument("--heads-small", type=int, default=4)
    p.add_argument("--kv-heads-small", type=int, default=1)
    p.add_argument("--head-dim-small", type=int, default=64)
    p.add_argument("--page-bytes-small", type=int, default=16384)
    p.add_argument("--prompt", type=int, default=16384)
    p.add_argument("--forks", type=int, default=16)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--attend", action="store_true", help="run attention on every decode step")
    p.add_argument("--out", default=None, help="directory for the result file")
    p.add_argument("--name", default="fork-cpu.json", help="the result file's name")
    args = p.parse_args()
    result = {
        "benchmark": "fork",
        "command": "python benchmarks/fork.py " + " ".join(sys.argv[1:]),
        "machine": machine("numpy", "cpu"),
        "fork_time": fork_time(args),
        "pool_bytes": pool_bytes(args),
    }
    ft, pb = result["fork_time"], result["pool_bytes"]
    print(
        f"fork of {args.fork_layers} x {args.fork_tokens} tokens "
        f"({ft['geometry']['pages_shared']} pages): engine call p50 "
        f"{ft['engine_call_ms']['p50']:.3f} ms, store alone p50 "
        f"{ft['store_fork_ms']['p50']:.3f} ms"
    )
    print(
        f"{args.forks} forks of {args.prompt} + {args.decode} each: pool "
        f"{pb['pool_used_bytes'] / 2**20:.1f} MiB = {pb['used_over_prompt_plus_tails']:.3f}x "
        f"one prompt plus the tails; independent sessions "
        f"{pb['independent_sessions_bytes'] / 2**20:.1f} MiB "
        f"({pb['independent_over_used']:.1f}x more)"
    )
    if args.out:
        write_json(args.out, args.name, result)


if __name__ == "__main__":
    main()
