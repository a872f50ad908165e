// Hopper's warpgroup tensor cores (wgmma, sm_90a) and asynchronous copies, for the prefill
// kernels (q8_prefill_wg.cu, q8_prefill_ws.cu): the generated wgmma wrappers (A from
// registers, B from a shared-memory descriptor, float32 accumulators), descriptors, fences,
// and the mbarrier + bulk-copy primitives of a producer/consumer pipeline.
#pragma once

__WGMMA_WRAPPERS__

// wgmma shared-memory descriptor, no swizzle: start, LBO (K-adjacent core matrices), SBO
// (M/N-adjacent core matrices), all in 16-byte units.
__device__ __forceinline__ unsigned long long smem_desc(unsigned addr, unsigned lbo,
                                                        unsigned sbo) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) |
         ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32);
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Wait until at most N of this warpgroup's committed wgmma groups are still running.
template <int N = 0>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void wg_wait0() { wg_wait<0>(); }
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N][4]) {  // keep accumulators in place
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}
// S (64 rows x 64 tokens) += A (q, registers) x B (K tile, K-major in shared memory).
template <bool BF16>
__device__ __forceinline__ void wgmma_s(float (&s)[8][4], const unsigned* a,
                                        unsigned long long desc, int acc) {
  if (BF16) wgmma_n64_bf16(&s[0][0], a, desc, acc); else wgmma_n64_f16(&s[0][0], a, desc, acc);
}
// O (64 rows x D) += A (P, registers) x B (16 tokens of V, [token][dim] in shared memory:
// an N-major B, transposed by wgmma).
template <bool BF16, int D>
__device__ __forceinline__ void wgmma_o(float (&o)[D / 8][4], const unsigned* a,
                                        unsigned long long desc) {
  float* d = &o[0][0];
  if (D == 128) {
    if (BF16) wgmma_n128_bf16_t(d, a, desc, 1); else wgmma_n128_f16_t(d, a, desc, 1);
  } else {
    if (BF16) wgmma_n64_bf16_t(d, a, desc, 1); else wgmma_n64_f16_t(d, a, desc, 1);
  }
}
// S = Q K^T of one 64-token K tile at shared address `kbase` (the canonical no-swizzle
// layout, [token][dim]), q's A fragments in registers: one commit group.
template <bool BF16, int D, int KSTEPS>
__device__ __forceinline__ void issue_scores(float (&s)[8][4], const unsigned (&qf)[KSTEPS][4],
                                             unsigned kbase) {
  reg_fence(s);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk)
    wgmma_s<BF16>(s, qf[kk], smem_desc(kbase + kk * 256, 128, 16 * D), kk > 0);
  wg_commit();
}
// O += P V of one 64-token V tile at shared address `vbase`, P's A fragments in registers
// (16 tokens each): one commit group.
template <bool BF16, int D, int PSTEPS>
__device__ __forceinline__ void issue_pv(float (&o)[D / 8][4], const unsigned (&p)[PSTEPS][4],
                                         unsigned vbase) {
  reg_fence(o);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < PSTEPS; ++kk)
    wgmma_o<BF16, D>(o, p[kk], smem_desc(vbase + kk * 32 * D, 16 * D, 128));
  wg_commit();
}

// mbarriers (shared::cta addresses) and 1D bulk copies (the TMA unit, no tensor map).
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// One arrival that also expects `bytes` of asynchronous copies to complete the phase.
__device__ __forceinline__ void mbar_expect(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
               : "memory");
}
// Wait for the phase of parity `parity` to complete.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}
// `bytes` (a multiple of 16, 16-byte aligned ends) global -> shared, completing on `bar`.
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes,
                                          unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
      ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}
