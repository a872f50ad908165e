"""Holding an Engine's worker busy, so that calls queued meanwhile meet in one batch.

The hold is submitted from a thread of its own: an idle engine may run a job inline on the
submitting event loop, and the test's loop must stay free to queue its calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

TIMEOUT = 20.0


class Hold:
    """A job that occupies the engine's worker until ``release()`` (or ``timeout`` s)."""

    def __init__(self, engine, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.gate, self.started = threading.Event(), threading.Event()
        self.thread = threading.Thread(
            target=lambda: asyncio.run(engine.call(self._hold)), daemon=True
        )
        self.thread.start()

    def _hold(self) -> None:
        self.started.set()
        self.gate.wait(self.timeout)

    def release(self) -> None:
        self.gate.set()


def hold_engine(engine, timeout: float = TIMEOUT) -> threading.Event:
    """Keep the engine's worker busy until the returned event is set."""
    hold = Hold(engine, timeout)
    assert hold.started.wait(timeout)
    return hold.gate


@asynccontextmanager
async def engine_held(engine, timeout: float = TIMEOUT) -> AsyncIterator[None]:
    """``async with engine_held(engine):`` the worker runs nothing else inside the block;
    on leaving it, the worker is released and the hold's thread joined."""
    hold = Hold(engine, timeout)
    try:
        assert await asyncio.to_thread(hold.started.wait, timeout)
        yield
    finally:
        hold.release()
        await asyncio.to_thread(hold.thread.join, timeout)
