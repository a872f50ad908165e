"""Service throughput under many orchestrators: dynamic batching off vs on, unary vs stream.

For each of the four configurations a fresh q8kv-server is started (``--backend`` from
the flag) and q8kv-loadtest drives it: ``--orchestrators`` virtual orchestrators (64), one
session each, H=32, KVH=8, D=128, one layer; each session is prefilled with 1,024 tokens
before the clock starts (``--untimed-prefill``), then decodes one token per call for
``--seconds``. The figures are those of the decode calls: attention items/s (one item =
one (session, layer) decode step) and latency p50/p99; the server's mean batch size is
read from its q8kv_batch_items histogram.

The cache grows by one token per step, so it spans [1024, 1024 + steps done]; the table
shows the mean length at the end. The load generator is one Python process (asyncio), on
the same host as the server: at high rates it competes with the server for CPU.

    python benchmarks/throughput.py [--backend numpy] [--seconds 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from bench_util import ServerProcess, write_json

H, KVH, D = 32, 8, 128
CONFIGS = [  # (batching, streaming)
    ("off", False),
    ("on", False),
    ("off", True),
    ("on", True),
]


def run_config(args: argparse.Namespace, batching: str, streaming: bool) -> dict[str, Any]:
    extra = [
        "--memory-budget",
        args.memory_budget,
        "--max-batch-items",
        str(args.max_batch_items),
        "--max-queue-delay-us",
        str(args.max_queue_delay_us),
    ]
    server = ServerProcess(
        ["--backend", args.backend, "--batching", batching, "--log-level", "WARNING", *extra],
        name="q8kv-bench",
    )
    try:
        cmd = [
            sys.executable,
            "-m",
            "q8kv.client.loadtest",
            server.address,
            "--layers",
            "1",
            "--heads",
            str(H),
            "--kv-heads",
            str(KVH),
            "--head-dim",
            str(D),
            "--prefill",
            str(args.prefill),
            "--steps",
            str(args.steps),
            "--untimed-prefill",
            "--concurrency",
            str(args.orchestrators),
            "--duration",
            f"{args.seconds}s",
            "--dtype",
            args.dtype,
            "--timeout",
            "120s",
            "--output",
            "json",
            "--quiet",
            "--metrics-url",
            server.metrics_url,
        ] + (["--streaming"] if streaming else [])
        started = time.monotonic()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(
                f"q8kv-loadtest failed ({done.returncode}):\n{done.stderr}\n"
                f"{done.stdout[-2000:]}\nserver log (end):\n"
                f"{server.logs()[-4000:]}"
            )
        report = json.loads(done.stdout)
        batch_sum = server.metric("q8kv_batch_items_sum")
        batch_count = server.metric("q8kv_batch_items_count")
    finally:
        server.stop()
    decode = report["by_kind"]["decode"]
    return {
        "batching": batching,
        "rpc": "streaming" if streaming else "unary",
        "items_per_s": decode["items"] / report["duration_s"],
        "p50_ms": decode["latency_ms"]["p50"],
        "p99_ms": decode["latency_ms"]["p99"],
        "mean_ms": decode["latency_ms"]["mean"],
        "decode_calls": decode["count"],
        "errors": report["errors"],
        "duration_s": report["duration_s"],
        "mean_batch_items": batch_sum / batch_count if batch_count else 0.0,
        "mean_length_at_end": args.prefill + decode["count"] / args.orchestrators,
        "wall_s_with_setup": time.monotonic() - started,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'batching':>8} {'rpc':>9} {'items/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'batch':>6} {'len':>6} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['batching']:>8} {r['rpc']:>9} {r['items_per_s']:9.1f} {r['p50_ms']:8.2f} "
            f"{r['p99_ms']:8.2f} {r['mean_batch_items']:6.1f} {r['mean_length_at_end']:6.0f} "
            f"{r['errors']:>6}"
        )
    by = {(r["batching"], r["rpc"]): r for r in rows}
    for rpc in ("unary", "streaming"):
        on, off = by.get(("on", rpc)), by.get(("off", rpc))
        if on and off and off["items_per_s"]:
            gain = on["items_per_s"] / off["items_per_s"]
            lines.append(
                f"{rpc}: batching on / off = {gain:.2f}x items/s, "
                f"p99 {on['p99_ms']:.1f} vs {off['p99_ms']:.1f} ms"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="numpy", help="numpy | cupy | auto [numpy]")
    p.add_argument("--seconds", type=float, default=10.0, help="timed decode per config [10]")
    p.add_argument("--orchestrators", type=int, default=64)
    p.add_argument("--prefill", type=int, default=1024, help="cache length at the start")
    p.add_argument(
        "--steps",
        type=int,
        default=1024,
        help="decode steps before a sequence would restart (keep it above what --seconds reaches)",
    )
    p.add_argument("--dtype", choices=("float32", "float16"), default="float16")
    p.add_argument("--max-batch-items", type=int, default=64)
    p.add_argument("--max-queue-delay-us", type=int, default=0)
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--only", choices=("unary", "streaming"), help="run just these two configs")
    p.add_argument("--out", help="write throughput-<backend>-<host>.json into this folder")
    args = p.parse_args()

    rows = []
    for batching, streaming in CONFIGS:
        if args.only and args.only != ("streaming" if streaming else "unary"):
            continue
        print(
            f"batching {batching}, {'streaming' if streaming else 'unary'} ...",
            file=sys.stderr,
            flush=True,
        )
        rows.append(run_config(args, batching, streaming))
    print(table(rows))
    if args.out:
        host = platform.node().split(".")[0] or "host"
        result = {
            "benchmark": "throughput",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "host": host,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "geometry": {"H": H, "KVH": KVH, "D": D, "layers": 1},
            "settings": vars(args),
            "rows": rows,
        }
        write_json(args.out, f"throughput-{args.backend}-{host}.json", result)


if __name__ == "__main__":
    main()
