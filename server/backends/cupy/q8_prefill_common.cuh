// Shared by the two prefill kernels (q8_prefill.cu on mma.sync, q8_prefill_wg.cu on wgmma):
// small device helpers, the online softmax of one K/V tile on a warp's accumulator fragments,
// and the final normalize-and-write of a thread's two rows. Fragment layout (both kernels):
// thread (g, c) of a warp holds rows g (elements 0, 1) and g + 8 (2, 3) of the warp's 16,
// at columns 8j + 2c + {0, 1} of n tile j.
#pragma once

#define NEG_INF __int_as_float(0xff800000)

// 16-, 8- or 4-byte global -> shared copy; zero-fill past the end (no stale scale becomes NaN).
__device__ __forceinline__ void cp_async(void* dst, const void* src, int bytes, bool valid) {
  const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  const int n = valid ? bytes : 0;
  if (bytes == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
  else if (bytes == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(s), "l"(src), "r"(n));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Running max and this thread's part of the sum, of rows g (lo) and g + 8 (hi).
struct RowStats {
  float m_lo, m_hi, l_lo, l_hi;
};

// One K/V tile's scores s (NS n tiles of 8 tokens, first position pos0) -> the online
// softmax, all but O's rescale: scaled to log2 units by qs, masked past each row's limit
// where `masked` (only tiles that reach a limit), running max and sum updated, P rounded to
// the 16-bit type as the A fragments of P V (k = 16 tokens = 2 n tiles of S). Returns in
// al_lo / al_hi the factors O must be scaled by (rescale_rows) before this tile's P V is
// added. A row with nothing visible yet keeps max -inf and gets P = 0.
template <bool BF16, int NS>
__device__ __forceinline__ void softmax_tile(float (&s)[NS][4], unsigned (&pa)[NS / 2][4],
                                             RowStats& st, float qs, bool masked, int pos0,
                                             int c, int lim_lo, int lim_hi, float& al_lo,
                                             float& al_hi) {
  float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      float v = s[j][x] * qs;
      if (masked) {
        const int pos = pos0 + 8 * j + 2 * c + (x & 1);
        if (pos > (x < 2 ? lim_lo : lim_hi)) v = NEG_INF;
      }
      s[j][x] = v;
      if (x < 2) mx_lo = fmaxf(mx_lo, v); else mx_hi = fmaxf(mx_hi, v);
    }
#pragma unroll
  for (int d = 1; d < 4; d <<= 1) {
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, d));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, d));
  }
  const float mn_lo = fmaxf(st.m_lo, mx_lo), mn_hi = fmaxf(st.m_hi, mx_hi);
  const float sub_lo = mn_lo == NEG_INF ? 0.0f : mn_lo;  // exp2 of -inf - 0 is 0
  const float sub_hi = mn_hi == NEG_INF ? 0.0f : mn_hi;
  al_lo = fast_exp2(st.m_lo - sub_lo);
  al_hi = fast_exp2(st.m_hi - sub_hi);
  st.m_lo = mn_lo;
  st.m_hi = mn_hi;
  st.l_lo *= al_lo;
  st.l_hi *= al_hi;
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    const float p0 = fast_exp2(s[j][0] - sub_lo), p1 = fast_exp2(s[j][1] - sub_lo);
    const float p2 = fast_exp2(s[j][2] - sub_hi), p3 = fast_exp2(s[j][3] - sub_hi);
    st.l_lo += p0 + p1;
    st.l_hi += p2 + p3;
    pa[j >> 1][(j & 1) * 2 + 0] = pack2<BF16>(p0, p1);
    pa[j >> 1][(j & 1) * 2 + 1] = pack2<BF16>(p2, p3);
  }
}

// O's rows g (lo) and g + 8 (hi) times the softmax's factors; with VOTE, only when some
// row of the warp needs it (a max grew).
template <bool VOTE, int NO>
__device__ __forceinline__ void rescale_rows(float (&o)[NO][4], float al_lo, float al_hi) {
  if (VOTE && !__any_sync(0xffffffffu, al_lo != 1.0f || al_hi != 1.0f)) return;
#pragma unroll
  for (int j = 0; j < NO; ++j) {
    o[j][0] *= al_lo;
    o[j][1] *= al_lo;
    o[j][2] *= al_hi;
    o[j][3] *= al_hi;
  }
}

// softmax_tile, then O rescaled at once (P V of the tile comes after).
template <bool BF16, bool VOTE, int NS, int NO>
__device__ __forceinline__ void online_softmax(float (&s)[NS][4], float (&o)[NO][4],
                                               unsigned (&pa)[NS / 2][4], RowStats& st,
                                               float qs, bool masked, int pos0, int c,
                                               int lim_lo, int lim_hi) {
  float al_lo, al_hi;
  softmax_tile<BF16>(s, pa, st, qs, masked, pos0, c, lim_lo, lim_hi, al_lo, al_hi);
  rescale_rows<VOTE>(o, al_lo, al_hi);
}

// O / sum of rows g and g + 8 to float32 `out` at row offsets qo_lo and qo_hi (elements),
// the rows that exist only (lo_ok, hi_ok: pad rows are never written).
template <int NO>
__device__ __forceinline__ void write_rows(const float (&o)[NO][4], RowStats st, float* out,
                                           long long qo_lo, long long qo_hi, int c,
                                           bool lo_ok, bool hi_ok) {
#pragma unroll
  for (int d = 1; d < 4; d <<= 1) {
    st.l_lo += __shfl_xor_sync(0xffffffffu, st.l_lo, d);
    st.l_hi += __shfl_xor_sync(0xffffffffu, st.l_hi, d);
  }
  if (lo_ok) {
    const float inv = 1.0f / st.l_lo;
    float* dst = out + qo_lo + 2 * c;
#pragma unroll
    for (int j = 0; j < NO; ++j)
      *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][0] * inv, o[j][1] * inv);
  }
  if (hi_ok) {
    const float inv = 1.0f / st.l_hi;
    float* dst = out + qo_hi + 2 * c;
#pragma unroll
    for (int j = 0; j < NO; ++j)
      *reinterpret_cast<float2*>(dst + 8 * j) = make_float2(o[j][2] * inv, o[j][3] * inv);
  }
}

// The K/V of one (item, kv head) as a prefill block streams it, in tiles of BN tokens from
// position 0 to kv_end (exclusive):
// - page ids through a 3-slot ring in shared memory: thread j holds a tile's j-th, fetched
//   into a register a tile ahead (fetch) and stored to the ring a tile later (store), so no
//   thread waits on a global load at a barrier;
// - a tile's raw stage (issue): K codes [BN][D], V codes [BN][D], K scales [BN][NB], V
//   scales [BN][NB], copied global -> shared with cp.async, zero past kv_end. With SWIZZLE,
//   16-byte piece pc of token t's codes lands at piece pc ^ (t % PIECES) (conflict-free
//   copies and column reads).
template <int D, int BN, int NT, bool SWIZZLE>
struct KvStream {
  static constexpr int NB = D / 32;       // scale blocks per head vector
  static constexpr int PIECES = D / 16;   // 16-byte pieces of a head vector's codes
  static constexpr int RAW_CODES = BN * D;
  static constexpr int RAW_BYTES = 2 * RAW_CODES + 2 * BN * NB * 4;
  static_assert(BN <= NT, "a tile's page ids are one per thread");

  // The K/V of prefill work unit `u` (a PrefillUnit, below), through the page-id ring.
  template <class Unit>
  __device__ __forceinline__ static KvStream of(const Unit& u, int (*ring)[BN],
                                                const int* ptab, const signed char* codes,
                                                const float* scales, int page_code_bytes,
                                                int tid) {
    return {ring, ptab + u.im[M_PT], codes, scales, page_code_bytes, page_code_bytes >> 5,
            (long long)u.KVH * u.T * D, (long long)u.KVH * u.T * NB, u.kvh, u.T, u.logT,
            u.kv_end, (u.kv_end + BN - 1) / BN, tid};  // fmt: skip
  }

  int (*ring)[BN];
  const int* pt;  // the item's page table
  const signed char* codes;
  const float* scales;
  long long cstride, sstride;  // a page's codes and scales
  long long vcodes, vscales;   // V after K inside a page
  int kvh, T, logT, kv_end, ntiles, tid;

  // Byte offset of 16-byte piece pc of token t's codes in a raw stage.
  __device__ __forceinline__ static int piece(int t, int pc) {
    return t * D + ((SWIZZLE ? pc ^ (t % PIECES) : pc) * 16);
  }
  __device__ __forceinline__ int pages(int tile) const {
    if (tile >= ntiles) return 0;
    return ((min(tile * BN + BN, kv_end) - 1) >> logT) - ((tile * BN) >> logT) + 1;
  }
  __device__ __forceinline__ int fetch(int tile) const {
    return tid < pages(tile) ? pt[((tile * BN) >> logT) + tid] : 0;
  }
  __device__ __forceinline__ void store(int tile, int page) const {
    if (tid < pages(tile)) ring[tile % 3][tid] = page;
  }
  // Tile `tile` (whose page ids are in the ring) into raw stage rb; one commit group.
  __device__ __forceinline__ void issue(int tile, unsigned char* rb) const {
    if (tile < ntiles) {
      const int base = tile * BN, pfirst = base >> logT;
#pragma unroll
      for (int p = tid; p < BN * PIECES; p += NT) {
        const int t = p / PIECES, pc = p % PIECES, pos = base + t;
        const bool ok = pos < kv_end;
        const signed char* src = codes;
        if (ok) {
          const long long page = ring[tile % 3][(pos >> logT) - pfirst];
          src = codes + page * cstride + ((long long)kvh * T + (pos & (T - 1))) * D + pc * 16;
        }
        cp_async(rb + piece(t, pc), src, 16, ok);
        cp_async(rb + RAW_CODES + piece(t, pc), ok ? src + vcodes : src, 16, ok);
      }
      constexpr int SB = NB % 4 == 0 ? 16 : (NB % 2 == 0 ? 8 : 4);  // bytes per scale copy
      constexpr int SP = NB * 4 / SB;                                // copies per token
      float* ks = reinterpret_cast<float*>(rb + 2 * RAW_CODES);
      for (int p = tid; p < BN * SP; p += NT) {
        const int t = p / SP, sp = p % SP, pos = base + t;
        const bool ok = pos < kv_end;
        const float* src = scales;
        if (ok) {
          const long long page = ring[tile % 3][(pos >> logT) - pfirst];
          src = scales + page * sstride + ((long long)kvh * T + (pos & (T - 1))) * NB +
                sp * (SB / 4);
        }
        cp_async(ks + t * NB + sp * (SB / 4), src, SB, ok);
        cp_async(ks + BN * NB + t * NB + sp * (SB / 4), ok ? src + vscales : src, SB, ok);
      }
    }
    cp_commit();
  }
  // The pipeline's start (raw: two stages of RAW_BYTES): page ids of tiles 0-2 in the ring,
  // tiles 0 and 1 in flight, tile 0 landed for the whole block. Returns this thread's page
  // id of tile 3, for advance().
  __device__ __forceinline__ int start(unsigned char* raw) const {
    store(0, fetch(0));
    store(1, fetch(1));
    store(2, fetch(2));
    const int next = fetch(3);
    __syncthreads();
    issue(0, raw);
    issue(1, raw + RAW_BYTES);
    asm volatile("cp.async.wait_group 1;\n" ::);
    __syncthreads();
    return next;
  }
  // At the top of tile `tile`: tile + 1 landed for the whole block (and whatever the block
  // wrote before this barrier is visible), tile + 2 in flight into the stage tile left,
  // tile + 3's page ids in the ring (``next``: this thread's, then tile + 4's).
  __device__ __forceinline__ void advance(int tile, unsigned char* raw, int& next) const {
    cp_wait_all();
    __syncthreads();
    issue(tile + 2, raw + (tile & 1) * RAW_BYTES);
    store(tile + 3, next);
    next = fetch(tile + 4);
  }
};

// One prefill work unit, decoded from the block index: (item, kv head, tile of BM query
// rows), the units of the longest row tiles first. A row is (new token i, query head of the
// group): row i * G + g, which sees positions [0, start + i].
template <int BM>
struct PrefillUnit {
  const int* im;  // the item's metadata row (q8_common.cuh)
  int G, n, H, KVH, logT, T, start, kvh, nrows, row0;
  int kv_end;  // the K/V positions the unit's rows see: [0, kv_end)

  __device__ __forceinline__ PrefillUnit(const int* meta, int nitems) {
    im = meta + find_item(meta, nitems, M_UNIT, blockIdx.x) * META_STRIDE;
    G = im[M_G], n = im[M_N], H = im[M_H], KVH = im[M_KVH], logT = im[M_LOGT];
    T = 1 << logT, start = im[M_START];
    const int ul = blockIdx.x - im[M_UNIT];
    kvh = ul % KVH;
    nrows = n * G, row0 = (im[M_RT] - 1 - ul / KVH) * BM;
    kv_end = start + (min(row0 + BM, nrows) - 1) / G + 1;
  }
  // The last position row r sees (-1: a pad row past the item's, never written).
  __device__ __forceinline__ int limit(int r) const { return r < nrows ? start + r / G : -1; }
  // First element of row r's q vector in the item's q [n, H, D]; a pad row reads the last
  // real row (it is never written).
  __device__ __forceinline__ long long q_offset(int r, int D) const {
    const int rr = min(r, nrows - 1);
    return ((long long)(rr / G) * H + kvh * G + rr % G) * D;
  }
};

// q's A fragments of a warp's rows g and g + 8 (their first elements at qo_lo, qo_hi of
// qg), straight from the wire's 16-bit values: mma.sync's m16n8k16 A layout, which wgmma's
// register A repeats per warp. KSTEPS 16-dim steps.
template <int KSTEPS>
__device__ __forceinline__ void load_q_fragments(const unsigned short* qg, long long qo_lo,
                                                 long long qo_hi, int c,
                                                 unsigned (&qf)[KSTEPS][4]) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const int d0 = 16 * kk + 2 * c;
    qf[kk][0] = *reinterpret_cast<const unsigned*>(qg + qo_lo + d0);
    qf[kk][1] = *reinterpret_cast<const unsigned*>(qg + qo_hi + d0);
    qf[kk][2] = *reinterpret_cast<const unsigned*>(qg + qo_lo + d0 + 8);
    qf[kk][3] = *reinterpret_cast<const unsigned*>(qg + qo_hi + d0 + 8);
  }
}
