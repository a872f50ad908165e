"""What the Prometheus metrics cost: decode-step round trip with metrics on vs off.

Two q8kv servers run as subprocesses of this script, started in the same run with the same
flags except that one has ``--metrics-port -1`` (no registry, no RPC counting in the front
door, no engine observer, no quantization-error sampler, no kernel hooks). The client (raw
generated stub, request built once) runs a decode step on each: one AppendAndAttend of one
layer, n = 1, H=32, KVH=8, D=128, float16 on the wire, over a cache of ``--length`` tokens
(the session is truncated back after every measured step; the truncation is not timed).

Drift (CPU frequency, other load) is cancelled by interleaving: each round runs a block of
steps on one server then the other, in alternating order (ABBA...), and the percentiles are
taken over all the samples of each server; the median over rounds of the per-round p50
difference is reported too (the least drift-sensitive figure). The metrics-on server runs
with the default quantization-error sampling rate (0.01) unless
``--quant-error-sample-rate`` says otherwise, and /metrics is scraped once per round so
the scrape path is exercised as in production.

    python benchmarks/metrics_overhead.py [--backend numpy] [--rounds 40] [--steps 100]
        [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
from bench_util import ServerProcess, write_json

from q8kv import wire
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.v1 import kvcache_pb2_grpc

H, KVH, D = 32, 8, 128
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    common = ["--backend", args.backend, "--memory-budget", "256MiB"]
    on = ServerProcess(
        [*common, "--quant-error-sample-rate", str(args.quant_error_sample_rate)],
        name="metrics-on",
    )
    try:
        off = ServerProcess([*common, "--metrics-port", "-1"], name="metrics-off", metrics=False)
    except BaseException:
        on.stop()
        raise
    try:
        yield on, off
    finally:
        on.stop()
        off.stop()


class DecodeLoop:
    """One session on one server; ``step()`` times one decode-step round trip."""

    def __init__(self, server: ServerProcess, length: int, dtype: str) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.stub = kvcache_pb2_grpc.KVCacheServiceStub(self.channel)
        self.sid = f"bench-{server.name}"
        self.length = length
        geometry = pb.Geometry(
            num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=length + 16
        )
        self.stub.CreateSession(pb.CreateSessionRequest(session_id=self.sid, geometry=geometry))
        rng = np.random.default_rng(0)

        def tensor(n: int, heads: int) -> pb.Tensor:
            return wire.encode(rng.standard_normal((n, heads, D)).astype(np.float32), dtype)

        prefill = pb.AttendItem(
            session_id=self.sid,
            layer=0,
            q=tensor(length, H),
            k=tensor(length, KVH),
            v=tensor(length, KVH),
        )
        self.stub.AppendAndAttend(pb.AppendAndAttendRequest(items=[prefill]))
        self.request = pb.AppendAndAttendRequest(
            items=[
                pb.AttendItem(
                    session_id=self.sid, layer=0, q=tensor(1, H), k=tensor(1, KVH), v=tensor(1, KVH)
                )
            ]
        )
        self.truncate = pb.TruncateSessionRequest(session_id=self.sid, length=length)

    def step(self) -> int:
        started = time.perf_counter_ns()
        reply = self.stub.AppendAndAttend(self.request)
        elapsed = time.perf_counter_ns() - started
        assert reply.results[0].length == self.length + 1
        self.stub.TruncateSession(self.truncate)
        return elapsed

    def close(self) -> None:
        self.channel.close()


def stats_us(ns: list[int]) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1e3
    return {
        "n": int(a.size),
        "p50_us": float(np.percentile(a, 50)),
        "p90_us": float(np.percentile(a, 90)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
    }


def run(args: argparse.Namespace) -> dict:
    samples: dict[str, list[int]] = {"on": [], "off": []}
    round_diffs: list[float] = []  # per round: p50 on vs p50 off, percent
    with servers(args) as (on, off):
        loops = {
            "on": DecodeLoop(on, args.length, args.dtype),
            "off": DecodeLoop(off, args.length, args.dtype),
        }
        try:
            for loop in loops.values():
                for _ in range(args.warmup):
                    loop.step()
            gc.disable()
            try:
                for r in range(args.rounds):
                    order = ("on", "off") if r % 2 == 0 else ("off", "on")
                    block = {}
                    for key in order:
                        loop = loops[key]
                        block[key] = [loop.step() for _ in range(args.steps)]
                        samples[key].extend(block[key])
                    on_p50, off_p50 = (float(np.median(block[k])) for k in ("on", "off"))
                    round_diffs.append(100.0 * (on_p50 - off_p50) / off_p50)
                    with urllib.request.urlopen(on.metrics_url, timeout=10) as response:
                        scraped = response.read()
            finally:
                gc.enable()
        finally:
            for loop in loops.values():
                loop.close()
    on_stats, off_stats = stats_us(samples["on"]), stats_us(samples["off"])
    diff = {
        f"{k}_diff_percent": 100.0 * (on_stats[k] - off_stats[k]) / off_stats[k]
        for k in ("p50_us", "p99_us", "mean_us")
    }
    return {
        "benchmark": "metrics_overhead",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "hostname": platform.node(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
        },
        "config": {
            "backend": args.backend,
            "H": H,
            "KVH": KVH,
            "D": D,
            "cache_length": args.length,
            "wire_dtype": args.dtype,
            "rounds": args.rounds,
            "steps_per_round": args.steps,
            "warmup": args.warmup,
            "quant_error_sample_rate": args.quant_error_sample_rate,
        },
        "metrics_on": on_stats,
        "metrics_off": off_stats,
        **diff,
        # Drift-free estimate: the median over rounds of each round's p50 difference.
        "paired_round_p50_diff_percent": float(np.median(round_diffs)),
        "target_percent": 5.0,
        "scrape_bytes": len(scraped),
    }


def print_table(result: dict) -> None:
    c = result["config"]
    print(
        f"decode step, H={c['H']} KVH={c['KVH']} D={c['D']}, cache {c['cache_length']} "
        f"tokens, {c['wire_dtype']} wire, backend {c['backend']}, "
        f"{c['rounds']} rounds x {c['steps_per_round']} steps interleaved"
    )
    print(f"{'':12} {'n':>7} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'mean us':>9}")
    for key in ("metrics_on", "metrics_off"):
        s = result[key]
        print(
            f"{key:12} {s['n']:7d} {s['p50_us']:9.1f} {s['p90_us']:9.1f} "
            f"{s['p99_us']:9.1f} {s['mean_us']:9.1f}"
        )
    print(
        f"{'on vs off':12} {'':7} {result['p50_us_diff_percent']:+8.2f}% {'':9} "
        f"{result['p99_us_diff_percent']:+8.2f}% {result['mean_us_diff_percent']:+8.2f}%"
        f"   (target: under {result['target_percent']:.0f}%)"
    )
    print(
        f"median over rounds of the per-round p50 difference: "
        f"{result['paired_round_p50_diff_percent']:+.2f}%"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="numpy", help="numpy | cupy | auto")
    parser.add_argument("--length", type=int, default=16, help="cache tokens")
    parser.add_argument("--dtype", default="float16", help="wire dtype")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--steps", type=int, default=100, help="steps per server per round")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--quant-error-sample-rate", type=float, default=0.01)
    parser.add_argument("--out", default=None, help="directory for the JSON result")
    args = parser.parse_args(argv)
    result = run(args)
    print_table(result)
    if args.out:
        write_json(args.out, f"metrics_overhead-{args.backend}-{platform.node()}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
