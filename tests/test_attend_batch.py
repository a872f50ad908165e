"""attend_batch end to end: the packed AttendBatch call (unary and as a stream message)
through Client, AsyncClient and their streams, against a real server on loopback.

What it must equal: per-session append_and_attend on twin sessions (the same caches).
What a client with a small max_message_bytes does: split the call into calls that fit, by
sessions and by tokens, with the same outputs; or refuse before sending.
"""

from __future__ import annotations

import asyncio
import zlib

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.tensors import normal, qkv

from q8kv.client import AsyncClient, BatchResult, Client, Q8KVError
from q8kv.client.messages import batch_request
from q8kv.v1 import kvcache_pb2 as pb

GEO = Geo(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=4096)
SMALL = 256 * 1024  # the small client's max_message_bytes (the server keeps 512 MiB)
# One token of one session, float32: q 8*64*4 + k, v 2*2*64*4 = 3072 bytes.
TOKEN_BYTES_F32 = 3072


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60.0) as c:
        yield c


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


class Spy:
    """A client's stub that records the size of every AttendBatch request and stream
    message it sends (sync stubs)."""

    def __init__(self, stub) -> None:
        self._stub = stub
        self.sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def AttendBatch(self, request, **kwargs):
        self.sizes.append(request.ByteSize())
        return self._stub.AttendBatch(request, **kwargs)

    def AppendAndAttendStream(self, requests, **kwargs):
        def recorded():
            for request in requests:
                self.sizes.append(request.ByteSize())
                yield request

        return self._stub.AppendAndAttendStream(recorded(), **kwargs)


def spied(c) -> Spy:
    c._stub = Spy(c._stub)
    return c._stub


def twins(c, rng, lengths, dtype=np.float32, geo=GEO, layer=0):
    """Two lists of sessions, pairwise holding the same cache: ``lengths[b]`` tokens on
    ``layer``."""
    ours, theirs = [], []
    for n in lengths:
        a, b = c.create_session(**geo), c.create_session(**geo)
        if n:
            q, k, v = qkv(rng, n, geo, dtype)
            a.append_and_attend(layer, q, k, v)
            b.append_and_attend(layer, q, k, v)
        ours.append(a)
        theirs.append(b)
    return ours, theirs


def packed(rng, sessions: int, n: int, dtype=np.float32, geo=GEO):
    """q [B, n, H, D], k and v [B, n, KVH, D] of random values."""
    kv = (sessions, n, geo.num_kv_heads, geo.head_dim)
    return (
        normal(rng, (sessions, n, geo.num_heads, geo.head_dim), dtype),
        normal(rng, kv, dtype),
        normal(rng, kv, dtype),
    )


def one_by_one(sessions, layer, q, k, v) -> BatchResult:
    """The same step as per-session append_and_attend calls."""
    results = [
        s.append_and_attend(layer, q[b], k[b], v[b], with_length=True)
        for b, s in enumerate(sessions)
    ]
    return BatchResult(np.stack([r.output for r in results]), [r.length for r in results])


def lengths(sessions) -> list[list[int]]:
    return [s.info().layer_lengths for s in sessions]


def assert_within_rounding(out: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to the output dtype's rounding (float32: accumulation order; float16: one
    unit in the last place)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    a, b = out.astype(np.float32), ref.astype(np.float32)
    if out.dtype == np.float32:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    else:
        ulp = np.spacing(np.maximum(np.abs(out), np.abs(ref))).astype(np.float32)
        assert (np.abs(a - b) <= ulp).all(), np.abs(a - b).max()


# --- the call itself ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("n", [1, 6], ids=["decode", "prefill"])
def test_equals_per_session_append_and_attend_on_twins(client, rng, dtype, n):
    ours, theirs = twins(client, rng, [0, 3, 17, 40, 9], dtype)
    for step in range(2):
        q, k, v = packed(rng, len(ours), n, dtype)
        result = client.attend_batch(0, ours, q, k, v, with_lengths=True)
        expected = one_by_one(theirs, 0, q, k, v)
        assert result.output.dtype == dtype and result.output.shape == q.shape
        np.testing.assert_array_equal(result.output, expected.output)  # bit-exact
        grown = [m + n * (step + 1) for m in (0, 3, 17, 40, 9)]
        assert result.lengths == expected.lengths == grown
    # ids work as well as handles; without with_lengths the output alone
    q, k, v = packed(rng, len(ours), 1, dtype)
    out = client.attend_batch(1, [s.id for s in ours], q, k, v)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, one_by_one(theirs, 1, q, k, v).output)
    assert lengths(ours) == lengths(theirs)


def test_errors_name_the_batch_index_and_session_and_change_nothing(client, rng):
    a, b, c = (client.create_session(**GEO) for _ in range(3))
    other = client.create_session(**GEO.but(head_dim=32))
    for s, geo in ((a, GEO), (b, GEO), (c, GEO), (other, GEO.but(head_dim=32))):
        s.append_and_attend(0, *qkv(rng, 4, geo))
    before = lengths([a, b, c, other])
    q, k, v = packed(rng, 3, 2)

    with pytest.raises(Q8KVError) as info:
        client.attend_batch(0, [a, "no-such-session", c], q, k, v)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert "batch[1]" in info.value.message and "'no-such-session'" in info.value.message

    with pytest.raises(Q8KVError) as info:
        client.attend_batch(0, [a, b, other], q, k, v)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith(f"batch[2] (session {other.id!r}): q.shape")

    with pytest.raises(Q8KVError) as info:  # refused by the client: parts could not tell
        client.attend_batch(0, [a, b, a], q, k, v)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message == (
        f"sessions[2]: expected each session once, got {a.id!r} again (first at sessions[0])"
    )
    with pytest.raises(grpc.RpcError) as raw:  # and by the server
        client._stub.AttendBatch(batch_request([a.id, b.id, a.id], 0, q, k, v))
    assert raw.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert raw.value.details().startswith("session_ids[2]: expected each session once")

    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: k\.shape: expected \[3, 2, "):
        client.attend_batch(0, [a, b, c], q, k[:, :1], v)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: q\.shape\[0\]: expected 2 \("):
        client.attend_batch(0, [a, b], q, k, v)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: q\.dtype: expected float32"):
        client.attend_batch(0, [a, b, c], q.astype(np.float64), k, v)
    assert lengths([a, b, c, other]) == before  # nothing appended anywhere


def test_expected_lengths(client, rng):
    ours, theirs = twins(client, rng, [5, 0, 12])
    q, k, v = packed(rng, 3, 3)
    with pytest.raises(Q8KVError) as info:
        client.attend_batch(0, ours, q, k, v, expected_lengths=[5, 1, 12])
    assert info.value.code is grpc.StatusCode.ABORTED
    assert info.value.message.startswith(f"batch[1] (session {ours[1].id!r}): expected_length")
    assert [x[0] for x in lengths(ours)] == [5, 0, 12]  # nothing appended
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: expected_lengths: expected none "
                       r"or 3 \(one per session\), got 2"):
        client.attend_batch(0, ours, q, k, v, expected_lengths=[5, 0])
    result = client.attend_batch(0, ours, q, k, v, expected_lengths=[5, 0, 12], with_lengths=True)
    expected = one_by_one(theirs, 0, q, k, v)
    np.testing.assert_array_equal(result.output, expected.output)
    assert result.lengths == [8, 3, 15]


# --- splitting to the client's max_message_bytes ----------------------------------------


def test_a_batch_over_the_limit_is_split_by_sessions(server, client, rng):
    ours, theirs = twins(client, rng, [int(n) for n in rng.integers(0, 50, 24)])
    q, k, v = packed(rng, 24, 16)  # 24 x 16 x 3072 bytes: 1.1 MiB, a row 48 KiB
    with Client(server.address, max_message_bytes=SMALL) as small:
        spy = spied(small)
        result = small.attend_batch(0, ours, q, k, v, with_lengths=True)
    unsplit = client.attend_batch(0, theirs, q, k, v, with_lengths=True)
    assert len(spy.sizes) > 4 and max(spy.sizes) <= SMALL
    np.testing.assert_array_equal(result.output, unsplit.output)
    assert result.lengths == unsplit.lengths
    assert lengths(ours) == lengths(theirs)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=["f32", "f16"])
def test_a_long_prefill_is_split_by_tokens(server, client, rng, dtype):
    ours, theirs = twins(client, rng, [0, 7, 30], dtype)
    n = 2 * SMALL // TOKEN_BYTES_F32  # one session's row alone is 2x (f32) or 1x the limit
    q, k, v = packed(rng, 3, n, dtype)
    with Client(server.address, max_message_bytes=SMALL) as small:
        spy = spied(small)
        result = small.attend_batch(0, ours, q, k, v, with_lengths=True)
    unsplit = client.attend_batch(0, theirs, q, k, v, with_lengths=True)
    assert len(spy.sizes) >= 6 and max(spy.sizes) <= SMALL
    assert_within_rounding(result.output, unsplit.output)
    assert result.lengths == unsplit.lengths == [n, n + 7, n + 30]
    for a, b in zip(ours, theirs, strict=True):  # the caches are the same, bit for bit
        for x, y in zip(a.dequantize(0), b.dequantize(0), strict=True):
            np.testing.assert_array_equal(x, y)


def test_a_split_call_carries_expected_lengths_per_part(server, client, rng):
    ours, _ = twins(client, rng, [4, 9])
    n = SMALL // TOKEN_BYTES_F32 + 10  # two chunks per session
    q, k, v = packed(rng, 2, n)
    with Client(server.address, max_message_bytes=SMALL) as small:
        spy = spied(small)
        result = small.attend_batch(0, ours, q, k, v, expected_lengths=[4, 9], with_lengths=True)
        assert result.lengths == [4 + n, 9 + n] and len(spy.sizes) == 4
        # Resending the same call (a retry) appends nothing: its first part is ABORTED.
        with pytest.raises(Q8KVError) as info:
            small.attend_batch(0, ours, q, k, v, expected_lengths=[4, 9])
    assert info.value.code is grpc.StatusCode.ABORTED
    assert info.value.message.startswith(
        "attend_batch: part 1 of 4 (sessions[0:1], tokens[0:")
    assert "(nothing applied, later parts not sent): batch[0]" in info.value.message
    assert len(spy.sizes) == 5
    assert [x[0] for x in lengths(ours)] == [4 + n, 9 + n]


def test_a_split_call_that_fails_names_the_part_and_the_callers_index(server, client, rng):
    ours, _ = twins(client, rng, [3] * 12)
    ours[9] = "no-such-session"
    q, k, v = packed(rng, 12, 16)
    with Client(server.address, max_message_bytes=SMALL) as small, pytest.raises(
        Q8KVError
    ) as info:
        small.attend_batch(0, ours, q, k, v)
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    message = info.value.message
    assert "part 3 of 3 (sessions[8:12], tokens[0:16])" in message
    assert "(parts 1-2 applied, later parts not sent)" in message
    assert "batch[9] (session 'no-such-session')" in message  # the caller's index
    assert [x[0] for x in lengths(ours[:8])] == [19] * 8
    assert [x[0] for x in lengths(ours[8:9] + ours[10:])] == [3] * 3


def test_one_token_over_the_limit_is_refused_before_sending(server, client, rng):
    ours, _ = twins(client, rng, [2, 2])
    q, k, v = packed(rng, 2, 3)
    with Client(server.address, max_message_bytes=4096) as tiny:
        spy = spied(tiny)
        with pytest.raises(Q8KVError) as info:
            tiny.attend_batch(0, ours, q, k, v)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.message.startswith("max_message_bytes: expected at least ")
        assert "got 4096" in info.value.message and "3072 bytes of q, k and v" in info.value.message
        with tiny.stream() as stream, pytest.raises(Q8KVError) as info:
            stream.attend_batch(0, ours, q, k, v)
        assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert spy.sizes == []  # nothing was sent
    assert [x[0] for x in lengths(ours)] == [2, 2]


def test_async_client_splits_and_keeps_micro_batches_in_flight(server, client, rng):
    first, first_twins = twins(client, rng, [1, 20, 6, 0, 13, 2])
    second, second_twins = twins(client, rng, [40, 0])
    a = packed(rng, 6, 20)  # split by sessions
    b = packed(rng, 2, SMALL // TOKEN_BYTES_F32 + 30)  # split by tokens

    async def main():
        async with AsyncClient(server.address, max_message_bytes=SMALL, timeout=60) as c:
            return await asyncio.gather(
                c.attend_batch(0, first, *a, with_lengths=True),
                c.attend_batch(0, second, *b, expected_lengths=[40, 0], with_lengths=True),
            )

    got_a, got_b = asyncio.run(main())
    want_a = client.attend_batch(0, first_twins, *a, with_lengths=True)
    want_b = client.attend_batch(0, second_twins, *b, with_lengths=True)
    np.testing.assert_array_equal(got_a.output, want_a.output)
    assert_within_rounding(got_b.output, want_b.output)
    assert (got_a.lengths, got_b.lengths) == (want_a.lengths, want_b.lengths)


# --- the batch as a stream message ----------------------------------------------------------


def test_sync_stream_batch_messages(server, client, rng):
    first, first_twins = twins(client, rng, [3, 0, 8])
    second, second_twins = twins(client, rng, [5, 11])
    a, b = packed(rng, 3, 1, np.float16), packed(rng, 2, 4, np.float16)
    with client.stream() as stream:
        id_a = stream.send_batch(0, first, *a)
        id_b = stream.send_batch(0, second, *b, expected_lengths=[5, 11])
        got_b = stream.recv(id_b, with_lengths=True)  # out of order: b first
        got_a = stream.recv(id_a)
        bad = stream.send_batch(0, [first[0], "no-such-session"], *packed(rng, 2, 1))
        with pytest.raises(Q8KVError) as info:
            stream.recv(bad)
        assert info.value.code is grpc.StatusCode.NOT_FOUND and info.value.request_id == bad
        assert "batch[1] (session 'no-such-session')" in info.value.message
        # the stream goes on after a failed message
        c = packed(rng, 3, 1, np.float16)
        got_c = stream.attend_batch(0, first, *c, with_lengths=True)
    np.testing.assert_array_equal(got_a, one_by_one(first_twins, 0, *a).output)
    want_b = one_by_one(second_twins, 0, *b)
    np.testing.assert_array_equal(got_b.output, want_b.output)
    assert got_b.lengths == want_b.lengths == [9, 15]
    want_c = one_by_one(first_twins, 0, *c)
    np.testing.assert_array_equal(got_c.output, want_c.output)
    assert got_c.lengths == want_c.lengths == [5, 2, 10]


def test_stream_batch_over_the_limit_is_split_or_refused(server, client, rng):
    ours, theirs = twins(client, rng, [6, 0])
    q, k, v = packed(rng, 2, SMALL // TOKEN_BYTES_F32 + 30)
    with Client(server.address, max_message_bytes=SMALL) as small:
        spy = spied(small)
        with small.stream() as stream:
            with pytest.raises(Q8KVError) as info:
                stream.send_batch(0, ours, q, k, v)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"max_message_bytes {SMALL} bytes in one message" in info.value.message
            assert spy.sizes == []
            result = stream.attend_batch(0, ours, q, k, v, with_lengths=True)
    assert len(spy.sizes) == 4 and max(spy.sizes) <= SMALL
    want = one_by_one(theirs, 0, q, k, v)
    assert_within_rounding(result.output, want.output)
    assert result.lengths == want.lengths


def test_async_stream_batch_messages_from_several_tasks(server, client, rng):
    groups = [twins(client, rng, [int(x) for x in rng.integers(0, 30, 4)]) for _ in range(3)]
    steps = [packed(rng, 4, 2) for _ in groups]
    long = twins(client, rng, [3])
    prefill = packed(rng, 1, SMALL // TOKEN_BYTES_F32 + 5)

    async def main():
        c = AsyncClient(server.address, max_message_bytes=SMALL, timeout=60)
        async with c, c.stream() as stream:
            calls = [
                stream.attend_batch(0, ours, *step, with_lengths=True)
                for (ours, _), step in zip(groups, steps, strict=True)
            ]
            calls.append(stream.attend_batch(0, long[0], *prefill))
            results = await asyncio.gather(*calls)
            with pytest.raises(Q8KVError) as info:
                await stream.send_batch(0, long[0], *prefill)
            assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
            return results

    *got, got_long = asyncio.run(main())
    for result, (_, theirs), step in zip(got, groups, steps, strict=True):
        want = one_by_one(theirs, 0, *step)
        np.testing.assert_array_equal(result.output, want.output)
        assert result.lengths == want.lengths
    assert_within_rounding(got_long, one_by_one(long[1], 0, *prefill).output)


def test_stream_message_with_a_batch_and_items_is_refused(client, rng):
    ours, _ = twins(client, rng, [1])
    q, k, v = packed(rng, 1, 1)
    item = pb.AttendItem(session_id=ours[0].id, layer=0)
    message = pb.AppendAndAttendStreamRequest(
        request_id=1, items=[item], batch=batch_request([ours[0].id], 0, q, k, v)
    )
    (answer,) = list(client._stub.AppendAndAttendStream(iter([message])))
    assert answer.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answer.error_message.startswith("items: expected none in a message that carries")
    assert lengths(ours) == [[1, 0]]
