"""Every CUDA kernel of the GPU backend compiles for sm_90 with NVRTC under the options the
backend really uses, without a register spill or a stack frame (no GPU needed: CuPy's NVRTC
bindings and the NVRTC library, the ``kernels`` extra that `make test` installs). `.ci/run`
prints the per-kernel registers and shared memory with
``python -m q8kv.server.backends.cupy.build_check``."""

from __future__ import annotations

from q8kv.server.backends.cupy import build_check, kernels
from q8kv.server.backends.cupy.tuning import GpuTuning


def test_every_kernel_build_compiles_without_spills() -> None:
    results = [build_check.compile_one(*b) for b in build_check.builds()]
    names = [r.name for r in results]
    assert "q8_pages.cu" in names
    assert sum(n.startswith("q8_attention_tc.cu") for n in names) == kernels.MAX_HEAD_DIM // 32, (
        "one attention build per head_dim"
    )
    assert sum(n.startswith("q8_prefill.cu") for n in names) == kernels.MAX_HEAD_DIM // 32
    bad = [(r.name, r.ok, r.spill_bytes, r.stack_bytes) for r in results if not r.clean]
    assert not bad, f"kernel builds with errors or spills: {bad}"
    assert all(r.registers > 0 for r in results), "ptxas reported no register count"


def test_the_check_catches_a_spill_and_a_compile_error() -> None:
    """The checker is not blind: capping D = 128's registers at 128 (4 blocks of 128
    threads per SM) spills, and a broken source fails."""
    source = kernels.source("q8_attention_tc.cu")
    options = kernels.attention_options(128, GpuTuning(tc_minblocks=4, tc_stage_bytes=16384))
    capped = build_check.compile_one("capped", source, options)
    assert capped.ok and capped.registers <= 128 and not capped.clean
    broken = build_check.compile_one("broken", source + "\nthis is not C++;\n", options)
    assert not broken.ok and not broken.clean
