"""Client unit tests that need no q8kv server: codec, errors, metadata, request building,
batch normalisation, the stream bookkeeping, and the health probe (against a bare gRPC
health server in-process)."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import inspect
import math
import pickle
import uuid
from concurrent import futures
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from harness.fakes import FakeRpcError, answer
from harness.tensors import normal

import q8kv
from q8kv.client import (
    AlreadyApplied,
    AppendItem,
    AsyncClient,
    AsyncSession,
    AsyncStream,
    AttendResult,
    BatchResult,
    Client,
    Q8KVError,
    Session,
    SessionInfo,
    Stream,
)
from q8kv.client import channel as ch
from q8kv.client import health as health_probe
from q8kv.client import messages as m
from q8kv.client import stream_messages as sm
from q8kv.client.batching import BatchPlan
from q8kv.client.errors import from_rpc_error, rpc_errors, status_code
from q8kv.v1 import kvcache_pb2 as pb
from q8kv.wire import TensorError, decode, encode, largest_magnitude

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
rng = np.random.default_rng(0)


def rand(shape, dtype=np.float32):
    return normal(rng, shape, dtype)


# --- codec ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 8, 64), (7, 2, 128), (0, 4, 32), (3,)])
def test_codec_round_trip(dtype, shape):
    x = rand(shape, dtype)
    t = encode(x)
    assert t.dtype == {np.float32: pb.FLOAT32, np.float16: pb.FLOAT16}.get(dtype, pb.BFLOAT16)
    assert list(t.shape) == list(shape)
    assert len(t.data) == x.size * np.dtype(dtype).itemsize
    y = decode(t, "q")
    assert y.dtype == np.dtype(dtype) and y.shape == shape
    np.testing.assert_array_equal(y.view(np.uint8), x.view(np.uint8))


def test_codec_is_little_endian_row_major_and_takes_views():
    x = np.arange(24, dtype="<f4").reshape(2, 3, 4).transpose(1, 0, 2)  # strided view
    t = encode(x)
    assert t.data == np.ascontiguousarray(x, dtype="<f4").tobytes()
    np.testing.assert_array_equal(decode(t), x)


def test_codec_cast_on_request():
    x = rand((2, 4, 32))
    t = encode(x, "bfloat16")
    assert t.dtype == pb.BFLOAT16
    np.testing.assert_array_equal(decode(t), x.astype(ml_dtypes.bfloat16))
    assert encode(x, np.float16).dtype == pb.FLOAT16
    assert encode(x, pb.FLOAT32).dtype == pb.FLOAT32


def test_decode_is_a_read_only_view():
    y = decode(encode(rand((2, 2, 32))))
    assert not y.flags.writeable


@pytest.mark.parametrize("bad", [pb.DTYPE_UNSPECIFIED, 7])
def test_decode_bad_dtype_names_the_field(bad):
    t = pb.Tensor(dtype=bad, shape=[1], data=b"\0\0\0\0")
    with pytest.raises(TensorError, match=r"^items\[0\]\.q\.dtype: expected FLOAT32"):
        decode(t, "items[0].q")


def test_decode_negative_shape_names_the_field():
    t = pb.Tensor(dtype=pb.FLOAT32, shape=[-1, 4], data=b"")
    with pytest.raises(TensorError, match=r"^k\.shape: expected non-negative.*\[-1, 4\]"):
        decode(t, "k")


@pytest.mark.parametrize("dtype,itemsize", [(pb.FLOAT32, 4), (pb.FLOAT16, 2), (pb.BFLOAT16, 2)])
def test_decode_byte_length_mismatch_names_expected_and_actual(dtype, itemsize):
    t = pb.Tensor(dtype=dtype, shape=[2, 3], data=b"\0" * (6 * itemsize - 1))
    with pytest.raises(TensorError) as info:
        decode(t, "v")
    msg = str(info.value)
    assert msg.startswith("v.data: expected ") and f"{6 * itemsize} bytes" in msg
    assert f"got {6 * itemsize - 1}" in msg


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.int8, np.complex64, bool])
def test_encode_rejects_dtypes_the_wire_lacks(dtype):
    with pytest.raises(TensorError, match="dtype: expected float32, float16 or bfloat16"):
        encode(np.zeros((1, 1, 32), dtype=dtype))


# --- errors --------------------------------------------------------------------------


def test_q8kv_error_str_code_message_and_pickle():
    err = from_rpc_error(FakeRpcError(grpc.StatusCode.NOT_FOUND, "session 'x': not found"))
    assert isinstance(err, Q8KVError)
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert err.message == "session 'x': not found"
    assert str(err) == "NOT_FOUND: session 'x': not found"
    again = pickle.loads(pickle.dumps(err))
    assert (again.code, again.message, str(again)) == (err.code, err.message, str(err))


def test_from_rpc_error_without_details():
    err = from_rpc_error(FakeRpcError(None, None))
    assert err.code is grpc.StatusCode.UNKNOWN and str(err).startswith("UNKNOWN: ")


def test_rpc_errors_converts_calls_and_iterations_and_nothing_else():
    def broken_stream():
        yield 1
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection reset")

    got = []
    with pytest.raises(Q8KVError) as info, rpc_errors():
        got.extend(broken_stream())
    assert got == [1] and info.value.code is grpc.StatusCode.UNAVAILABLE
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(StopIteration), rpc_errors():  # the end of a stream stays an end
        next(iter(()))
    with pytest.raises(KeyError), rpc_errors():
        raise KeyError("not an RPC failure")

    async def broken_async_stream():
        yield 1
        raise FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "token revoked")

    async def main():
        with rpc_errors():
            return [x async for x in broken_async_stream()]

    with pytest.raises(Q8KVError, match="^PERMISSION_DENIED: token revoked"):
        asyncio.run(main())


def test_status_code_from_integer():
    assert status_code(3) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(8) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_code(999) is grpc.StatusCode.UNKNOWN


# --- channel, metadata ---------------------------------------------------------------


def test_metadata():
    assert ch.base_metadata(None) == ()
    base = ch.base_metadata("s3cret")
    assert base == (("authorization", "Bearer s3cret"),)
    assert ch.call_metadata(base) == base
    assert ch.call_metadata(base, "abc") == base + (("x-session-id", "abc"),)
    assert ch.call_metadata((), "abc") == (("x-session-id", "abc"),)
    for key, _ in ch.call_metadata(base, "abc"):
        assert key == key.lower()  # gRPC rejects upper-case metadata keys


def test_channel_options_defaults_and_overrides():
    opts = dict(ch.channel_options())
    assert opts["grpc.max_send_message_length"] == 512 * 1024 * 1024
    assert opts["grpc.max_receive_message_length"] == 512 * 1024 * 1024
    assert opts["grpc.keepalive_time_ms"] >= 10_000
    opts = dict(ch.channel_options(1024, None, [("grpc.primary_user_agent", "x")]))
    assert opts["grpc.max_receive_message_length"] == 1024
    assert "grpc.keepalive_time_ms" not in opts and opts["grpc.primary_user_agent"] == "x"


def test_channel_credentials(tmp_path):
    assert ch.channel_credentials(None) is None
    assert ch.channel_credentials(False) is None
    assert isinstance(ch.channel_credentials(True), grpc.ChannelCredentials)
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    assert isinstance(ch.channel_credentials(pem), grpc.ChannelCredentials)
    assert isinstance(ch.channel_credentials(str(pem)), grpc.ChannelCredentials)
    mtls = ch.channel_credentials((None, pem, pem))
    assert isinstance(mtls, grpc.ChannelCredentials)
    with pytest.raises(FileNotFoundError):
        ch.channel_credentials(tmp_path / "missing.pem")
    with pytest.raises(TypeError, match="tls: expected"):
        ch.channel_credentials(("a", "b"))


# --- request building ----------------------------------------------------------------

GEOMETRY = dict(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=4096)


def test_create_request_makes_a_uuid4_when_no_id_is_given():
    a, b = m.create_request(**GEOMETRY), m.create_request(**GEOMETRY)
    assert uuid.UUID(a.session_id).version == 4 and a.session_id != b.session_id
    assert not a.HasField("softmax_scale") and a.ttl_seconds == 0.0
    g = a.geometry
    assert (g.num_layers, g.num_heads, g.num_kv_heads, g.head_dim, g.max_len) == (2, 8, 2, 64, 4096)


def test_create_request_keeps_given_values():
    r = m.create_request(**GEOMETRY, session_id="user-7:conv.3", ttl_seconds=60, softmax_scale=0.5)
    assert r.session_id == "user-7:conv.3" and r.ttl_seconds == 60.0
    assert r.HasField("softmax_scale") and r.softmax_scale == 0.5
    r = m.create_request(**GEOMETRY, softmax_scale=0.0)  # 0 is a value, not "unset"
    assert r.HasField("softmax_scale")


def test_create_request_rejects_non_integers():
    with pytest.raises(Q8KVError, match="^INVALID_ARGUMENT: head_dim: expected an integer"):
        m.create_request(**{**GEOMETRY, "head_dim": 64.0})
    r = m.create_request(**{**GEOMETRY, "num_layers": np.int64(3)})
    assert r.geometry.num_layers == 3


class Handle:
    def __init__(self, sid):
        self.id = sid


def test_batch_items_take_handles_ids_and_messages():
    q, k, v = rand((1, 8, 64), np.float16), rand((1, 2, 64)), rand((1, 2, 64), ml_dtypes.bfloat16)
    ready = m.attend_item("c", 0, q, k, v)
    items = m.batch_items([(Handle("a"), 1, q, k, v), ["b", np.int32(0), q, k, v], ready])
    assert [i.session_id for i in items] == ["a", "b", "c"]
    assert [i.layer for i in items] == [1, 0, 0]
    # each tensor keeps its own dtype: q's for q, k's for k, v's for v
    assert (items[0].q.dtype, items[0].k.dtype, items[0].v.dtype) == (
        pb.FLOAT16,
        pb.FLOAT32,
        pb.BFLOAT16,
    )
    np.testing.assert_array_equal(decode(items[1].v), v)
    assert items[2] is ready
    assert m.batch_items([]) == []
    assert len(m.batch_items(iter([("a", 0, q, k, v)]))) == 1  # any iterable


@pytest.mark.parametrize(
    "item,pattern",
    [
        (("a", 0, "q", "k"), r"items\[1\]: expected \(session, .*\), got tuple of length 4"),
        ("abcde", r"items\[1\]: expected \(session, layer, q, k, v\) or \(.*\), got str"),
        (42, r"items\[1\]: expected \(session, layer, q, k, v\) or \(.*\), got int"),
        (("a", 0, 1, 2, 3, 4, 5), r"items\[1\]: expected .*expected_length\), got tuple of len"),
        (("a", 0, 1, 2, 3, 0.5), r"items\[1\]\.q\.dtype: expected"),
        ((None, 0, 1, 2, 3), r"items\[1\]\.session: expected a session handle or a non-empty id"),
        (("", 0, 1, 2, 3), r"items\[1\]\.session: expected"),
        (("a", 1.5, 1, 2, 3), r"items\[1\]\.layer: expected an integer, got 1.5"),
    ],
)
def test_batch_items_bad_shape_of_item(item, pattern):
    good = ("a", 0, rand((1, 8, 64)), rand((1, 2, 64)), rand((1, 2, 64)))
    with pytest.raises(Q8KVError, match=pattern) as info:
        m.batch_items([good, item])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_batch_items_bad_dtype_names_the_field(which):
    t = {"q": rand((1, 8, 64)), "k": rand((1, 2, 64)), "v": rand((1, 2, 64))}
    t[which] = t[which].astype(np.float64)
    with pytest.raises(Q8KVError) as info:
        m.batch_items([("a", 0, t["q"], t["k"], t["v"]), ("b", 0, t["q"], t["k"], t["v"])])
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert str(info.value).startswith(f"INVALID_ARGUMENT: items[0].{which}.dtype: expected")
    assert "float64" in str(info.value)


def test_decode_results_and_count():
    out = rand((2, 8, 64), np.float16)
    results = m.decode_results([pb.AttendResult(output=encode(out), length=18)])
    assert results == [AttendResult(results[0].output, 18)]
    o, length = results[0]
    np.testing.assert_array_equal(o, out) and length == 18
    bad = pb.AttendResult(output=pb.Tensor(dtype=pb.FLOAT32, shape=[2], data=b"x"))
    with pytest.raises(Q8KVError, match=r"^INTERNAL: results\[0\]\.output\.data"):
        m.decode_results([bad])
    with pytest.raises(Q8KVError, match="expected 2 .* got 1"):
        m.check_result_count(2, 1)


def test_dequantize_request_end_optional():
    r = m.dequantize_request("s", 1)
    assert (r.session_id, r.layer, r.start, r.HasField("end")) == ("s", 1, 0, False)
    r = m.dequantize_request("s", 1, 4, 0)
    assert r.HasField("end") and r.end == 0 and r.start == 4


def test_session_info_from_proto():
    msg = pb.SessionInfo(
        session_id="s",
        geometry=pb.Geometry(num_layers=2, num_heads=8, num_kv_heads=2, head_dim=64, max_len=9),
        softmax_scale=0.125,
        layer_lengths=[3, 0],
        cache_bytes=100,
        reserved_bytes=4096,
        ttl_seconds=60,
        created_at=1.5,
        last_used_at=2.5,
    )
    info = SessionInfo.from_proto(msg)
    assert info == SessionInfo("s", 2, 8, 2, 64, 9, 0.125, [3, 0], 100, 4096, 60.0, 1.5, 2.5)


# --- the clients against fake stubs: metadata and deadlines on every call ---------------


def _info(sid="s1"):
    return pb.SessionInfo(session_id=sid, geometry=pb.Geometry(num_layers=2), layer_lengths=[0, 0])


class FakeUnary:
    """Records each call's request and keyword arguments; answers with ``reply(request)``."""

    def __init__(self, log, name, reply, is_async=False):
        self.log, self.name, self.reply, self.is_async = log, name, reply, is_async

    def __call__(self, request, **kwargs):
        self.log.append((self.name, request, kwargs))
        return answer(self.reply(request), self.is_async)


def _attend_reply(request):
    return pb.AppendAndAttendResponse(
        results=[
            pb.AttendResult(output=encode(decode(i.q)), length=int(decode(i.q).shape[0]) + 16)
            for i in request.items
        ]
    )


class FakeStub:
    def __init__(self, log, is_async=False):
        pages = {
            "": pb.ListSessionsResponse(sessions=[_info("a")], next_page_token="p2"),
            "p2": pb.ListSessionsResponse(sessions=[_info("b")]),
        }
        replies = {
            "CreateSession": lambda r: pb.CreateSessionResponse(session=_info(r.session_id)),
            "GetSession": lambda r: (
                pb.GetSessionResponse(session=_info(r.session_id))
                if r.session_id != "gone"
                else FakeRpcError(grpc.StatusCode.NOT_FOUND, "session 'gone': not found")
            ),
            "ListSessions": lambda r: pages[r.page_token],
            "DeleteSession": lambda r: pb.DeleteSessionResponse(freed_bytes=65536),
            "TruncateSession": lambda r: pb.TruncateSessionResponse(session=_info(r.session_id)),
            "AppendAndAttend": _attend_reply,
            "Dequantize": lambda r: pb.DequantizeResponse(
                k=encode(np.zeros((2, 3, 64), np.float32)),
                v=encode(np.ones((2, 3, 64), np.float32)),
                length=3,
            ),
            "Check": lambda r: health_pb2.HealthCheckResponse(status=1),
        }
        for name, reply in replies.items():
            setattr(self, name, FakeUnary(log, name, reply, is_async))


def _session_header(kwargs):
    return dict(kwargs["metadata"]).get("x-session-id")


def test_sync_client_sets_metadata_and_deadline_on_every_call():
    log = []
    with Client("127.0.0.1:1", timeout=2.5, token="tok") as c:
        c._stub = c._health = FakeStub(log)
        s = c.create_session(**GEOMETRY)
        sid = s.id
        assert uuid.UUID(sid).version == 4
        q, kv = rand((1, 8, 64), np.float16), rand((1, 2, 64))
        out = s.append_and_attend(0, q, kv, kv)
        assert out.dtype == np.float16 and out.shape == (1, 8, 64)
        assert s.append_and_attend(1, q, kv, kv, with_length=True).length == 17
        s.dequantize(0, start=1)
        s.truncate(0)
        s.info()
        assert s.length(1) == 0
        assert s.delete() == 65536
        outs = c.append_and_attend_batch([("other", 0, q, kv, kv), (s, 1, q, kv, kv)])
        assert len(outs) == 2 and all(isinstance(o, np.ndarray) for o in outs)
        pairs = c.append_and_attend_batch([(s, 1, q, kv, kv)], with_lengths=True)
        assert pairs[0].length == 17
        assert c.append_and_attend_batch([]) == []
        assert [i.id for i in c.list_sessions(page_size=1)] == ["a", "b"]
        assert c.health() == "SERVING"
        assert c.get_session("x1").id == "x1"
        with pytest.raises(Q8KVError) as info:
            c.get_session("gone")
        assert info.value.code is grpc.StatusCode.NOT_FOUND
        assert str(info.value) == "NOT_FOUND: session 'gone': not found"

    for name, request, kwargs in log:
        assert kwargs["timeout"] == 2.5
        assert ("authorization", "Bearer tok") in kwargs["metadata"]
        if name in ("ListSessions", "Check"):
            assert _session_header(kwargs) is None
        elif name == "AppendAndAttend":
            assert _session_header(kwargs) == request.items[0].session_id  # the first item's
        else:
            assert _session_header(kwargs) == request.session_id
    assert [r.page_token for n, r, _ in log if n == "ListSessions"] == ["", "p2"]
    assert [r.page_size for n, r, _ in log if n == "ListSessions"] == [1, 1]
    assert log[0][1].session_id == sid and _session_header(log[0][2]) == sid
    assert sum(n == "AppendAndAttend" for n, _, _ in log) == 4


def test_sync_client_without_token_sends_no_authorization():
    log = []
    with Client("127.0.0.1:1", timeout=None) as c:
        c._stub = FakeStub(log)
        c.create_session(**GEOMETRY, session_id="mine")
    ((name, request, kwargs),) = log
    assert request.session_id == "mine" and kwargs["timeout"] is None
    assert kwargs["metadata"] == (("x-session-id", "mine"),)


def test_async_client_mirrors_the_sync_one():
    async def main():
        log = []
        async with AsyncClient("127.0.0.1:1", timeout=3.0, token="tok") as c:
            c._stub = c._health = FakeStub(log, is_async=True)
            s = await c.create_session(**GEOMETRY)
            q, kv = rand((2, 8, 64), ml_dtypes.bfloat16), rand((2, 2, 64))
            out = await s.append_and_attend(0, q, kv, kv)
            assert out.dtype == ml_dtypes.bfloat16 and out.shape == (2, 8, 64)
            res = await c.append_and_attend_batch([("z", 0, q, kv, kv)], with_lengths=True)
            assert res[0].length == 18
            k, v = await s.dequantize(1)
            assert k.shape == v.shape == (2, 3, 64)
            await s.truncate(1)
            assert await s.length(0) == 0
            assert await s.delete() == 65536
            assert [i.id for i in await c.list_sessions()] == ["a", "b"]
            assert await c.health() == "SERVING"
            with pytest.raises(Q8KVError, match="^NOT_FOUND"):
                await c.get_session("gone")
            return s.id, log

    sid, log = asyncio.run(main())
    assert uuid.UUID(sid).version == 4
    for name, request, kwargs in log:
        assert kwargs["timeout"] == 3.0
        assert ("authorization", "Bearer tok") in kwargs["metadata"]
        if name == "AppendAndAttend":
            assert _session_header(kwargs) == request.items[0].session_id
        elif name not in ("ListSessions", "Check"):
            assert _session_header(kwargs) == request.session_id


# --- AppendAndAttendStream: request building and matching by request_id --------------


def _stream_response(request, fail_layer=None):
    if any(i.layer == fail_layer for i in request.items):
        return pb.AppendAndAttendStreamResponse(
            request_id=request.request_id, error_code=11, error_message="layer 5: past max_len"
        )
    return pb.AppendAndAttendStreamResponse(
        request_id=request.request_id, results=_attend_reply(request).results
    )


def test_stream_book_builds_requests_and_matches_ids():
    book = sm.StreamBook()
    q, kv = rand((1, 8, 64)), rand((1, 2, 64))
    rid, req = book.build([("s", 0, q, kv, kv), ("t", 1, q, kv, kv)])
    assert rid == 1 and req.request_id == 1 and [i.session_id for i in req.items] == ["s", "t"]
    with pytest.raises(Q8KVError, match=r"items\[0\]\.q\.dtype"):
        book.build([("s", 0, q.astype(np.float64), kv, kv)])
    rid2, _ = book.build([("s", 0, q, kv, kv)])
    assert rid2 == 2  # a failed build spends no id
    book.sent(rid)
    book.sent(rid2)
    assert book.wanted(None) == 1 and book.wanted(2) == 2
    with pytest.raises(Q8KVError, match="request_id: 9 is not outstanding"):
        book.wanted(9)
    assert book.take(1) is None
    book.arrived[2] = pb.AppendAndAttendStreamResponse(
        request_id=2, error_code=11, error_message="past max_len"
    )
    book.arrived[1] = _stream_response(req)
    with pytest.raises(Q8KVError) as info:
        book.take(2)
    assert info.value.code is grpc.StatusCode.OUT_OF_RANGE and info.value.request_id == 2
    assert str(info.value) == "OUT_OF_RANGE: past max_len"
    assert [r.length for r in book.take(1)] == [17, 17]
    assert book.pending == []
    with pytest.raises(Q8KVError, match="no request outstanding"):
        book.wanted(None)


class FakeSyncStreamCall:
    """Answers requests in pairs, the second first, to exercise matching by request_id."""

    def __init__(self, requests):
        self.requests, self.cancelled = requests, False
        self.responses = self._answer()

    def _answer(self):
        held = None
        for request in self.requests:
            if held is None and request.items[0].layer != 5:
                held = request
                continue
            yield _stream_response(request, fail_layer=5)
            if held is not None:
                yield _stream_response(held)
                held = None

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.responses)

    def cancel(self):
        self.cancelled = True


def test_sync_stream_matches_out_of_order_answers_and_survives_an_error():
    calls = []

    class Stub:
        def AppendAndAttendStream(self, requests, **kwargs):
            calls.append(kwargs)
            call = FakeSyncStreamCall(requests)
            calls.append(call)
            return call

    with Client("127.0.0.1:1", token="tok") as c:
        c._stub = Stub()
        q, kv = rand((1, 8, 64), np.float16), rand((1, 2, 64))
        with c.stream() as st:
            a = st.send([("first", 0, q, kv, kv)])
            b = st.send([("second", 0, q, kv, kv), ("third", 1, q, kv, kv)])
            assert (a, b) == (1, 2)
            outs = st.recv(a)  # answered after b: b's answer is kept for later
            assert len(outs) == 1 and outs[0].dtype == np.float16
            assert [r.length for r in st.recv(with_lengths=True)] == [17, 17]
            with pytest.raises(Q8KVError) as info:
                st.attend([("first", 5, q, kv, kv)])
            assert info.value.code is grpc.StatusCode.OUT_OF_RANGE
            assert info.value.request_id == 3
            # the stream is still usable after a failed message
            st.send([("first", 0, q, kv, kv)])
            assert len(st.attend([("first", 5 - 4, q, kv, kv)])) == 1
            assert len(st.recv()) == 1
        with pytest.raises(Q8KVError, match="already closed"):
            st.send([("first", 0, q, kv, kv)])
    kwargs = calls[0]
    assert ("x-session-id", "first") in kwargs["metadata"]  # routed by the first item
    assert ("authorization", "Bearer tok") in kwargs["metadata"]
    assert calls[1].cancelled is False  # closed cleanly: nothing outstanding


class FakeAioStreamCall:
    def __init__(self):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.written = []

    async def write(self, request):
        self.written.append(request)
        await self.queue.put(_stream_response(request, fail_layer=5))

    async def done_writing(self):
        await self.queue.put(grpc.aio.EOF)

    async def read(self):
        return await self.queue.get()

    def cancel(self):
        self.cancelled = True
        self.queue.put_nowait(grpc.aio.EOF)


def test_async_stream_concurrent_attends_and_per_message_errors():
    async def main():
        seen = {}

        class Stub:
            def AppendAndAttendStream(self, **kwargs):
                seen["kwargs"] = kwargs
                seen["call"] = FakeAioStreamCall()
                return seen["call"]

        async with AsyncClient("127.0.0.1:1") as c:
            c._stub = Stub()
            q, kv = rand((1, 8, 64)), rand((1, 2, 64))
            async with c.stream(session_id="route-me") as st:
                outs = await asyncio.gather(
                    *(st.attend([(f"s{i}", 0, q, kv, kv)], with_lengths=True) for i in range(8))
                )
                assert all(o[0].length == 17 for o in outs)
                with pytest.raises(Q8KVError) as info:
                    await st.attend([("s0", 5, q, kv, kv)])
                assert info.value.code is grpc.StatusCode.OUT_OF_RANGE
                assert info.value.request_id == 9
                rid = await st.send([("s0", 0, q, kv, kv)])
                assert (await st.recv(rid))[0].shape == (1, 8, 64)
                with pytest.raises(Q8KVError, match="no request outstanding"):
                    await st.recv()
            assert seen["call"].cancelled is False
            assert [w.request_id for w in seen["call"].written] == list(range(1, 11))
            return seen["kwargs"]

    kwargs = asyncio.run(main())
    assert kwargs["metadata"] == (("x-session-id", "route-me"),)


# --- the health probe ------------------------------------------------------------------


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


def test_health_probe(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert health_probe.main([address, "-v"]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    with Client(address, timeout=5) as c:
        assert c.health() == "SERVING"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert health_probe.main([address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    with Client(address, timeout=5) as c:
        assert c.health() == "NOT_SERVING"
    assert health_probe.main([address, "--service", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_health_probe_unreachable(capsys):
    assert health_probe.main(["127.0.0.1:1", "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- session ids that cannot be a header --------------------------------------------------


@pytest.mark.parametrize(
    "sid",
    ["caf\u00e9", "a\nb", "x" * 20 * 1024, "a" * 129, "sp ace", "tab\t", "", "\u00ff" * 128],
)
def test_ids_no_header_can_carry_travel_without_the_routing_header(sid):
    base = ch.base_metadata("tok")
    assert ch.call_metadata(base, sid) == base


@pytest.mark.parametrize("sid", ["a", "A-z_0.9:x", "x" * 128, str(uuid.uuid4())])
def test_ids_of_the_server_alphabet_get_the_routing_header(sid):
    assert ch.call_metadata((), sid) == (("x-session-id", sid),)


# --- conditional appends: items and the retry helper ---------------------------------------


def test_batch_items_carry_expected_length():
    q, kv = rand((2, 8, 64)), rand((2, 2, 64))
    items = m.batch_items(
        [AppendItem("a", 0, q, kv, kv, 7), ("b", 1, q, kv, kv, 0), ("c", 0, q, kv, kv),
         AppendItem("d", 0, q, kv, kv), ("e", 0, q, kv, kv, None)]
    )
    assert [i.expected_length if i.HasField("expected_length") else None for i in items] == [
        7, 0, None, None, None
    ]
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: items\[0\]\.expected_length: "
                       r"expected an integer, got 0.5"):
        m.batch_items([("a", 0, q, kv, kv, 0.5)])


class RetryStub:
    """AppendAndAttend answers from ``script`` in turn (an exception or 'ok'); GetSession
    reports ``lengths``."""

    def __init__(self, script, lengths, is_async=False):
        self.log, self.script = [], list(script)

        def attend(request):
            step = self.script.pop(0)
            return _attend_reply(request) if step == "ok" else step

        def get(request):
            info = pb.SessionInfo(session_id=request.session_id, layer_lengths=lengths)
            return pb.GetSessionResponse(session=info)

        self.AppendAndAttend = FakeUnary(self.log, "AppendAndAttend", attend, is_async)
        self.GetSession = FakeUnary(self.log, "GetSession", get, is_async)

    def names(self):
        return [name for name, _, _ in self.log]


UNAVAILABLE = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "server: shutting down")
TIMED_OUT = FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
ABORTED = FakeRpcError(
    grpc.StatusCode.ABORTED, "items[0].expected_length: expected the layer's length 7, got 5"
)


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(m, "RETRY_DELAY", 0.0)


def run_retry(script, lengths, retries=3, expected=5, is_async=False):
    """One conditional append of 2 tokens at ``expected`` on layer 1 of 's'; returns
    (the result or the exception, the names of the calls sent, the requests sent)."""
    q, kv = rand((2, 8, 64)), rand((2, 2, 64))
    stub = RetryStub(script, lengths, is_async)

    async def main():
        async with AsyncClient("127.0.0.1:1") as c:
            c._stub = stub
            return await c.session("s").append_and_attend(
                1, q, kv, kv, expected_length=expected, retries=retries
            )

    try:
        if is_async:
            outcome = asyncio.run(main())
        else:
            with Client("127.0.0.1:1") as c:
                c._stub = stub
                outcome = c.session("s").append_and_attend(
                    1, q, kv, kv, expected_length=expected, retries=retries
                )
    except Q8KVError as exc:
        outcome = exc
    return outcome, stub.names(), [r for n, r, _ in stub.log if n == "AppendAndAttend"]


@pytest.mark.parametrize("is_async", [False, True])
def test_retry_after_an_ambiguous_failure_resends_the_same_conditional_item(
    no_backoff, is_async
):
    out, names, sent = run_retry([UNAVAILABLE, TIMED_OUT, "ok"], [0, 5], is_async=is_async)
    assert isinstance(out, np.ndarray) and out.shape == (2, 8, 64)
    assert names == ["AppendAndAttend"] * 3
    assert all(r == sent[0] for r in sent) and sent[0].items[0].expected_length == 5


@pytest.mark.parametrize("is_async", [False, True])
def test_aborted_retry_with_the_layer_advanced_by_n_raises_already_applied(no_backoff, is_async):
    err, names, _ = run_retry([UNAVAILABLE, ABORTED], [0, 7], is_async=is_async)
    assert isinstance(err, AlreadyApplied) and err.code is grpc.StatusCode.ABORTED
    assert err.lengths == {("s", 1): 7}
    assert "an earlier attempt applied" in err.message
    assert names == ["AppendAndAttend", "AppendAndAttend", "GetSession"]
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, AlreadyApplied) and again.lengths == err.lengths


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("lengths", [[0, 9], [0, 5], [0, 6]])
def test_aborted_retry_with_another_length_is_the_aborted_itself(no_backoff, is_async, lengths):
    err, names, _ = run_retry([UNAVAILABLE, ABORTED], lengths, is_async=is_async)
    assert type(err) is Q8KVError and err.code is grpc.StatusCode.ABORTED
    assert err.message == ABORTED.details()
    assert names[-1] == "GetSession"


@pytest.mark.parametrize("is_async", [False, True])
def test_aborted_first_answer_is_a_conflict_not_retried(no_backoff, is_async):
    err, names, _ = run_retry([ABORTED], [0, 7], is_async=is_async)
    assert type(err) is Q8KVError and err.code is grpc.StatusCode.ABORTED
    assert names == ["AppendAndAttend"]


@pytest.mark.parametrize("is_async", [False, True])
def test_retries_stop_at_the_count_and_skip_clear_errors(no_backoff, is_async):
    err, names, _ = run_retry([UNAVAILABLE] * 3, [0, 0], retries=2, is_async=is_async)
    assert err.code is grpc.StatusCode.UNAVAILABLE and names == ["AppendAndAttend"] * 3
    not_found = FakeRpcError(grpc.StatusCode.NOT_FOUND, "session_id: no session 's'")
    err, names, _ = run_retry([not_found, "ok"], [0, 0], is_async=is_async)
    assert err.code is grpc.StatusCode.NOT_FOUND and names == ["AppendAndAttend"]
    err, names, _ = run_retry([UNAVAILABLE, "ok"], [0, 0], retries=0, is_async=is_async)
    assert err.code is grpc.StatusCode.UNAVAILABLE and names == ["AppendAndAttend"]


@pytest.mark.parametrize("is_async", [False, True])
def test_retries_refuse_unconditional_items_before_sending(is_async):
    err, names, _ = run_retry(["ok"], [0, 0], expected=None, is_async=is_async)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.message.startswith("items[0].expected_length: expected one with retries=3")
    assert names == []
    err, names, _ = run_retry(["ok"], [0, 0], retries=-1, is_async=is_async)
    assert err.message == "retries: expected >= 0, got -1" and names == []


def test_applied_needs_conditional_items():
    q, kv = rand((1, 8, 64)), rand((1, 2, 64))
    with Client("127.0.0.1:1") as c:
        c._stub = RetryStub([], [0, 0])
        with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: items\[1\]\.expected_length: "
                           "expected one to tell whether they applied, got none"):
            c.applied([("s", 0, q, kv, kv, 3), ("s", 1, q, kv, kv)])
        assert c.applied([("s", 1, q, kv, kv, 0)]) is False  # layer 1 is at 0, not 1
        assert c._stub.names() == ["GetSession"]
        c._stub = RetryStub([], [4, 1])
        assert c.applied([("s", 0, q, kv, kv, 2), ("s", 0, q, kv, kv, 3), ("s", 1, q, kv, kv, 0)])
        assert not c.applied([("s", 0, q, kv, kv, 2)])  # it would leave 3: the 4th is not its


def test_applied_lengths_follow_several_items_on_one_layer():
    q, kv = rand((3, 8, 64)), rand((3, 2, 64))
    items = m.batch_items([("s", 0, q, kv, kv, 4), ("s", 0, q, kv, kv, 7), ("t", 2, q, kv, kv, 0)])
    assert m.applied_lengths(items) == {("s", 0): 10, ("t", 2): 3}


# --- attend_batch: the plan (checks, cutting to the limit) and the calls ----------------


def _plan(sessions, n, limit, dtype=np.float32, heads=(8, 2, 64), expected=None, ids=None):
    h, kvh, d = heads
    ids = ids or [f"s{b}" for b in range(sessions)]
    q = rand((sessions, n, h, d), dtype)
    k, v = rand((sessions, n, kvh, d), dtype), rand((sessions, n, kvh, d), dtype)
    return BatchPlan(3, ids, q, k, v, expected, limit)


@pytest.mark.parametrize(
    ("sessions", "n", "limit", "dtype", "heads"),
    [
        (5, 7, 2**20, np.float32, (8, 2, 64)),  # fits: one call
        (24, 16, 256 * 1024, np.float32, (8, 2, 64)),  # by sessions
        (3, 170, 256 * 1024, np.float32, (8, 2, 64)),  # by tokens
        (64, 300, 2**20, np.float16, (4, 1, 32)),  # by tokens, then groups of sessions
        (2, 41, 8192, ml_dtypes.bfloat16, (8, 2, 64)),  # 2 tokens a call
    ],
)
def test_batch_plan_covers_each_row_and_token_once_in_order_within_the_limit(
    sessions, n, limit, dtype, heads
):
    ids = [f"{b:03d}-" + "x" * 124 for b in range(sessions)]  # the longest ids there are
    expected = [int(e) for e in rng.integers(0, 1000, sessions)]
    plan = _plan(sessions, n, limit, dtype, heads, expected, ids)
    covered = np.zeros((sessions, n), np.int64)
    next_token = [0] * sessions  # each session's chunks arrive in token order
    fits = plan.message_bytes(sessions, n) <= limit
    assert (len(plan.parts) == 1) is fits
    for i, part in enumerate(plan.parts):
        r, t = part.rows, part.tokens
        assert part.index == i and r.stop > r.start and t.stop > t.start
        covered[r, t] += 1
        for b in range(r.start, r.stop):
            assert next_token[b] == t.start
            next_token[b] = t.stop
        request = plan.request(part)
        assert list(request.session_ids) == ids[r]
        assert list(request.expected_lengths) == [e + t.start for e in expected[r]]
        np.testing.assert_array_equal(decode(request.q), plan.q[r, t])
        np.testing.assert_array_equal(decode(request.v), plan.v[r, t])
        # The largest envelope there is: a stream message with the largest request id,
        # and the answer with the largest lengths.
        message = pb.AppendAndAttendStreamRequest(request_id=2**64 - 1, batch=request)
        rows, tokens = r.stop - r.start, t.stop - t.start
        output = np.ones((rows, tokens, *plan.q.shape[2:]), plan.q.dtype)
        answer_ = pb.AppendAndAttendStreamResponse(
            request_id=2**64 - 1,
            batch=pb.AttendBatchResponse(output=encode(output), lengths=[2**63 - 1] * rows),
        )
        assert message.ByteSize() <= limit and answer_.ByteSize() <= limit
    assert (covered == 1).all()


def test_batch_plan_refuses_what_cannot_fit_and_checks_its_input():
    with pytest.raises(Q8KVError) as info:
        _plan(2, 3, 4096)  # one token of one session: 3072 bytes + ids + envelope
    assert info.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.message.startswith("max_message_bytes: expected at least 41")
    assert "(one token of one session: 3072 bytes of q, k and v" in info.value.message
    assert "got 4096; this call needs" in info.value.message
    q, kv = rand((2, 1, 8, 64)), rand((2, 1, 2, 64))
    for sessions, pattern in [
        ("ab", r"sessions: expected a sequence of session handles or ids, got str"),
        (["a", ""], r"sessions\[1\]: expected a session handle or a non-empty id"),
        (["a", "a"], r"sessions\[1\]: expected each session once, got 'a' again"),
        (["a"], r"q\.shape\[0\]: expected 1 \(one row per session\), got 2"),
    ]:
        with pytest.raises(Q8KVError, match=f"^INVALID_ARGUMENT: {pattern}"):
            BatchPlan(0, sessions, q, kv, kv, None, 2**20)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: q\.shape: expected 4 dim"):
        BatchPlan(0, ["a", "b"], q[0], kv, kv, None, 2**20)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: v\.shape: expected \[2, 1, "):
        BatchPlan(0, ["a", "b"], q, kv, kv[:, :, :1], None, 2**20)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: k\.dtype: expected float32"):
        BatchPlan(0, ["a", "b"], q, kv.astype(np.int8), kv, None, 2**20)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: expected_lengths\[1\]: exp"):
        BatchPlan(0, ["a", "b"], q, kv, kv, [0, "x"], 2**20)


def test_batch_plan_errors_of_a_split_call_name_the_part_and_the_callers_index():
    plan = _plan(12, 16, 256 * 1024)
    assert [(p.rows.start, p.rows.stop) for p in plan.parts] == [(0, 4), (4, 8), (8, 12)]
    error = Q8KVError(grpc.StatusCode.NOT_FOUND, "batch[1] (session 's9'): not found", 7)
    failed = plan.failed(plan.parts[2], error)
    assert failed.code is grpc.StatusCode.NOT_FOUND and failed.request_id == 7
    assert failed.message == (
        "attend_batch: part 3 of 3 (sessions[8:12], tokens[0:16]) of a call split to fit "
        "max_message_bytes 262144 failed (parts 1-2 applied, later parts not sent): "
        "batch[9] (session 's9'): not found"
    )
    applied = plan.failed(plan.parts[0], AlreadyApplied("an earlier attempt", {("s0", 3): 5}))
    assert isinstance(applied, AlreadyApplied) and applied.lengths == {("s0", 3): 5}
    assert "(nothing applied, later parts not sent)" in applied.message
    whole = _plan(2, 1, 2**20)
    assert whole.failed(whole.parts[0], error) is error  # a call not split: as it came


def _batch_reply(request):
    """Echo q as the output; each length: expected + n (or n + 16)."""
    q = decode(request.q)
    n = q.shape[1]
    grown = [e + n for e in request.expected_lengths] or [n + 16] * q.shape[0]
    return pb.AttendBatchResponse(output=encode(q), lengths=grown)


class BatchStub:
    """AttendBatch answers from ``script`` in turn (an exception or 'ok'); GetSession
    reports ``lengths`` for every session."""

    def __init__(self, script, lengths, is_async=False):
        self.log, self.script = [], list(script)

        def attend(request):
            step = self.script.pop(0)
            return _batch_reply(request) if step == "ok" else step

        def get(request):
            info = pb.SessionInfo(session_id=request.session_id, layer_lengths=lengths)
            return pb.GetSessionResponse(session=info)

        self.AttendBatch = FakeUnary(self.log, "AttendBatch", attend, is_async)
        self.GetSession = FakeUnary(self.log, "GetSession", get, is_async)


def run_batch(script, lengths, is_async, limit=2**20, **kwargs):
    """attend_batch of 2 tokens for sessions 'a' and 'b' on layer 1 -> (the result or the
    exception, the stub's log)."""
    q, kv = rand((2, 2, 8, 64), np.float16), rand((2, 2, 2, 64))
    stub = BatchStub(script, lengths, is_async)

    async def main():
        async with AsyncClient("127.0.0.1:1", token="tok", max_message_bytes=limit) as c:
            c._stub = stub
            return await c.attend_batch(1, ["a", c.session("b")], q, kv, kv, **kwargs)

    try:
        if is_async:
            outcome = asyncio.run(main())
        else:
            with Client("127.0.0.1:1", token="tok", max_message_bytes=limit) as c:
                c._stub = stub
                outcome = c.attend_batch(1, ["a", c.session("b")], q, kv, kv, **kwargs)
    except Q8KVError as exc:
        outcome = exc
    return outcome, stub.log


@pytest.mark.parametrize("is_async", [False, True])
def test_attend_batch_call_routing_and_answer(is_async):
    out, log = run_batch(["ok"], [], is_async)
    assert isinstance(out, np.ndarray) and out.shape == (2, 2, 8, 64) and out.dtype == np.float16
    ((name, request, kwargs),) = log
    assert name == "AttendBatch" and list(request.session_ids) == ["a", "b"]
    assert request.layer == 1 and list(request.expected_lengths) == []
    assert ("x-session-id", "a") in kwargs["metadata"]  # routed by the first session
    assert ("authorization", "Bearer tok") in kwargs["metadata"]
    result, log = run_batch(["ok"], [], is_async, expected_lengths=[3, 0], with_lengths=True)
    assert isinstance(result, BatchResult) and result.lengths == [5, 2]
    assert list(log[0][1].expected_lengths) == [3, 0]


@pytest.mark.parametrize("is_async", [False, True])
def test_attend_batch_split_by_a_small_limit_reassembles_the_parts(is_async):
    # a row of one session: 2 tokens x (8*64*2 + 2*2*64*4) = 4096 bytes; one session a call
    result, log = run_batch(["ok"] * 2, [], is_async, limit=6000, expected_lengths=[3, 0],
                            with_lengths=True)
    assert [list(r.session_ids) for _, r, _ in log] == [["a"], ["b"]]
    assert [_session_header(kw) for _, _, kw in log] == ["a", "b"]  # each part its own
    assert result.lengths == [5, 2] and result.output.shape == (2, 2, 8, 64)
    result, log = run_batch(["ok"] * 4, [], is_async, limit=4000, expected_lengths=[3, 0],
                            with_lengths=True)  # one token a call
    assert [(list(r.session_ids), list(r.expected_lengths)) for _, r, _ in log] == [
        (["a"], [3]), (["b"], [0]), (["a"], [4]), (["b"], [1])
    ]
    assert result.lengths == [5, 2]


@pytest.mark.parametrize("is_async", [False, True])
def test_attend_batch_retries(no_backoff, is_async):
    out, log = run_batch([UNAVAILABLE, "ok"], [0, 0], is_async, expected_lengths=[3, 0],
                         retries=2)
    assert isinstance(out, np.ndarray) and [n for n, _, _ in log] == ["AttendBatch"] * 2
    assert log[0][1] == log[1][1]
    err, log = run_batch([UNAVAILABLE, ABORTED], [0, 2], is_async, expected_lengths=[0, 0],
                         retries=2)
    assert isinstance(err, AlreadyApplied) and err.lengths == {("a", 1): 2, ("b", 1): 2}
    assert [n for n, _, _ in log] == ["AttendBatch", "AttendBatch", "GetSession", "GetSession"]
    err, log = run_batch([UNAVAILABLE, ABORTED], [0, 2], is_async, expected_lengths=[0, 1],
                         retries=2)
    assert type(err) is Q8KVError and err.code is grpc.StatusCode.ABORTED  # b moved
    err, log = run_batch(["ok"], [0, 0], is_async, retries=1)
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and log == []
    assert err.message.startswith("expected_lengths: expected one per session with retries=1")


# --- routing_key: one header for sessions that must share a replica -------------------


class _Export:
    """ExportSession: no chunks, as a list (sync) or an async iterator (asyncio)."""

    def __init__(self, log, is_async):
        self.log, self.is_async = log, is_async

    def __call__(self, request, **kwargs):
        self.log.append(("ExportSession", request, kwargs))

        async def none():
            for chunk in ():
                yield chunk

        return none() if self.is_async else []


def _routed_calls(is_async: bool, limit: int = 2**20) -> list:
    """Every call of a group under routing key "grp": created, used by its handles, and
    batched (AttendBatch split by ``limit``), plus a retry's check -> the stub's log."""
    log: list = []
    q1, kv1 = rand((1, 8, 64), np.float16), rand((1, 2, 64))
    q, kv = rand((2, 2, 8, 64), np.float16), rand((2, 2, 2, 64))
    stub = FakeStub(log, is_async)
    failures = iter([UNAVAILABLE, ABORTED])  # of the conditional batch: then a check

    def attend(request):
        return next(failures) if request.expected_lengths else _batch_reply(request)

    stub.AttendBatch = FakeUnary(log, "AttendBatch", attend, is_async)
    stub.ExportSession = _Export(log, is_async)
    async def done(call):
        try:
            value = call()
            return await value if is_async else value
        except Q8KVError as exc:
            return exc

    async def main():
        c = (AsyncClient if is_async else Client)("127.0.0.1:1", max_message_bytes=limit)
        c._stub = stub
        a = await done(lambda: c.create_session(**GEOMETRY, session_id="a", routing_key="grp"))
        b = c.session("b", routing_key="grp")
        assert a.routing_key == b.routing_key == "grp" and repr(b).endswith("'grp')")
        for call in (lambda: a.append_and_attend(0, q1, kv1, kv1), lambda: a.dequantize(0),
                     lambda: a.truncate(0), a.info, a.export,
                     lambda: c.append_and_attend_batch([(b, 0, q1, kv1, kv1)],
                                                       routing_key="grp"),
                     lambda: c.attend_batch(1, [a, b], q, kv, kv, routing_key="grp")):
            assert not isinstance(await done(call), Q8KVError)
        err = await done(lambda: c.attend_batch(1, ["a", "b"], q, kv, kv, expected_lengths=[0, 0],
                                                retries=1, routing_key="grp"))
        assert err.code is grpc.StatusCode.ABORTED  # after the check of where it went
        assert await done(b.delete) == 65536
        await c.close() if is_async else c.close()

    asyncio.run(main())
    return log


@pytest.mark.parametrize("is_async", [False, True])
def test_routing_key_is_the_header_of_every_call_of_its_sessions(is_async):
    log = _routed_calls(is_async)
    names = [n for n, _, _ in log]
    assert {"CreateSession", "AppendAndAttend", "Dequantize", "TruncateSession", "GetSession",
            "ExportSession", "AttendBatch", "DeleteSession"} <= set(names)
    assert [_session_header(kw) for _, _, kw in log] == ["grp"] * len(log)
    create = log[0][1]
    assert create.session_id == "a"  # the id is the session's; only the route is shared


def test_routing_key_routes_every_part_of_a_split_batch():
    log = _routed_calls(False, limit=6000)  # one session a call
    parts = [(list(r.session_ids), _session_header(kw)) for n, r, kw in log if n == "AttendBatch"]
    assert parts[:2] == [(["a"], "grp"), (["b"], "grp")]


@pytest.mark.parametrize("is_async", [False, True])
@pytest.mark.parametrize("key", ["", "a b", "é", "x" * 129, "a\nb", 7])
def test_invalid_routing_key_is_refused_before_sending(is_async, key):
    log: list = []
    q, kv = rand((2, 2, 8, 64), np.float16), rand((2, 2, 2, 64))

    async def main(c):
        async def maybe(value):
            return await value if is_async else value

        calls = [
            lambda: c.create_session(**GEOMETRY, routing_key=key),
            lambda: c.attend_batch(1, ["a", "b"], q, kv, kv, routing_key=key),
            lambda: c.append_and_attend_batch([("a", 0, q[0], kv[0], kv[0])], routing_key=key),
            lambda: c.session("a", routing_key=key),
        ]
        for call in calls:
            with pytest.raises(Q8KVError) as err:
                await maybe(call())
            assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.message.startswith("routing_key: expected 1-128 characters")
            assert repr(key) in err.value.message

    async def run():
        client = AsyncClient("127.0.0.1:1") if is_async else Client("127.0.0.1:1")
        client._stub = FakeStub(log, is_async)
        await main(client)
        await client.close() if is_async else client.close()

    asyncio.run(run())
    assert log == []


def test_stream_book_builds_batch_messages_and_decodes_their_answers():
    book = sm.StreamBook()
    q, kv = rand((2, 1, 8, 64)), rand((2, 1, 2, 64))
    batch = m.batch_request(["a", "b"], 0, q, kv, kv, [4, 0])
    rid, request = book.build_batch(batch)
    assert rid == 1 and request.request_id == 1 and request.batch == batch
    assert not request.items
    book.sent(rid)
    book.arrived[rid] = pb.AppendAndAttendStreamResponse(
        request_id=rid, batch=pb.AttendBatchResponse(output=encode(q), lengths=[5, 1])
    )
    result = book.take(rid)
    assert isinstance(result, BatchResult) and result.lengths == [5, 1]
    np.testing.assert_array_equal(result.output, q)
    broken = pb.AppendAndAttendStreamResponse(
        request_id=2, batch=pb.AttendBatchResponse(output=pb.Tensor(dtype=99))
    )
    with pytest.raises(Q8KVError, match=r"^INTERNAL: batch\.output\.dtype: expected FLOAT32"):
        sm.stream_results(broken)


# --- largest_magnitude: the server's one-pass finiteness and magnitude check -----------


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_magnitude_matches_numpy(dtype):
    top = 4 if dtype == np.float16 else 37  # the largest power of ten the dtype holds
    x = (rand((5, 3, 32)) * 10.0 ** rng.integers(-3, top)).astype(dtype)
    assert np.isfinite(x.astype(np.float64)).all()
    assert largest_magnitude(x) == float(np.max(np.abs(x.astype(np.float64))))
    assert largest_magnitude(-np.abs(x)) == largest_magnitude(x)
    assert largest_magnitude(x[:0]) == 0.0
    for bad, expected in ((np.inf, np.inf), (-np.inf, np.inf)):
        y = x.copy()
        y[4, 2, 31] = bad
        assert largest_magnitude(y) == expected
    y = x.copy()
    y[0, 1, 2] = np.nan
    assert np.isnan(largest_magnitude(y)) and np.isnan(largest_magnitude(-y))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_largest_magnitude_of_every_16_bit_pattern(dtype):
    """Alone and in random mixes of signs: -0.0, subnormals, Inf and every NaN included
    (the check reads the unsigned and the signed maximum of the bits)."""
    every = np.arange(1 << 16, dtype=np.uint16).view(dtype)
    with np.errstate(invalid="ignore"):
        wide = np.abs(every.astype(np.float64))

    def expected(picked: np.ndarray) -> float:
        values = wide[picked]
        return math.nan if np.isnan(values).any() else float(values.max())

    for i in range(1 << 16):
        got, want = largest_magnitude(every[i : i + 1]), expected(np.array([i]))
        assert got == want or (math.isnan(got) and math.isnan(want)), (dtype, i)
    for _ in range(2000):
        picked = rng.integers(0, 1 << 16, int(rng.integers(1, 40)))
        got, want = largest_magnitude(every[picked]), expected(picked)
        assert got == want or (math.isnan(got) and math.isnan(want)), (dtype, picked)


# --- import: token chunks split to the receiving server's message limit ------------------


def chunk_stream(count=50, kvh=2, dim=64, trailer=None):
    geometry = pb.Geometry(num_layers=1, num_heads=4, num_kv_heads=kvh, head_dim=dim,
                           max_len=4096)
    header = pb.SessionChunk(
        header=pb.SessionHeader(format_version=1, session_id="s", geometry=geometry,
                                layer_lengths=[count + 3])
    )
    codes = rng.integers(-127, 128, (2, kvh, count, dim), dtype=np.int8)
    scales = rng.uniform(0.01, 1.0, (2, kvh, count, dim // 32)).astype("<f4")
    tokens = [
        pb.SessionChunk(tokens=pb.TokenChunk(layer=0, start=0, count=count, codes=codes.tobytes(),
                                             scales=scales.tobytes())),
        pb.SessionChunk(tokens=pb.TokenChunk(layer=0, start=count, count=3,
                                             codes=b"\1" * (2 * kvh * 3 * dim),
                                             scales=b"\0" * (2 * kvh * 3 * dim // 8))),
    ]
    digest = hashlib.sha256()
    for chunk in [header, *tokens]:
        digest.update(chunk.SerializeToString(deterministic=True))
    end = pb.SessionChunk(trailer=pb.SessionTrailer(sha256=trailer or digest.digest()))
    return [header, *tokens, end], codes, scales


def test_fit_chunks_splits_what_exceeds_the_limit_and_rehashes():
    chunks, codes, scales = chunk_stream()
    per_token = 2 * 2 * 64 * 9 // 8  # codes + scales
    limit = m.ENVELOPE_BYTES + 16 * per_token
    fitted = m.fit_chunks(chunks, limit)
    assert all(c.ByteSize() <= limit for c in fitted)
    tokens = [c.tokens for c in fitted[1:-1]]
    assert [(t.start, t.count) for t in tokens] == [(0, 16), (16, 16), (32, 16), (48, 2), (50, 3)]
    got = np.concatenate(
        [np.frombuffer(t.codes, np.int8).reshape(2, 2, t.count, 64) for t in tokens[:4]], axis=2
    )
    np.testing.assert_array_equal(got, codes)
    got = np.concatenate(
        [np.frombuffer(t.scales, "<f4").reshape(2, 2, t.count, 2) for t in tokens[:4]], axis=2
    )
    np.testing.assert_array_equal(got, scales)
    assert fitted[0] == chunks[0] and fitted[-2] == chunks[2]
    digest = hashlib.sha256()
    for chunk in fitted[:-1]:
        digest.update(chunk.SerializeToString(deterministic=True))
    assert fitted[-1].trailer.sha256 == digest.digest()
    assert m.fit_chunks(chunks, 1 << 20) is chunks  # everything fits: sent as it came


def test_fit_chunks_refuses_a_stream_damaged_before_it_splits():
    chunks, _, _ = chunk_stream(trailer=b"\7" * 32)
    with pytest.raises(Q8KVError, match=r"^INVALID_ARGUMENT: trailer\.sha256: checksum mismatch"):
        m.fit_chunks(chunks, 4096)
    chunks, _, _ = chunk_stream()
    assert m.fit_chunks(chunks[:-1], 4096) == chunks[:-1]  # no trailer: the server refuses it


# --- the two shells mirror each other; the import rules ---------------------------------

SHELLS = [(Client, AsyncClient), (Session, AsyncSession), (Stream, AsyncStream)]
NO_ROUND_TRIP = {"session", "stream"}  # handles made locally: plain methods in both shells
# Methods each pair must have (the packed batch of issue 12 on the clients and streams).
REQUIRED = {Client: {"attend_batch"}, Stream: {"attend_batch", "send_batch", "recv"}}


def public_methods(cls):
    names = [n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))]
    return {n: getattr(cls, n) for n in names}


@pytest.mark.parametrize("sync_cls, async_cls", SHELLS, ids=lambda c: c.__name__)
def test_sync_and_async_shells_expose_the_same_methods_and_signatures(sync_cls, async_cls):
    blocking, awaited = public_methods(sync_cls), public_methods(async_cls)
    assert sorted(blocking) == sorted(awaited)
    assert REQUIRED.get(sync_cls, set()) <= set(blocking)
    for name, method in blocking.items():
        twin = awaited[name]
        # parameters only: the return types differ by design (Session vs AsyncSession)
        params = list(inspect.signature(method).parameters.values())
        assert params == list(inspect.signature(twin).parameters.values()), name
        assert not inspect.iscoroutinefunction(method), name
        assert inspect.iscoroutinefunction(twin) is (name not in NO_ROUND_TRIP), name
    assert hasattr(sync_cls, "__enter__") is hasattr(async_cls, "__aenter__")
    assert hasattr(sync_cls, "__exit__") is hasattr(async_cls, "__aexit__")


def q8kv_imports(path: Path, package: str) -> set[str]:
    """The q8kv names a file imports, relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) + 1 - node.level]
            parts = (parts if node.level else []) + ([node.module] if node.module else [])
            found.update(".".join([*parts, alias.name]) for alias in node.names)
    return {name for name in found if name.startswith("q8kv.")}


def test_import_rules_of_the_contract_and_the_client():
    contract = Path(q8kv.__file__).parent
    assert q8kv_imports(contract / "wire.py", "q8kv") == {"q8kv.v1.kvcache_pb2"}
    assert q8kv_imports(contract / "format.py", "q8kv") == set()
    client = Path(inspect.getfile(Client)).parent  # the folder of q8kv.client
    imported = {}
    for path in sorted(client.rglob("*.py")):
        package = ".".join(["q8kv", "client", *path.parent.relative_to(client).parts])
        imported[str(path.relative_to(client))] = q8kv_imports(path, package)
    assert "q8kv.client.core.ClientCore" in imported["sync.py"]  # relative ones resolved
    assert "q8kv.wire.fill" in imported["messages.py"]
    assert not {n for names in imported.values() for n in names if n.startswith("q8kv.server")}
