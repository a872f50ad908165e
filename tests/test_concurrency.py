"""Concurrency: 8 clients (own connections, threads) append to one session at once, each
call with its own token count. Every token lands exactly once, each call's tokens sit
together in the order sent (no call is split or interleaved), and every call's output is
attention over exactly the tokens before it."""

from __future__ import annotations

import threading
from collections import Counter

import numpy as np
from harness.geometry import Geo
from reference import attention_ref, rel_l2

from q8kv.client import Client

CLIENTS = 8
CALLS = 12
GEOM = Geo(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=8192)
SIZES = [1, 2, 3, 5, 8, 13, 1, 4]  # tokens per call: client i starts at SIZES[i]


def tagged_keys(client: int, first_seq: int, n: int) -> np.ndarray:
    """Keys [n, KVH, D] whose Q8 form is exact (block max 127, so d = 1) and names its
    token: dim 0 = 127, dim 1 = client, dims 2-3 = sequence number in base 127."""
    k = np.zeros((n, GEOM.num_kv_heads, GEOM.head_dim), np.float32)
    seq = np.arange(first_seq, first_seq + n)
    k[:, :, 0] = 127
    k[:, :, 1] = client
    k[:, :, 2] = (seq % 127)[:, None]
    k[:, :, 3] = (seq // 127)[:, None]
    return k


def test_eight_clients_append_to_one_session(start_server):
    srv = start_server()
    with Client(srv.address) as owner:
        session = owner.create_session(**GEOM, session_id="shared-by-eight")
    barrier = threading.Barrier(CLIENTS)
    calls: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, int]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(index: int) -> None:
        rng = np.random.default_rng(index)
        # A local subchannel pool: each client its own TCP connection.
        options = [("grpc.use_local_subchannel_pool", 1)]
        try:
            with Client(srv.address, timeout=60, options=options) as c:
                s = c.session(session.id)
                stream = c.stream(session.id) if index >= 6 else None  # two use the stream
                seq = 0
                barrier.wait()
                for call in range(CALLS):
                    n = SIZES[(index + call) % len(SIZES)]
                    q = (rng.standard_normal((n, 8, 64)) * 0.02).astype(np.float32)
                    k = tagged_keys(index, seq, n)
                    v = rng.standard_normal((n, 2, 64)).astype(np.float32)
                    if stream is None:
                        result = s.append_and_attend(0, q, k, v, with_length=True)
                    else:
                        (result,) = stream.attend([(s, 0, q, k, v)], with_lengths=True)
                    seq += n
                    with lock:
                        calls.append((index, q, k, result.output, result.length))
                if stream is not None:
                    stream.close()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(calls) == CLIENTS * CALLS

    with Client(srv.address) as c:
        s = c.session(session.id)
        keys, values = s.dequantize(0)
        total = sum(k.shape[0] for _, _, k, _, _ in calls)
        assert s.info().layer_lengths == [total, 0]
    # Every token exactly once.
    seen = Counter(
        (int(keys[0, r, 1]), int(keys[0, r, 2]) + 127 * int(keys[0, r, 3])) for r in range(total)
    )
    sent = Counter()
    for _, _, k, _, _ in calls:
        for row in k:
            sent[(int(row[0, 1]), int(row[0, 2]) + 127 * int(row[0, 3]))] += 1
    assert seen == sent and max(seen.values()) == 1 and len(seen) == total
    # Each call's tokens are contiguous, ending at the length it was told; lengths unique.
    ends = sorted(length for *_, length in calls)
    assert len(set(ends)) == len(ends) and ends[-1] == total
    for index, q, k, out, length in calls:
        n = k.shape[0]
        np.testing.assert_array_equal(keys[:, length - n : length], k.transpose(1, 0, 2))
        ref = attention_ref(q, keys, values, length - n, 1 / np.sqrt(64))
        assert rel_l2(out, ref) < 1e-5, (index, length)
