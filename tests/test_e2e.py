"""End to end: the client against a real q8kv-server on a loopback port.

Outputs are checked against the float64 reference on the dequantized cache (the service's
own Dequantize), rel. L2 < 1e-5 for float32 wire; float16/bfloat16 outputs against the
reference rounded to the wire dtype's precision.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid

import grpc
import ml_dtypes
import numpy as np
import pytest
from harness.fakes import FakeRpcError
from harness.geometry import Geo
from harness.rpc import attend_item, stub
from harness.server import TEST_BACKEND
from harness.tensors import normal, qkv
from reference import attention_ref, rel_l2

from q8kv import wire
from q8kv.client import AlreadyApplied, AppendItem, AsyncClient, Client, Q8KVError
from q8kv.v1 import kvcache_pb2 as pb

GEOM = Geo(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64, max_len=512)


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=30.0) as c:
        yield c


def check_attention(session, layer, q, out, start, scale=None, tol=1e-5):
    keys, values = session.dequantize(layer)
    scale = scale if scale is not None else 1.0 / np.sqrt(q.shape[-1])
    ref = attention_ref(q, keys, values, start, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(out.astype(np.float32)).all()
    assert rel_l2(out, ref) < tol, rel_l2(out, ref)


def snapshot(session, layers=range(GEOM.num_layers)):
    """Everything a failed call must leave unchanged: lengths and dequantized K/V."""
    info = session.info()
    return info.layer_lengths, [session.dequantize(layer) for layer in layers]


def assert_unchanged(session, before):
    lengths, caches = snapshot(session)
    assert lengths == before[0]
    for (k0, v0), (k1, v1) in zip(before[1], caches, strict=True):
        np.testing.assert_array_equal(k0, k1)
        np.testing.assert_array_equal(v0, v1)


# -- every RPC ---------------------------------------------------------------------------


def test_session_lifecycle(client):
    sid = f"life-{uuid.uuid4().hex[:8]}"
    s = client.create_session(**GEOM, session_id=sid, ttl_seconds=120, softmax_scale=0.5)
    assert s.id == sid
    info = s.info()
    assert info.layer_lengths == [0, 0, 0]
    assert info.softmax_scale == pytest.approx(0.5)
    assert info.ttl_seconds == 120
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (8, 2, 64)
    assert client.get_session(sid).info().id == sid
    assert sid in [i.id for i in client.list_sessions()]
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 5, GEOM)
    out = s.append_and_attend(1, q, k, v)
    check_attention(s, 1, q, out, start=0, scale=0.5)
    assert s.info().layer_lengths == [0, 5, 0]
    assert s.info().cache_bytes == 5 * 2 * 2 * 64 // 32 * 36
    s.truncate(2)
    assert s.info().layer_lengths == [0, 2, 0]
    assert s.delete() > 0
    with pytest.raises(Q8KVError) as err:
        s.info()
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_server_made_ids_are_uuid4(server):
    with grpc.insecure_channel(server.address) as channel:
        raw = stub(channel)
        reply = raw.CreateSession(pb.CreateSessionRequest(geometry=GEOM.pb()), timeout=10)
        assert uuid.UUID(reply.session.session_id).version == 4
        raw.DeleteSession(pb.DeleteSessionRequest(session_id=reply.session.session_id))


def test_list_sessions_pages(client):
    made = [client.create_session(**GEOM, session_id=f"page-{i:02d}") for i in range(5)]
    ids = [i.id for i in client.list_sessions(page_size=2)]
    assert [s.id for s in made] == [i for i in ids if i.startswith("page-")]
    assert len(ids) == len(set(ids))
    for s in made:
        s.delete()


@pytest.mark.parametrize("n_steps", [[1, 1, 1], [7, 1, 33], [33, 17]])
def test_decode_and_prefill_match_reference(client, n_steps):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(sum(n_steps))
    start = 0
    for n in n_steps:
        q, k, v = qkv(rng, n, GEOM)
        out = s.append_and_attend(2, q, k, v)
        check_attention(s, 2, q, out, start)
        start += n
    assert s.info().layer_lengths == [0, 0, start]
    s.delete()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_wire(client, dtype):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(7)
    q, k, v = qkv(rng, 9, GEOM, dtype)
    out = s.append_and_attend(0, q, k, v)
    assert out.dtype == np.dtype(dtype)
    keys, values = s.dequantize(0)
    ref = attention_ref(q, keys, values, 0, 1 / 8)
    # The output is the float32 result rounded once to the wire dtype.
    tol = 2e-3 if dtype == np.float16 else 1e-2
    assert rel_l2(out, ref) < tol
    s.delete()


def test_k_and_v_of_different_dtypes(client, server):
    """Each tensor carries its own dtype: float16 k with bfloat16 v (no common numpy type)
    appends and attends, through the one-at-a-time and the packed call, with the server's
    quantization sample on for every append (this module's server)."""
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, 5, GEOM)
    item = attend_item(s.id, 0, q.astype(np.float16), k.astype(np.float16), v)
    item.v.CopyFrom(wire.encode(v, "bfloat16"))
    with grpc.insecure_channel(server.address) as channel:
        reply = stub(channel).AppendAndAttend(pb.AppendAndAttendRequest(items=[item]), timeout=30)
        out = wire.decode(reply.results[0].output)
        check_attention(s, 0, q.astype(np.float16), out, 0, tol=2e-3)
        q1, k1, v1 = (a[None] for a in qkv(rng, 1, GEOM))  # [B=1, n=1, heads, D]
        batch = pb.AttendBatchRequest(
            session_ids=[s.id], layer=0, q=wire.encode(q1, "float16"),
            k=wire.encode(k1, "bfloat16"), v=wire.encode(v1, "float16"),
        )
        packed = stub(channel).AttendBatch(batch, timeout=30)
    assert list(packed.lengths) == [6]
    check_attention(s, 0, q1[0].astype(np.float16), wire.decode(packed.output)[0], 5, tol=2e-3)
    s.delete()


def test_dequantize_range(client):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 40, GEOM)
    s.append_and_attend(0, q, k, v)
    keys, values = s.dequantize(0)
    assert keys.shape == (2, 40, 64) and keys.dtype == np.float32
    # Q8 round trip: |x - q*d| <= d/2 <= max|block| / 254.
    bound = np.abs(k.transpose(1, 0, 2)).reshape(2, 40, 2, 32).max(-1, keepdims=True) / 254
    err = np.abs(keys - k.transpose(1, 0, 2)).reshape(2, 40, 2, 32)
    assert (err <= bound * 1.0001 + 1e-30).all()
    k_mid, v_mid = s.dequantize(0, start=10, end=25)
    np.testing.assert_array_equal(k_mid, keys[:, 10:25])
    np.testing.assert_array_equal(v_mid, values[:, 10:25])
    s.delete()


def test_batch_across_sessions_equals_separate_calls(client):
    rng = np.random.default_rng(11)
    a, b = client.create_session(**GEOM), client.create_session(**GEOM)
    prefill = [qkv(rng, 20, GEOM), qkv(rng, 3, GEOM)]
    a.append_and_attend(0, *prefill[0])
    b.append_and_attend(1, *prefill[1])
    step_a, step_b, step_a2 = qkv(rng, 1, GEOM), qkv(rng, 2, GEOM), qkv(rng, 1, GEOM)
    results = client.append_and_attend_batch(
        [(a, 0, *step_a), (b.id, 1, *step_b), (a, 0, *step_a2)], with_lengths=True
    )
    assert [r.length for r in results] == [21, 5, 22]
    keys, values = a.dequantize(0)
    # Items apply in order: the second item on `a` sees the first one's token.
    np.testing.assert_allclose(
        results[0].output, attention_ref(step_a[0], keys, values, 20, 1 / 8), rtol=0, atol=1e-5
    )
    np.testing.assert_allclose(
        results[2].output, attention_ref(step_a2[0], keys, values, 21, 1 / 8), rtol=0, atol=1e-5
    )
    check_attention(b, 1, step_b[0], results[1].output, start=3)
    a.delete()
    b.delete()


def test_several_layers_keep_their_own_lengths(client):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(5)
    for layer, n in [(0, 3), (1, 70), (2, 1), (0, 2)]:
        s.append_and_attend(layer, *qkv(rng, n, GEOM))
    assert s.info().layer_lengths == [5, 70, 1]
    s.truncate(4)
    assert s.info().layer_lengths == [4, 4, 1]
    q, k, v = qkv(rng, 3, GEOM)
    out = s.append_and_attend(1, q, k, v)
    check_attention(s, 1, q, out, start=4)
    s.delete()


# -- bad input: a clear error, and nothing changes ----------------------------------------


def _raw_item(sid, layer, q, k, v, replace=None):
    """An AttendItem as raw protobuf, with tensors from ``replace`` {name: pb.Tensor}."""
    item = attend_item(sid, layer, q, k, v)
    for name, tensor in (replace or {}).items():
        getattr(item, name).CopyFrom(tensor)
    return item


def _bad_items(sid, rng):
    q, k, v = qkv(rng, 2, GEOM)
    nan_k = k.copy()
    nan_k[1, 0, 5] = np.nan
    inf_q = q.copy()
    inf_q[0, 3, 0] = np.inf
    short = wire.encode(k)
    short.data = short.data[:-4]
    bad_dtype = wire.encode(k)
    bad_dtype.dtype = 7
    # Finite but past 1e15: attention over them would overflow float32 to Inf/NaN.
    huge_k = k.copy()
    huge_k[0, 1, 7] = -3e38
    huge_q = q.astype(ml_dtypes.bfloat16)
    huge_q[1, 2, 3] = 3e38
    past_v = v.copy()
    past_v[1, 1, 1] = 2e15
    big_v = v * 1e5  # within 1e15, but not within float16, the dtype of the output
    stale = _raw_item(sid, 0, q, k, v)
    stale.expected_length = 6  # the good item before it made the layer 7 long
    negative = _raw_item(sid, 0, q, k, v)
    negative.expected_length = -1
    return {
        "q heads": (_raw_item(sid, 0, q[:, :4], k, v), "INVALID_ARGUMENT", "items[0].q.shape"),
        "k tokens": (_raw_item(sid, 0, q, k[:1], v), "INVALID_ARGUMENT", "items[0].k.shape"),
        "bytes": (_raw_item(sid, 0, q, k, v, {"k": short}), "INVALID_ARGUMENT", "items[0].k.data"),
        "dtype": (_raw_item(sid, 0, q, k, v, {"k": bad_dtype}), "INVALID_ARGUMENT", "k.dtype"),
        "nan": (_raw_item(sid, 0, q, nan_k, v), "INVALID_ARGUMENT", "1 NaN/Inf"),
        "inf": (_raw_item(sid, 0, inf_q, k, v), "INVALID_ARGUMENT", "items[0].q"),
        "layer": (_raw_item(sid, 3, q, k, v), "INVALID_ARGUMENT", "layer: expected 0..2"),
        "huge f32": (
            _raw_item(sid, 0, q, huge_k, v), "INVALID_ARGUMENT",
            "items[0].k: expected |values| <= 1e+15 (so attention cannot overflow float32), "
            "got a largest |value| of 3e+38",
        ),
        "huge bf16": (
            _raw_item(sid, 0, huge_q, k, v), "INVALID_ARGUMENT",
            "items[0].q: expected |values| <= 1e+15",
        ),
        "past bound": (
            _raw_item(sid, 0, q, k, past_v), "INVALID_ARGUMENT",
            "items[0].v: expected |values| <= 1e+15 (so attention cannot overflow float32), "
            "got a largest |value| of 2e+15",
        ),
        "f16 output": (
            _raw_item(sid, 0, q.astype(np.float16), k, big_v), "INVALID_ARGUMENT",
            "items[0].v: expected |values| <= 65504 (the output travels in q's float16)",
        ),
        "stale": (
            stale, "ABORTED",
            "items[0].expected_length: expected the layer's length 7, got 6",
        ),
        "negative": (
            negative, "INVALID_ARGUMENT", "items[0].expected_length: expected >= 0, got -1"
        ),
        "unknown": (_raw_item("no-such", 0, q, k, v), "NOT_FOUND", "no-such"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "q heads", "k tokens", "bytes", "dtype", "nan", "inf", "layer", "unknown", "huge f32",
        "huge bf16", "past bound", "f16 output", "stale", "negative",
    ],
)
def test_bad_append_changes_nothing(client, server, case):
    rng = np.random.default_rng(21)
    s = client.create_session(**GEOM)
    s.append_and_attend(0, *qkv(rng, 6, GEOM))
    before = snapshot(s)
    item, code, needle = _bad_items(s.id, rng)[case]
    good = _raw_item(s.id, 0, *qkv(rng, 1, GEOM))
    request = pb.AppendAndAttendRequest(items=[good, item])
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as err:
        # A good item before the bad one: all or nothing, so it must not land either.
        stub(channel).AppendAndAttend(request, timeout=10)
    assert err.value.code().name == code
    assert needle.replace("items[0]", "items[1]") in err.value.details()
    assert_unchanged(s, before)
    s.delete()


def test_append_past_max_len_is_out_of_range(client):
    s = client.create_session(**GEOM.but(max_len=10))
    rng = np.random.default_rng(2)
    s.append_and_attend(0, *qkv(rng, 8, GEOM))
    before = snapshot(s)
    with pytest.raises(Q8KVError) as err:
        s.append_and_attend(0, *qkv(rng, 3, GEOM))
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert "max_len 10" in err.value.message and "11" in err.value.message
    assert_unchanged(s, before)
    s.delete()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"head_dim": 48}, "geometry.head_dim: expected a multiple of 32, got 48"),
        ({"num_heads": 6, "num_kv_heads": 4}, "geometry.num_heads: expected a multiple of"),
        ({"num_layers": 0}, "geometry.num_layers: expected 1..4096, got 0"),
        ({"max_len": -5}, "geometry.max_len: expected 1..16777216, got -5"),
    ],
)
def test_bad_geometry(client, change, needle):
    with pytest.raises(Q8KVError) as err:
        client.create_session(**{**GEOM, **change})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.message


def test_duplicate_id_and_bad_reads(client):
    s = client.create_session(**GEOM, session_id="dup-1")
    rng = np.random.default_rng(4)
    s.append_and_attend(0, *qkv(rng, 4, GEOM))
    before = snapshot(s)
    with pytest.raises(Q8KVError) as err:
        client.create_session(**GEOM, session_id="dup-1")
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(Q8KVError) as err:
        s.dequantize(0, start=0, end=5)
    assert err.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert "end: expected <= the layer's length 4, got 5" in err.value.message
    with pytest.raises(Q8KVError) as err:
        s.truncate(-1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(Q8KVError) as err:
        client.create_session(**GEOM, session_id="bad id with spaces")
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert_unchanged(s, before)
    s.delete()


def test_budget_and_session_limit(start_server):
    # 4 pages of 4 KiB codes: T = 4096 / (2 * 2 * 64) = 16 tokens a page.
    srv = start_server("--memory-budget", str(4 * 4608), "--page-bytes", "4096",
                       "--max-sessions", "2")
    rng = np.random.default_rng(9)
    with Client(srv.address, timeout=10) as c:
        a = c.create_session(**GEOM)
        a.append_and_attend(0, *qkv(rng, 48, GEOM))  # 3 pages
        before = snapshot(a)
        b = c.create_session(**GEOM)
        with pytest.raises(Q8KVError) as err:
            b.append_and_attend(0, *qkv(rng, 17, GEOM))  # needs 2 pages, 1 is free
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory budget: needed 2 free pages" in err.value.message
        assert b.info().layer_lengths == [0, 0, 0]
        assert_unchanged(a, before)
        with pytest.raises(Q8KVError) as err:
            c.create_session(**GEOM)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "maximum of 2 sessions" in err.value.message
        b.append_and_attend(0, *qkv(rng, 16, GEOM))  # exactly the last page still fits
        a.delete()
        c.create_session(**GEOM)  # deleting frees a session slot


def test_ttl_expiry(client):
    s = client.create_session(**GEOM, ttl_seconds=1.0)  # the smallest ttl the server keeps
    s.append_and_attend(0, *qkv(np.random.default_rng(0), 2, GEOM))
    deadline = time.monotonic() + 10
    # Poll with ListSessions: a GetSession would count as use and keep it alive.
    while time.monotonic() < deadline:
        if s.id not in [i.id for i in client.list_sessions()]:
            break
        time.sleep(0.2)
    else:
        pytest.fail("session with a 1 s TTL still alive after 10 s")
    with pytest.raises(Q8KVError) as err:
        s.info()
    assert err.value.code == grpc.StatusCode.NOT_FOUND


# -- conditional appends (expected_length) -----------------------------------------------


def test_conditional_append_applies_at_the_expected_length_only(client):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(31)
    s.append_and_attend(0, *qkv(rng, 6, GEOM))
    q, k, v = qkv(rng, 3, GEOM)
    out, length = s.append_and_attend(0, q, k, v, with_length=True, expected_length=6)
    assert length == 9
    check_attention(s, 0, q, out, start=6)
    before = snapshot(s)
    for expected in (6, 10, 0):  # 0 is a condition too, not "unset"
        with pytest.raises(Q8KVError) as err:
            s.append_and_attend(0, *qkv(rng, 1, GEOM), expected_length=expected)
        assert err.value.code == grpc.StatusCode.ABORTED
        assert err.value.message == (
            f"items[0].expected_length: expected the layer's length 9, got {expected}"
        )
        assert_unchanged(s, before)
    out = s.append_and_attend(2, *qkv(rng, 1, GEOM), expected_length=0)
    assert s.info().layer_lengths == [9, 0, 1]
    s.delete()


def test_conditional_batch_is_all_or_nothing(client):
    a, b = client.create_session(**GEOM), client.create_session(**GEOM)
    rng = np.random.default_rng(32)
    a.append_and_attend(0, *qkv(rng, 4, GEOM))
    b.append_and_attend(1, *qkv(rng, 2, GEOM))
    before_a, before_b = snapshot(a), snapshot(b)
    steps = [qkv(rng, 2, GEOM), qkv(rng, 1, GEOM), qkv(rng, 3, GEOM)]
    # The second item on a's layer 0 must expect 4 + 2: 4 is stale once the first applied.
    stale = [AppendItem(a, 0, *steps[0], 4), AppendItem(b, 1, *steps[1], 2),
             AppendItem(a.id, 0, *steps[2], 4)]
    with pytest.raises(Q8KVError) as err:
        client.append_and_attend_batch(stale)
    assert err.value.code == grpc.StatusCode.ABORTED
    assert err.value.message == "items[2].expected_length: expected the layer's length 6, got 4"
    assert_unchanged(a, before_a)
    assert_unchanged(b, before_b)
    chained = [(a, 0, *steps[0], 4), (b, 1, *steps[1], 2), (a.id, 0, *steps[2], 6)]
    results = client.append_and_attend_batch(chained, with_lengths=True)
    assert [r.length for r in results] == [6, 3, 9]
    check_attention(b, 1, steps[1][0], results[1].output, start=2)
    assert a.info().layer_lengths == [9, 0, 0]
    a.delete()
    b.delete()


def lost_answer() -> FakeRpcError:
    """What a client sees when the server applied the call but the answer never came."""
    return FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset")


def test_retry_after_a_lost_answer_appends_once_and_says_so(client, monkeypatch):
    from q8kv.client import messages

    monkeypatch.setattr(messages, "RETRY_DELAY", 0.0)
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(33)
    s.append_and_attend(1, *qkv(rng, 5, GEOM))
    real, sent = client._stub.AppendAndAttend, []

    def lose_the_first_answer(request, **kwargs):
        sent.append(request)
        response = real(request, **kwargs)  # applied on the server
        if len(sent) == 1:
            raise lost_answer()
        return response

    monkeypatch.setattr(client._stub, "AppendAndAttend", lose_the_first_answer)
    with pytest.raises(AlreadyApplied) as err:
        s.append_and_attend(1, *qkv(rng, 2, GEOM), expected_length=5, retries=2)
    assert err.value.code == grpc.StatusCode.ABORTED
    assert err.value.lengths == {(s.id, 1): 7}
    assert len(sent) == 2 and sent[0] == sent[1]
    assert s.info().layer_lengths == [0, 7, 0]  # once, not twice
    # A retry whose first attempt never landed appends normally.
    def lose_before_sending(request, **kwargs):
        sent.append(request)
        if len(sent) == 3:
            raise lost_answer()
        return real(request, **kwargs)

    monkeypatch.setattr(client._stub, "AppendAndAttend", lose_before_sending)
    q, k, v = qkv(rng, 3, GEOM)
    out, length = s.append_and_attend(1, q, k, v, True, expected_length=7, retries=2)
    assert length == 10 and len(sent) == 4
    check_attention(s, 1, q, out, start=7)
    s.delete()


def test_async_conditional_append_and_applied(server):
    rng = np.random.default_rng(36)

    async def main():
        async with AsyncClient(server.address, timeout=30) as c:
            s = await c.create_session(**GEOM)
            step = qkv(rng, 2, GEOM)
            out, length = await s.append_and_attend(0, *step, True, expected_length=0)
            assert length == 2 and out.shape == step[0].shape
            with pytest.raises(Q8KVError) as err:
                await s.append_and_attend(0, *step, expected_length=0, retries=1)
            assert type(err.value) is Q8KVError and err.value.code == grpc.StatusCode.ABORTED
            assert await c.applied([(s, 0, *step, 0)])
            assert not await c.applied([(s, 0, *step, 1)])
            item = AppendItem(s.id, 1, *qkv(rng, 3, GEOM), expected_length=0)
            (result,) = await c.append_and_attend_batch([item], with_lengths=True, retries=2)
            assert result.length == 3 and (await s.info()).layer_lengths == [2, 3, 0]
            await s.delete()

    asyncio.run(main())


# -- session ids a header cannot carry ---------------------------------------------------


@pytest.mark.parametrize("sid", ["caf\u00e9", "line\nbreak", "x" * 20 * 1024],
                         ids=["non-ascii", "newline", "20KiB"])
def test_ids_a_header_cannot_carry_get_the_servers_own_answer(client, sid):
    rng = np.random.default_rng(34)
    with pytest.raises(Q8KVError) as err:
        client.create_session(**GEOM, session_id=sid)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("session_id: expected 1-128 characters of [A-Za-z0-9")
    calls = [
        lambda: client.session_info(sid),
        lambda: client.get_session(sid),
        lambda: client.delete_session(sid),
        lambda: client.truncate_session(sid, 0),
        lambda: client.dequantize(sid, 0),
        lambda: client.export_session(sid),
        lambda: client.append_and_attend_batch([(sid, 0, *qkv(rng, 1, GEOM))]),
        lambda: client.session(sid).append_and_attend(0, *qkv(rng, 1, GEOM), expected_length=0),
    ]
    for call in calls:
        with pytest.raises(Q8KVError) as err:
            call()
        assert err.value.code == grpc.StatusCode.NOT_FOUND, err.value
        assert err.value.message.startswith("session_id: no session ")
    with client.stream() as stream:
        with pytest.raises(Q8KVError) as err:
            stream.attend([(sid, 0, *qkv(rng, 1, GEOM))])
        assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.request_id == 1
    # An import whose header names such an id: the server's INVALID_ARGUMENT.
    s = client.create_session(**GEOM)
    s.append_and_attend(0, *qkv(rng, 2, GEOM))
    chunks = s.export()
    chunks[0].header.session_id = sid
    digest = hashlib.sha256()
    for chunk in chunks[:-1]:
        digest.update(chunk.SerializeToString(deterministic=True))
    chunks[-1].trailer.sha256 = digest.digest()
    with pytest.raises(Q8KVError) as err:
        client.import_session(chunks)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith("session_id: expected 1-128 characters")
    s.delete()


def test_async_client_ids_a_header_cannot_carry(server):
    async def main():
        async with AsyncClient(server.address, timeout=30) as c:
            for sid in ("caf\u00e9", "a\nb", "y" * 20 * 1024):
                with pytest.raises(Q8KVError, match="^INVALID_ARGUMENT: session_id: expected"):
                    await c.create_session(**GEOM, session_id=sid)
                with pytest.raises(Q8KVError, match="^NOT_FOUND: session_id: no session"):
                    await c.session(sid).info()

    asyncio.run(main())


# -- finite extremes ---------------------------------------------------------------------

MAX_HEAD_DIM = {"numpy": 1024, "cupy": 256}  # the largest head_dim each backend takes


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_values_near_the_bound_give_finite_attention(client, dtype):
    """The worst case of the bound's derivation: the largest head_dim the backend takes
    (1024 on numpy, 256 on cupy), softmax_scale 1e3, every |q|, |k| near 1e15 (scores near
    1e36): finite, and still the reference's answer."""
    d = MAX_HEAD_DIM[TEST_BACKEND]
    geom = Geo(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=d, max_len=64)
    s = client.create_session(**geom, softmax_scale=1e3)
    rng = np.random.default_rng(35)

    def extreme(n, heads):
        signs = rng.choice([-1.0, 1.0], (n, heads, d))
        return (signs * rng.uniform(0.5e15, 0.99e15, (n, heads, d))).astype(dtype)

    start = 0
    for n in (5, 1, 3):
        q, k, v = extreme(n, 2), extreme(n, 1), extreme(n, 1)
        out = s.append_and_attend(0, q, k, v)
        out32 = out.astype(np.float32)
        assert np.isfinite(out32).all() and np.abs(out32).max() <= 1e15
        keys, values = s.dequantize(0)
        ref = attention_ref(q, keys, values, start, np.float32(1e3))
        assert rel_l2(out, ref) < 1e-2  # bfloat16 output: 8 bits of mantissa
        start += n
    s.delete()


# -- concurrency --------------------------------------------------------------------------


def test_concurrent_clients_on_one_session_append_each_token_once(server):
    geom = GEOM.but(num_layers=1, max_len=4096)
    with Client(server.address, timeout=30) as c:
        s = c.create_session(**geom)
    rng = np.random.default_rng(99)
    per_thread, threads = 25, 8
    # Each token's k carries a unique marker value, so the cache shows who landed where.
    ks = [
        [normal(rng, (1, 2, 64)) for _ in range(per_thread)] for _ in range(threads)
    ]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            with Client(server.address, timeout=30) as c:
                handle = c.get_session(s.id)
                for k in ks[index]:
                    q = normal(rng, (1, 8, 64))
                    handle.append_and_attend(0, q, k, k)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    with Client(server.address, timeout=30) as c:
        handle = c.get_session(s.id)
        assert handle.info().layer_lengths == [threads * per_thread]
        keys, _ = handle.dequantize(0)
        # Every sent token is in the cache exactly once (compare as quantized rows).
        got = sorted(map(bytes, np.ascontiguousarray(keys.transpose(1, 0, 2)).view(np.uint8)
                         .reshape(threads * per_thread, -1)))
        from q8kv import format as q8

        sent = np.concatenate([np.concatenate(t) for t in ks])  # [N, 2, 64]
        expected = q8.dequantize(*q8.quantize(sent)).astype(np.float32)
        want = sorted(map(bytes, np.ascontiguousarray(expected).view(np.uint8)
                          .reshape(threads * per_thread, -1)))
        assert got == want
        handle.delete()


def test_concurrent_clients_on_different_sessions(server):
    results: dict[int, float] = {}
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            rng = np.random.default_rng(index)
            with Client(server.address, timeout=30) as c:
                s = c.create_session(**GEOM)
                start = 0
                worst = 0.0
                for n in (5, 1, 1, 1, 3):
                    q, k, v = qkv(rng, n, GEOM)
                    out = s.append_and_attend(1, q, k, v)
                    keys, values = s.dequantize(1)
                    worst = max(worst, rel_l2(out, attention_ref(q, keys, values, start, 1 / 8)))
                    start += n
                results[index] = worst
                s.delete()
        except BaseException as exc:
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    assert len(results) == 8 and max(results.values()) < 1e-5


# -- health, reflection ------------------------------------------------------------------


def test_health_serving(client):
    assert client.health() == "SERVING"
    assert client.health("q8kv.v1.KVCacheService") == "SERVING"


def test_reflection_lists_the_service(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in reply.list_services_response.service}
        assert "q8kv.v1.KVCacheService" in names
        assert "grpc.health.v1.Health" in names
