// Causal prefill over the Q8 cache on 16-bit tensor cores, flash-attention style: one block
// of PF_WARPS warps serves one work unit = (item, kv head, tile of BM query rows), and walks
// the K/V of positions [0, the tile's last causal limit] in tiles of BN tokens:
// - K/V codes and scales stream global -> shared with 16-byte cp.async (two raw stages);
// - the block dequantizes a raw stage into 16-bit K and V tiles (code * scale in float32,
//   one rounding to the wire's type: as a 16-bit cache of the same values would hold them),
//   double-buffered, so the dequantization of tile j + 1 and the products of tile j share
//   one barrier;
// - each warp owns 16 query rows: S = Q K^T and O += P V on m16n8k16 tensor cores (fp16 or
//   bf16 operands, float32 accumulate), the online softmax in float32 on the accumulator
//   fragments, P rounded to the 16-bit type as the A operand of P V;
// - causal masking only on the tiles that reach a row's limit; a warp whose rows see none
//   of a tile skips it.
// A row is one (new token i, query head of the kv head's group): rows = i * G + g, so the
// heads of a group share one read of K/V. Row r sees positions [0, start + r / G].
// Decode (n = 1) and float32 wires keep q8_attention_tc.cu (float32-grade arithmetic).
#include "q8_common.cuh"
#include "q8_prefill_common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef PF_WARPS
#define PF_WARPS 4
#endif
#ifndef PF_BN
#define PF_BN (HEAD_DIM > 128 ? 32 : 64)
#endif
#ifndef PF_MINBLOCKS
#define PF_MINBLOCKS (HEAD_DIM > 128 || PF_WARPS > 4 ? 1 : 2)
#endif
#ifndef PF_SKIP_DEQUANT  // diagnostics (benchmarks/prefill.py --variant): no dequantization
#define PF_SKIP_DEQUANT 0
#endif

constexpr int D = HEAD_DIM;
constexpr int NT = 32 * PF_WARPS;
constexpr int BM = 16 * PF_WARPS;  // query rows per block
constexpr int BN = PF_BN;          // tokens per K/V tile
constexpr int NB = D / 32;         // scale blocks per head vector
constexpr int HS = D + 8;          // padded 16-bit smem row (halves): ldmatrix conflict-free
constexpr int KSTEPS = D / 16;     // k steps of Q K^T
constexpr int NTILES_S = BN / 8;   // n tiles of S (8 tokens each)
constexpr int NTILES_O = D / 8;    // n tiles of O (8 dims each)
constexpr bool Q_IN_REGS = D <= 128;
constexpr int HALF_TILE = BN * HS;  // halves of one 16-bit K or V tile
using Kv = KvStream<D, BN, NT, false>;  // the K/V staging (q8_prefill_common.cuh)
constexpr int RAW_CODES = Kv::RAW_CODES;  // a raw stage: K codes, V codes, K scales, V scales
constexpr int RAW_BYTES = Kv::RAW_BYTES;
constexpr int SMEM_RAW = 2 * RAW_BYTES;
constexpr int SMEM_HALF = 2 * 2 * HALF_TILE * 2;  // 2 buffers x (K, V) x bytes; then q
static_assert(D % 32 == 0 && D <= 256, "head_dim not supported");
static_assert(BN % 16 == 0, "K/V tiles are whole k steps of P V");
static_assert(SMEM_RAW % 16 == 0 && SMEM_HALF % 16 == 0, "alignment");

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned* r) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// C += A * B, m16n8k16, 16-bit operands, float32 accumulate.
template <bool BF16>
__device__ __forceinline__ void mma16(float* c, const unsigned* a, unsigned b0, unsigned b1) {
  if (BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16 codes (one uint4) times their block's scale -> 16 values of the 16-bit type (two uint4).
template <bool BF16>
__device__ __forceinline__ void dequant16(uint4 w, float s, uint4* out) {
  const unsigned in[4] = {w.x, w.y, w.z, w.w};
  unsigned res[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned x = in[i] ^ 0x80808080u;  // bias to unsigned: float(2^23 + u) - 2^23 - 128
    const float f0 = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7440)) - 8388736.0f;
    const float f1 = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7441)) - 8388736.0f;
    const float f2 = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7442)) - 8388736.0f;
    const float f3 = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7443)) - 8388736.0f;
    res[2 * i] = pack2<BF16>(f0 * s, f1 * s);
    res[2 * i + 1] = pack2<BF16>(f2 * s, f3 * s);
  }
  out[0] = make_uint4(res[0], res[1], res[2], res[3]);
  out[1] = make_uint4(res[4], res[5], res[6], res[7]);
}

template <bool BF16>
__device__ __forceinline__ void prefill(const int* __restrict__ meta, int nitems,
                                        const int* __restrict__ ptab,
                                        const unsigned char* __restrict__ inbuf,
                                        const signed char* __restrict__ codes,
                                        const float* __restrict__ scales, int page_code_bytes,
                                        float* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int pages_s[3][BN];  // page ids of three K/V tiles (a ring)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;  // mma group (row) and thread in group
  const PrefillUnit<BM> u(meta, nitems);  // (item, kv head, row tile)
  const int* im = u.im;
  const int G = u.G, start = u.start, nrows = u.nrows, row0 = u.row0;
  const float qs = __int_as_float(im[M_SCALE]);  // softmax_scale * log2(e)

  unsigned char* raw = smem;
  unsigned short* half = reinterpret_cast<unsigned short*>(smem + SMEM_RAW);
  const unsigned half_base = (unsigned)__cvta_generic_to_shared(half);

  // This warp's rows: g and g + 8 of its 16. Causal limits (-1: a pad row, never written).
  const int wrow = row0 + 16 * warp;
  const int r_lo = wrow + g, r_hi = wrow + g + 8;
  const int lim_lo = u.limit(r_lo), lim_hi = u.limit(r_hi);
  const int warp_min_lim = start + wrow / G;
  const int warp_max_lim = wrow < nrows ? start + (min(wrow + 16, nrows) - 1) / G : -1;

  // -- staging: page ids and raw stages of the K/V tiles (q8_prefill_common.cuh) -----------
  const Kv kv = Kv::of(u, pages_s, ptab, codes, scales, page_code_bytes, tid);
  const int ntiles = kv.ntiles;
  // Raw stage of `tile` -> 16-bit K and V tiles in half buffer (tile & 1).
  auto dequant = [&](int tile) {
    if (tile >= ntiles || PF_SKIP_DEQUANT) return;
    const unsigned char* rb = raw + (tile & 1) * RAW_BYTES;
    const float* ks = reinterpret_cast<const float*>(rb + 2 * RAW_CODES);
    unsigned short* kh = half + (tile & 1) * 2 * HALF_TILE;
    constexpr int PIECES = D / 16;
#pragma unroll
    for (int kind = 0; kind < 2; ++kind)
#pragma unroll
      for (int p = tid; p < BN * PIECES; p += NT) {
        const int t = p / PIECES, pc = p % PIECES;
        const uint4 w = *reinterpret_cast<const uint4*>(rb + kind * RAW_CODES + t * D + pc * 16);
        const float s = ks[kind * BN * NB + t * NB + (pc >> 1)];
        uint4 h[2];
        dequant16<BF16>(w, s, h);
        uint4* dst = reinterpret_cast<uint4*>(kh + kind * HALF_TILE + t * HS + pc * 16);
        dst[0] = h[0];
        dst[1] = h[1];
      }
  };

  // -- q: the A fragments of rows g and g + 8, straight from the wire's 16-bit values -------
  const unsigned short* qg = reinterpret_cast<const unsigned short*>(inbuf + im[M_Q]);
  const long long qo_lo = u.q_offset(r_lo, D), qo_hi = u.q_offset(r_hi, D);
  unsigned qf[Q_IN_REGS ? KSTEPS : 1][4];
  unsigned short* qsm = half + SMEM_HALF / 2;  // [BM][HS] where q is not held in registers
  if (Q_IN_REGS) {
    load_q_fragments(qg, qo_lo, qo_hi, c, qf);
  } else {
    for (int p = tid; p < BM * (D / 8); p += NT) {  // 16-byte pieces of q rows
      const int r = p / (D / 8), pc = p % (D / 8);
      *reinterpret_cast<uint4*>(qsm + r * HS + pc * 8) =
          *reinterpret_cast<const uint4*>(qg + u.q_offset(row0 + r, D) + pc * 8);
    }
  }

  float o[NTILES_O][4];
#pragma unroll
  for (int j = 0; j < NTILES_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  RowStats st = {NEG_INF, NEG_INF, 0.0f, 0.0f};

  // ldmatrix lane addressing. K (non-transposed): lanes 0-7 tokens 0-7 at dims +0, 8-15
  // tokens 0-7 at +8, 16-23 tokens 8-15 at +0, 24-31 tokens 8-15 at +8 -> b0, b1 of n tile
  // t0 and b0, b1 of n tile t0 + 8. V (transposed): lanes 0-7 tokens 0-7, 8-15 tokens 8-15,
  // at dims +0 (lanes 0-15) or +8 (16-31) -> b0, b1 of dims d0 and of dims d0 + 8.
  const int k_tok = (lane & 7) + ((lane >> 4) << 3), k_dim = ((lane >> 3) & 1) * 8;
  const int v_tok = lane & 15, v_dim = (lane >> 4) * 8;

  // -- pipeline -----------------------------------------------------------------------------
  int next_page = kv.start(raw);
  dequant(0);

  for (int tile = 0; tile < ntiles; ++tile) {
    kv.advance(tile, raw, next_page);  // tile's 16-bit K/V written; the other buffers free
    dequant(tile + 1);

    const int pos0 = tile * BN;
    if (pos0 > warp_max_lim) continue;  // warp-uniform: all of this tile is in our future
    const unsigned kbase = half_base + (unsigned)((tile & 1) * 2 * HALF_TILE) * 2;
    const unsigned vbase = kbase + HALF_TILE * 2;

    // S = Q K^T: s[j] = tokens pos0 + 8j + 2c + {0, 1} of rows g (0, 1) and g + 8 (2, 3).
    float s[NTILES_S][4];
#pragma unroll
    for (int j = 0; j < NTILES_S; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      unsigned a[4];
      if (Q_IN_REGS) {
#pragma unroll
        for (int x = 0; x < 4; ++x) a[x] = qf[Q_IN_REGS ? kk : 0][x];
      } else {
        // A from shared q: lanes 0-15 rows 0-15 at dims +0, lanes 16-31 at +8.
        const unsigned qa = (unsigned)__cvta_generic_to_shared(
            qsm + (16 * warp + (lane & 15)) * HS + 16 * kk + (lane >> 4) * 8);
        ldsm_x4(qa, a);
      }
#pragma unroll
      for (int j = 0; j < NTILES_S; j += 2) {
        unsigned b[4];
        ldsm_x4(kbase + ((8 * j + k_tok) * HS + 16 * kk + k_dim) * 2, b);
        mma16<BF16>(s[j], a, b[0], b[1]);
        mma16<BF16>(s[j + 1], a, b[2], b[3]);
      }
    }

    // The online softmax; P, rounded to the 16-bit type, as A fragments of P V.
    unsigned pa[NTILES_S / 2][4];
    online_softmax<BF16, false>(s, o, pa, st, qs, pos0 + BN - 1 > warp_min_lim, pos0, c,
                                lim_lo, lim_hi);
    // O += P V.
#pragma unroll
    for (int kk = 0; kk < NTILES_S / 2; ++kk) {
#pragma unroll
      for (int j = 0; j < NTILES_O; j += 2) {
        unsigned b[4];
        ldsm_x4_t(vbase + ((16 * kk + v_tok) * HS + 8 * j + v_dim) * 2, b);
        mma16<BF16>(o[j], pa[kk], b[0], b[1]);
        mma16<BF16>(o[j + 1], pa[kk], b[2], b[3]);
      }
    }
  }

  write_rows(o, st, out + im[M_OUT], qo_lo, qo_hi, c, r_lo < nrows, r_hi < nrows);
}

#define PREFILL_ARGS                                                                     \
  const int *__restrict__ meta, int nitems, const int *__restrict__ ptab,                \
      const unsigned char *__restrict__ inbuf, const signed char *__restrict__ codes,    \
      const float *__restrict__ scales, int page_code_bytes, float *__restrict__ out
extern "C" __global__ void __launch_bounds__(NT, PF_MINBLOCKS) q8_prefill_f16(PREFILL_ARGS) {
  prefill<false>(meta, nitems, ptab, inbuf, codes, scales, page_code_bytes, out);
}
extern "C" __global__ void __launch_bounds__(NT, PF_MINBLOCKS) q8_prefill_bf16(PREFILL_ARGS) {
  prefill<true>(meta, nitems, ptab, inbuf, codes, scales, page_code_bytes, out);
}
