"""Server configuration: command-line flags, each with a ``Q8KV_*`` environment fallback.

Precedence: flag > environment > default. The defaults serve: ``q8kv-server`` with no flags
listens on 0.0.0.0:50051 with the GPU backend where one is found, numpy otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


class ConfigError(Exception):
    """A setting the server cannot run with, found after parsing (a file that will not
    read, a port in use): ``q8kv-server`` prints it as one line and exits 2, like a bad
    flag. The message names the flag and what was expected and found."""


def parse_size(text: str) -> int:
    """'4GiB', '512M', '65536' -> bytes (KiB/MiB/GiB are powers of 1024, K/M/G of 1000)."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size like 4GiB or 512MB, got {text!r}")
    number, unit = float(match.group(1)), (match.group(2) or "").lower()
    prefix = unit[:1] if unit[:1] in "kmgt" else ""
    base = 1024 ** "kmgt".index(prefix) * 1024 if prefix and "i" in unit else _UNITS[prefix]
    return int(number * base)


def parse_budget(text: str) -> int | None:
    """A memory budget: a size, or 'auto' (None: the backend's free memory decides)."""
    return None if str(text).strip().lower() == "auto" else parse_size(text)


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = 50051
    backend: str = "auto"
    memory_budget: int | None = None  # bytes; None = auto
    page_bytes: int = 64 * 1024  # int8 code bytes of a page; scales add 1/8 (PagePool)
    max_sessions: int = 4096
    session_ttl: float = 3600.0
    evict_idle_seconds: float = 0.0
    max_message_bytes: int = 512 * 1024 * 1024
    batching: str = "on"
    max_batch_items: int = 64
    max_queue_delay_us: int = 0
    prefill_chunk_tokens: int = 512
    grace_seconds: float = 10.0
    max_items_per_call: int = 1024
    max_tokens_per_call: int = 65536
    tenant_max_sessions: int = 0
    tenant_max_bytes: int = 0
    auth_tokens_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    snapshot_dir: str | None = None
    metrics_port: int = 9464
    # 1 in 1,000 appended items: ~40 samples a second at 40k items/s. A sample runs on the
    # event loop: at 1% a B = 64 packed call paid 171 us for them on average, at 0.1% 31 us
    # (2-vCPU VM: benchmarks/server_cpu.py --canned-backend --stages, and the rate's env).
    quant_error_sample_rate: float = 0.001
    log_level: str = "INFO"
    log_format: str = "text"
    malloc_retain_bytes: int = 256 * 1024 * 1024
    # GPU kernel tuning (cupy backend; GpuTuning in backends/cupy/tuning.py has the whys).
    gpu_max_splits: int = 48
    gpu_split_waves: float = 1.0
    gpu_tc_minblocks: int = 2
    gpu_tc_nstages: int = 2
    gpu_tc_stage_bytes: int = 32768
    gpu_prefill_scratch_bytes: int = 512 * 1024 * 1024


# flag name -> (type, help). The environment variable is Q8KV_<NAME IN CAPITALS>.
_FLAGS: dict[str, tuple[object, str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "gRPC port (0: pick a free one and log it)"),
    "backend": (str, "auto | numpy | cupy (auto: cupy where a GPU is found)"),
    "memory_budget": (
        parse_budget,
        "bytes for the page pool (e.g. 8GiB); auto: 90%% of free GPU memory less 512MiB, "
        "or 2GiB on CPU",
    ),
    "page_bytes": (parse_size, "code bytes per cache page (multiple of 512)"),
    "max_sessions": (int, "most live sessions; more get RESOURCE_EXHAUSTED"),
    "session_ttl": (float, "default idle seconds before a session expires (0: never)"),
    "evict_idle_seconds": (
        float,
        "when the pool is full, evict least recently used sessions idle this long (0: never)",
    ),
    "max_message_bytes": (parse_size, "largest gRPC message in or out"),
    "batching": (str, "on | off: coalesce concurrent AppendAndAttend calls into one launch"),
    "max_batch_items": (int, "most (session, layer) items the engine runs in one launch"),
    "max_queue_delay_us": (int, "how long the engine waits to fill a batch (0: no wait)"),
    "prefill_chunk_tokens": (
        int,
        "a call appending more new tokens runs in chunks of this many, other sessions' "
        "decode steps interleaved between them (0: never chunked)",
    ),
    "grace_seconds": (float, "on SIGTERM/SIGINT, how long in-flight calls may finish"),
    "max_items_per_call": (int, "most (session, layer) items in one AppendAndAttend"),
    "max_tokens_per_call": (int, "most new tokens, summed over items, in one AppendAndAttend"),
    "tenant_max_sessions": (int, "most live sessions per tenant (0: no limit)"),
    "tenant_max_bytes": (parse_size, "most pool bytes per tenant (0: no limit)"),
    "auth_tokens_file": (
        str,
        "file of 'token tenant' lines, reloaded on SIGHUP; with it (or Q8KV_AUTH_TOKENS) "
        "every call but health needs 'authorization: Bearer <token>'",
    ),
    "tls_cert": (str, "PEM certificate chain: serve TLS (with --tls-key)"),
    "tls_key": (str, "PEM private key of --tls-cert"),
    "tls_client_ca": (str, "PEM CA bundle: require client certificates it signed (mTLS)"),
    "snapshot_dir": (
        str,
        "on SIGTERM write every session here as a new set (checksummed, manifest last), "
        "replacing the previous set only once complete; load the newest complete set at "
        "start",
    ),
    "metrics_port": (int, "Prometheus /metrics HTTP port on --host (-1: metrics off)"),
    "quant_error_sample_rate": (
        float,
        "fraction of appended items whose quantization error is measured (0..1)",
    ),
    "log_level": (str, "DEBUG | INFO | WARNING | ERROR"),
    "log_format": (str, "text | json (one object per line)"),
    "malloc_retain_bytes": (
        parse_size,
        "freed host memory glibc keeps for reuse instead of returning it to the kernel, so "
        "a call's buffers do not fault in fresh pages each time (0: glibc's defaults)",
    ),
    "gpu_max_splits": (int, "cupy: most sequence splits per row tile in attention"),
    "gpu_split_waves": (float, "cupy: attention splits aim at this many waves of blocks"),
    "gpu_tc_minblocks": (int, "cupy: attention blocks per SM the registers are capped for"),
    "gpu_tc_nstages": (int, "cupy: attention pipeline stages"),
    "gpu_tc_stage_bytes": (parse_size, "cupy: K/V code bytes per attention pipeline stage"),
    "gpu_prefill_scratch_bytes": (
        parse_size,
        "cupy: device scratch for a prefill launch's K/V dequantized to 16 bits (a launch "
        "needing more runs on the slower kernel that dequantizes in its loop; 0: always)",
    ),
}


def _env_name(name: str) -> str:
    return "Q8KV_" + name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="q8kv-server",
        description="q8kv: per-session LLM KV caches in Q8 on the GPU, attention over gRPC.",
        epilog="Every flag falls back to the environment variable Q8KV_<FLAG> (e.g. Q8KV_PORT).",
    )
    defaults = Config()
    for name, (kind, help_text) in _FLAGS.items():
        default = getattr(defaults, name)
        shown = default if default is not None else ("auto" if name == "memory_budget" else "unset")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=kind,
            default=None,
            help=f"{help_text} [env {_env_name(name)}, default {shown}]",
        )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: dict | None = None) -> Config:
    """Flags, then Q8KV_* variables, then defaults. Bad values exit with a usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    values = {}
    for field in fields(Config):
        value = getattr(args, field.name)
        if value is None and _env_name(field.name) in environ:
            kind = _FLAGS[field.name][0]
            raw = environ[_env_name(field.name)]
            try:
                value = kind(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{_env_name(field.name)}={raw!r}: {exc}")
        if value is not None:
            values[field.name] = value
    config = Config(**values)
    _check(config, parser)
    return config


def _check(config: Config, parser: argparse.ArgumentParser) -> None:
    if config.backend not in ("auto", "numpy", "cupy"):
        parser.error(f"--backend: expected auto, numpy or cupy, got {config.backend!r}")
    if not 0 <= config.port <= 65535:
        parser.error(f"--port: expected 0..65535, got {config.port}")
    if config.page_bytes <= 0 or config.page_bytes % 512:
        parser.error(f"--page-bytes: expected a positive multiple of 512, got {config.page_bytes}")
    if not -1 <= config.metrics_port <= 65535:
        parser.error(f"--metrics-port: expected -1..65535, got {config.metrics_port}")
    if not 0 <= config.quant_error_sample_rate <= 1:
        parser.error(
            f"--quant-error-sample-rate: expected 0..1, got {config.quant_error_sample_rate}"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key: expected both or neither, got one")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca: expected with --tls-cert/--tls-key (mTLS needs TLS)")
    for name in ("tenant_max_sessions", "tenant_max_bytes", "prefill_chunk_tokens"):
        if getattr(config, name) < 0:
            parser.error(f"--{name.replace('_', '-')}: expected >= 0, got {getattr(config, name)}")
    if config.batching not in ("on", "off"):
        parser.error(f"--batching: expected on or off, got {config.batching!r}")
    if config.log_format not in ("text", "json"):
        parser.error(f"--log-format: expected text or json, got {config.log_format!r}")
    for name in (
        "max_sessions", "max_batch_items", "max_message_bytes", "max_items_per_call",
        "max_tokens_per_call",
    ):
        if getattr(config, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected > 0, got {getattr(config, name)}")
    if config.memory_budget is not None and config.memory_budget <= 0:
        parser.error(f"--memory-budget: expected > 0 or auto, got {config.memory_budget}")
    _check_gpu_tuning(config, parser)


def _check_gpu_tuning(config: Config, parser: argparse.ArgumentParser) -> None:
    from .backends.cupy.tuning import GpuTuning  # its limits are written there, once

    try:
        GpuTuning.from_config(config)
    except ValueError as exc:
        parser.error(str(exc))
