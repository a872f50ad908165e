// Fused paged attention over the Q8 cache: decode and causal prefill, one launch per batch.
//
// Compiled once per (HEAD_DIM, DPL, GT) with -D defines (see cupy_backend.py). A block
// serves one work unit = (item, kv head, row tile, split of the sequence). A row is one
// (new token, query head of the group): all query heads of a kv head share one pass over
// its K/V (GQA), and prefill rows differ only in their causal limit.
//
// Per block: the split's page ids go to shared memory; K/V codes and scales stream
// global -> shared with 16-byte cp.async, NSTAGES deep (zero-filled past the end, so no
// garbage scale can turn into NaN). Each token is served by LPT lanes holding DPL dims
// each; q for the tile's rows sits in registers pre-scaled by softmax_scale * log2(e);
// scores reduce with LPT-wide xor shuffles; online softmax in float32 with exp2,
// rescaling only when the max grows. int8 -> float is exact: __byte_perm puts the biased
// byte into the mantissa of 2^23, one subtraction removes the bias. Splits write
// (max, sum, unnormalized acc) partials; the last block of a row tile to finish merges
// them (a counter per row tile, reset by that block), so there is no second launch.
#include "q8_common.cuh"

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#ifndef DPL
#define DPL 16
#endif
#ifndef GT
#define GT 4
#endif
#ifndef NWARPS
#define NWARPS 4
#endif
#ifndef NSTAGES
#define NSTAGES 4
#endif
#ifndef STAGE_CODE_TARGET
#define STAGE_CODE_TARGET 16384
#endif
#define MAXP 512  // page ids of one split held in shared memory
#define NEG_INF __int_as_float(0xff800000)

constexpr int D = HEAD_DIM;
constexpr int NACT = D / DPL;  // lanes of a token that hold data
constexpr int LPT = NACT <= 1 ? 1 : NACT <= 2 ? 2 : NACT <= 4 ? 4 : NACT <= 8 ? 8
                  : NACT <= 16 ? 16 : 32;  // lanes per token (power of two)
constexpr int TPW = 32 / LPT;               // tokens per warp step
constexpr int NT = 32 * NWARPS;
constexpr int NB = D / 32;  // scale blocks per head vector
constexpr int U0 = (STAGE_CODE_TARGET / (2 * D)) / (NWARPS * TPW);
constexpr int U = U0 < 1 ? 1 : U0;  // warp steps per stage
#ifndef UBMAX
#define UBMAX 4
#endif
#ifndef MINBLOCKS
#define MINBLOCKS 1
#endif
constexpr int UB = U < UBMAX ? U : UBMAX;  // steps per softmax update
constexpr int TOK = U * NWARPS * TPW;  // tokens per stage
constexpr int PIECES = D / 16;         // 16-byte pieces per head vector
constexpr int STAGE_CODE_BYTES = 2 * TOK * D;
constexpr int STAGE_BYTES = STAGE_CODE_BYTES + 2 * TOK * NB * 4;
static_assert(D % 32 == 0 && NACT >= 1 && NACT <= 32, "head_dim not supported");
static_assert(DPL == 8 || DPL == 16, "DPL must be 8 or 16");
static_assert(NT >= PIECES, "head_dim too large for the copy mapping");
static_assert(NWARPS * GT * (D + 2) * 4 <= NSTAGES * STAGE_BYTES, "reduction scratch too big");


__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// exp2(x - m), 0 where x is -inf (a masked or empty score), never NaN.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;  // x <= 0 here; flushing results below 2^-126 to zero is harmless
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float sexp2(float x, float m) {
  return x == NEG_INF ? 0.0f : fast_exp2(x - m);
}

// 4 int8 codes packed in w -> 4 exact floats.
__device__ __forceinline__ void i8x4(unsigned w, float* f) {
  const unsigned x = w ^ 0x80808080u;  // bias to unsigned
  f[0] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7440)) - 8388736.0f;
  f[1] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7441)) - 8388736.0f;
  f[2] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7442)) - 8388736.0f;
  f[3] = __uint_as_float(__byte_perm(x, 0x4B000000u, 0x7443)) - 8388736.0f;
}

// DPL codes of one lane from shared memory -> floats.
__device__ __forceinline__ void load_codes(const signed char* p, float* f) {
  if (DPL == 16) {
    const uint4 c = *reinterpret_cast<const uint4*>(p);
    i8x4(c.x, f); i8x4(c.y, f + 4); i8x4(c.z, f + 8); i8x4(c.w, f + 12);
  } else {
    const uint2 c = *reinterpret_cast<const uint2*>(p);
    i8x4(c.x, f); i8x4(c.y, f + 4);
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

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = lane % LPT, tg = lane / LPT;
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

  // Page ids of [pos0, pos1) first, so every cp.async below is independent of them.
  const int pfirst = pos0 >> logT;
  const int np = pos1 > pos0 ? ((pos1 - 1) >> logT) - pfirst + 1 : 0;
  const int* pt = ptab + im[M_PT];
  for (int j = tid; j < np; j += NT) pages_s[j] = pt[pfirst + j];

  // q rows of the tile in registers (pad rows repeat the last row; they are not written).
  float q[GT][DPL];
  int lim[GT];
  {
    const float qs = __int_as_float(im[M_SCALE]);
    const int dt = im[M_DT];
    const unsigned char* qb = inbuf + im[M_Q];
#pragma unroll
    for (int r = 0; r < GT; ++r) {
      const int row = min(row0 + r, last_row);
      const int i = row / G, head = kvh * G + row % G;
      lim[r] = start + i;
      const long long e = ((long long)i * H + head) * D + sub * DPL;
#pragma unroll
      for (int j = 0; j < DPL; ++j) q[r][j] = sub < NACT ? load_in(qb, dt, e + j) * qs : 0.0f;
    }
  }
  __syncthreads();

  const long long cstride = page_code_bytes, sstride = page_code_bytes >> 5;
  const int nst = pos1 > pos0 ? (pos1 - pos0 + TOK - 1) / TOK : 0;

  // Each thread copies one fixed 16-byte piece of TOK / (NT / PIECES) tokens, K and V, so
  // the page lookup and address math are shared by both kinds.
  constexpr int TSTEP = NT / PIECES;  // tokens covered per pass
  constexpr int PASSES = (TOK + TSTEP - 1) / TSTEP;
  const int my_pc = tid % PIECES, my_t = tid / PIECES;
  constexpr bool SCALE16 = (NB % 4) == 0;  // a token's scales are whole 16-byte pieces
  constexpr int SPIECES = SCALE16 ? NB / 4 : NB;
  constexpr int SSTEP = NT / SPIECES;
  constexpr int SPASSES = (TOK + SSTEP - 1) / SSTEP;
  const int my_sp = tid % SPIECES, my_st = tid / SPIECES;
  const long long vcodes = (long long)KVH * T * D;  // V after K inside a page
  const long long vscales = (long long)KVH * T * NB;
  auto issue = [&](int st) {
    unsigned char* sb = smem + (st % NSTAGES) * STAGE_BYTES;
    const int base = pos0 + st * TOK;
#pragma unroll
    for (int j = 0; j < PASSES; ++j) {
      const int t = my_t + j * TSTEP;
      if (my_t < TSTEP && (TOK % TSTEP == 0 || t < TOK)) {
        const int pos = base + t;
        const bool ok = pos < pos1;
        const signed char* src = codes;
        if (ok) {
          const long long page = pages_s[(pos >> logT) - pfirst];
          src = codes + page * cstride + ((long long)kvh * T + (pos & (T - 1))) * D + my_pc * 16;
        }
        cp_async16(sb + t * D + my_pc * 16, src, ok);
        cp_async16(sb + (TOK + t) * D + my_pc * 16, ok ? src + vcodes : src, ok);
      }
    }
    float* ss = reinterpret_cast<float*>(sb + STAGE_CODE_BYTES);
#pragma unroll
    for (int j = 0; j < SPASSES; ++j) {
      const int t = my_st + j * SSTEP;
      if (my_st < SSTEP && (TOK % SSTEP == 0 || t < TOK)) {
        const int pos = base + t;
        const bool ok = pos < pos1;
        const float* src = scales;
        if (ok) {
          const long long page = pages_s[(pos >> logT) - pfirst];
          src = scales + page * sstride + ((long long)kvh * T + (pos & (T - 1))) * NB;
        }
        if (SCALE16) {
          cp_async16(ss + t * NB + my_sp * 4, ok ? src + my_sp * 4 : src, ok);
          cp_async16(ss + (TOK + t) * NB + my_sp * 4, ok ? src + vscales + my_sp * 4 : src, ok);
        } else {
          cp_async4(ss + t * NB + my_sp, ok ? src + my_sp : src, ok);
          cp_async4(ss + (TOK + t) * NB + my_sp, ok ? src + vscales + my_sp : src, ok);
        }
      }
    }
  };

  float m[GT], l[GT], acc[GT][DPL];
#pragma unroll
  for (int r = 0; r < GT; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.0f;
#pragma unroll
    for (int j = 0; j < DPL; ++j) acc[r][j] = 0.0f;
  }

#pragma unroll
  for (int s = 0; s < NSTAGES - 1; ++s) {
    if (s < nst) issue(s);
    cp_commit();
  }
  for (int st = 0; st < nst; ++st) {
    cp_wait<NSTAGES - 2>();
    __syncthreads();  // stage st landed for all; stage st-1's buffer is free to refill
    if (st + NSTAGES - 1 < nst) issue(st + NSTAGES - 1);
    cp_commit();
    const unsigned char* sb = smem + (st % NSTAGES) * STAGE_BYTES;
    const signed char* kc = reinterpret_cast<const signed char*>(sb);
    const signed char* vc = kc + TOK * D;
    const float* ks = reinterpret_cast<const float*>(sb + STAGE_CODE_BYTES);
    const float* vs = ks + TOK * NB;
    const int base = pos0 + st * TOK;
#pragma unroll
    for (int u0 = 0; u0 < U; u0 += UB) {
      float s[UB][GT];
#pragma unroll
      for (int j = 0; j < UB; ++j) {
        const int t = (warp * U + u0 + j) * TPW + tg;
        const int pos = base + t;
        float kf[DPL];
        float ksc = 0.0f;
        if (u0 + j < U && sub < NACT) {
          load_codes(kc + t * D + sub * DPL, kf);
          ksc = ks[t * NB + (sub * DPL) / 32];
        } else {
#pragma unroll
          for (int d = 0; d < DPL; ++d) kf[d] = 0.0f;
        }
#pragma unroll
        for (int r = 0; r < GT; ++r) {
          float dot = 0.0f;
#pragma unroll
          for (int d = 0; d < DPL; ++d) dot = fmaf(q[r][d], kf[d], dot);
          dot *= ksc;
#pragma unroll
          for (int off = LPT / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          s[j][r] = (u0 + j < U && pos < pos1 && pos <= lim[r]) ? dot : NEG_INF;
        }
      }
#pragma unroll
      for (int r = 0; r < GT; ++r) {
        float mx = s[0][r];
#pragma unroll
        for (int j = 1; j < UB; ++j) mx = fmaxf(mx, s[j][r]);
        if (mx > m[r]) {  // rescale only when the max grows
          const float a = sexp2(m[r], mx);
          l[r] *= a;
#pragma unroll
          for (int d = 0; d < DPL; ++d) acc[r][d] *= a;
          m[r] = mx;
        }
      }
#pragma unroll
      for (int j = 0; j < UB; ++j) {
        if (u0 + j < U) {
          const int t = (warp * U + u0 + j) * TPW + tg;
          float vf[DPL];
          float vsc = 0.0f;
          if (sub < NACT) {
            load_codes(vc + t * D + sub * DPL, vf);
            vsc = vs[t * NB + (sub * DPL) / 32];
          } else {
#pragma unroll
            for (int d = 0; d < DPL; ++d) vf[d] = 0.0f;
          }
#pragma unroll
          for (int r = 0; r < GT; ++r) {
            const float p = sexp2(s[j][r], m[r]);
            l[r] += p;
            const float pv = p * vsc;
#pragma unroll
            for (int d = 0; d < DPL; ++d) acc[r][d] = fmaf(pv, vf[d], acc[r][d]);
          }
        }
      }
    }
  }
  cp_wait<0>();
  __syncthreads();  // stage buffers are reused as reduction scratch below

  // Merge the token groups of each warp (lanes with equal sub hold the same dims).
#pragma unroll
  for (int off = LPT; off < 32; off <<= 1) {
#pragma unroll
    for (int r = 0; r < GT; ++r) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[r], off);
      const float lo = __shfl_xor_sync(0xffffffffu, l[r], off);
      const float mn = fmaxf(m[r], mo);
      const float a = sexp2(m[r], mn), b = sexp2(mo, mn);
      l[r] = l[r] * a + lo * b;
#pragma unroll
      for (int d = 0; d < DPL; ++d) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[r][d], off);
        acc[r][d] = acc[r][d] * a + ao * b;
      }
      m[r] = mn;
    }
  }
  float* red = reinterpret_cast<float*>(smem);  // [NWARPS][GT][D]
  float* redml = red + NWARPS * GT * D;         // [NWARPS][GT][2]
  if (tg == 0 && sub < NACT) {
#pragma unroll
    for (int r = 0; r < GT; ++r)
#pragma unroll
      for (int d = 0; d < DPL; ++d) red[(warp * GT + r) * D + sub * DPL + d] = acc[r][d];
  }
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < GT; ++r) {
      redml[(warp * GT + r) * 2] = m[r];
      redml[(warp * GT + r) * 2 + 1] = l[r];
    }
  }
  __syncthreads();

  const bool single = nsplit == 1;
  const int H_ = H;
  float* outp = out + im[M_OUT];
  for (int idx = tid; idx < GT * D; idx += NT) {
    const int r = idx / D, d = idx - r * D;
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, redml[(w * GT + r) * 2]);
    float L = 0.0f, A = 0.0f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float e = sexp2(redml[(w * GT + r) * 2], M);
      L += redml[(w * GT + r) * 2 + 1] * e;
      A += red[(w * GT + r) * D + d] * e;
    }
    const int row = row0 + r;
    if (single) {
      if (row < nrows) {
        const int i = row / G, head = kvh * G + row % G;
        outp[((long long)i * H_ + head) * D + d] = A / L;
      }
    } else {
      part[((long long)unit * GT + r) * D + d] = A;
      if (d == 0) {
        part_ml[((long long)unit * GT + r) * 2] = M;
        part_ml[((long long)unit * GT + r) * 2 + 1] = L;
      }
    }
  }
  if (single) return;

  // The last split of this row tile to finish merges all of them.
  __threadfence();
  __syncthreads();
  int* counter = counters + im[M_CNT] + rest;
  if (tid == 0) last_s = atomicAdd(counter, 1) == nsplit - 1;
  __syncthreads();
  if (!last_s) return;
  __threadfence();
  const int ufirst = unit - split;
  // (max, sum) of every split into shared memory at once, then one warp per row reduces.
  float* wm = red;                   // [GT][nsplit] maxima, then merge weights
  float* wl = red + GT * nsplit;     // [GT][nsplit] sums
  float* lsum = wl + GT * nsplit;    // [GT]
  for (int idx = tid; idx < GT * nsplit; idx += NT) {
    const int r = idx / nsplit, s = idx - r * nsplit;
    const float2 ml = __ldcg(reinterpret_cast<const float2*>(part_ml) + (long long)(ufirst + s) * GT + r);
    wm[idx] = ml.x;
    wl[idx] = ml.y;
  }
  __syncthreads();
  for (int r = warp; r < GT; r += NWARPS) {
    float M = NEG_INF;
    for (int s = lane; s < nsplit; s += 32) M = fmaxf(M, wm[r * nsplit + s]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    float L = 0.0f;
    for (int s = lane; s < nsplit; s += 32) {
      const float e = sexp2(wm[r * nsplit + s], M);
      wm[r * nsplit + s] = e;
      L += wl[r * nsplit + s] * e;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) L += __shfl_xor_sync(0xffffffffu, L, off);
    if (lane == 0) lsum[r] = L;
  }
  __syncthreads();
  // Every thread sums its outputs over the splits with many loads in flight.
  constexpr int PER = (GT * D + NT - 1) / NT;
  float A[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) A[k] = 0.0f;
  const float* pbase = part + (long long)ufirst * GT * D;
#pragma unroll 8
  for (int s = 0; s < nsplit; ++s) {
#pragma unroll
    for (int k = 0; k < PER; ++k) {
      const int idx = tid + k * NT;
      if (idx < GT * D) A[k] += __ldcg(pbase + (long long)s * GT * D + idx) * wm[(idx / D) * nsplit + s];
    }
  }
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int idx = tid + k * NT;
    if (idx >= GT * D) continue;
    const int r = idx / D, d = idx - r * D;
    const int row = row0 + r;
    if (row >= nrows) continue;
    const int i = row / G, head = kvh * G + row % G;
    outp[((long long)i * H_ + head) * D + d] = A[k] / lsum[r];
  }
  if (tid == 0) *counter = 0;  // ready for the next launch
}
