// Causal prefill over the Q8 cache, warp-specialized on Hopper (sm_90a), over K/V
// dequantized once per call into 16-bit tiles:
//
// 1. The tiles: every K/V position a prefill launch reads, as code * scale in float32 rounded
//    once to the wire's 16-bit type (as a 16-bit cache of the same values would hold them),
//    in a device scratch of tile pairs: per (item, kv head, tile of BN tokens) the K tile
//    then the V tile, each [token][dim] in wgmma's canonical no-swizzle layout (core
//    matrices of 8 tokens x 16 bytes, tile_offset in q8_common.cuh). q8_append writes the
//    new tokens' as it quantizes them, and zeros past the item's last token (a masked score
//    then never meets a stale, perhaps non-finite, value); q8_kv_tiles_{f16,bf16} here the
//    tokens cached before the call (no launch where there are none).
// 2. q8_prefill_ws_{f16,bf16}: one block per unit (item, kv head, tile of BM = 128 query
//    rows; rows and causal limits as q8_prefill.cu). One lane of a producer warpgroup
//    streams tile pairs into PF_STAGES shared-memory stages, one bulk copy (TMA) per pair, completing on the
//    stage's "full" mbarrier; two consumer warpgroups of 64 rows each run, per tile j:
//    S_j = Q K_j^T issued, then O += P_{j-1} V_{j-1} issued, the online softmax of S_j
//    while P V runs on the tensor cores, and O's rescale once P V is done; a stage is
//    handed back ("empty") when its P V is done. Without dequantization or address math in
//    the loop, the consumers' instructions are the products and the softmax (the kernel of
//    q8_prefill_wg.cu dequantized every tile in every block: issue-bound at ~266 TF/s).
// q comes from the input buffer as the wire sent it (registers: wgmma's A).
#include "q8_common.cuh"
#include "q8_prefill_common.cuh"
#include "q8_wgmma.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef PF_STAGES
#define PF_STAGES 4
#endif

constexpr int D = HEAD_DIM;
constexpr int BN = PF_TILE;               // tokens per K/V tile (q8_common.cuh)
constexpr int BM = 128;                   // query rows per block: two warpgroups of 64
constexpr int CONSUMER_WARPS = BM / 16;   // 8
constexpr int NT = 32 * CONSUMER_WARPS + 128;  // + the producer warpgroup
// Registers per thread after the roles part (setmaxnreg): the producer gives up what the
// consumers take, 128 x 24 + 256 x 240 <= 65,536.
constexpr int PRODUCER_REGS = 24, CONSUMER_REGS = 240;
constexpr int KSTEPS = D / 16;
constexpr int NTILES_S = BN / 8;
constexpr int NTILES_O = D / 8;
constexpr int HALF_TILE = BN * D * 2;     // bytes of one 16-bit K or V tile
constexpr int PAIR = 2 * HALF_TILE;       // K tile then V tile
constexpr int NB = D / 32;
static_assert(D == 128, "the warp-specialized prefill is written for head_dim 128");

// -- 1. the tiles of cached tokens -----------------------------------------------------------

// One block per (tile pair, quarter of its tokens), pair first_pair + blockIdx.x / 4 of the
// batch's scratch; the launch's items are found by their first pair (M_TILES). Only the
// positions cached before the call: q8_append wrote the new tokens' and the zeros past them.
constexpr int TILE_PARTS = 4;
template <bool BF16>
__device__ __forceinline__ void kv_tiles(const int* __restrict__ meta, int nitems,
                                         int first_pair, const int* __restrict__ ptab,
                                         const signed char* __restrict__ codes,
                                         const float* __restrict__ scales, int page_code_bytes,
                                         unsigned char* __restrict__ tiles) {
  const int pair = first_pair + blockIdx.x / TILE_PARTS, part = blockIdx.x % TILE_PARTS;
  const int* im = meta + find_item(meta, nitems, M_TILES, pair) * META_STRIDE;
  const int KVH = im[M_KVH], logT = im[M_LOGT], T = 1 << logT, start = im[M_START];
  const int per_head = pairs_per_head(im);
  const int local = pair - im[M_TILES];
  const int kvh = local / per_head, tile = local % per_head;
  constexpr int TOKENS = BN / TILE_PARTS;
  const int first = tile * BN + part * TOKENS;  // this block's first position
  if (first >= start) return;
  const int* pt = ptab + im[M_PT];
  const long long vcodes = (long long)KVH * T * D, vscales = (long long)KVH * T * NB;
  unsigned char* dst = tiles + (long long)pair * PAIR;
  constexpr int C8 = D / 8;  // 8-value pieces of a head vector
  // Piece p: consecutive threads write consecutive 16 bytes of the canonical layout (the
  // token's low 3 bits fastest) and read 8 code bytes of 8 tokens' rows.
  for (int p = threadIdx.x; p < 2 * TOKENS * C8; p += blockDim.x) {
    const int kind = p / (TOKENS * C8), r = p % (TOKENS * C8);
    const int t = part * TOKENS + (r / (8 * C8)) * 8 + (r & 7), c8 = (r >> 3) % C8;
    const int pos = tile * BN + t;
    if (pos >= start) continue;
    const long long page = pt[pos >> logT];
    const long long row = (long long)kvh * T + (pos & (T - 1));
    const uint2 w = *reinterpret_cast<const uint2*>(codes + page * page_code_bytes +
                                                    (kind ? vcodes : 0) + row * D + c8 * 8);
    const float s =
        scales[page * (page_code_bytes >> 5) + (kind ? vscales : 0) + row * NB + (c8 >> 2)];
    *reinterpret_cast<uint4*>(dst + kind * HALF_TILE + tile_offset(t, c8, D)) =
        dequant8_16bit<BF16>(w.x, w.y, s);
  }
}

#define TILES_ARGS                                                                      \
  const int *__restrict__ meta, int nitems, int first_pair, const int *__restrict__ ptab, \
      const signed char *__restrict__ codes, const float *__restrict__ scales,          \
      int page_code_bytes, unsigned char *__restrict__ tiles
extern "C" __global__ void __launch_bounds__(256) q8_kv_tiles_f16(TILES_ARGS) {
  kv_tiles<false>(meta, nitems, first_pair, ptab, codes, scales, page_code_bytes, tiles);
}
extern "C" __global__ void __launch_bounds__(256) q8_kv_tiles_bf16(TILES_ARGS) {
  kv_tiles<true>(meta, nitems, first_pair, ptab, codes, scales, page_code_bytes, tiles);
}

// -- 2. the attention -----------------------------------------------------------------------

template <bool BF16>
__device__ __forceinline__ void prefill(const int* __restrict__ meta, int nitems,
                                        const unsigned char* __restrict__ inbuf,
                                        const unsigned char* __restrict__ tiles,
                                        float* __restrict__ out) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ __align__(8) unsigned long long bars[2 * PF_STAGES];  // full[], then empty[]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const PrefillUnit<BM> u(meta, nitems);  // (item, kv head, row tile)
  const int* im = u.im;
  const int ntiles = (u.kv_end + BN - 1) / BN;
  const unsigned sbase = (unsigned)__cvta_generic_to_shared(smem);
  const unsigned full0 = (unsigned)__cvta_generic_to_shared(bars);
  const unsigned empty0 = full0 + 8 * PF_STAGES;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < PF_STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);                // the producer's arrival + the bytes
      mbar_init(empty0 + 8 * s, CONSUMER_WARPS);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();  // the only block-wide barrier: the roles part here

  if (warp >= CONSUMER_WARPS) {  // the producer warpgroup: one lane issues every copy
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGS));
    if (warp == CONSUMER_WARPS && lane == 0) {
      const int per_head = pairs_per_head(u.start, u.n);  // from registers, not the meta row
      const unsigned char* src =
          tiles + ((long long)im[M_TILES] + (long long)u.kvh * per_head) * PAIR;
      for (int j = 0; j < ntiles; ++j) {
        const int s = j % PF_STAGES;
        if (j >= PF_STAGES) mbar_wait(empty0 + 8 * s, (j / PF_STAGES - 1) & 1);
        mbar_expect(full0 + 8 * s, PAIR);
        bulk_copy(sbase + s * PAIR, src + (long long)j * PAIR, PAIR, full0 + 8 * s);
      }
    }
    return;  // the consumers wait for every copy before the block can end
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGS));

  const int g = lane >> 2, c = lane & 3, wg = warp >> 2;
  const int G = u.G, start = u.start, nrows = u.nrows, row0 = u.row0;
  const float qs = __int_as_float(im[M_SCALE]);  // softmax_scale * log2(e)
  // Rows of this thread (g and g + 8 of its warp's 16) and of its warpgroup (64).
  const int r_lo = row0 + 16 * warp + g, r_hi = r_lo + 8;
  const int lim_lo = u.limit(r_lo), lim_hi = u.limit(r_hi);
  const int wg_min_lim = start + (row0 + 64 * wg) / G;

  // q: A fragments of rows g and g + 8, as the wire sent them (registers: wgmma's A).
  const unsigned short* qg = reinterpret_cast<const unsigned short*>(inbuf + im[M_Q]);
  const long long qo_lo = u.q_offset(r_lo, D), qo_hi = u.q_offset(r_hi, D);
  unsigned qf[KSTEPS][4];
  load_q_fragments(qg, qo_lo, qo_hi, c, qf);

  float o[NTILES_O][4];
#pragma unroll
  for (int j = 0; j < NTILES_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
  RowStats st = {NEG_INF, NEG_INF, 0.0f, 0.0f};
  // P of two tiles: the one whose P V runs and the next, computed meanwhile (the roles
  // alternate: no register of a running wgmma is written).
  unsigned pa[BN / 16][4], pb[BN / 16][4];
  float al_lo, al_hi;

  auto wait_full = [&](int j) { mbar_wait(full0 + 8 * (j % PF_STAGES), (j / PF_STAGES) & 1); };
  auto scores = [&](int j, float (&s)[NTILES_S][4]) {  // S_j = Q K_j^T
    issue_scores<BF16, D>(s, qf, sbase + (j % PF_STAGES) * PAIR);
  };
  auto pv = [&](int j, const unsigned (&p)[BN / 16][4]) {  // O += P_j V_j
    issue_pv<BF16, D>(o, p, sbase + (j % PF_STAGES) * PAIR + HALF_TILE);
  };
  // Tile j >= 1: S_j, then P_{j-1} V_{j-1} (prev) running while the softmax of S_j makes
  // P_j (next); O rescaled once P V is done, and the stage of j - 1 handed back.
  auto step = [&](int j, const unsigned (&prev)[BN / 16][4], unsigned (&next)[BN / 16][4]) {
    float s[NTILES_S][4];
    wait_full(j);
    scores(j, s);
    pv(j - 1, prev);
    wg_wait<1>();  // S_j done (groups complete in order)
    reg_fence(s);
    const int pos0 = j * BN;
    softmax_tile<BF16>(s, next, st, qs, pos0 + BN - 1 > wg_min_lim, pos0, c, lim_lo, lim_hi,
                       al_lo, al_hi);
    wg_wait<0>();
    reg_fence(o);
    if (lane == 0) mbar_arrive(empty0 + 8 * ((j - 1) % PF_STAGES));
    rescale_rows<true>(o, al_lo, al_hi);
  };

  {
    float s[NTILES_S][4];
    wait_full(0);
    scores(0, s);
    wg_wait<0>();
    reg_fence(s);
    softmax_tile<BF16>(s, pa, st, qs, BN - 1 > wg_min_lim, 0, c, lim_lo, lim_hi, al_lo, al_hi);
  }
  int j = 1;
  for (; j + 1 < ntiles; j += 2) {
    step(j, pa, pb);
    step(j + 1, pb, pa);
  }
  if (j < ntiles) {
    step(j, pa, pb);
    pv(j, pb);
  } else {
    pv(j - 1, pa);
  }
  wg_wait<0>();
  reg_fence(o);

  write_rows(o, st, out + im[M_OUT], qo_lo, qo_hi, c, r_lo < nrows, r_hi < nrows);
}

#define PREFILL_WS_ARGS                                                                 \
  const int *__restrict__ meta, int nitems, const unsigned char *__restrict__ inbuf,    \
      const unsigned char *__restrict__ tiles, float *__restrict__ out
extern "C" __global__ void __launch_bounds__(NT, 1) q8_prefill_ws_f16(PREFILL_WS_ARGS) {
  prefill<false>(meta, nitems, inbuf, tiles, out);
}
extern "C" __global__ void __launch_bounds__(NT, 1) q8_prefill_ws_bf16(PREFILL_WS_ARGS) {
  prefill<true>(meta, nitems, inbuf, tiles, out);
}
