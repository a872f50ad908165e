"""Soak (bounded): 16 clients create, append, read and delete sessions in a loop.
No call fails, and afterwards the pool's used bytes and the session count are back where
they started, and the server's resident memory is within a stated slack of what it was
after a warm-up of the same load.

``Q8KV_SOAK_SECONDS`` sets the measured part (default 30; a warm-up of 10 s comes first).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
from harness.geometry import Geo
from harness.proc import rss_bytes
from harness.scrape import metric
from harness.tensors import qkv

from q8kv.client import Client

CLIENTS = 16
WARMUP_SECONDS = 10.0
SOAK_SECONDS = float(os.environ.get("Q8KV_SOAK_SECONDS", "30"))
# After the warm-up the pool's pages are touched and Python's allocator has its arenas;
# what is left is noise (gRPC buffers, allocator fragmentation). A leak of one session's
# state per loop would exceed this many times over (thousands of loops run).
RSS_SLACK_BYTES = 16 * 1024 * 1024  # measured: ~4 MiB of growth over 2,400 loops


def workload(address: str, index: int, stop: threading.Event, counts: list, errors: list):
    rng = np.random.default_rng(index)
    try:
        with Client(address, timeout=30) as c:
            while not stop.is_set():
                layers = int(rng.integers(1, 3))
                geo = Geo(num_layers=layers, num_heads=8, num_kv_heads=2, head_dim=64,
                          max_len=512)
                s = c.create_session(**geo)
                length = 0
                for n in (int(rng.integers(1, 64)), 1, 1, 1):
                    q, k, _ = qkv(rng, n, geo)
                    for layer in range(layers):
                        result = s.append_and_attend(layer, q, k, k, with_length=True)
                        assert result.length == length + n
                        assert np.isfinite(result.output).all()
                    length += n
                keys, _ = s.dequantize(layers - 1)
                assert keys.shape == (2, length, 64)
                assert s.info().layer_lengths == [length] * layers
                if rng.random() < 0.3:
                    s.truncate(length // 2)
                assert s.delete() > 0
                counts[index] += 1
    except BaseException as exc:
        errors.append(exc)


def run_load(address: str, seconds: float) -> int:
    stop = threading.Event()
    counts, errors = [0] * CLIENTS, []
    threads = [
        threading.Thread(target=workload, args=(address, i, stop, counts, errors))
        for i in range(CLIENTS)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert all(counts), counts  # every client got through at least one loop
    return sum(counts)


def test_soak(start_server):
    srv = start_server()
    start_used = metric(srv.metrics_url, "q8kv_pool_used_bytes")
    start_sessions = metric(srv.metrics_url, "q8kv_sessions_active")
    assert (start_used, start_sessions) == (0, 0)

    warm_loops = run_load(srv.address, WARMUP_SECONDS)
    assert metric(srv.metrics_url, "q8kv_sessions_active") == start_sessions
    warm_rss = rss_bytes(srv.proc.pid)

    loops = run_load(srv.address, SOAK_SECONDS)
    assert loops >= 5 * CLIENTS, loops
    assert metric(srv.metrics_url, "q8kv_pool_used_bytes") == start_used
    assert metric(srv.metrics_url, "q8kv_sessions_active") == start_sessions
    rss = rss_bytes(srv.proc.pid)
    print(f"soak: {warm_loops} warm-up loops, {loops} loops; RSS {warm_rss / 2**20:.1f} MiB "
          f"after warm-up, {rss / 2**20:.1f} MiB after")
    assert rss <= warm_rss + RSS_SLACK_BYTES, (warm_rss, rss)
    assert srv.proc.poll() is None
    assert "rpc_error" not in srv.logs() and "Traceback" not in srv.logs()
