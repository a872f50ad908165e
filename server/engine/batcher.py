"""The dynamic batcher: append jobs queued right behind one another run as one backend
call, up to ``max_items`` items, optionally waiting up to ``max_delay`` seconds for more.
Never past a job of another kind, so order holds.

A large job (a long prefill) runs alone, in chunks, and between its chunks the batcher
takes queued appends of other sessions (``take_interleaved``): a long prompt does not stall
everyone else's decode (chunked prefill, as in vLLM and Sarathi-Serve). Per-session order
holds: a job is passed over, with every later job touching its sessions, when it touches a
session the prefill holds."""

from __future__ import annotations

import time

from .jobs import AppendJob
from .worker import JobQueue


def collect_batch(
    queue: JobQueue, first: AppendJob, max_items: int, max_delay: float, max_tokens: int
) -> list[AppendJob]:
    """``first`` and the append jobs queued right behind it (none past a large one: over
    ``max_tokens`` new tokens, it runs alone)."""
    batch, count = [first], first.count
    wait_until = time.monotonic() + max_delay
    with queue.ready:
        while count < max_items:
            if not queue.jobs:
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or not queue.ready.wait(remaining):
                    break
                continue
            nxt = queue.jobs[0]
            if (
                not isinstance(nxt, AppendJob)
                or count + nxt.count > max_items
                or nxt.tokens > max_tokens
            ):
                break
            batch.append(queue.jobs.popleft())
            count += nxt.count
    return batch


def take_interleaved(
    queue: JobQueue, held: set[tuple[str, str]], max_items: int, max_tokens: int
) -> list[AppendJob]:
    """Queued small appends that touch none of the ``held`` (tenant, session id) keys, nor
    a session of a job passed over before them; up to ``max_items`` items. Stops at the
    first job of another kind (a call may touch any session)."""
    blocked = set(held)
    taken: list[AppendJob] = []
    count = 0
    with queue.ready:
        for job in list(queue.jobs):
            if not isinstance(job, AppendJob):
                break
            keys = {(job.tenant, sid) for sid in job.session_ids()}
            if keys & blocked or job.tokens > max_tokens or count + job.count > max_items:
                blocked |= keys
                continue
            queue.jobs.remove(job)
            taken.append(job)
            count += job.count
    return taken
