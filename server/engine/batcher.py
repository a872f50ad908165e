"""The dynamic batcher: append jobs queued right behind one another run as one backend
call, up to ``max_items`` items, optionally waiting up to ``max_delay`` seconds for more.
Never past a job of another kind, so order holds."""

from __future__ import annotations

import time

from .jobs import AppendJob
from .worker import JobQueue


def collect_batch(
    queue: JobQueue, first: AppendJob, max_items: int, max_delay: float
) -> list[AppendJob]:
    """``first`` and the append jobs queued right behind it."""
    batch, count = [first], len(first.items)
    wait_until = time.monotonic() + max_delay
    with queue.ready:
        while count < max_items:
            if not queue.jobs:
                remaining = wait_until - time.monotonic()
                if remaining <= 0 or not queue.ready.wait(remaining):
                    break
                continue
            nxt = queue.jobs[0]
            if not isinstance(nxt, AppendJob) or count + len(nxt.items) > max_items:
                break
            batch.append(queue.jobs.popleft())
            count += len(nxt.items)
    return batch
