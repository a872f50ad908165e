"""/metrics after a scripted workload: every metric the server exports has the value the
workload implies (bytes to the byte, the ratio, token, session, batch and RPC counts by
method and code, including the error codes the workload provokes).

The workload runs once per module against a real server subprocess with a known page size
and a small memory budget; each test checks one group of metrics on the same scrape.
"""

from __future__ import annotations

import time
from importlib import metadata

import grpc
import numpy as np
import pytest
from harness.geometry import Geo, page_bytes, pages_for
from harness.proc import listening_ports
from harness.rpc import SERVICE, Driver
from harness.scrape import Samples, scrape
from harness.server import TEST_BACKEND, ServerProcess

from q8kv import wire
from q8kv.server.backends.base import tokens_per_page
from q8kv.v1 import kvcache_pb2 as pb

PAGE_CODE_BYTES = 8192
POOL_PAGES = 24
GEO = Geo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=4096)
SHORT = Geo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=64)
T = tokens_per_page(PAGE_CODE_BYTES, GEO.num_kv_heads, GEO.head_dim)  # 32 tokens per page
C = grpc.StatusCode

# Final layer lengths once the workload is done (the TTL session and "b" are gone).
FINAL = {"a": [35, 35], "c": [33, 3]}
TOKENS_APPENDED = 5 + (40 + 40 + 3 * 2) + 10 + (33 + 1) + 2
# Successful device launches and the (session, layer) items they carried.
BATCHES = 1 + 4 + 1 + 1 + 2
ITEMS = 1 + (2 + 3 * 2) + 1 + 2 + 2
# Append jobs that reached the engine queue: the batches plus four refused there.
QUEUED = BATCHES + 4

# (method, code) -> calls; the handled/started/handling-seconds expectations.
HANDLED = {
    ("CreateSession", "OK"): 4,
    ("CreateSession", "INVALID_ARGUMENT"): 1,
    ("CreateSession", "ALREADY_EXISTS"): 1,
    ("AppendAndAttend", "OK"): 7,
    ("AppendAndAttend", "INVALID_ARGUMENT"): 2,
    ("AppendAndAttend", "NOT_FOUND"): 1,
    ("AppendAndAttend", "OUT_OF_RANGE"): 1,
    ("AppendAndAttend", "RESOURCE_EXHAUSTED"): 1,
    ("GetSession", "OK"): 1,
    ("GetSession", "NOT_FOUND"): 1,
    ("DeleteSession", "OK"): 1,
    ("DeleteSession", "NOT_FOUND"): 1,
    ("TruncateSession", "OK"): 1,
    ("Dequantize", "OK"): 1,
    ("Dequantize", "OUT_OF_RANGE"): 1,
    ("AppendAndAttendStream", "OK"): 1,
}
SESSION_IDS = ("ttl-1", "a", "b", "c", "nope")


def run_workload(d: Driver) -> None:
    # A session that expires after 1 s idle; the server's 1 s sweeper evicts it.
    d.create("ttl-1", GEO, ttl=1.0)
    d.attend(d.item("ttl-1", GEO, 0, 5))
    for sid in ("a", "b"):
        d.create(sid, GEO)
    d.create("c", SHORT)
    # a: prefill both layers in one call, then three decode steps of both layers.
    d.attend(d.item("a", GEO, 0, 40), d.item("a", GEO, 1, 40))
    for _ in range(3):
        d.attend(d.item("a", GEO, 0, 1), d.item("a", GEO, 1, 1))
    d.attend(d.item("b", GEO, 0, 10))
    assert d.stub.DeleteSession(pb.DeleteSessionRequest(session_id="b")).freed_bytes == (
        page_bytes(PAGE_CODE_BYTES)
    )
    d.attend(d.item("c", SHORT, 0, 33, dtype=np.float16), d.item("c", SHORT, 1, 1))
    info = d.stub.TruncateSession(pb.TruncateSessionRequest(session_id="a", length=35)).session
    assert list(info.layer_lengths) == [35, 35]
    stream = d.stub.AppendAndAttendStream(
        iter([
            pb.AppendAndAttendStreamRequest(request_id=i, items=[d.item("c", SHORT, 1, 1)])
            for i in (1, 2)
        ]),
        timeout=10,
    )
    replies = list(stream)
    assert [(r.request_id, r.error_code) for r in replies] == [(1, 0), (2, 0)]
    k = d.stub.Dequantize(pb.DequantizeRequest(session_id="a", layer=0)).k
    assert list(k.shape) == [GEO.num_kv_heads, 35, GEO.head_dim]
    assert d.stub.GetSession(pb.GetSessionRequest(session_id="c")).session.layer_lengths == [
        33, 3,
    ]

    # Provoked errors. Refused appends carry random data: the quantization-error sampler
    # must record only appends that landed.
    bad = Geo(head_dim=30)
    d.expect_error(C.INVALID_ARGUMENT, d.stub.CreateSession,
                   pb.CreateSessionRequest(session_id="bad", geometry=bad.pb()))
    d.expect_error(C.ALREADY_EXISTS, d.stub.CreateSession,
                   pb.CreateSessionRequest(session_id="a", geometry=GEO.pb()))
    nan = d.item("a", GEO, 0, 1)
    nan_k = np.full(GEO.num_kv_heads * GEO.head_dim, np.nan, "<f4")
    nan.k.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=nan.k.shape, data=nan_k.tobytes()))
    d.expect_error(C.INVALID_ARGUMENT, d.stub.AppendAndAttend,
                   pb.AppendAndAttendRequest(items=[nan]))
    misshaped = d.item("a", GEO, 0, 1)
    one_head_too_many = (1, GEO.num_kv_heads + 1, GEO.head_dim)
    misshaped.k.CopyFrom(wire.encode(np.ones(one_head_too_many, np.float32)))
    d.expect_error(C.INVALID_ARGUMENT, d.stub.AppendAndAttend,
                   pb.AppendAndAttendRequest(items=[misshaped]))
    d.expect_error(C.NOT_FOUND, d.stub.AppendAndAttend,
                   pb.AppendAndAttendRequest(items=[d.item("nope", GEO, 0, 1)]))
    d.expect_error(C.OUT_OF_RANGE, d.stub.AppendAndAttend,
                   pb.AppendAndAttendRequest(items=[d.item("c", SHORT, 0, 40)]))
    d.expect_error(C.RESOURCE_EXHAUSTED, d.stub.AppendAndAttend,
                   pb.AppendAndAttendRequest(items=[d.item("a", GEO, 0, 32 * 30)]))
    d.expect_error(C.NOT_FOUND, d.stub.GetSession, pb.GetSessionRequest(session_id="nope"))
    d.expect_error(C.NOT_FOUND, d.stub.DeleteSession, pb.DeleteSessionRequest(session_id="b"))
    d.expect_error(C.OUT_OF_RANGE, d.stub.Dequantize,
                   pb.DequantizeRequest(session_id="a", layer=0, start=0, end=1000))


@pytest.fixture(scope="module")
def scraped():
    server = ServerProcess(
        "--page-bytes", str(PAGE_CODE_BYTES),
        "--memory-budget", str(POOL_PAGES * page_bytes(PAGE_CODE_BYTES)),
        "--quant-error-sample-rate", "1",
    )
    driver = Driver(server.address)
    try:
        run_workload(driver)
        # Wait for the TTL sweeper (every 1 s) to evict the idle session.
        deadline = time.monotonic() + 10
        while True:
            samples = Samples(scrape(server.metrics_url))
            if samples.get("q8kv_sessions_active") == len(FINAL) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        yield samples
    finally:
        driver.close()
        server.stop()


def test_memory_gauges_to_the_byte(scraped):
    lengths = [n for layers in FINAL.values() for n in layers]
    assert T == 32
    assert scraped.get("q8kv_cache_bytes") == sum(GEO.q8_bytes(n) for n in lengths) == 30528
    assert scraped.get("q8kv_cache_fp32_equivalent_bytes") == 4 * GEO.values(sum(lengths))
    assert scraped.get("q8kv_cache_fp16_equivalent_bytes") == 2 * GEO.values(sum(lengths))
    assert scraped.get("q8kv_cache_compression_ratio") == pytest.approx(128 / 36, rel=1e-12)
    page = page_bytes(PAGE_CODE_BYTES)
    assert scraped.get("q8kv_pool_capacity_bytes") == POOL_PAGES * page
    assert scraped.get("q8kv_pool_used_bytes") == sum(pages_for(n, T) for n in lengths) * page


def test_session_and_token_counts(scraped):
    assert scraped.get("q8kv_sessions_active") == 2
    assert scraped.get("q8kv_sessions_evicted_total", reason="ttl") == 1
    assert scraped.get("q8kv_sessions_evicted_total", reason="lru") == 0
    assert scraped.get("q8kv_tokens_appended_total") == TOKENS_APPENDED


def test_engine_histograms(scraped):
    assert scraped.get("q8kv_batch_items_count") == BATCHES
    assert scraped.get("q8kv_batch_items_sum") == ITEMS
    # Sequential calls never share a launch: 7 batches of 1-2 items, none above 2.
    assert dict(scraped.buckets("q8kv_batch_items"))[2.0] == BATCHES
    assert dict(scraped.buckets("q8kv_batch_items"))[1.0] == 1 + 1 + 2  # ttl-1, b, stream
    assert scraped.get("q8kv_queue_seconds_count") == QUEUED
    assert 0 < scraped.get("q8kv_queue_seconds_sum") < QUEUED * 1.0


def test_kernel_histograms_by_kernel(scraped):
    expected = {"quantize_append": BATCHES, "attention": BATCHES, "dequantize": 1}
    for name in ("q8kv_kernel_launch_seconds", "q8kv_kernel_device_seconds"):
        kernels = {s.labels["kernel"] for s in scraped.find(name + "_count")}
        assert kernels == set(expected), name
        for kernel, count in expected.items():
            assert scraped.get(name + "_count", kernel=kernel) == count, (name, kernel)
            assert 0 < scraped.get(name + "_sum", kernel=kernel) < count * 5.0
        # Buckets fine enough for microseconds.
        bounds = [le for le, _ in scraped.buckets(name, kernel="attention")]
        assert bounds[0] <= 1e-5 and bounds[-1] == float("inf")
        assert sum(1 for le in bounds if le < 1e-4) >= 4


def test_quantization_error_sampled(scraped):
    count = scraped.get("q8kv_quantization_relative_error_count")
    assert count == ITEMS  # rate 1: every item that landed, none of the refused ones
    mean = scraped.get("q8kv_quantization_relative_error_sum") / count
    assert 0.003 < mean < 0.01, mean  # Q8 on Gaussian data: about 0.5%
    buckets = dict(scraped.buckets("q8kv_quantization_relative_error"))
    assert buckets[2e-3] == 0 and buckets[1e-2] == count


def test_build_info(scraped):
    [info] = scraped.find("q8kv_build_info")
    assert info.value == 1
    assert info.labels == {
        "version": metadata.version("q8kv"),
        "backend": TEST_BACKEND,
        "device": "cpu" if TEST_BACKEND == "numpy" else info.labels["device"],
    }
    assert info.labels["device"]


def test_grpc_handled_by_method_and_code(scraped):
    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for s in scraped.find("grpc_server_handled_total", grpc_service=SERVICE)
    }
    assert handled == HANDLED
    for (method, code), count in HANDLED.items():
        kind = "bidi_stream" if method.endswith("Stream") else "unary"
        assert scraped.get(
            "grpc_server_handled_total", grpc_service=SERVICE, grpc_method=method,
            grpc_code=code, grpc_type=kind,
        ) == count


def test_grpc_started_and_handling_seconds(scraped):
    per_method: dict[str, int] = {}
    for (method, _), count in HANDLED.items():
        per_method[method] = per_method.get(method, 0) + count
    for method, count in per_method.items():
        labels = {"grpc_service": SERVICE, "grpc_method": method}
        assert scraped.get("grpc_server_started_total", **labels) == count, method
        assert scraped.get("grpc_server_handling_seconds_count", **labels) == count, method
        assert scraped.buckets("grpc_server_handling_seconds", **labels)[-1] == (
            float("inf"), count,
        )
    stream = {"grpc_service": SERVICE, "grpc_method": "AppendAndAttendStream"}
    assert scraped.get("grpc_server_msg_received_total", **stream) == 2
    assert scraped.get("grpc_server_msg_sent_total", **stream) == 2


def test_types_and_no_session_ids_in_labels(scraped):
    kinds = {
        "q8kv_cache_bytes": "gauge", "q8kv_sessions_evicted": "counter",
        "q8kv_tokens_appended": "counter", "q8kv_kernel_launch_seconds": "histogram",
        "q8kv_kernel_device_seconds": "histogram", "q8kv_batch_items": "histogram",
        "q8kv_queue_seconds": "histogram", "q8kv_quantization_relative_error": "histogram",
        "grpc_server_started": "counter", "grpc_server_handled": "counter",
        "grpc_server_handling_seconds": "histogram", "q8kv_build_info": "gauge",
    }
    for name, kind in kinds.items():
        assert scraped.families[name].type == kind, name
    values = {v for s in scraped.samples for v in s.labels.values()}
    assert not values & set(SESSION_IDS)


def test_metrics_off_no_endpoint_service_works(start_server):
    server = start_server("--metrics-port", "-1")
    assert server.metrics_url is None
    d = Driver(server.address)
    try:
        d.create("s", GEO)
        reply = d.attend(d.item("s", GEO, 0, 3), d.item("s", GEO, 1, 2))
        assert [r.length for r in reply.results] == [3, 2]
        d.expect_error(C.NOT_FOUND, d.stub.GetSession, pb.GetSessionRequest(session_id="x"))
    finally:
        d.close()
    assert listening_ports(server.proc.pid) == {server.port}
    assert "metrics_port=None" in server.logs()


def test_metrics_on_listens_on_its_port(start_server):
    server = start_server()
    assert listening_ports(server.proc.pid) == {server.port, server.metrics_port}
    samples = Samples(scrape(server.metrics_url))
    assert samples.get("q8kv_cache_bytes") == 0
    assert samples.get("q8kv_cache_compression_ratio") == 0


def test_the_quantization_sample_reads_a_bounded_window(monkeypatch):
    """A sampled 8k-token prefill is read SAMPLE_TOKENS tokens at a time, not whole: the
    sample runs on the event loop."""
    import numpy as np

    from q8kv import format as q8
    from q8kv.server.app import build_engine
    from q8kv.server.config import Config
    from q8kv.server.observability import metrics as metrics_module

    engine = build_engine(Config(backend="numpy", memory_budget=1 << 20))
    m = metrics_module.Metrics(engine.store, engine.backend, quant_error_sample_rate=1.0)
    seen = []
    quantize = q8.quantize
    monkeypatch.setattr(q8, "quantize", lambda x: seen.append(x.shape) or quantize(x))
    rng = np.random.default_rng(3)
    long = rng.standard_normal((8192, 2, 64)).astype(np.float16)
    short = rng.standard_normal((5, 2, 64)).astype(np.float16)
    m.sample_quantization([long, short], [long, short])
    assert seen == [(2, metrics_module.SAMPLE_TOKENS, 2, 64), (2, 5, 2, 64)]
    hist = m.registry.get_sample_value("q8kv_quantization_relative_error_count")
    assert hist == 2


def test_a_packed_call_is_sampled_per_item_at_the_rate(monkeypatch):
    """One binomial draw per call stands for a coin per item: over 40 calls of B = 64 at
    rate 0.25, about 640 distinct items are sampled (bounds at about 8 standard deviations),
    each a [n, KVH, D] item of the packed [B, n, KVH, D] arrays."""
    import numpy as np

    from q8kv.server.app import build_engine
    from q8kv.server.config import Config
    from q8kv.server.observability import metrics as metrics_module

    engine = build_engine(Config(backend="numpy", memory_budget=1 << 20))
    m = metrics_module.Metrics(engine.store, engine.backend, quant_error_sample_rate=0.25)
    sampled: list[tuple[int, int]] = []
    monkeypatch.setattr(
        metrics_module, "quantization_error",
        lambda k, v: sampled.append((k.shape, int(k[0, 0, 0]))) or 0.001,
    )  # fmt: skip
    for _ in range(40):
        k = np.arange(64, dtype=np.float32)[:, None, None, None] * np.ones((64, 1, 2, 8))
        before = len(sampled)
        m.sample_quantization(k, k)
        picked = [item for _, item in sampled[before:]]
        assert picked == sorted(set(picked))  # distinct items, each once
    assert all(shape == (1, 2, 8) for shape, _ in sampled)
    assert 460 <= len(sampled) <= 820


def test_the_quantization_sample_takes_k_and_v_of_different_dtypes():
    """k float16 and v bfloat16 (legal on the wire; numpy has no common type for them): the
    sample casts each to float32 on its own, as the backends do, instead of raising after
    the append had landed."""
    import ml_dtypes

    from q8kv.server.observability.metrics import quantization_error

    rng = np.random.default_rng(11)
    k = (rng.standard_normal((3, 2, 64)) * 3).astype(np.float16)
    v = rng.standard_normal((3, 2, 64)).astype(ml_dtypes.bfloat16)
    error = quantization_error(k, v)
    assert error == quantization_error(k.astype(np.float32), v.astype(np.float32))
    assert 0 < error < 0.02
