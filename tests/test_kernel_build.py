"""Every CUDA kernel of the GPU backend compiles for sm_90 with NVRTC under the options the
backend really uses, without a register spill or a stack frame (no GPU needed: CuPy's NVRTC
bindings and the NVRTC library, the ``kernels`` extra that `make test` installs). `.ci/run`
prints the per-kernel registers and shared memory with
``python -m q8kv.server.backends.cupy.build_check``."""

from __future__ import annotations

from pathlib import Path

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


def test_the_timeline_build_compiles() -> None:
    """benchmarks/decode_trace.py's TRACE=1 build of the attention kernel (diagnostics: the
    backend never makes it) compiles, without spills."""
    options = (*kernels.attention_options(128, GpuTuning()), "-DTRACE=1")
    traced = build_check.compile_one("trace", kernels.source("q8_attention_tc.cu"), options)
    assert traced.clean, traced.log


def test_the_sm90a_build_is_cached_privately(tmp_path, monkeypatch) -> None:
    """The wgmma kernel's cubin (built by NVRTC, not CuPy) lands in CuPy's cache directory
    and is reused from there; where that cannot be written, a private temporary file is
    loaded and removed. (The module load itself needs a GPU: a stand-in records paths.)"""
    cupy = __import__("cupy")
    loaded: list[tuple[str, bytes]] = []

    def fake_module(path: str):
        loaded.append((path, Path(path).read_bytes()[:4]))
        return object()

    monkeypatch.setattr(cupy, "RawModule", lambda path: fake_module(path))
    cache = tmp_path / "cache"
    monkeypatch.setenv("CUPY_CACHE_DIR", str(cache))
    source = kernels.source("q8_prefill_wg.cu")
    options = kernels.wgmma_prefill_options(128)
    kernels._sm90a_module(source, options, "q8_prefill_wg")
    (cubin,) = cache.iterdir()
    assert loaded == [(str(cubin), b"\x7fELF")]
    stamp = cubin.stat().st_mtime_ns
    kernels._sm90a_module(source, options, "q8_prefill_wg")  # from the cache: no rebuild
    assert cubin.stat().st_mtime_ns == stamp and len(loaded) == 2
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache directory should be")
    monkeypatch.setenv("CUPY_CACHE_DIR", str(blocked / "sub"))
    kernels._sm90a_module(source, options, "q8_prefill_wg")
    private = loaded[-1][0]
    assert loaded[-1][1] == b"\x7fELF" and not blocked.is_dir()
    assert not Path(private).exists(), "the private temporary file stays"


def test_same_code_tells_a_refactor_from_a_change(tmp_path, monkeypatch, capsys) -> None:
    """``build_check --same-code-as DIR``: q8_pages.cu from a copy of these sources with a
    comment moved compiles to the same cubin; with one constant changed it differs; a file
    the other tree lacks is named, not compared."""
    pages = kernels.source("q8_pages.cu")
    monkeypatch.setattr(build_check, "builds", lambda: [
        ("q8_pages.cu", pages, kernels._PAGES_OPTIONS),
        ("q8_new.cu", pages, kernels._PAGES_OPTIONS)])  # fmt: skip
    for src in kernels._SRC.glob("*.cu*"):
        if src.name != "q8_pages.cu":
            (tmp_path / src.name).write_text(src.read_text())
    text = (kernels._SRC / "q8_pages.cu").read_text()
    (tmp_path / "q8_pages.cu").write_text("// moved\n" + text)
    assert build_check.same_code(tmp_path) == 0
    assert "q8_pages.cu: the same cubin" in capsys.readouterr().out
    changed = text.replace("amax_bits) / 127.0f", "amax_bits) / 126.0f")
    assert changed != text
    (tmp_path / "q8_pages.cu").write_text(changed)
    assert build_check.same_code(tmp_path) == 1
    out = capsys.readouterr().out
    assert "q8_pages.cu: differs" in out and f"q8_new.cu: not in {tmp_path}" in out
