"""The test harness itself: a server start that fails leaves no process behind and closes
its log; geometries unpack as keyword arguments; random tensors are never zeros."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from harness.geometry import GEOM, Geo
from harness.server import ServerProcess
from harness.tensors import normal, qkv, random_tensor

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
