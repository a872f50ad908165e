"""The report of q8kv-loadtest: the live progress bar, the figures (a dict, the JSON), the
text and CSV renderings, the server's metrics endpoint and the optional plot."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict
from typing import Any

from .state import LoadSpec, Shared
from .stats import KINDS, histogram

# Series read from the server's /metrics (sums over label sets).
SERVER_SERIES = (
    "q8kv_cache_bytes",
    "q8kv_cache_fp32_equivalent_bytes",
    "q8kv_cache_fp16_equivalent_bytes",
    "q8kv_cache_compression_ratio",
    "q8kv_tokens_appended_total",
    "q8kv_sessions_active",
)


async def progress(spec: LoadSpec, shared: Shared) -> None:
    """The live bar (rich) while the load runs: done fraction, calls, rate, errors; runs
    until cancelled."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    rec = shared.recorder
    window: deque[tuple[float, int]] = deque(maxlen=11)
    columns = (
        TextColumn("[bold]q8kv-loadtest[/]"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[stats]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task("load", total=1.0, stats="")
        while True:
            now = time.perf_counter()
            window.append((now, rec.count))
            (t_old, c_old), (t_new, c_new) = window[0], window[-1]
            rate = (c_new - c_old) / (t_new - t_old) if t_new > t_old else 0.0
            done = 0.0
            if spec.duration:
                done = max(done, (now - shared.t0) / spec.duration)
            if spec.requests:
                done = max(done, shared.issued / spec.requests)
            errors = rec.count - rec.ok
            stats = f"{rec.count} calls  {rate:,.0f}/s  errors {errors}"
            if spec.verify:
                stats += f"  mismatches {shared.mismatches}"
            bar.update(task, completed=min(done, 1.0), stats=stats)
            await asyncio.sleep(0.1)


class MetricsError(Exception):
    """The metrics endpoint could not be read or parsed."""


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """The SERVER_SERIES values of a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MetricsError(f"--metrics-url {url}: {getattr(exc, 'reason', exc)}") from None
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in SERVER_SERIES:
                    values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    except ValueError as exc:
        raise MetricsError(f"--metrics-url {url}: not Prometheus text ({exc})") from None
    return values


def server_section(before: dict[str, float] | None, after: dict[str, float] | None,
                   error: str | None) -> dict[str, Any] | None:
    """Memory saved and compression ratio at the end of the load (before the sessions are
    deleted), and how many tokens the server counted during the run."""
    if after is None:
        return None if error is None else {"error": error}
    cache = after.get("q8kv_cache_bytes", 0.0)
    fp32 = after.get("q8kv_cache_fp32_equivalent_bytes", 0.0)
    fp16 = after.get("q8kv_cache_fp16_equivalent_bytes", 0.0)
    counted = after.get("q8kv_tokens_appended_total", 0.0)
    if before is not None:
        counted -= before.get("q8kv_tokens_appended_total", 0.0)
    return {
        "cache_bytes": int(cache),
        "fp32_equivalent_bytes": int(fp32),
        "fp16_equivalent_bytes": int(fp16),
        "memory_saved_bytes": int(fp32 - cache),
        "memory_saved_vs_fp16_bytes": int(fp16 - cache),
        "compression_ratio": after.get("q8kv_cache_compression_ratio", 0.0),
        "sessions_active": int(after.get("q8kv_sessions_active", 0.0)),
        "tokens_appended_during_run": int(counted),
        "error": error,
    }


def build(spec: LoadSpec, shared: Shared, duration: float, *, interrupted: bool,
          server: dict[str, Any] | None, sessions_left: int) -> dict[str, Any]:
    """Every figure of the report, JSON-ready."""
    rec = shared.recorder
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    by_kind = {
        kind: {
            "count": rec.kinds[kind].count,
            "ok": rec.kinds[kind].ok,
            "items": rec.kinds[kind].items,
            "tokens": rec.kinds[kind].tokens,
            "items_per_s": per_s(rec.kinds[kind].items),
            "latency_ms": rec.kinds[kind].summary(),
        }
        for kind in KINDS
    }
    return {
        "target": spec.target,
        "options": asdict(spec) | {"token": "***" if spec.token else None},
        "interrupted": interrupted,
        "aborted": shared.abort_reason,
        "count": rec.count,
        "ok": rec.ok,
        "errors": rec.count - rec.ok,
        "duration_s": duration,
        "calls_per_s": per_s(rec.count),
        "tokens": rec.tokens,
        "tokens_per_s": per_s(rec.tokens),
        "items": rec.items,
        "items_per_s": per_s(rec.items),
        "latency_ms": rec.summary(),
        "histogram": histogram(rec.all_latencies()),
        "status_codes": dict(sorted(rec.codes.items())),
        "first_errors": [
            {"code": code, "message": message, "count": count}
            for (code, message), count in rec.errors.items()
        ],
        "verified": shared.verified,
        "mismatches": shared.mismatches,
        "first_mismatches": shared.first_mismatches,
        "max_rel_error": shared.max_rel_error,
        "tolerance": spec.tolerance,
        "late_calls": shared.late_calls,
        "by_kind": by_kind,
        "setup": {"calls": shared.setup_calls, "tokens": shared.setup_tokens},
        "tokens_appended_total": rec.tokens + shared.setup_tokens,
        "sessions_left": sessions_left,
        "server": server,
    }


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def text(report: dict[str, Any]) -> str:
    """The ghz-like human report."""
    lines = ["", "Summary:"]
    for section in (_summary, _latency, _statuses, _verification, _server, _warnings):
        lines += section(report)
    return "\n".join(lines) + "\n"


def _summary(report: dict[str, Any]) -> list[str]:
    o = report["options"]
    mode = ("streaming" if o["streaming"] else "unary") + (", packed" if o["packed"] else "")
    loop = f"open loop at {o['rate']:g} calls/s" if o["rate"] else "closed loop"
    lines: list[str] = []
    add = lines.append
    add(f"  Target:       {report['target']} ({mode}, {loop})")
    add(f"  Load:         {o['concurrency']} orchestrators x {o['in_flight']} micro-batch(es) "
        f"x {o['batch']} session(s); "
        f"{o['layers']} layer(s), H={o['heads']} KVH={o['kv_heads']} D={o['head_dim']} "
        f"{o['dtype']}; prefill {o['prefill']}, {o['steps']} decode steps")
    if report["interrupted"]:
        add("  Interrupted:  yes (partial report)")
    add(f"  Count:        {report['count']} calls ({report['errors']} failed)")
    add(f"  Total:        {report['duration_s']:.2f} s")
    lat = report["latency_ms"]
    add(f"  Slowest:      {lat['slowest']:.3f} ms")
    add(f"  Fastest:      {lat['fastest']:.3f} ms")
    add(f"  Average:      {lat['mean']:.3f} ms")
    add(f"  Calls/s:      {report['calls_per_s']:.1f}")
    add(f"  Tokens/s:     {report['tokens_per_s']:.1f} ({report['tokens']} session-layer "
        "tokens appended)")
    add(f"  Items/s:      {report['items_per_s']:.1f} ((session, layer) attention items)")
    if report["late_calls"]:
        add(f"  Late starts:  {report['late_calls']} calls started >1 ms after their slot "
            "(raise --concurrency)")
    for kind, k in report["by_kind"].items():
        if k["count"]:
            kl = k["latency_ms"]
            add(f"  {kind + ':':13} {k['count']} calls, {k['items_per_s']:.1f} items/s, "
                f"p50 {kl['p50']:.3f} ms, p99 {kl['p99']:.3f} ms")
    return lines


def _latency(report: dict[str, Any]) -> list[str]:
    lat = report["latency_ms"]
    lines = ["", "Latency distribution:"]
    lines += [f"  {p[1:]} % in {lat[p]:.3f} ms" for p in ("p50", "p90", "p95", "p99")]
    if report["histogram"]:
        lines += ["", "Latency histogram (ms):"]
        top = max(b["count"] for b in report["histogram"]) or 1
        for b in report["histogram"]:
            bar = "∎" * round(40 * b["count"] / top)
            lines.append(f"  {b['le_ms']:10.3f} [{b['count']}]\t|{bar}")
    return lines


def _statuses(report: dict[str, Any]) -> list[str]:
    lines = ["", "Status code distribution:"]
    lines += [f"  [{code}]\t{count} calls" for code, count in report["status_codes"].items()]
    if report["first_errors"]:
        lines += ["", "Error distribution (first distinct messages):"]
        lines += [f"  [{e['count']}]\t{e['code']}: {e['message']}" for e in report["first_errors"]]
    return lines


def _verification(report: dict[str, Any]) -> list[str]:
    if not report["options"]["verify"] > 0:
        return []
    return [
        "",
        f"Verification: {report['verified']} outputs recomputed, {report['mismatches']} "
        f"mismatches (max relative L2 error {report['max_rel_error']:.3g}, tolerance "
        f"{report['tolerance']:g})",
        *(f"  {m}" for m in report["first_mismatches"]),
    ]


def _server(report: dict[str, Any]) -> list[str]:
    server = report["server"]
    if server is None:
        return []
    if server.get("cache_bytes") is None:
        return ["", f"Server metrics: unavailable ({server['error']})"]
    return [
        "",
        "Server (from its metrics, at the end of the load):",
        f"  KV cache:     {_bytes(server['cache_bytes'])} in Q8 vs "
        f"{_bytes(server['fp32_equivalent_bytes'])} in fp32 / "
        f"{_bytes(server['fp16_equivalent_bytes'])} in fp16",
        f"  Saved:        {_bytes(server['memory_saved_bytes'])} vs fp32, "
        f"{_bytes(server['memory_saved_vs_fp16_bytes'])} vs fp16; compression ratio "
        f"{server['compression_ratio']:.2f}x",
        f"  Tokens:       {server['tokens_appended_during_run']} appended during the "
        f"run by the server's count ({report['tokens_appended_total']} by ours)",
    ]


def _warnings(report: dict[str, Any]) -> list[str]:
    lines = []
    if report["sessions_left"]:
        lines += ["", f"Warning: {report['sessions_left']} session(s) could not be deleted "
                      f"(ids start with loadtest-)"]  # fmt: skip
    if report["aborted"]:
        lines += ["", f"Aborted: {report['aborted']}"]
    return lines


def csv_text(shared: Shared) -> str:
    """One row per timed call (all of them up to the sample cap), in start order."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["start_s", "latency_ms", "kind", "status"])
    for s in sorted(shared.recorder.samples.values, key=lambda s: s.start_s):
        writer.writerow([f"{s.start_s:.6f}", f"{1e3 * s.latency_s:.4f}", s.kind, s.status])
    return out.getvalue()


def render(fmt: str, report: dict[str, Any], shared: Shared) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2) + "\n"
    if fmt == "csv":
        return csv_text(shared)
    return text(report)


def matplotlib_missing() -> str | None:
    """None if --plot can work, else the message to print."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'q8kv[plot]' (or pip install matplotlib)"
    return None


def plot(path: str, report: dict[str, Any], shared: Shared) -> None:
    """Latency over time (one dot per call, by kind) and the latency histogram."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    samples = shared.recorder.samples.values
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for kind, color in (("decode", "tab:blue"), ("prefill", "tab:orange")):
        mine = [s for s in samples if s.kind == kind]
        if mine:
            left.scatter([s.start_s for s in mine], [1e3 * s.latency_s for s in mine], s=3,
                         color=color, label=kind, alpha=0.6)
    failed = [s for s in samples if s.status != "OK"]
    if failed:
        left.scatter([s.start_s for s in failed], [1e3 * s.latency_s for s in failed], s=12,
                     color="tab:red", marker="x", label="failed")
    left.set(xlabel="time since start (s)", ylabel="latency (ms)", title="Latency over time")
    left.legend(loc="upper right")
    latencies = [1e3 * s.latency_s for s in samples]
    if latencies:
        right.hist(latencies, bins=50, color="tab:blue")
    lat = report["latency_ms"]
    for p, style in (("p50", "--"), ("p99", ":")):
        right.axvline(lat[p], color="k", linestyle=style, label=f"{p} {lat[p]:.2f} ms")
    right.set(xlabel="latency (ms)", ylabel="calls", title="Latency histogram")
    right.legend(loc="upper right")
    fig.suptitle(f"q8kv-loadtest {report['target']}: {report['calls_per_s']:.0f} calls/s, "
                 f"{report['items_per_s']:.0f} items/s")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
