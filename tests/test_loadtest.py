"""q8kv-loadtest against real servers: short bounded runs, the report, the exit codes.

The CLI runs as a subprocess (as users run it), so stdout, stderr and the exit status are
exactly what a user sees.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from importlib import metadata

import pytest
from harness.scrape import Samples, metric, scrape
from harness.server import free_port

from q8kv.client import Client
from q8kv.client.loadtest.cli import main
from q8kv.client.loadtest.flags import parse_duration
from q8kv.client.loadtest.stats import histogram, latency_summary, percentile

# Geometry small enough for CI: each run takes well under a second of server time.
GEOMETRY = ["--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "64",
            "--prefill", "24", "--steps", "6"]

REPORT_FIELDS = {
    "target", "options", "interrupted", "aborted", "count", "ok", "errors", "duration_s",
    "calls_per_s", "tokens", "tokens_per_s", "items", "items_per_s", "latency_ms",
    "histogram", "status_codes", "first_errors", "verified", "mismatches",
    "first_mismatches", "max_rel_error", "tolerance", "late_calls", "by_kind", "setup",
    "tokens_appended_total", "sessions_left", "server",
}
LATENCY_FIELDS = {"fastest", "mean", "p50", "p90", "p95", "p99", "slowest"}
SERVER_FIELDS = {
    "cache_bytes", "fp32_equivalent_bytes", "fp16_equivalent_bytes", "memory_saved_bytes",
    "memory_saved_vs_fp16_bytes", "compression_ratio", "sessions_active",
    "tokens_appended_during_run", "error",
}


def loadtest(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "q8kv.client.loadtest", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "q8kv.client.loadtest", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def tokens_counter(server) -> float:
    return metric(server.metrics_url, "q8kv_tokens_appended_total")


def assert_clean_failure(result, exit_code: int, words: str) -> None:
    """A clear one-line message naming the problem, the right status, no traceback."""
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "streaming"])
def test_bounded_run_is_exact_and_reports_every_field(start_server, streaming):
    server = start_server()
    flags = ["--streaming", "--dtype", "float16"] if streaming else []
    bound = ["--duration", "1.5s"] if streaming else ["--requests", "150"]
    result = loadtest(
        server.address, *GEOMETRY, *bound, *flags, "--concurrency", "4", "--batch", "2",
        "--verify", "1.0", "--metrics-url", server.metrics_url, "--output", "json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report.keys() >= REPORT_FIELDS
    assert report["latency_ms"].keys() == LATENCY_FIELDS
    assert report["server"].keys() == SERVER_FIELDS
    assert report["server"]["error"] is None
    assert report["errors"] == 0 and report["status_codes"] == {"OK": report["count"]}
    assert report["first_errors"] == []
    if not streaming:
        assert report["count"] == 150
    assert report["count"] > 20
    assert report["items"] == 2 * report["count"]  # --batch 2: two sessions per call
    # Every output was recomputed locally, and all matched.
    assert report["verified"] == report["items"] and report["mismatches"] == 0
    assert 0 < report["max_rel_error"] < report["tolerance"]
    assert report["tolerance"] == (1e-2 if streaming else 1e-4)
    # Both kinds ran: 8 sessions, prefill 24 tokens in one call per layer, then decode.
    kinds = report["by_kind"]
    assert kinds["prefill"]["count"] >= 8 and kinds["decode"]["count"] > 0
    assert kinds["prefill"]["tokens"] == 24 * kinds["prefill"]["items"]
    assert kinds["decode"]["tokens"] == kinds["decode"]["items"]
    # Our token count is the server's own counter (a fresh server: nothing else appended).
    assert report["tokens"] == report["tokens_appended_total"]
    assert report["tokens"] == report["server"]["tokens_appended_during_run"]
    assert report["tokens"] == tokens_counter(server)
    assert report["server"]["compression_ratio"] == pytest.approx(128 / 36)
    assert report["server"]["memory_saved_bytes"] > 0
    lat = report["latency_ms"]
    assert 0 < lat["fastest"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["slowest"]
    assert sum(b["count"] for b in report["histogram"]) == report["count"]
    assert report["duration_s"] > 0 and report["calls_per_s"] > 0
    assert report["items_per_s"] == pytest.approx(report["items"] / report["duration_s"])
    # Sessions deleted at the end.
    assert report["sessions_left"] == 0
    with Client(server.address) as c:
        assert c.list_sessions() == []


def test_a_run_that_ends_on_a_finished_sequence_leaves_its_sessions_to_the_scrape(start_server):
    """The budget ends exactly on a finished sequence (2 prefill calls + 6 x 2 decode calls):
    no reset empties the sessions after it, so the end-of-load scrape sees them (and the
    duration-bounded runs above cannot end on empty sessions whose reset no call followed)."""
    server = start_server()
    result = loadtest(
        server.address, *GEOMETRY, "--requests", "14", "--concurrency", "1", "--batch", "2",
        "--metrics-url", server.metrics_url, "--output", "json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["count"] == 14 and report["errors"] == 0
    assert report["server"]["cache_bytes"] > 0
    assert report["server"]["compression_ratio"] == pytest.approx(128 / 36)


@pytest.mark.parametrize(
    ("flags", "parts"),
    [([], 1), (["--streaming"], 1), (["--max-message-bytes", "64KiB"], 8)],
    ids=["unary", "streaming", "split"],
)
def test_packed_run_with_micro_batches_in_flight_verifies(start_server, flags, parts):
    """--packed --batch 8 --in-flight 2: one AttendBatch per call for 8 sessions, two such
    micro-batches per orchestrator at once; every output verified. With a small
    --max-message-bytes the client splits the calls (a prefill of 8 sessions x 24 tokens
    is 384 KiB: 8 calls of one session each) and the run still verifies."""
    server = start_server()
    result = loadtest(
        server.address, *GEOMETRY, "--requests", "60", "--concurrency", "2", "--packed",
        "--batch", "8", "--in-flight", "2", "--verify", "1.0", "--output", "json", *flags,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["errors"] == 0 and report["count"] == 60
    assert report["items"] == 8 * report["count"]  # --batch 8: eight sessions per call
    assert report["verified"] == report["items"] and report["mismatches"] == 0
    assert 0 < report["max_rel_error"] < report["tolerance"]
    assert report["options"]["packed"] and report["options"]["in_flight"] == 2
    # 2 orchestrators x 2 micro-batches each prefilled their 8 sessions at least once
    assert report["by_kind"]["prefill"]["count"] >= 4
    assert report["tokens"] == tokens_counter(server)
    # The calls were packed: AttendBatch answered them (one RPC each, more when split).
    samples = Samples(scrape(server.metrics_url))
    started = {
        method: samples.value_or_zero("grpc_server_started_total", grpc_method=method)
        for method in ("AttendBatch", "AppendAndAttend", "AppendAndAttendStream")
    }
    kinds = report["by_kind"]
    if "--streaming" in flags:  # one stream per orchestrator, its micro-batches share it
        assert started == {"AttendBatch": 0, "AppendAndAttend": 0, "AppendAndAttendStream": 2}
    else:
        calls = kinds["decode"]["count"] + parts * kinds["prefill"]["count"]
        assert started == {"AttendBatch": calls, "AppendAndAttend": 0,
                           "AppendAndAttendStream": 0}
    assert report["sessions_left"] == 0


def test_text_report_open_loop_and_csv(start_server):
    server = start_server()
    result = loadtest(server.address, *GEOMETRY, "-n", "40", "--rate", "200",
                      "--metrics-url", server.metrics_url)
    assert result.returncode == 0, result.stderr
    for words in ("Summary:", "Count:        40 calls (0 failed)", "Calls/s:", "Tokens/s:",
                  "Items/s:", "Latency distribution:", "99 % in", "Latency histogram",
                  "[OK]\t40 calls", "compression ratio 3.56x"):
        assert words in result.stdout, result.stdout
    csv_run = loadtest(server.address, *GEOMETRY, "-n", "30", "-c", "3", "--output", "csv")
    assert csv_run.returncode == 0, csv_run.stderr
    rows = csv_run.stdout.strip().splitlines()
    assert rows[0] == "start_s,latency_ms,kind,status" and len(rows) == 31
    assert all(row.endswith(",OK") for row in rows[1:])


def test_untimed_prefill_counts_setup_tokens(start_server):
    server = start_server()
    result = loadtest(server.address, *GEOMETRY, "-n", "24", "-c", "2", "--untimed-prefill",
                      "--output", "json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["by_kind"]["prefill"]["count"] == 0  # 6 steps x 2 layers = 12 per orch.
    assert report["setup"] == {"calls": 4, "tokens": 2 * 2 * 24}
    assert report["tokens_appended_total"] == report["tokens"] + 96 == tokens_counter(server)


def test_bad_target_fails_fast_with_a_clear_message(start_server):
    started = time.monotonic()
    result = loadtest(f"127.0.0.1:{free_port()}", "-n", "10")
    assert_clean_failure(result, 2, "cannot reach 127.0.0.1:")
    assert time.monotonic() - started < 15


def test_server_killed_mid_run_stops_the_run(start_server):
    server = start_server()
    proc = spawn(server.address, *GEOMETRY, "--duration", "60s", "-c", "4", "--quiet")
    time.sleep(2.0)  # start-up and some load
    server.proc.kill()
    stdout, stderr = proc.communicate(timeout=30)  # far sooner than --duration
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_failure(result, 1, "stopped answering")
    assert "UNAVAILABLE" in stdout and "Aborted:" in stdout


def test_ctrl_c_prints_the_partial_report(start_server):
    server = start_server()
    proc = spawn(server.address, *GEOMETRY, "--duration", "60s", "-c", "2", "-O", "json")
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] and report["errors"] == 0 and report["count"] > 0
    assert report["sessions_left"] == 0
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        ([], "a run must be bounded"),
        (["-n", "10", "--verify", "2"], "--verify: expected a fraction"),
        (["-n", "10", "--head-dim", "48"], "--head-dim: expected a multiple of 32"),
        (["-n", "10", "--heads", "6", "--kv-heads", "4"], "--heads: expected a multiple"),
        (["-z", "forever"], "expected a duration"),
        (["-z", "48h"], "--duration: expected > 0 and <= 86400s"),
        (["-n", "0"], "--requests: expected 1.."),
        (["-n", "10", "--tls", "/no/such/ca.pem"], "is not a readable file"),
        (["-n", "10", "--bogus"], "unrecognized arguments: --bogus"),
        (["-n", "10", "--in-flight", "0"], "--in-flight: expected >= 1, got 0"),
        (["-n", "10", "--max-message-bytes", "lots"], "expected a size like 512MiB"),
        (["-n", "10", "--batch", "64", "--prefill", "1024", "--max-message-bytes", "1MiB"],
         "--max-message-bytes: a call of 64 session(s) x 1024 tokens needs"),
        (["-n", "10", "--packed", "--max-message-bytes", "2KiB"],
         "--max-message-bytes: expected at least"),
    ],
)
def test_bad_flags_exit_2_with_the_flag_named(flags, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["127.0.0.1:1", *flags])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_bad_flag_from_the_command_line():
    assert_clean_failure(loadtest("127.0.0.1:1", "-n", "5", "--dtype", "int8"), 2,
                         "argument --dtype: invalid choice")


# -- report arithmetic (no server) -------------------------------------------------------


def test_percentiles_histogram_and_durations():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    assert percentile(values, 50) == 0.050 and percentile(values, 99) == 0.099
    summary = latency_summary(values)
    assert summary["fastest"] == 1.0 and summary["slowest"] == 100.0
    assert summary["mean"] == pytest.approx(50.5)
    bins = histogram(values)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 100
    assert bins[-1]["le_ms"] == pytest.approx(100.0)
    assert histogram([0.002] * 5) [-1]["count"] == 5
    assert [parse_duration(t) for t in ("30s", "2m", "500ms", "1h", "7")] == [
        30.0, 120.0, 0.5, 3600.0, 7.0
    ]


def test_console_script_and_module_run_the_same_cli() -> None:
    """q8kv-loadtest (pyproject's console script) and python -m q8kv.client.loadtest."""
    (script,) = metadata.entry_points(group="console_scripts", name="q8kv-loadtest")
    assert script.load() is main
    result = subprocess.run([sys.executable, "-m", "q8kv.client.loadtest", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage: q8kv-loadtest" in result.stdout


def test_verify_uses_the_shared_format_not_the_server() -> None:
    """--verify recomputes with q8kv.format; the client never imports the server."""
    code = (
        "import sys, q8kv.client.loadtest.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('q8kv.server')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"
