"""The packed batch path (AttendBatch) against a bare gRPC echo of the same bytes, and against
64 single-item orchestrators, in one run (issue 12, "Benchmark").

Geometry: H=32, KVH=8, D=128, one layer, float16 on the wire, n=1 (a decode step). One run:

1. a q8kv-server subprocess (``--backend``) and a bare grpc.aio echo subprocess (generic
   handler, identity serializers: bytes in, a pre-built payload of q8kv's response size out);
2. ``S = max(--batches, --orchestrators)`` sessions, each holding a ``--length``-token cache.
   The caches are written with ImportSession (random Q8 codes and scales, one stream per
   session) instead of a prefill: a 1,024-token prefill computes causal attention over the
   whole prompt, minutes for 256 sessions on a CPU, and attention over the cache does not
   care how the codes got there;
3. for each B in ``--batches``: the S sessions are split into S/B groups of B and calls go
   round the groups, so the caches grow by one token per S/B calls while a phase runs (at
   most ``--max-growth`` tokens: a phase stops early there), and every phase ends with a
   truncation back to ``--length``. With fewer groups than calls in flight (B=256 of 256
   sessions) concurrent calls carry the same sessions: the server applies them in order.
   Per B:
   - latency: p50/p99 of one AttendBatch call, one at a time, then of the echo of the same
     request bytes answered with the same response size;
   - throughput: items/s (B x calls/s) with each of ``--in-flight`` calls kept in flight
     (grpc.aio, that many tasks, ``--seconds`` each), q8kv then echo, and their ratio;
     the device-time share: the server's q8kv_kernel_device_seconds_sum (every kernel
     label) delta over the run's wall time (numpy backend: the ops' wall time);
4. baseline: ``--orchestrators`` tasks each doing one AppendAndAttend of one session-layer
   decode step at a time (unary, then each on its own AppendAndAttendStream), for the
   "packed at B=64 vs 64 single-item orchestrators" ratio;
5. single-item decode p50 at a ``--short-length``-token cache against the echo of its bytes
   (truncated back after each step, untimed): the CPU target is within 1.5x. The calls run
   in ``--single-rounds`` rounds, each of q8kv calls then as many echoes, so both see the
   same drift of a shared host's speed; ``--single-only`` runs just this part.

The servers run as subprocesses and the client here, in one asyncio loop: on a small machine
the three share the cores, as the issue's measurements did. The client calls q8kv's decode
RPCs as it calls the echo, with raw bytes both ways (each request serialized once, before the
clock; an answer parsed and checked only when its size is new): the two clients do the same
work per call, so a ratio compares the servers (the stream baseline of step 4 still builds
messages). A client that built and parsed messages spent ~200 us more CPU per B = 64 call
on the H200 host (``server_cpu.py --backend cupy --batch 64``'s client_cpu_us, docs/design.md).
``--profile FILE`` records the
server with py-spy (raw collapsed stacks) during the in-flight run at ``--profile-at``
(B=64, 2 in flight), and prints the functions with the most samples of their own
(``--profile-idle``: idle samples too, per thread). ``--canned-backend`` (numpy backend
only) answers every call with zeros at once (benchmarks/server_hooks/canned_backend.py):
what is left is the front end, the engine's bookkeeping and the transport.
``--idle-spinners`` keeps every CPU busy with a SCHED_IDLE loop while the run lasts
(bench_util.idle_spinners): a host whose idle CPUs never halt, for comparison.

    .venv/bin/python benchmarks/batch_path.py [--backend numpy] [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import hashlib
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from bench_util import (
    CHANNEL_OPTIONS,
    EchoProcess,
    ServerProcess,
    card_slug,
    idle_spinners,
    machine,
    q8kv_method,
    server_hooks,
    write_json,
)

from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc as pb_grpc

H, KVH, D = 32, 8, 128
DTYPE = np.dtype("float16")
FORMAT_VERSION = 1  # SessionHeader.format_version
CHUNK_CODE_BYTES = 4 * 1024 * 1024  # ImportSession: codes per token chunk at most
TIMEOUT = 120.0
DEVICE_SECONDS = "q8kv_kernel_device_seconds_sum"


# --- requests -------------------------------------------------------------------------------


def session_ids(count: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(count)]


def import_stream(sid: str, length: int, max_len: int, rng) -> list[pb.SessionChunk]:
    """One session as an ImportSession stream: header, random Q8 tokens, checksum."""
    header = pb.SessionHeader(
        format_version=FORMAT_VERSION,
        session_id=sid,
        geometry=pb.Geometry(
            num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=max_len
        ),
        softmax_scale=1.0 / math.sqrt(D),
        layer_lengths=[length],
    )
    chunks = [pb.SessionChunk(header=header)]
    step = CHUNK_CODE_BYTES // (2 * KVH * D)
    for start in range(0, length, step):
        count = min(step, length - start)
        codes = rng.integers(-127, 128, size=(2, KVH, count, D), dtype=np.int8)
        # Scales near max|x|/127 of unit-variance values: dequantized values of order 1.
        scales = rng.uniform(0.005, 0.03, size=(2, KVH, count, D // 32)).astype("<f4")
        tokens = pb.TokenChunk(
            layer=0, start=start, count=count, codes=codes.tobytes(), scales=scales.tobytes()
        )
        chunks.append(pb.SessionChunk(tokens=tokens))
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.SerializeToString(deterministic=True))
    chunks.append(pb.SessionChunk(trailer=pb.SessionTrailer(sha256=digest.digest())))
    return chunks


def random_tensor(rng, *shape: int) -> pb.Tensor:
    return wire.encode(rng.standard_normal(shape).astype(DTYPE))


def batch_request(ids: list[str], rng) -> pb.AttendBatchRequest:
    b = len(ids)
    return pb.AttendBatchRequest(
        session_ids=ids,
        layer=0,
        q=random_tensor(rng, b, 1, H, D),
        k=random_tensor(rng, b, 1, KVH, D),
        v=random_tensor(rng, b, 1, KVH, D),
    )


def batch_response_bytes(b: int, length: int) -> int:
    """Size of q8kv's AttendBatchResponse for B sessions (lengths as after one step)."""
    out = wire.encode(np.ones((b, 1, H, D), DTYPE))
    return pb.AttendBatchResponse(output=out, lengths=[length + 1] * b).ByteSize()


def item_request(sid: str, rng) -> pb.AppendAndAttendRequest:
    item = pb.AttendItem(
        session_id=sid,
        layer=0,
        q=random_tensor(rng, 1, H, D),
        k=random_tensor(rng, 1, KVH, D),
        v=random_tensor(rng, 1, KVH, D),
    )
    return pb.AppendAndAttendRequest(items=[item])


def batch_check(b: int) -> Callable[[pb.AttendBatchResponse], None]:
    """The check of one AttendBatch answer for b sessions: b lengths, output [b, 1, H, D]."""

    def check(reply: pb.AttendBatchResponse) -> None:
        if len(reply.lengths) != b or list(reply.output.shape) != [b, 1, H, D]:
            raise SystemExit(f"B={b}: unexpected reply shape {list(reply.output.shape)}")

    return check


def check_single(reply: pb.AppendAndAttendResponse) -> None:
    """One decode step's answer: one result of [1, H, D]."""
    shapes = [list(r.output.shape) for r in reply.results]
    if shapes != [[1, H, D]]:
        raise SystemExit(f"single item: unexpected reply shapes {shapes}")


def item_response_bytes(length: int) -> int:
    result = pb.AttendResult(output=wire.encode(np.ones((1, H, D), DTYPE)), length=length + 1)
    return pb.AppendAndAttendResponse(results=[result]).ByteSize()


# --- measurement ----------------------------------------------------------------------------


def stats_us(seconds: list[float]) -> dict[str, float]:
    us = np.asarray(seconds) * 1e6
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "samples": len(us),
    }


async def sequential(
    call: Callable[[int], Awaitable],
    count: int,
    seconds: float,
    after: Callable[[], Awaitable] | None = None,
) -> list[float]:
    """Seconds of ``call(i)``, one at a time: ``count`` calls, or fewer when ``seconds`` run
    out (at least 5); ``after`` runs untimed after each. The collector is paused."""
    times: list[float] = []
    deadline = time.monotonic() + seconds
    gc.collect()
    gc.disable()
    try:
        for i in range(count):
            started = time.perf_counter()
            await call(i)
            times.append(time.perf_counter() - started)
            if after is not None:
                await after()
            if len(times) >= 5 and time.monotonic() > deadline:
                break
    finally:
        gc.enable()
    return times


@dataclass
class Flight:
    """One in-flight run: how many calls, how long, each call's latency."""

    calls: int = 0
    wall_s: float = 0.0
    latencies: list[float] = field(default_factory=list)


async def in_flight(
    call: Callable[[int], Awaitable], tasks: int, seconds: float, max_calls: int
) -> Flight:
    """``tasks`` loops each keeping one ``call(i)`` in flight until ``seconds`` pass or
    ``max_calls`` were started; wall time until the last call finished."""
    flight = Flight()
    counter = iter(range(max_calls))
    deadline = time.monotonic() + seconds

    async def loop() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            flight.latencies.append(time.perf_counter() - started)
            flight.calls += 1
            if time.monotonic() > deadline:
                return

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(tasks)))
    flight.wall_s = time.perf_counter() - started
    return flight


def flight_figures(flight: Flight, items_per_call: int) -> dict[str, float]:
    return {
        "calls": flight.calls,
        "wall_s": flight.wall_s,
        "items_per_s": flight.calls * items_per_call / flight.wall_s,
        "p50_us": float(np.percentile(flight.latencies, 50) * 1e6),
        "p99_us": float(np.percentile(flight.latencies, 99) * 1e6),
    }


# --- the run --------------------------------------------------------------------------------


class Bench:
    """The two servers, the channels and the sessions one run shares."""

    def __init__(
        self, args: argparse.Namespace, server: ServerProcess, echo: EchoProcess, ids: list[str]
    ) -> None:
        self.args = args
        self.server = server
        self.echo = echo
        self.ids = ids
        self.rng = np.random.default_rng(12)
        self.channel = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVCacheServiceStub(self.channel)
        self.echo_channel = grpc.aio.insecure_channel(echo.address, options=CHANNEL_OPTIONS)
        self.profile: dict | None = None

    def raw_call(
        self, method: str, response: type, check: Callable[[object], None], metadata=None
    ) -> Callable[[bytes], Awaitable[None]]:
        """q8kv's ``method`` with raw bytes both ways, as the echo is called: ``once(payload)``
        sends the serialized request; an answer whose size differs from the first answer's
        is parsed and passed to ``check`` (which raises on a wrong one), as the first is."""
        call = self.channel.unary_unary(q8kv_method(method))
        known: set[int] = set()

        async def once(payload: bytes) -> None:
            reply = await call(payload, timeout=TIMEOUT, metadata=metadata)
            if len(reply) not in known:
                check(response.FromString(reply))
                known.add(len(reply))

        return once

    def echo_call(self, name: str, payload: bytes) -> Callable[[int], Awaitable]:
        call = self.echo_channel.unary_unary(self.echo.path(name))  # raw bytes both ways

        async def once(_: int) -> None:
            await call(payload, timeout=TIMEOUT)

        return once

    async def close(self) -> None:
        await self.channel.close()
        await self.echo_channel.close()

    # -- sessions --

    async def import_sessions(self) -> None:
        length, max_len = self.args.length, self.args.length + self.args.max_growth + 64

        async def one(sid: str, seed: int) -> None:
            chunks = import_stream(sid, length, max_len, np.random.default_rng(seed))
            reply = await self.stub.ImportSession(iter(chunks), timeout=TIMEOUT)
            assert list(reply.session.layer_lengths) == [length], reply.session

        wave = 8  # a few streams at a time: bounded memory
        for first in range(0, len(self.ids), wave):
            await asyncio.gather(
                *(one(sid, first + i) for i, sid in enumerate(self.ids[first : first + wave]))
            )

    async def truncate_all(self, ids: list[str] | None = None) -> None:
        """Every session back to --length tokens (after each phase; never timed)."""
        ids = self.ids if ids is None else ids
        for first in range(0, len(ids), 64):
            await asyncio.gather(
                *(
                    self.stub.TruncateSession(
                        pb.TruncateSessionRequest(session_id=sid, length=self.args.length),
                        timeout=TIMEOUT,
                    )
                    for sid in ids[first : first + 64]
                )
            )

    # -- the packed path --

    async def packed(self, b: int) -> dict:
        groups = len(self.ids) // b
        requests = [batch_request(self.ids[g * b : (g + 1) * b], self.rng) for g in range(groups)]
        name = f"B{b}"
        request_bytes = requests[0].ByteSize()
        payloads = [r.SerializeToString() for r in requests]
        max_calls = self.args.max_growth * groups  # each session grows by <= --max-growth

        attend = self.raw_call("AttendBatch", pb.AttendBatchResponse, batch_check(b))

        async def q8kv(i: int) -> None:
            await attend(payloads[i % groups])

        echo = self.echo_call(name, payloads[0])
        row: dict = {
            "B": b,
            "groups": groups,
            "request_bytes": request_bytes,
            "response_bytes": self.echo.responses[name],
        }
        await q8kv(0)  # warm-up (first call of a size: allocations, kernel compiles)
        await echo(0)
        await self.truncate_all()
        count = min(self.args.iters, max_calls)
        svc = await sequential(q8kv, count, self.args.latency_seconds)
        await self.truncate_all()
        echo_times = await sequential(echo, len(svc), self.args.latency_seconds * 4)
        row["latency"] = {"q8kv": stats_us(svc), "echo": stats_us(echo_times)}
        row["latency"]["ratio_p50"] = (
            row["latency"]["q8kv"]["p50_us"] / row["latency"]["echo"]["p50_us"]
        )
        row["in_flight"] = []
        for tasks in self.args.in_flight:
            row["in_flight"].append(await self.packed_flight(b, tasks, q8kv, echo, max_calls))
        return row

    async def packed_flight(self, b: int, tasks: int, q8kv, echo, max_calls: int) -> dict:
        device_before = self.server.metric(DEVICE_SECONDS)
        profiler = self.start_profile() if (b, tasks) == self.args.profile_at else None
        flight = await in_flight(q8kv, tasks, self.args.seconds, max_calls)
        if profiler is not None:
            self.profile = self.finish_profile(profiler)
        device = self.server.metric(DEVICE_SECONDS) - device_before
        growth = math.ceil(flight.calls / (len(self.ids) // b))
        await self.truncate_all()
        echo_flight = await in_flight(echo, tasks, self.args.seconds, 10**9)
        q8kv_figures, echo_figures = flight_figures(flight, b), flight_figures(echo_flight, b)
        return {
            "in_flight": tasks,
            "q8kv": q8kv_figures,
            "echo": echo_figures,
            "ratio_items_per_s": q8kv_figures["items_per_s"] / echo_figures["items_per_s"],
            "device_seconds": device,
            "device_share": device / flight.wall_s,
            "cache_growth_tokens": growth,
        }

    # -- single-item baselines --

    async def orchestrators(self, streaming: bool) -> dict:
        """--orchestrators tasks, one session each, one decode item per call."""
        ids = self.ids[: self.args.orchestrators]
        requests = [item_request(sid, self.rng) for sid in ids]
        payloads = [r.SerializeToString() for r in requests]
        attends = [
            self.raw_call(
                "AppendAndAttend",
                pb.AppendAndAttendResponse,
                check_single,
                (("x-session-id", sid),),
            )
            for sid in ids
        ]
        calls = [0] * len(ids)
        deadline = 0.0

        async def unary(o: int) -> None:
            while time.monotonic() < deadline and calls[o] < self.args.max_growth:
                await attends[o](payloads[o])
                calls[o] += 1

        async def stream(o: int) -> None:
            call = self.stub.AppendAndAttendStream(timeout=TIMEOUT)
            message = pb.AppendAndAttendStreamRequest(items=requests[o].items)
            while time.monotonic() < deadline and calls[o] < self.args.max_growth:
                message.request_id = calls[o]
                await call.write(message)
                reply = await call.read()
                if reply.error_code:
                    raise SystemExit(f"stream: {reply.error_code} {reply.error_message}")
                calls[o] += 1
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise SystemExit("stream: an answer nobody asked for")

        one = stream if streaming else unary
        deadline = time.monotonic() + 0.3  # warm-up: channels, streams, the first pages
        await asyncio.gather(*(one(o) for o in range(len(ids))))
        await self.truncate_all(ids)
        calls[:] = [0] * len(ids)
        device_before = self.server.metric(DEVICE_SECONDS)
        started = time.perf_counter()
        deadline = time.monotonic() + self.args.seconds
        await asyncio.gather(*(one(o) for o in range(len(ids))))
        wall = time.perf_counter() - started
        device = self.server.metric(DEVICE_SECONDS) - device_before
        await self.truncate_all(ids)
        return {
            "rpc": "stream" if streaming else "unary",
            "orchestrators": len(ids),
            "calls": sum(calls),
            "wall_s": wall,
            "items_per_s": sum(calls) / wall,
            "device_share": device / wall,
        }

    async def single_short(self) -> dict:
        """One decode step at a --short-length cache, one at a time, vs the echo."""
        short = self.args.short_length
        geometry = pb.Geometry(
            num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=short + 64
        )
        created = await self.stub.CreateSession(
            pb.CreateSessionRequest(session_id="bench-short", geometry=geometry), timeout=TIMEOUT
        )
        sid = created.session.session_id
        metadata = (("x-session-id", sid),)
        prefill = pb.AppendAndAttendRequest(
            items=[
                pb.AttendItem(
                    session_id=sid,
                    layer=0,
                    q=random_tensor(self.rng, short, H, D),
                    k=random_tensor(self.rng, short, KVH, D),
                    v=random_tensor(self.rng, short, KVH, D),
                )
            ]
        )
        await self.stub.AppendAndAttend(prefill, timeout=TIMEOUT, metadata=metadata)
        request = item_request(sid, self.rng)
        payload = request.SerializeToString()
        attend = self.raw_call(
            "AppendAndAttend", pb.AppendAndAttendResponse, check_single, metadata
        )
        truncate = pb.TruncateSessionRequest(session_id=sid, length=short)

        async def step(_: int) -> None:
            await attend(payload)

        async def rewind() -> None:
            await self.stub.TruncateSession(truncate, timeout=TIMEOUT, metadata=metadata)

        echo = self.echo_call("single", payload)
        for _ in range(50):  # warm-up
            await step(0)
            await rewind()
            await echo(0)
        # Rounds of q8kv then echo calls: a shared host's speed drifts (2x on the 2-CPU VM
        # between minutes), and both sides of the ratio must see the same drift.
        rounds = self.args.single_rounds
        seconds = self.args.latency_seconds / rounds
        svc: list[float] = []
        echo_times: list[float] = []
        ratios = []
        for r in range(rounds):
            count = self.args.single_iters * (r + 1) // rounds - len(svc)
            ours = await sequential(step, count, seconds, after=rewind)
            theirs = await sequential(echo, len(ours), seconds * 4)
            svc += ours
            echo_times += theirs
            ratios.append(float(np.median(ours) / np.median(theirs)))
        await self.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=TIMEOUT)
        q8kv_stats, echo_stats = stats_us(svc), stats_us(echo_times)
        return {
            "cache_tokens": short,
            "request_bytes": request.ByteSize(),
            "response_bytes": self.echo.responses["single"],
            "rounds": rounds,
            "q8kv": q8kv_stats,
            "echo": echo_stats,
            "ratio_p50": q8kv_stats["p50_us"] / echo_stats["p50_us"],
            "ratio_p50_by_round": ratios,
        }

    # -- profile --

    def start_profile(self) -> subprocess.Popen | None:
        if not self.args.profile:
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [
            spy,
            "record",
            "--pid",
            str(self.server.proc.pid),
            "--rate",
            "200",
            "--duration",
            str(max(1, int(self.args.seconds))),
            "--format",
            "raw",
            "--output",
            self.args.profile,
            "--nonblocking",
            *(["--idle", "--threads"] if self.args.profile_idle else []),
        ]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def finish_profile(self, profiler: subprocess.Popen) -> dict:
        _, err = profiler.communicate(timeout=60)
        if profiler.returncode != 0:
            print(f"py-spy failed ({profiler.returncode}): {err.decode()[-500:]}", file=sys.stderr)
            return {}
        return profile_summary(Path(self.args.profile))


# A frame of q8kv's own code below the entry point (app.py's main only runs the loop).
OURS = re.compile(r"\((?!server/app\.py|server/__main__\.py)(server|q8kv|client)/")
NONE_OURS = "(none: event loop, gRPC, idle threads)"


def read_stacks(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one ``frame;frame;... count`` line per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if stack:
            stacks.append((stack.split(";"), int(samples)))
    return stacks


def profile_summary(path: Path, count: int = 20) -> dict[str, list[tuple[str, float]]]:
    """Shares of samples: by the innermost frame (the line itself), and by the innermost
    frame of q8kv's own code (numpy called by the backend counts as the backend; stacks
    with none are gRPC, asyncio and threads waiting)."""
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    for frames, samples in read_stacks(path):
        own[frames[-1]] += samples
        mine = [f for f in frames if OURS.search(f)]
        ours[re.sub(r":\d+\)$", ")", mine[-1]) if mine else NONE_OURS] += samples
    total = sum(own.values()) or 1
    return {
        "self": [(frame, n / total) for frame, n in own.most_common(count)],
        "q8kv_function": [(frame, n / total) for frame, n in ours.most_common(count)],
        "samples": total,
    }


async def measure(
    args: argparse.Namespace, server: ServerProcess, echo: EchoProcess, ids: list[str]
) -> dict:
    bench = Bench(args, server, echo, ids)
    if args.single_only:
        try:
            started = time.monotonic()
            single = await bench.single_short()
        finally:
            await bench.close()
        phases = {"baseline_s": time.monotonic() - started}
        return {"packed": [], "orchestrators": [], "single_item": single, "phases_s": phases}
    try:
        started = time.monotonic()
        await bench.import_sessions()
        phases = {"import_s": time.monotonic() - started}
        rows = []
        for b in args.batches:
            started = time.monotonic()
            rows.append(await bench.packed(b))
            phases[f"B{b}_s"] = time.monotonic() - started
            print(f"B={b} done in {phases[f'B{b}_s']:.1f} s", file=sys.stderr, flush=True)
        started = time.monotonic()
        baseline = [await bench.orchestrators(streaming=False)]
        if not args.no_stream:
            baseline.append(await bench.orchestrators(streaming=True))
        single = await bench.single_short()
        phases["baseline_s"] = time.monotonic() - started
    finally:
        await bench.close()
    return {
        "packed": rows,
        "orchestrators": baseline,
        "single_item": single,
        "phases_s": phases,
        "profile": bench.profile,
    }


def comparisons(result: dict, args: argparse.Namespace) -> dict:
    """The issue's target ratios, from what this run measured."""
    out: dict = {}
    single = result["single_item"]
    out["single_item_p50_vs_echo"] = single["ratio_p50"]
    if args.single_only:
        return out
    unary = next(r for r in result["orchestrators"] if r["rpc"] == "unary")
    for row in result["packed"]:
        if row["B"] != args.orchestrators:
            continue
        for run in row["in_flight"]:
            key = f"packed_B{row['B']}_x{run['in_flight']}_vs_{args.orchestrators}_orchestrators"
            out[key] = run["q8kv"]["items_per_s"] / unary["items_per_s"]
    return out


# --- output ---------------------------------------------------------------------------------


def table(result: dict) -> str:
    if not result["packed"]:  # --single-only
        return single_line(result["single_item"])
    lines = [
        "one packed AttendBatch call, one at a time (us); ratio = q8kv / echo",
        f"{'B':>4} {'req KiB':>8} {'resp KiB':>8} | {'q8kv p50':>9} {'q8kv p99':>9} | "
        f"{'echo p50':>9} {'echo p99':>9} | {'ratio':>5}",
    ]
    for row in result["packed"]:
        lat = row["latency"]
        lines.append(
            f"{row['B']:>4} {row['request_bytes'] / 1024:8.1f} {row['response_bytes'] / 1024:8.1f}"
            f" | {lat['q8kv']['p50_us']:9.0f} {lat['q8kv']['p99_us']:9.0f} | "
            f"{lat['echo']['p50_us']:9.0f} {lat['echo']['p99_us']:9.0f} | {lat['ratio_p50']:5.2f}"
        )
    lines += [
        "",
        "items/s (B x calls/s) with calls in flight; device = kernel seconds / wall",
        f"{'B':>4} {'flight':>6} | {'q8kv':>9} {'echo':>9} {'ratio':>5} | "
        f"{'q8kv p50 us':>11} {'echo p50 us':>11} | {'device':>6} {'growth':>6}",
    ]
    for row in result["packed"]:
        for run in row["in_flight"]:
            lines.append(
                f"{row['B']:>4} {run['in_flight']:>6} | {run['q8kv']['items_per_s']:9.0f} "
                f"{run['echo']['items_per_s']:9.0f} {run['ratio_items_per_s']:5.2f} | "
                f"{run['q8kv']['p50_us']:11.0f} {run['echo']['p50_us']:11.0f} | "
                f"{run['device_share']:6.1%} {run['cache_growth_tokens']:>6}"
            )
    lines.append("")
    for base in result["orchestrators"]:
        lines.append(
            f"{base['orchestrators']} single-item orchestrators, {base['rpc']:>6}: "
            f"{base['items_per_s']:8.0f} items/s (device {base['device_share']:.1%})"
        )
    lines.append(single_line(result["single_item"]))
    for key, value in result["comparisons"].items():
        if key.startswith("packed_"):
            lines.append(f"{key}: {value:.2f}x items/s")
    profile = result.get("profile")
    if profile:
        lines += [
            "",
            f"server profile ({profile['samples']} py-spy samples at B,in-flight "
            f"{result['settings']['profile_at']}), share of samples:",
            "  by the frame itself:",
        ]
        lines += [f"    {share:6.1%}  {frame}" for frame, share in profile["self"][:12]]
        lines += ["  by the innermost q8kv function:"]
        lines += [f"    {share:6.1%}  {name}" for name, share in profile["q8kv_function"][:12]]
    return "\n".join(lines)


def single_line(single: dict) -> str:
    by_round = ", ".join(f"{r:.2f}" for r in single["ratio_p50_by_round"])
    return (
        f"single item at a {single['cache_tokens']}-token cache: p50 "
        f"{single['q8kv']['p50_us']:.0f} us vs echo {single['echo']['p50_us']:.0f} us"
        f" = {single['ratio_p50']:.2f}x (target <= 1.5x; by round: {by_round})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="numpy", help="numpy | cupy | auto [numpy]")
    p.add_argument("--batches", default="1,8,64,256", help="sessions per call, comma-separated")
    p.add_argument("--in-flight", default="1,2,4", help="calls in flight, comma-separated")
    p.add_argument("--length", type=int, default=1024, help="cache tokens per session [1024]")
    p.add_argument("--seconds", type=float, default=2.5, help="each in-flight run [2.5]")
    p.add_argument(
        "--latency-seconds",
        type=float,
        default=2.0,
        help="time bound of each one-at-a-time latency sample [2]",
    )
    p.add_argument("--iters", type=int, default=300, help="latency calls per B at most [300]")
    p.add_argument(
        "--single-iters", type=int, default=1000, help="single-item latency calls at most [1000]"
    )
    p.add_argument("--short-length", type=int, default=16, help="single-item cache [16]")
    p.add_argument(
        "--single-rounds",
        type=int,
        default=5,
        help="single-item latency: rounds of q8kv calls, each followed by as many echoes [5]",
    )
    p.add_argument(
        "--single-only",
        action="store_true",
        help="only the single-item latency (seconds, not minutes); its JSON ends in -single",
    )
    p.add_argument("--orchestrators", type=int, default=64)
    p.add_argument("--no-stream", action="store_true", help="skip the streaming baseline")
    p.add_argument(
        "--max-growth",
        type=int,
        default=128,
        help="tokens a session may grow by in one phase [128]",
    )
    p.add_argument("--memory-budget", default="2GiB", help="the server's page pool [2GiB]")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra q8kv-server flag, repeatable: --server-arg=--batching=off",
    )
    p.add_argument("--profile", help="write a py-spy raw profile of the server here")
    p.add_argument(
        "--canned-backend",
        action="store_true",
        help="the server's numpy backend answers at once with zeros "
        "(benchmarks/server_hooks/canned_backend.py): "
        "the front end, the engine's bookkeeping and the transport alone",
    )
    p.add_argument(
        "--profile-idle",
        action="store_true",
        help="--profile keeps idle samples, per thread: where the server waits, not only works",
    )
    p.add_argument(
        "--profile-at", default="64,2", help="B,in-flight of the run --profile records [64,2]"
    )
    p.add_argument(
        "--idle-spinners",
        action="store_true",
        help="a SCHED_IDLE busy loop on every CPU during the run: idle CPUs never halt",
    )
    p.add_argument("--quick", action="store_true", help="B 1,8,64, 1 s runs, fewer latency calls")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("--tag", help="appended to the file name: batch_path-<card>-<tag>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.seconds, args.latency_seconds = "1,8,64", 1.0, 0.75
        args.iters, args.single_iters = 100, 300
    args.batches = [int(x) for x in args.batches.split(",")]
    args.in_flight = [int(x) for x in args.in_flight.split(",")]
    args.profile_at = tuple(int(x) for x in args.profile_at.split(","))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.canned_backend and args.backend != "numpy":
        raise SystemExit("--canned-backend replaces the numpy backend: use --backend numpy")
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    count = 0 if args.single_only else max(*args.batches, args.orchestrators)
    server_flags = [
        "--backend",
        args.backend,
        "--memory-budget",
        args.memory_budget,
        "--log-level",
        "WARNING",
        *args.server_arg,
    ]
    responses = {f"B{b}": batch_response_bytes(b, args.length) for b in args.batches}
    responses["single"] = item_response_bytes(args.short_length)
    started, load_before = time.monotonic(), os.getloadavg()
    with server_hooks(canned=args.canned_backend):
        server = ServerProcess(server_flags, name="q8kv-batch")
    with idle_spinners(args.idle_spinners), server, EchoProcess(responses) as echo:
        result = asyncio.run(measure(args, server, echo, session_ids(count)))
        info = server.build_info()
    backend, device = info.get("backend", args.backend), info.get("device", "unknown")
    result = {
        "benchmark": "batch_path",
        "command": command,
        "machine": {**machine(backend, device), "q8kv_version": info.get("version")},
        "geometry": {
            "num_heads": H,
            "num_kv_heads": KVH,
            "head_dim": D,
            "layers": 1,
            "n": 1,
            "wire_dtype": DTYPE.name,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "profile", "tag")},
        "server_flags": server_flags,
        # BLAS threads spinning on a small machine skew the numpy backend's figures.
        "thread_env": {
            name: os.environ.get(name)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "sessions": count,
        "cache": (
            f"{args.length} tokens per session written by ImportSession; a phase grows "
            f"each by at most --max-growth ({args.max_growth}) tokens, then truncates back"
        ),
        **result,
        "total_s": time.monotonic() - started,
        # Other work on the host skews every figure: the 1-minute load before and after.
        "loadavg_1m": [load_before[0], os.getloadavg()[0]],
    }
    result["comparisons"] = comparisons(result, args)
    parts = ["batch_path", card_slug(backend, device), args.tag]
    stem = "-".join(filter(None, [*parts, "single" if args.single_only else None]))
    write_json(args.out, f"{stem}.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
