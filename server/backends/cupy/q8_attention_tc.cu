// Fused paged attention over the Q8 cache on tensor cores: decode and causal prefill, one
// launch per batch: work units (row tile x sequence split), a cp.async pipeline over the
// pages, split partials merged by the last block to finish. (It replaced a first CUDA-core
// kernel, q8_attention.cu, in git history; docs/kernels.md has both kernels' numbers.)
//
// Per warp and 16-token tile:
// - QK^T on int8 tensor cores (mma m16n8k32 s8, one 32-value scale block per k-slice): the
//   K codes are the B operand exactly as stored (ldmatrix, no conversion); q (pre-scaled by
//   softmax_scale * log2(e)) is split once per block into three int8 digits with one scale
//   per row, q = qsc * (d0 + d1/128 + d2/16384) (error < 2.5e-7 of the row's max |q|), so
//   3 exact int32 products per block, in 2 instructions (digits 0 and 1 fill the 16 rows of
//   one m16n8k32); the K scale applies per (token, block) to the sum.
// - online softmax in float32 on the accumulator fragment (rows = query rows, 8 per tile),
//   exp2, rescaling the output only when a row's max grows.
// - PV^T on tf32 tensor cores (mma m16n8k8, fp32 accumulate): O^T[dims, rows] +=
//   V^T[dims, tokens] P'^T[tokens, rows] with P' = p * v_scale[token, block] split into
//   tf32 hi + lo halves (~22 bits, float32 range), V codes exact in tf32.
// Rows per tile GT = 8 (the N of both products); a row is one (new token, query head).
#include "q8_common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef GT
#define GT 8
#endif
#ifndef NWARPS
#define NWARPS 4
#endif
#ifndef NSTAGES
#define NSTAGES 3
#endif
#ifndef STAGE_CODE_TARGET
#define STAGE_CODE_TARGET 16384
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1
#endif
#ifndef MAX_HEAD_DIM
#error "MAX_HEAD_DIM: the host (kernels.py) defines the largest head_dim the kernels take"
#endif
#ifndef QD_SMEM  // q digits in shared memory, not registers (the host sets it past D = 128)
#define QD_SMEM 0
#endif
#ifndef MAXP  // page ids of one split held in shared memory (the host passes kernels.MAXP)
#define MAXP 1024
#endif
#define NEG_INF __int_as_float(0xff800000)

constexpr int D = HEAD_DIM;
constexpr int NT = 32 * NWARPS;
constexpr int NB = D / 32;   // scale blocks per head vector
constexpr int RS = D + 16;   // padded smem row (bytes): ldmatrix and V loads conflict-free
constexpr int U0 = (STAGE_CODE_TARGET / (2 * D)) / (NWARPS * 16);
constexpr int U = U0 < 1 ? 1 : U0;     // 16-token tiles per warp per stage
constexpr int TOK = U * NWARPS * 16;   // tokens per stage
// 16-token tiles a warp scores before one softmax step (FUSE_TILES, default 2): fewer
// shuffles, votes and rescales per token, and independent products in flight.
#ifndef FUSE_TILES
#define FUSE_TILES 2
#endif
constexpr int FUSE = FUSE_TILES < U ? FUSE_TILES : U;
constexpr int JT = 2 * FUSE;  // 8-token k-steps per softmax step
static_assert(U % FUSE == 0, "FUSE_TILES must divide the tiles per warp and stage");
constexpr int PIECES = D / 16;         // 16-byte pieces per head vector
constexpr int STAGE_CODE_BYTES = 2 * TOK * RS;
constexpr int STAGE_BYTES = STAGE_CODE_BYTES + 2 * TOK * NB * 4;
static_assert(D % 32 == 0 && D <= MAX_HEAD_DIM, "head_dim not supported");
static_assert(GT == 8, "the tensor-core kernel serves 8 rows per tile");
static_assert(NT >= PIECES, "head_dim too large for the copy mapping");
static_assert(NWARPS * GT * (D + 2) * 4 <= NSTAGES * STAGE_BYTES, "reduction scratch too big");

// Diagnostics (benchmarks/kernel_variants.py): STAGING_ONLY runs the copies alone,
// COMPUTE_ONLY the math on zero-filled stages (no global reads).
#ifndef STAGING_ONLY
#define STAGING_ONLY 0
#endif
#ifndef COMPUTE_ONLY
#define COMPUTE_ONLY 0
#endif
// EXIT_AT (diagnostics): 1 returns at once (the launch alone), 3 after the pipeline (no
// output, no merge).
#ifndef EXIT_AT
#define EXIT_AT 0
#endif
// TRACE (diagnostics, benchmarks/decode_trace.py): thread 0 of each of the first
// TRACE_BLOCKS blocks stamps its timeline into q8_trace[block][16]: 0 the global timer at
// its start (ns), 1 its SM, 2-12 clock64 at its steps (start, page ids, q digits, stages 0,
// 1, 2 and the last landed, loop done, partials written, counter taken, end), 13 whether it
// merged, 14 the global timer at its end, 15 its stages.
#ifndef TRACE
#define TRACE 0
#endif
#define TRACE_BLOCKS 4096
#if TRACE
__device__ unsigned long long q8_trace[TRACE_BLOCKS * 16];
__device__ int q8_trace_blocks = TRACE_BLOCKS;  // for the host (CuPy gives no global's size)
#define TRACE_AT(slot, value)                                                  \
  do {                                                                         \
    if (threadIdx.x == 0 && blockIdx.x < TRACE_BLOCKS)                         \
      q8_trace[blockIdx.x * 16 + (slot)] = (unsigned long long)(value);        \
  } while (0)
__device__ __forceinline__ unsigned long long global_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned sm_id() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
#define TRACE_END(merged)          \
  do {                             \
    TRACE_AT(12, clock64());       \
    TRACE_AT(13, (merged));        \
    TRACE_AT(14, global_ns());     \
  } while (0)
#else
#define TRACE_AT(slot, value) \
  do {                        \
  } while (0)
#define TRACE_END(merged) \
  do {                    \
  } while (0)
#endif
// 16 (or 4) bytes global -> shared at a shared-space address; n = 0 copies nothing and
// zero-fills (diagnostics: COMPUTE_ONLY never reads global memory).
__device__ __forceinline__ void cp_async16n(unsigned dst, const void* src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(COMPUTE_ONLY ? 0 : n));
}
__device__ __forceinline__ void cp_async4n(unsigned dst, const void* src, int n) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;  // x <= 0 here; flushing results below 2^-126 to zero is harmless
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
// exp2(x - m), 0 where x is -inf (a masked or empty score), never NaN.
__device__ __forceinline__ float sexp2(float x, float m) {
  return x == NEG_INF ? 0.0f : fast_exp2(x - m);
}

__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2,
                                        unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
// D = A * B (int8 m16n8k32, all 16 rows of A): rows g (d0, d1) and g + 8 (d2, d3).
__device__ __forceinline__ void imma2(int& d0, int& d1, int& d2, int& d3, unsigned a0,
                                      unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                      unsigned b1) {
  asm(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0));
}
// The same with rows 8..15 of A zero: only rows g (d0, d1) are returned.
__device__ __forceinline__ void imma(int& d0, int& d1, unsigned a0, unsigned a2, unsigned b0,
                                     unsigned b1) {
  int unused2, unused3;
  imma2(d0, d1, unused2, unused3, a0, 0u, a2, 0u, b0, b1);
}
// C += A * B (tf32 m16n8k8, fp32 accumulate).
__device__ __forceinline__ void tmma(float* c, float a0, float a1, float a2, float a3, float b0,
                                     float b1) {
  asm(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(__float_as_uint(a0)), "r"(__float_as_uint(a1)), "r"(__float_as_uint(a2)),
        "r"(__float_as_uint(a3)), "r"(__float_as_uint(b0)), "r"(__float_as_uint(b1)));
}
// 4 int8 codes packed in w -> 4 exact floats.
__device__ __forceinline__ void i8x4(unsigned w, float* f) {
  const unsigned x = w ^ 0x80808080u;  // bias to unsigned
  f[0] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7440)) - 8388736.0f;
  f[1] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7441)) - 8388736.0f;
  f[2] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7442)) - 8388736.0f;
  f[3] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7443)) - 8388736.0f;
}
__device__ __forceinline__ unsigned pack4(int a, int b, int c, int d) {
  return (unsigned)(a & 0xff) | ((unsigned)(b & 0xff) << 8) | ((unsigned)(c & 0xff) << 16) |
         ((unsigned)(d & 0xff) << 24);
}

// Row values of thread (g, c)'s A fragments: dims 32b + 16h + 4c + [0, 4) of the element
// range starting at e, from an input of dtype DT (0 float32, 1 float16, 2 bfloat16): first
// loaded as raw bits (one 16- or 8-byte load per 4 values; the caller aligns q to 16 bytes),
// so the loads can be issued long before the values are used, then converted.
template <int DT, int NB_>
__device__ __forceinline__ void load_q_raw(const unsigned char* qb, long long e, int c,
                                           uint4 (&raw)[NB_][2]) {
#pragma unroll
  for (int b = 0; b < NB_; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const long long k = e + 32 * b + 16 * h + 4 * c;
      if (DT == 0) {
        raw[b][h] = *reinterpret_cast<const uint4*>(qb + 4 * k);
      } else {
        const uint2 x = *reinterpret_cast<const uint2*>(qb + 2 * k);
        raw[b][h] = make_uint4(x.x, x.y, 0u, 0u);
      }
    }
}
template <int DT, int NB_>
__device__ __forceinline__ void q_values(const uint4 (&raw)[NB_][2], float (&qv)[NB_][2][4]) {
#pragma unroll
  for (int b = 0; b < NB_; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 r = raw[b][h];
      if (DT == 0) {
        qv[b][h][0] = __uint_as_float(r.x);
        qv[b][h][1] = __uint_as_float(r.y);
        qv[b][h][2] = __uint_as_float(r.z);
        qv[b][h][3] = __uint_as_float(r.w);
      } else {
        const unsigned short x[4] = {(unsigned short)(r.x & 0xffffu), (unsigned short)(r.x >> 16),
                                     (unsigned short)(r.y & 0xffffu), (unsigned short)(r.y >> 16)};
#pragma unroll
        for (int j = 0; j < 4; ++j) qv[b][h][j] = DT == 1 ? f16_to_f32(x[j]) : bf16_to_f32(x[j]);
      }
    }
}

extern "C" __global__ void __launch_bounds__(NT, MINBLOCKS) q8_attend(
    const int* __restrict__ meta, int nitems, const int* __restrict__ ptab,
    const unsigned char* __restrict__ inbuf, const signed char* __restrict__ codes,
    const float* __restrict__ scales, int page_code_bytes, float* __restrict__ out,
    float* __restrict__ part, float* __restrict__ part_ml, int* __restrict__ counters) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int pages_s[MAXP];
  __shared__ int last_s;
#if QD_SMEM
  // The tile's q digits, the same for every warp: [b][digit][lane] as (h0, h1) pairs, read
  // back per tile (conflict-free) so they hold no registers across the pipeline loop.
  __shared__ uint2 qd_s[NB * 3 * 32];
#endif

  if (EXIT_AT == 1) return;
#if TRACE
  TRACE_AT(0, global_ns());
  TRACE_AT(1, sm_id());
  TRACE_AT(2, clock64());
#endif
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;  // mma group (row / column) and thread in group
  const int unit = blockIdx.x;
  const int* im = meta + find_item(meta, nitems, M_UNIT, unit) * META_STRIDE;
  const int nsplit = im[M_NSPLIT], RT = im[M_RT], G = im[M_G], n = im[M_N], H = im[M_H];
  const int KVH = im[M_KVH], logT = im[M_LOGT], start = im[M_START], chunk = im[M_CHUNK];
  const int ul = unit - im[M_UNIT];
  const int split = ul % nsplit;
  const int rest = ul / nsplit;  // kvh * RT + rt
  const int rt = rest % RT, kvh = rest / RT;
  const int nrows = n * G, row0 = rt * GT;
  const int last_row = min(row0 + GT, nrows) - 1;
  const int range_end = start + last_row / G + 1;  // exclusive, for the tile's last row
  const int pos0 = split * chunk;
  const int pos1 = min(pos0 + chunk, range_end);
  const int T = 1 << logT;

  // q's row first (raw bits; converted to digits after the first stages' copies are
  // issued), so its loads overlap the page ids' and the copies'. Row g of the tile (pad
  // rows repeat the last row; they are not written) and its causal limit.
  const int dt = im[M_DT];
  const int qrow = min(row0 + g, last_row);
  const int lim = start + qrow / G;
  uint4 qraw[NB][2];
  {
    const int head = kvh * G + qrow % G;
    const long long e = ((long long)(qrow / G) * H + head) * D;
    const unsigned char* qb = inbuf + im[M_Q];
    // One branch on the dtype for the whole row, so its loads issue back to back.
    if (dt == 0) load_q_raw<0>(qb, e, c, qraw);
    else if (dt == 1) load_q_raw<1>(qb, e, c, qraw);
    else load_q_raw<2>(qb, e, c, qraw);
  }

  // Page ids of [pos0, pos1), so every cp.async below is independent of them.
  const int pfirst = pos0 >> logT;
  const int np = pos1 > pos0 ? ((pos1 - 1) >> logT) - pfirst + 1 : 0;
  const int* pt = ptab + im[M_PT];
  for (int j = tid; j < np; j += NT) pages_s[j] = pt[pfirst + j];

  __syncthreads();
  TRACE_AT(3, clock64());

  const int nst = pos1 > pos0 ? (pos1 - pos0 + TOK - 1) / TOK : 0;

  // Each thread copies one fixed 16-byte piece of TOK / (NT / PIECES) tokens, K and V, so
  // the page lookup and address math are shared by both kinds. The copies are branch-free:
  // a position past the split reads a page id clamped into the split's table and copies
  // zero bytes (cp.async zero-fills), and everything that does not change with the stage
  // (shared addresses, a piece's offset inside a page) is computed once here.
  // (Two or four pieces per thread and pass, fewer address computations, measured 5-36%
  // slower on the H200: a warp's copies no longer cover whole 128-byte lines.)
  constexpr int TSTEP = NT / PIECES;  // tokens covered per pass
  constexpr int PASSES = (TOK + TSTEP - 1) / TSTEP;
  const int my_pc = tid % PIECES, my_t = tid / PIECES;
  constexpr bool SCALE16 = (NB % 4) == 0;  // a token's scales are whole 16-byte pieces
  constexpr int SPIECES = SCALE16 ? NB / 4 : NB;
  constexpr int SSTEP = NT / SPIECES;
  constexpr int SPASSES = (TOK + SSTEP - 1) / SSTEP;
  const int my_sp = tid % SPIECES, my_st = tid / SPIECES;
  const unsigned vcodes = (unsigned)(KVH * T * D);  // V after K inside a page (bytes)
  const unsigned vscales = (unsigned)(KVH * T * NB);  // (floats)
  const unsigned smem_u = (unsigned)__cvta_generic_to_shared(smem);
  const unsigned page_u = (unsigned)__cvta_generic_to_shared(pages_s) - 4u * pfirst;
  const unsigned plast = (unsigned)(pfirst + np - 1);
  const unsigned tmask = (unsigned)(T - 1);
  const unsigned code_piece = (unsigned)(kvh * T * D + my_pc * 16);  // bytes in a page
  const unsigned scale_piece = (unsigned)(kvh * T * NB + my_sp * (SCALE16 ? 4 : 1));
  const unsigned pcb = (unsigned)page_code_bytes, pscb = (unsigned)(page_code_bytes >> 5);
  const unsigned kdst = smem_u + my_t * RS + my_pc * 16;
  const unsigned sdst =
      smem_u + STAGE_CODE_BYTES + (my_st * NB + my_sp * (SCALE16 ? 4 : 1)) * 4;
  // The page id of position pos (clamped into the split: a position past it copies nothing).
  auto page_of = [&](int pos) -> unsigned {
    const unsigned p = min((unsigned)pos >> logT, plast);
    unsigned id;
    asm("ld.shared.u32 %0, [%1];" : "=r"(id) : "r"(page_u + 4u * p));
    return id;
  };
  auto issue = [&](int st) {
    const unsigned so = (unsigned)((st % NSTAGES) * STAGE_BYTES);
    const int base = pos0 + st * TOK;
#pragma unroll
    for (int j = 0; j < PASSES; ++j) {
      const int t = my_t + j * TSTEP;
      if ((NT % PIECES == 0 || my_t < TSTEP) && (TOK % TSTEP == 0 || t < TOK)) {
        const int pos = base + t;
        const int n = pos < pos1 ? 16 : 0;
        const signed char* src = codes + (unsigned long long)page_of(pos) * pcb +
                                 (code_piece + ((unsigned)pos & tmask) * D);
        const unsigned dst = kdst + so + j * TSTEP * RS;
        cp_async16n(dst, src, n);
        cp_async16n(dst + TOK * RS, src + vcodes, n);
      }
    }
#pragma unroll
    for (int j = 0; j < SPASSES; ++j) {
      const int t = my_st + j * SSTEP;
      if ((NT % SPIECES == 0 || my_st < SSTEP) && (TOK % SSTEP == 0 || t < TOK)) {
        const int pos = base + t;
        const bool ok = pos < pos1;
        const float* src = scales + (unsigned long long)page_of(pos) * pscb +
                           (scale_piece + ((unsigned)pos & tmask) * NB);
        const unsigned dst = sdst + so + j * SSTEP * NB * 4;
        if (SCALE16) {
          cp_async16n(dst, src, ok ? 16 : 0);
          cp_async16n(dst + TOK * NB * 4, src + vscales, ok ? 16 : 0);
        } else {
          cp_async4n(dst, src, ok ? 4 : 0);
          cp_async4n(dst + TOK * NB * 4, src + vscales, ok ? 4 : 0);
        }
      }
    }
  };

  // Running max (row g, same in the 4 threads of a group), this thread's part of the row
  // sum, and O^T fragments: acc[b][h] = dims 32b + 4g + 2h + {0: c0/c1, 1: c2/c3} of rows
  // 2c (c0, c2) and 2c + 1 (c1, c3).
  float m = NEG_INF, l = 0.0f;
  float acc[NB][2][4];
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[b][h][k] = 0.0f;
  // Positions from which a score may need masking (end of the split, or the causal limit of
  // the tile's first row).
  const int mask_from = min(pos1, start + row0 / G + 1);
  const unsigned smem_base = (unsigned)__cvta_generic_to_shared(smem);
  // ldmatrix row address of this lane inside a tile: matrix lane/8 = (token half, k half).
  const int lm_tok = ((lane >> 4) << 3) + (lane & 7), lm_off = ((lane >> 3) & 1) * 16;

#pragma unroll
  for (int s = 0; s < NSTAGES - 1; ++s) {
    if (s < nst) issue(s);
    cp_commit();
  }
  // (q's digits overlap the first stages' copies.) q as three int8 digits per value with
  // one scale per row. Thread (g, c) holds the A fragment of row g: dims 32b + 4c + [0, 4)
  // and 32b + 16 + 4c + [0, 4).
  unsigned qd[NB][3][2];  // with QD_SMEM, live only in the prologue (the loop reads qd_s)
  float qsc;
  {
    const float qs = __int_as_float(im[M_SCALE]);
    float qv[NB][2][4];
    if (dt == 0) q_values<0>(qraw, qv);
    else if (dt == 1) q_values<1>(qraw, qv);
    else q_values<2>(qraw, qv);
    float amax = 0.0f;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          qv[b][h][j] *= qs;
          amax = fmaxf(amax, fabsf(qv[b][h][j]));
        }
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    qsc = amax * (1.0f / (127.0f * 16384.0f));  // score = qsc * (16384 A0 + 128 A1 + A2)
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        int d0[4], d1[4], d2[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float r0 = qv[b][h][j] * inv;
          const float f0 = fminf(fmaxf(rintf(r0), -127.0f), 127.0f);
          const float r1 = (r0 - f0) * 128.0f;
          const float f1 = fminf(fmaxf(rintf(r1), -127.0f), 127.0f);
          const float r2 = (r1 - f1) * 128.0f;
          const float f2 = fminf(fmaxf(rintf(r2), -127.0f), 127.0f);
          d0[j] = (int)f0;
          d1[j] = (int)f1;
          d2[j] = (int)f2;
        }
        qd[b][0][h] = pack4(d0[0], d0[1], d0[2], d0[3]);
        qd[b][1][h] = pack4(d1[0], d1[1], d1[2], d1[3]);
        qd[b][2][h] = pack4(d2[0], d2[1], d2[2], d2[3]);
      }
#if QD_SMEM
    if (warp == 0) {
#pragma unroll
      for (int b = 0; b < NB; ++b)
#pragma unroll
        for (int d = 0; d < 3; ++d)
          qd_s[(b * 3 + d) * 32 + lane] = make_uint2(qd[b][d][0], qd[b][d][1]);
    }
#endif
  }
  TRACE_AT(4, clock64());
  TRACE_AT(15, nst);
  for (int st = 0; st < nst; ++st) {
    cp_wait<NSTAGES - 2>();
    __syncthreads();  // stage st landed for all; stage st-1's buffer is free to refill
    if (TRACE && (st < 3 || st == nst - 1)) TRACE_AT(st < 3 ? 5 + st : 8, clock64());
    if (st + NSTAGES - 1 < nst) issue(st + NSTAGES - 1);
    cp_commit();
    const int sofs = (st % NSTAGES) * STAGE_BYTES;
    const unsigned char* sb = smem + sofs;
    const float* ks = reinterpret_cast<const float*>(sb + STAGE_CODE_BYTES);
    const float* vs = ks + TOK * NB;
    if (STAGING_ONLY) continue;  // diagnostics: the copies alone
#pragma unroll
    for (int u = 0; u < U; u += FUSE) {
      const int t0 = (warp * U + u) * 16;  // first token of this warp's tile in the stage
      const int base = pos0 + st * TOK + t0;
      if (base >= pos1) break;  // warp-uniform: nothing left in this split
      // S = Q K^T for FUSE x 16 tokens: tokens t0 + 8j + 2c + {0, 1} of row g in
      // sc[j][0..1]. (Tokens past the split are zero-filled in the stage and masked below.)
      float sc[JT][2];
#pragma unroll
      for (int j = 0; j < JT; ++j) sc[j][0] = sc[j][1] = 0.0f;
#pragma unroll
      for (int f = 0; f < FUSE; ++f) {
        const unsigned kaddr = smem_base + sofs + (t0 + 16 * f + lm_tok) * RS + lm_off;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          unsigned kb[4];
          ldsm_x4(kaddr + 32 * b, kb[0], kb[1], kb[2], kb[3]);
#if QD_SMEM
          const uint2 q0 = qd_s[(b * 3 + 0) * 32 + lane], q1 = qd_s[(b * 3 + 1) * 32 + lane],
                      q2 = qd_s[(b * 3 + 2) * 32 + lane];
#else
          const uint2 q0 = make_uint2(qd[b][0][0], qd[b][0][1]);
          const uint2 q1 = make_uint2(qd[b][1][0], qd[b][1][1]);
          const uint2 q2 = make_uint2(qd[b][2][0], qd[b][2][1]);
#endif
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            int a0[2], a1[2], a2[2];
            // Digits 0 and 1 in one product (A rows 0..7 and 8..15), digit 2 in another.
            imma2(a0[0], a0[1], a1[0], a1[1], q0.x, q1.x, q0.y, q1.y, kb[2 * j], kb[2 * j + 1]);
            imma(a2[0], a2[1], q2.x, q2.y, kb[2 * j], kb[2 * j + 1]);
            const int jj = 2 * f + j;
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float fs = fmaf((float)a0[e], 16384.0f, (float)(a1[e] * 128 + a2[e]));
              sc[jj][e] = fmaf(fs, ks[(t0 + 8 * jj + 2 * c + e) * NB + b], sc[jj][e]);
            }
          }
        }
      }
      float mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < JT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          sc[j][e] *= qsc;
          mx = fmaxf(mx, sc[j][e]);
        }
      if (base + 16 * FUSE > mask_from) {  // warp-uniform
        mx = NEG_INF;
#pragma unroll
        for (int j = 0; j < JT; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int pos = base + 8 * j + 2 * c + e;
            if (pos >= pos1 || pos > lim) sc[j][e] = NEG_INF;
            mx = fmaxf(mx, sc[j][e]);
          }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const bool grow = mx > m;
      if (__any_sync(0xffffffffu, grow)) {  // rescale only when some row's max grows
        const float mn = grow ? mx : m;
        const float a = sexp2(m, mn);
        m = mn;
        l *= a;
        const float a_lo = __shfl_sync(0xffffffffu, a, 8 * c);      // row 2c
        const float a_hi = __shfl_sync(0xffffffffu, a, 8 * c + 4);  // row 2c + 1
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            acc[b][h][0] *= a_lo;
            acc[b][h][1] *= a_hi;
            acc[b][h][2] *= a_lo;
            acc[b][h][3] *= a_hi;
          }
      }
      float p[JT][2];
#pragma unroll
      for (int j = 0; j < JT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          p[j][e] = sexp2(sc[j][e], m);
          l += p[j][e];
        }
      // O^T += V^T P'^T: k-step j covers tokens t0 + 8j + 2c (k = c) and + 1 (k = c + 4).
      const signed char* vc = reinterpret_cast<const signed char*>(sb + TOK * RS);
#pragma unroll
      for (int j = 0; j < JT; ++j) {
        const int ta = t0 + 8 * j + 2 * c;
#pragma unroll
        for (int b = 0; b < NB; ++b) {
          const float x0 = p[j][0] * vs[ta * NB + b], x1 = p[j][1] * vs[(ta + 1) * NB + b];
          const float h0 = __uint_as_float(__float_as_uint(x0) & 0xffffe000u);
          const float h1 = __uint_as_float(__float_as_uint(x1) & 0xffffe000u);
          const float l0 = x0 - h0, l1 = x1 - h1;
          float w0[4], w1[4];
          i8x4(*reinterpret_cast<const unsigned*>(vc + ta * RS + 32 * b + 4 * g), w0);
          i8x4(*reinterpret_cast<const unsigned*>(vc + (ta + 1) * RS + 32 * b + 4 * g), w1);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            tmma(acc[b][h], w0[2 * h], w0[2 * h + 1], w1[2 * h], w1[2 * h + 1], h0, h1);
            tmma(acc[b][h], w0[2 * h], w0[2 * h + 1], w1[2 * h], w1[2 * h + 1], l0, l1);
          }
        }
      }
    }
  }
  cp_wait<0>();
  __syncthreads();  // stage buffers are reused as reduction scratch below
  TRACE_AT(9, clock64());
  if (EXIT_AT == 3) {  // keep the math alive: a sum no input produces decides a store
    float keep = l + m;
#pragma unroll
    for (int b = 0; b < NB; ++b)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int k = 0; k < 4; ++k) keep += acc[b][h][k];
    if (keep == 12345.0f) out[0] = keep;
    return;
  }

  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  float* red = reinterpret_cast<float*>(smem);  // [NWARPS][GT][D]
  float* redml = red + NWARPS * GT * D;         // [NWARPS][GT][2]
#pragma unroll
  for (int b = 0; b < NB; ++b)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int d = 32 * b + 4 * g + 2 * h;
      float* r0 = red + (warp * GT + 2 * c) * D + d;
      float* r1 = r0 + D;
      *reinterpret_cast<float2*>(r0) = make_float2(acc[b][h][0], acc[b][h][2]);
      *reinterpret_cast<float2*>(r1) = make_float2(acc[b][h][1], acc[b][h][3]);
    }
  if (c == 0) {
    redml[(warp * GT + g) * 2] = m;
    redml[(warp * GT + g) * 2 + 1] = l;
  }
  __syncthreads();

  const bool single = nsplit == 1;
  // Only the tile's real rows are combined, written and merged (a decode step with a group
  // of 4 fills 4 of the 8).
  const int rows_here = min(GT, nrows - row0);
  const int H_ = H;
  float* outp = out + im[M_OUT];
  // Each thread combines 4 adjacent dims of a row across the warps (16-byte accesses).
  constexpr int DV = D / 4;
  for (int v = tid; v < rows_here * DV; v += NT) {
    const int r = v / DV, d = 4 * (v - r * DV);
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, redml[(w * GT + r) * 2]);
    float L = 0.0f;
    float4 A = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float e = sexp2(redml[(w * GT + r) * 2], M);
      L = fmaf(redml[(w * GT + r) * 2 + 1], e, L);
      const float4 x = *reinterpret_cast<const float4*>(red + (w * GT + r) * D + d);
      A = make_float4(fmaf(x.x, e, A.x), fmaf(x.y, e, A.y), fmaf(x.z, e, A.z),
                      fmaf(x.w, e, A.w));
    }
    if (single) {
      const int row = row0 + r;
      const int i = row / G, head = kvh * G + row % G;
      const float inv = 1.0f / L;
      *reinterpret_cast<float4*>(outp + ((long long)i * H_ + head) * D + d) =
          make_float4(A.x * inv, A.y * inv, A.z * inv, A.w * inv);
    } else {
      *reinterpret_cast<float4*>(part + ((long long)unit * GT + r) * D + d) = A;
      if (d == 0) {
        part_ml[((long long)unit * GT + r) * 2] = M;
        part_ml[((long long)unit * GT + r) * 2 + 1] = L;
      }
    }
  }
  if (single) {
    TRACE_END(0);
    return;
  }

  // The last split of this row tile to finish merges all of them. (Cooperative groups'
  // grid barrier pattern: the block's writes are ordered before thread 0's fence by the
  // barrier; thread 0's fence after the count orders the reads below after the others'.)
  __syncthreads();
  TRACE_AT(10, clock64());
  int* counter = counters + im[M_CNT] + rest;
  if (tid == 0) {
    __threadfence();
    last_s = atomicAdd(counter, 1) == nsplit - 1;
    if (last_s) __threadfence();
  }
  __syncthreads();
  TRACE_AT(11, clock64());
  if (!last_s) {
    TRACE_END(0);
    return;
  }
  // Each thread merges 4 adjacent dims of a row over the splits in one pass: CH splits'
  // (max, sum) and outputs loaded at once (16-byte loads), then an online rescale per chunk.
  constexpr int CH = 8;
  const int ufirst = unit - split;
  const float4* pbase = reinterpret_cast<const float4*>(part) + (long long)ufirst * GT * DV;
  const float2* mlbase = reinterpret_cast<const float2*>(part_ml) + (long long)ufirst * GT;
  for (int v = tid; v < rows_here * DV; v += NT) {
    const int r = v / DV;
    float Mrun = NEG_INF, L = 0.0f;
    float4 A = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < nsplit; s0 += CH) {
      float2 ml[CH];
      float4 x[CH];
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const int s = s0 + k;
        ml[k] = make_float2(NEG_INF, 0.0f);
        x[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (s < nsplit) {
          ml[k] = __ldcg(mlbase + (long long)s * GT + r);
          x[k] = __ldcg(pbase + (long long)s * GT * DV + v);
        }
      }
      float Mc = Mrun;
#pragma unroll
      for (int k = 0; k < CH; ++k) Mc = fmaxf(Mc, ml[k].x);
      const float a = sexp2(Mrun, Mc);  // 0 while nothing is summed yet
      Mrun = Mc;
      L *= a;
      A = make_float4(A.x * a, A.y * a, A.z * a, A.w * a);
#pragma unroll
      for (int k = 0; k < CH; ++k) {
        const float e = sexp2(ml[k].x, Mc);
        L = fmaf(ml[k].y, e, L);
        A = make_float4(fmaf(x[k].x, e, A.x), fmaf(x[k].y, e, A.y), fmaf(x[k].z, e, A.z),
                        fmaf(x[k].w, e, A.w));
      }
    }
    const float inv = 1.0f / L;
    const int row = row0 + r, d = 4 * (v - r * DV);
    const int i = row / G, head = kvh * G + row % G;
    *reinterpret_cast<float4*>(outp + ((long long)i * H_ + head) * D + d) =
        make_float4(A.x * inv, A.y * inv, A.z * inv, A.w * inv);
  }
  if (tid == 0) *counter = 0;  // ready for the next launch
  TRACE_END(1);
}
