"""Graceful shutdown: once draining, new calls get UNAVAILABLE from the front door (a clear
message, before gRPC's own shutdown could cancel them), further messages of open streams
are answered UNAVAILABLE unapplied (the servicer checks ``draining`` per message), and the
server waits for the calls in flight to finish. The health service is exempt: it must keep
answering NOT_SERVING."""

from __future__ import annotations

import asyncio

EXEMPT_PREFIX = "/grpc.health.v1.Health/"


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Start draining; True if every call in flight finished within ``timeout``."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()
