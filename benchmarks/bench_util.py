"""What the service benchmarks share: a q8kv-server subprocess on loopback and the JSON
result file. (Scripts import it as a sibling: ``python benchmarks/<script>.py``.)"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m q8kv.server`` on a free loopback port with ``flags``; waits until
    its health service says SERVING. ``metrics_url`` is set when ``metrics=True``."""

    def __init__(self, flags: list[str], name: str = "q8kv", metrics: bool = True,
                 wait_seconds: float = 120.0) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url: str | None = None
        if metrics:
            metrics_port = free_port()
            flags = [*flags, "--metrics-port", str(metrics_port)]
            self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log")  # noqa: SIM115
        cmd = [sys.executable, "-m", "q8kv.server", "--host", "127.0.0.1",
               "--port", str(self.port), *flags]
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

    def metric(self, name: str) -> float:
        """Sum of every sample named ``name`` on the server's /metrics."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as reply:
            text = reply.read().decode()
        return sum(
            s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == name
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def write_json(out: str | Path, filename: str, result: dict) -> Path:
    """Write ``result`` as ``out/filename`` (creating ``out``) and say where."""
    directory = Path(out)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / filename
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
