"""Deadlines: a call whose deadline passes while it waits in the engine's queue (behind a
big prefill of another session) appends nothing; one with time to spare, queued behind the
same work, lands."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.rpc import SERVICE
from harness.scrape import Samples, scrape
from harness.server import TEST_BACKEND
from harness.tensors import qkv

from q8kv.client import Client, Q8KVError

BIG = Geo(num_layers=1, num_heads=32, num_kv_heads=8, head_dim=128, max_len=4096)
SMALL = Geo(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=64)
PREFILL = 2560  # numpy backend: about 2 s of (chunked, causal) attention on one core


def wait_started(url: str, method: str, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = Samples(scrape(url)).value_or_zero(
            "grpc_server_started_total", grpc_service=SERVICE, grpc_method=method
        )
        if started >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{method} not started {count} times within {timeout}s")


@pytest.mark.skipif(
    TEST_BACKEND != "numpy",
    reason="holds the engine with ~2 s of numpy attention; a GPU finishes it in ms "
    "(the deadline check is in the engine, the same for every backend)",
)
def wait_claimed(url: str, jobs: int, timeout: float = 30.0) -> None:
    """Until the engine has claimed ``jobs`` append jobs (each observes its queue wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Samples(scrape(url)).value_or_zero("q8kv_queue_seconds_count") >= jobs:
            return
        time.sleep(0.02)
    raise AssertionError(f"{jobs} append jobs not claimed within {timeout}s")


def test_deadline_expired_in_the_queue_appends_nothing(start_server):
    # The prefill in one piece: in chunks, a small call queued behind it could run between
    # two of them, before its deadline.
    srv = start_server("--batching", "on", "--prefill-chunk-tokens", str(PREFILL))
    rng = np.random.default_rng(0)
    with Client(srv.address, timeout=120) as c:
        big = c.create_session(**BIG)
        small = c.create_session(**SMALL)
        spare = c.create_session(**SMALL)
        q, k, _ = qkv(rng, PREFILL, BIG)
        busy = {}

        def prefill() -> None:
            started = time.monotonic()
            big.append_and_attend(0, q, k, k)
            busy["seconds"] = time.monotonic() - started
            busy["done"] = time.monotonic()

        worker = threading.Thread(target=prefill)
        worker.start()
        # Wait until the engine has claimed the prefill (after the decode and validation of
        # its ~60 MB): from then on it holds the engine until it is done.
        wait_started(srv.metrics_url, "AppendAndAttend", 1)
        wait_claimed(srv.metrics_url, 1)
        tq, tk, _ = qkv(rng, 1, SMALL)
        late_result = {}

        def patient() -> None:  # queued behind the prefill too, with time to spare
            with Client(srv.address, timeout=120) as c2:
                late_result["length"] = c2.session(spare.id).append_and_attend(
                    1, tq, tk, tk, with_length=True
                ).length

        waiter = threading.Thread(target=patient)
        waiter.start()
        with Client(srv.address, timeout=0.3) as hurried:
            sent = time.monotonic()
            with pytest.raises(Q8KVError) as err:
                hurried.session(small.id).append_and_attend(0, tq, tk, tk)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - sent < 2.0
        worker.join(120)
        waiter.join(120)
        # The test means something only if the prefill outlasted the short deadline.
        assert busy["done"] > sent + 0.3, busy
        assert late_result == {"length": 1}
        assert small.info().layer_lengths == [0, 0]
        keys, values = small.dequantize(0)
        assert keys.shape == (2, 0, 64) and values.shape == (2, 0, 64)
        # The session is fine for the next call: the rejected item left no trace.
        out = small.append_and_attend(0, tq, tk, tk, with_length=True)
        assert out.length == 1
        assert big.info().layer_lengths == [PREFILL]
