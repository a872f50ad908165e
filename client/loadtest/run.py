"""The load of q8kv-loadtest: virtual orchestrators driving sessions like model runners do.

Each orchestrator owns ``in_flight`` micro-batches of ``batch`` sessions each. A micro-
batch's sequence is: prefill ``prefill`` tokens (one call per layer, its sessions as the
call's items, or with ``packed`` as one AttendBatch), then ``steps`` decode steps, each one
call per layer with one token per session; then the sessions are truncated to 0 and the
next sequence starts (the truncation waits until that sequence's first call is admitted: a
run that ends between sequences leaves the sessions as its last call did). The calls of one
micro-batch are sequential (a layer's output feeds the next layer in a real model); an
orchestrator's micro-batches run at once (a runner overlaps one micro-batch's attention
with the rest of the layer for another), and ``concurrency`` orchestrators run at once.
Closed loop: each micro-batch calls again as soon as its call returns. Open loop: calls
start on a fixed schedule (``rate`` per second) shared by all; a call whose slot comes
while every micro-batch is busy starts late, and is counted. A packed call larger than
``max_message_bytes`` is split by the client into calls that fit (and still counts as one
call).

A failed call changes nothing on the server (all or none; a split packed call may have
applied its first parts), and after a client-side timeout or a broken stream the client
cannot know, so after any error the micro-batch resets its sessions (truncate to 0, or
create them again if they are gone) and starts a new sequence: the local verification
copy always equals the server's cache.

Here: Orchestrator (one runner) and delete_sessions (the clean-up); a micro-batch's loop is
in microbatch.py; the spec and the state all of them share are in state.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import grpc

from q8kv.client import AsyncClient, AsyncStream, Q8KVError

from .microbatch import MicroBatch
from .state import Shared


class Orchestrator:
    """One virtual model runner: ``in_flight`` micro-batches of ``batch`` sessions each,
    every one running its own sequence at once (as a runner overlaps the attention of one
    micro-batch with the rest of the layer for another), over one client and, with
    --streaming, one stream they share."""

    def __init__(self, index: int, client: AsyncClient, shared: Shared) -> None:
        self.index = index
        self.client = client
        self.shared = shared
        self.stream: AsyncStream | None = None
        self.micro_batches = [MicroBatch(self, lane) for lane in range(shared.spec.in_flight)]

    @property
    def session_ids(self) -> list[str]:
        return [sid for mb in self.micro_batches for sid in mb.session_ids]

    async def create(self) -> None:
        for mb in self.micro_batches:
            await mb.create()

    async def first_prefill(self) -> None:
        """--untimed-prefill: each micro-batch's first prefill, one after another."""
        for mb in self.micro_batches:
            await mb.first_prefill()

    async def run(self, skip_first_prefill: bool) -> None:
        """Every micro-batch's loop at once; a bug in one stops the others."""
        async with asyncio.TaskGroup() as group:
            for mb in self.micro_batches:
                group.create_task(mb.run(skip_first_prefill))

    def open_stream(self) -> AsyncStream:
        if self.stream is None:
            self.stream = self.client.stream(self.micro_batches[0].session_ids[0])
        return self.stream

    async def close_stream(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.close(), 2.0)


async def delete_sessions(client: AsyncClient, shared: Shared, timeout: float = 5.0) -> int:
    """Delete every session the run made; returns how many could not be deleted. Gives up
    at the first UNAVAILABLE (the server is gone: every other try would wait too)."""
    semaphore = asyncio.Semaphore(32)
    gone = asyncio.Event()

    async def delete(sid: str) -> None:
        if gone.is_set():
            return
        async with semaphore:
            try:
                await asyncio.wait_for(client.delete_session(sid), timeout)
                shared.sessions.discard(sid)
            except Q8KVError as exc:
                if exc.code == grpc.StatusCode.NOT_FOUND:
                    shared.sessions.discard(sid)
                elif exc.code == grpc.StatusCode.UNAVAILABLE:
                    gone.set()
            except TimeoutError:
                gone.set()

    await asyncio.gather(*(delete(sid) for sid in list(shared.sessions)))
    return len(shared.sessions)


ProgressHook = Callable[[Shared], None]
