"""Several q8kv-server processes behind the session-affine router: items/s for N = 1, 2, 4.

For each N in ``--processes``: N ``q8kv-server`` processes on loopback, each with
``--memory-budget`` = ``--total-budget`` / N (the split docs/scaling.md describes), and
nginx in front with the project's own deploy/nginx.conf rendered for loopback
(tests/routing.py). Then ``--groups`` micro-batches of ``--batch`` sessions (H=32, KVH=8,
D=128, ``--layers`` layers):

- A packed call (AttendBatch) is routed as a whole by its one ``x-session-id`` header, so
  every session of a micro-batch is created through the router under one routing key (its
  first session's id) and lands on the process that key hashes to. Keys are drawn until
  each process holds ``--groups`` / N micro-batches (balanced placement: the figure is
  the capacity of N processes, not the luck of a few hashes; the JSON records the draws).
- Untimed: each micro-batch is prefilled with ``--prefill`` tokens per session and layer
  (packed calls, chunked to stay far below the message limit).
- Timed: ``--clients`` load processes (asyncio, one channel per micro-batch) keep one
  AttendBatch of one decode token per session in flight per micro-batch, layer after
  layer, through the router, for ``--seconds`` after ``--warmup``. One item = one
  session-layer decode step; items/s counts the calls that completed in the window.

The CPU time of the servers and of nginx over the window is read from /proc: it shows
whether more processes bought more front-end CPU.

nginx: ``--nginx PATH`` (default: on PATH, or /usr/sbin/nginx), or ``--nginx-deb-dir DIR``:
the .deb files of scripts/fetch_nginx_debs.sh, unpacked with ``dpkg -x`` (Python's own ar
and tar reader where dpkg is missing) into ``--nginx-root`` and run from there, with
LD_LIBRARY_PATH on the unpacked libraries. Each N gets its nginx prefix (config, pid, logs)
under ``--nginx-prefix``.

    python benchmarks/multiprocess.py --backend numpy --out benchmarks/results
    python3 benchmarks/multiprocess.py --backend cupy --nginx-deb-dir .deb --out "$OUT"

Writes ``multiprocess-<card or cpu>.json`` (card or CPU, date, command, rows).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import grp
import io
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_util import REPO, ServerProcess, free_port, write_json

sys.path.insert(0, str(REPO / "tests"))  # tests/routing.py: the router config and groups
import routing  # noqa: E402

from q8kv.v1 import kvcache_pb2 as pb  # noqa: E402
from q8kv.v1 import kvcache_pb2_grpc  # noqa: E402

H, KVH, D = 32, 8, 128
MAX_MESSAGE = 512 * 1024 * 1024
PREFILL_CALL_BYTES = 64 * 1024 * 1024  # q+k+v of one prefill call at most
CALL_TIMEOUT = 120.0
# numpy servers: N processes with a BLAS thread pool each oversubscribe a small host.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# --- nginx: the installed binary, or one unpacked from .deb files ----------------------


def _extract_deb(deb: Path, root: Path) -> None:
    """``dpkg -x`` without dpkg: a .deb is an ar archive whose data.tar.* holds the files."""
    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"{deb}: not a .deb (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos : pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48 : pos + 58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise SystemExit(f"{deb}: data.tar.zst needs dpkg (Python reads xz/gz only)")
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                # The "data" filter (Python >= 3.11.4) refuses paths leaving ``root``.
                safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tar.extractall(root, **safe)
            return
        pos += 60 + size + (size & 1)
    raise SystemExit(f"{deb}: no data.tar member")


def unpack_nginx(deb_dir: Path, root: Path) -> tuple[str, dict[str, str]]:
    """Unpack every .deb of ``deb_dir`` into ``root``; the nginx binary there and the
    environment that finds the unpacked libraries first."""
    debs = sorted(deb_dir.glob("*.deb"))
    if not debs:
        raise SystemExit(f"--nginx-deb-dir {deb_dir}: no .deb files (scripts/fetch_nginx_debs.sh)")
    root.mkdir(parents=True, exist_ok=True)
    dpkg = shutil.which("dpkg")
    for deb in debs:
        if dpkg:
            subprocess.run([dpkg, "-x", str(deb), str(root)], check=True)
        else:
            _extract_deb(deb, root)
    binary = root / "usr" / "sbin" / "nginx"
    if not binary.is_file():
        raise SystemExit(f"{root}: no usr/sbin/nginx in {[d.name for d in debs]}")
    libdirs = sorted({str(p.parent) for p in root.rglob("*.so*") if p.is_file()})
    old = os.environ.get("LD_LIBRARY_PATH")
    env = {"LD_LIBRARY_PATH": ":".join(libdirs + ([old] if old else []))}
    return str(binary), env


def nginx_version(binary: str, env: dict[str, str]) -> str:
    """``nginx -v``; a binary that cannot start (a missing library) ends the run here."""
    done = subprocess.run(
        [binary, "-v"], capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )
    if done.returncode != 0:
        raise SystemExit(f"{binary} -v failed ({done.returncode}), env {env}:\n{done.stderr}")
    return done.stderr.strip()


def worker_user() -> str | None:
    """deploy/nginx.conf runs a root-run nginx's workers as nobody:nogroup; where that group
    is missing (not Debian-like) nginx would not start, so run them as root instead."""
    if os.geteuid() != 0:
        return None  # not root: nginx ignores `user`
    try:
        grp.getgrnam("nogroup")
    except KeyError:
        return "root root"
    return None


def pick_nginx(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    if args.nginx_deb_dir:
        return unpack_nginx(Path(args.nginx_deb_dir), Path(args.nginx_root))
    binary = args.nginx or routing.NGINX
    if not binary:
        raise SystemExit("no nginx: install it, or give --nginx PATH or --nginx-deb-dir DIR")
    return binary, {}


# --- placement and prefill (in this process, sync) ------------------------------------


def place_groups(args, router_stub, direct) -> tuple[list[tuple[int, list[str]]], int]:
    """``--groups`` micro-batches, each created under one routing key, balanced over the
    processes: a key whose process is full is dropped. [(process, ids)], draws made."""
    quota = args.groups // len(direct)
    held = [0] * len(direct)
    groups: list[tuple[int, list[str]]] = []
    geometry = pb.Geometry(
        num_layers=args.layers, num_heads=H, num_kv_heads=KVH, head_dim=D, max_len=args.max_len
    )
    run = uuid.uuid4().hex[:8]
    draws = 0
    while len(groups) < args.groups:
        if draws >= 100 * args.groups:
            raise SystemExit(f"no balanced placement after {draws} draws: {held}")
        ids = [f"mp-{run}-g{draws}-s{b}" for b in range(args.batch)]
        draws += 1
        routing.create_group(router_stub, ids[:1], geometry)
        owner = routing.holder(direct, ids[0])
        if held[owner] >= quota:
            router_stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=ids[0]),
                metadata=routing.routed(ids[0]),
                timeout=CALL_TIMEOUT,
            )
            continue
        routing.create_group(router_stub, ids[1:], geometry, key=ids[0])
        held[owner] += 1
        groups.append((owner, ids))
    return groups, draws


def random_batch(rng: np.random.Generator, b: int, n: int, dtype: str) -> tuple[np.ndarray, ...]:
    """q [b, n, H, D], k and v [b, n, KVH, D], standard normal in ``dtype``."""
    return tuple(
        rng.standard_normal((b, n, heads, D), dtype=np.float32).astype(dtype)
        for heads in (H, KVH, KVH)
    )


def prefill(args, router_stub, groups, rng) -> None:
    """``--prefill`` tokens per session and layer, in packed calls of at most
    PREFILL_CALL_BYTES of q+k+v."""
    row = args.batch * (H + 2 * KVH) * D * np.dtype(args.dtype).itemsize
    chunk = max(1, PREFILL_CALL_BYTES // row)
    for _, ids in groups:
        for layer in range(args.layers):
            done = 0
            while done < args.prefill:
                n = min(chunk, args.prefill - done)
                request = routing.batch_request(
                    ids, layer, *random_batch(rng, len(ids), n, args.dtype)
                )
                reply = router_stub.AttendBatch(
                    request, metadata=routing.routed(ids[0]), timeout=CALL_TIMEOUT
                )
                done += n
                if list(reply.lengths) != [done] * len(ids):
                    raise SystemExit(
                        f"prefill {ids[0]} layer {layer}: lengths "
                        f"{sorted(set(reply.lengths))}, expected {done}"
                    )


# --- the load (client processes, asyncio) ---------------------------------------------


async def _drive(address: str, ids: list[str], args, deadlines, seed: int) -> dict[str, Any]:
    """One micro-batch in a closed loop: AttendBatch of one token per session, layer after
    layer, the next sent when the last answered. Counts the calls done in the window."""
    rng = np.random.default_rng(seed)
    requests = [
        routing.batch_request(ids, layer, *random_batch(rng, len(ids), 1, args.dtype))
        for layer in range(args.layers)
    ]
    metadata = routing.routed(ids[0])
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # its own connection to the router
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    start, stop = deadlines
    latencies: list[float] = []
    step, items, error = 0, 0, None
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = kvcache_pb2_grpc.KVCacheServiceStub(channel)
        while (sent := time.monotonic()) < stop:
            layer = step % args.layers
            try:
                reply = await stub.AttendBatch(
                    requests[layer], metadata=metadata, timeout=CALL_TIMEOUT
                )
            except grpc.RpcError as err:
                error = f"{ids[0]}: {err.code().name}: {err.details()}"
                break
            done = time.monotonic()
            step += 1
            expected = args.prefill + (step - 1) // args.layers + 1
            if reply.lengths[0] != expected or reply.lengths[-1] != expected:
                error = f"{ids[0]} layer {layer}: length {reply.lengths[0]}, expected {expected}"
                break
            if start <= sent and done <= stop:
                latencies.append(done - sent)
            if start <= done <= stop:
                items += len(ids)
    return {"items": items, "latencies": latencies, "steps": step, "error": error}


async def _client(address: str, groups: list[list[str]], args, barrier, seed: int) -> list:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, barrier.wait, 300)  # all clients start together
    now = time.monotonic()
    deadlines = (now + args.warmup, now + args.warmup + args.seconds)
    return await asyncio.gather(
        *(_drive(address, ids, args, deadlines, seed + i) for i, ids in enumerate(groups))
    )


def client_main(address: str, groups: list[list[str]], args, barrier, results, seed: int):
    """A load process (spawned): its micro-batches' results go to ``results``."""
    try:
        results.put(asyncio.run(_client(address, groups, args, barrier, seed)))
    except BaseException as exc:  # the parent must hear of it, not wait forever
        results.put([{"items": 0, "latencies": [], "steps": 0, "error": repr(exc)}])
        barrier.abort()
        raise


# --- one N ----------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (gone ones count 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (nginx's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError):
            if (
                entry.name.isdigit()
                and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid
            ):
                found.append(int(entry.name))
    return found


def run_load(args, address: str, groups, watch: dict[str, list[int]]) -> dict[str, Any]:
    """The timed phase: ``--clients`` processes share the micro-batches."""
    load_average = os.getloadavg()[0]  # other work on the host shows here
    ctx = mp.get_context("spawn")
    clients = min(args.clients, len(groups))
    barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
    shares = [
        [ids for i, (_, ids) in enumerate(groups) if i % clients == c] for c in range(clients)
    ]
    # daemon: a run that fails here does not wait for its clients at exit.
    procs = [
        ctx.Process(
            target=client_main,
            daemon=True,
            args=(address, shares[c], args, barrier, results, 1000 * (c + 1)),
        )
        for c in range(clients)
    ]
    for p in procs:
        p.start()
    watch = {**watch, "clients": [p.pid for p in procs]}
    barrier.wait(300)
    time.sleep(args.warmup)
    before = {name: cpu_seconds(pids) for name, pids in watch.items()}
    time.sleep(args.seconds)
    cpu = {name: (cpu_seconds(pids) - before[name]) / args.seconds for name, pids in watch.items()}
    drives = [d for _ in procs for d in results.get(timeout=CALL_TIMEOUT + 60)]
    for p in procs:
        p.join(30)
    return {"drives": drives, "cpu": cpu, "load_average_before": load_average}


def run_n(args, n: int, nginx: str, nginx_env: dict[str, str]) -> dict[str, Any]:
    budget = args.total_budget // n
    prefix = Path(args.nginx_prefix) / f"n{n}"
    shutil.rmtree(prefix, ignore_errors=True)
    servers: list[ServerProcess] = []
    router = None
    try:
        for i in range(n):
            servers.append(
                ServerProcess(
                    [
                        "--backend",
                        args.backend,
                        "--memory-budget",
                        str(budget),
                        "--log-level",
                        "WARNING",
                        *args.server_arg,
                    ],
                    name=f"q8kv-{i}",
                )
            )
        router = routing.Router(
            prefix,
            free_port(),
            [s.address for s in servers],
            nginx=nginx,
            env=nginx_env,
            workers=args.nginx_workers,
            user=worker_user(),
        )
        channels = [
            grpc.insecure_channel(
                a,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                ],
            )
            for a in [router.address, *(s.address for s in servers)]
        ]
        router_stub, *direct = (kvcache_pb2_grpc.KVCacheServiceStub(c) for c in channels)
        started = time.monotonic()
        groups, draws = place_groups(args, router_stub, direct)
        prefill(args, router_stub, groups, np.random.default_rng(n))
        setup_s = time.monotonic() - started
        for c in channels:
            c.close()
        watch = {
            "servers": [s.proc.pid for s in servers],
            "nginx": [router.proc.pid, *children(router.proc.pid)],
        }
        load = run_load(args, router.address, groups, watch)
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()
    return summarize(args, n, budget, groups, draws, setup_s, load)


def summarize(args, n, budget, groups, draws, setup_s, load) -> dict[str, Any]:
    drives = load["drives"]
    latencies = np.array([x for d in drives for x in d["latencies"]]) * 1000
    items = sum(d["items"] for d in drives)
    errors = [d["error"] for d in drives if d["error"]]
    steps = sum(d["steps"] for d in drives)
    return {
        "processes": n,
        "memory_budget_per_process": budget,
        "items_per_s": items / args.seconds,
        "calls_per_s": items / args.batch / args.seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "groups_per_process": [sum(1 for owner, _ in groups if owner == i) for i in range(n)],
        "sessions": len(groups) * args.batch,
        "placement_draws": draws,
        "mean_length_at_end": args.prefill + steps / len(drives) / args.layers,
        "server_cpu_cores": load["cpu"]["servers"],
        "nginx_cpu_cores": load["cpu"]["nginx"],
        "client_cpu_cores": load["cpu"]["clients"],
        "load_average_before": load["load_average_before"],
        "setup_s": setup_s,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


# --- the run ----------------------------------------------------------------------------


def machine(backend: str) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
        )
    card = None
    if backend != "numpy" and shutil.which("nvidia-smi"):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        card = done.stdout.splitlines()[0].strip() if done.returncode == 0 else None
    return {
        "card": card,
        "cpu": cpu,
        "cpu_count": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "thread_env": {k: os.environ.get(k) for k in THREAD_VARS},
    }


def tag_of(info: dict[str, Any]) -> str:
    """'NVIDIA H200' -> 'h200'; no card -> 'cpu'."""
    if not info["card"]:
        return "cpu"
    words = [w for w in info["card"].split() if w.upper() != "NVIDIA"]
    return (words[0] if words else "gpu").lower()


def command_line() -> str:
    """How this run was started, the BLAS thread variables (set for CPU runs) included."""
    env = [f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ]
    return " ".join([*env, shlex.join([Path(sys.executable).name, *sys.argv])])


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'procs':>5} {'items/s':>9} {'x N=1':>6} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'srv cores':>9} {'nginx':>6} {'errors':>6}"
    )
    lines = [head, "-" * len(head)]
    base = rows[0]["items_per_s"] or 1.0
    for r in rows:
        p50 = f"{r['p50_ms']:8.2f}" if r["p50_ms"] is not None else f"{'-':>8}"
        p99 = f"{r['p99_ms']:8.2f}" if r["p99_ms"] is not None else f"{'-':>8}"
        lines.append(
            f"{r['processes']:>5} {r['items_per_s']:9.0f} "
            f"{r['items_per_s'] / base:6.2f} {p50} {p99} "
            f"{r['server_cpu_cores']:9.2f} {r['nginx_cpu_cores']:6.2f} {r['errors']:>6}"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    from q8kv.server.config import parse_size

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="numpy", help="numpy | cupy | auto [numpy]")
    p.add_argument("--processes", default="1,2,4", help="values of N [1,2,4]")
    p.add_argument(
        "--total-budget",
        type=parse_size,
        default="8GiB",
        help="the memory budget all N processes share, split evenly [8GiB]",
    )
    p.add_argument(
        "--groups",
        type=int,
        default=8,
        help="micro-batches in flight in all (a multiple of every N) [8]",
    )
    p.add_argument("--batch", type=int, default=64, help="sessions per packed call [64]")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--prefill", type=int, default=1024, help="cache length at the start")
    p.add_argument("--max-len", type=int, default=65536, help="each session's max_len")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--seconds", type=float, default=10.0, help="timed window per N [10]")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument(
        "--clients",
        type=int,
        default=max(1, min(8, os.cpu_count() // 4)),
        help="load processes [cpu count / 4, 1 to 8]",
    )
    p.add_argument("--nginx", help="nginx binary [on PATH or /usr/sbin/nginx]")
    p.add_argument("--nginx-deb-dir", help="unpack these .deb files and use their nginx")
    p.add_argument("--nginx-root", default="/tmp/nginx-root", help="where .debs unpack")
    p.add_argument(
        "--nginx-prefix",
        default="/tmp/nginx-prefix",
        help="nginx prefix (config, pid, logs); one folder per N inside",
    )
    p.add_argument("--nginx-workers", default="auto", help="nginx worker_processes [auto]")
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra q8kv-server argument (repeat it)",
    )
    p.add_argument("--tag", help="the <card|cpu> of the file name [from the machine]")
    p.add_argument("--out", help="write multiprocess-<card|cpu>.json into this folder")
    args = p.parse_args()
    args.processes = [int(x) for x in args.processes.split(",")]
    bad = [n for n in args.processes if n < 1 or args.groups % n]
    if bad:
        p.error(f"--processes: expected divisors of --groups {args.groups}, got {bad}")
    return args


def main() -> None:
    args = parse_args()
    nginx, nginx_env = pick_nginx(args)
    info = machine(args.backend)
    info["nginx"] = nginx_version(nginx, nginx_env)
    rows = []
    for n in args.processes:
        print(f"N = {n} ...", file=sys.stderr, flush=True)
        rows.append(run_n(args, n, nginx, nginx_env))
    print(table(rows))
    failed = [r for r in rows if r["errors"]]
    if failed:
        raise SystemExit(f"calls failed: {[(r['processes'], r['first_error']) for r in failed]}")
    if args.out:
        result = {
            "benchmark": "multiprocess",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": command_line(),
            **info,
            "nginx_binary": nginx,
            "geometry": {"H": H, "KVH": KVH, "D": D, "layers": args.layers},
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "rows": rows,
        }
        write_json(args.out, f"multiprocess-{args.tag or tag_of(info)}.json", result)


if __name__ == "__main__":
    main()
