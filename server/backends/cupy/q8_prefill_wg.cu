// Causal prefill over the Q8 cache on Hopper's warpgroup tensor cores (wgmma, sm_90a): the
// flash-attention tiling of q8_prefill.cu (which serves the other head_dims and the same
// semantics), with both products as asynchronous warpgroup MMAs:
// - a block is PF_WG warpgroups of 4 warps; each warpgroup owns 64 query rows, q in registers
//   (the A operand, as the wire sent it);
// - K/V codes and scales stream global -> shared with cp.async (two raw stages, XOR-swizzled
//   16-byte pieces so the copies and the reads are conflict-free: KvStream,
//   q8_prefill_common.cuh, with the page-id ring);
// - the block dequantizes a raw stage (code * scale, one rounding to the 16-bit type: half2
//   arithmetic for float16, float32 for bfloat16) into wgmma's canonical no-swizzle layout:
//   8 x 16-byte core matrices, K and V both [token][dim]; K is a K-major B operand of
//   Q K^T, V an N-major B of P V (transposed by wgmma);
// - S = Q K^T is issued asynchronously, the block dequantizes the next tile while the tensor
//   cores run it, then the online softmax in float32 on the accumulators, P rounded to the
//   16-bit type as the register A operand of O += P V.
// Rows and causal limits as q8_prefill.cu: row r = i * G + g sees [0, start + r / G].
#include "q8_common.cuh"
#include "q8_prefill_common.cuh"
#include "q8_wgmma.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef PF_WG
#define PF_WG 2
#endif
#ifndef PF_PV_ASYNC  // P V of tile j runs on while tile j + 1 is issued and dequantized
#define PF_PV_ASYNC 1
#endif

constexpr int D = HEAD_DIM;
constexpr int NT = 128 * PF_WG;
constexpr int BM = 64 * PF_WG;  // query rows per block
constexpr int BN = 64;          // tokens per K/V tile
constexpr int NB = D / 32;
constexpr int PIECES = D / 16;  // 16-byte pieces of a head vector's codes
constexpr int KSTEPS = D / 16;
constexpr int NTILES_S = BN / 8;
constexpr int NTILES_O = D / 8;
constexpr int HALF_TILE = BN * D * 2;  // bytes of one 16-bit K or V tile
// 16-bit buffers: with P V left running into the next tile, the dequantization of tile j + 1
// must not overwrite what P V of tile j - 1 may still read: three buffers.
constexpr int NBUF = PF_PV_ASYNC ? 3 : 2;
using Kv = KvStream<D, BN, NT, true>;  // the K/V staging (q8_prefill_common.cuh)
constexpr int RAW_CODES = Kv::RAW_CODES;  // a raw stage: K codes, V codes, K scales, V scales
constexpr int RAW_BYTES = Kv::RAW_BYTES;
constexpr int SMEM_RAW = 2 * RAW_BYTES;
static_assert(D == 64 || D == 128, "the wgmma prefill is written for head_dim 64 and 128");

// Byte k of x (already biased by 0x80) as the exact float of its int8 code.
__device__ __forceinline__ float code_of(unsigned x, unsigned sel) {
  return __uint_as_float(__byte_perm(x, 0x4B000000u, sel)) - 8388736.0f;
}
// 16 codes x scale -> 16 float16 values (two uint4), in half2 arithmetic: byte u = code + 128
// under the exponent of 16 is 16 + u / 64 exactly, so one subtraction gives code / 64; the
// scale times 64 splits into float16 hi + lo (~22 bits), and fma(c, hi, c * lo) rounds
// once. Equal to rounding code * scale to float16 except in the rare double-rounding tie
// (and for blocks below float16's normal range, where lo is subnormal).
__device__ __forceinline__ void dequant16_h2(uint4 w, float s, uint4* out) {
  const float s64 = s * 64.0f;
  unsigned short hi, lo;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(s64));
  float back;
  asm("cvt.f32.f16 %0, %1;" : "=f"(back) : "h"(hi));
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(s64 - back));
  const unsigned hi2 = hi | ((unsigned)hi << 16), lo2 = lo | ((unsigned)lo << 16);
  const unsigned in[4] = {w.x, w.y, w.z, w.w};
  unsigned r[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned x = in[i] ^ 0x80808080u;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      unsigned c = __byte_perm(x, 0x4C4Cu, h ? 0x4342 : 0x4140), t;
      asm("sub.f16x2 %0, %0, %1;" : "+r"(c) : "r"(0x4C804C80u));  // - 18.0: code / 64
      asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(t) : "r"(c), "r"(lo2));
      asm("fma.rn.f16x2 %0, %1, %2, %0;" : "+r"(t) : "r"(c), "r"(hi2));
      r[2 * i + h] = t;
    }
  }
  out[0] = make_uint4(r[0], r[1], r[2], r[3]);
  out[1] = make_uint4(r[4], r[5], r[6], r[7]);
}
// 16 codes x scale -> 16 values of the 16-bit type: code * scale in float32, one rounding.
template <bool BF16>
__device__ __forceinline__ void dequant16(uint4 w, float s, uint4* out) {
  if (!BF16) {
    dequant16_h2(w, s, out);
    return;
  }
  const unsigned in[4] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u, w.z ^ 0x80808080u,
                          w.w ^ 0x80808080u};
  unsigned r[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    r[2 * i] = pack2<BF16>(code_of(in[i], 0x7440) * s, code_of(in[i], 0x7441) * s);
    r[2 * i + 1] = pack2<BF16>(code_of(in[i], 0x7442) * s, code_of(in[i], 0x7443) * s);
  }
  out[0] = make_uint4(r[0], r[1], r[2], r[3]);
  out[1] = make_uint4(r[4], r[5], r[6], r[7]);
}
template <bool BF16>
__device__ __forceinline__ void prefill(const int* __restrict__ meta, int nitems,
                                        const int* __restrict__ ptab,
                                        const unsigned char* __restrict__ inbuf,
                                        const signed char* __restrict__ codes,
                                        const float* __restrict__ scales, int page_code_bytes,
                                        float* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int pages_s[3][BN];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int wg = warp >> 2;  // warpgroup
  const PrefillUnit<BM> u(meta, nitems);  // (item, kv head, row tile)
  const int* im = u.im;
  const int G = u.G, start = u.start, nrows = u.nrows, row0 = u.row0;
  const float qs = __int_as_float(im[M_SCALE]);  // softmax_scale * log2(e)

  unsigned char* raw = smem;
  unsigned char* half = smem + SMEM_RAW;  // [buffer][K, V][HALF_TILE]
  const unsigned half_base = (unsigned)__cvta_generic_to_shared(half);

  // Rows of this thread (g and g + 8 of its warp's 16) and of its warpgroup (64).
  const int wrow = row0 + 16 * warp;
  const int r_lo = wrow + g, r_hi = wrow + g + 8;
  const int lim_lo = u.limit(r_lo), lim_hi = u.limit(r_hi);
  const int grow = row0 + 64 * wg;
  const int wg_min_lim = start + grow / G;

  // -- staging: page ids and raw stages of the K/V tiles (q8_prefill_common.cuh) -----------
  const Kv kv = Kv::of(u, pages_s, ptab, codes, scales, page_code_bytes, tid);
  const int ntiles = kv.ntiles;
  // Raw stage -> 16-bit K and V, each [token][dim] in core matrices of 8 rows x 16 bytes:
  // core (token / 8, dim / 8) at (token / 8) * 16 D + (dim / 8) * 128. V is read by wgmma
  // as an N-major B (transposed in hardware), where LBO is the stride between core matrices
  // along K (8 tokens) and SBO along N (8 dims): the other reading faults on the H200.
  // (Transposing V here instead, as a K-major B, was 13-21% slower: docs/kernels.md.)
  auto dequant = [&](int tile) {
    if (tile >= ntiles) return;
    const unsigned char* rb = raw + (tile & 1) * RAW_BYTES;
    const float* ks = reinterpret_cast<const float*>(rb + 2 * RAW_CODES);
    unsigned char* kh = half + (tile % NBUF) * 2 * HALF_TILE;
#pragma unroll
    for (int kind = 0; kind < 2; ++kind)  // K, then V: 16 codes of a token
#pragma unroll
      for (int p = tid; p < BN * PIECES; p += NT) {
        const int t = p % BN, pc = p / BN;
        const uint4 w = *reinterpret_cast<const uint4*>(rb + kind * RAW_CODES + Kv::piece(t, pc));
        uint4 h[2];
        dequant16<BF16>(w, ks[kind * BN * NB + t * NB + (pc >> 1)], h);
        unsigned char* dst = kh + kind * HALF_TILE + (t >> 3) * 16 * D + (2 * pc) * 128 +
                             (t & 7) * 16;
        *reinterpret_cast<uint4*>(dst) = h[0];
        *reinterpret_cast<uint4*>(dst + 128) = h[1];
      }
    // The tensor cores read these through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  };

  // q: A fragments of rows g and g + 8, as the wire sent them (registers: wgmma's A).
  const unsigned short* qg = reinterpret_cast<const unsigned short*>(inbuf + im[M_Q]);
  const long long qo_lo = u.q_offset(r_lo, D), qo_hi = u.q_offset(r_hi, D);
  unsigned qf[KSTEPS][4];
  load_q_fragments(qg, qo_lo, qo_hi, c, qf);

  float o[NTILES_O][4];
#pragma unroll
  for (int j = 0; j < NTILES_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  RowStats st = {NEG_INF, NEG_INF, 0.0f, 0.0f};

  int next_page = kv.start(raw);
  dequant(0);

  for (int tile = 0; tile < ntiles; ++tile) {
    kv.advance(tile, raw, next_page);  // tile's 16-bit K/V written; the other buffers free
    const int pos0 = tile * BN;
    const unsigned kbase = half_base + (tile % NBUF) * 2 * HALF_TILE;
    const unsigned vbase = kbase + HALF_TILE;
    // Every warpgroup runs every tile (a branch around wgmma would serialize them); a tile
    // past all of a warpgroup's rows is masked away whole.
    float s[NTILES_S][4];
    issue_scores<BF16, D>(s, qf, kbase);
    dequant(tile + 1);  // overlaps S = Q K^T (and P V of the tile before) on the tensor cores
    wg_wait0();
    reg_fence(s);
    reg_fence(o);

    unsigned pa[NTILES_S / 2][4];
    online_softmax<BF16, true>(s, o, pa, st, qs, pos0 + BN - 1 > wg_min_lim, pos0, c, lim_lo,
                               lim_hi);
    issue_pv<BF16, D>(o, pa, vbase);
    if (!PF_PV_ASYNC) wg_wait0();
  }
  wg_wait0();
  reg_fence(o);

  write_rows(o, st, out + im[M_OUT], qo_lo, qo_hi, c, r_lo < nrows, r_hi < nrows);
}

#define PREFILL_ARGS                                                                     \
  const int *__restrict__ meta, int nitems, const int *__restrict__ ptab,                \
      const unsigned char *__restrict__ inbuf, const signed char *__restrict__ codes,    \
      const float *__restrict__ scales, int page_code_bytes, float *__restrict__ out
extern "C" __global__ void __launch_bounds__(NT, 1) q8_prefill_f16(PREFILL_ARGS) {
  prefill<false>(meta, nitems, ptab, inbuf, codes, scales, page_code_bytes, out);
}
extern "C" __global__ void __launch_bounds__(NT, 1) q8_prefill_bf16(PREFILL_ARGS) {
  prefill<true>(meta, nitems, ptab, inbuf, codes, scales, page_code_bytes, out);
}
