"""Structured logs with ``--log-format json``: every line the server writes is one JSON object
with ts/level/logger/event; the lifecycle events and errors are there with their fields; no
tensor data ever reaches the log."""

from __future__ import annotations

import json
import time

import grpc
import numpy as np
import pytest
from harness.geometry import Geo
from harness.rpc import Driver
from harness.server import ServerProcess

from q8kv.v1 import kvcache_pb2 as pb

GEO = Geo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, max_len=32)
K_VALUE = np.float32(1234.5678)  # distinctive values to look for in the log
Q_VALUE = np.float32(-8765.4321)


@pytest.fixture(scope="module")
def log_lines():
    started = time.time()
    server = ServerProcess("--log-format", "json", "--quant-error-sample-rate", "1")
    d = Driver(server.address)
    try:
        d.create("kept", GEO)
        d.create("short-lived", GEO, ttl=1.0)
        k = np.full((3, GEO.num_kv_heads, GEO.head_dim), K_VALUE, np.float32)
        item = d.item("kept", GEO, 0, 3, k=k)
        item.q.CopyFrom(pb.Tensor(
            dtype=pb.FLOAT32, shape=[3, GEO.num_heads, GEO.head_dim],
            data=np.full(3 * GEO.num_heads * GEO.head_dim, Q_VALUE, "<f4").tobytes(),
        ))
        d.attend(item)
        d.attend(d.item("short-lived", GEO, 1, 2, k=k[:2]))
        d.expect_error(grpc.StatusCode.ALREADY_EXISTS, d.stub.CreateSession,
                       pb.CreateSessionRequest(session_id="kept", geometry=GEO.pb()))
        d.expect_error(grpc.StatusCode.NOT_FOUND, d.stub.GetSession,
                       pb.GetSessionRequest(session_id="missing"))
        # A rejected append with the distinctive values: the message must not echo them.
        d.expect_error(grpc.StatusCode.OUT_OF_RANGE, d.stub.AppendAndAttend,
                       pb.AppendAndAttendRequest(items=[
                           d.item("kept", GEO, 0, 30, k=np.full((30, 2, 64), K_VALUE)),
                       ]))
        d.stub.DeleteSession(pb.DeleteSessionRequest(session_id="kept"), timeout=10)
        deadline = time.monotonic() + 10
        while '"session_evicted"' not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        server.signal()
        server.proc.wait(30)
        text = server.logs()
    finally:
        d.close()
        server.stop()
    lines = text.splitlines()
    assert lines, "the server wrote no log"
    return started, lines


def parsed(log_lines) -> list[dict]:
    return [json.loads(line) for line in log_lines[1]]


def events(log_lines, name: str) -> list[dict]:
    return [r for r in parsed(log_lines) if r["event"] == name]


def test_every_line_is_one_json_object(log_lines):
    started, lines = log_lines
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON object: {line!r}")
        assert isinstance(record, dict), line
        assert {"ts", "level", "logger", "event"} <= record.keys(), line
        assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        assert record["logger"].startswith("q8kv"), line
        assert started - 1 <= float(record["ts"]) <= time.time(), line


def test_startup_configuration(log_lines):
    [config] = events(log_lines, "config")
    assert config["log_format"] == "json"
    assert config["quant_error_sample_rate"] == 1
    assert config["memory_budget"] == 256 * 1024**2
    [listening] = events(log_lines, "listening")
    assert listening["backend"] and listening["pages"] > 0 and listening["metrics_port"] > 0
    names = [r["event"] for r in parsed(log_lines)]
    assert names[0] == "config" and "draining" in names and names[-1] == "stopped"


def test_session_lifecycle_events(log_lines):
    created = {r["session"]: r for r in events(log_lines, "session_created")}
    assert set(created) == {"kept", "short-lived"}
    assert created["kept"]["layers"] == GEO.num_layers
    assert created["kept"]["head_dim"] == GEO.head_dim
    [deleted] = events(log_lines, "session_deleted")
    assert deleted["session"] == "kept"
    assert deleted["freed_bytes"] > 0
    [evicted] = events(log_lines, "session_evicted")
    assert evicted["session"] == "short-lived" and evicted["reason"] == "ttl"


def test_errors_logged_with_their_status(log_lines):
    errors = {(r["rpc"], r["code"]) for r in events(log_lines, "rpc_error")}
    assert errors == {
        ("CreateSession", "ALREADY_EXISTS"),
        ("GetSession", "NOT_FOUND"),
        ("AppendAndAttend", "OUT_OF_RANGE"),
    }
    for r in events(log_lines, "rpc_error"):
        assert r["detail"], r


def test_no_tensor_data_in_the_log(log_lines):
    text = "\n".join(log_lines[1])
    for value in (K_VALUE, Q_VALUE):
        for shown in (repr(float(value)), str(value), f"{float(value):.1f}", f"{float(value):g}"):
            assert shown not in text, shown
        raw = value.tobytes()
        for shown in (repr(raw)[2:-1], raw.hex(), repr(raw * 4)[2:-1]):
            assert shown not in text, shown
    assert "1234." not in text and "8765." not in text
    assert "AAA" not in text  # no base64 blobs of tensor bytes
