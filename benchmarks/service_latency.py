"""Round-trip latency of one decode step through q8kv, against a bare gRPC echo.

What it measures, per (cache length, wire dtype):

- ``svc``: one decode-step AppendAndAttend (H=32, KVH=8, D=128, one layer, n=1) through
  the public sync client (``Session.append_and_attend``: encode, RPC, decode), as a user
  sees it.
- ``stub``: the same call through the raw generated stub with a request built once, so
  the client's own encode/decode cost can be read off (``svc - stub``).
- ``echo``: a bare gRPC unary echo (generic handler, no protobuf, grpc.aio like the
  server, its own subprocess like the server) of a payload of q+k+v bytes.
- ``compute``: the backend's own append_and_attend for an equivalent item, in-process
  (create_backend + AttendItem, no gRPC), median.

The cache length stays constant: after every measured step the session is truncated back
to the prefilled length (the truncation is not timed). With the default 64 KiB pages a
page holds 32 tokens of this geometry, so at 1,024 tokens every step also takes a fresh
page, which the truncation then frees (at 16 tokens the step stays in the first page).

Both servers run as subprocesses of this script and the client runs here, so both round
trips cross the same process boundary over loopback. Timings use perf_counter_ns with the
garbage collector paused, ``--iters`` samples after ``--warmup``.

    python benchmarks/service_latency.py [--backend auto] [--iters 2000] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
from bench_util import free_port, write_json

H, KVH, D = 32, 8, 128
ECHO_METHOD = "/q8kv.bench.Echo/Echo"
MAX_MESSAGE = 64 * 1024 * 1024


# --- the echo server (runs in its own process: `--echo-server PORT`) -------------------


async def _serve_echo(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "q8kv.bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- processes ---------------------------------------------------------------------------


@contextlib.contextmanager
def subprocess_server(args: list[str], name: str) -> Iterator[subprocess.Popen]:
    """Run a server process; its output goes to a log that is shown if it dies early."""
    with tempfile.TemporaryFile("w+") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT)
        try:
            yield proc
        except BaseException:
            if proc.poll() is not None:
                logf.seek(0)
                print(f"--- {name} output ---\n{logf.read()}", file=sys.stderr)
            raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_until(check: Callable[[], bool], proc: subprocess.Popen, what: str, limit: float = 60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not ready after {limit:.0f} s")


# --- measurement -------------------------------------------------------------------------


def sample(
    step: Callable[[], object], reset: Callable[[], object] | None, iters: int, warmup: int
) -> np.ndarray:
    """Nanoseconds of ``step`` per iteration; ``reset`` runs after each one, untimed."""
    times = np.empty(iters, dtype=np.int64)
    clock = time.perf_counter_ns
    gc.collect()
    gc.disable()
    try:
        for i in range(warmup + iters):
            t0 = clock()
            step()
            t1 = clock()
            if reset is not None:
                reset()
            if i >= warmup:
                times[i - warmup] = t1 - t0
    finally:
        gc.enable()
    return times


def stats_us(times: np.ndarray) -> dict[str, float]:
    us = times / 1000.0
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
        "min_us": float(us.min()),
    }


def tensors(length: int, dtype: np.dtype, seed: int = 0):
    """Prefill k/v [length, KVH, D] and one decode step's q [1,H,D], k/v [1,KVH,D]."""
    rng = np.random.default_rng(seed)
    prefill_k = rng.standard_normal((length, KVH, D)).astype(dtype)
    prefill_v = rng.standard_normal((length, KVH, D)).astype(dtype)
    q = rng.standard_normal((1, H, D)).astype(dtype)
    k = rng.standard_normal((1, KVH, D)).astype(dtype)
    v = rng.standard_normal((1, KVH, D)).astype(dtype)
    return prefill_k, prefill_v, q, k, v


def backend_compute(backend, length: int, dtype: np.dtype, iters: int, warmup: int) -> dict:
    """The backend's own append_and_attend of one decode step over ``length`` tokens."""
    from q8kv.server.backends.base import AttendItem, LayerLayout, tokens_per_page

    t = tokens_per_page(backend.page_code_bytes, KVH, D)
    layout = LayerLayout(num_heads=H, num_kv_heads=KVH, head_dim=D, tokens_per_page=t)
    pages = np.arange(math.ceil((length + 1) / t), dtype=np.int32)
    scale = 1.0 / math.sqrt(D)
    pk, pv, q, k, v = tensors(length, dtype)
    if length:
        pq = np.zeros((length, H, D), dtype=dtype)
        prefill = AttendItem(layout, scale, pages[: math.ceil(length / t)], 0, pq, pk, pv)
        backend.append_and_attend([prefill])
    # The step rewrites the same slot each time, so the length stays `length`.
    item = AttendItem(layout, scale, pages, length, q, k, v)
    times = sample(lambda: backend.append_and_attend([item]), None, iters, warmup)
    return {"p50_us": float(np.median(times) / 1000.0), "p99_us": stats_us(times)["p99_us"]}


def machine_info(backend_name: str, device: str) -> dict:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "backend": backend_name,
        "device": device,
        # BLAS worker threads oversubscribing a small machine dominate the numpy tail.
        "thread_env": {
            name: os.environ.get(name)
            for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def resolve_backend(name: str) -> str:
    from q8kv.server.backends import cuda_available

    return ("cupy" if cuda_available() else "numpy") if name == "auto" else name


def run(args: argparse.Namespace) -> dict:
    from q8kv.client import Client
    from q8kv.server.backends import create_backend

    backend_name = resolve_backend(args.backend)
    lengths = [int(x) for x in args.lengths.split(",")]
    dtypes = [np.dtype(x) for x in args.dtypes.split(",")]
    svc_port, echo_port, metrics_port = free_port(), free_port(), free_port()
    server_cmd = [
        sys.executable,
        "-m",
        "q8kv.server",
        "--host",
        "127.0.0.1",
        "--port",
        str(svc_port),
        "--backend",
        backend_name,
        "--metrics-port",
        str(metrics_port),
        "--log-level",
        "WARNING",
        *args.server_arg,
    ]
    echo_cmd = [sys.executable, str(Path(__file__).resolve()), "--echo-server", str(echo_port)]

    # In-process backend for the compute column: pages for the longest cache + 1 token.
    backend = create_backend(backend_name, num_pages=math.ceil((max(lengths) + 1) / 16) + 4)
    rows = []
    with (
        subprocess_server(server_cmd, "q8kv server") as server,
        subprocess_server(echo_cmd, "echo server") as echo_proc,
        Client(f"127.0.0.1:{svc_port}", timeout=60.0) as client,
        grpc.insecure_channel(
            f"127.0.0.1:{echo_port}",
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.max_receive_message_length", MAX_MESSAGE),
            ],
        ) as echo_channel,
    ):
        wait_until(lambda: client.health() == "SERVING", server, "q8kv server")
        echo = echo_channel.unary_unary(ECHO_METHOD)  # bytes in, bytes out: no serializers
        wait_until(lambda: echo(b"x", timeout=1.0) == b"x", echo_proc, "echo server")

        for length in lengths:
            for dtype in dtypes:
                row = measure_row(client, echo, backend, length, dtype, args)
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    backend.close()
    return {
        "benchmark": "service_latency",
        "geometry": {"num_heads": H, "num_kv_heads": KVH, "head_dim": D, "layers": 1, "n": 1},
        "iters": args.iters,
        "warmup": args.warmup,
        "length_kept_by": "truncate after each step (untimed)",
        "machine": machine_info(backend_name, backend.device_name),
        "rows": rows,
    }


def measure_row(client, echo, backend, length: int, dtype: np.dtype, args) -> dict:
    """One (cache length, wire dtype): service, raw stub, echo and backend compute."""
    from q8kv.v1 import kvcache_pb2 as pb
    from q8kv.wire import encode

    pk, pv, q, k, v = tensors(length, dtype)
    s = client.create_session(
        num_layers=1, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=length + 64
    )
    try:
        if length:
            s.append_and_attend(0, np.zeros((length, H, D), dtype=dtype), pk, pv)

        def reset() -> None:
            s.truncate(length)

        svc = sample(lambda: s.append_and_attend(0, q, k, v), reset, args.iters, args.warmup)
        item = pb.AttendItem(session_id=s.id, layer=0, q=encode(q), k=encode(k), v=encode(v))
        request = pb.AppendAndAttendRequest(items=[item])
        metadata = (("x-session-id", s.id),)
        stub = sample(
            lambda: client._stub.AppendAndAttend(request, timeout=60.0, metadata=metadata),
            reset,
            args.iters,
            args.warmup,
        )
        lengths = s.info().layer_lengths
        assert lengths == [length], f"cache length drifted: {lengths} != [{length}]"
    finally:
        s.delete()
    payload = q.tobytes() + k.tobytes() + v.tobytes()
    echo_times = sample(lambda: echo(payload, timeout=60.0), None, args.iters, args.warmup)
    row = {
        "cache_tokens": length,
        "wire_dtype": dtype.name,
        "payload_bytes": len(payload),
        "service": stats_us(svc),
        "service_stub": stats_us(stub),
        "echo": stats_us(echo_times),
        "compute": backend_compute(backend, length, dtype, args.iters, args.warmup),
    }
    row["ratio_p50"] = row["service"]["p50_us"] / row["echo"]["p50_us"]
    row["ratio_p99"] = row["service"]["p99_us"] / row["echo"]["p99_us"]
    row["ratio_stub_p50"] = row["service_stub"]["p50_us"] / row["echo"]["p50_us"]
    return row


COLUMNS = (
    f"{'wire':8} {'cache':>6} {'bytes':>7} | {'svc p50':>8} {'svc p99':>8} | "
    f"{'echo p50':>8} {'echo p99':>8} | {'ratio50':>7} {'ratio99':>7} | "
    f"{'stub p50':>8} {'compute':>8}"
)


def print_row(row: dict, header: bool) -> None:
    if header:
        print("all times in microseconds; ratio = service / echo; compute = backend median")
        print(COLUMNS)
        print("-" * len(COLUMNS))
    print(
        f"{row['wire_dtype']:8} {row['cache_tokens']:>6} {row['payload_bytes']:>7} | "
        f"{row['service']['p50_us']:>8.1f} {row['service']['p99_us']:>8.1f} | "
        f"{row['echo']['p50_us']:>8.1f} {row['echo']['p99_us']:>8.1f} | "
        f"{row['ratio_p50']:>7.2f} {row['ratio_p99']:>7.2f} | "
        f"{row['service_stub']['p50_us']:>8.1f} {row['compute']['p50_us']:>8.1f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto", help="auto | numpy | cupy")
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--lengths", default="16,1024", help="cache lengths, comma-separated")
    parser.add_argument("--dtypes", default="float32,float16", help="wire dtypes")
    parser.add_argument("--out", default=None, help="directory for the JSON results")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra q8kv-server flag, repeatable: --server-arg=--max-queue-delay-us=0",
    )
    parser.add_argument("--echo-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server is not None:
        asyncio.run(_serve_echo(args.echo_server))
        return 0
    result = run(args)
    m = result["machine"]
    print(
        f"\n{m['backend']} on {m['device']}; {m['cpu_model']}, {m['nproc']} cpus; "
        f"python {m['python']}; {args.iters} iters after {args.warmup} warm-up"
    )
    if args.out:
        write_json(args.out, f"service_latency-{m['backend']}-{m['hostname']}.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
