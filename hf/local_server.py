"""A q8kv server of one's own, as a subprocess on a free loopback port, for the demo and
the accuracy benchmark when no --target is given. Runs ``python -m q8kv.server`` (a
command, not an import: q8kv.hf never imports the server)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from q8kv.client import Client, Q8KVError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """``q8kv-server --backend BACKEND`` on 127.0.0.1; ``address`` is its target. Waits
    until its health service says SERVING; ``stop()`` (or the ``with`` block) ends it."""

    def __init__(self, backend: str = "numpy", memory_budget: str = "1GiB",
                 wait_seconds: float = 120.0) -> None:
        self.address = f"127.0.0.1:{_free_port()}"
        self.log = tempfile.NamedTemporaryFile(prefix="q8kv-hf-server-", suffix=".log")  # noqa: SIM115
        command = [
            sys.executable, "-m", "q8kv.server", "--host", "127.0.0.1",
            "--port", self.address.rpartition(":")[2], "--backend", backend,
            "--memory-budget", memory_budget, "--metrics-port", "-1",
        ]
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            self._wait(wait_seconds)
        except BaseException:
            self.stop()
            raise

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with Client(self.address, timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"q8kv server exited {self.proc.returncode}:\n{self.logs()}"
                    )
                try:
                    if client.health() == "SERVING":
                        return
                except Q8KVError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"q8kv server not SERVING after {seconds}s:\n{self.logs()}")

    def logs(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
