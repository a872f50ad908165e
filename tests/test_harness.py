"""The test harness itself: a server start that fails leaves no process behind and closes
its log; geometries unpack as keyword arguments; random tensors are never zeros; torch
SDPA over a cache masks and groups heads as q8kv does (the GPU prefill tests' yardstick)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from harness.geometry import GEOM, Geo
from harness.sdpa import sdpa_over_cache
from harness.server import ServerProcess, listening_socket
from harness.tensors import normal, qkv, random_tensor
from reference import attention_ref, rel_l2

from q8kv.v1 import kvcache_pb2 as pb


@pytest.fixture
def popen_calls(monkeypatch) -> list[tuple[subprocess.Popen, object]]:
    """Every (process, log file) ServerProcess starts during the test."""
    calls = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            calls.append((self, kwargs["stdout"]))

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    return calls


def test_a_start_that_times_out_kills_the_server_and_closes_its_log(popen_calls, tmp_path):
    # sitecustomize runs before the server's main: this server lives but never serves.
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(600)\n")
    with pytest.raises(TimeoutError, match="not SERVING after 2"):
        ServerProcess(env={"PYTHONPATH": str(tmp_path)}, start_timeout=2.0)
    [(proc, log)] = popen_calls
    assert proc.poll() is not None, "the server was left running"
    assert log.closed


def test_a_server_that_exits_on_start_has_its_log_closed(popen_calls):
    with pytest.raises(RuntimeError, match="--page-bytes: expected a positive multiple"):
        ServerProcess("--page-bytes", "1000")
    [(proc, log)] = popen_calls
    assert proc.returncode == 2
    assert log.closed


def test_a_server_that_is_not_waited_for_can_be_waited_for_later(popen_calls):
    srv = ServerProcess(wait=False)
    try:
        srv.wait_serving()
        assert srv.proc.poll() is None and srv.metrics_url
    finally:
        assert srv.stop() == 0
    [(_, log)] = popen_calls
    assert log.closed


@pytest.mark.parametrize("lost", ["--port", "--metrics-port"])
def test_a_picked_port_taken_before_the_server_binds_it_is_picked_again(
    lost, popen_calls, monkeypatch
):
    """free_port() then the server's bind is a race: another process may take the port in
    between. The harness starts again on new ports; a busy port the test itself names is
    the test's failure, not retried."""
    from harness import server as harness_server

    with listening_socket() as taken:
        busy = taken.getsockname()[1]
        picks = iter([busy] if lost == "--port" else [])
        real = harness_server.free_port
        monkeypatch.setattr(harness_server, "free_port", lambda: next(picks, None) or real())
        if lost == "--metrics-port":  # the gRPC port's pick first, then the metrics port's
            picks = iter([real(), busy])
        srv = ServerProcess()
        try:
            assert srv.proc.poll() is None and busy not in (srv.port, srv.metrics_port)
        finally:
            assert srv.stop() == 0
        assert len(popen_calls) == 2 and popen_calls[0][0].returncode == 2
        with pytest.raises(RuntimeError, match="in use"):
            ServerProcess(lost, str(busy))
        assert len(popen_calls) == 3, "a port the test named was tried again"
    assert all(log.closed for _, log in popen_calls)


def test_a_geometry_unpacks_as_keyword_arguments():
    assert dict(**GEOM) == dict(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64,
                                max_len=4096)
    assert {**GEOM.but(max_len=10)} == {**GEOM, "max_len": 10}
    assert GEOM.pb() == pb.Geometry(num_layers=3, num_heads=8, num_kv_heads=2, head_dim=64,
                                    max_len=4096)
    assert Geo(head_dim=30).but(num_layers=1) == Geo(1, 4, 2, 30, 4096)
    with pytest.raises(KeyError):
        GEOM["layers"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_random_tensors_have_the_shape_dtype_and_no_zeros(dtype):
    rng = np.random.default_rng(5)
    geo = Geo(num_heads=8, num_kv_heads=2, head_dim=32)
    for tensor in (normal, random_tensor):
        q, k, v = qkv(rng, 3, geo, dtype, tensor=tensor)
        assert q.shape == (3, 8, 32) and k.shape == v.shape == (3, 2, 32)
        for x in (q, k, v):
            assert x.dtype == dtype and np.all(x != 0) and np.all(np.isfinite(x))
        assert not np.array_equal(k, v)


@pytest.mark.parametrize(
    "h,kvh,start,n", [(8, 2, 0, 5), (8, 2, 37, 9), (4, 1, 3, 1), (4, 4, 10, 16), (6, 3, 1, 40)]
)
def test_sdpa_over_cache_is_the_reference_attention(h, kvh, start, n):
    """In float64 on the CPU, sdpa_over_cache is attention_ref: the bottom-right causal mask
    (token i sees [0, start + i], not [0, i]), head h on kv head h // group, the scale."""
    rng = np.random.default_rng(h * 1000 + start * 10 + n)
    q = rng.standard_normal((n, h, 32)).astype(np.float32)
    # Positions past start + n exist and must not be read.
    keys, values = rng.standard_normal((2, kvh, start + n + 3, 32)).astype(np.float32)
    got = sdpa_over_cache(q, keys, values, start, 0.3, torch.float64, "cpu")
    assert got.shape == (n, h, 32) and got.dtype == np.float64
    assert rel_l2(got, attention_ref(q, keys, values, start, 0.3)) <= 1e-12
