"""Where a packed call's time goes between the processes: per call, the wall time, the
client's CPU, and the server's CPU (user and kernel, its main thread's share) and minor page
faults, read from /proc around a run of sequential AttendBatch calls, against a bare gRPC
echo of the same bytes in alternating rounds (Linux only).

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/server_cpu.py --canned-backend
    python3 benchmarks/server_cpu.py --backend cupy --stages    # on the GPU machine
    Q8KV_MALLOC_RETAIN_BYTES=0 .venv/bin/python benchmarks/server_cpu.py --canned-backend

The server inherits the environment, so its flags' Q8KV_* variables set it up (the second
line: glibc's default trimming). ``--canned-backend``: see batch_path.py. ``--stages``: the
server also times its own pieces of a call (benchmarks/server_hooks/stage_timers.py) and
they are printed after the per-call figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_path import KVH, D, H, batch_check, batch_request, batch_response_bytes  # noqa: E402
from bench_util import (  # noqa: E402
    CHANNEL_OPTIONS,
    EchoProcess,
    ServerProcess,
    q8kv_method,
    server_hooks,
)

from q8kv.v1 import kvcache_pb2 as pb  # noqa: E402
from q8kv.v1 import kvcache_pb2_grpc as pb_grpc  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def process_counters(pid: int) -> dict[str, float]:
    """User and kernel CPU seconds (all threads, the main one), minor page faults."""

    def stat(path: str) -> list[str]:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()

    whole, main = stat(f"/proc/{pid}/stat"), stat(f"/proc/{pid}/task/{pid}/stat")
    return {
        "user_s": int(whole[11]) / TICK,
        "kernel_s": int(whole[12]) / TICK,
        "main_thread_s": (int(main[11]) + int(main[12])) / TICK,
        "minor_faults": int(whole[7]),
    }


async def per_call(call, pid: int, calls: int) -> dict[str, float]:
    """Microseconds (and faults) per call of ``calls`` sequential calls."""
    for _ in range(min(20, calls)):  # warm-up
        await call()
    before, cpu, wall = process_counters(pid), time.process_time(), time.perf_counter()
    for _ in range(calls):
        await call()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = process_counters(pid)
    us = 1e6 / calls
    return {
        "wall_us": wall * us,
        "client_cpu_us": cpu * us,
        "server_user_us": (after["user_s"] - before["user_s"]) * us,
        "server_kernel_us": (after["kernel_s"] - before["kernel_s"]) * us,
        "server_main_thread_us": (after["main_thread_s"] - before["main_thread_s"]) * us,
        "server_minor_faults": (after["minor_faults"] - before["minor_faults"]) / calls,
    }


async def measure(args, server: ServerProcess, echo: EchoProcess) -> dict:
    channel = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
    echo_channel = grpc.aio.insecure_channel(echo.address, options=CHANNEL_OPTIONS)
    stub = pb_grpc.KVCacheServiceStub(channel)
    geometry = pb.Geometry(num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D,
                           max_len=args.calls * (args.rounds + 1) + 64)  # fmt: skip
    ids = []
    for i in range(args.batch):
        created = await stub.CreateSession(
            pb.CreateSessionRequest(session_id=f"cpu-{i}", geometry=geometry)
        )
        ids.append(created.session.session_id)
    request = batch_request(ids, np.random.default_rng(0))
    payload, echo_call = request.SerializeToString(), echo_channel.unary_unary(echo.path("B"))
    # Raw bytes both ways, as the echo is called: both clients do the same work per call.
    attend = channel.unary_unary(q8kv_method("AttendBatch"))
    batch_check(args.batch)(pb.AttendBatchResponse.FromString(await attend(payload)))

    async def q8kv() -> None:
        await attend(payload)

    async def bare() -> None:
        await echo_call(payload)

    rounds: dict[str, list[dict]] = {"q8kv": [], "echo": []}
    for _ in range(args.rounds):
        rounds["q8kv"].append(await per_call(q8kv, server.proc.pid, args.calls))
        rounds["echo"].append(await per_call(bare, echo.proc.pid, args.calls))
    await channel.close()
    await echo_channel.close()
    return {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in rounds.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="sessions per AttendBatch [64]")
    ap.add_argument("--calls", type=int, default=300, help="calls per round [300]")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds [3]")
    ap.add_argument("--backend", default="numpy", help="the server's backend [numpy]")
    ap.add_argument("--canned-backend", action="store_true", help="see batch_path.py")
    ap.add_argument(
        "--stages",
        action="store_true",
        help="also the server's own pieces of a call, timed inside it (stage_timers.py)",
    )
    args = ap.parse_args()
    flags = ["--backend", args.backend, "--memory-budget", "2GiB", "--log-level", "WARNING"]
    fd, stages_file = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    with server_hooks(canned=args.canned_backend, stages_file=stages_file if args.stages else None):
        server = ServerProcess(flags, name="q8kv-cpu")
    # The sessions start empty and grow by one token a call.
    with server, EchoProcess({"B": batch_response_bytes(args.batch, args.calls)}) as echo:
        result = asyncio.run(measure(args, server, echo))
        stages = read_stages(server, stages_file) if args.stages else {}
    os.unlink(stages_file)
    print(f"B = {args.batch}, medians of {args.rounds} rounds of {args.calls} calls, per call:")
    for name, figures in result.items():
        print(f"  {name:>5}: " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()))
    if stages:
        print("the server's pieces of a q8kv call (us over every call: wall median, wall mean,"
              " the thread's CPU median where the piece never awaits):")  # fmt: skip
        for name, stage in sorted(stages.items(), key=lambda kv: -kv[1]["median_us"]):
            cpu = stage.get("cpu_median_us")
            shown = "" if cpu is None else f"{cpu:,.1f}"
            print(f"  {name:>20}: {stage['median_us']:8,.1f} {stage['mean_us']:8,.1f}"
                  f" {shown:>8}  ({stage['count']} calls)")  # fmt: skip
    return 0


def read_stages(server: ServerProcess, path: str) -> dict:
    """Ask the server for its stage medians (SIGUSR1) and read them back."""
    os.truncate(path, 0)
    os.kill(server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if os.path.getsize(path):
            time.sleep(0.1)  # the whole file, not its first bytes
            with open(path) as f:
                return json.load(f)
        time.sleep(0.05)
    raise RuntimeError(f"the server wrote no stage timings to {path}")


if __name__ == "__main__":
    raise SystemExit(main())
