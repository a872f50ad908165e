"""Sessions that move: ExportSession from one server, ImportSession into another with
another page size, bit for bit; appends continue there. A stream with a bad checksum
or cut short creates nothing; an existing id is ALREADY_EXISTS; another tenant cannot
export your session."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.scrape import metric
from harness.server import ServerProcess
from harness.sessions import caches, fill
from harness.tensors import qkv
from reference import attention_ref, rel_l2

from q8kv.client import Client, Q8KVError
from q8kv.v1 import kvcache_pb2 as pb

TOKEN_A = "transfer-alpha-0123456"
TOKEN_B = "transfer-bravo-6543210"
TOKENS = {"Q8KV_AUTH_TOKENS": f"{TOKEN_A} alpha,{TOKEN_B} bravo"}
# 2 * 8 * 128 code bytes per token: 2,048 tokens per 4 MiB chunk, so layer 0 spans two.
GEOM = Geo(num_layers=3, num_heads=8, num_kv_heads=8, head_dim=128, max_len=8192)
LENGTHS = [2100, 37, 0]


@pytest.fixture(scope="module")
def servers():
    src = ServerProcess("--page-bytes", "65536", env=TOKENS)
    dst = ServerProcess("--page-bytes", "16384", env=TOKENS)
    yield src, dst
    src.stop()
    dst.stop()


@pytest.fixture(scope="module")
def exported(servers):
    src, _ = servers
    with Client(src.address, token=TOKEN_A, timeout=60) as a:
        s = a.create_session(**GEOM, session_id="moving", softmax_scale=0.07, ttl_seconds=900)
        fill(s, np.random.default_rng(5), LENGTHS, GEOM)
        chunks = a.export_session(s)
        return chunks, caches(s, 3), s.info()


def test_export_stream_shape(exported):
    chunks, _, info = exported
    kinds = [c.WhichOneof("part") for c in chunks]
    assert kinds[0] == "header" and kinds[-1] == "trailer"
    assert set(kinds[1:-1]) == {"tokens"}
    header = chunks[0].header
    assert header.session_id == "moving" and list(header.layer_lengths) == LENGTHS
    assert header.softmax_scale == pytest.approx(0.07) and header.ttl_seconds == 900
    counts = [(c.tokens.layer, c.tokens.start, c.tokens.count) for c in chunks[1:-1]]
    assert counts == [(0, 0, 2048), (0, 2048, 52), (1, 0, 37)]
    assert len(chunks[-1].trailer.sha256) == 32


def test_import_into_a_server_with_another_page_size(servers, exported):
    src, dst = servers
    chunks, before, info = exported
    with Client(dst.address, token=TOKEN_A, timeout=60) as a:
        moved = a.import_session(chunks)
        assert moved.id == "moving"
        got = moved.info()
        assert got.layer_lengths == LENGTHS == info.layer_lengths
        assert got.softmax_scale == info.softmax_scale and got.ttl_seconds == 900
        assert got.cache_bytes == info.cache_bytes
        assert got.reserved_bytes != info.reserved_bytes  # other pages, same tokens
        assert caches(moved, 3) == before  # bit for bit

        # Appends continue on the new server, against the moved cache.
        rng = np.random.default_rng(6)
        with Client(src.address, token=TOKEN_A, timeout=60) as a_src:
            original = a_src.session("moving")
            for layer, n in ((0, 1), (1, 5), (2, 3), (0, 4)):
                q, k, v = qkv(rng, n, GEOM)
                start = moved.length(layer)
                out = moved.append_and_attend(layer, q, k, v)
                keys, values = moved.dequantize(layer)
                ref = attention_ref(q, keys, values, start, got.softmax_scale)
                assert rel_l2(out, ref) < 1e-5
                # The same append on the source gives the same cache and output.
                out_src = original.append_and_attend(layer, q, k, v)
                np.testing.assert_allclose(out, out_src, rtol=1e-5, atol=1e-6)
            assert caches(moved, 3) == caches(original, 3)
        # Moved back: still bit for bit.
        round_trip = a.export_session(moved)
        assert round_trip[0].header.layer_lengths == [2105, 42, 3]
        moved.delete()


def corrupt(chunks, index, flip=0):
    """A copy of ``chunks`` with one byte of chunk ``index``'s codes flipped."""
    out = [pb.SessionChunk.FromString(c.SerializeToString()) for c in chunks]
    codes = bytearray(out[index].tokens.codes)
    codes[flip] ^= 0x40
    out[index].tokens.codes = bytes(codes)
    return out


def rehash(chunks):
    """``chunks`` with a trailer that matches them: what a careless (or hostile) sender
    makes; the checks behind the checksum must still refuse the stream."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk.SerializeToString(deterministic=True))
    return [*chunks, pb.SessionChunk(trailer=pb.SessionTrailer(sha256=digest.digest()))]


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda c: corrupt(c, 1), "checksum mismatch"),
        (lambda c: corrupt(c, 3, flip=-1), "checksum mismatch"),
        (lambda c: c[:-1], "truncated"),
        (lambda c: c[:2], "truncated"),
        (lambda c: c[:2] + c[-1:], "checksum mismatch"),
        (lambda c: rehash(c[:2] + c[3:-1]), "layer 0 expected 2100 tokens, got 2048"),
        (lambda c: c[:1] + c[2:], "tokens.start: expected 0"),
        (lambda c: [c[0]] + c[1:3][::-1] + c[3:], "tokens.start"),
        (lambda c: c + c[-1:], "nothing after the trailer"),
        (lambda c: c[1:], "expected a header first"),
    ],
    ids=["flipped-code", "flipped-last", "no-trailer", "cut-mid-layer", "missing-chunk",
         "missing-chunk-rehashed",
         "first-chunk-lost", "reordered", "extra-trailer", "no-header"],
)
def test_bad_streams_create_nothing(servers, exported, mangle, message):
    _, dst = servers
    chunks, _, _ = exported
    used = metric(dst.metrics_url, "q8kv_pool_used_bytes")
    active = metric(dst.metrics_url, "q8kv_sessions_active")
    with Client(dst.address, token=TOKEN_A, timeout=60) as a:
        with pytest.raises(Q8KVError) as err:
            a.import_session(mangle(chunks))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.message
        with pytest.raises(Q8KVError) as err:
            a.session_info("moving")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert a.list_sessions() == []
    assert metric(dst.metrics_url, "q8kv_pool_used_bytes") == used
    assert metric(dst.metrics_url, "q8kv_sessions_active") == active


def test_import_of_an_existing_id_is_already_exists(servers, exported):
    _, dst = servers
    chunks, before, _ = exported
    with Client(dst.address, token=TOKEN_A, timeout=60) as a:
        s = a.create_session(**GEOM, session_id="moving")
        s.append_and_attend(1, *qkv(np.random.default_rng(7), 2, GEOM))
        mine = caches(s, 3)
        with pytest.raises(Q8KVError) as err:
            a.import_session(chunks)
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert s.info().layer_lengths == [0, 2, 0] and caches(s, 3) == mine
        # Another tenant's namespace is its own: bravo may import the same id.
        with Client(dst.address, token=TOKEN_B, timeout=60) as b:
            theirs = b.import_session(chunks)
            assert caches(theirs, 3) == before
            theirs.delete()
        assert caches(s, 3) == mine
        s.delete()


def test_another_tenant_cannot_export_your_session(servers, exported):
    src, _ = servers
    with Client(src.address, token=TOKEN_B, timeout=60) as b:
        with pytest.raises(Q8KVError) as err:
            b.export_session("moving")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert err.value.message == "session_id: no session 'moving'"
    with Client(src.address, timeout=60) as anonymous:
        with pytest.raises(Q8KVError) as err:
            anonymous.export_session("moving")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


# -- chunks sized to the message limit -----------------------------------------------------

SMALL_LIMIT = 1024 * 1024


def layer_tokens(chunks, layer):
    """One layer's codes and scales, joined over its chunks (whatever their boundaries)."""
    kvh, dim = GEOM.num_kv_heads, GEOM.head_dim
    parts = [c.tokens for c in chunks if c.WhichOneof("part") == "tokens"]
    parts = [p for p in parts if p.layer == layer]
    assert [p.start for p in parts] == list(np.cumsum([0] + [p.count for p in parts])[:-1])
    if not parts:
        return b"", b""
    codes = np.concatenate(
        [np.frombuffer(p.codes, np.int8).reshape(2, kvh, p.count, dim) for p in parts], axis=2
    )
    scales = np.concatenate(
        [np.frombuffer(p.scales, "<f4").reshape(2, kvh, p.count, dim // 32) for p in parts],
        axis=2,
    )
    return codes.tobytes(), scales.tobytes()


def test_chunks_fit_a_small_message_limit_both_ways(servers, start_server):
    """A long layer (4,000 tokens: 9 MiB of Q8) moves from a server with the default limit
    to one started with --max-message-bytes 1MiB, is exported from there and imported back:
    every message within 1 MiB, the tokens bit for bit."""
    big, _ = servers
    small = start_server("--max-message-bytes", "1MiB", env=TOKENS)
    lengths = [4000, 7, 0]
    rng = np.random.default_rng(8)
    with (
        Client(big.address, token=TOKEN_A, timeout=60) as on_big,
        Client(small.address, token=TOKEN_A, timeout=60, max_message_bytes=SMALL_LIMIT) as on_small,
    ):
        s = on_big.create_session(**GEOM, session_id="long-layer")
        fill(s, rng, lengths, GEOM)
        chunks = on_big.export_session(s)
        assert max(c.ByteSize() for c in chunks) > SMALL_LIMIT  # too big for the small one
        want = [layer_tokens(chunks, layer) for layer in range(3)]

        moved = on_small.import_session(chunks)  # split by the client to its own limit
        out = moved.export()  # sized by the server to its limit
        assert all(c.ByteSize() <= SMALL_LIMIT for c in out)
        assert len(out) > len(chunks) and out[0].header.layer_lengths == lengths
        assert [layer_tokens(out, layer) for layer in range(3)] == want
        moved.delete()
        back = on_small.import_session(out)  # the small server's own export, imported back
        assert [layer_tokens(back.export(), layer) for layer in range(3)] == want
        # Appends go on against the moved cache, as on the original.
        q, k, v = qkv(rng, 2, GEOM)
        out_small = back.append_and_attend(1, q, k, v)
        np.testing.assert_allclose(out_small, s.append_and_attend(1, q, k, v), rtol=1e-5,
                                   atol=1e-6)
        back.delete()
        s.delete()


def test_a_limit_below_one_token_is_a_clear_error():
    from q8kv.server.cache import Geometry
    from q8kv.server.errors import ResourceExhausted
    from q8kv.server.persistence import transfer

    g = Geometry(1, 8, 8, 128, 64)
    assert transfer.tokens_per_chunk(g) == 2048  # 4 MiB of codes
    assert transfer.tokens_per_chunk(g, 512 * 1024 * 1024) == 2048
    assert transfer.tokens_per_chunk(g, SMALL_LIMIT) == (SMALL_LIMIT - 1024) // 2304
    with pytest.raises(ResourceExhausted, match=r"max_message_bytes: expected room for one "
                       r"token \(2304 bytes \+ 1024 of envelope\), got a limit of 3000 bytes"):
        transfer.tokens_per_chunk(g, 3000)
