"""Waiting for a server's log to say something."""

from __future__ import annotations

import time
from typing import Protocol


class HasLogs(Protocol):
    def logs(self) -> str: ...


def wait_for_log(server: HasLogs, text: str, count: int = 1, timeout: float = 10.0) -> str:
    """The whole log once ``text`` appears ``count`` times in it (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = server.logs()
        if logs.count(text) >= count:
            return logs
        time.sleep(0.05)
    raise AssertionError(f"{text!r} x{count} not logged within {timeout}s:\n{server.logs()}")
