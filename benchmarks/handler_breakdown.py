"""Where one decode step's server time goes, in-process (no network): decoding and checks,
the backend's append and attention, the engine run inline on the event loop vs handed to
its worker thread, encoding the output (in the wire dtype, as the service answers). Median
microseconds over --iters calls.

The packed path (AttendBatch) at ``--batch`` sessions (64), each with a ``--length`` cache:
decode_batch (parse checks and the finite/range pass over q, k, v), the engine's
attend_batch (one job: lookups, reservations, the backend) and the same with a backend
that answers at once (the engine's own bookkeeping), the backend alone (as B items, and
packed: attend_packed), the output's encode (serialized by hand, as the service answers,
and built as a protobuf message, as it answered before), and the whole handler; the B
sessions are truncated back after each call, untimed.

``--front``: what the front door (server/rpc/front.py) costs per call, from outside: one
single-item decode step (raw stub, one at a time, truncated back untimed) through servers
with metrics off/on and auth off/on, run in alternating rounds so drift hits all alike.
Drain and the decode guard are always on, so "bare" includes them.

    .venv/bin/python benchmarks/handler_breakdown.py [--backend numpy] [--length 16] [--front]
        [--pause-us 500 [--pause-spin]]

``--pause-us``: each timed call sleeps that long first, as a server's thread waits between
calls; the same code then runs up to 2-3x slower than back to back (most likely, the caches
it used went cold), which is what a call in the server pays (server_cpu.py --stages).
``--pause-spin`` waits on the CPU instead of asleep, so the CPU never idles in between.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable

import grpc
import numpy as np
from bench_util import ServerProcess, median_us, pause

from q8kv import wire
from q8kv.server.app import build_engine
from q8kv.server.backends.base import AttendItem, PackedItems
from q8kv.server.config import load_config
from q8kv.server.rpc.messages import (
    attend_batch_response,
    attend_response,
    decode_batch,
    decode_items,
)
from q8kv.server.rpc.servicer import KVCacheService
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc as pb_grpc

H, KVH, D = 32, 8, 128


class _Context:
    def time_remaining(self) -> float:
        return 30.0


# Seconds each timed call is preceded by (--pause-us), asleep or spinning (--pause-spin): a
# server waits for its next call, and the same code then runs slower than in a tight loop.
PAUSE = 0.0
SPIN = False


def _median_us(fn, iters: int) -> float:
    return median_us(fn, iters, PAUSE, SPIN)


async def _median_us_async(fn, iters: int, after: Callable[[], object] | None = None) -> float:
    """``after`` runs untimed after each call."""
    times = []
    for _ in range(iters):
        pause(PAUSE, SPIN)
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
        if after is not None:
            after()
    return statistics.median(times) * 1e6


async def run(args: argparse.Namespace) -> dict[str, float]:
    engine = build_engine(load_config(["--backend", args.backend, "--memory-budget", "256MiB"]))
    engine.start()
    service = KVCacheService(engine)
    geometry = pb.Geometry(
        num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=args.length + 8
    )
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
    item = AttendItem(
        session.layout,
        session.softmax_scale,
        session.layers[0].page_table(),
        args.length,
        decoded[0].q,
        decoded[0].k,
        decoded[0].v,
        out_dtype=decoded[0].q.dtype,  # the service answers in q's (the wire's) dtype
    )
    out = backend.append_and_attend([item])[0]  # what the handler encodes

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
        "backend append+attend": _median_us(lambda: backend.append_and_attend([item]), args.iters),
        "encode output": _median_us(
            lambda: b"".join(attend_response(decoded, [(out, args.length + 1)])), args.iters
        ),
        "handler, inline": await _median_us_async(handler, args.iters),
        "engine via worker": await _median_us_async(worker_path, args.iters),
    }
    if args.batch:
        figures.update(await packed(args, service, engine, rng))
    engine.stop()
    backend.close()
    return figures


async def packed(args, service: KVCacheService, engine, rng) -> dict[str, float]:
    """The AttendBatch path at --batch sessions of --length tokens each."""
    b = args.batch
    geometry = pb.Geometry(
        num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=args.length + 8
    )

    def tensor(*shape: int) -> pb.Tensor:
        return wire.encode(rng.standard_normal(shape), args.dtype)

    ids = []
    for _ in range(b):
        created = await service.CreateSession(
            pb.CreateSessionRequest(geometry=geometry), _Context()
        )
        sid = created.session.session_id
        item = pb.AttendItem(
            session_id=sid,
            layer=0,
            q=tensor(args.length, H, D),
            k=tensor(args.length, KVH, D),
            v=tensor(args.length, KVH, D),
        )
        await service.AppendAndAttend(pb.AppendAndAttendRequest(items=[item]), _Context())
        ids.append(sid)
    request = pb.AttendBatchRequest(
        session_ids=ids,
        layer=0,
        q=tensor(b, 1, H, D),
        k=tensor(b, 1, KVH, D),
        v=tensor(b, 1, KVH, D),
    )
    store, backend = engine.store, engine.backend
    sessions = [store.get(sid) for sid in ids]

    def rewind() -> None:  # keep every cache at --length tokens
        for session in sessions:
            store.truncate(session, args.length)

    batch = decode_batch(request)
    items = [
        AttendItem(
            s.layout,
            s.softmax_scale,
            s.layers[0].page_table(),
            args.length,
            batch.q[i],
            batch.k[i],
            batch.v[i],
            out_dtype=batch.q.dtype,
        )
        for i, s in enumerate(sessions)
    ]
    whole = PackedItems(
        sessions[0].layout,
        np.array([s.softmax_scale for s in sessions]),
        [item.page_ids for item in items],
        np.full(b, args.length, np.int64),
        batch.q,
        batch.k,
        batch.v,
        out_dtype=batch.q.dtype,
    )
    out = backend.attend_packed(whole)  # what the handler encodes: the wire's dtype
    iters = max(20, args.iters // 10)
    # The backend rewrites the same slots each time: the caches stay at --length tokens.
    figures = {
        "decode_batch": _median_us(lambda: decode_batch(request), iters),
        "backend, per item": _median_us(lambda: backend.append_and_attend(items), iters),
        "backend attend_packed": _median_us(lambda: backend.attend_packed(whole), iters),
        "engine attend_batch": await _median_us_async(
            lambda: engine.attend_batch(batch), iters, rewind
        ),
        "encode output": _median_us(
            lambda: b"".join(attend_batch_response(out, list(range(b)))), iters
        ),
        "encode output as a message": _median_us(lambda: message_bytes(out, b), iters),
        "handler": await _median_us_async(
            lambda: service.AttendBatch(request, _Context()), iters, rewind
        ),
    }
    # The engine's own part: the same job with a backend that answers at once.
    backend.attend_packed = lambda packed: out
    figures["engine, backend answering at once"] = await _median_us_async(
        lambda: engine.attend_batch(batch), iters, rewind
    )
    del backend.attend_packed
    return {f"packed B={b}: {name}": us for name, us in figures.items()}


def message_bytes(out: np.ndarray, b: int) -> bytes:
    """The answer built as a protobuf message and serialized (how the service answered
    before it serialized its answers itself): the baseline of "encode output"."""
    response = pb.AttendBatchResponse(lengths=list(range(b)))
    wire.fill(response.output, out)
    return response.SerializeToString()


FRONT_CONFIGS = {  # name: (metrics on, auth on)
    "bare": (False, False),
    "metrics": (True, False),
    "auth": (False, True),
    "metrics+auth": (True, True),
}
TOKEN = "bench-token-0123456789"


def front_server(args, metrics: bool, auth: bool, tokens_file: str) -> ServerProcess:
    flags = ["--backend", args.backend, "--memory-budget", "256MiB", "--log-level", "WARNING"]
    if not metrics:
        flags += ["--metrics-port", "-1"]
    if auth:
        flags += ["--auth-tokens-file", tokens_file]
    return ServerProcess(flags, name="q8kv-front", metrics=metrics)


def front_step(server: ServerProcess, args, auth: bool, rng):
    """A session of --length tokens on ``server``; (step, rewind) calls of a decode step."""
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.KVCacheServiceStub(channel)
    metadata = (("authorization", f"Bearer {TOKEN}"),) if auth else ()
    geometry = pb.Geometry(
        num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=args.length + 8
    )
    sid = stub.CreateSession(
        pb.CreateSessionRequest(geometry=geometry), metadata=metadata
    ).session.session_id
    metadata = (*metadata, ("x-session-id", sid))

    def item(n: int) -> pb.AppendAndAttendRequest:
        def tensor(heads: int) -> pb.Tensor:
            return wire.encode(rng.standard_normal((n, heads, D)), args.dtype)

        one = pb.AttendItem(session_id=sid, layer=0, q=tensor(H), k=tensor(KVH), v=tensor(KVH))
        return pb.AppendAndAttendRequest(items=[one])

    stub.AppendAndAttend(item(args.length), metadata=metadata)
    step, truncate = item(1), pb.TruncateSessionRequest(session_id=sid, length=args.length)
    return (
        lambda: stub.AppendAndAttend(step, metadata=metadata),
        lambda: stub.TruncateSession(truncate, metadata=metadata),
        channel,
    )


def front(args: argparse.Namespace) -> dict[str, float]:
    """p50 of a decode step through each front-door configuration (see the docstring)."""
    rng = np.random.default_rng(1)
    samples: dict[str, list[float]] = {name: [] for name in FRONT_CONFIGS}
    with tempfile.NamedTemporaryFile("w", suffix=".tokens") as tokens:
        tokens.write(f"{TOKEN} bench\n")
        tokens.flush()
        servers = {
            name: front_server(args, *config, tokens.name) for name, config in FRONT_CONFIGS.items()
        }
        try:
            steps = {
                name: front_step(servers[name], args, FRONT_CONFIGS[name][1], rng)
                for name in FRONT_CONFIGS
            }
            for _ in range(args.front_rounds):
                for name, (step, rewind, _) in steps.items():
                    for _ in range(args.front_iters):
                        started = time.perf_counter()
                        step()
                        samples[name].append(time.perf_counter() - started)
                        rewind()
            for _, _, channel in steps.values():
                channel.close()
        finally:
            for server in servers.values():
                server.stop()
    return {
        f"front {name}: decode step p50": statistics.median(times) * 1e6
        for name, times in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="numpy")
    parser.add_argument("--length", type=int, default=16, help="cache tokens")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64, help="packed path sessions (0: skip)")
    parser.add_argument(
        "--front",
        action="store_true",
        help="also time a call through servers with metrics/auth off and on",
    )
    parser.add_argument("--front-rounds", type=int, default=5)
    parser.add_argument("--front-iters", type=int, default=300, help="calls per round")
    parser.add_argument(
        "--pause-us",
        type=float,
        default=0.0,
        help="sleep this long before each timed call, untimed (a server's wait between calls)",
    )
    parser.add_argument(
        "--pause-spin", action="store_true", help="--pause-us busy on the CPU, not asleep"
    )
    args = parser.parse_args()
    global PAUSE, SPIN
    PAUSE, SPIN = args.pause_us / 1e6, args.pause_spin
    figures = asyncio.run(run(args))
    if args.front:
        figures.update(front(args))
    width = max(len(name) for name in figures)
    for name, us in figures.items():
        per_item = f"  ({us / args.batch:7.1f} us per item)" if name.startswith("packed") else ""
        print(f"{name:{width}s} {us:9.1f} us{per_item}")
    if args.front:
        bare = figures["front bare: decode step p50"]
        for name in list(FRONT_CONFIGS)[1:]:
            extra = figures[f"front {name}: decode step p50"] - bare
            print(f"front door {name} costs {extra:+.1f} us per call over bare")


if __name__ == "__main__":
    main()
