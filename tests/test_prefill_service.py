"""benchmarks/prefill_service.py end to end at a tiny size on the numpy backend: the
script is run on a GPU machine by hand, so a client change that breaks its recording of the
calls (or their replay to the echo) should fail here first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "prefill_service.py"


def test_split_prefill_is_timed_and_echoed_call_for_call(tmp_path: Path) -> None:
    tokens, layers, heads, kv_heads, dim, limit = 48, 2, 4, 2, 32, 8000
    cmd = [
        sys.executable, str(SCRIPT), "--backend", "numpy", "--tokens", str(tokens),
        "--layers", str(layers), "--heads", str(heads), "--kv-heads", str(kv_heads),
        "--head-dim", str(dim), "--reps", "2", "--rpc", "batch",
        "--max-message-bytes", str(limit), "--prefill-chunk-tokens", "16", "--seed", "3",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "prefill_service-cpu.json").read_text())

    assert result["prefill_chunk_tokens"] == 16 and result["chunks_per_call"] == 3
    (row,) = result["rows"]
    qkv_bytes = tokens * (heads + 2 * kv_heads) * dim * 2  # float16
    calls = row["calls_per_layer"]
    # The client split each layer's call to fit the limit; the echo got the same calls.
    assert len(calls) == layers and all(c > 1 for c in calls)
    for c, sent, answered in zip(
        calls, row["request_bytes_per_layer"], row["response_bytes_per_layer"], strict=True
    ):
        assert qkv_bytes < sent <= c * limit
        assert tokens * heads * dim * 2 < answered <= c * limit
    for side in ("q8kv", "echo"):
        timed = row[side]
        assert len(timed["total_s"]) == 2
        assert timed["layer_min_s"] <= timed["layer_p50_s"] <= timed["layer_max_s"]
        assert timed["layer_max_s"] < max(timed["total_s"])  # a layer is part of a prompt
    # The server's kernels ran, and took part of each rep, not more than all of it.
    for device, total in zip(row["q8kv"]["device_s"], row["q8kv"]["total_s"], strict=True):
        assert 0 < device < total
    assert row["ratio_total_median"] > 0
