// Quantize-append and dequantize over the Q8 page pool. Built WITHOUT fast math: the codes
// must be bit-identical to the numpy definition (q8kv.format): IEEE division for d = amax / 127
// and id = 1 / d, one rounded multiply x * id, roundf (half away from zero), clamp +-127.
#include "q8_common.cuh"

// Exact value of float32 bits, subnormals included (double arithmetic is not flushed).
__device__ __forceinline__ double f32_bits_to_f64(unsigned bits) {
  const unsigned mag = bits & 0x7fffffffu;
  const double v = (mag >> 23) == 0 ? (double)mag * 0x1p-149 : (double)__uint_as_float(mag);
  return (bits >> 31) ? -v : v;
}

// Bits of float32(v) rounded to nearest even, subnormal results included (cvt.f32.f64
// would flush those under -ftz). Overflow gives infinity.
__device__ __forceinline__ unsigned f32_round_bits(double v) {
  const unsigned sign = v < 0 ? 0x80000000u : 0u;
  const double a = fabs(v);
  if (a >= 0x1p-126) return sign | __float_as_uint(__double2float_rn(a));
  return sign | (unsigned)rint(a * 0x1p149);  // a multiple of 2^-149; 2^23 is 2^-126
}

// code * scale in float32, exact where the scale (and so the product) is subnormal.
__device__ __forceinline__ float code_times_scale(int code, float scale) {
  const unsigned bits = __float_as_uint(scale);
  if (bits & 0x7f800000u) return (float)code * scale;  // normal scale: a normal product
  return __uint_as_float(f32_round_bits((double)code * ((double)bits * 0x1p-149)));
}

// The new token's values in the 16-bit K/V tiles a prefill launch of q8_prefill_ws.cu reads
// (tiles: the batch's scratch; the item's first pair M_TILES): code * scale rounded once,
// as q8_kv_tiles writes the cached tokens'. The item's last token also zeroes the rest of
// its tile, so no stale value (another call's) meets a masked score.
__device__ __forceinline__ void append_to_tiles(const int* im, unsigned char* tiles, int kind,
                                                int h, int i, int b, const unsigned* packed,
                                                float d) {
  const int D = im[M_D], n = im[M_N], pos = im[M_START] + i;
  unsigned char* tile =
      tiles + tile_pair(im, h, pos / PF_TILE) * (4LL * PF_TILE * D) + kind * (2 * PF_TILE * D);
  const int t = pos % PF_TILE;
  const bool bf16 = im[M_DT] == 2;
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // 8 values each: dims 32 b + 8 j ..
    const uint4 v = bf16 ? dequant8_16bit<true>(packed[2 * j], packed[2 * j + 1], d)
                         : dequant8_16bit<false>(packed[2 * j], packed[2 * j + 1], d);
    *reinterpret_cast<uint4*>(tile + tile_offset(t, 4 * b + j, D)) = v;
  }
  if (i == n - 1)
    for (int u = t + 1; u < PF_TILE; ++u)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        *reinterpret_cast<uint4*>(tile + tile_offset(u, 4 * b + j, D)) = make_uint4(0, 0, 0, 0);
}

// One thread per 32-value block of one (item, kind, new token, kv head). The whole batch
// in one launch: the item is found by binary search over the per-item thread prefix.
extern "C" __global__ void q8_append(const int* __restrict__ meta, int nitems, int total,
                                     const int* __restrict__ ptab,
                                     const unsigned char* __restrict__ inbuf,
                                     signed char* __restrict__ codes,
                                     float* __restrict__ scales, int page_code_bytes,
                                     unsigned char* __restrict__ tiles) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= total) return;
  const int* im = meta + find_item(meta, nitems, M_QB, g) * META_STRIDE;
  const int D = im[M_D], NB = D >> 5, KVH = im[M_KVH], n = im[M_N];
  // From 8 new tokens on, 8 consecutive tokens are adjacent threads (the octet fastest):
  // their rows of a 16-bit tile are 128 contiguous bytes, written together. The host counts
  // the item's threads alike (packing.append_threads); those past the last token return.
  const int oc = n < 8 ? 1 : 8;
  int local = g - im[M_QB];
  const int i_lo = local % oc;
  local /= oc;
  const int b = local % NB;
  local /= NB;
  const int h = local % KVH;
  local /= KVH;
  const int octets = (n + oc - 1) / oc;
  const int i = (local % octets) * oc + i_lo;
  const int kind = local / octets;  // 0 = K, 1 = V
  if (i >= n) return;
  const int dt = im[M_DT];
  const unsigned char* src = inbuf + im[kind ? M_V : M_K];
  const long long e0 = ((long long)i * KVH + h) * D + b * 32;

  float x[32];
  if (dt == 0) {
    const float4* p = reinterpret_cast<const float4*>(src) + (e0 >> 2);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      float4 v = p[j];
      x[4 * j] = v.x; x[4 * j + 1] = v.y; x[4 * j + 2] = v.z; x[4 * j + 3] = v.w;
    }
  } else {
    const uint4* p = reinterpret_cast<const uint4*>(src + e0 * 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint4 v = p[j];
      unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        unsigned short lo = w[k] & 0xffffu, hi = w[k] >> 16;
        x[8 * j + 2 * k] = dt == 1 ? f16_to_f32(lo) : bf16_to_f32(lo);
        x[8 * j + 2 * k + 1] = dt == 1 ? f16_to_f32(hi) : bf16_to_f32(hi);
      }
    }
  }
  // CuPy compiles every RawModule with -ftz=true (appended after our options), so float32
  // arithmetic flushes subnormals to zero. The common case (max|x| >= 2^-116) is immune:
  // d, 1/d and every product that can round to a nonzero code stay normal. Smaller blocks
  // take an exact path in double precision that reproduces float32 IEEE results bit for
  // bit (q8kv.format's definition), from the raw bits.
  unsigned amax_bits = 0;  // for non-negative floats, integer order is float order
#pragma unroll
  for (int j = 0; j < 32; ++j) amax_bits = max(amax_bits, __float_as_uint(x[j]) & 0x7fffffffu);
  unsigned packed[8];
  float d;
  if (amax_bits >= 0x05800000u) {  // 2^-116
    d = __uint_as_float(amax_bits) / 127.0f;
    const float id = 1.0f / d;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      unsigned w = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float q = roundf(__fmul_rn(x[4 * j + k], id));
        q = fminf(fmaxf(q, -127.0f), 127.0f);
        w |= ((unsigned)((int)q) & 0xffu) << (8 * k);
      }
      packed[j] = w;
    }
  } else {
    const unsigned d_bits = f32_round_bits(f32_bits_to_f64(amax_bits) / 127.0);
    d = __uint_as_float(d_bits);  // stored as bits: a subnormal survives the store
    const double dd = f32_bits_to_f64(d_bits);
    const double id = d_bits == 0 ? 0.0 : f32_bits_to_f64(f32_round_bits(1.0 / dd));
    const bool huge = isinf(id);  // 1/d overflowed float32: q8kv.format divides by d instead
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      unsigned w = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const double xv = f32_bits_to_f64(__float_as_uint(x[4 * j + k]));
        // x*id is exact in double (24 + 24 bits) and x/d correctly rounded, so one
        // rounding to float32 gives float32's own result; |y| <= 127.5 is normal or 0.
        const double y = huge ? xv / dd : xv * id;
        float q = roundf(__uint_as_float(f32_round_bits(y)));
        q = fminf(fmaxf(q, -127.0f), 127.0f);
        w |= ((unsigned)((int)q) & 0xffu) << (8 * k);
      }
      packed[j] = w;
    }
  }
  const int pos = im[M_START] + i;
  const int logT = im[M_LOGT];
  const int T = 1 << logT;
  const long long page = ptab[im[M_PT] + (pos >> logT)];
  const int slot = pos & (T - 1);
  const long long row = (long long)(kind * KVH + h) * T + slot;
  uint4* dst = reinterpret_cast<uint4*>(codes + page * page_code_bytes + row * D + b * 32);
  dst[0] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  dst[1] = make_uint4(packed[4], packed[5], packed[6], packed[7]);
  scales[page * (page_code_bytes >> 5) + row * NB + b] = d;
  if (tiles != nullptr && im[M_TILES] >= 0) append_to_tiles(im, tiles, kind, h, i, b, packed, d);
}

// Tokens [start, start + L) of one layer -> float32 out[2][KVH][L][D] (K then V).
// One thread per 16 codes.
extern "C" __global__ void q8_dequantize(const int* __restrict__ ptab, int logT, int KVH, int D,
                                         int start, int L, const signed char* __restrict__ codes,
                                         const float* __restrict__ scales, int page_code_bytes,
                                         float* __restrict__ out) {
  const int parts = D >> 4;
  long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long total = 2LL * KVH * L * parts;
  if (g >= total) return;
  const int part = g % parts;
  long long r = g / parts;
  const int t = r % L;
  const int kh = r / L;  // kind * KVH + head
  const int pos = start + t;
  const int T = 1 << logT;
  const long long page = ptab[pos >> logT];
  const long long row = (long long)kh * T + (pos & (T - 1));
  const uint4 c = *reinterpret_cast<const uint4*>(codes + page * page_code_bytes + row * D +
                                                  part * 16);
  const float s = scales[page * (page_code_bytes >> 5) + row * (D >> 5) + (part >> 1)];
  const unsigned w[4] = {c.x, c.y, c.z, c.w};
  float4* o = reinterpret_cast<float4*>(out + r * D + part * 16);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    float4 v;
    v.x = code_times_scale((signed char)(w[k] & 0xff), s);
    v.y = code_times_scale((signed char)((w[k] >> 8) & 0xff), s);
    v.z = code_times_scale((signed char)((w[k] >> 16) & 0xff), s);
    v.w = code_times_scale((signed char)(w[k] >> 24), s);
    o[k] = v;
  }
}

// The packed call's float32 output narrowed to its 16-bit wire dtype on the device (half the
// bytes to copy back, no host conversion): float16 by cvt.rn (IEEE round to nearest even, as
// numpy's astype), bfloat16 by rounding the float32 bits to nearest even (as ml_dtypes),
// NaN kept a quiet NaN. One thread per value.
extern "C" __global__ void q8_narrow(const float* __restrict__ in,
                                     unsigned short* __restrict__ out, long long n,
                                     int to_bf16) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float x = in[i];
  unsigned short h;
  if (to_bf16) {
    const unsigned u = __float_as_uint(x);
    h = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u)
                                        : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  }
  out[i] = h;
}
