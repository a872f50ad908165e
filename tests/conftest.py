"""Shared fixtures: real q8kv servers started as subprocesses on loopback ports (the
subprocess itself is ``harness.server.ServerProcess``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness.server import ServerProcess


@pytest.fixture
def start_server():
    """Factory: ``start_server("--max-sessions", "2")`` -> a running ServerProcess, stopped
    at the end of the test (keyword arguments go to ServerProcess: env, credentials,
    wait)."""
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        server = ServerProcess(*args, **kwargs)
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
