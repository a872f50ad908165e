"""Shared fixtures: real q8kv servers started as subprocesses on loopback ports.

``Q8KV_TEST_BACKEND`` picks the backend of every server the tests start (default numpy;
set it to cupy on a GPU machine to run the end-to-end suite against the GPU backend).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

TEST_BACKEND = os.environ.get("Q8KV_TEST_BACKEND", "numpy")
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A ``q8kv-server`` subprocess; ``address`` is its gRPC target, ``metrics_url`` its
    /metrics endpoint (None with --metrics-port -1)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        flags = dict(_pairs(args))
        self.metrics_port: int | None = None
        extra = list(args)
        if "--metrics-port" not in flags:
            self.metrics_port = free_port()
            extra += ["--metrics-port", str(self.metrics_port)]
        elif int(flags["--metrics-port"]) >= 0:
            self.metrics_port = int(flags["--metrics-port"])
        if "--backend" not in flags:
            extra += ["--backend", TEST_BACKEND]
        if "--memory-budget" not in flags:
            extra += ["--memory-budget", "256MiB"]
        # Closed in stop(); a context manager cannot span the process lifetime.
        self.log_file = tempfile.NamedTemporaryFile(prefix="q8kv-server-", suffix=".log")  # noqa: SIM115
        cmd = [
            sys.executable, "-m", "q8kv.server",
            "--host", "127.0.0.1", "--port", str(self.port), *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=REPO,
        )
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_url = (
            f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None
        )
        self.wait_serving()

    def channel(self) -> grpc.Channel:
        """A channel to the server (subclasses serving TLS return a secure one)."""
        return grpc.insecure_channel(self.address)

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.logs()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server not SERVING after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


def _pairs(args) -> Iterator[tuple[str, str]]:
    args = list(args)
    for i, a in enumerate(args[:-1]):
        if a.startswith("--"):
            yield a, args[i + 1]


@pytest.fixture
def start_server():
    """Factory: ``start_server("--max-sessions", "2")`` -> a running ServerProcess, stopped
    at the end of the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(*args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """One server shared by a module's tests (each test makes its own sessions)."""
    s = ServerProcess("--quant-error-sample-rate", "1")
    yield s
    s.stop()
