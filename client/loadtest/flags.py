"""The flags of q8kv-loadtest: the parser, the value types (durations, sizes), and the
checks that turn the flags into a LoadSpec or stop with exit status 2 naming the flag.
"""

from __future__ import annotations

import argparse
import os
import re

from q8kv.client.batching import ROW_OVERHEAD_BYTES
from q8kv.client.channel import DEFAULT_MAX_MESSAGE_BYTES
from q8kv.client.messages import ENVELOPE_BYTES

from . import report as report_mod
from .state import LoadSpec
from .verify import DEFAULT_TOLERANCE

# A run is always bounded: one of --duration / --requests is required, and both are capped.
MAX_DURATION_S = 24 * 3600.0
MAX_REQUESTS = 100_000_000
MAX_CONCURRENCY = 4096
MAX_VERIFY_COPY_BYTES = 8 * 1024**3  # the local float32 copy --verify keeps

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
# Per item of an AppendAndAttend besides its tensors' data: session id, tags, shapes.
ITEM_OVERHEAD_BYTES = 256


def parse_duration(text: str) -> float:
    """'30s', '2m', '500ms', '1h', '10' (seconds) -> seconds."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a duration like 30s, 2m or 500ms, got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_size(text: str) -> int:
    """'256KiB', '512MiB', '1GB', '65536' -> bytes (KiB/MiB/GiB: powers of 1024, K/M/G of
    1000), as the server's --max-message-bytes."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 512MiB or 65536, got {text!r}")
    unit = (match.group(2) or "").lower()
    power = "kmg".find(unit[:1]) + 1 if unit[:1] in ("k", "m", "g") else 0
    return int(match.group(1)) * (1024 if "i" in unit else 1000) ** power


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="q8kv-loadtest",
        description="Load-test a q8kv server the way model runners use it: virtual "
        "orchestrators own sessions, prefill a prompt (one call per layer), then decode "
        "token by token, layer by layer. Reports throughput, latency, errors and, with "
        "--verify, wrong answers.",
        epilog="Exit status: 0 ok; 1 failed calls, mismatches or the server went away; 2 the "
        "run could not start; 130 interrupted.",
    )
    p.add_argument("target", help="host:port of the q8kv server (or router)")
    _session_flags(p)
    _load_flags(p)
    _connection_flags(p)
    _report_flags(p)
    return p


def _session_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sessions (one per orchestrator x --batch)")
    g.add_argument("--layers", type=int, default=1, help="layers per session [1]")
    g.add_argument("--heads", type=int, default=8, help="query heads H [8]")
    g.add_argument("--kv-heads", type=int, default=2, help="kv heads KVH, divides H [2]")
    g.add_argument("--head-dim", type=int, default=128, help="head dim D, multiple of 32 [128]")
    g.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                   help="wire dtype of q/k/v and of the outputs [float32]")
    g.add_argument("--prefill", type=int, default=64,
                   help="prompt tokens per sequence, one call per layer [64]")
    g.add_argument("--steps", type=int, default=16,
                   help="decode steps per sequence, one call per layer each [16]")
    g.add_argument("--batch", type=int, default=1,
                   help="sessions per micro-batch, sent together in one call: its items, or "
                   "one packed AttendBatch with --packed [1]")
    g.add_argument("--in-flight", type=int, default=1,
                   help="micro-batches per orchestrator, each its own --batch sessions, "
                   "their calls in flight at once [1]")


def _load_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("load")
    g.add_argument("-c", "--concurrency", type=int, default=4,
                   help="virtual orchestrators running at once [4]")
    g.add_argument("--connections", type=int, default=1,
                   help="gRPC channels the orchestrators are spread over [1]")
    g.add_argument("-z", "--duration", type=parse_duration,
                   help=f"stop after this long (e.g. 30s, 2m; at most {MAX_DURATION_S:g}s)")
    g.add_argument("-n", "--requests", type=int,
                   help=f"stop after this many calls (at most {MAX_REQUESTS})")
    g.add_argument("-r", "--rate", type=float,
                   help="open loop: start calls at this many per second overall "
                   "(default: closed loop, each orchestrator calls again at once)")
    g.add_argument("--streaming", action="store_true",
                   help="one AppendAndAttendStream per orchestrator instead of unary calls")
    g.add_argument("--packed", action="store_true",
                   help="each call one packed AttendBatch (q [B, n, H, D] as one tensor) "
                   "instead of one item per session; split by the client to fit "
                   "--max-message-bytes")
    g.add_argument("--untimed-prefill", action="store_true",
                   help="run every session's first prefill before the clock starts (not in "
                   "the latency/throughput figures): a decode benchmark at a given length")
    g.add_argument("--timeout", type=parse_duration, default=20.0,
                   help="deadline of each call [20s]")
    g.add_argument("--seed", type=int, default=0, help="random data seed [0]")


def _connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection")
    g.add_argument("--token", help="bearer token (or env Q8KV_TOKEN)")
    g.add_argument("--tls", metavar="CA_PATH",
                   help="use TLS, trusting this CA bundle ('system' for the system roots)")
    g.add_argument("--max-message-bytes", type=parse_size, default=DEFAULT_MAX_MESSAGE_BYTES,
                   metavar="SIZE",
                   help="largest message sent or received, e.g. 256KiB (set it to the "
                   "server's --max-message-bytes when that is smaller) [512MiB]")


def _report_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checks and report")
    g.add_argument("--verify", type=float, default=0.0, metavar="FRACTION",
                   help="recompute this fraction of calls locally (float64 reference on the "
                   "exact Q8 cache) and count mismatches [0]")
    g.add_argument("--tolerance", type=float,
                   help="relative L2 error allowed by --verify [1e-4 for float32, 1e-2 for "
                   "float16]")
    g.add_argument("--metrics-url",
                   help="the server's /metrics URL: adds memory saved and compression ratio")
    g.add_argument("-O", "--output", choices=("text", "json", "csv"), default="text",
                   help="report format; csv: one row per call [text]")
    g.add_argument("-o", "--output-file", help="write the report here instead of stdout")
    g.add_argument("--plot", metavar="FILE.png",
                   help="draw latency over time and the histogram (needs matplotlib)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadSpec:
    """Flags -> LoadSpec, or exit 2 with a message naming the flag."""
    def positive(name: str, minimum: int = 1) -> None:
        value = getattr(args, name)
        if value < minimum:
            parser.error(f"--{name.replace('_', '-')}: expected >= {minimum}, got {value}")

    for name in ("layers", "heads", "kv_heads", "head_dim", "batch", "in_flight",
                 "concurrency", "connections"):
        positive(name)
    positive("prefill", 0)
    positive("steps", 0)
    if args.head_dim % 32:
        parser.error(f"--head-dim: expected a multiple of 32, got {args.head_dim}")
    if args.heads % args.kv_heads:
        parser.error(f"--heads: expected a multiple of --kv-heads {args.kv_heads}, "
                     f"got {args.heads}")
    if args.prefill + args.steps < 1:
        parser.error("--prefill/--steps: a sequence needs at least one token")
    if args.concurrency > MAX_CONCURRENCY:
        parser.error(f"--concurrency: expected <= {MAX_CONCURRENCY}, got {args.concurrency}")
    if args.duration is None and args.requests is None:
        parser.error("a run must be bounded: give --duration (e.g. 30s) or --requests")
    if args.duration is not None and not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration: expected > 0 and <= {MAX_DURATION_S:g}s, "
                     f"got {args.duration:g}s")
    if args.requests is not None and not 0 < args.requests <= MAX_REQUESTS:
        parser.error(f"--requests: expected 1..{MAX_REQUESTS}, got {args.requests}")
    if args.rate is not None and not 0 < args.rate <= 1e7:
        parser.error(f"--rate: expected > 0 calls/s, got {args.rate:g}")
    if not 0 < args.timeout <= 3600:
        parser.error(f"--timeout: expected > 0 and <= 3600s, got {args.timeout:g}s")
    if not 0 <= args.verify <= 1:
        parser.error(f"--verify: expected a fraction in [0, 1], got {args.verify:g}")
    if args.tolerance is not None and not args.tolerance > 0:
        parser.error(f"--tolerance: expected > 0, got {args.tolerance:g}")
    if args.tls not in (None, "system") and not os.path.isfile(args.tls):
        parser.error(f"--tls: CA bundle {args.tls!r} is not a readable file")
    if args.plot and (missing := report_mod.matplotlib_missing()):
        parser.error(missing)
    _check_message_size(args, parser)
    sessions = args.concurrency * args.in_flight * args.batch
    copy_bytes = (sessions * args.layers * (args.prefill + args.steps) * args.kv_heads
                  * args.head_dim * 4 * 2)
    if args.verify > 0 and copy_bytes > MAX_VERIFY_COPY_BYTES:
        parser.error(f"--verify: the local copy of {sessions} sessions would take "
                     f"{copy_bytes / 1024**3:.1f} GiB (at most "
                     f"{MAX_VERIFY_COPY_BYTES / 1024**3:.0f}); use fewer sessions or tokens")
    return _spec(args)


def _spec(args: argparse.Namespace) -> LoadSpec:
    """The checked flags as a LoadSpec (the token may come from Q8KV_TOKEN)."""
    return LoadSpec(
        target=args.target, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.head_dim, dtype=args.dtype, prefill=args.prefill, steps=args.steps,
        batch=args.batch, in_flight=args.in_flight, packed=args.packed,
        max_message_bytes=args.max_message_bytes, concurrency=args.concurrency,
        connections=args.connections,
        duration=args.duration, requests=args.requests, rate=args.rate,
        streaming=args.streaming, token=args.token or os.environ.get("Q8KV_TOKEN") or None,
        tls=args.tls, timeout=args.timeout, verify=args.verify,
        tolerance=args.tolerance or DEFAULT_TOLERANCE[args.dtype],
        untimed_prefill=args.untimed_prefill, seed=args.seed,
    )


def _check_message_size(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """No call may need a message over --max-message-bytes: a packed call is split by the
    client down to one token of one session; an AppendAndAttend is not split at all."""
    itemsize = 2 if args.dtype == "float16" else 4
    token = (args.heads + 2 * args.kv_heads) * args.head_dim * itemsize
    limit = args.max_message_bytes
    if args.packed:
        need = token + ROW_OVERHEAD_BYTES + 64 + ENVELOPE_BYTES  # 64: a loadtest id
        if need > limit:
            parser.error(f"--max-message-bytes: expected at least {need} (one token of one "
                         f"session of a packed call), got {limit}")
        return
    tokens = max(args.prefill, 1)
    need = args.batch * (tokens * token + ITEM_OVERHEAD_BYTES) + ENVELOPE_BYTES
    if need > limit:
        parser.error(f"--max-message-bytes: a call of {args.batch} session(s) x {tokens} "
                     f"tokens needs {need} bytes, over the limit {limit}; use --packed (the "
                     "client splits it to the limit), or fewer sessions or tokens")
