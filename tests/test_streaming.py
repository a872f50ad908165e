"""AppendAndAttendStream through a real server: the same answers as the unary call, no
partial append when a stream is cut mid-way, and an error answers one message only."""

from __future__ import annotations

import time
import uuid

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.rpc import attend_item, stub
from harness.tensors import normal, qkv

from q8kv import format as q8
from q8kv.client import AppendItem, Client, Q8KVError
from q8kv.v1 import kvcache_pb2 as pb

GEOM = Geo(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=4096)
KVH, D = GEOM.num_kv_heads, GEOM.head_dim


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=30.0) as c:
        yield c


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_stream_answers_equal_the_unary_calls(client, dtype):
    """Two sessions fed the same data, one by unary calls, one by a stream: the same
    outputs bit for bit, the same lengths, the same caches."""
    unary = client.create_session(**GEOM)
    streamed = client.create_session(**GEOM)
    rng = np.random.default_rng(3)
    steps = [(layer, qkv(rng, n, GEOM, dtype)) for n in (17, 1, 1, 3, 1) for layer in (0, 1)]
    with client.stream() as stream:
        for layer, (q, k, v) in steps:
            out_u, len_u = unary.append_and_attend(layer, q, k, v, with_length=True)
            ((out_s, len_s),) = stream.attend([(streamed, layer, q, k, v)], with_lengths=True)
            assert out_s.dtype == out_u.dtype == dtype and len_s == len_u
            np.testing.assert_array_equal(out_s, out_u)
    for layer in (0, 1):
        for a, b in zip(unary.dequantize(layer), streamed.dequantize(layer), strict=True):
            np.testing.assert_array_equal(a, b)
    unary.delete()
    streamed.delete()


def stable_lengths(client, sid, settle=0.3, timeout=10.0) -> list[int]:
    """The session's layer lengths once they stop changing (queued work has drained)."""
    deadline = time.monotonic() + timeout
    last = client.session_info(sid).layer_lengths
    while time.monotonic() < deadline:
        time.sleep(settle)
        now = client.session_info(sid).layer_lengths
        if now == last:
            return now
        last = now
    raise AssertionError(f"lengths still changing after {timeout}s: {last}")


@pytest.mark.parametrize("cut", ["cancel", "close_channel"])
def test_a_stream_cut_mid_way_leaves_no_partial_append(server, client, cut):
    """Many two-layer messages in flight, then the call is cancelled (or the channel
    closed): every message either landed whole (both layers, all its tokens) or not at
    all, and what landed is the messages' tokens in order."""
    tokens_per_message, messages = 4, 300
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(5)
    sent = [qkv(rng, tokens_per_message, GEOM) for _ in range(messages)]

    def requests():
        for i, (q, k, v) in enumerate(sent):
            items = [attend_item(s.id, layer, q, k, v) for layer in (0, 1)]
            yield pb.AppendAndAttendStreamRequest(request_id=i + 1, items=items)

    channel = grpc.insecure_channel(server.address)
    call = stub(channel).AppendAndAttendStream(requests())
    answered = 0
    for response in call:  # read a few answers: the stream is busy, messages queued behind
        assert response.error_code == 0, response.error_message
        answered += 1
        if answered == 5:
            break
    if cut == "cancel":
        call.cancel()
    else:
        channel.close()
    channel.close()

    lengths = stable_lengths(client, s.id)
    assert lengths[0] == lengths[1], lengths  # no message landed on one layer only
    assert lengths[0] % tokens_per_message == 0, lengths
    landed = lengths[0] // tokens_per_message
    assert answered <= landed < messages, (answered, landed)  # really cut mid-way
    expect_k = np.concatenate([k for _, k, _ in sent[:landed]]).transpose(1, 0, 2)
    expect_v = np.concatenate([v for _, _, v in sent[:landed]]).transpose(1, 0, 2)
    for layer in (0, 1):
        keys, values = s.dequantize(layer)
        np.testing.assert_array_equal(keys, q8.dequantize(*q8.quantize(expect_k)))
        np.testing.assert_array_equal(values, q8.dequantize(*q8.quantize(expect_v)))
    s.delete()


def test_an_error_answers_one_message_and_the_stream_goes_on(server, client):
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, 1, GEOM)
    bad_k = normal(rng, (1, KVH + 1, D))  # one kv head too many
    ghost = f"no-such-{uuid.uuid4().hex[:8]}"
    with client.stream() as stream:
        ok1 = stream.send([(s, 0, q, k, v)])
        bad_shape = stream.send([(s, 0, q, bad_k, v)])
        unknown = stream.send([(ghost, 0, q, k, v)])
        ok2 = stream.send([(s, 0, q, k, v)])
        # Answers may be read in any order: by request id.
        ((_, length2),) = stream.recv(ok2, with_lengths=True)
        with pytest.raises(Q8KVError) as bad:
            stream.recv(bad_shape)
        assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.request_id == bad_shape
        assert "items[0].k.shape" in bad.value.message and str(KVH + 1) in bad.value.message
        with pytest.raises(Q8KVError) as missing:
            stream.recv(unknown)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert missing.value.request_id == unknown
        ((_, length1),) = stream.recv(ok1, with_lengths=True)
        assert (length1, length2) == (1, 2)  # the failed messages appended nothing
        # Still open: one more round trip.
        ((_, length3),) = stream.attend([(s, 0, q, k, v)], with_lengths=True)
        assert length3 == 3
    assert s.info().layer_lengths == [3, 0]
    s.delete()


def test_stream_error_codes_on_the_wire(server, client):
    """The raw messages: error_code is the gRPC status number, error_message names the
    field, results are empty; the next message is answered normally."""
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 2, GEOM)

    def item(k_tensor):
        return attend_item(s.id, 0, q, k_tensor, v)

    messages = [
        pb.AppendAndAttendStreamRequest(request_id=7, items=[item(k[:1])]),
        pb.AppendAndAttendStreamRequest(request_id=8, items=[item(k)]),
    ]
    with grpc.insecure_channel(server.address) as channel:
        responses = list(stub(channel).AppendAndAttendStream(iter(messages), timeout=30))
    by_id = {r.request_id: r for r in responses}
    assert set(by_id) == {7, 8}
    assert by_id[7].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "k.shape" in by_id[7].error_message and not by_id[7].results
    assert by_id[8].error_code == 0 and by_id[8].results[0].length == 2
    s.delete()


def test_conditional_stream_messages_apply_once_and_resend_safely(server, client):
    """A stream message with expected_length applies only at that length: a mismatch
    answers ABORTED for that message alone with nothing of it applied, and the stream goes
    on. A message resent on a new stream (after a break) is refused, and client.applied
    tells the first attempt landed."""
    s = client.create_session(**GEOM)
    rng = np.random.default_rng(12)
    steps = [qkv(rng, n, GEOM) for n in (4, 1, 2)]
    with client.stream() as stream:
        ((_, length),) = stream.attend([AppendItem(s, 0, *steps[0], 0)], with_lengths=True)
        assert length == 4
        before = [s.dequantize(layer) for layer in (0, 1)]
        # Two items, the second stale: the first (layer 1, correct) must not land either.
        stale = [AppendItem(s, 1, *steps[1], 0), AppendItem(s.id, 0, *steps[1], 3)]
        with pytest.raises(Q8KVError) as err:
            stream.attend(stale)
        assert err.value.code == grpc.StatusCode.ABORTED and err.value.request_id == 2
        assert err.value.message == (
            "items[1].expected_length: expected the layer's length 4, got 3"
        )
        assert s.info().layer_lengths == [4, 0]
        for (k0, v0), layer in zip(before, (0, 1), strict=True):
            k1, v1 = s.dequantize(layer)
            np.testing.assert_array_equal(k0, k1)
            np.testing.assert_array_equal(v0, v1)
        message = [(s, 1, *steps[2], 0), (s, 0, *steps[2], 4)]
        results = stream.attend(message, with_lengths=True)
        assert [r.length for r in results] == [2, 6]
    with client.stream() as again:  # the "resend" after a broken stream
        with pytest.raises(Q8KVError) as err:
            again.attend(message)
        assert err.value.code == grpc.StatusCode.ABORTED
    assert client.applied(message)
    assert not client.applied([(s, 0, *steps[2], 5)])
    assert s.info().layer_lengths == [6, 2]
    s.delete()
