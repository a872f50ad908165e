"""Real q8kv servers as subprocesses on loopback ports.

``Q8KV_TEST_BACKEND`` picks the backend of every server the tests start (default numpy;
set it to cupy on a GPU machine to run the end-to-end suites against the GPU backend).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.proc import stop_process

TEST_BACKEND = os.environ.get("Q8KV_TEST_BACKEND", "numpy")
REPO = Path(__file__).resolve().parents[2]


_START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_socket() -> socket.socket:
    """A socket listening on a free loopback port: a port some other program holds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def server_command(*flags: str) -> list[str]:
    """The q8kv-server command line on 127.0.0.1 with ``flags``."""
    return [sys.executable, "-m", "q8kv.server", "--host", "127.0.0.1", *flags]


def run_server(
    *flags: str, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess:
    """Run a server to its exit (a start that must fail): status, stdout and stderr."""
    return subprocess.run(
        server_command(*flags), capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, **(env or {})},
    )


class ServerProcess:
    """A ``q8kv-server`` subprocess; ``address`` is its gRPC target, ``metrics_url`` its
    /metrics endpoint (None with --metrics-port -1).

    Unless ``args`` say otherwise it gets a free metrics port, the test backend and a
    256 MiB budget. ``credentials`` (a TLS server): the channels to it are secure ones.
    ``wait=False`` returns without waiting for SERVING (a start that may never serve; call
    ``wait_serving`` later). A start that fails kills the process and closes its log.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        wait: bool = True,
        start_timeout: float = 60.0,
    ) -> None:
        self.credentials = credentials
        # The ports are picked free, then bound by the server a moment later: another
        # process (an outgoing connection's ephemeral port) may take one in between. Such a
        # start is tried again on new ports; any other failure is the test's.
        for attempt in range(_START_ATTEMPTS):
            self._spawn(args, env)
            try:
                if wait:
                    self.wait_serving(start_timeout)
                return
            except RuntimeError:
                lost = attempt + 1 < _START_ATTEMPTS and self._lost_a_picked_port(args)
                self.kill()
                if not lost:
                    raise
            except BaseException:
                self.kill()
                raise

    def _spawn(self, args: Sequence[str], env: dict[str, str] | None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.metrics_port, extra = _defaults(args)
        self.metrics_url = (
            f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else None
        )
        # Closed in stop(); a context manager cannot span the process lifetime.
        self.log_file = tempfile.NamedTemporaryFile(prefix="q8kv-server-", suffix=".log")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                server_command("--port", str(self.port), *args, *extra),
                stdout=self.log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=REPO,
            )
        except BaseException:
            self.log_file.close()
            raise

    def _lost_a_picked_port(self, args: Sequence[str]) -> bool:
        """Whether the server exited because a port this harness picked was taken."""
        flags = dict(_pairs(args))
        picked = [] if "--port" in flags else [self.port]
        if "--metrics-port" not in flags and self.metrics_port:
            picked.append(self.metrics_port)
        log = self.logs()
        return "in use" in log and any(f"127.0.0.1:{port} " in log for port in picked)

    def channel(self) -> grpc.Channel:
        """A channel to the server: secure when it serves TLS."""
        if self.credentials is not None:
            return grpc.secure_channel(self.address, self.credentials)
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
        """SIGTERM (SIGKILL after ``timeout`` s), then close the log; the exit status."""
        status = stop_process(self.proc, timeout)
        self.log_file.close()
        return status

    def kill(self) -> None:
        """SIGKILL, then close the log."""
        self.proc.kill()  # a no-op once the process has exited
        self.proc.wait()
        self.log_file.close()


def _defaults(args: Sequence[str]) -> tuple[int | None, list[str]]:
    """(the metrics port or None, the flags to add to ``args``) for the test defaults."""
    flags = dict(_pairs(args))
    extra: list[str] = []
    if "--metrics-port" not in flags:
        metrics_port: int | None = free_port()
        extra += ["--metrics-port", str(metrics_port)]
    else:
        metrics_port = int(flags["--metrics-port"]) if int(flags["--metrics-port"]) >= 0 else None
    if "--backend" not in flags:
        extra += ["--backend", TEST_BACKEND]
    if "--memory-budget" not in flags:
        extra += ["--memory-budget", "256MiB"]
    return metrics_port, extra


def _pairs(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    args = list(args)
    for i, a in enumerate(args[:-1]):
        if a.startswith("--"):
            yield a, args[i + 1]
