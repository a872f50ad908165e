"""A whole prompt prefilled through the service over gRPC, against a bare echo of the same
bytes (issue 14, "through the service").

One rep: create a session (--layers layers, H/KVH/D, max_len = --tokens), then for each layer
one call of --tokens new tokens (q [n, H, D], k/v [n, KVH, D], random --dtype, different
for every layer, generated before the reps), through the project's sync client; the output
must come back as [n, H, D] in q's dtype. The prompt (all layers) and each layer are timed;
then the session is deleted (not timed). Per --rpc mode:

- ``append``: ``Session.append_and_attend`` (AppendAndAttend, one item). The client does
  not split this call: its request (n x (H + 2 KVH) x D x itemsize bytes, 96 MiB at the
  defaults) must fit --max-message-bytes.
- ``batch``: ``Client.attend_batch`` of the one session (AttendBatch, what ``q8kv.hf``
  sends); the client splits a call over --max-message-bytes by tokens, in order.

The server runs a call of more than --prefill-chunk-tokens new tokens in chunks of that
many (its default 512: 16 chunks for 8,192 tokens), other sessions' decode steps allowed
between chunks; nothing else runs here, so the chunks follow each other. The setting is
passed to the server and recorded in the JSON.

The echo baseline: the client's stub is wrapped to record every request message it sends
(after any splitting) and the size of every answer. An untimed warm-up rep records them;
the echo server (bench_util.EchoProcess: a bare grpc.aio server, raw bytes, its own
process) then receives exactly those serialized requests, the same calls per layer, and
answers each with a payload of the same size as q8kv's answer, timed the same way. q8kv and
echo reps alternate. Device time per rep is the delta of the server's
q8kv_kernel_device_seconds_sum (every kernel; on numpy the ops' wall time); the time
inside the stub call (serialize, transport, server, parse) is recorded too, so a rep splits
into device, the echo's transport floor, the client's own encode/decode (outside the
stub) and the rest (the server's host path and protobuf (de)serialization).

    .venv/bin/python benchmarks/prefill_service.py --backend numpy --tokens 512 --layers 2 \\
        --reps 2 --out /tmp/prefill
    python benchmarks/prefill_service.py --backend cupy --rpc append,batch --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_util import (
    CHANNEL_OPTIONS,
    MAX_MESSAGE,
    EchoProcess,
    ServerProcess,
    card_slug,
    machine,
    write_json,
)

from q8kv.client import Client
from q8kv.format import page_bytes, tokens_per_page
from q8kv.server.config import Config

DEVICE_SECONDS = "q8kv_kernel_device_seconds_sum"
WRAPPED = ("AppendAndAttend", "AttendBatch")
PAGE_CODE_BYTES = Config().page_bytes  # the server's default --page-bytes


@dataclass(slots=True)
class Recorded:
    """One RPC the client made: its request message (None unless kept), its answer's
    size and the time inside the stub call."""

    method: str
    request: Any
    response_bytes: int
    seconds: float


class RecordingStub:
    """The client's stub, with the attention calls wrapped to record each one (the client
    looks a method up on its stub when it builds a call, so replacing the stub suffices)."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: list[Recorded] = []
        # Only the warm-up keeps the messages (for the echo): a timed rep lets each go, as a
        # client would.
        self.keep_requests = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        if name not in WRAPPED:
            return method

        def call(request: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            response = method(request, **kwargs)
            seconds = time.perf_counter() - started
            kept = request if self.keep_requests else None
            self.calls.append(Recorded(name, kept, response.ByteSize(), seconds))
            return response

        return call


@dataclass
class Rep:
    """One timed prompt: the whole, each layer, and (q8kv only) device and stub time."""

    total_s: float
    layer_s: list[float]
    device_s: float | None = None
    stub_s: float | None = None
    calls_per_layer: list[int] = field(default_factory=list)


def make_prompt(args: argparse.Namespace) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """q, k, v of every layer, each layer from its own seed (threads: numpy's generators
    release the GIL, and 32 layers of 8,192 tokens are 1.6e9 values)."""
    dtype = np.dtype(args.dtype)

    def layer(seed: np.random.SeedSequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        heads = (args.heads, args.kv_heads, args.kv_heads)
        q, k, v = (
            rng.standard_normal((args.tokens, h, args.head_dim), dtype=np.float32).astype(dtype)
            for h in heads
        )
        return q, k, v

    seeds = np.random.SeedSequence(args.seed).spawn(args.layers)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(layer, seeds))


def send(client: Client, session: Any, rpc: str, layer: int, q, k, v) -> np.ndarray:
    if rpc == "append":
        return session.append_and_attend(layer, q, k, v)
    return client.attend_batch(layer, [session], q[None], k[None], v[None])[0]


def check_output(out: np.ndarray, q: np.ndarray, layer: int) -> None:
    """[n, H, D] in q's dtype, and finite where sampled (first and last token)."""
    if out.shape != q.shape or out.dtype != q.dtype:
        raise SystemExit(
            f"layer {layer}: expected output {list(q.shape)} {q.dtype}, got "
            f"{list(out.shape)} {out.dtype}"
        )
    if not (np.isfinite(out[0]).all() and np.isfinite(out[-1]).all()):
        raise SystemExit(f"layer {layer}: output not finite")


def q8kv_rep(
    client: Client, recorder: RecordingStub, server: ServerProcess, args, prompt, rpc: str
) -> Rep:
    recorder.calls.clear()
    session = client.create_session(
        args.layers, args.heads, args.kv_heads, args.head_dim, max_len=args.tokens
    )
    try:
        device_before = server.metric(DEVICE_SECONDS)
        layer_s, bounds = [], []
        gc.collect()
        gc.disable()
        try:
            started = time.perf_counter()
            for layer, (q, k, v) in enumerate(prompt):
                t0 = time.perf_counter()
                out = send(client, session, rpc, layer, q, k, v)
                layer_s.append(time.perf_counter() - t0)
                check_output(out, q, layer)
                bounds.append(len(recorder.calls))
            total = time.perf_counter() - started
        finally:
            gc.enable()
        device = server.metric(DEVICE_SECONDS) - device_before
        lengths = session.info().layer_lengths
        if lengths != [args.tokens] * args.layers:
            raise SystemExit(f"layer lengths: expected {args.tokens} each, got {lengths}")
    finally:
        session.delete()
    counts = [b - a for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    stub = sum(c.seconds for c in recorder.calls)
    return Rep(total, layer_s, device, stub, counts)


@dataclass
class EchoPlan:
    """The recorded calls of a rep, per layer, as (method path, request bytes, answer size)."""

    layers: list[list[tuple[str, bytes, int]]]

    @classmethod
    def from_rep(cls, rep: Rep, calls: list[Recorded]) -> EchoPlan:
        layers, start = [], 0
        for count in rep.calls_per_layer:
            layers.append(
                [
                    (f"resp{c.response_bytes}", c.request.SerializeToString(), c.response_bytes)
                    for c in calls[start : start + count]
                ]
            )
            start += count
        return cls(layers)

    def responses(self) -> dict[str, int]:
        return {name: size for layer in self.layers for name, _, size in layer}

    def request_bytes(self) -> list[int]:
        return [sum(len(p) for _, p, _ in layer) for layer in self.layers]

    def response_bytes(self) -> list[int]:
        return [sum(size for _, _, size in layer) for layer in self.layers]


def echo_rep(channel: grpc.Channel, echo: EchoProcess, plan: EchoPlan, timeout: float) -> Rep:
    calls = [
        [(channel.unary_unary(echo.path(name)), payload, size) for name, payload, size in layer]
        for layer in plan.layers
    ]
    layer_s = []
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        for layer in calls:
            t0 = time.perf_counter()
            for call, payload, size in layer:
                if len(call(payload, timeout=timeout)) != size:
                    raise SystemExit(f"echo: expected {size} bytes back")
            layer_s.append(time.perf_counter() - t0)
        total = time.perf_counter() - started
    finally:
        gc.enable()
    return Rep(total, layer_s, calls_per_layer=[len(layer) for layer in calls])


def summary(reps: list[Rep]) -> dict:
    totals = [r.total_s for r in reps]
    layers = [s for r in reps for s in r.layer_s]
    out = {
        "total_s": totals,
        "total_median_s": statistics.median(totals),
        "total_min_s": min(totals),
        "layer_p50_s": statistics.median(layers),
        "layer_min_s": min(layers),
        "layer_max_s": max(layers),
    }
    if reps[0].device_s is not None:
        out["device_s"] = [r.device_s for r in reps]
        out["stub_s"] = [r.stub_s for r in reps]
        # The client's own work outside the stub: encoding q/k/v, decoding the output.
        out["client_s"] = [r.total_s - r.stub_s for r in reps]
    return out


def measure_rpc(args, server: ServerProcess, prompt, rpc: str) -> dict:
    limit = args.max_message_bytes
    with Client(server.address, timeout=args.timeout, max_message_bytes=limit) as c:
        recorder = RecordingStub(c._stub)
        c._stub = recorder
        recorder.keep_requests = True
        warm = q8kv_rep(c, recorder, server, args, prompt, rpc)  # untimed; records the calls
        plan = EchoPlan.from_rep(warm, recorder.calls)
        recorder.keep_requests = False
        recorder.calls.clear()
        with (
            EchoProcess(plan.responses()) as echo,
            grpc.insecure_channel(echo.address, options=CHANNEL_OPTIONS) as channel,
        ):
            echo_rep(channel, echo, plan, args.timeout)  # warm-up
            q8kv_reps, echo_reps = [], []
            for _ in range(args.reps):  # alternate, so drift on the host hits both
                q8kv_reps.append(q8kv_rep(c, recorder, server, args, prompt, rpc))
                echo_reps.append(echo_rep(channel, echo, plan, args.timeout))
    q8kv, echoed = summary(q8kv_reps), summary(echo_reps)
    med = statistics.median
    device, client = med(q8kv["device_s"]), med(q8kv["client_s"])
    transport = echoed["total_median_s"]
    return {
        "rpc": rpc,
        "calls_per_layer": warm.calls_per_layer,
        "request_bytes_per_layer": plan.request_bytes(),
        "response_bytes_per_layer": plan.response_bytes(),
        "q8kv": q8kv,
        "echo": echoed,
        "ratio_total_median": q8kv["total_median_s"] / transport,
        "ratio_total_min": q8kv["total_min_s"] / echoed["total_min_s"],
        "ratio_layer_p50": q8kv["layer_p50_s"] / echoed["layer_p50_s"],
        # Medians of each part; "rest" is what is left of the median total: the server's
        # host path, protobuf (de)serialization, and the host's noise.
        "split_median_s": {
            "total": q8kv["total_median_s"],
            "device": device,
            "echo_transport": transport,
            "client_encode_decode": client,
            "rest": q8kv["total_median_s"] - device - transport - client,
        },
    }


def default_budget(args) -> int:
    """The session's pages (whole pages per layer) with a quarter spare, and 64 MiB."""
    t = tokens_per_page(PAGE_CODE_BYTES, args.kv_heads, args.head_dim)
    if t == 0:
        raise SystemExit(f"one token of {args.kv_heads}x{args.head_dim} does not fit a page")
    pages = args.layers * math.ceil(args.tokens / t)
    return int(pages * page_bytes(PAGE_CODE_BYTES) * 1.25) + 64 * 1024**2


def check_fits(args) -> None:
    """AppendAndAttend is not split by the client: its one message must fit the limit."""
    if "append" not in args.rpc:
        return
    itemsize = np.dtype(args.dtype).itemsize
    need = args.tokens * (args.heads + 2 * args.kv_heads) * args.head_dim * itemsize + 1024
    if need > args.max_message_bytes:
        raise SystemExit(
            f"--rpc append: one AppendAndAttend of {args.tokens} tokens needs about {need} "
            f"bytes, over --max-message-bytes {args.max_message_bytes}; use --rpc batch "
            "(the client splits it) or raise the limit"
        )


def table(result: dict) -> str:
    g = result["geometry"]
    lines = [
        f"prefill of {g['tokens']} tokens x {g['layers']} layers (H={g['num_heads']} "
        f"KVH={g['num_kv_heads']} D={g['head_dim']} {g['wire_dtype']}), "
        f"{result['settings']['reps']} reps; the server runs calls of more than "
        f"{result['prefill_chunk_tokens']} tokens in chunks (0: never)",
        f"{'rpc':>6} {'calls':>5} {'req MiB':>8} {'resp MiB':>8} | {'q8kv med':>9} "
        f"{'min':>8} {'layer p50':>9} | {'echo med':>9} {'min':>8} {'layer p50':>9} | "
        f"{'ratio':>5} | {'device':>7} {'client':>7} {'rest':>7}  (s; per layer: calls, MiB)",
    ]
    for row in result["rows"]:
        q, e, split = row["q8kv"], row["echo"], row["split_median_s"]
        lines.append(
            f"{row['rpc']:>6} {row['calls_per_layer'][0]:>5} "
            f"{row['request_bytes_per_layer'][0] / 2**20:8.2f} "
            f"{row['response_bytes_per_layer'][0] / 2**20:8.2f} | "
            f"{q['total_median_s']:9.4f} {q['total_min_s']:8.4f} {q['layer_p50_s']:9.5f} | "
            f"{e['total_median_s']:9.4f} {e['total_min_s']:8.4f} {e['layer_p50_s']:9.5f} | "
            f"{row['ratio_total_median']:5.2f} | {split['device']:7.4f} "
            f"{split['client_encode_decode']:7.4f} {split['rest']:7.4f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="auto", help="numpy | cupy | auto [auto]")
    p.add_argument("--tokens", type=int, default=8192, help="prompt tokens [8192]")
    p.add_argument("--layers", type=int, default=32, help="layers of the session [32]")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="wire")
    p.add_argument("--reps", type=int, default=3, help="timed reps, after one warm-up [3]")
    p.add_argument("--rpc", default="append", help="append, batch or both: append,batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-budget", help="the server's page pool [the session's pages +25%%]")
    p.add_argument(
        "--prefill-chunk-tokens",
        type=int,
        default=Config().prefill_chunk_tokens,
        help=f"the server's setting (0: never chunked) [{Config().prefill_chunk_tokens}]",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=MAX_MESSAGE,
        help=f"client and server limit; the echo allows {MAX_MESSAGE} [{MAX_MESSAGE}]",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per call [600]")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra q8kv-server flag, repeatable: --server-arg=--batching=off",
    )
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    p.add_argument("--tag", help="appended to the file name: prefill_service-<card>-<tag>.json")
    args = p.parse_args(argv)
    args.rpc = args.rpc.split(",")
    for name in ("tokens", "layers", "heads", "kv_heads", "head_dim", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not set(args.rpc) <= {"append", "batch"}:
        p.error(f"--rpc: expected append and/or batch, got {args.rpc}")
    if not 0 < args.max_message_bytes <= MAX_MESSAGE:
        p.error(f"--max-message-bytes: expected 1..{MAX_MESSAGE}, got {args.max_message_bytes}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    check_fits(args)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    started, load_before = time.monotonic(), os.getloadavg()
    prompt = make_prompt(args)
    budget = args.memory_budget or str(default_budget(args))
    server_flags = [
        "--backend", args.backend,
        "--memory-budget", budget,
        "--max-message-bytes", str(args.max_message_bytes),
        "--prefill-chunk-tokens", str(args.prefill_chunk_tokens),
        "--max-tokens-per-call", str(max(Config().max_tokens_per_call, args.tokens)),
        "--log-level", "WARNING",
        *args.server_arg,
    ]  # fmt: skip
    with ServerProcess(server_flags, name="q8kv-prefill") as server:
        rows = []
        for rpc in args.rpc:
            rows.append(measure_rpc(args, server, prompt, rpc))
            print(f"{rpc} done", file=sys.stderr, flush=True)
        info = server.build_info()
    backend, device = info.get("backend", args.backend), info.get("device", "unknown")
    result = {
        "benchmark": "prefill_service",
        "command": command,
        "machine": {**machine(backend, device), "q8kv_version": info.get("version")},
        "geometry": {
            "tokens": args.tokens,
            "layers": args.layers,
            "num_heads": args.heads,
            "num_kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "wire_dtype": args.dtype,
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "tag")},
        "server_flags": server_flags,
        # Each call of more than this many new tokens runs as ceil(n / it) chunks (0: whole).
        "prefill_chunk_tokens": args.prefill_chunk_tokens,
        "chunks_per_call": (
            math.ceil(args.tokens / args.prefill_chunk_tokens) if args.prefill_chunk_tokens else 1
        ),
        "thread_env": {
            name: os.environ.get(name)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "rows": rows,
        "total_s": time.monotonic() - started,
        "loadavg_1m": [load_before[0], os.getloadavg()[0]],
    }
    stem = "-".join(filter(None, ["prefill_service", card_slug(backend, device), args.tag]))
    write_json(args.out, f"{stem}.json", result)
    print(table(result))


if __name__ == "__main__":
    main()
