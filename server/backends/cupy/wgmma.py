"""The wgmma wrappers of the prefill kernels (q8_wgmma.cuh's ``__WGMMA_WRAPPERS__``), generated:
one inline-asm function per (N, 16-bit type, B layout), whose operand lists run to 64
accumulators."""

from __future__ import annotations


def wgmma_wrappers() -> str:
    """``wgmma_n{64,128}_{f16,bf16}[_t](d, a, desc, scale_d)``: m64nNk16 with A in registers
    and B from a shared-memory descriptor (``_t``: B stored N-major, transposed by the
    hardware), float32 accumulate. Generated: the asm operand lists run to 64 accumulators."""
    out = []
    for n in (64, 128):
        for t in ("f16", "bf16"):
            for trans in (0, 1):
                regs = n // 2
                acc = ", ".join(f"%{i}" for i in range(regs))
                a = ", ".join(f"%{regs + i}" for i in range(4))
                outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
                name = f"wgmma_n{n}_{t}{'_t' if trans else ''}"
                out.append(
                    f"__device__ __forceinline__ void {name}(float* d, const unsigned* a, "
                    f"unsigned long long desc, int scale_d) {{\n"
                    f'  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"\n'
                    f'    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{t}.{t} {{{acc}}}, '
                    f'{{{a}}}, %{regs + 4}, p, 1, 1, {trans};\\n}}\\n"\n'
                    f"    : {outs}\n"
                    f'    : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), '
                    f'"r"(scale_d));\n}}'
                )
    return "\n".join(out)
