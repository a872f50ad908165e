// Quantize-append and dequantize over the Q8 page pool. Built WITHOUT fast math: the codes
// must be bit-identical to the numpy definition (q8.py): IEEE division for d = amax / 127
// and id = 1 / d, one rounded multiply x * id, roundf (half away from zero), clamp +-127.
#include "q8_common.cuh"

// One thread per 32-value block of one (item, kind, new token, kv head). The whole batch
// in one launch: the item is found by binary search over the per-item block prefix.
extern "C" __global__ void q8_append(const int* __restrict__ meta, int nitems, int total,
                                     const int* __restrict__ ptab,
                                     const unsigned char* __restrict__ inbuf,
                                     signed char* __restrict__ codes,
                                     float* __restrict__ scales, int page_code_bytes) {
  int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= total) return;
  const int* im = meta + find_item(meta, nitems, M_QB, g) * META_STRIDE;
  const int D = im[M_D], NB = D >> 5, KVH = im[M_KVH], n = im[M_N];
  int local = g - im[M_QB];
  const int b = local % NB;
  local /= NB;
  const int h = local % KVH;
  local /= KVH;
  const int i = local % n;
  const int kind = local / n;  // 0 = K, 1 = V
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
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(x[j]));
  const float d = amax / 127.0f;
  const float id = d == 0.0f ? 0.0f : 1.0f / d;
  // Where 1/d overflows (max|x| < ~3.7e-37, d subnormal) divide by d instead, as q8.py does.
  const bool tiny = isinf(id);
  unsigned packed[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    unsigned w = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float q = roundf(tiny ? __fdiv_rn(x[4 * j + k], d) : __fmul_rn(x[4 * j + k], id));
      q = fminf(fmaxf(q, -127.0f), 127.0f);
      w |= ((unsigned)((int)q) & 0xffu) << (8 * k);
    }
    packed[j] = w;
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
    v.x = (float)(signed char)(w[k] & 0xff) * s;
    v.y = (float)(signed char)((w[k] >> 8) & 0xff) * s;
    v.z = (float)(signed char)((w[k] >> 16) & 0xff) * s;
    v.w = (float)(signed char)(w[k] >> 24) * s;
    o[k] = v;
  }
}
