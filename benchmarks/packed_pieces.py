"""The host pieces of one packed decode call (AttendBatch: B sessions, one token each,
in-process, no network), median microseconds per call:

- ``decode_batch``: the request's parse checks and the finite/range pass over q, k, v;
- ``prepare_packed``: the engine's per-session lookups, checks and length moves (the
  allocation is rolled back after each call, untimed);
- ``pack_packed``: the GPU backend's packing of q/k/v, meta rows, page ids and launch plan
  into its host buffer, with stand-in kernels and a plain buffer (host-only numpy: no CuPy
  needed).

``--against DIR`` also times another tree (DIR holds its ``proto/`` and ``server/``, e.g.
``git archive COMMIT proto server | tar -x -C DIR``), imported as a second package, in
alternating rounds in the same process: this VM's speed drifts 2-3x between minutes, so a
change is only measured against its base in one run.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/packed_pieces.py [--against DIR]
"""

from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from batch_path import DTYPE, KVH, D, H, batch_request
from bench_util import median_us

PIECES = ("decode_batch", "prepare_packed", "pack_packed")


def load_tree(root: Path, into: Path, name: str) -> str:
    """``root``'s q8kv (proto/q8kv with server/ as its .server) as package ``name``: its
    absolute imports of q8kv renamed, but for the generated stubs (q8kv.v1), which one
    process can register only once."""
    shutil.copytree(root / "proto" / "q8kv", into / name, ignore=shutil.ignore_patterns("v1"))
    shutil.copytree(root / "server", into / name / "server")
    # "from q8kv.x import", "from q8kv import", "import q8kv.x": all but q8kv.v1.
    absolute = re.compile(r"^(\s*(?:from|import)\s+)q8kv\b(?=\.(?!v1\b)|\s+import\b)", re.M)
    for path in (into / name).rglob("*.py"):
        path.write_text(absolute.sub(rf"\g<1>{name}", path.read_text()))
    if str(into) not in sys.path:
        sys.path.insert(0, str(into))
    return name


class Pieces:
    """One tree's three pieces over the same request."""

    def __init__(self, package: str, args: argparse.Namespace, request_bytes: bytes) -> None:
        def mod(name: str):
            return importlib.import_module(f"{package}.{name}")

        from q8kv.v1 import kvcache_pb2 as pb

        self.messages = mod("server.rpc.messages")
        self.packed = mod("server.engine.packed")
        self.packing = mod("server.backends.cupy.packing")
        kernels, tuning = mod("server.backends.cupy.kernels"), mod("server.backends").GpuTuning()
        cache, fmt = mod("server.cache"), mod("format")
        pool = cache.PagePool(args.batch * (args.length // 16 + 8), 65536)
        self.store = cache.SessionStore(pool, max_sessions=args.batch)
        ids = []
        for b in range(args.batch):
            session = self.store.create(fmt.Geometry(1, H, KVH, D, args.length + 64), f"s{b}")
            with self.store.begin() as allocation:
                allocation.pin(session)
                allocation.grow(session, 0, args.length)
            ids.append(session.id)
        self.request = pb.AttendBatchRequest.FromString(request_bytes)
        self.batch = self.messages.decode_batch(self.request)
        assert self.batch.session_ids == ids
        self.items = self._prepare()[1]

        def kernel_for(head_dim: int, route: int):
            tok = kernels.tokens_per_stage(head_dim, tuning)
            return kernels.AttnKernel(None, tok, kernels.ROWS_PER_TILE, 0, 2)

        self.kernel_for = kernel_for
        self.policy = self.packing.SplitPolicy(132, tuning.split_waves, tuning.max_splits)
        self.host = np.zeros(16 << 20, np.uint8)

    def _prepare(self) -> tuple[float, object]:
        allocation = self.store.begin()
        started = time.perf_counter()
        items = self.packed.prepare_packed(self.store, self.batch, "", allocation, [])
        elapsed = time.perf_counter() - started
        allocation.roll_back()
        return elapsed, items

    def run(self, iters: int) -> dict[str, float]:
        host = self.host
        return {
            "decode_batch": median_us(lambda: self.messages.decode_batch(self.request), iters),
            "prepare_packed": statistics.median(self._prepare()[0] for _ in range(iters)) * 1e6,
            "pack_packed": median_us(
                lambda: self.packing.pack_packed(
                    self.items, lambda nbytes: host, self.kernel_for, self.policy
                ),
                iters,
            ),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="sessions per call [64]")
    ap.add_argument(
        "--length", type=int, default=1000,
        help="cache tokens of each session before the call [1000]; a multiple of 32 (a "
        "page at H = 32, KVH = 8, D = 128) makes every session take a new page",
    )  # fmt: skip
    ap.add_argument("--iters", type=int, default=300, help="calls per piece per round [300]")
    ap.add_argument("--rounds", type=int, default=5, help="rounds [5]")
    ap.add_argument("--against", type=Path, help="a tree to time in alternating rounds")
    args = ap.parse_args()
    ids = [f"s{b}" for b in range(args.batch)]
    raw = batch_request(ids, np.random.default_rng(0)).SerializeToString()
    trees = {"this": Pieces("q8kv", args, raw)}
    figures: dict[str, list[dict[str, float]]] = {"this": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            trees["against"] = Pieces(load_tree(args.against, Path(tmp), "q8kv_against"), args, raw)
            figures["against"] = []
        for r in range(args.rounds):
            for name, tree in trees.items():
                figures[name].append(tree.run(args.iters))
            shown = (f"{name} " + ", ".join(f"{p} {runs[-1][p]:.1f}" for p in PIECES)
                     for name, runs in figures.items())  # fmt: skip
            print(f"round {r}: " + "; ".join(shown))
    print(f"B = {args.batch}, {args.length}-token caches, {DTYPE}: median over "
          f"{args.rounds} rounds of each round's median us")  # fmt: skip
    for piece in PIECES:
        line = f"  {piece:>15}: this {statistics.median(f[piece] for f in figures['this']):7.1f}"
        if args.against:
            against = statistics.median(f[piece] for f in figures["against"])
            pairs = zip(figures["this"], figures["against"], strict=True)
            ratio = statistics.median(t[piece] / a[piece] for t, a in pairs)
            line += f", against {against:7.1f} (this / against per round: median {ratio:.2f})"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
