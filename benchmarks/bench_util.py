"""What the service benchmarks share: a q8kv-server subprocess on loopback, a bare gRPC
echo server subprocess, the machine's description and the JSON result file. (Scripts import
it as a sibling: ``python benchmarks/<script>.py``.)"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from q8kv.v1 import kvcache_pb2

REPO = Path(__file__).resolve().parent.parent
Q8KV_SERVICE = kvcache_pb2.DESCRIPTOR.services_by_name["KVCacheService"].full_name
ECHO_SERVICE = "q8kv.bench.Echo"
MAX_MESSAGE = 512 * 1024 * 1024  # the q8kv server's default --max-message-bytes
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def q8kv_method(name: str) -> str:
    """A q8kv RPC's path, for calls with raw bytes both ways (as the echo is called)."""
    return f"/{Q8KV_SERVICE}/{name}"


def stop_process(proc: subprocess.Popen, seconds: float) -> None:
    """SIGTERM, up to ``seconds`` for a clean exit, then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# A CPU-bound loop for idle_spinners: pinned to one CPU, at the lowest scheduling class.
_SPIN = (
    "import os, sys\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
    "while True:\n"
    "    pass\n"
)


@contextlib.contextmanager
def idle_spinners(enabled: bool = True):
    """While the block runs, one busy loop per CPU at SCHED_IDLE (Linux): a CPU with
    nothing to do spins instead of halting, so a VM's vCPU keeps its core, and its caches,
    between calls; any other thread preempts a loop at once. What a host tuned for latency
    (guest halt-polling, ``idle=poll``) gives, for comparing against it."""
    if not enabled:
        yield
        return
    cpus = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN, str(cpu)]) for cpu in cpus]
    try:
        yield
    finally:
        for proc in procs:
            stop_process(proc, 2.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pause(seconds: float, spin: bool = False) -> None:
    """Wait ``seconds`` before a timed call, as a server waits for its next one: asleep, or
    with ``spin`` busy on the CPU (which then never idles)."""
    if spin:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
    elif seconds:
        time.sleep(seconds)


def median_us(fn, reps: int, wait: float = 0.0, spin: bool = False) -> float:
    """Median wall microseconds of ``reps`` calls of ``fn()``; with ``wait``, each call
    is preceded by ``pause(wait, spin)``, untimed (as a server waits between calls)."""
    times = []
    for _ in range(reps):
        pause(wait, spin)
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


@contextlib.contextmanager
def server_hooks(canned: bool = False, stages_file: str | None = None):
    """The environment a server started inside this block gets: benchmarks/server_hooks on
    its PYTHONPATH, with ``canned`` its numpy backend answering at once, with ``stages_file``
    its pieces timed (server_hooks/sitecustomize.py). Restored on leaving; nothing changes
    when neither is asked for."""
    if not canned and not stages_file:
        yield
        return
    hooks = {"Q8KV_BENCH_CANNED": "1" if canned else None, "Q8KV_BENCH_STAGES": stages_file}
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", *hooks)}
    folder = str(Path(__file__).resolve().parent / "server_hooks")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, saved["PYTHONPATH"]]))
    try:
        for key, value in hooks.items():
            if value is not None:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ServerProcess:
    """``python -m q8kv.server`` on a free loopback port with ``flags``; waits until
    its health service says SERVING. ``metrics_url`` is set when ``metrics=True``."""

    def __init__(
        self,
        flags: list[str],
        name: str = "q8kv",
        metrics: bool = True,
        wait_seconds: float = 120.0,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url: str | None = None
        if metrics:
            metrics_port = free_port()
            flags = [*flags, "--metrics-port", str(metrics_port)]
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "q8kv.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *flags,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            self._wait_serving(wait_seconds)
        except BaseException:
            self.stop()
            raise

    def _wait_serving(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} server exited:\n{self.logs()}")
                with contextlib.suppress(grpc.RpcError):
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise SystemExit(f"{self.name} server not serving after {limit}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def samples(self, name: str) -> list:
        """Every sample named ``name`` on the server's /metrics (with its labels)."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        return [
            s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
        ]

    def metric(self, name: str) -> float:
        """Sum of every sample named ``name`` on the server's /metrics."""
        return sum(s.value for s in self.samples(name))

    def build_info(self) -> dict[str, str]:
        """version, backend and device, as the server reports them (q8kv_build_info)."""
        found = self.samples("q8kv_build_info")
        return dict(found[0].labels) if found else {}

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


class EchoProcess:
    """A bare grpc.aio server in its own process: a generic handler with identity
    serializers (bytes pass through untouched, no protobuf). Method ``/q8kv.bench.Echo/<name>``
    answers a pre-built payload of ``responses[name]`` bytes, whatever it receives; the
    floor the transport allows for a call of those request and response sizes."""

    def __init__(self, responses: dict[str, int], wait_seconds: float = 60.0) -> None:
        self.responses = responses
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        sizes = [f"{name}={size}" for name, size in responses.items()]
        cmd = [sys.executable, str(Path(__file__).resolve()), "echo", str(self.port), *sizes]
        self.log = tempfile.NamedTemporaryFile(prefix="echo-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready(wait_seconds)
        except BaseException:
            self.stop()
            raise

    def path(self, name: str) -> str:
        return f"/{ECHO_SERVICE}/{name}"

    def _wait_ready(self, limit: float) -> None:
        name = next(iter(self.responses))
        deadline = time.monotonic() + limit
        with grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(self.path(name))
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise SystemExit(f"echo server exited:\n{self.logs()}")
                with contextlib.suppress(grpc.RpcError):
                    if len(call(b"ready", timeout=1)) == self.responses[name]:
                        return
                time.sleep(0.1)
        raise SystemExit(f"echo server not ready after {limit}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc, 15)
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()


async def serve_echo(port: int, responses: dict[str, int]) -> None:
    """The echo server itself (``python bench_util.py echo PORT name=bytes ...``)."""

    def answer(payload: bytes):
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return payload

        return grpc.unary_unary_rpc_method_handler(echo)  # no (de)serializers: raw bytes

    handlers = {name: answer(os.urandom(size)) for name, size in responses.items()}
    server = grpc.aio.server(options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(backend: str, device: str) -> dict:
    """Where a result was measured: card (or CPU), cores, versions, date."""
    import numpy as np

    return {
        "backend": backend,
        "device": device,
        "cpu_model": cpu_model(),
        "cpus": len(os.sched_getaffinity(0)),
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "grpcio": grpc.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def card_slug(backend: str, device: str) -> str:
    """``cpu`` on the numpy backend; else the card's model, short (NVIDIA H200 -> h200)."""
    if backend != "cupy":
        return "cpu"
    model = re.search(r"\b[A-Z]{1,3}\d{2,4}[A-Za-z]*\b", device)
    return (model.group(0) if model else re.sub(r"[^A-Za-z0-9]+", "-", device)).lower()


def write_json(out: str | Path, filename: str, result: dict) -> Path:
    """Write ``result`` as ``out/filename`` (creating ``out``) and say where."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def _main() -> None:
    parser = argparse.ArgumentParser(description="bench_util helpers")
    parser.add_argument("what", choices=["echo"])
    parser.add_argument("port", type=int)
    parser.add_argument("responses", nargs="+", help="method=response_bytes")
    args = parser.parse_args()
    sizes = dict(item.split("=", 1) for item in args.responses)
    asyncio.run(serve_echo(args.port, {name: int(size) for name, size in sizes.items()}))


if __name__ == "__main__":
    _main()
