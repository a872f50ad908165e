"""Compile every CUDA kernel of the GPU backend for sm_90 with NVRTC, under the options the
backend really compiles them with, and report each kernel's registers, shared memory and
spills. Needs CuPy's NVRTC bindings and the NVRTC library (``cupy-cuda12x`` and
``nvidia-cuda-nvrtc-cu12``, the ``kernels`` extra), not a driver or a device, so CI runs it.

    python -m q8kv.server.backends.cupy.build_check      # exit 1 on an error or a spill
    python -m q8kv.server.backends.cupy.build_check --same-code-as DIR

The second compiles every build from these sources and from DIR's .cu/.cuh files (another
revision's: ``git show REV:server/backends/cupy/FILE > DIR/FILE``) and says which compile
to the same cubin: a refactor of the kernels checked without a GPU (exit 1 if any differ).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from q8kv.format import QBLOCK

from . import kernels
from .tuning import GpuTuning

ARCH = "sm_90"


@dataclass
class Build:
    """What ptxas said of one kernel under one set of options."""

    name: str  # the .cu file and the options that differ between builds
    ok: bool
    registers: int = 0
    smem_bytes: int = 0  # static shared memory (the dynamic part is set at launch)
    spill_bytes: int = 0  # spill stores + spill loads
    stack_bytes: int = 0
    log: str = ""
    cubin: bytes = b""

    @property
    def clean(self) -> bool:
        return self.ok and self.spill_bytes == 0 and self.stack_bytes == 0


def builds(tuning: GpuTuning | None = None) -> list[tuple[str, str, tuple[str, ...]]]:
    """(name, source, options) of every kernel build the backend can make under ``tuning``:
    the page kernels once, the attention and the prefill kernel per head_dim."""
    tuning = GpuTuning() if tuning is None else tuning
    out = [("q8_pages.cu", kernels.source("q8_pages.cu"), kernels._PAGES_OPTIONS)]
    attention = kernels.source("q8_attention_tc.cu")
    for head_dim in range(QBLOCK, kernels.MAX_HEAD_DIM + 1, QBLOCK):
        name = f"q8_attention_tc.cu D={head_dim}"
        out.append((name, attention, kernels.attention_options(head_dim, tuning)))
    prefill = kernels.source("q8_prefill.cu")
    for head_dim in range(QBLOCK, kernels.MAX_HEAD_DIM + 1, QBLOCK):
        out.append((f"q8_prefill.cu D={head_dim}", prefill, kernels.prefill_options(head_dim)))
    wgmma = kernels.source("q8_prefill_wg.cu")
    for head_dim in kernels.WGMMA_HEAD_DIMS:
        name = f"q8_prefill_wg.cu D={head_dim} sm_90a"
        out.append((name, wgmma, ("-arch=sm_90a", *kernels.wgmma_prefill_options(head_dim))))
    ws = kernels.source("q8_prefill_ws.cu")
    for head_dim in kernels.WS_HEAD_DIMS:
        name = f"q8_prefill_ws.cu D={head_dim} sm_90a"
        out.append((name, ws, ("-arch=sm_90a", *kernels.ws_prefill_options(head_dim))))
    return out


def compile_one(name: str, source: str, options: tuple[str, ...]) -> Build:
    from cupy_backends.cuda.libs import nvrtc  # only here: the rest imports without CuPy

    # CuPy adds -ftz=true to every compile it makes (kernels.py); so do we. A build that
    # names its own -arch (sm_90a: wgmma) keeps it.
    arch = [] if any(o.startswith("-arch=") for o in options) else [f"-arch={ARCH}"]
    opts = [*arch, "--ptxas-options=-v", "-ftz=true", *options]
    prog = nvrtc.createProgram(source, name.split()[0], [], [])
    try:
        nvrtc.compileProgram(prog, opts)
        ok = True
    except Exception:  # noqa: BLE001 - the log says why
        ok = False
    log = nvrtc.getProgramLog(prog).replace("\x00", "").strip()
    build = Build(name, ok, log=log, cubin=nvrtc.getCUBIN(prog) if ok else b"")
    nvrtc.destroyProgram(prog)

    def number(pattern: str) -> int:
        return sum(int(m) for m in re.findall(pattern, log))

    build.registers = max((int(m) for m in re.findall(r"Used (\d+) registers", log)), default=0)
    build.smem_bytes = number(r"(\d+) bytes smem")
    build.spill_bytes = number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads")
    build.stack_bytes = number(r"(\d+) bytes stack frame")
    return build


def same_code(other: Path) -> int:
    """Each build's cubin from these sources against the same build from ``other``'s."""
    differ = 0
    for name, source, options in builds():
        saved, kernels._SRC = kernels._SRC, other  # noqa: SLF001 - the other tree's files
        try:
            theirs = kernels.source(name.split()[0])
        except FileNotFoundError:
            theirs = None
        finally:
            kernels._SRC = saved  # noqa: SLF001
        if theirs is None:
            print(f"{name}: not in {other}")
            continue
        a, b = compile_one(name, source, options), compile_one(name, theirs, options)
        same = a.ok and b.ok and a.cubin == b.cubin
        differ += not same
        print(f"{name}: {'the same cubin' if same else 'differs'}")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--same-code-as", type=Path, metavar="DIR",
                    help="compare every build's cubin with DIR's sources'")  # fmt: skip
    args = ap.parse_args()
    if args.same_code_as is not None:
        return same_code(args.same_code_as)
    results = [compile_one(*b) for b in builds()]
    width = max(len(r.name) for r in results)
    print(f"{'kernel build':<{width}}  {'regs':>5} {'smem':>6} {'spill':>6} {'stack':>6}")
    for r in results:
        status = "" if r.clean else ("  FAILED" if not r.ok else "  SPILLS")
        print(
            f"{r.name:<{width}}  {r.registers:>5} {r.smem_bytes:>6} {r.spill_bytes:>6} "
            f"{r.stack_bytes:>6}{status}"
        )
        if not r.ok:
            print(r.log)
    bad = [r.name for r in results if not r.clean]
    print(f"{len(results)} kernel builds for {ARCH}: {len(results) - len(bad)} clean")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
