"""The dynamic batcher through a real server: concurrent calls coalesce into one launch,
every result stays exact, the calls on one session keep their order, and ``--batching
off`` runs every call alone.

``--max-queue-delay-us 2000`` makes the worker wait up to 2 ms for more calls, so calls
sent together reliably meet in one batch even on a loaded CI machine.
"""

from __future__ import annotations

import asyncio

import numpy as np
from harness.geometry import Geo
from harness.scrape import Samples, scrape
from harness.tensors import qkv
from reference import attention_ref, rel_l2

from q8kv import format as q8
from q8kv.client import AsyncClient

GEO = Geo(num_layers=1, num_heads=8, num_kv_heads=2, head_dim=64, max_len=256)
D = GEO.head_dim
SESSIONS = 24


def batch_histogram(server) -> tuple[dict[float, float], float, float]:
    """(le -> cumulative count, _sum, _count) of q8kv_batch_items."""
    samples = Samples(scrape(server.metrics_url))
    return (
        dict(samples.buckets("q8kv_batch_items")),
        samples.get("q8kv_batch_items_sum"),
        samples.get("q8kv_batch_items_count"),
    )


async def concurrent_rounds(address: str, rounds: int, seed: int = 7) -> list[tuple]:
    """SESSIONS sessions, each sent ``rounds`` calls; every round's calls go out at once.
    Returns (session, q, output, length) for every call."""
    rng = np.random.default_rng(seed)
    async with AsyncClient(address, timeout=30.0) as c:
        sessions = await asyncio.gather(*(c.create_session(**GEO) for _ in range(SESSIONS)))
        calls = []
        for r in range(rounds):
            n = 5 if r == 0 else 1  # a prefill, then decode steps
            inputs = [qkv(rng, n, GEO) for _ in sessions]
            results = await asyncio.gather(*(
                s.append_and_attend(0, q, k, v, with_length=True)
                for s, (q, k, v) in zip(sessions, inputs, strict=True)
            ))
            calls += [(s, q, res.output, res.length)
                      for s, (q, _, _), res in zip(sessions, inputs, results, strict=True)]
        caches = {s.id: await s.dequantize(0) for s in sessions}
        for s in sessions:
            await s.delete()
    return [(caches[s.id], q, out, length) for s, q, out, length in calls]


def test_concurrent_calls_coalesce_and_stay_exact(start_server):
    server = start_server("--batching", "on", "--max-queue-delay-us", "2000")
    calls = asyncio.run(concurrent_rounds(server.address, rounds=6))
    buckets, total, count = batch_histogram(server)
    assert total == SESSIONS * 6  # every item went through the device once
    assert total > count, f"no batch > 1: {count} launches for {total} items"
    assert buckets[1.0] < count  # at least one launch had 2 or more items
    for (keys, values), q, out, length in calls:
        ref = attention_ref(q, keys, values, length - q.shape[0], 1.0 / np.sqrt(D))
        assert rel_l2(out, ref) < 1e-5


def test_batching_off_runs_every_call_alone(start_server):
    server = start_server("--batching", "off", "--max-queue-delay-us", "2000")
    calls = asyncio.run(concurrent_rounds(server.address, rounds=3))
    buckets, total, count = batch_histogram(server)
    assert total == count == SESSIONS * 3
    assert buckets[1.0] == count  # every launch had exactly one item
    for (keys, values), q, out, length in calls:
        ref = attention_ref(q, keys, values, length - q.shape[0], 1.0 / np.sqrt(D))
        assert rel_l2(out, ref) < 1e-5


def test_concurrent_appends_to_one_session_keep_their_order(start_server):
    """Many appends to one session in flight at once, from one AsyncClient: they coalesce,
    yet the server applies each whole, one after another, in the order they reach it. (gRPC
    does not order concurrent calls: on a loaded host a later call can reach the server
    first, so the order checked is the one the lengths report; a client that needs its own
    order keeps one call in flight per session, or sends them on one stream.)"""
    server = start_server("--batching", "on", "--max-queue-delay-us", "2000")
    calls = 48
    rng = np.random.default_rng(11)
    inputs = [qkv(rng, 1 + i % 3, GEO) for i in range(calls)]  # mixed sizes: order shows in lengths

    async def go():
        async with AsyncClient(server.address, timeout=30.0) as c:
            s = await c.create_session(**GEO)
            # Tasks start in creation order; each sends its call at its first step.
            tasks = [asyncio.ensure_future(s.append_and_attend(0, q, k, v, with_length=True))
                     for q, k, v in inputs]
            results = await asyncio.gather(*tasks)
            cache = await s.dequantize(0)
            await s.delete()
            return results, cache

    results, (keys, values) = asyncio.run(go())
    sizes = [q.shape[0] for q, _, _ in inputs]
    # Applied one after another: each call's tokens start where the one before ended.
    applied = sorted(range(calls), key=lambda i: results[i].length)
    ends = [results[i].length for i in applied]
    assert ends == list(np.cumsum([sizes[i] for i in applied]))
    # The cache holds every call's tokens in that order, exactly as quantized.
    sent_k = np.concatenate([inputs[i][1] for i in applied]).transpose(1, 0, 2)  # [KVH, T, D]
    sent_v = np.concatenate([inputs[i][2] for i in applied]).transpose(1, 0, 2)
    np.testing.assert_array_equal(keys, q8.dequantize(*q8.quantize(sent_k)))
    np.testing.assert_array_equal(values, q8.dequantize(*q8.quantize(sent_v)))
    for (q, _, _), r in zip(inputs, results, strict=True):
        ref = attention_ref(q, keys, values, r.length - q.shape[0], 1.0 / np.sqrt(D))
        assert rel_l2(r.output, ref) < 1e-5
    _, total, count = batch_histogram(server)
    assert total > count  # they did share launches
