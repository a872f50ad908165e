"""--malloc-retain-bytes (server/malloc.py): freed host memory stays with the process, so
a call's buffers reuse pages instead of faulting in fresh ones (glibc trims its heap once
more than about twice the largest freed buffer is free at its top: a decode call's few
buffers of hundreds of KiB each went back to the kernel after every call)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from q8kv.server.config import load_config

# A call's pattern: six buffers of 700 KiB, every page written, all freed; the minor page
# faults of 20 such calls after 5 to warm up.
FAULTS = """
import resource, sys
from q8kv.server.malloc import retain_freed_memory
retain = 256 * 1024 * 1024 if sys.argv[1] == "retain" else 0
assert retain_freed_memory(retain) is (retain > 0)  # 0: glibc's defaults, not applied
def call():
    buffers = [bytearray(700 * 1024) for _ in range(6)]
    for b in buffers:
        b[::4096] = bytes(range(1, 1 + len(range(0, len(b), 4096))))
    del buffers
for _ in range(5):
    call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_is_reused_instead_of_faulted_in_again() -> None:
    default, retained = faults("zero"), faults("retain")
    # 20 calls x 6 x 175 pages = 21,000 faults when every call gets fresh pages: with
    # --malloc-retain-bytes 0 glibc's defaults stand and give them back after each call.
    assert default > 10_000, f"glibc's defaults no longer return these buffers: {default}"
    assert retained < default // 20, (default, retained)


def test_the_flag_defaults_to_256_mib_and_takes_sizes_and_zero(monkeypatch) -> None:
    assert load_config([]).malloc_retain_bytes == 256 * 1024**2
    assert load_config(["--malloc-retain-bytes", "1GiB"]).malloc_retain_bytes == 1024**3
    monkeypatch.setenv("Q8KV_MALLOC_RETAIN_BYTES", "0")
    assert load_config([]).malloc_retain_bytes == 0
